"""End to end on the real digits: SCT (stable_ct) tuned from the short EDM teacher of test_end_to_end.

Asserts what a user would look for: no non-finite step, the variance-reduced target really averages over
several references (ESS logged), 2-step samples beat 1-step, and both are far below the untrained network."""
import math

import pytest

from harness.config import compose
from harness.train.cli import run
from tests.test_end_to_end import COMMON, _evals, _rows     # the `teacher` fixture is in conftest (session)


@pytest.mark.slow
def test_stable_ct_tunes_the_edm_teacher(teacher, tmp_path):
    teacher_dir, _ = teacher
    untrained = _evals(teacher_dir)                          # step 0 of the teacher: the untrained network
    result = run(compose([*COMMON, "method=stable_ct", "trainer.steps=300", "trainer.lr=1e-3",
                          f"init_from={teacher_dir}", "eval.every_steps=300", "eval.steps=[1,2]",
                          f"run_dir={tmp_path / 'sct'}"]))
    assert result["status"] == "completed" and result["nonfinite_skipped"] == 0
    rows = [r for r in _rows(tmp_path / "sct") if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    # the in-batch reference set (128 digits) spreads the weights: more than one effective reference
    ess = [r["stable_ct/ess"] for r in rows]
    assert all(0 < e <= 1 for e in ess) and min(r["stable_ct/ess_samples"] for r in rows) > 1.0
    start = _evals(tmp_path / "sct")
    final = {s["steps"]: s["value"] for s in result["scores"]}
    assert final[1] < start[(0, 1)]                          # tuning improves 1-step sampling
    assert final[2] < final[1]                               # a second step helps
    assert final[1] < untrained[(0, 1)] / 2 and final[2] < untrained[(0, 18)] / 5
