"""Atomic, resumable checkpoints.

`<run>/checkpoints/step-0000200/` holds the DeepSpeed engine state (weights, optimizer, loss scaler,
lr schedule) under `engine/`, and `harness.pt` (every EMA, the method's state, step, data position,
counters) plus one `rng-rank<k>.pt` per rank. It is written under a temporary name and renamed when
complete; the loader takes the newest readable one and falls back to older ones with a warning.

Every file is read by `safe_load`: torch's weights-only unpickler (tensors, containers, numbers, strings)
plus the few DeepSpeed state classes its engine files hold, for the harness's own files and, through
`install_safe_loader`, for DeepSpeed's engine load too. A checkpoint that needs anything else would run
code when unpickled (a shared teacher or init run is the obvious carrier) and is refused, naming the file.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
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
_FULL_BYTES = 1 << 20   # under 1 MiB free after a failed save: the disk filled up


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")   # how torch's weights-only unpickler names a refused callable


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors and plain data: loading it could run code."""


def _deepspeed_state_classes() -> list:
    """The non-tensor classes DeepSpeed's engine files hold (loss scalers, ZeRO's stage enum and fragment
    addresses: plain data classes whose unpickling runs no code of the file's choosing)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:   # an evaluation-only install: the harness's own files need none of them
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True and DeepSpeed's state classes; UnsafeCheckpointError (one line,
    naming the file and what it asked for) for a file that names any other callable. A corrupt file
    raises as torch raises it."""
    with torch.serialization.safe_globals(_deepspeed_state_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            m = _GLOBAL.search(str(exc))
            if m is None:      # not a refused global: a corrupt file, for the caller's fallback
                raise
            raise UnsafeCheckpointError(f"{path}: refused: loading it would call {m.group(1).rstrip('.')}, "
                                        f"and only tensors and plain data are read from a checkpoint") from None


def install_safe_loader(engine) -> None:
    """Make DeepSpeed's engine load its checkpoint files through safe_load (its own loader unpickles
    whatever they hold)."""
    engine.checkpoint_engine.load = safe_load


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
        for stale in root.glob(f"{_TMP_PREFIX}*"):      # leftovers of saves whose process died (the run
            shutil.rmtree(stale, ignore_errors=True)    # directory's lock says none is alive)
    eng.barrier()
    try:
        return _save(engine, run_dir, root, final, tmp, state, rank, keep)
    except Exception as exc:
        full = _disk_full(root)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)      # ours: the older checkpoints stay as they were
        if full and not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
            # torch.save reports a full disk as a RuntimeError of its zip writer: name the cause
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"saving {final}") from exc
        raise


def _disk_full(path: Path) -> bool:
    """Is the filesystem holding `path` (next to) full? Checked when a save fails, before its partial
    files are removed."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _FULL_BYTES


def _save(engine, run_dir: Path, root: Path, final: Path, tmp: Path, state: dict[str, Any], rank: int,
          keep: int) -> Path:
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
            state = safe_load(path / "harness.pt")
            rng_file = path / f"rng-rank{rank}.pt"
            rng = safe_load(rng_file) if rng_file.exists() else None
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            problem = exc
        if eng.all_true(problem is None):
            try:
                loaded, _ = engine.load_checkpoint(str(path), tag="engine")
                if loaded is None:
                    raise RuntimeError("DeepSpeed found no engine state")
                apply_state(state)
            except UnsafeCheckpointError:
                raise
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
