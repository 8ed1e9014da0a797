"""Method registry: one class per consistency-model recipe, looked up by name.

Methods own what differs between papers (parameterization, time sampling, target, distance,
weighting, sampler grid); they never call backward, touch the optimizer or know the device count.
"""
from __future__ import annotations

import importlib

_REGISTRY: dict[str, type] = {}
# Modules whose import registers the built-in methods (the registry is filled lazily, on first use).
_BUILTIN_MODULES = ("methods.edm", "methods.ect", "methods.cm", "methods.trigflow", "methods.scm", "methods.stable_ct", "methods.gcm")
_loaded = False


def register(name: str):
    """Class decorator: `@register("ect")`. A duplicate name is refused."""
    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method '{name}' is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def unregister(name: str) -> None:
    """Remove a method registered with `register` (for tests and plugins that add one for a while)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> type:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'; valid: {', '.join(names())}")
    return _REGISTRY[name]
