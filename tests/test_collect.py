"""The collector (harness.analysis.collect, harness.analysis.runs): completed, failed, half-written and garbage runs; fits
from synthetic runs; identical files twice; the CLI's errors."""
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.analysis.collect import CollectConfig, collect, fit_points, load_runs, main
from harness.analysis.runs import flatten
from synthetic_runs import CONFIG, score, write_run

REPO = Path(__file__).resolve().parent.parent


def test_synthetic_config_is_the_real_one(tmp_path):
    """The helper's config.yaml holds what compose() resolves for the command it mirrors (keys added to
    the config since are allowed: the collector flattens whatever it finds)."""
    from omegaconf import OmegaConf

    from harness.config import compose
    cfg = compose(["method=ect", "model=unet-xs", "data=digits", "trainer.steps=20", "eval.num_samples=100",
                   f"run_dir={tmp_path}"])
    real = flatten(OmegaConf.to_container(cfg, resolve=True))
    mine = flatten({**CONFIG, "run_dir": str(tmp_path)})
    assert {k: real.get(k, "<missing>") for k in mine} == mine


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "results"
    write_run(root / "sweep" / "ect-a", steps=100)
    write_run(root / "sweep" / "ect-b", steps=200, scores=[score(35.0, 1, step=200), score(26.0, 2, step=200),
                                                           score(24.0, 2, step=200, ema="ema_std0.10")],
              evaluate=[score(33.0, 1, step=200), score(1.5, 1, step=200, metric="digits_fd")])
    write_run(root / "failed", status="failed: RuntimeError: CUDA out of memory")
    write_run(root / "running", status="running")
    (root / "half").mkdir()
    (root / "half" / "config.yaml").write_text((root / "sweep" / "ect-a" / "config.yaml").read_text())
    write_run(root / "truncated")
    text = (root / "truncated" / "result.json").read_text()
    (root / "truncated" / "result.json").write_text(text[: len(text) // 2])
    (root / "garbage").mkdir()
    (root / "garbage" / "config.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "garbage" / "result.json").write_text("not json at all {")
    (root / "notyaml").mkdir()
    (root / "notyaml" / "config.yaml").write_text("- just\n- a list\n")
    (root / "notyaml" / "result.json").write_text('{"status": "completed", "scores": []}')
    write_run(root / "badscore", scores=[score("n/a", 1), {"metric": "pixel_fd"}, score("nan", 2)])
    write_run(root / "noflops", flops_per_img=0.0)
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("nothing here")
    return root


def _problems(problems):
    out = {}
    for p in problems:
        out.setdefault(p["run"], []).append(p["problem"])
    return out


def test_load_runs_mixed_directory(mixed):
    df, problems = load_runs(mixed)
    assert sorted(df["run"].unique()) == ["badscore", "noflops", "sweep/ect-a", "sweep/ect-b"]
    probs = _problems(problems)
    assert sorted(probs) == ["badscore", "failed", "garbage", "half", "noflops", "notyaml", "running",
                             "truncated"]
    assert probs["noflops"] == ["completed but flops_train is missing or zero: not on a FLOPs compute axis"]
    assert probs["failed"] == ["failed: RuntimeError: CUDA out of memory"]
    assert probs["running"] == ["unfinished: status running, last logged step 20 of 20"]
    assert probs["half"] == ["unfinished: config.yaml only, no result.json"]
    assert probs["truncated"][0].startswith("result.json unreadable (truncated or corrupt): JSONDecodeError")
    assert [p.split(" ")[0] for p in probs["garbage"]] == ["config.yaml", "result.json"]
    assert probs["notyaml"] == ["config.yaml is not a mapping (got list)"]
    assert "value 'n/a' is not a number" in probs["badscore"][0]
    assert "score 1 is not a record" in probs["badscore"][1] and "is nan" in probs["badscore"][2]
    assert all(p["run_dir"] == str(mixed / p["run"]) for p in problems)


def test_rows_columns_and_evaluate_json_wins(mixed):
    df, _ = load_runs(mixed)
    for col in ("run_dir", "status", "method", "model", "data", "num_params", "nimg", "flops", "train_sec",
                "ema", "steps", "nfe", "metric", "value", "floor", "cfg.trainer.steps", "cfg.method.mid_t"):
        assert col in df.columns
    a = df[df["run"] == "sweep/ect-a"].set_index("nfe")
    assert a.loc[1, "value"] == 40.0 and a.loc[2, "value"] == 30.0
    assert a.loc[1, "nimg"] == 100 * 128 and a.loc[1, "flops"] == pytest.approx(3.566e7 * 12800)
    assert a.loc[1, "cfg.trainer.steps"] == 100 and a.loc[1, "cfg.method.mid_t"] == "[0.821]"
    assert a.loc[1, "num_params"] == 164283 and a.loc[1, "run_dir"] == str(mixed / "sweep" / "ect-a")
    b = df[df["run"] == "sweep/ect-b"]
    got = {(r.metric, r.ema, r.nfe): (r.value, r.source) for r in b.itertuples()}
    assert got == {("pixel_fd", "ema_std0.05", 1): (33.0, "evaluate.json"),
                   ("pixel_fd", "ema_std0.05", 2): (26.0, "result.json"),
                   ("pixel_fd", "ema_std0.10", 2): (24.0, "result.json"),
                   ("digits_fd", "ema_std0.05", 1): (1.5, "evaluate.json")}
    bad = df[df["run"] == "badscore"]
    assert len(bad) == 1 and math.isnan(bad["value"].iloc[0])      # kept, flagged, never fitted
    pts = fit_points(df, CollectConfig())
    assert pts[(pts.run == "sweep/ect-b") & (pts.nfe == 2)]["ema"].tolist() == ["ema_std0.10"]  # best EMA
    assert "badscore" not in set(pts["run"])
    named = fit_points(df, CollectConfig(ema="ema_std0.05"))
    assert named[(named.run == "sweep/ect-b") & (named.nfe == 2)]["value"].tolist() == [26.0]


def _law_runs(root, budgets=(100, 200, 400, 800)):
    """ECT's law on two methods: 1-step value = K * (steps / smallest)^alpha, 2-step 0.6 of it."""
    laws = {"ect": (263.0, -0.060), "ict": (300.0, -0.1)}
    for method, (K, alpha) in laws.items():
        for s in budgets:
            v = K * (s / budgets[0]) ** alpha
            write_run(root / f"{method}-{s}", method=method, steps=s,
                      scores=[score(v, 1, step=s), score(0.6 * v, 2, step=s)])
    return laws


def test_fits_from_synthetic_runs(tmp_path):
    laws = _law_runs(tmp_path / "runs")
    files = collect(tmp_path / "runs", tmp_path / "out", plots=False)
    fits = pd.read_csv(files["fits.csv"])
    comp = fits[fits.kind == "compute"].set_index(["method", "nfe"])
    for method, (K, alpha) in laws.items():
        assert comp.loc[(method, 1), "alpha"] == pytest.approx(alpha, abs=1e-9)
        assert comp.loc[(method, 1), "K"] == pytest.approx(K, rel=1e-9)
        assert comp.loc[(method, 2), "K"] == pytest.approx(0.6 * K, rel=1e-9)
        assert comp.loc[(method, 1), "x0"] == pytest.approx(3.566e7 * 100 * 128)
        assert comp.loc[(method, 1), "r"] == pytest.approx(-1.0)
    size = fits[fits.kind == "size"]
    assert size["note"].str.contains("two distinct x").all()        # one model size: listed, not fitted
    matched = pd.read_csv(files["matched.csv"])
    assert (matched["source"] == "measured").all()
    assert matched.set_index(["method", "nfe"]).loc[("ect", 1), "value"] == pytest.approx(263.0 * 8 ** -0.06)
    target = pd.read_csv(files["target.csv"]).set_index(["method", "nfe"])
    best2 = min(0.6 * 263.0 * 8 ** -0.06, 0.6 * 300.0 * 8 ** -0.1)   # 2-step at the largest budget: ECT's
    assert target["target"].iloc[0] == pytest.approx(1.5 * best2)
    need = 3.566e7 * 12800 * (1.5 * best2 / 263.0) ** (1 / -0.06)
    assert target.loc[("ect", 1), "flops_needed"] == pytest.approx(need, rel=1e-9)
    assert target.loc[("ect", 1), "source"] == "extrapolated"
    for name in ("runs.md", "runs.tex", "fits.md", "fits.tex", "matched.md", "target.tex", "problems.md"):
        assert files[name].stat().st_size > 0
    assert "| ect | unet-xs | digits |" in files["runs.md"].read_text()
    assert r"\begin{tabular}" in files["fits.tex"].read_text()


def test_same_directory_twice_gives_identical_files(tmp_path, mixed):
    _law_runs(mixed / "laws")
    first = collect(mixed, tmp_path / "a")
    second = collect(mixed, tmp_path / "b")
    assert sorted(first) == sorted(second)
    for kind in ("compute", "size", "steps"):
        for ext in ("png", "pdf"):
            assert first[f"plots/{kind}_digits_pixel_fd.{ext}"].stat().st_size > 1000
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    again = collect(mixed, plots=False)                # default out: root/collected
    assert all(p.parent == mixed / "collected" for p in again.values())
    rerun = collect(mixed, plots=False)                # the output folder is not a run
    assert rerun["problems.md"].read_bytes() == first["problems.md"].read_bytes()
    assert rerun["runs.csv"].read_bytes() == first["runs.csv"].read_bytes()


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2                      # no runs: an error, not a silent success
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run directories under" in err
    assert not (tmp_path / "empty" / "collected").exists()
    _law_runs(tmp_path / "runs", budgets=(100, 200))
    write_run(tmp_path / "runs" / "failed", status="failed: ValueError: bad")
    assert main([str(tmp_path / "runs"), "--metric", "fid"]) == 2
    assert "metric 'fid' is not in the runs" in capsys.readouterr().err
    assert main([str(tmp_path / "runs"), "--ema", "ema_0.9999"]) == 2
    assert "valid: best, ema_std0.05" in capsys.readouterr().err
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--target", "250", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "5 run directories" in out and "4 completed" in out and "1 problems" in out
    assert "fits: 4 compute" in out and str(tmp_path / "o") in out
    assert (pd.read_csv(tmp_path / "o" / "target.csv")["target"] == 250.0).all()


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.collect", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: results directory")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == \
        {"cfg.a.b": 1, "cfg.a.c": "[1, 2]", "cfg.d": None, "cfg.e": "{}"}


@pytest.mark.parametrize("overrides", [["method=ect", "model=unet-xs"], ["method=edm", "model=dit-xs"],
                                       ["method=sct", "model=unet-s", "model.logvar=true"],
                                       ["method=ct", "model=mlp-xs", "data=moons"]])
def test_prepare_writes_config_json_equal_to_config_yaml(overrides, tmp_path):
    """RunDir.prepare writes config.json beside config.yaml: the same tree; a resumed old run gets one."""
    import json

    import yaml

    from harness.config import compose
    from harness.train.rundir import RunDir
    cfg = compose([*overrides, f"run_dir={tmp_path / 'run'}"])
    run = RunDir(tmp_path / "run")
    assert run.prepare(cfg) is False
    from_yaml = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == from_yaml
    assert not list((tmp_path / "run").glob(".*tmp*"))            # written atomically, nothing left over
    (tmp_path / "run" / "config.json").unlink()                   # a run from before config.json
    assert run.prepare(cfg) is True
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == from_yaml


def test_prepare_config_json_keeps_every_value(tmp_path):
    import json

    from omegaconf import OmegaConf

    from harness.train.rundir import RunDir
    tree = {"a": {"b": [1, "x", None, True], "c": {}}, "d": [], "e": "yes", "f": "1.5", "g": "", "i": "x: y",
            "j": 1e-8, "k": float("inf"), "l": "2026-01-01", "n": "~", "p": [{"x": 1}], "q": "multi\nline"}
    RunDir(tmp_path).prepare(OmegaConf.create(tree))
    assert json.loads((tmp_path / "config.json").read_text()) == tree


def test_config_json_wins_and_yaml_only_runs_still_read(tmp_path):
    """New runs are read from config.json, old ones (config.yaml only) through PyYAML, to the same columns."""
    import json
    write_run(tmp_path / "new", steps=100)
    write_run(tmp_path / "old", steps=100, config_json=False)
    assert not (tmp_path / "old" / "config.json").exists()
    df, problems = load_runs(tmp_path)
    assert problems == []
    cfg_cols = [c for c in df.columns if c.startswith("cfg.") and c != "cfg.run_dir"]
    new, old = (df[df.run == r].iloc[0] for r in ("new", "old"))
    assert new[cfg_cols].to_dict() == old[cfg_cols].to_dict() and old["cfg.trainer.steps"] == 100
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    cfg["trainer"]["steps"], cfg["method"]["name"] = 7, "ict"   # only in the JSON
    (tmp_path / "new" / "config.json").write_text(json.dumps(cfg))
    df, _ = load_runs(tmp_path)
    new = df[df.run == "new"].iloc[0]
    assert new["cfg.trainer.steps"] == 7 and new["method"] == "ict"


def test_corrupt_config_json_is_a_problem(tmp_path):
    for name, text in (("truncated", None), ("list", "[1, 2]"), ("empty", "")):
        path = write_run(tmp_path / name)
        full = (path / "config.json").read_text()
        (path / "config.json").write_text(full[: len(full) // 2] if text is None else text)
    df, problems = load_runs(tmp_path)
    assert df.empty                                                # config.yaml is not used instead
    probs = _problems(problems)
    assert probs["truncated"][0].startswith("config.json unreadable (truncated or corrupt): JSONDecodeError")
    assert probs["empty"][0].startswith("config.json unreadable (truncated or corrupt)")
    assert probs["list"] == ["config.json is not a mapping (got list)"]
    assert all(len(p) == 1 for p in probs.values())


@pytest.mark.slow
def test_collects_a_real_training_run(compose_run, tmp_path):
    """A real (tiny) run directory: the collector's rows are its result.json."""
    import json

    from harness.train.cli import run
    cfg = compose_run("method=ect", "trainer.steps=4", "eval.at_end=true", "eval.num_samples=50",
                      "eval.grid=false", run_dir="runs/ect-real")
    result = run(cfg)
    assert result["status"] == "completed"
    df, problems = load_runs(tmp_path / "runs")
    assert problems == []
    disk = json.loads((tmp_path / "runs" / "ect-real" / "result.json").read_text())
    assert len(df) == len(disk["scores"]) > 0
    for rec in disk["scores"]:
        row = df[(df.ema == rec["ema"]) & (df.steps == rec["steps"]) & (df.metric == rec["metric"])].iloc[0]
        assert row["value"] == rec["value"] and row["nfe"] == rec["nfe"]
    row = df.iloc[0]
    assert (row["method"], row["model"], row["data"]) == ("ect", "unet-xs", "digits")
    assert row["flops"] == disk["flops_train"] > 0 and row["nimg"] == 4 * 32 == disk["nimg"]
    assert row["num_params"] == disk["num_params"] and row["cfg.trainer.steps"] == 4


def test_identical_across_processes(tmp_path, mixed):
    """Fresh interpreters with different hash seeds write the same bytes (no set or dict-order leaks)."""
    import os
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-m", "harness.collect", str(mixed), "--out", str(out),
                               "--no-plots"], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert len(outs[0]) >= 14 and outs[0] == outs[1]


def test_best_ema_is_chosen_by_the_selection_score_not_the_reported_one():
    rows = [dict(run="r", data="digits", metric="digits_fd", method="ect", nfe=2, step=10, train_steps=10,
                 ema=ema, value=value, selection_value=sel) for ema, value, sel in
            [("ema_std0.05", 1.0, 3.0), ("ema_std0.10", 2.0, 2.5)]]
    # the lower reported score (0.05) loses: the selection set prefers 0.10
    assert fit_points(pd.DataFrame(rows), CollectConfig())["ema"].tolist() == ["ema_std0.10"]
    # runs scored before the selection protocol: the lowest score, as before
    old = pd.DataFrame([{k: v for k, v in r.items() if k != "selection_value"} for r in rows])
    assert fit_points(old, CollectConfig())["ema"].tolist() == ["ema_std0.05"]


_COLLECT_IN_A_CHILD = """
import json, sys
from harness.analysis.runs import load_runs
df, problems = load_runs(sys.argv[1])
print(json.dumps({"runs": sorted(set(df.run)), "problems": [[p["run"], p["problem"]] for p in problems]}))
"""


def test_hostile_inputs_neither_stop_nor_hide_anything(tmp_path, monkeypatch):
    """Issue 15: a self-referencing YAML alias, a nested-alias bomb, a FIFO named result.json, a directory
    the reader cannot list, a symlinked run (read), a symlink loop and a dangling symlink: the collector
    finishes (in a child with a deadline, so a hang fails the test) and reports each as a problem row."""
    import json
    import os
    root = tmp_path / "runs"
    write_run(root / "good", steps=100)
    for name, text in (("self-alias", "a: &a [*a]\n"),
                       ("alias-bomb", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
                           f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))):
        path = write_run(root / name, config_json=False)
        (path / "config.yaml").write_text(text)
    fifo = write_run(root / "fifo")
    (fifo / "result.json").unlink()
    os.mkfifo(fifo / "result.json")
    elsewhere = write_run(tmp_path / "elsewhere" / "linked", steps=200)
    (root / "linked").symlink_to(elsewhere)
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to(root)
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    locked = root / "locked"
    write_run(locked / "hidden-run")
    os.chmod(locked, 0)
    try:
        out = subprocess.run([sys.executable, "-c", _COLLECT_IN_A_CHILD, str(root)], capture_output=True,
                             text=True, timeout=120, cwd=REPO)
    finally:
        os.chmod(locked, 0o755)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    probs = dict(map(tuple, seen["problems"]))
    root_user = os.geteuid() == 0   # root reads a mode-000 directory anyway: the failure is injected below
    assert seen["runs"] == ["good", "linked"] + (["locked/hidden-run"] if root_user else [])
    assert probs["self-alias"].startswith("config.yaml unreadable (corrupt): ComposerError: YAML aliases are not read")
    assert probs["alias-bomb"].startswith("config.yaml unreadable (corrupt): ComposerError: YAML aliases are not read")
    assert probs["fifo"] == "result.json unreadable: not a regular file (a FIFO)"
    assert probs["sub/loop"] == f"symlink to {os.path.realpath(root)}, already read as {root}; skipped"
    assert probs["dangling"] == f"symlink to {tmp_path / 'nowhere'}, which does not exist; skipped"
    if not root_user:
        assert probs["locked"] == "unreadable directory: PermissionError: Permission denied"
    assert len(probs) == 5 + (not root_user)

    real_scandir = os.scandir

    def refuse(path):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", refuse)
    _, problems = load_runs(root)
    assert {p["run"]: p["problem"] for p in problems}["locked"] == \
        "unreadable directory: PermissionError: Permission denied"


def test_a_rescore_by_another_protocol_changes_nothing_the_run_protocol_reports(tmp_path, capsys):
    """Issue 17: harness.evaluate with --num-samples 50 writes evaluate-<id>.json beside the run; the
    collector's default (each run's own protocol) reports exactly what it reported before, that protocol
    alone is reported when asked for, and `all` reports both and says that it mixes them."""
    import json
    for budget in (100, 200, 400):
        write_run(tmp_path / "runs" / f"ect-{budget}", steps=budget,
                  scores=[score(40.0 * budget ** -0.3, 1, step=budget), score(30.0 * budget ** -0.3, 2, step=budget)])
    before = collect(tmp_path / "runs", out=tmp_path / "before")
    for budget in (100, 200, 400):
        rescore = [dict(score(99.0, nfe, step=budget), num_samples=50, protocol="num_samples50-0a1b2c")
                   for nfe in (1, 2)]
        (tmp_path / "runs" / f"ect-{budget}" / "evaluate-num_samples50-0a1b2c.json").write_text(
            json.dumps({"scores": rescore, "protocol": {"id": "num_samples50-0a1b2c",
                                                        "changes": {"eval.num_samples": 50}}}))
    after = collect(tmp_path / "runs", out=tmp_path / "after")
    for name in ("fits.csv", "runs.csv", "problems.csv"):
        assert after[name].read_bytes() == before[name].read_bytes()
    df, problems = load_runs(tmp_path / "runs", protocol="num_samples50-0a1b2c")
    assert problems == [] and set(df["value"]) == {99.0} and set(df["protocol"]) == {"num_samples50-0a1b2c"}
    df, _ = load_runs(tmp_path / "runs", protocol="all")
    assert sorted(df.groupby("protocol").size().items()) == [("num_samples50-0a1b2c", 6), ("run", 6)]
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "all"), "--protocol", "all", "--no-plots"]) == 0
    assert "note: the scores mix 2 protocols (num_samples50-0a1b2c, run)" in capsys.readouterr().out
