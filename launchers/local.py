"""The local launcher: runs on this machine, in this process, one run after another.

(The sweep issue adds worker processes running several at a time, and the SLURM launcher.)
"""
from __future__ import annotations

from typing import Callable, Iterable

from omegaconf import DictConfig


def run_all(configs: Iterable[DictConfig], on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train every config in order (a run that already completed returns its result at once)."""
    from harness.train import run

    results = []
    for i, cfg in enumerate(configs):
        result = run(cfg)
        results.append(result)
        if on_done is not None:
            on_done(i, result)
    return results
