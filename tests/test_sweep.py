"""The interim sweep driver: stable run directories, stage wiring, errors before any work."""
import pytest

from harness.config import ConfigError
from harness.sweep import load_spec, main, plan

SPEC = """
name: demo
out: {out}
base: [data=digits, trainer.steps=2]
grid: {{model: [unet-xs, dit-xs]}}
stages:
  - {{name: teacher, overrides: [method=edm]}}
  - {{name: ect, init_from: teacher, overrides: [method=ect]}}
"""


def _spec(tmp_path, text=SPEC):
    path = tmp_path / "spec.yaml"
    path.write_text(text.format(out=tmp_path / "out"))
    return str(path)


def test_plan_is_stable_and_wires_init_from(tmp_path):
    spec = load_spec(_spec(tmp_path))
    runs = plan(spec, ["seed=3"])
    assert [(r.stage, r.point["model"]) for r in runs] == [
        ("teacher", "unet-xs"), ("ect", "unet-xs"), ("teacher", "dit-xs"), ("ect", "dit-xs")]
    assert runs[1].run_dir == str(tmp_path / "out" / "demo" / "ect-unet-xs")
    assert f"init_from={runs[0].run_dir}" in runs[1].overrides
    assert "seed=3" in runs[3].overrides
    assert plan(spec, ["seed=3"]) == runs


def test_bad_specs_fail_before_work(tmp_path, capsys):
    bad_stage = SPEC.replace("init_from: teacher", "init_from: nothere")
    with pytest.raises(ConfigError, match="starts from 'nothere', which is not an earlier stage"):
        plan(load_spec(_spec(tmp_path, bad_stage)), [])
    with pytest.raises(ConfigError, match="grid key 'model' needs a non-empty list"):
        load_spec(_spec(tmp_path, SPEC.replace("[unet-xs, dit-xs]", "[]")))
    assert main([_spec(tmp_path), "trainer.bogus=1"]) == 2
    assert "unknown config key 'trainer.bogus'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
