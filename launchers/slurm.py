"""The SLURM launcher (submitit): one job array per stage, stages chained by `afterok` dependencies.

Each array task runs `runs_per_task` runs one after another (a SLURM task costs seconds of start-up,
so many small runs share one); a run takes `nodes` x `tasks_per_node` ranks, with torch.distributed's
environment exported by submitit's helper. Timeouts and preemptions requeue the task up to
`max_requeue` times, each run resuming from its last checkpoint (launchers/slurm_job.py). A run's
status comes from its run directory (result.json) and, for what the directory cannot know (queued,
died before writing, cancelled), from SLURM's accounting. Submitted job ids are kept in
`<folder>/_slurm/jobs.json`, so a launcher started again re-attaches to runs still queued or running
instead of submitting them twice.

Options (the sweep spec's `launcher.slurm` section) are the fields of SlurmOptions.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from launchers import LauncherError
from launchers.base import RENDEZVOUS_ENV, RunSpec, StageSpec, UpdateFn
from launchers.slurm_job import RunTask
from launchers.slurm_status import StatusTracker, SubmittedTask, is_end, read_status, signature


class SlurmOptionError(LauncherError):
    """A bad `launcher.slurm` option: one line naming it and what is valid."""


@dataclass(frozen=True)
class SlurmOptions:
    partition: str = ""            # SLURM partition ("" = the cluster's default)
    account: str = ""              # account charged ("" = the user's default)
    qos: str = ""                  # quality of service ("" = default)
    time: int = 60                 # wall-clock limit of one array task, minutes (a requeued task gets it anew)
    nodes: int = 1                 # nodes per run
    tasks_per_node: int = 1        # ranks per node (one per GPU for multi-GPU runs)
    gpus_per_node: int = 0         # GPUs per node (0 = none requested)
    cpus_per_task: int = 1         # CPUs per rank (also torch's threads)
    mem: str = ""                  # memory per node, sbatch's form (4G, 500M); a number is GB ("" = default)
    runs_per_task: int = 1         # runs packed into one array task, run one after another
    max_requeue: int = 3           # requeues on timeout / preemption before the task gives up
    array_parallelism: int = 256   # tasks of one stage's array running at once
    signal_delay_s: int = 120      # SIGUSR2 this long before the time limit (checkpoint, then requeue)
    poll_sec: float = 10.0         # status refresh while waiting (one sacct call each)
    python: str = ""               # the job's python command ("" = this interpreter)
    folder: str = ""               # sweep directory: submitit's files go to <folder>/_slurm ("" = above the runs)
    setup: tuple[str, ...] = ()    # shell lines run before each task (module load ..., source venv)
    sbatch: dict = field(default_factory=dict)    # any other sbatch option, e.g. {constraint: a100}
    stages: dict = field(default_factory=dict)    # per-stage overrides of these keys, {teacher: {time: 240}}


_POSITIVE = ("time", "nodes", "tasks_per_node", "cpus_per_task", "runs_per_task", "array_parallelism")
_NON_NEGATIVE = ("gpus_per_node", "max_requeue", "signal_delay_s", "poll_sec")
_PER_STAGE = tuple(f.name for f in fields(SlurmOptions) if f.name not in ("stages", "folder", "poll_sec"))


_MEM = re.compile(r"^(\d+(\.\d+)?[KMGT]?B?)?$")
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "dict": (dict,),
          "tuple[str, ...]": (list, tuple)}


def parse_options(options: dict[str, Any], where: str = "launcher.slurm") -> SlurmOptions:
    """SlurmOptions from a spec's dict; unknown keys and bad values are one-line errors."""
    valid = [f.name for f in fields(SlurmOptions)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SlurmOptionError(f"unknown {where} option(s) {unknown}; valid: {', '.join(valid)}")
    for f in fields(SlurmOptions):
        if f.name not in options:
            continue
        value, types = options[f.name], _TYPES[str(f.type)]
        if f.name == "mem":
            continue                                        # checked below
        if isinstance(value, bool) or not isinstance(value, types) or (
                f.name == "setup" and not all(isinstance(line, str) for line in value)):
            raise SlurmOptionError(f"{where}.{f.name}={value!r} must be of type {f.type}")
        if (f.name in _POSITIVE and value < 1) or (f.name in _NON_NEGATIVE and value < 0):
            raise SlurmOptionError(f"{where}.{f.name}={value} must be {'>= 1' if f.name in _POSITIVE else '>= 0'}")
    mem = options.get("mem", "")
    if isinstance(mem, (int, float)) and not isinstance(mem, bool) and mem > 0:
        options = {**options, "mem": f"{int(round(mem * 1024))}M"}       # a bare number: GB
    elif not (isinstance(mem, str) and _MEM.match(mem)):
        raise SlurmOptionError(f"{where}.mem={mem!r} must be sbatch's form (4G, 500M, 1T) or a number of GB")
    if options.get("signal_delay_s", 120) >= 60 * options.get("time", 60):
        raise SlurmOptionError(f"{where}.signal_delay_s={options.get('signal_delay_s', 120)} must be below the "
                               f"time limit ({where}.time={options.get('time', 60)} minutes)")
    for stage, extra in (options.get("stages") or {}).items():
        if not isinstance(extra, dict) or set(extra) - set(_PER_STAGE):
            raise SlurmOptionError(f"{where}.stages.{stage} must map option names to values; valid: "
                                   f"{', '.join(_PER_STAGE)}")
    return SlurmOptions(**{k: tuple(v) if k == "setup" else v for k, v in options.items()})


def _executor_parameters(opts: SlurmOptions, name: str, after: Sequence[str]) -> dict[str, Any]:
    """submitit AutoExecutor.update_parameters keys for one stage."""
    extra: dict[str, Any] = {"kill_on_invalid_dep": "yes", **opts.sbatch}   # dependents of a failed stage go
    if after:
        extra["dependency"] = "afterok:" + ":".join(after)
    params: dict[str, Any] = dict(
        name=name, timeout_min=opts.time, nodes=opts.nodes, tasks_per_node=opts.tasks_per_node,
        cpus_per_task=opts.cpus_per_task, slurm_array_parallelism=opts.array_parallelism,
        slurm_signal_delay_s=opts.signal_delay_s, slurm_additional_parameters=extra)
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem:
        params["slurm_mem"] = opts.mem
    for key in ("partition", "account", "qos"):
        if getattr(opts, key):
            params[f"slurm_{key}"] = getattr(opts, key)
    if opts.setup:
        params["slurm_setup"] = list(opts.setup)
    return params


@contextlib.contextmanager
def _job_env():
    """Hide this process's torch.distributed and SLURM job variables while submitting (sbatch exports
    the environment: a job must not inherit a rendezvous, or an allocation when submitted from inside
    one); SLURM_CONF stays, it names the cluster."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ)
              if (k in RENDEZVOUS_ENV or k.startswith(("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_")))
              and k != "SLURM_CONF"}
    try:
        yield
    finally:
        os.environ.update(hidden)


class SlurmLauncher:
    """Launcher protocol (launchers/base.py) on SLURM through submitit."""

    name = "slurm"

    def __init__(self, **options: Any):
        self.options = parse_options(options)
        self._raw = {k: v for k, v in options.items() if k != "stages"}

    def _root(self, stages: Sequence[StageSpec]) -> Path:
        if self.options.folder:
            return Path(self.options.folder)
        dirs = [os.path.dirname(os.path.abspath(r.run_dir)) for s in stages for r in s.runs]
        return Path(os.path.commonpath(dirs)) if dirs else Path("results")

    def stage_options(self, stage: str) -> SlurmOptions:
        """The options with the stage's own overrides (`stages: {teacher: {time: 240}}`) applied."""
        extra = self.options.stages.get(stage, {})
        if not extra:
            return self.options
        return replace(parse_options({**self._raw, **extra}, where=f"launcher.slurm.stages.{stage}"),
                       stages=self.options.stages)

    def _check(self, stages: Sequence[StageSpec]) -> None:
        names = {s.name for s in stages}
        unknown = sorted(set(self.options.stages) - names)
        if unknown:
            raise SlurmOptionError(f"launcher.slurm.stages names unknown stage(s) {unknown}; stages: "
                                   f"{', '.join(sorted(names))}")
        for s in stages:
            self.stage_options(s.name)             # each stage's merged options checked before any sbatch

    def submit(self, stages: Sequence[StageSpec]) -> StatusTracker:
        """Submit every stage (one sbatch each); the tracker reports the runs' statuses."""
        self._check(stages)
        root = self._root(stages) / "_slurm"
        tracker = StatusTracker(root, stages)
        attached = tracker.attach(stages)            # still queued / running from an earlier launch
        for stage in stages:
            done = [r for r in stage.runs if r.run_id not in attached and read_status(r.run_dir) == "completed"]
            tracker.add_completed(stage.name, done)
            todo = [r for r in stage.runs if r.run_id not in attached and r not in done]
            if todo:
                self._submit_stage(stage, todo, root, tracker)
        tracker.save()
        return tracker

    def _submit_stage(self, stage: StageSpec, todo: list[RunSpec], root: Path, tracker: StatusTracker) -> None:
        import submitit
        opts = self.stage_options(stage.name)
        chunks = [tuple(todo[i:i + opts.runs_per_task]) for i in range(0, len(todo), opts.runs_per_task)]
        after = [j for dep in stage.after for j in tracker.stage_job_ids(dep)]
        executor = submitit.AutoExecutor(folder=root / "%j", cluster="slurm",
                                         slurm_max_num_timeout=opts.max_requeue,
                                         slurm_python=opts.python or None)
        executor.update_parameters(**_executor_parameters(opts, f"cmbench-{stage.name}", after))
        signatures = {r.run_id: signature(r.run_dir) for r in todo}
        world = opts.nodes * opts.tasks_per_node
        with _job_env():
            tasks = [RunTask(chunk, world, str(root.parent / "logs")) for chunk in chunks]
            jobs = executor.submit_array(tasks)                 # one sbatch: the stage's job array
        for job, chunk in zip(jobs, chunks):
            tracker.add(SubmittedTask(stage.name, job, chunk), signatures)

    def launch(self, stages: Sequence[StageSpec], on_update: UpdateFn | None = None,
               wait: bool = True) -> dict[str, str]:
        """Submit, then (wait=True) poll until every run completed or failed; run_id -> status."""
        tracker = self.submit(stages)
        statuses = tracker.poll(on_update, refresh=False)
        while wait and not all(is_end(s) for s in statuses.values()):
            time.sleep(self.options.poll_sec)
            statuses = tracker.poll(on_update)
        return statuses
