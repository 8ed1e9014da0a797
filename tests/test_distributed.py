"""Two-process data parallel on CPU (gloo): the same weights as one process on the whole batch."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.train import checkpoint
from processes import shell_env

WORKER = Path(__file__).with_name("dp_worker.py")
ROOT = WORKER.parent.parent


def _train(run_dir: Path, nproc: int, *overrides: str) -> dict:
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(run_dir), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), str(run_dir), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=shell_env(), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = checkpoint.list_checkpoints(run_dir)[0]
    return torch.load(newest / "engine" / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_ranks_match_one_process(tmp_path, zero_stage):
    one = _train(tmp_path / "one", 1, f"trainer.zero_stage={zero_stage}")
    two = _train(tmp_path / "two", 2, f"trainer.zero_stage={zero_stage}")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-6, msg=key)
    # and training did something: Adam moved the weights from their initialization
    torch.manual_seed(0)
    from harness.config import compose
    from harness.nets import build_net
    cfg = compose(["model=unet-xs", "data=digits"])
    init = build_net(cfg.model, (1, 8, 8), 0).state_dict()
    moved = sum(int(not torch.equal(init[k], one[k])) for k in one)
    assert moved > len(one) // 2
