"""Run states read from run directories, and the sweep's live status table."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from harness.sweep.spec import PlannedRun, format_value
from harness.train.rundir import is_end, read_result, read_status
from harness.train.watch import clock

BAR_WIDTH = 30


def run_state(run_dir: str) -> str:
    """completed | failed: <reason> | interrupted (started, has not ended) | new."""
    status = read_status(run_dir)
    if is_end(status):
        return status
    path = Path(run_dir)
    if status or (path / "config.yaml").exists() or any((path / "checkpoints").glob("step-*")):
        return "interrupted"
    return "new"


def last_step(run_dir: str) -> int:
    """The newest logged step of a run (0 when none), read from the tail of metrics.jsonl."""
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
            continue
    return 0


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def counts(status: dict[str, str]) -> dict[str, int]:
    out = {"queued": 0, "running": 0, "completed": 0, "failed": 0}
    for s in status.values():
        key = "failed" if s.startswith("failed") else s if s in out else "queued"
        out[key] += 1
    return out


def done_flops(runs: list[PlannedRun], status: dict[str, str]) -> float:
    """Estimated training FLOPs done (PlannedRun.flops_est, from counted forward FLOPs): all of an ended
    run's, the logged fraction of a running one's."""
    total = 0.0
    for r in runs:
        s = status.get(r.run_id, "queued")
        if s == "completed" or s.startswith("failed"):
            total += r.flops_est
        elif s == "running" and r.steps:
            total += r.flops_est * min(last_step(r.run_dir), r.steps) / r.steps
    return total


def progress_line(status: dict[str, str], elapsed_sec: float, flops: tuple[float, float, float] | None = None) -> str:
    """Counts, elapsed time and, given `flops` = (done at the start, done now, total), the throughput
    measured since the start and the ETA it gives for the rest."""
    c = counts(status)
    done = c["completed"] + c["failed"]
    line = (f"{bar(done, len(status))} {done}/{len(status)}  completed {c['completed']}  failed {c['failed']}  "
            f"running {c['running']}  queued {c['queued']}  elapsed {clock(elapsed_sec)}")
    if flops is not None:
        start, now, total = flops
        rate = (now - start) / elapsed_sec if elapsed_sec > 0 else 0.0
        line += f"  {rate / 1e9:.3g} GFLOP/s" if rate > 0 else ""
        line += f"  ETA {clock((total - now) / rate)}" if rate > 0 else f"  {(total - now) / 1e12:.3g} TFLOP to go"
    return line


def best_score(run_dir: str) -> str:
    """The run's best 2-step score (else 1-step), as 'metric value', from result.json; '' when none."""
    scores = [s for s in read_result(run_dir).get("scores", []) if isinstance(s, dict)
              and isinstance(s.get("value"), (int, float))]
    for steps in (2, 1):
        picked = [s for s in scores if s.get("steps") == steps]
        if picked:
            best = min(picked, key=lambda s: s["value"])
            return f"{best.get('metric')} {best['value']:.4g} ({steps}-step)"
    return ""


def table(runs: list[PlannedRun], status: dict[str, str], started: dict[str, float] | None = None) -> str:
    started = started or {}
    rows = [("run", "stage", "grid point", "status", "step", "time", "score")]
    for r in runs:
        s = status.get(r.run_id, "queued")
        step = f"{last_step(r.run_dir) if s == 'running' else (r.steps if s == 'completed' else 0)}/{r.steps}"
        secs = f"{time.time() - started[r.run_id]:.0f} s" if s == "running" and r.run_id in started else ""
        point = " ".join(f"{k}={format_value(v)}" for k, v in r.point.items())
        rows.append((r.run_id, r.stage, point, s if len(s) < 70 else s[:67] + "...", step, secs,
                     best_score(r.run_dir) if s == "completed" else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


class StatusBoard:
    """Live status: on a terminal a table redrawn in place by rich (with per-run steps, every second);
    otherwise one plain line per status change, with the progress bar. The final table is printed plainly."""

    def __init__(self, runs: list[PlannedRun], status: dict[str, str], stream: TextIO | None = None):
        self.runs, self.status = runs, dict(status)
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started: dict[str, float] = {}
        self.tic = time.time()
        self.total_flops = sum(r.flops_est for r in runs)
        self.start_flops = done_flops(runs, self.status)   # runs ended before this driver started
        self._lock = threading.Lock()
        self._live = None

    def __enter__(self) -> "StatusBoard":
        if self.tty:
            from rich.console import Console
            from rich.live import Live
            self._live = Live(self._renderable(), console=Console(file=self.stream, force_terminal=True),
                              refresh_per_second=1,
                              get_renderable=self._renderable, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        self.redraw(final=True)

    def _progress(self) -> str:
        flops = (self.start_flops, done_flops(self.runs, self.status), self.total_flops)
        return progress_line(self.status, time.time() - self.tic, flops)

    def _text(self) -> str:
        with self._lock:
            return table(self.runs, self.status, self.started) + "\n" + self._progress()

    def _renderable(self):
        from rich.text import Text
        return Text(self._text(), no_wrap=True, overflow="ellipsis")

    def update(self, run_id: str, status: str) -> None:
        with self._lock:
            if self.status.get(run_id) == status:
                return
            self.status[run_id] = status
            if status == "running":
                self.started[run_id] = time.time()
            if not self.tty:         # one line per change: the run, its score when it completed, the sweep
                run = next((r for r in self.runs if r.run_id == run_id), None)
                name = Path(run.run_dir).name if run else run_id
                score = best_score(run.run_dir) if run and status == "completed" else ""
                print(f"{time.strftime('%H:%M:%S')} {status:<10s} {name}{f' ({score})' if score else ''} | "
                      f"{self._progress()}", file=self.stream, flush=True)
        if self._live is not None:
            self._live.refresh()

    def redraw(self, final: bool = False) -> None:
        """The whole table, printed once at the end (a terminal's live view redraws itself)."""
        if final:
            self.stream.write(self._text() + "\n")
            self.stream.flush()
