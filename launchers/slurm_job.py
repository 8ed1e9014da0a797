"""What one SLURM array task runs: a few runs of a sweep, one after another, as a submitit Checkpointable.

On a timeout or a preemption SLURM signals the job (SIGUSR2, `signal_delay_s` before the limit). The
run in progress treats it like SIGTERM: it finishes its step, checkpoints and stops (`interrupted:
SIGUSR2 at step N`); the task then hands the signal on to submitit's handler, which calls `checkpoint()`
(the same task back) and requeues the job. The requeued task calls every run again: completed runs
return their result at once, the interrupted one resumes from the step it reached.

`scancel` sends SIGTERM: the run checkpoints and stops the same way, and the task stops too (the runs
after it in the task never start); the job ends CANCELLED, so the driver fails the run and cancels
the stages that depend on it.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from pathlib import Path

import submitit

from harness.train.rundir import is_end
from launchers.base import RunSpec, execute


class RunsFailed(RuntimeError):
    """Raised at the end of a task in which a run did not complete, so that SLURM marks the task FAILED
    (and `afterok` dependents of its stage never start)."""


def _record_failure(spec: RunSpec, status: str, trace: str) -> None:
    """A run that raised before writing its own result (a config that does not compose, a run dir
    holding another config) gets a result.json saying so, unless the directory already has an end state."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from harness.train.rundir import RunDir
    run_dir = RunDir(spec.run_dir)
    previous = run_dir.read_json("result.json") or {}
    if is_end(str(previous.get("status", ""))):
        return
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    run_dir.write_json("result.json", {"status": status, "run_dir": spec.run_dir, "traceback": trace})


def preempt_signal() -> int:
    """The signal submitit asks SLURM to send before a time limit (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}", signal.SIGUSR2))


def run_one(spec: RunSpec, log_dir: str = "") -> str:
    """Train (or resume, or return) one run; its end status. Only a signal's SystemExit escapes.
    Rank 0 also logs the run to `<log_dir>/<run_id>.log` (the task's own log holds every run)."""
    from harness.train.rundir import first_line
    handler = None
    if log_dir and int(os.environ.get("RANK", "0")) == 0:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(log_dir) / f"{spec.run_id}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    log = logging.getLogger(__name__)
    try:
        status = str(execute(spec, (preempt_signal(),)).get("status", "failed: the run returned no status"))
        log.info("run %s (%s): %s", spec.run_id, spec.run_dir, status)
        return status
    except Exception as exc:   # noqa: BLE001 (one run's error must not stop the task's other runs)
        status = f"failed: {type(exc).__name__}: {first_line(exc)}"
        log.error("run %s (%s): %s", spec.run_id, spec.run_dir, status, exc_info=True)
        _record_failure(spec, status, traceback.format_exc())
        return status
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _set_threads() -> None:
    """Torch threads = the CPUs SLURM gave each task (task/none binds nothing, so torch would take all)."""
    import torch
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)       # a run with trainer.threads > 0 sets its own


class RunTask(submitit.helpers.Checkpointable):
    """The runs of one array task; `world_size` ranks each (nodes x tasks per node)."""

    def __init__(self, runs: tuple[RunSpec, ...], world_size: int = 1, log_dir: str = ""):
        self.runs = tuple(runs)
        self.world_size = world_size
        self.log_dir = log_dir

    def __call__(self) -> dict[str, str]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger().setLevel(logging.INFO)       # basicConfig is a no-op where a handler exists
        if self.world_size > 1:
            from harness.train.engine import export_slurm_env
            export_slurm_env()
        _set_threads()
        statuses = {}
        for spec in self.runs:
            statuses[spec.run_id] = status = run_one(spec, self.log_dir)
            if status.startswith("interrupted: "):
                self._stop(spec, status)
        failed = {k: v for k, v in statuses.items() if v != "completed"}
        if failed:
            raise RunsFailed(f"{len(failed)} of {len(statuses)} run(s) did not complete: "
                             + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        return statuses

    def _stop(self, spec: RunSpec, status: str) -> None:
        """A signal stopped a run (it checkpointed): the pre-timeout signal goes on to submitit's handler,
        which requeues the task and exits; any other signal (scancel's SIGTERM) ends the task here."""
        log = logging.getLogger(__name__)
        preempt = signal.Signals(preempt_signal()).name
        if status.startswith(f"interrupted: {preempt} "):
            log.info("run %s stopped for %s; handing the signal to submitit to requeue", spec.run_id, preempt)
            os.kill(os.getpid(), preempt_signal())     # submitit's handler: checkpoint(), requeue, exit
            if int(os.environ.get("RANK", "0")):        # its handler returns on the other ranks: they wait
                while True:                             # for the requeue (or the time limit) to end them,
                    time.sleep(60)                      # rather than fail the step before rank 0 requeues
        raise RunsFailed(f"run {spec.run_id} {status}; the task's later runs were not started")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeue the same runs: each resumes from its run directory's newest checkpoint."""
        logging.getLogger(__name__).info("requeueing %d run(s); each resumes from its last checkpoint",
                                         len(self.runs))
        return submitit.helpers.DelayedSubmission(RunTask(self.runs, self.world_size, self.log_dir))
