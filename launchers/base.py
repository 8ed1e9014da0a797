"""What every launcher is handed and what it must do (the contract between the sweep driver and launchers).

The sweep driver expands a spec into stages of runs and hands them to a launcher; the launcher makes
every run happen (here, in worker processes, or as SLURM job arrays) with each stage starting only after
the stages it depends on completed. A run's directory (its result.json) is the truth about its state:
launchers add only what the run directory cannot know (queued in SLURM, died before writing anything).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep."""

    run_id: str                      # stable id: the same spec always gives the same id
    run_dir: str                     # where the run writes; re-running resumes or returns its result
    overrides: tuple[str, ...]       # harness.config.compose(list(overrides)) is the run's config


@dataclass(frozen=True)
class StageSpec:
    """Runs that may execute in parallel once every stage in `after` has completed."""

    name: str
    runs: tuple[RunSpec, ...]
    after: tuple[str, ...] = field(default_factory=tuple)


def execute(spec: RunSpec, stop_signals: tuple[int, ...] = ()) -> dict:
    """Compose and train one run in this process; the one function every launcher's worker calls.
    SIGTERM, SIGINT and `stop_signals` checkpoint and stop it (harness.train.cli.run).

    Returns the run's result.json content (a run that already completed returns it at once)."""
    from harness.config import compose
    from harness.train.cli import STOP_SIGNALS, run

    return run(compose(list(spec.overrides)), (*STOP_SIGNALS, *stop_signals))


# torch.distributed's rendezvous variables. A lone run's harness.train.engine.setup_distributed writes them into
# its process's environment; a process started from it (a worker, a SLURM job) must not inherit them.
RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# on_update(run_id, status): status is "queued", "running", "completed" or "failed: <reason>".
UpdateFn = Callable[[str, str], None]


class Launcher(Protocol):
    """A launcher runs stages in dependency order; `launch` returns once every run reached an end state
    (completed or failed) or, for a detached launcher, once everything is submitted (`wait=False`)."""

    name: str

    def launch(self, stages: Sequence[StageSpec], on_update: UpdateFn | None = None,
               wait: bool = True) -> dict[str, str]:
        """Run (or submit) every stage; returns run_id -> final (or, with wait=False, current) status."""
        ...
