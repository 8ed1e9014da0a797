"""Config errors: one clear line naming what was wrong and what is valid, before any work starts."""
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import ConfigError, compose

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("override,message", [
    ("method=nope", "unknown method 'nope'; valid: .*ect.*edm"),
    ("model=huge", "unknown model 'huge'; valid: .*unet-s"),
    ("data=mnist", "unknown data 'mnist'; valid: .*digits"),
    ("trainer.stepz=3", "unknown config key 'trainer.stepz'; valid keys in trainer: steps, batch_size"),
    ("method.qq=3", "unknown config key 'method.qq'; valid keys in method: name, preset"),
    ("bogus=1", "unknown config key 'bogus'; valid keys in the top level: method, model"),
    ("trainer.steps=abc", "invalid override: .*trainer.steps"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not valid; valid: auto, fp32, bf16, fp16"),
    ("trainer.zero_stage=3", "trainer.zero_stage=3 is not supported; valid: 0, 1, 2"),
    ("trainer.optimizer=sgd", "trainer.optimizer='sgd' is not valid; valid: adam, adamw, radam"),
    ("preset=mnist", "unknown preset 'mnist'; valid: auto, cifar10, imagenet64, tiny"),
    ("method.preset=cifar10", "a method's preset is a config group: write preset=cifar10"),
    ("model.attention=flashy", "unknown attention backend 'flashy'"),
    ("data=cifar10", "data.path"),
    ("trainer.batch_size=0", r"trainer.steps and trainer.batch_size must be >= 1 \(got 2000, 0\)"),
    ("trainer.checkpoint_every_steps=0", "trainer.checkpoint_every_steps must be >= 1, got 0"),
    ("eval.every_steps=-5", "eval.every_steps must be >= 0"),
    ("trainer.ema_stds=[0.05,0.050]", "two EMAs share a name"),
    ("trainer.ema_betas=[1.5]", r"trainer.ema_betas must lie in \(0, 1\)"),
    ("eval.num_samples=1", "eval.num_samples must be >= 2"),
    ("launcher.nproc=3", "launcher.nproc=3 must be >= 1 and divide trainer.batch_size=128"),
    ("trainer.deepspeed={train_batch_size:3}", "DeepSpeed option.s. train_batch_size are set by the harness"),
    ("trainer.deepspeed={zero_optimization:{stage:3}}", "zero_optimization.stage are set by the harness"),
    ("trainer.deepspeed=5", "trainer.deepspeed=5 must be a mapping"),
    ("trainer.deepspeed_config=/nonexistent/ds.json", "trainer.deepspeed_config=/nonexistent/ds.json cannot be read"),
    ("+trainer.foo=1", "the schema is closed"),
])
def test_bad_input_is_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        compose(["method=ect", override])
    assert "\n" not in str(info.value)


def test_fp16_on_cpu_is_refused_not_downgraded():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is valid here")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device.*valid here: fp32, bf16"):
        compose(["trainer.precision=fp16"])


def test_cli_error_writes_nothing(tmp_path):
    run_dir = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "harness.train", "method=nope", "--out", str(run_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: unknown method 'nope'; valid:") and len(lines) == 1, proc.stderr
    assert not run_dir.exists()


def test_resolved_config_defaults():
    cfg = compose([])
    assert (cfg.method.name, cfg.model.name, cfg.data.name) == ("ect", "unet-s", "digits")
    assert cfg.trainer.precision == "auto" and cfg.trainer.optimizer == "radam"


def test_recipes_expand_under_the_command_line():
    cfg = compose(["recipe=ect-digits", "trainer.lr=5e-4"])
    assert cfg.recipe == "ect-digits" and cfg.method.name == "ect" and cfg.model.name == "unet-s"
    assert cfg.trainer.lr == 5e-4 and list(cfg.trainer.ema_stds) == [0.05]
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; valid: .*ect-cifar10"):
        compose(["recipe=nope"])
    # the CIFAR-10 recipe needs the user's data path, and says so
    with pytest.raises(ConfigError, match="data.path"):
        compose(["recipe=ect-cifar10"])


def test_ect_cifar10_recipe_is_table_7(cifar10_stub):
    cfg = compose(["recipe=ect-cifar10", f"data.path={cifar10_stub}"])
    # ECT Table 7, unconditional CIFAR-10
    assert (cfg.model.name, cfg.model.dropout) == ("ddpmpp-cifar10", 0.2)
    assert (cfg.trainer.optimizer, cfg.trainer.lr, cfg.trainer.batch_size, cfg.trainer.steps) == ("radam", 1e-4, 128, 100000)
    assert list(cfg.trainer.ema_betas) == [0.9999]
    m = cfg.method
    assert (m.p_mean, m.p_std, m.weighting, m.huber_c, m.q, m.stages, list(m.mid_t)) == (-1.1, 2.0, "inv_dt", 0.0, 2.0, 8, [0.821])


def test_cli_init_from_must_be_a_finished_run(tmp_path):
    run_dir, source = tmp_path / "never", tmp_path / "missing"
    proc = subprocess.run([sys.executable, "-m", "harness.train", f"init_from={source}", "--out", str(run_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"error: init_from: {source} is not a run directory (no config.yaml)", proc.stderr
    assert not run_dir.exists()


def test_deepspeed_options_merge_over_the_harness_config(tmp_path):
    from harness.train.engine import deepspeed_config
    (tmp_path / "ds.json").write_text('{"steps_per_print": 10, "zero_optimization": {"overlap_comm": false}}')
    cfg = compose([f"trainer.deepspeed_config={tmp_path / 'ds.json'}", "trainer.zero_stage=1", "trainer.batch_size=64",
                   "trainer.deepspeed={zero_optimization:{overlap_comm:true},fp16:{initial_scale_power:12}}"])
    ds = deepspeed_config(cfg.trainer, "fp32", 2)
    # the keys win over the file, the file over the harness's defaults; the harness's own keys stay its own
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True} and ds["steps_per_print"] == 10
    assert ds["fp16"]["initial_scale_power"] == 12 and ds["fp16"]["enabled"] is False
    assert ds["fp16"]["loss_scale_window"] == 1000                      # the rest of the harness's fp16 block
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (64, 32)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        compose([f"trainer.deepspeed_config={tmp_path / 'bad.json'}"])
