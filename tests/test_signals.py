"""SIGTERM (what SLURM and every scheduler send first) and SIGINT stop a run with a checkpoint of the step
it reached and a status that says so; the same command then resumes from that step, to the weights of the
same run never interrupted."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.train.checkpoint import safe_load
from processes import shell_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_the_run_resumes_from_there(tmp_path, sig):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness.train", "data=swissroll", "model=mlp-xs", "trainer.steps=1500",
           "trainer.log_every_steps=5", "trainer.checkpoint_every_steps=1000", "eval.num_samples=20",
           "eval.steps=[1]", "eval.grid=false", "--out", str(run_dir)]
    env = shell_env()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]          # 143 / 130: the shell's convention
    result = json.loads((run_dir / "result.json").read_text())
    step = int(result["status"].split(" at step ")[1].split()[0])
    assert result["status"].startswith(f"interrupted: {sig.name} at step ") and step >= 10
    assert "checkpoint saved" in result["status"]
    assert step < 1000 and (run_dir / "checkpoints" / f"step-{step:07d}").is_dir()   # before the schedule's
    from harness.sweep.status import run_state
    assert run_state(str(run_dir)) == "interrupted"                      # a sweep runs it again, not "failed"
    # the same command resumes from that step, and the metrics hold each step once
    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"resumed from step {step}" in resumed.stderr, resumed.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 1500
    # ... to the weights of the same run never interrupted (no step lost or applied twice)
    straight = tmp_path / "straight"
    done = subprocess.run([*cmd[:-2], "--out", str(straight)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("harness.pt", "engine/mp_rank_00_model_states.pt"):
        a, b = (_tensors(safe_load(d / "checkpoints" / "step-0001500" / name)) for d in (run_dir, straight))
        assert a.keys() == b.keys() and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def _tensors(tree, prefix=""):
    """Every tensor in a nested checkpoint dict, by its path."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _tensors(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _tensors(sub, f"{prefix}/{i}").items()}
    return {}
