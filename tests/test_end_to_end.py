"""End to end on the real digits: an EDM teacher, then ECT tuned from it (a few minutes of CPU).

Asserts what a user would look for: the teacher's samples are close to held-out digits; ECT's
1- and 2-step samples improve over tuning and end far below the untrained network's score."""
import json

import pytest

from harness.config import compose
from harness.train import run

COMMON = ["data=digits", "model=unet-xs", "trainer.optimizer=adam", "trainer.batch_size=128",
          "trainer.ema_betas=[]", "trainer.ema_stds=[0.05]", "eval.num_samples=600"]


def _evals(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["eval/steps"]): r["eval/value"] for r in rows if "eval/value" in r}


@pytest.mark.slow
def test_edm_teacher_then_ect(tmp_path):
    teacher = run(compose([*COMMON, "method=edm", "trainer.steps=600", "trainer.lr=3e-3",
                           "trainer.lr_schedule=inverse_sqrt", "trainer.lr_ref_steps=300",
                           "eval.every_steps=600", "eval.steps=[1,0]", f"run_dir={tmp_path / 'edm'}"]))
    assert teacher["status"] == "completed"
    t = _evals(tmp_path / "edm")
    assert t[(0, 1)] > 30 and t[(0, 18)] > 30                 # the untrained network: far from digits
    final = {s["steps"]: s["value"] for s in teacher["scores"]}
    floor = teacher["scores"][0]["floor"]
    assert final[18] < 4 * floor + 1.0                         # Heun, 35 NFE: close to the data

    ect = run(compose([*COMMON, "method=ect", "trainer.steps=300", "trainer.lr=1e-3",
                       f"init_from={tmp_path / 'edm'}", "eval.every_steps=300", "eval.steps=[1,2]",
                       f"run_dir={tmp_path / 'ect'}"]))
    assert ect["status"] == "completed"
    e = _evals(tmp_path / "ect")
    final = {s["steps"]: s["value"] for s in ect["scores"]}
    assert final[1] < e[(0, 1)] and final[2] < e[(0, 2)]      # tuning improves 1- and 2-step sampling
    assert final[2] < final[1]                                  # a second step helps
    assert final[2] < t[(0, 18)] / 5                            # far below the initial network
    assert (tmp_path / "ect" / "samples_ema_std0.05_2step.png").exists()
