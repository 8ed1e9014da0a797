"""Sweep specs: expansion (stable ids, grid sizes, dependency order, budgets -> steps), one-line errors
before any work, run states, the local launcher's dependency handling, and idempotence under a real kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.sweep.driver import initial_status, main
from harness.sweep.spec import SpecError, expand, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
name: demo
out: {out}
base: [data=digits, trainer.batch_size=32]
grid:
  model: [unet-xs, unet-s]
  budget_nimg: [640, 1280]
  seed: [0, 1]
stages:
  - {{name: edm, grid: {{budget_nimg: null}}, overrides: [method=edm, trainer.steps=50]}}
  - {{name: tune, grid: {{method: [ect]}}, init_from: edm}}
  - {{name: distill, grid: {{method: [cd], seed: [0]}}, init_from: edm, teacher: edm}}
launcher: {{name: local, local: {{workers: 2}}}}
"""


# the bad-spec cases edit a one-point version of SPEC (fewer configs to compose before the error)
SMALL = SPEC.replace("[unet-xs, unet-s]", "[unet-xs]").replace("[640, 1280]", "[640]").replace("[0, 1]", "[0]")


def _spec(tmp_path, text=SPEC, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text.format(out=tmp_path / "out"))
    return str(path)


def _expand(tmp_path, text=SPEC, edits=()):
    sweep, extra = load_spec(_spec(tmp_path, text), list(edits))
    return sweep, expand(sweep, extra)


def _arg(run, key):
    return next(o.split("=", 1)[1] for o in run.overrides if o.startswith(f"{key}="))


def test_grid_sizes_stable_ids_and_dependency_order(tmp_path):
    sweep, runs = _expand(tmp_path)
    by_stage = {s: [r for r in runs if r.stage == s] for s in ("edm", "tune", "distill")}
    assert [len(by_stage[s]) for s in ("edm", "tune", "distill")] == [2 * 2, 2 * 2 * 2, 2 * 2 * 1]
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids)
    assert [r.run_id for r in expand(*load_spec(_spec(tmp_path)))] == ids       # same spec, same ids
    _, moved = _expand(tmp_path, SPEC.replace("out: {out}", f"out: {tmp_path / 'elsewhere'}"))
    assert [r.run_id for r in moved] == ids                                       # ids do not depend on paths
    _, changed = _expand(tmp_path, SPEC.replace("trainer.batch_size=32", "trainer.batch_size=64"))
    assert not set(r.run_id for r in changed) & set(ids)
    position = {r.run_id: i for i, r in enumerate(runs)}
    teachers = {(r.point["model"], r.point["seed"]): r for r in by_stage["edm"]}
    for r in by_stage["tune"] + by_stage["distill"]:
        teacher = teachers[(r.point["model"], r.point["seed"])]
        assert r.depends_on == ((teacher.run_id,) if r.stage == "tune" else (teacher.run_id, teacher.run_id))
        assert all(position[d] < position[r.run_id] for d in r.depends_on)
        assert _arg(r, "init_from") == teacher.run_dir and _arg(r, "model") == teacher.point["model"]
        assert r.run_dir.endswith(r.run_id) and r.run_dir.startswith(str(tmp_path / "out" / "demo"))
    assert all(_arg(r, "teacher") == _arg(r, "init_from") for r in by_stage["distill"])
    assert all("teacher=" not in " ".join(r.overrides) for r in by_stage["tune"])


def test_cached_composition_equals_compose(tmp_path):
    from omegaconf import OmegaConf

    from harness.config import ConfigError, compose
    from harness.sweep.compose import compose_cached
    cache: dict = {}
    runs = [["method=ect", "model=unet-xs", "seed=1", "trainer.lr=1e-3", "eval.steps=[1,2]"],
            ["method=ect", "model=unet-xs", "seed=2", "trainer.lr=3e-3", "eval.steps=[1]"],
            ["method=ect", "model=unet-xs", "seed=3", "trainer.lr=2e-3", "eval.steps=[4]", "init_from=/x"],
            ["method=cd", "model=unet-xs", "seed=3", "trainer.lr=2e-3", "eval.steps=[4]", "teacher=/x"]]
    for overrides in runs:
        got = OmegaConf.to_container(compose_cached(overrides, cache))
        assert got == OmegaConf.to_container(compose(overrides))
    assert len(cache) == 3
    compose_cached(["method=ect", "model=unet-xs", "trainer.steps=5"], cache)
    with pytest.raises(ConfigError, match="trainer.steps and trainer.batch_size must be >= 1"):
        compose_cached(["method=ect", "model=unet-xs", "trainer.steps=0"], cache)      # the cached path validates
    with pytest.raises(ConfigError, match="invalid override"):
        compose_cached(["method=ect", "model=unet-xs", "trainer.steps=fast"], cache)


def test_budgets_become_steps_per_model(tmp_path):
    _, runs = _expand(tmp_path)
    for r in runs:
        expected = 50 if r.stage == "edm" else round(r.point["budget_nimg"] / 32)
        assert r.steps == expected and _arg(r, "trainer.steps") == str(expected)
    text = SPEC.replace("budget_nimg: [640, 1280]", "budget_flops: [1.0e12, 4.0e12]")
    _, runs = _expand(tmp_path, text)
    from harness.config import compose
    from harness.nets import build_net
    for r in (r for r in runs if r.stage == "tune"):
        net = build_net(compose([f"model={r.model}", "data=digits"]).model, (1, 8, 8), 0).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():     # a real forward, on the CPU
            net(torch.randn(4, 1, 8, 8), torch.rand(4))
        per_image = 3 * counter.get_total_flops() / 4
        assert r.steps == round(r.point["budget_flops"] / (per_image * 32))
        assert r.flops_est == pytest.approx(per_image * 32 * r.steps)
    xs = [r for r in runs if r.stage == "tune" and r.model == "unet-xs"][0]
    s = [r for r in runs if r.stage == "tune" and r.model == "unet-s" and r.point == {**xs.point, "model": "unet-s"}][0]
    assert s.steps < xs.steps                                   # a bigger model gets fewer steps per FLOP


def test_command_line_edits(tmp_path):
    sweep, runs = _expand(tmp_path, edits=["launcher=slurm", "launcher.local.workers=3", "grid.model=[unet-xs]",
                                           "grid.seed=[0]", "eval.num_samples=50"])
    assert sweep.launcher["name"] == "slurm" and sweep.launcher["local"]["workers"] == 3
    assert len(runs) == 1 + 2 + 2 and all("eval.num_samples=50" in r.overrides for r in runs)
    for edit in ("out=elsewhere", "run_dir=elsewhere"):     # the output is spelled --out DIR by every command
        with pytest.raises(SpecError, match=f"override '{edit}': the sweep's directory is given as --out DIR"):
            _expand(tmp_path, edits=[edit])


def test_out_moves_the_whole_sweep(tmp_path):
    sweep, runs = _expand(tmp_path)
    moved, extra = load_spec(_spec(tmp_path), [], out=str(tmp_path / "moved"))
    assert sweep.out_dir == tmp_path / "out" / "demo" and moved.out_dir == tmp_path / "moved" / "demo"
    assert [r.run_dir for r in expand(moved, extra)] == [r.run_dir.replace(str(sweep.out_dir), str(moved.out_dir))
                                                         for r in runs]


BAD = {
    "unknown spec key": (lambda s: s + "bogus: 1\n", "unknown key bogus in sweep spec"),
    "unknown stage key": (lambda s: s.replace("init_from: edm}", "init_form: edm}", 1), "unknown key init_form in stage 'tune'"),
    "unknown config key": (lambda s: s.replace("seed: [0]", "trainer.bogus: [1]"), "unknown config key 'trainer.bogus'"),
    "empty grid": (lambda s: s.replace("seed: [0]", "seed: []"), "grid key 'seed' needs a non-empty list"),
    "empty stage grid": (lambda s: s.replace("method: [ect]", "method: []"), "stage 'tune' grid key 'method' needs a non-empty"),
    "cycle": (lambda s: s.replace("overrides: [method=edm, trainer.steps=50]}", "after: [distill], overrides: [method=edm]}"),
              "stage dependency cycle: edm -> distill -> edm"),
    "missing teacher stage": (lambda s: s.replace("teacher: edm", "teacher: trigflow"), "needs stage 'trigflow', which no stage provides"),
    "distiller without a teacher": (lambda s: s.replace(", teacher: edm", ""), "method cd distills a teacher"),
    "no stages": (lambda s: s.split("stages:")[0], "has no stages"),
    "two budgets": (lambda s: s.replace("seed: [0]", "budget_flops: [1.0e9]"), "both budget_nimg and budget_flops"),
    "bad budget": (lambda s: s.replace("budget_nimg: [640]", "budget_nimg: [640, -1]"), "needs positive numbers"),
    "bad launcher": (lambda s: s.replace("name: local", "name: cloud"), "launcher.name 'cloud' is not valid; valid: auto, local, slurm"),
    "bad launcher option": (lambda s: s.replace("workers: 2", "wrokers: 2"), "unknown key wrokers in launcher.local"),
    "name outside out=": (lambda s: s.replace("name: demo", "name: ../../escaped"),
                          "name '../../escaped' is not a plain folder name"),
    "stage name with a slash": (lambda s: s.replace("{{name: tune,", "{{name: tu/ne,"),
                                "stage 2 name 'tu/ne' is not a plain folder name"),
    "ambiguous teacher": (lambda s: s.replace("{{name: edm, grid: {{budget_nimg: null}}",
                                              "{{name: edm, grid: {{budget_nimg: null, trainer.lr: [1e-3, 2e-3]}}"),
                          "2 runs of stage 'edm' match"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_specs_fail_in_one_line_before_work(tmp_path, capsys, case):
    edit, message = BAD[case]
    path = _spec(tmp_path, edit(SMALL))
    with pytest.raises(SpecError) as info:
        expand(*load_spec(path))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert main([path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["smoke", "scaling", "sizes_digits", "scaling_cifar10", "recipes_digits"])
def test_shipped_specs_expand(spec, capsys, tmp_path, monkeypatch):
    import tarfile
    (tmp_path / "cifar-10-batches-py").mkdir()                 # stand-ins: the checks look at paths only
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for name in ("vgg16-397923af.pth", "vgg.pth"):
        (tmp_path / name).touch()
    monkeypatch.setenv("CIFAR10_PATH", str(tmp_path / "cifar-10-python.tar.gz"))
    monkeypatch.setenv("LPIPS_WEIGHTS", str(tmp_path))
    sweep, extra = load_spec(str(ROOT / "sweeps" / f"{spec}.yaml"), [], out="/nonexistent/out")
    runs = expand(sweep, extra)
    assert runs and len({r.run_id for r in runs}) == len(runs)
    if spec == "recipes_digits":         # every method x 2 learning rates x 2 budgets x 3 seeds, two teachers
        assert len(runs) == 8 * 2 * 2 * 3 + 2
    if spec != "smoke":
        import methods
        students = {r.method for r in runs if r.method not in ("edm", "trigflow")}
        assert students == set(methods.names()) - {"edm", "trigflow"} and len(students) == 8
    if spec == "scaling":                # every method at 5 budgets (16x) x 3 seeds, two shared teachers
        steps = sorted({r.steps for r in runs if r.method not in ("edm", "trigflow")})
        assert len(runs) == 8 * 5 * 3 + 2 and len(steps) == 5 and steps[-1] / steps[0] == 16
        assert {r.point.get("seed") for r in runs if r.method == "ect"} == {0, 1, 2}
        assert all("eval.selection=true" in r.overrides for r in runs if r.method not in ("edm", "trigflow"))
    elif spec not in ("smoke", "recipes_digits"):   # every method at 3 sizes x 3 budgets, plus the teachers
        assert len(runs) == 8 * 3 * 3 + 2 * 3
    assert main([str(ROOT / "sweeps" / f"{spec}.yaml"), "--dry-run", "--out", "/nonexistent/out"]) == 0
    assert "estimated compute" in capsys.readouterr().out


def test_initial_status_skips_completed_keeps_failed_and_blocks_students(tmp_path):
    _, runs = _expand(tmp_path, edits=["grid.model=[unet-xs]", "grid.seed=[0]", "grid.budget_nimg=[640]"])
    edm, tune, distill = runs
    Path(edm.run_dir).mkdir(parents=True)
    Path(edm.run_dir, "result.json").write_text(json.dumps({"status": "failed: NonFiniteLoss: boom"}))
    status, todo = initial_status(runs, retry_failed=False)
    assert status[edm.run_id] == "failed: NonFiniteLoss: boom" and not todo
    assert status[tune.run_id] == f"failed: dependency {edm.run_id} failed (failed: NonFiniteLoss: boom)"
    status, todo = initial_status(runs, retry_failed=True)
    assert [r.run_id for r in todo] == [edm.run_id, tune.run_id, distill.run_id]
    Path(edm.run_dir, "result.json").write_text(json.dumps({"status": "completed", "scores": []}))
    Path(tune.run_dir, "checkpoints", "step-0000010").mkdir(parents=True)      # interrupted: resumed
    status, todo = initial_status(runs, retry_failed=False)
    assert status[edm.run_id] == "completed" and [r.run_id for r in todo] == [tune.run_id, distill.run_id]


def test_bad_specs_parse_errors():
    with pytest.raises(SpecError, match="stage name edm given twice"):
        parse_spec({"name": "x", "stages": [{"name": "edm"}, {"name": "edm"}]})
    with pytest.raises(SpecError, match="stage 'a' depends on itself"):
        parse_spec({"name": "x", "stages": [{"name": "a", "after": ["a"]}]})


# ---------------------------------------------------------------- slow: real workers, a real kill

TINY = """
name: idem
out: {out}
base: [data=digits, model=unet-xs, trainer.batch_size=16, trainer.optimizer=adam, trainer.lr=1e-3,
       trainer.log_every_steps=5, trainer.checkpoint_every_steps=10, eval.num_samples=128,
       'eval.steps=[1]', eval.grid=false]
grid: {{budget_nimg: [480, 1600], seed: [0]}}
stages:
  - {{name: edm, grid: {{budget_nimg: null}}, overrides: [method=edm, trainer.steps=20]}}
  - {{name: tune, grid: {{method: [ect]}}, init_from: edm}}
launcher: {{name: local, local: {{workers: 2}}}}
"""


def _sweep(spec, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "harness.sweep", spec, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _final_state(run_dir: Path) -> dict:
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    state = torch.load(ckpt / "harness.pt", weights_only=False)
    module = torch.load(ckpt / "engine" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {"step": ckpt.name, "module": module, "emas": state["emas"]}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k])
                                        if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.slow
def test_killed_sweep_resumes_and_matches_an_uninterrupted_one(tmp_path):
    ref_spec = _spec(tmp_path, TINY.replace("out: {out}", f"out: {tmp_path / 'ref'}"), "ref.yaml")
    spec = _spec(tmp_path, TINY, "killed.yaml")
    ref = _sweep(ref_spec)
    out = tmp_path / "out" / "idem"
    proc = _sweep(spec)
    deadline = time.time() + 240

    def completed(pattern):
        return [p for p in out.glob(pattern) if '"completed"' in _read(p / "result.json")]

    while True:                      # kill once the short student ended and the long one checkpointed
        done, long = completed("edm-*") + completed("tune-0.48kimg*"), list(out.glob("tune-1.6kimg*"))
        if len(done) == 2 and long and list((long[0] / "checkpoints").glob("step-*")) and not completed("tune-1.6*"):
            break
        assert proc.poll() is None, f"the sweep ended before it could be killed:\n{proc.stdout.read()}"
        assert time.time() < deadline, "the sweep never reached a point to kill it at"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    status = main([spec, "--status"])
    assert status == 0
    before = {p.name: (p / "result.json").read_bytes() for p in done}
    mtimes = {p.name: (p / "result.json").stat().st_mtime_ns for p in done}
    killed_at = max(int(c.name.split("-")[1]) for c in (long[0] / "checkpoints").glob("step-*"))
    rerun = subprocess.run([sys.executable, "-m", "harness.sweep", spec], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "3 runs, 2 already ended" in rerun.stdout
    for p in done:               # nothing completed is run again
        assert (p / "result.json").read_bytes() == before[p.name]
        assert (p / "result.json").stat().st_mtime_ns == mtimes[p.name]
    run_id = long[0].name.rsplit("-", 1)[1]
    log = (out / "logs" / f"{run_id}.log").read_text()
    resumed = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "resumed from step" in line]
    assert resumed and resumed[-1] >= killed_at > 0
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    for p in sorted(out.glob("*-*")):
        if not (p / "result.json").exists():
            continue
        twin = tmp_path / "ref" / "idem" / p.name
        mine, theirs = json.loads((p / "result.json").read_text()), json.loads((twin / "result.json").read_text())
        assert mine["status"] == theirs["status"] == "completed"
        assert [(s["ema"], s["steps"], s["value"]) for s in mine["scores"]] == \
               [(s["ema"], s["steps"], s["value"]) for s in theirs["scores"]]
        assert _same(_final_state(p), _final_state(twin)), p.name


@pytest.mark.slow
def test_failed_teacher_fails_its_students_without_running_them(tmp_path):
    from launchers.base import RunSpec, StageSpec
    from launchers.local import LocalLauncher
    teacher = RunSpec("t", str(tmp_path / "t"), ("method=edm", "trainer.steps=0", f"run_dir={tmp_path / 't'}"))
    ok = RunSpec("a", str(tmp_path / "a"), ("bogus.key=1",))
    student = RunSpec("s", str(tmp_path / "s"), ("method=ect", f"init_from={tmp_path / 't'}", f"run_dir={tmp_path / 's'}"))
    updates = []
    status = LocalLauncher(workers=1, log_dir=str(tmp_path / "logs")).launch(
        [StageSpec("t", (teacher, ok)), StageSpec("s", (student,), after=("t",))],
        on_update=lambda rid, s: updates.append((rid, s)))
    assert status["t"].startswith("failed: ConfigError: trainer.steps") and status["a"].startswith("failed: ConfigError: unknown config key")
    assert status["s"] == f"failed: dependency t failed ({status['t']})"
    assert ("s", "running") not in updates and not (tmp_path / "s").exists()


def test_status_board_plain_and_tty(tmp_path):
    import io

    from harness.sweep.status import StatusBoard, progress_line
    _, runs = _expand(tmp_path, edits=["grid.model=[unet-xs]", "grid.seed=[0]", "grid.budget_nimg=[640]"])
    status = {r.run_id: "queued" for r in runs}
    plain = io.StringIO()
    with StatusBoard(runs, status, plain) as board:
        board.update(runs[0].run_id, "running")
        board.update(runs[0].run_id, "completed")
        board.update(runs[1].run_id, "failed: boom")
    lines = plain.getvalue().splitlines()
    assert "\x1b[" not in plain.getvalue()
    assert lines[0].split(" | ")[0].split()[1:] == ["running", Path(runs[0].run_dir).name]   # one line per change
    assert lines[1].split(" | ")[1].startswith("[" + "#" * 10 + "." * 20 + "] 1/3  completed 1  failed 0")
    assert lines[2].split(" | ")[0].endswith(f"failed: boom {Path(runs[1].run_dir).name}")
    assert lines[2].split(" | ")[1].startswith("[" + "#" * 20 + "." * 10 + "] 2/3")
    assert "GFLOP/s  ETA " in lines[2]          # throughput since the start, and the ETA of the third run
    assert progress_line({"a": "completed", "b": "running"}, 5).endswith("running 1  queued 0  elapsed 0:00:05")
    # ETA: 3e12 of 4e12 FLOP done, 1e12 of them in the 10 s since the start -> 1e11 FLOP/s, 10 s to go
    assert progress_line({"a": "completed"}, 10, (2e12, 3e12, 4e12)).endswith("elapsed 0:00:10  100 GFLOP/s  ETA 0:00:10")

    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty = Tty()
    with StatusBoard(runs, status, tty) as board:
        board.update(runs[0].run_id, "running")
    assert "\x1b[" in tty.getvalue() and runs[0].run_id in tty.getvalue()


def test_summary_says_where_the_time_went(tmp_path):
    """summary.md sums the runs' training time (teachers apart from students), the selection / search time
    and the reported scores' sampling + scoring time, from each run's result.json."""
    from harness.sweep.driver import time_breakdown, write_summary
    from harness.sweep.spec import PlannedRun, Sweep
    runs = []
    for i, (method, train, scores) in enumerate([
            ("edm", 100.0, [{"ema": "e", "steps": 1, "value": 9.0, "sample_sec": 2.0, "score_sec": 1.0}]),
            ("ect", 30.0, [{"ema": "e", "steps": 2, "value": 3.0, "sample_sec": 0.5, "score_sec": 0.25,
                            "selection_sec": 4.0}]),
            ("cd", 40.0, [{"ema": "e", "steps": 1, "value": 4.0, "sample_sec": 0.5, "score_sec": 0.25,
                           "selection_sec": 1.0}])]):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        (run_dir / "result.json").write_text(json.dumps({"status": "completed", "train_sec": train, "scores": scores}))
        runs.append(PlannedRun(f"id{i}", method, {}, (), str(run_dir), (), method, "unet-xs", 10, 64, 1, 1.0))
    assert time_breakdown(runs) == {"teachers: training": 100.0, "students: training": 70.0,
                                    "sampler search and selection scores": 5.0,
                                    "evaluation (reported scores)": 4.5}
    sweep = Sweep("s", tmp_path, [], {})
    text = write_summary(sweep, runs, {r.run_id: "completed" for r in runs}, 123.0, collect_sec=7.0).read_text()
    assert "| students: training | 70 |" in text and "| collect (fits, claims, tables, plots) | 7 |" in text
    assert "| wall time of the sweep | 123 |" in text
