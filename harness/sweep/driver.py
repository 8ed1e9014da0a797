"""`python -m harness.sweep SPEC.yaml [key=value ...] [--out DIR] [--dry-run | --status] [--retry-failed]`

Expands a sweep spec (format: harness/sweep/spec.py) into runs with stable ids, writes the sweep manifest
(`<out>/<name>/sweep.json`), dispatches the runs through the spec's launcher (local | slurm | auto),
shows their status live, waits, and collects the results (harness.analysis.collect: fits, tables, plots).
Re-running the same command after any interruption skips completed runs and resumes interrupted ones
from their last checkpoint; failed runs stay failed unless `--retry-failed` is given.
`--out DIR` replaces the spec's `out` (the sweep writes `<out>/<name>/`). Command-line `key=value`s:
`launcher=NAME`, `launcher.local.workers=N`, `launcher.slurm.OPTION=V`, `name=NAME` and `grid.KEY=[...]`
edit the spec; every other one is added to every run.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from harness import version
from harness.config import ConfigError
from harness.train.rundir import atomic_write_text, first_line
from harness.sweep.status import StatusBoard, done_flops, progress_line, run_state, table
from harness.train.rundir import RunDirError, exclusive, read_result
from harness.sweep.spec import PlannedRun, Sweep, format_value, expand, load_spec

MANIFEST = "sweep.json"


def _is_failed(status: str) -> bool:
    return status.startswith("failed")


def initial_status(runs: list[PlannedRun], retry_failed: bool) -> tuple[dict[str, str], list[PlannedRun]]:
    """Each run's status before dispatch and the runs to dispatch: completed ones are skipped, failed ones
    kept failed (unless retried), and runs whose source run stays failed are failed without running."""
    status, todo = {}, []
    for r in runs:                           # runs come in dependency order
        state = run_state(r.run_dir)
        bad = [d for d in r.depends_on if _is_failed(status.get(d, ""))]
        if state == "completed":
            status[r.run_id] = state
        elif _is_failed(state) and not retry_failed:
            status[r.run_id] = state
        elif bad:
            status[r.run_id] = f"failed: dependency {bad[0]} failed ({status[bad[0]]})"
        else:
            status[r.run_id] = "queued"
            todo.append(r)
    return status, todo


def write_manifest(sweep: Sweep, runs: list[PlannedRun], status: dict[str, str], launcher: str,
                   spec_path: str, extra: list[str]) -> Path:
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "name": sweep.name, "description": sweep.description, "spec_path": spec_path, "launcher": launcher,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_overrides": extra, "spec": sweep.spec,
        "stages": [{"name": s.name, "after": list(s.after), "sources": s.sources, "grid": s.grid}
                   for s in sweep.stages],
        "runs": [{"run_id": r.run_id, "stage": r.stage, "point": r.point, "run_dir": r.run_dir,
                  "depends_on": list(r.depends_on), "method": r.method, "model": r.model, "steps": r.steps,
                  "batch_size": r.batch_size, "nimg": r.nimg, "num_params": r.num_params,
                  "flops_est": r.flops_est, "overrides": list(r.overrides), "status": status.get(r.run_id)}
                 for r in runs],
    }
    path = sweep.out_dir / MANIFEST
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")
    return path


def print_plan(sweep: Sweep, runs: list[PlannedRun], launcher: str) -> None:
    rows = [("run", "stage", "method", "model", "params", "steps", "kimg", "est. GFLOP", "state", "grid point")]
    for r in runs:
        point = " ".join(f"{k}={format_value(v)}" for k, v in r.point.items())
        rows.append((r.run_id, r.stage, r.method, r.model, f"{r.num_params / 1e6:.2f}M", str(r.steps),
                     f"{r.nimg / 1000:g}", f"{r.flops_est / 1e9:.4g}", run_state(r.run_dir), point))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"\nsweep {sweep.name}: {len(runs)} runs in {len(sweep.stages)} stages "
          f"({', '.join(f'{s.name} {sum(r.stage == s.name for r in runs)}' for s in sweep.stages)}); "
          f"launcher {launcher}; out {sweep.out_dir}")
    print(f"estimated compute: {sum(r.nimg for r in runs) / 1e6:.4g} M training images, "
          f"{sum(r.flops_est for r in runs) / 1e12:.4g} TFLOP (3 x counted network forward FLOPs per image; "
          f"methods' extra target/JVP/teacher passes not included)")


TEACHER_METHODS = ("edm", "trigflow")


def time_breakdown(runs: list[PlannedRun]) -> dict[str, float]:
    """Seconds summed over the runs' result.json: training (teachers, students), the selection scores and
    sampler search (harness.eval.select), and sampling + scoring of the reported scores."""
    out = {"teachers: training": 0.0, "students: training": 0.0, "sampler search and selection scores": 0.0,
           "evaluation (reported scores)": 0.0}
    for r in runs:
        res = read_result(r.run_dir)
        who = "teachers" if r.method in TEACHER_METHODS else "students"
        out[f"{who}: training"] += float(res.get("train_sec", 0) or 0)
        for rec in [*res.get("scores", []), *(e for e in res.get("evals", []) if isinstance(e, dict))]:
            out["sampler search and selection scores"] += float(rec.get("selection_sec", 0) or 0)
            out["evaluation (reported scores)"] += float(rec.get("sample_sec", 0) or 0) + float(rec.get("score_sec", 0) or 0)
    return out


def write_summary(sweep: Sweep, runs: list[PlannedRun], status: dict[str, str], wall_sec: float,
                  collect_sec: float | None = None, parts: dict[str, float] | None = None) -> Path:
    """summary.md: where the time went (`parts`, default time_breakdown(runs)) and every run's scores."""
    parts = dict(time_breakdown(runs) if parts is None else parts)
    if collect_sec is not None:
        parts["collect (fits, claims, tables, plots)"] = collect_sec
    times = ["## Where the time went", "", "Seconds summed over runs (the local launcher runs several at once, "
             "so the sum can exceed the wall time); the rest of the wall time is process start, data, "
             "checkpoints and waiting on stages.", "", "| part | seconds |", "|---|---|",
             *(f"| {k} | {v:.0f} |" for k, v in parts.items()), f"| wall time of the sweep | {wall_sec:.0f} |", ""]
    lines = ["## Runs", "", "| stage | run | status | EMA | 1-step | 2-step | train s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        res = read_result(r.run_dir)
        by_ema: dict[str, dict[int, float]] = {}
        for s in res.get("scores", []):
            by_ema.setdefault(s["ema"], {})[s["steps"]] = s["value"]
        for ema, vals in (by_ema or {"-": {}}).items():
            cells = [f"{vals[k]:.3f}" if k in vals else "-" for k in (1, 2)]
            lines.append(f"| {r.stage} | {Path(r.run_dir).name} | {status.get(r.run_id, '?')} | {ema} | "
                         f"{' | '.join(cells)} | {res.get('train_sec', 0):.0f} |")
    path = sweep.out_dir / "summary.md"
    atomic_write_text(path, f"# {sweep.name}\n\n" + "\n".join(times + lines) + f"\n\nwall time {wall_sec:.0f} s\n")
    return path


def collect_results(root: Path) -> int:
    try:
        from harness.analysis.collect import collect
    except ImportError as exc:
        print(f"collector not available ({exc}): fits, tables and plots skipped; "
              f"run `python -m harness.collect {root}` once it is installed")
        return 0
    try:
        paths = collect(root)
    except Exception as exc:  # noqa: BLE001 (the runs are done; report the collector's error in one line)
        print(f"error: collecting {root} failed: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 1
    if paths:
        print(f"collected {len(paths)} files into {paths['files.txt'].parent} (listed in files.txt)")
    return 0


def _stages(sweep: Sweep, todo: list[PlannedRun]):
    from launchers.base import RunSpec, StageSpec
    live = {r.stage for r in todo}
    return [StageSpec(s.name, tuple(RunSpec(r.run_id, r.run_dir, r.overrides) for r in todo if r.stage == s.name),
                      tuple(a for a in s.after if a in live))
            for s in sweep.stages if s.name in live]


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)     # unwinds through the launcher, which stops its workers


def dispatch(sweep: Sweep, runs: list[PlannedRun], args, extra: list[str], launcher_name: str) -> int:
    from launchers import LauncherError, get_launcher
    status, todo = initial_status(runs, args.retry_failed)
    options = {**sweep.launcher.get(launcher_name, {}), "folder": str(sweep.out_dir)}
    try:
        launcher = get_launcher(launcher_name, options)
    except LauncherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_manifest(sweep, runs, status, launcher_name, args.spec, extra)
    skipped = len(runs) - len(todo)
    print(f"sweep {sweep.name}: {len(runs)} runs, {skipped} already ended (completed or failed), "
          f"{len(todo)} to run on {launcher_name}", flush=True)
    tic = time.time()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if todo:
            with StatusBoard(runs, status) as board:
                final = launcher.launch(_stages(sweep, todo), on_update=board.update, wait=True)
            status.update(final)
    except (KeyboardInterrupt, SystemExit):
        print("\ninterrupted: re-run the same command to resume", file=sys.stderr)
        raise
    finally:
        status = {r.run_id: status[r.run_id] if status[r.run_id] == "completed" or _is_failed(status[r.run_id])
                  else run_state(r.run_dir) for r in runs}
        write_manifest(sweep, runs, status, launcher_name, args.spec, extra)
    wall = time.time() - tic
    for r in runs:
        if _is_failed(status[r.run_id]):
            print(f"FAILED {Path(r.run_dir).name}: {status[r.run_id]} (log: {sweep.out_dir / 'logs' / r.run_id}.log)")
    if not todo:
        print(progress_line(status, wall))
    tic_collect = time.time()
    rc = collect_results(sweep.out_dir)         # reports its own errors, never raises
    collect_sec = time.time() - tic_collect
    parts = time_breakdown(runs)
    summary = write_summary(sweep, runs, status, wall, collect_sec=collect_sec, parts=parts)
    for part, sec in parts.items():
        print(f"time: {part} {sec:.0f} s (summed over runs)")
    print(f"time: collect {collect_sec:.0f} s; sweep wall {wall:.0f} s", flush=True)
    print(f"summary: {summary}", flush=True)
    return 0 if rc == 0 and all(s == "completed" for s in status.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="sweep spec YAML (sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value: spec edits or overrides of every run")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="the sweep writes DIR/<name>/ (default: the spec's out)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan and the estimated compute")
    mode.add_argument("--status", action="store_true", help="report each run's state; submit nothing")
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    args = parser.parse_intermixed_args(argv)
    from launchers import LauncherError, resolve_name
    try:
        sweep, extra = load_spec(args.spec, args.overrides, args.out)
        runs = expand(sweep, extra)              # every run's config composed and checked before any work
        launcher_name = resolve_name(sweep.launcher["name"])
    except (ConfigError, LauncherError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(sweep, runs, launcher_name)
        return 0
    if args.status:
        status = {r.run_id: run_state(r.run_dir) for r in runs}
        print(table(runs, status))
        shown = {k: ("queued" if v in ("new", "interrupted") else v) for k, v in status.items()}
        done = done_flops(runs, shown)
        print(progress_line(shown, 0, (done, done, sum(r.flops_est for r in runs))))
        return 0
    try:
        with exclusive(sweep.out_dir, f"harness.sweep {sweep.name}"):   # one driver per sweep directory
            return dispatch(sweep, runs, args, extra, launcher_name)
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
