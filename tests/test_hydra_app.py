"""`python -m harness.train` is a Hydra application: its help, --cfg, --info, shell completion and -m grids
behave as Hydra's do, and Hydra's output locations map onto run directories with nothing else written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError, compose
from processes import shell_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data=swissroll", "model=mlp-xs", "trainer.steps=2", "trainer.batch_size=16", "eval.num_samples=20",
        "eval.steps=[1]", "eval.grid=false", "trainer.checkpoint_every_steps=2"]


def _train(args, cwd):
    return subprocess.run([sys.executable, "-m", "harness.train", *args], capture_output=True, text=True,
                          cwd=cwd, env=shell_env(), timeout=600)


def test_help_lists_groups_choices_and_keys(tmp_path):
    proc = _train(["--help", "method=ict"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.split("== Config (")[0]
    groups = dict(line.split(": ", 1) for line in head.splitlines()
                  if line.split(":")[0] in ("method", "model", "data", "preset", "recipe") and ": " in line)
    assert {"ect", "ict", "stable_ct", "gcm"} <= set(groups["method"].split(", "))
    assert groups["preset"].split(", ") == ["auto", "cifar10", "imagenet64", "tiny"]
    assert "ect-cifar10" in groups["recipe"].split(", ") and "unet-xs" in groups["model"].split(", ")
    assert "  name: ict" in proc.stdout and "lr_schedule:" in proc.stdout   # the config, with the override
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_prints_the_composed_config_and_writes_nothing(tmp_path):
    proc = _train(["--cfg", "job", "recipe=ect-digits", "model=unet-xs", "trainer.lr=5e-4"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    # the recipe's group choices and keys, then the command line on top of it (model, lr)
    assert (cfg["method"]["name"], cfg["model"]["name"], cfg["trainer"]["lr"]) == ("ect", "unet-xs", 5e-4)
    assert cfg["trainer"]["steps"] == 1000 and cfg["method"]["preset"] == "tiny"
    assert list(tmp_path.iterdir()) == []


def test_info_and_shell_completion(tmp_path):
    info = _train(["--info"], tmp_path)
    assert info.returncode == 0 and "Hydra" in info.stdout, info.stderr
    comp = _train(["--shell-completion", "install=bash"], tmp_path)
    assert comp.returncode == 0 and "hydra_bash_completion" in comp.stdout, comp.stderr


def test_multirun_grid_into_default_and_hydra_named_directories(tmp_path):
    proc = _train(["-m", "seed=0,1", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2 and all(p.name.startswith("ect-mlp-xs-swissroll-") for p in runs)
    seeds = sorted(json.loads((p / "config.json").read_text())["seed"] for p in runs)
    assert seeds == [0, 1]
    assert all(json.loads((p / "result.json").read_text())["status"] == "completed" for p in runs)
    # nothing else: no .hydra/, no outputs/ or multirun/, no log files; the grid is recorded in runs/
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_file()) == ["multirun.yaml"]
    assert not list(tmp_path.rglob(".hydra"))

    proc = _train(["-m", "method=ect,ict", *TINY, "--out", "grid"], tmp_path)     # = hydra.sweep.dir=grid
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["0", "1", "multirun.yaml"]
    names = [json.loads((tmp_path / "grid" / n / "config.json").read_text())["method"]["name"] for n in "01"]
    assert names == ["ect", "ict"]
    assert "grid/1: completed" in proc.stdout


def test_single_run_into_out_or_hydra_run_dir_and_conflicts(tmp_path):
    proc = _train([*TINY, "--out", "out/one"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out/one/result.json").read_text())["status"] == "completed"
    assert proc.stdout.startswith("out/one: completed")
    proc = _train([*TINY, "hydra.run.dir=out/two"], tmp_path)     # Hydra's own spelling works too
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out/two/result.json").read_text())["status"] == "completed"
    for args, error in ((["--out", "a", "hydra.run.dir=b"], "--out and hydra.run.dir= both name the output; give one"),
                        (["--out", "a", "--out=b"], "--out given 2 times (a, b); give one"),
                        (["--out"], "--out needs a directory: --out DIR"),
                        (["run_dir=a"], "the run directory is given as --out DIR, not run_dir=")):
        proc = _train([*TINY, *args], tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {error}"], (args, proc.stderr)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_bad_job_in_a_grid_stops_the_grid_before_anything_runs(tmp_path):
    proc = _train(["-m", "trainer.lr=1e-3,abc", *TINY], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid override:") and "abc" in lines[0], proc.stderr
    assert "could not be converted to Float" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_presets_and_recipes_are_groups_composed_by_hydra():
    # a preset's constants land under what the command line sets, whatever the order on the line
    ct = compose(["method.huber_c=0.5", "method=ect", "preset=imagenet64", "model=unet-xs"])
    assert ct.method.preset == "imagenet64" and ct.method.huber_c == 0.5
    assert compose(["method=ect", "preset=imagenet64", "model=unet-xs"]).method.huber_c != 0.5
    # auto follows the dataset; a method's preset is written into the config it resolved to
    assert compose(["method=ect", "data=swissroll", "model=mlp-xs"]).method.preset == "tiny"
    # the recipe sets its own groups, and the command line's group choice wins over the recipe's
    assert compose(["recipe=edm-digits"]).model.name == "unet-s"
    cfg = compose(["recipe=edm-digits", "model=unet-xs"])
    assert (cfg.recipe, cfg.method.name, cfg.model.name, cfg.trainer.lr) == ("edm-digits", "edm", "unet-xs", 3e-3)
    for bad, message in ((["+trainer.foo=1"], "the schema is closed"),
                         (["+recipe=edm-digits"], "write recipe=edm-digits"),
                         (["method=gcm", "preset=imagenet64", "model=unet-xs"],
                          "unknown gcm preset 'imagenet64'; valid: auto, cifar10, tiny")):
        with pytest.raises(ConfigError, match=message):
            compose(bad)
