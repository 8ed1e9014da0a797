"""The run directory: the only contract between training and collection.

    config.yaml      the fully resolved config, written before step 0 and never changed
    config.json      the same config as JSON, for the collector (plain json.loads); old runs may lack it
    derived.json     values derived from it (precision, world size, steps per stage, ...)
    metrics.jsonl    one JSON object per log interval / evaluation, namespaced keys
    checkpoints/     see harness.train.checkpoint
    result.json      status ("running", "completed", "failed: <reason>") and scores, rewritten atomically
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line statuses."""
    text = str(exc)
    return text.splitlines()[0] if text else ""


class RunDirError(ValueError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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

        A directory that already holds a different config is refused (nothing is overwritten)."""
        text = OmegaConf.to_yaml(cfg, resolve=True)
        resuming = self.config_path.exists()
        if resuming and self.config_path.read_text() != text:
            raise RunDirError(f"{self.path} already holds a run with a different config; "
                              f"choose another run_dir or delete it")
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
