"""Statuses of submitted SLURM runs: the run directory first, SLURM's accounting for the rest.

A run's result.json is the truth once it says completed, or says failed / running after this submission
(a stale failure from an earlier attempt does not count). Otherwise the task's SLURM state decides:
pending or requeued -> queued; running -> running (the task's current run) or queued (runs packed after
it); ended without a result -> failed with the job's own error (its exception's last line, or the
stderr's). Runs of a stage whose `after` stage has a failed run can never start (afterok): their jobs
are cancelled and they fail naming that stage. Submitted job ids are kept in `jobs.json`.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from harness.train.rundir import is_end, read_status  # is_end: re-exported for launchers.slurm
from launchers.base import RunSpec, StageSpec, UpdateFn

# SLURM states in which a job may still run (submitit's own list, plus the transient ones)
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED",
          "PREEMPTED", "REQUEUE_HOLD", "REQUEUE_FED", "UNKNOWN", "READY"}


def signature(run_dir: str) -> list[int] | None:
    """(mtime_ns, size) of result.json, to tell a status written after submission from a stale one."""
    try:
        st = (Path(run_dir) / "result.json").stat()
        return [st.st_mtime_ns, st.st_size]
    except OSError:
        return None


def scancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False)


def _queued_states(job_ids: Sequence[str]) -> dict[str, str]:
    """job id -> state of the jobs SLURM still holds (pending, running, ...), from squeue (one call;
    squeue answers from slurmctld at once, where accounting may lag a just-submitted job)."""
    if not job_ids:
        return {}
    base = sorted({j.split("_")[0] for j in job_ids})
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(base)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def _trace_last_line(text: str) -> str:
    """The exception line of submitit's FailedJobError text (the traceback's last line)."""
    parts = text.split("----------------------")
    body = parts[1] if len(parts) >= 3 else text
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _stderr_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "killed" in ln.lower()]
    return (errors or lines or [""])[-1]


@dataclass
class SubmittedTask:
    """One array task (a SLURM job id) and the runs it carries."""
    stage: str
    job: Any                        # submitit SlurmJob
    runs: tuple[RunSpec, ...]
    error: str = ""                 # the job's own error, once it ended without completing


class StatusTracker:
    def __init__(self, folder: Path, stages: Sequence[StageSpec]):
        self.folder = Path(folder)              # submitit's files: <folder>/<job id>/, jobs.json
        self.after = {s.name: tuple(s.after) for s in stages}
        self.tasks: list[SubmittedTask] = []
        self.completed: dict[str, str] = {}     # run_id -> stage, completed before submission
        self.signatures: dict[str, list[int] | None] = {}
        self.dependency_failed: dict[str, str] = {}   # stage -> the stage that failed before it
        self._last: dict[str, str] = {}
        self._manifest = self._read_manifest()

    # -- submission bookkeeping ------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, dict]:
        try:
            return json.loads((self.folder / "jobs.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def attach(self, stages: Sequence[StageSpec]) -> set[str]:
        """Track runs still queued or running from an earlier submission; their ids."""
        from submitit.slurm.slurm import SlurmJob
        known = {r.run_id: r for s in stages for r in s.runs
                 if self._manifest.get(r.run_id, {}).get("run_dir") == r.run_dir}
        states = _queued_states(sorted({self._manifest[k]["job_id"] for k in known}))
        by_job: dict[str, list[RunSpec]] = {}
        for run_id, run in known.items():
            if states.get(self._manifest[run_id]["job_id"], "") in ACTIVE:
                by_job.setdefault(self._manifest[run_id]["job_id"], []).append(run)
        for job_id, runs in by_job.items():
            entry = self._manifest[runs[0].run_id]
            job = SlurmJob(folder=self.folder / "%j", job_id=job_id)
            self.add(SubmittedTask(entry["stage"], job, tuple(runs)),
                     {r.run_id: self._manifest[r.run_id].get("signature") for r in runs})
        return {r.run_id for runs in by_job.values() for r in runs}

    def add(self, task: SubmittedTask, signatures: dict[str, list[int] | None]) -> None:
        self.tasks.append(task)
        for run in task.runs:
            self.signatures[run.run_id] = signatures.get(run.run_id)
            self._manifest[run.run_id] = {"job_id": str(task.job.job_id), "stage": task.stage,
                                          "run_dir": run.run_dir, "signature": signatures.get(run.run_id)}

    def add_completed(self, stage: str, runs: Sequence[RunSpec]) -> None:
        self.completed.update({r.run_id: stage for r in runs})

    def stage_job_ids(self, stage: str) -> list[str]:
        return sorted({str(t.job.job_id).split("_")[0] for t in self.tasks if t.stage == stage})

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".jobs.json.tmp"
        tmp.write_text(json.dumps(self._manifest, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.folder / "jobs.json")

    # -- statuses ---------------------------------------------------------------------------------
    def _job_error(self, task: SubmittedTask, state: str) -> str:
        if not task.error:
            job = task.job
            if job.paths.result_pickle.exists():
                exc = job.exception()
                line = _trace_last_line(str(exc)) if exc is not None else "ended without a result"
            else:
                line = f"SLURM job {job.job_id} ended {state}"
                detail = _stderr_line(job.stderr() or "")
                line += f": {detail}" if detail else ""
            task.error = f"failed: {line}"
        return task.error

    def _task_statuses(self, task: SubmittedTask) -> dict[str, str]:
        state = task.job.watcher.get_state(task.job.job_id, mode="cache").split()[0].upper()
        done = state not in ACTIVE or task.job.paths.result_pickle.exists()
        out, current = {}, False
        for run in task.runs:
            status = read_status(run.run_dir)
            fresh = signature(run.run_dir) != self.signatures.get(run.run_id)
            if status == "completed" or (fresh and status.startswith("failed")):
                out[run.run_id] = status
            elif task.stage in self.dependency_failed:
                out[run.run_id] = (f"failed: not run: stage '{self.dependency_failed[task.stage]}' it "
                                   f"depends on did not complete")
            elif done:
                out[run.run_id] = self._job_error(task, state)
            elif state in ("RUNNING", "COMPLETING") and not current:
                out[run.run_id], current = "running", True
            else:
                out[run.run_id] = "queued"
        return out

    def _fail_dependents(self, statuses: dict[str, str]) -> None:
        """Stages after a stage with a failed run can never start: cancel their jobs (SLURM's
        kill_on_invalid_dep may already have)."""
        failed_stages = {t.stage for t in self.tasks for r in t.runs if statuses[r.run_id].startswith("failed")}
        for stage, after in self.after.items():
            bad = [a for a in after if a in failed_stages or a in self.dependency_failed]
            if bad and stage not in self.dependency_failed:
                self.dependency_failed[stage] = bad[0]
                scancel([str(t.job.job_id) for t in self.tasks if t.stage == stage])

    def poll(self, on_update: UpdateFn | None = None, refresh: bool = True) -> dict[str, str]:
        """run_id -> status now (one sacct call when refresh); on_update gets every change."""
        from submitit.slurm.slurm import SlurmJob
        if refresh and self.tasks:
            SlurmJob.watcher.update()
        for _ in range(len(self.after) + 1):        # dependency failures propagate stage by stage
            statuses = {run_id: "completed" for run_id in self.completed}
            for task in self.tasks:
                statuses.update(self._task_statuses(task))
            before = dict(self.dependency_failed)
            self._fail_dependents(statuses)
            if before == self.dependency_failed:
                break
        for run_id, status in statuses.items():
            if on_update is not None and self._last.get(run_id) != status:
                on_update(run_id, status)
        self._last = statuses
        return statuses
