"""Launchers: where a sweep's runs execute. `get_launcher(name, options)` with name local | slurm | auto
(auto: slurm where `sbatch --version` answers, else local); options are the spec's `launcher.<name>`
section as keyword arguments (plus `folder`, the sweep's directory, when the launcher takes it)."""
from __future__ import annotations

import importlib
import inspect
import shutil
import subprocess
from typing import Any

from launchers.base import Launcher, RunSpec, StageSpec, execute

__all__ = ["Launcher", "LauncherError", "RunSpec", "StageSpec", "execute", "get_launcher", "resolve_name",
           "sbatch_available"]
NAMES = ("auto", "local", "slurm")
# launcher name -> (module, class); modules are imported lazily (submitit only where SLURM is used)
_CLASSES = {"local": ("launchers.local", "LocalLauncher"), "slurm": ("launchers.slurm", "SlurmLauncher")}


class LauncherError(ValueError):
    """A launcher that cannot be used here (unknown name, missing module, bad option): one line."""


def sbatch_available() -> bool:
    """True where `sbatch --version` answers (a SLURM client is installed and configured)."""
    if shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sbatch", "--version"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def resolve_name(name: str) -> str:
    if name not in NAMES:
        raise LauncherError(f"unknown launcher '{name}'; valid: {', '.join(NAMES)}")
    if name == "auto":
        return "slurm" if sbatch_available() else "local"
    return name


def get_launcher(name: str, options: dict[str, Any] | None = None) -> Launcher:
    """The launcher `name` (auto resolved), constructed with `options` as keyword arguments."""
    name = resolve_name(name)
    module_name, class_name = _CLASSES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LauncherError(f"launcher '{name}' is not available: cannot import {module_name} ({exc}); "
                            f"use launcher=local") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise LauncherError(f"{module_name} has no {class_name}; valid launchers: {', '.join(NAMES)}")
    options = dict(options or {})
    params = inspect.signature(cls).parameters
    if "folder" in options and "folder" not in params and not any(
            p.kind is p.VAR_KEYWORD for p in params.values()):
        options.pop("folder")
    try:
        return cls(**options)
    except TypeError as exc:
        raise LauncherError(f"launcher '{name}': {exc}") from None
