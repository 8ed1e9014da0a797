import os

import pytest

# Tests are single-threaded per process and never see a GPU setting leak in from the shell.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def compose_run(tmp_path):
    """compose() with a run_dir under tmp_path and a small, fast trainer setup."""
    from harness.config import compose

    def make(*overrides, run_dir="run"):
        return compose(["data=digits", "model=unet-xs", "trainer.batch_size=32", "trainer.threads=1",
                        "eval.at_end=false", f"run_dir={tmp_path / run_dir}", *overrides])
    return make


@pytest.fixture
def cifar10_stub(tmp_path):
    """An extracted CIFAR-10 folder of empty files: enough for configs that check data.path, not to load."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).touch()
    return folder


# The digits end-to-end setup (tests/test_end_to_end.py, test_e2e_*.py); thresholds there were measured with
# the pixel-space FD, so it is pinned.
# The study's sampler protocol (harness.eval.select): EMAs and 2-step mid-points chosen on the selection set,
# the mid-point over one grid of EDM noise levels (factor 2 from 0.025 to 3.2) for every method.
SAMPLER_PROTOCOL = ["eval.selection=true", "eval.mid_sigma_grid=[0.025,0.05,0.1,0.2,0.4,0.8,1.6,3.2]"]
E2E_COMMON = ["data=digits", "model=unet-xs", "trainer.optimizer=adam", "trainer.batch_size=128",
              "trainer.ema_betas=[]", "trainer.ema_stds=[0.05]", "eval.num_samples=600", "eval.metric=pixel_fd",
              *SAMPLER_PROTOCOL]


def _teacher_run(tmp_path_factory, method: str, *extra: str):
    from harness.config import compose
    from harness.train.cli import run
    run_dir = tmp_path_factory.mktemp("e2e") / method
    result = run(compose([*E2E_COMMON, f"method={method}", "trainer.steps=600", "trainer.lr=3e-3",
                          "trainer.lr_schedule=inverse_sqrt", "trainer.lr_ref_steps=300",
                          "eval.steps=[1,0]", *extra, f"run_dir={run_dir}"]))
    assert result["status"] == "completed"
    return run_dir, result


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A 600-step EDM teacher on the digits (trained once per session, shared by every e2e file)."""
    return _teacher_run(tmp_path_factory, "edm", "eval.every_steps=600")


@pytest.fixture(scope="session")
def trigflow_teacher(tmp_path_factory):
    """A 600-step TrigFlow teacher on the digits (for sCT / sCD)."""
    return _teacher_run(tmp_path_factory, "trigflow")
