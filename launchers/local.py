"""The local launcher: runs a sweep on this machine, `workers` runs at a time, in persistent worker
processes (spawned once; each imports torch and DeepSpeed once and then trains run after run).

A run starts once the runs it depends on completed: the runs whose directories it names in `init_from=`
or `teacher=` (its own source runs), or, for a stage listed in `after` whose runs it does not name,
every run of that stage. A run whose dependency failed is failed with a status naming it, never run.
Each run's output (training logs) goes to `<log_dir>/<run_id>.log`; a worker that dies (killed, out of
memory) fails its run and is replaced. Workers exit when the driver does, even on SIGKILL.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.train.rundir import is_end
from launchers.base import RENDEZVOUS_ENV, RunSpec, StageSpec, UpdateFn, execute


def default_threads(workers: int) -> int:
    """Torch threads per run so that `workers` runs together use the cores once (no oversubscription)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)          # the driver is gone (SIGKILL included): stop training at once
        time.sleep(0.5)


def _redirect_output(path: Path) -> None:
    import sys
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _worker(index: int, tasks, results, threads: int, parent_pid: int, log_dir: str) -> None:
    """A worker's life: import the heavy modules once, then train whatever it is handed."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    for var in RENDEZVOUS_ENV:
        os.environ.pop(var, None)               # a private rendezvous per worker, never the driver's
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    _redirect_output(Path(log_dir) / f"worker-{index}.log")
    import logging

    import torch
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from harness.train.engine import quiet_libraries
    quiet_libraries()                           # before DeepSpeed's import, which says it falls back to the CPU
    import deepspeed  # noqa: F401  (imported once here, not once per run)
    import harness.train.cli  # noqa: F401
    from harness.train.rundir import first_line
    results.put(("ready", index, "", ""))
    while True:
        spec = tasks.get()
        if spec is None:
            return
        _redirect_output(Path(log_dir) / f"{spec.run_id}.log")
        torch.set_num_threads(threads)          # a run with trainer.threads > 0 sets its own
        results.put(("running", index, spec.run_id, ""))
        wall, cpu = time.time(), time.process_time()
        try:
            status = str(execute(spec).get("status", "failed: the run returned no status"))
        except BaseException as exc:            # noqa: BLE001 (a run's error must not kill the worker)
            status = f"failed: {type(exc).__name__}: {first_line(exc)}"
        print(f"cmbench-local: run {spec.run_id} {status}: wall {time.time() - wall:.1f} s, "
              f"cpu {time.process_time() - cpu:.1f} s ({threads} threads)", flush=True)
        results.put(("done", index, spec.run_id, status))


def dependencies(stages: Sequence[StageSpec]) -> dict[str, set[str]]:
    """run_id -> ids of the runs it waits for (see the module docstring)."""
    by_dir = {str(Path(r.run_dir)): (s.name, r.run_id) for s in stages for r in s.runs}
    stage_runs = {s.name: {r.run_id for r in s.runs} for s in stages}
    deps: dict[str, set[str]] = {}
    for stage in stages:
        for run in stage.runs:
            named = {}
            for o in run.overrides:
                key, _, value = o.partition("=")
                if key in ("init_from", "teacher") and str(Path(value)) in by_dir:
                    src_stage, src_id = by_dir[str(Path(value))]
                    named.setdefault(src_stage, set()).add(src_id)
            need: set[str] = set()
            for after in stage.after:
                need |= named.get(after, stage_runs.get(after, set()))
            deps[run.run_id] = need | {i for ids in named.values() for i in ids}
    return deps


@dataclass
class _Slot:
    process: mp.Process
    tasks: object
    run_id: str = ""


class LocalLauncher:
    """`workers` runs at a time on this machine (see the module docstring)."""

    name = "local"

    def __init__(self, workers: int = 2, threads: int = 0, log_dir: str | None = None, folder: str | None = None):
        if workers < 1:
            raise ValueError(f"launcher.local.workers must be >= 1, got {workers}")
        self.workers = workers
        self.threads = threads or default_threads(workers)
        self.log_dir = str(log_dir or (Path(folder) / "logs" if folder else Path("runs") / "logs"))
        self._ctx = mp.get_context("spawn")

    def _spawn(self, index: int, results) -> _Slot:
        tasks = self._ctx.Queue()
        proc = self._ctx.Process(target=_worker, name=f"cmbench-worker-{index}", daemon=True,
                                 args=(index, tasks, results, self.threads, os.getpid(), self.log_dir))
        proc.start()
        return _Slot(proc, tasks)

    def launch(self, stages: Sequence[StageSpec], on_update: UpdateFn | None = None,
               wait: bool = True) -> dict[str, str]:
        """Run every stage here; returns when every run ended (local runs cannot outlive the driver, so
        `wait=False` also waits)."""
        notify = on_update or (lambda run_id, status: None)
        runs = {r.run_id: r for s in stages for r in s.runs}
        deps = dependencies(stages)
        status = {rid: "queued" for rid in runs}
        for rid in runs:
            notify(rid, "queued")
        order = list(runs)
        self._deaths = 0
        results = self._ctx.Queue()
        slots = [self._spawn(i, results) for i in range(min(self.workers, len(runs)))]
        try:
            while not all(is_end(s) for s in status.values()):
                self._fail_blocked(order, deps, status, notify)
                self._dispatch(order, deps, status, slots, runs)
                self._receive(results, status, slots, notify)
                self._reap(slots, status, notify, results)
        finally:
            self._stop(slots)
        return status

    @staticmethod
    def _fail_blocked(order, deps, status, notify) -> None:
        changed = True
        while changed:                           # a failure propagates down whole chains
            changed = False
            for rid in order:
                if status[rid] != "queued":
                    continue
                bad = [d for d in sorted(deps[rid]) if status.get(d, "completed").startswith("failed")]
                if bad:
                    status[rid] = f"failed: dependency {bad[0]} failed ({status[bad[0]]})"
                    notify(rid, status[rid])
                    changed = True

    @staticmethod
    def _dispatch(order, deps, status, slots, runs) -> None:
        idle = [s for s in slots if not s.run_id]
        for rid in order:
            if not idle:
                return
            if status[rid] == "queued" and all(status.get(d, "completed") == "completed" for d in deps[rid]):
                slot = idle.pop(0)
                slot.run_id = rid
                status[rid] = "dispatched"
                slot.tasks.put(runs[rid])

    @staticmethod
    def _receive(results, status, slots, notify) -> None:
        try:
            kind, index, rid, text = results.get(timeout=0.5)
        except queue.Empty:
            return
        if kind == "running":
            status[rid] = "running"
            notify(rid, "running")
        elif kind == "done":
            status[rid] = text
            slots[index].run_id = ""
            notify(rid, text)

    def _reap(self, slots, status, notify, results) -> None:
        for i, slot in enumerate(slots):
            if slot.process.is_alive():
                continue
            self._deaths += 1
            if slot.run_id and not is_end(status[slot.run_id]):
                status[slot.run_id] = f"failed: worker died (exit code {slot.process.exitcode}); see its log"
                notify(slot.run_id, status[slot.run_id])
            if self._deaths > len(status) + self.workers:     # workers die at start-up: give up
                for rid, s in status.items():
                    if not is_end(s):
                        status[rid] = f"failed: local workers keep dying; see {self.log_dir}/worker-*.log"
                        notify(rid, status[rid])
            if any(not is_end(s) for s in status.values()):
                slots[i] = self._spawn(i, results)

    @staticmethod
    def _stop(slots) -> None:
        for slot in slots:
            if slot.process.is_alive():
                slot.tasks.put(None)
        deadline = time.time() + 5
        for slot in slots:
            slot.process.join(max(0.0, deadline - time.time()))
            if slot.process.is_alive():
                slot.process.terminate()
                slot.process.join(2)


__all__ = ["LocalLauncher", "RunSpec", "StageSpec", "default_threads", "dependencies", "is_end"]
