"""Issue 17: a CLI that keeps its promises. Every bad input below is one line on stderr and exit 2 with
no run directory created; a method switches on what it needs from the network and says so; a finished
run trained longer resumes from its last checkpoint (to the weights of a run that was that long from
the start); a changed config names the keys that differ; a moved run directory resumes."""
import json
import shutil

import pytest
import torch

from harness.train.checkpoint import list_checkpoints, safe_load
from harness.train.cli import main

FAST = ["data=digits", "model=unet-xs", "trainer.batch_size=32", "trainer.threads=1", "eval.at_end=false",
        "log.console=quiet", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A completed 2-step EDM run on the digits with unet-xs."""
    run_dir = tmp_path_factory.mktemp("src") / "edm"
    assert main([*FAST, "method=edm", "trainer.steps=2", "--out", str(run_dir)]) == 0
    return run_dir


@pytest.mark.parametrize("bad,message", [
    ("trainer.lr=-1e-3", "error: trainer.lr must be a finite number > 0, got -0.001"),
    ("trainer.lr=nan", "error: trainer.lr must be a finite number > 0, got nan"),
    ("model.channels=0", "error: model.channels must be >= 1, got 0"),
    ("model=mlp-xs", "error: model=mlp-xs (mlp) cannot take digits's 1x8x8 images; valid for it: "),
    ("data=swissroll", "error: model=unet-xs (unet) cannot take swissroll's 2-D points; valid for it: "
                       "mlp-xs, mlp-s, mlp-m"),
    ("trainer.grad_clip=-1", "error: trainer.grad_clip must be >= 0 (0 = off), got -1.0"),
    ("eval.steps=[100000]", "error: eval.steps must lie in [0, 1000] (sampler steps; 0 = the method's own), "
                            "got [100000]"),
    ("trainer.steps=abc", "error: invalid override: Error merging override trainer.steps=abc: Value 'abc' of "
                          "type 'str' could not be converted to Integer"),
    ("log.console=loud", "error: log.console='loud' is not valid; valid: auto, lines, quiet"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, bad, message):
    assert main([*FAST, "method=ect", bad, "--out", str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "run").exists()


def test_init_from_another_network_is_refused_before_anything_is_written(tmp_path, capsys, source):
    assert main([*FAST, "method=ect", "model=unet-s", f"init_from={source}", "--out", str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: init_from: {source}'s network does not match this model (first difference: "
                   f"dec.4x4_block0.attn_proj.weight (64, 64, 1, 1))"]
    assert not (tmp_path / "run").exists()


def test_a_method_switches_on_what_it_needs_from_the_network(tmp_path, capsys, caplog):
    """sCT on the DiT: the log-variance head and a JVP-capable attention, set by the method, logged and
    in the run's config; the run trains (it used to fail in forward-mode AD of CPU sdpa)."""
    with caplog.at_level("INFO", logger="harness.config"):
        assert main(["method=sct", "model=dit-xs", "data=digits", "trainer.batch_size=16", "trainer.threads=1",
                     "trainer.steps=2", "eval.at_end=false", "log.console=quiet", "log.tensorboard=false",
                     "--out", str(tmp_path / 'run')]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["logvar"] is True and config["model"]["attention"] == "jvp_flash"
    said = [r.getMessage() for r in caplog.records if r.name == "harness.config"]
    assert any(m.startswith("method=sct sets model.logvar=True (was False): ") for m in said)
    assert any(m.startswith("method=sct sets model.attention=jvp_flash (was sdpa): ") for m in said)
    assert main(["--cfg", "job", "method=gcm", "method.variant=vu"]) == 0
    assert "  extra_cond_dim: 1\n" in capsys.readouterr().out
    for argv in (["method=sct", "model=dit-xs", "data=digits", "--cfg", "job"],     # wherever --cfg job stands
                 ["method=sct", "-c", "job", "model=dit-xs", "data=digits"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "  logvar: true\n" in out and "  attention: jvp_flash\n" in out, argv


def _weights(run_dir):
    newest = list_checkpoints(run_dir)[0]
    return newest.name, safe_load(newest / "engine" / "mp_rank_00_model_states.pt")["module"]


def test_a_finished_run_trained_longer_resumes_and_records_it(tmp_path, caplog):
    args = [*FAST, "method=edm", "trainer.checkpoint_every_steps=2"]
    assert main([*args, "trainer.steps=4", "--out", str(tmp_path / 'run')]) == 0
    with caplog.at_level("INFO", logger="harness.train.trainer"):
        assert main([*args, "trainer.steps=6", "--out", str(tmp_path / 'run')]) == 0
    assert "resumed from step 4" in caplog.messages
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 6
    [change] = [json.loads(line) for line in (tmp_path / "run" / "changes.jsonl").read_text().splitlines()]
    assert change["changes"] == {"trainer.steps": [4, 6]}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["trainer"]["steps"] == 6
    # EDM's loss and lr do not depend on the planned length: 4 + 2 steps equal 6 from the start
    assert main([*args, "trainer.steps=6", "--out", str(tmp_path / 'straight')]) == 0
    (name, longer), (name2, straight) = _weights(tmp_path / "run"), _weights(tmp_path / "straight")
    assert name == name2 == "step-0000006" and all(torch.equal(longer[k], straight[k]) for k in straight)


def test_a_different_config_names_the_keys(tmp_path, capsys, source):
    before = (source / "config.yaml").read_text()
    assert main([*FAST, "method=edm", "trainer.steps=2", "trainer.lr=1e-3", "model.dropout=0.1",
                 "--out", str(source)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {source} already holds a run with a different config (model.dropout: 0.0 -> 0.1; "
                   f"trainer.lr: 0.0001 -> 0.001); choose another run_dir or delete it"]
    assert (source / "config.yaml").read_text() == before and not (source / "changes.jsonl").exists()
    assert main([*FAST, "method=edm", "trainer.steps=1", "--out", str(source)]) == 2   # steps only grow
    assert "trainer.steps: 2 -> 1" in capsys.readouterr().err


def test_a_moved_run_directory_resumes(tmp_path, caplog):
    args = [*FAST, "method=edm", "trainer.checkpoint_every_steps=2", "trainer.steps=4"]
    assert main([*args, "--out", str(tmp_path / 'here')]) == 0
    shutil.move(tmp_path / "here", tmp_path / "there")
    (tmp_path / "there" / "result.json").unlink()              # as if stopped after its last checkpoint
    with caplog.at_level("INFO", logger="harness.train.trainer"):
        assert main([*args, "--out", str(tmp_path / 'there')]) == 0
    assert "resumed from step 4" in caplog.messages
    assert json.loads((tmp_path / "there" / "config.json").read_text())["run_dir"] == str(tmp_path / "there")
