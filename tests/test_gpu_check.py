"""Issue 16: the prepared GPU check runs here too: without a CUDA GPU it names every check it skips and
why, writes its JSON and exits 0 (on a GPU, every check runs and none may fail)."""
import json
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ["fp16_ect", "fp16_sct", "bf16_ect", "triton_jvp", "dropout_tape", "xformers", "nccl_one_rank", "nccl_two_ranks",
          "step_cost", "smoke_sweep"]


def test_gpu_check_script(tmp_path):
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path / "gpu_check.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["checks"]) == CHECKS
    if not torch.cuda.is_available():
        assert report["device"] == "no CUDA GPU"
        for name, row in report["checks"].items():
            assert row == {"status": "skipped", "reason": "no CUDA GPU here (torch.cuda.is_available() is False)"}
            assert f"  {name:<15s} skipped  no CUDA GPU here" in out.stdout
    else:
        assert all(row["status"] in ("passed", "skipped") for row in report["checks"].values())
