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
