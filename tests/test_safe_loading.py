"""Issue 15: nothing a run directory holds can run code. A checkpoint file whose pickle calls os.system is
planted at every place a run directory is read (init_from=, teacher=, harness.evaluate, resume, and the
DeepSpeed engine state the resume loads); each refuses it in one line naming the file, and the command
never runs."""
import shutil
from pathlib import Path

import pytest
import torch

from harness.config import compose
from harness.train import checkpoint
from harness.train.cli import run

FAST = ["data=swissroll", "model=mlp-xs", "trainer.batch_size=32", "trainer.threads=1", "eval.at_end=false",
        "trainer.checkpoint_every_steps=2"]


class _Payload:
    """Unpickling this runs a shell command (the attack: any pickle may name any callable)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A completed 2-step EDM run (a teacher for CD, an init for anything on the same data)."""
    run_dir = tmp_path_factory.mktemp("safe") / "edm"
    assert run(compose([*FAST, "method=edm", "trainer.steps=2", f"run_dir={run_dir}"]))["status"] == "completed"
    return run_dir


def _planted(source: Path, dest: Path, file: str) -> tuple[Path, Path]:
    """A copy of `source` whose newest checkpoint's `file` is the payload; (copy, the file it would touch)."""
    shutil.copytree(source, dest)
    marker = dest.parent / f"PWNED-{dest.name}"
    newest = checkpoint.list_checkpoints(dest)[0]
    torch.save({"emas": _Payload(marker), "module": _Payload(marker)}, newest / file)
    return dest, marker


def test_the_payload_is_real(tmp_path, source):
    """The planted file does run its command under a plain torch.load: the tests below can fail."""
    planted, marker = _planted(source, tmp_path / "control", "harness.pt")
    torch.load(checkpoint.list_checkpoints(planted)[0] / "harness.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("key,method", [("init_from", "edm"), ("teacher", "cd")])
def test_a_planted_init_or_teacher_is_refused(tmp_path, source, key, method):
    planted, marker = _planted(source, tmp_path / "shared", "harness.pt")
    result = run(compose([*FAST, f"method={method}", "trainer.steps=1", f"{key}={planted}",
                          f"run_dir={tmp_path / 'student'}"]))
    newest = checkpoint.list_checkpoints(planted)[0] / "harness.pt"
    assert result["status"] == (f"failed: UnsafeCheckpointError: {newest}: refused: loading it would call "
                                f"posix.system, and only tensors and plain data are read from a checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("file", ["harness.pt", "engine/mp_rank_00_model_states.pt"])
def test_harness_evaluate_refuses_a_planted_run(tmp_path, source, capsys, file):
    """harness.pt, and DeepSpeed's model states (read for a run that kept no EMA: the planted emas are
    not a dict, so the raw network is what it would fall back to)."""
    from harness.eval.evaluate import main
    planted, marker = _planted(source, tmp_path / "shared", file)
    if file != "harness.pt":
        newest = checkpoint.list_checkpoints(planted)[0]
        state = torch.load(newest / "harness.pt", weights_only=True)
        torch.save({**state, "emas": {}}, newest / "harness.pt")
    assert main([str(planted), "--num-samples", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {checkpoint.list_checkpoints(planted)[0] / file}: "
                                               "refused: loading it would call posix.system")
    assert not marker.exists() and not (planted / "evaluate.json").exists()


@pytest.mark.parametrize("file", ["harness.pt", "engine/mp_rank_00_model_states.pt", "rng-rank0.pt"])
def test_resuming_a_planted_run_is_refused(tmp_path, file):
    """The run's own newest checkpoint (harness state, DeepSpeed's engine state, the RNG state): the resume
    stops with the file named rather than running it or falling back past it."""
    cfg = [*FAST, "method=edm", "trainer.steps=4", f"run_dir={tmp_path / 'run'}"]
    run(compose(cfg))
    (tmp_path / "run" / "result.json").unlink()            # as if killed after its step-4 checkpoint
    marker = tmp_path / "PWNED-run"
    newest = checkpoint.list_checkpoints(tmp_path / "run")[0]
    torch.save({"x": _Payload(marker)}, newest / file)
    result = run(compose(cfg))
    assert result["status"].startswith(f"failed: UnsafeCheckpointError: {newest / file}: refused: loading it "
                                       "would call posix.system")
    assert not marker.exists()


def test_deepspeed_state_classes_still_load(tmp_path, caplog):
    """The one allowance: ZeRO-1 with bf16 writes a LossScaler, ZeroStageEnum and fragment addresses into
    its optimizer states; a resume of such a run reads them."""
    cfg = [*FAST, "method=edm", "trainer.steps=4", "trainer.zero_stage=1", "trainer.precision=bf16",
           f"run_dir={tmp_path / 'run'}"]
    run(compose(cfg))
    newest = checkpoint.list_checkpoints(tmp_path / "run")[0]
    optim = next((newest / "engine").glob("*optim_states.pt"))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(optim)     # it does hold such classes
    checkpoint.safe_load(optim)
    (tmp_path / "run" / "result.json").unlink()               # as if killed after its last checkpoint
    with caplog.at_level("INFO", logger="harness.train.trainer"):
        result = run(compose(cfg))
    assert result["status"] == "completed" and result["steps"] == 4
    assert "resumed from step 4" in caplog.messages
