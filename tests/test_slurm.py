"""The SLURM launcher: option checks and status parsing (always), and against a real cluster (marked
`slurm`): stages as job arrays chained by afterok, results identical to running the same runs in this
process, failures reported with their error, a timeout-interrupted job requeued and resumed to the
same final weights. Start the cluster with `bash scripts/slurm_cluster.sh start` and export the
SLURM_CONF it prints; without it these tests skip, or fail under REQUIRE_SLURM=1 (.ci/run)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launchers.base import RENDEZVOUS_ENV, RunSpec, StageSpec, execute
from processes import shell_env
from launchers.slurm import SlurmLauncher, SlurmOptionError, _executor_parameters, parse_options
from launchers.slurm_status import _trace_last_line, is_end

TINY = ["data=digits", "model=unet-xs", "trainer.batch_size=32", "trainer.threads=1",
        "trainer.log_every_steps=10", "eval.num_samples=64", "eval.steps=[1]"]


def _cluster_problem() -> str:
    """'' when a SLURM cluster with accounting takes jobs here, else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM client on PATH"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo/sacct did not answer ({exc})"
    if info.returncode != 0:
        return f"sinfo failed: {(info.stderr.strip().splitlines() or ['?'])[0]}"
    if not any(s.strip().rstrip("*") in ("idle", "mix", "alloc") for s in info.stdout.split()):
        return f"no node takes jobs (sinfo states: {info.stdout.split()})"
    if acct.returncode != 0:
        return f"no accounting (sacct failed: {(acct.stderr.strip().splitlines() or ['?'])[0]})"
    return ""


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        hint = "start it: bash scripts/slurm_cluster.sh start, then export the SLURM_CONF it prints"
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but the SLURM cluster is not usable: {problem}")
        pytest.skip(f"no SLURM cluster: {problem} ({hint})")


def _spec(run_id: str, root: Path, *overrides: str) -> RunSpec:
    run_dir = str(root / run_id)
    return RunSpec(run_id, run_dir, tuple([*TINY, *overrides, f"run_dir={run_dir}"]))


def _wait(tracker, limit_s: float = 400, poll_s: float = 2.0) -> dict[str, str]:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        statuses = tracker.poll()
        if all(is_end(s) for s in statuses.values()):
            return statuses
        time.sleep(poll_s)
    raise AssertionError(f"runs did not end within {limit_s} s: {tracker.poll()}")


def _sacct(job_id: str, *fields: str, duplicates: bool = False) -> list[dict[str, str]]:
    cmd = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", ",".join(fields)] + (["-D"] if duplicates else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def _weights(run_dir: str) -> dict[str, torch.Tensor]:
    """Final model and EMA weights of a run (its newest checkpoint)."""
    ckpt = sorted((Path(run_dir) / "checkpoints").glob("step-*"))[-1]
    engine = torch.load(next(ckpt.rglob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    harness = torch.load(ckpt / "harness.pt", map_location="cpu", weights_only=False)
    out = {f"net.{k}": v for k, v in engine["module"].items()}
    for name, ema in harness["emas"].items():
        out.update({f"{name}.{k}": v for k, v in ema.items()})
    return out


def _assert_same_weights(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 4
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs between {a} and {b}"


def _values(result: dict) -> list[tuple]:
    return [(s["ema"], s["steps"], s["metric"], s["value"]) for s in result["scores"]]


# -- without a cluster ----------------------------------------------------------------------------

def test_options_are_checked():
    assert parse_options({}).runs_per_task == 1
    for bad, words in [({"time_min": 5}, "unknown launcher.slurm option(s) ['time_min']"),
                       ({"nodes": 0}, "nodes=0 must be >= 1"), ({"mem": "4 GB"}, "mem='4 GB' must be sbatch's form"),
                       ({"gpus_per_node": "2"}, "must be of type int"), ({"setup": [3]}, "setup=[3]"),
                       ({"stages": {"teacher": {"gpus": 1}}}, "stages.teacher must map option names")]:
        with pytest.raises(SlurmOptionError, match=re.escape(words)):
            parse_options(bad)
    with pytest.raises(SlurmOptionError, match="unknown stage"):
        SlurmLauncher(stages={"nope": {"time": 5}}).submit([StageSpec("teacher", ())])
    with pytest.raises(SlurmOptionError, match=re.escape("signal_delay_s=120 must be below the time limit")):
        parse_options({"time": 2})
    launcher = SlurmLauncher(mem=4, stages={"teacher": {"time": 240, "mem": 64}})
    teacher, other = launcher.stage_options("teacher"), launcher.stage_options("student")
    assert (teacher.time, teacher.mem, other.time, other.mem) == (240, "65536M", 60, "4096M")
    with pytest.raises(SlurmOptionError, match=re.escape("launcher.slurm.stages.teacher.nodes=0 must be >= 1")):
        SlurmLauncher(stages={"teacher": {"nodes": 0}}).submit([StageSpec("teacher", ())])


def test_executor_parameters():
    opts = parse_options({"partition": "gpu", "account": "lab", "qos": "high", "time": 30,
                          "gpus_per_node": 4, "tasks_per_node": 4, "nodes": 2, "cpus_per_task": 8,
                          "mem": 64, "sbatch": {"constraint": "a100"}})
    p = _executor_parameters(opts, "cmbench-ect", ["12", "15"])
    assert p["slurm_additional_parameters"] == {"kill_on_invalid_dep": "yes", "constraint": "a100",
                                                "dependency": "afterok:12:15"}
    assert (p["timeout_min"], p["gpus_per_node"], p["tasks_per_node"], p["nodes"], p["cpus_per_task"],
            p["slurm_mem"]) == (30, 4, 4, 2, 8, "65536M")
    assert _executor_parameters(parse_options({"mem": "4G"}), "x", [])["slurm_mem"] == "4G"
    assert (p["slurm_partition"], p["slurm_account"], p["slurm_qos"]) == ("gpu", "lab", "high")
    p = _executor_parameters(parse_options({}), "x", [])
    assert "dependency" not in p["slurm_additional_parameters"] and "gpus_per_node" not in p


def test_error_line_from_submitit_trace():
    text = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most "
            "recent call last):\n  File \"x.py\", line 1\nlaunchers.slurm_job.RunsFailed: 1 of 1 run(s) did "
            "not complete: a: failed: X\n----------------------\nYou can check full logs with ...")
    assert _trace_last_line(text) == "launchers.slurm_job.RunsFailed: 1 of 1 run(s) did not complete: a: failed: X"


class _FakeJob:
    """Stands in for a submitit SlurmJob: a SLURM state, maybe a result pickle, an error text."""

    def __init__(self, job_id, state, tmp_path, error=None, stderr=""):
        self.job_id, self.state_now, self.error, self._stderr = job_id, state, error, stderr
        self.paths = type("P", (), {"result_pickle": tmp_path / f"{job_id}.pkl"})()
        self.watcher = type("W", (), {"get_state": lambda _, job_id, mode: self.state_now})()
        if error is not None:
            self.paths.result_pickle.write_text("x")

    def exception(self):
        return self.error

    def stderr(self):
        return self._stderr


def test_statuses_from_run_dirs_and_slurm_states(tmp_path, monkeypatch):
    from launchers.slurm_status import StatusTracker, SubmittedTask, signature
    runs = {name: RunSpec(name, str(tmp_path / name), ()) for name in ("a", "b", "c", "d", "e")}
    Path(runs["a"].run_dir).mkdir()
    Path(runs["a"].run_dir, "result.json").write_text('{"status": "failed: an earlier attempt"}')
    stages = [StageSpec("s1", (runs["a"], runs["b"])), StageSpec("s2", (runs["c"],)),
              StageSpec("s3", (runs["d"], runs["e"]), after=("s2",))]
    tracker = StatusTracker(tmp_path / "_slurm", stages)
    job1 = _FakeJob("1_0", "PENDING", tmp_path)
    tracker.add(SubmittedTask("s1", job1, (runs["a"], runs["b"])), {"a": signature(runs["a"].run_dir)})
    job2 = _FakeJob("2", "FAILED", tmp_path, stderr="slurmstepd: error: Detected 1 oom_kill event\n")
    tracker.add(SubmittedTask("s2", job2, (runs["c"],)), {})
    job3 = _FakeJob("3_0", "PENDING", tmp_path)
    tracker.add(SubmittedTask("s3", job3, (runs["d"], runs["e"])), {})
    cancelled = []
    monkeypatch.setattr("launchers.slurm_status.scancel", cancelled.extend)
    got = tracker.poll(refresh=False)
    assert got["a"] == got["b"] == "queued"              # a stale failure does not count
    assert got["c"] == "failed: SLURM job 2 ended FAILED: slurmstepd: error: Detected 1 oom_kill event"
    assert got["d"] == got["e"] == "failed: not run: stage 's2' it depends on did not complete"
    assert cancelled == ["3_0"]
    job1.state_now = "RUNNING"
    assert [tracker.poll(refresh=False)[k] for k in "ab"] == ["running", "queued"]   # packed after a
    Path(runs["a"].run_dir, "result.json").write_text('{"status": "failed: ValueError: bad"}')
    Path(runs["b"].run_dir).mkdir()
    Path(runs["b"].run_dir, "result.json").write_text('{"status": "running"}')
    assert [tracker.poll(refresh=False)[k] for k in "ab"] == ["failed: ValueError: bad", "running"]
    job1.state_now, job1.error = "FAILED", RuntimeError("Job (task=0) failed during processing with trace:"
                                                        "\n----------------------\nTraceback...\nKeyError: 'x'"
                                                        "\n----------------------\nlogs")
    job1.paths.result_pickle.write_text("x")
    assert tracker.poll(refresh=False)["b"] == "failed: KeyError: 'x'"


# -- on the cluster -------------------------------------------------------------------------------

@pytest.mark.slurm
def test_stages_match_local_failures_reported_dependencies_hold(cluster, tmp_path):
    slurm, local = tmp_path / "slurm", tmp_path / "local"
    teacher = ["method=edm", "trainer.steps=30", "trainer.lr=3e-3"]
    student = ["method=ect", "trainer.steps=30", "trainer.lr=1e-3"]
    t = _spec("teacher", slurm, *teacher)
    s = _spec("student", slurm, *student, f"init_from={slurm / 'teacher'}")
    missing = _spec("missing", slurm, *student, f"init_from={slurm / 'nothere'}")      # raises in the run
    bad_key = _spec("badkey", slurm, *student, "trainer.no_such_key=1")              # raises in compose
    after = _spec("after", slurm, "method=edm", "trainer.steps=10")
    stages = [StageSpec("teacher", (t,)), StageSpec("student", (s, missing, bad_key), after=("teacher",)),
              StageSpec("downstream", (after,), after=("student",))]
    launcher = SlurmLauncher(poll_sec=2)
    tracker = launcher.submit(stages)
    assert launcher.submit(stages).tasks[0].job.job_id == tracker.tasks[0].job.job_id   # re-attached
    jobs = json.loads((slurm / "_slurm" / "jobs.json").read_text())
    assert len({jobs[r]["job_id"].split("_")[0] for r in ("student", "missing", "badkey")}) == 1  # one array

    # meanwhile, the same two runs in this process
    t_local = execute(_spec("teacher", local, *teacher))
    s_local = execute(_spec("student", local, *student, f"init_from={local / 'teacher'}"))
    assert t_local["status"] == s_local["status"] == "completed"

    statuses = _wait(tracker)
    assert statuses["teacher"] == statuses["student"] == "completed"
    assert statuses["missing"].startswith("failed: ValueError:") and "nothere" in statuses["missing"]
    assert statuses["badkey"].startswith("failed: ConfigError:") and "no_such_key" in statuses["badkey"]
    assert statuses["after"] == "failed: not run: stage 'student' it depends on did not complete"
    assert json.loads(Path(bad_key.run_dir, "result.json").read_text())["status"] == statuses["badkey"]
    logs = {r: (slurm / "logs" / f"{r}.log").read_text() for r in ("teacher", "missing")}   # per-run logs
    assert f"run teacher ({t.run_dir}): completed" in logs["teacher"]
    assert f"run missing ({missing.run_dir}): {statuses['missing']}" in logs["missing"]

    for run, ref in ((t, t_local), (s, s_local)):
        result = json.loads(Path(run.run_dir, "result.json").read_text())
        assert _values(result) == _values(ref) and result["steps"] == ref["steps"] == 30
        _assert_same_weights(run.run_dir, ref["run_dir"])

    # accounting: the student's array started only after the teacher's job ended; failures are FAILED
    t_job = _sacct(jobs["teacher"]["job_id"], "End", "State")[0]
    s_job = _sacct(jobs["student"]["job_id"], "Start", "State")[0]
    assert t_job["State"] == "COMPLETED" and s_job["Start"] >= t_job["End"]
    assert Path(s.run_dir, "config.yaml").stat().st_mtime >= Path(t.run_dir, "result.json").stat().st_mtime
    assert _sacct(jobs["missing"]["job_id"], "State")[0]["State"] == "FAILED"
    states = [r["State"].split()[0] for r in _sacct(jobs["after"]["job_id"], "State")]
    assert states in (["CANCELLED"], ["PENDING"]), states


@pytest.mark.slurm
def test_timeout_requeues_and_resumes_to_the_same_weights(cluster, tmp_path):
    """The pre-timeout signal checkpoints the run at the step it reached (not at its last scheduled
    checkpoint), submitit requeues the task, and the requeued run resumes from that step."""
    overrides = ["method=ect", "trainer.steps=120", "trainer.lr=1e-3", "trainer.checkpoint_every_steps=1000",
                 "trainer.log_every_steps=1", "eval.at_end=false"]
    run = _spec("requeued", tmp_path / "slurm", *overrides)
    tracker = SlurmLauncher(poll_sec=1, max_requeue=2, time=10).submit([StageSpec("s", (run,))])
    job = tracker.tasks[0].job
    deadline = time.time() + 240
    while _logged_steps(run.run_dir)[-1:] < [15]:
        assert time.time() < deadline and not is_end(tracker.poll()["requeued"]), "the run did not start"
        time.sleep(0.5)
    reached = _logged_steps(run.run_dir)[-1]
    job._interrupt(timeout=True)     # submitit's own helper: the signal SLURM sends before a time limit
    # SLURM holds a requeued job ~2 min before it may start (BeginTime); let it start now instead
    while not _sacct(str(job.job_id), "State") or _sacct(str(job.job_id), "State")[0]["State"] != "PENDING":
        assert time.time() < deadline, "the job was not requeued"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)

    reference = execute(_spec("reference", tmp_path / "local", *overrides))     # uninterrupted, here
    assert _wait(tracker)["requeued"] == "completed" and reference["status"] == "completed"
    assert job.result() == {"requeued": "completed"}           # the requeued task's own return value
    records = _sacct(str(job.job_id), "State", duplicates=True)
    while records[-1]["State"] in ("RUNNING", "COMPLETING") and time.time() < deadline + 60:
        time.sleep(0.5)                                          # the job exits after its result is written
        records = _sacct(str(job.job_id), "State", duplicates=True)
    assert [r["State"] for r in records] == ["REQUEUED", "COMPLETED"]
    log = job.stderr() or ""
    resumed = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "resumed from step" in line]
    assert len(resumed) == 1 and reached <= resumed[0] < 120       # at most the step in progress redone
    assert f"interrupted: SIGUSR2 at step {resumed[0]} (checkpoint saved" in log
    steps = _logged_steps(run.run_dir)
    assert steps == list(range(1, 121))                               # one straight run after truncation
    _assert_same_weights(run.run_dir, reference["run_dir"])


def _logged_steps(run_dir: str) -> list[int]:
    path = Path(run_dir, "metrics.jsonl")
    lines = path.read_text().splitlines() if path.exists() else []
    return [rec["step"] for rec in map(json.loads, lines) if "loss" in rec]


@pytest.mark.slurm
def test_scancel_stops_the_run_and_its_dependents(cluster, tmp_path):
    """scancel mid-run: the run checkpoints and stops (interrupted, resumable), the driver reports it
    failed saying so, and the stage after it never starts."""
    first = _spec("first", tmp_path / "slurm", "method=edm", "trainer.steps=2000", "trainer.log_every_steps=1",
                  "trainer.checkpoint_every_steps=1000", "eval.at_end=false")
    then = _spec("then", tmp_path / "slurm", "method=edm", "trainer.steps=5")
    tracker = SlurmLauncher(poll_sec=1).submit([StageSpec("a", (first,)), StageSpec("b", (then,), after=("a",))])
    deadline = time.time() + 240
    while _logged_steps(first.run_dir)[-1:] < [10]:
        assert time.time() < deadline and not is_end(tracker.poll()["first"]), "the run did not start"
        time.sleep(0.5)
    subprocess.run(["scancel", str(tracker.tasks[0].job.job_id)], check=True)
    statuses = _wait(tracker)
    assert statuses["first"].startswith("failed: launchers.slurm_job.RunsFailed: run first interrupted: "
                                        "SIGTERM at step "), statuses["first"]
    assert statuses["then"] == "failed: not run: stage 'a' it depends on did not complete"
    result = json.loads(Path(first.run_dir, "result.json").read_text())
    step = int(re.match(r"interrupted: SIGTERM at step (\d+) \(checkpoint saved", result["status"]).group(1))
    assert Path(first.run_dir, "checkpoints", f"step-{step:07d}").is_dir() and 10 <= step < 2000
    time.sleep(3)
    assert not Path(then.run_dir).exists()                            # the dependent never ran
    jobs = json.loads((tmp_path / "slurm" / "_slurm" / "jobs.json").read_text())
    assert [r["State"].split()[0] for r in _sacct(jobs["then"]["job_id"], "State")] in (["CANCELLED"], [])


@pytest.mark.slurm
def test_sweep_driver_on_slurm_matches_local_launcher(cluster, tmp_path, monkeypatch):
    """`python -m harness.sweep SPEC launcher=slurm`: option names pass the spec check, two students
    share one array task (runs_per_task), and every result equals the local launcher's."""
    from harness.sweep.driver import main as sweep
    for var in RENDEZVOUS_ENV:
        monkeypatch.delenv(var, raising=False)   # left by execute() in this process; local workers inherit them
    spec = {"name": "tiny", "base": [*TINY, "trainer.lr=1e-3"], "grid": {"budget_nimg": [640, 960]},
            "stages": [{"name": "edm", "grid": {"budget_nimg": None}, "overrides": ["method=edm", "trainer.steps=20"]},
                       {"name": "tune", "grid": {"method": ["ect"]}, "init_from": "edm"}],
            "launcher": {"name": "local", "local": {"workers": 1},
                         "slurm": {"time": 10, "runs_per_task": 2, "max_requeue": 1}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(spec))                       # JSON is YAML
    assert sweep([str(path), "--out", str(tmp_path / 'slurm'), "launcher=slurm"]) == 0
    assert sweep([str(path), "--out", str(tmp_path / 'local'), "launcher=local"]) == 0

    def results(out: Path) -> dict:
        manifest = json.loads((out / "tiny" / "sweep.json").read_text())
        return {(r["stage"], json.dumps(r["point"], sort_keys=True)):
                json.loads(Path(r["run_dir"], "result.json").read_text()) for r in manifest["runs"]}
    on_slurm, local = results(tmp_path / "slurm"), results(tmp_path / "local")
    assert on_slurm.keys() == local.keys() and len(on_slurm) == 3
    for key, result in on_slurm.items():
        assert result["status"] == "completed" and _values(result) == _values(local[key])
        _assert_same_weights(result["run_dir"], local[key]["run_dir"])
    jobs = json.loads((tmp_path / "slurm" / "tiny" / "_slurm" / "jobs.json").read_text())
    tune_jobs = [j["job_id"] for j in jobs.values() if j["stage"] == "tune"]
    assert len(tune_jobs) == 2 and len(set(tune_jobs)) == 1                    # both runs in one task


@pytest.mark.slurm
def test_two_ranks_through_submitits_torch_distributed_environment(cluster, tmp_path):
    """tasks_per_node=2: srun starts two ranks, submitit's helper exports RANK/WORLD_SIZE/MASTER_*, and
    the run trains data-parallel over gloo."""
    run = _spec("dp", tmp_path, "method=ect", "trainer.steps=20", "eval.at_end=false")
    statuses = SlurmLauncher(poll_sec=1, tasks_per_node=2, cpus_per_task=1, time=10).launch(
        [StageSpec("dp", (run,))])
    assert statuses == {"dp": "completed"}
    derived = json.loads(Path(run.run_dir, "derived.json").read_text())
    assert derived["world_size"] == 2 and derived["batch_per_rank"] == 16


@pytest.mark.slurm
def test_hydra_multirun_through_the_submitit_launcher(cluster, tmp_path):
    """`python -m harness.train -m hydra/launcher=submitit_slurm ...`: each job of the grid is a SLURM job
    that trains its run into hydra.sweep.dir/<job number>, and the command waits for them and exits 0."""
    import sys
    env = shell_env()
    proc = subprocess.run([sys.executable, "-m", "harness.train", "-m", "hydra/launcher=submitit_slurm",
                           "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
                           f"hydra.sweep.dir={tmp_path / 'grid'}", "method=ect,ict", *TINY, "trainer.steps=4"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for num, method in ((0, "ect"), (1, "ict")):
        run_dir = tmp_path / "grid" / str(num)
        assert json.loads((run_dir / "config.json").read_text())["method"]["name"] == method
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "completed" and result["steps"] == 4
