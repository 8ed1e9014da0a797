"""Atomic, resumable checkpoints.

`<run>/checkpoints/step-0000200/` holds the DeepSpeed engine state (weights, optimizer, loss scaler,
lr schedule) under `engine/`, and `harness.pt` (every EMA, the method's state, step, data position,
counters) plus one `rng-rank<k>.pt` per rank. It is written under a temporary name and renamed when
complete; the loader takes the newest readable one and falls back to older ones with a warning.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from harness.train import engine as eng
from harness.train.rundir import first_line

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{7,})$")
_TMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()     # this rank's device only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, run_dir: Path, step: int, state: dict[str, Any], rank: int, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):      # leftovers of interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
    eng.barrier()
    engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    eng.barrier()
    if rank == 0:
        torch.save(state, tmp / "harness.pt")
        _fsync_tree(tmp)
        if final.exists():            # re-saving a step: move the old copy aside first, never lose both
            aside = root / f"{_TMP_PREFIX}old-{final.name}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    eng.barrier()
    return final


def load_latest(engine, run_dir: Path, rank: int,
                apply_state: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
    """Restore the newest checkpoint every rank can read into the engine and hand its harness state
    to `apply_state`; returns that state, or None when there is nothing to resume."""
    candidates = eng.broadcast_object([str(p) for p in list_checkpoints(run_dir)])   # one list for all ranks
    for path in map(Path, candidates):
        state = rng = problem = None
        try:
            state = torch.load(path / "harness.pt", map_location="cpu", weights_only=True)
            rng_file = path / f"rng-rank{rank}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
        except Exception as exc:
            problem = exc
        if eng.all_true(problem is None):
            try:
                loaded, _ = engine.load_checkpoint(str(path), tag="engine")
                if loaded is None:
                    raise RuntimeError("DeepSpeed found no engine state")
                apply_state(state)
            except Exception as exc:
                problem = exc
        if not eng.all_true(problem is None):   # unreadable here or on another rank: the one before it
            reason = f"{type(problem).__name__}: {first_line(problem)}" if problem else "unreadable on another rank"
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, reason)
            continue
        if rng is not None:
            set_rng_state(rng)
        return state
    return None
