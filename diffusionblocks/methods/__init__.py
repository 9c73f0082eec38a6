"""Training methods, one file each; every module here that defines `METHOD` is registered in `METHODS`
under its name, so a new method is one new file (its class on the `base.Method` interface)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import EMA, BlockModel, EndToEndModel, Method, Optimizer, stream_seed, update


def _discover() -> dict[str, type[Method]]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if cls is not None:
            found[cls.name] = cls
    return found


METHODS: dict[str, type[Method]] = _discover()


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"train.method={name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["EMA", "METHODS", "BlockModel", "EndToEndModel", "Method", "Optimizer", "get_method", "stream_seed",
           "update"]
