"""The run directory: the only contract between training and collection.

    config.yaml      the fully resolved config, written before step 0; rewritten only by a resume that
                     changes what RESUMABLE_CHANGES allows
    config.json      the same config as JSON, for the collector (plain json.loads); old runs may lack it
    changes.jsonl    one line per resume that changed the config (RunDir.prepare: a longer run, eval.*, ...)
    derived.json     values derived from it (precision, world size, steps per stage, ...)
    metrics.jsonl    one JSON object per log interval / evaluation, namespaced keys
    checkpoints/     see harness.train.checkpoint
    result.json      status ("running", "completed", "failed: <reason>") and scores, rewritten atomically
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf


def is_end(status: str) -> bool:
    """Has a run with this result.json status ended (completed, or failed with its reason)?"""
    return status == "completed" or status.startswith("failed")


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """A run's result.json ({} when it has none yet, or it cannot be read as a JSON object)."""
    result = RunDir(run_dir).read_json("result.json")
    return result if isinstance(result, dict) else {}


def read_status(run_dir: str | Path) -> str:
    """A run's status ('' when it has no readable result.json)."""
    return str(read_result(run_dir).get("status", ""))


LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (fcntl.flock on <directory>/.lock, which names the holder)
    while `what` runs in it. A second process gets a one-line RunDirError naming the holder; a lock left
    by a process that died is free (the kernel drops it with the process) and is simply taken over."""
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise RunDirError(f"{directory} is in use by {holder}; wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)                     # closing drops the lock


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line statuses."""
    text = str(exc)
    return text.splitlines()[0] if text else ""


class RunDirError(ValueError):
    pass


_ABSENT = "<absent>"
# Keys whose change a run takes on resume (exact keys, or prefixes ending in "."): what is still to come
# (evaluations, logging, checkpoints), where the run lives, and a longer run (trainer.steps may only grow).
RESUMABLE_CHANGES = ("run_dir", "trainer.steps", "eval.", "log.", "launcher.name", "trainer.log_every_steps",
                     "trainer.checkpoint_every_steps", "trainer.keep_checkpoints", "trainer.grid_every_steps",
                     "trainer.max_nonfinite_steps", "trainer.divergence_factor", "trainer.divergence_steps",
                     "trainer.threads", "trainer.device")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """key -> (old value, new value) for every leaf that differs (_ABSENT where a side lacks it)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def resumable_change(key: str, old: Any, new: Any) -> bool:
    if old is _ABSENT or new is _ABSENT:            # a key this version of the harness added or dropped
        return True
    if key == "trainer.steps":
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def _show(value: Any) -> str:
    return value if value is _ABSENT else json.dumps(value)


def describe_error(exc: BaseException) -> str:
    """One line for a status: an OS error by its reason and file ("No space left on device (path)"),
    anything else by its type and first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return f"{type(exc).__name__}: {first_line(exc)}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename; a failure removes the temporary file (ours: the pid
    is in its name) and leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors to floats, non-finite floats to strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def prepare(self, cfg: DictConfig) -> bool:
        """Create the directory and write the config; True when resuming an existing run.

        A directory that already holds a run takes a config that differs only where a run may change on
        resume (RESUMABLE_CHANGES: a longer trainer.steps, eval.*, log.*, bookkeeping; run_dir, so a moved
        directory resumes; keys a newer harness added or dropped): config.yaml and config.json are
        rewritten and `changes.jsonl` records each change. Any other difference is refused, naming the
        keys, before anything is written."""
        text = OmegaConf.to_yaml(cfg, resolve=True)
        resuming = self.config_path.exists()
        if resuming and self.config_path.read_text() != text:
            changes = config_changes(OmegaConf.to_container(OmegaConf.load(self.config_path)),
                                     OmegaConf.to_container(cfg, resolve=True))
            refused = {k: v for k, v in changes.items() if not resumable_change(k, *v)}
            if refused:
                shown = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in list(refused.items())[:6])
                more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
                raise RunDirError(f"{self.path} already holds a run with a different config ({shown}{more}); "
                                  f"choose another run_dir or delete it")
            with open(self.path / "changes.jsonl", "a") as fh:
                fh.write(json.dumps(_clean({"time": time.time(), "changes": changes}), sort_keys=True) + "\n")
            atomic_write_text(self.config_path, text)
            (self.path / "config.json").unlink(missing_ok=True)
        if not resuming:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.config_path, text)
        if not resuming or not (self.path / "config.json").exists():   # after config.yaml, which marks the run
            container = OmegaConf.to_container(cfg, resolve=True)
            atomic_write_text(self.path / "config.json", json.dumps(container, indent=2) + "\n")
        return resuming

    def load_config(self) -> DictConfig:
        return OmegaConf.load(self.config_path)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.path / name, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")

    def write_status(self, result: dict[str, Any]) -> str | None:
        """Write result.json; when the atomic write fails (a full disk has no room for a second copy),
        overwrite the existing file in place. None when written, else why it could not be."""
        text = json.dumps(_clean(result), indent=2, sort_keys=True) + "\n"
        path = self.path / "result.json"
        try:
            atomic_write_text(path, text)
            return None
        except OSError as exc:
            first = describe_error(exc)
        try:
            with open(path, "r+") as fh:     # the blocks it frees by truncating are enough for a status
                fh.truncate(0)
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            return None
        except OSError:
            return first

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(_clean(record), sort_keys=True) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop log lines past the checkpoint so metrics.jsonl reads as one straight run."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", -1) <= after_step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out
