"""Run states read from run directories, and the sweep's live status table."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from harness.sweep.spec import PlannedRun, format_value
from harness.train.rundir import is_end, read_status

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


def progress_line(status: dict[str, str], elapsed_sec: float) -> str:
    c = counts(status)
    done = c["completed"] + c["failed"]
    return (f"{bar(done, len(status))} {done}/{len(status)}  completed {c['completed']}  failed {c['failed']}  "
            f"running {c['running']}  queued {c['queued']}  {elapsed_sec:.0f} s")


def table(runs: list[PlannedRun], status: dict[str, str], started: dict[str, float] | None = None) -> str:
    started = started or {}
    rows = [("run", "stage", "grid point", "status", "step", "time")]
    for r in runs:
        s = status.get(r.run_id, "queued")
        step = f"{last_step(r.run_dir) if s == 'running' else (r.steps if s == 'completed' else 0)}/{r.steps}"
        secs = f"{time.time() - started[r.run_id]:.0f} s" if s == "running" and r.run_id in started else ""
        point = " ".join(f"{k}={format_value(v)}" for k, v in r.point.items())
        rows.append((r.run_id, r.stage, point, s if len(s) < 70 else s[:67] + "...", step, secs))
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

    def _text(self) -> str:
        with self._lock:
            return table(self.runs, self.status, self.started) + "\n" + progress_line(
                self.status, time.time() - self.tic)

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
            if not self.tty:
                run = next((r for r in self.runs if r.run_id == run_id), None)
                name = Path(run.run_dir).name if run else run_id
                print(f"{time.strftime('%H:%M:%S')} {status:<10s} {name}\n  "
                      f"{progress_line(self.status, time.time() - self.tic)}", file=self.stream, flush=True)
        if self._live is not None:
            self._live.refresh()

    def redraw(self, final: bool = False) -> None:
        """The whole table, printed once at the end (a terminal's live view redraws itself)."""
        if final:
            self.stream.write(self._text() + "\n")
            self.stream.flush()
