"""Collector speed: `harness.analysis.collect` over 10,000 synthetic run directories (target: under 30 s).

    python benchmarks/collect.py [--runs 10000] [--dir DIR]

The directories (tests/synthetic_runs.py, the files a real run writes) are 5 methods x 3 model sizes
x 8 budgets x seeds, each score K * C^alpha with 3% log-normal noise; 1% of them are failed, running,
config-only, truncated or garbage. Times load_runs alone, then the whole collect (load, fits with
t-intervals, tables, plots), wall clock and this process's CPU time (the machine is
shared: the CPU time is the load-independent number). Writes results/bench/collect.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from synthetic_runs import score, write_run  # noqa: E402

from harness.analysis.collect import collect  # noqa: E402
from harness.analysis.runs import load_runs  # noqa: E402

OUT = REPO / "results" / "bench" / "collect.json"
METHODS = {"ect": (40.0, -0.30), "ict": (60.0, -0.25), "ct": (70.0, -0.20), "sct": (45.0, -0.28),
           "cd": (30.0, -0.15)}
MODELS = {"unet-xs": 164283, "unet-s": 720000, "unet-m": 2270000}
BUDGETS = [100 * 2 ** i for i in range(8)]           # training steps at batch 128
BROKEN = ("failed", "running", "half", "truncated", "garbage")


def make_runs(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    grid = [(m, model, s) for m in METHODS for model in MODELS for s in BUDGETS]
    for i in range(n):
        method, model, steps = grid[i % len(grid)]
        path = root / f"{method}-{model}" / f"{method}-{model}-{steps}-seed{i // len(grid)}"
        if i % 100 == 99:
            _broken(path, BROKEN[(i // 100) % len(BROKEN)])
            continue
        K, alpha = METHODS[method]
        size = (MODELS[model] / MODELS["unet-xs"]) ** -0.2
        v1 = K * size * (steps / BUDGETS[0]) ** alpha * float(np.exp(rng.normal(0, 0.03)))
        v2 = 0.6 * v1 * float(np.exp(rng.normal(0, 0.03)))
        write_run(path, method=method, model=model, steps=steps, num_params=MODELS[model], seed=i // len(grid),
                  scores=[score(v1, 1, step=steps), score(v2, 2, step=steps)])


def _broken(path: Path, kind: str) -> None:
    if kind in ("failed", "running"):
        write_run(path, status="failed: RuntimeError: synthetic" if kind == "failed" else "running")
        return
    write_run(path)
    if kind == "half":
        (path / "result.json").unlink()
    elif kind == "truncated":
        text = (path / "result.json").read_text()
        (path / "result.json").write_text(text[: len(text) // 3])
    else:
        (path / "config.json").write_bytes(os.urandom(512))
        (path / "config.yaml").write_bytes(os.urandom(512))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--dir", default=None, help="where to build the runs (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp) / "runs"
        tic = time.perf_counter()
        reused = root.exists()
        if not reused:
            make_runs(root, args.runs)
        create_sec = time.perf_counter() - tic
        tic, cpu = time.perf_counter(), time.process_time()
        df, problems = load_runs(root)
        load_sec, load_cpu = time.perf_counter() - tic, time.process_time() - cpu
        tic, cpu = time.perf_counter(), time.process_time()
        files = collect(root, Path(tmp) / "collected")
        collect_sec, collect_cpu = time.perf_counter() - tic, time.process_time() - cpu
    result = {"runs": args.runs, "score_rows": len(df), "completed": int(df["run"].nunique()),
              "problems": len(problems), "files_written": len(files), "reused_dir": reused,
              "create_sec": round(create_sec, 2),
              "load_runs_sec": round(load_sec, 2), "load_runs_cpu_sec": round(load_cpu, 2),
              "collect_sec": round(collect_sec, 2), "collect_cpu_sec": round(collect_cpu, 2), "target_sec": 30.0,
              "under_target": collect_sec < 30.0, "python": platform.python_version(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average_1min": round(os.getloadavg()[0], 2)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
