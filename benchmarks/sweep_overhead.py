"""Sweep submission overhead on SLURM: a 100-run, two-stage spec (10 EDM teachers, 90 ECT runs tuned
from them; tiny runs) submitted to the local cluster, then cancelled before it trains.

    bash scripts/slurm_cluster.sh start; export SLURM_CONF=...   # the one-node cluster
    python benchmarks/sweep_overhead.py [--runs-per-task 1]

Measured two ways, each with sbatch wrapped on PATH by a shim that counts the calls:
  driver:   `python -m harness.sweep SPEC launcher=slurm` in a fresh process, from its start (Python and
            torch imports, spec expansion, every config composed and checked) to the last sbatch returning;
  launcher: SlurmLauncher.submit() alone, in this process, on the same 100 runs.
Target: under 5 s and one sbatch per stage. Writes results/bench/sweep_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench" / "sweep_overhead.json"
SEEDS, BUDGETS = 10, 9          # 10 teachers (one per seed) + 10 x 9 students = 100 runs, 2 stages
BASE = ["data=digits", "model=unet-xs", "trainer.batch_size=32", "trainer.threads=1", "eval.num_samples=64",
        "eval.steps=[1]"]


def _shim(tmp: Path) -> Path:
    """A directory with an `sbatch` that calls the real one and appends its end time to a file."""
    real = shutil.which("sbatch")
    if real is None:
        sys.exit("error: no sbatch on PATH; start the cluster: bash scripts/slurm_cluster.sh start")
    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\n"{real}" "$@"\nrc=$?\n'
                                    f'date +%s.%N >> "{tmp}/sbatch_calls"\nexit $rc\n')
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir


def _calls(tmp: Path) -> list[float]:
    path = tmp / "sbatch_calls"
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def _cancel(sweep_dir: Path) -> None:
    try:
        jobs = json.loads((sweep_dir / "_slurm" / "jobs.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    ids = sorted({j["job_id"].split("_")[0] for j in jobs.values()})
    subprocess.run(["scancel", *ids], capture_output=True, check=False)


def _spec(out: Path, runs_per_task: int) -> Path:
    spec = {"name": "overhead", "out": str(out), "base": BASE,
            "grid": {"seed": list(range(SEEDS)), "budget_nimg": [320 * (i + 1) for i in range(BUDGETS)]},
            "stages": [{"name": "teacher", "grid": {"budget_nimg": None}, "overrides": ["method=edm",
                                                                                     "trainer.steps=10"]},
                       {"name": "student", "init_from": "teacher", "overrides": ["method=ect"]}],
            "launcher": {"name": "slurm", "slurm": {"time": 5, "runs_per_task": runs_per_task}}}
    path = out / "overhead.json"          # JSON is YAML
    path.write_text(json.dumps(spec, indent=1))
    return path


def bench_driver(tmp: Path, runs_per_task: int, limit_s: float = 120) -> dict:
    """Start `python -m harness.sweep` and time it to the last (second) sbatch; then stop it."""
    shim = _shim(tmp / "driver")
    spec = _spec(tmp / "driver", runs_per_task)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    tic = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "harness.sweep", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while len(_calls(tmp / "driver")) < 2 and proc.poll() is None and time.time() - tic < limit_s:
            time.sleep(0.05)
        calls = _calls(tmp / "driver")
        time.sleep(1.0)                       # any further (unexpected) sbatch would show up here
        calls = _calls(tmp / "driver")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
        _cancel(tmp / "driver" / "overhead")
    if len(calls) < 2:
        raise SystemExit(f"error: the driver made {len(calls)} sbatch call(s); its output:\n{output[-3000:]}")
    return {"sec_to_all_submitted": round(calls[-1] - tic, 3), "sbatch_calls": len(calls),
            "sec_first_sbatch": round(calls[0] - tic, 3)}


def bench_launcher(tmp: Path, runs_per_task: int) -> dict:
    """SlurmLauncher.submit() on the same runs, in this process."""
    from launchers.base import RunSpec, StageSpec
    from launchers.slurm import SlurmLauncher
    shim = _shim(tmp / "launcher")
    os.environ["PATH"] = f"{shim}{os.pathsep}{os.environ['PATH']}"
    root = tmp / "launcher" / "overhead"

    def spec(name: str, *overrides: str) -> RunSpec:
        return RunSpec(name, str(root / name), tuple([*BASE, *overrides, f"run_dir={root / name}"]))
    teachers = [spec(f"teacher-{s}", "method=edm", "trainer.steps=10", f"seed={s}") for s in range(SEEDS)]
    students = [spec(f"student-{s}-{b}", "method=ect", f"trainer.steps={10 * (b + 1)}", f"seed={s}",
                     f"init_from={root / f'teacher-{s}'}") for s in range(SEEDS) for b in range(BUDGETS)]
    stages = [StageSpec("teacher", tuple(teachers)), StageSpec("student", tuple(students), ("teacher",))]
    tic = time.time()
    try:
        tracker = SlurmLauncher(folder=str(root), time=5, runs_per_task=runs_per_task).submit(stages)
        sec = time.time() - tic
    finally:
        _cancel(root)
    return {"submit_sec": round(sec, 3), "sbatch_calls": len(_calls(tmp / "launcher")),
            "array_tasks": len(tracker.tasks)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-per-task", type=int, default=1)
    args = parser.parse_args()
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        sys.exit("error: no SLURM cluster answers (bash scripts/slurm_cluster.sh start; export SLURM_CONF=...)")
    with tempfile.TemporaryDirectory(prefix="cmbench-overhead-") as name:
        tmp = Path(name)
        driver = bench_driver(tmp, args.runs_per_task)
        launcher = bench_launcher(tmp, args.runs_per_task)
    result = {"runs": SEEDS + SEEDS * BUDGETS, "stages": 2, "runs_per_task": args.runs_per_task,
              "driver": driver, "launcher": launcher, "target_sec": 5.0,
              "meets_target": driver["sec_to_all_submitted"] < 5.0 and driver["sbatch_calls"] == 2,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
