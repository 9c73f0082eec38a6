"""Training methods, one file each; every module here that defines `METHOD` is registered in `METHODS`
under its name, so a new method is one new file (its class on the `base.Method` interface)."""

from __future__ import annotations

from ..registry import discover
from .base import EMA, BlockModel, EndToEndModel, Method, Optimizer, stream_seed, update

METHODS: dict[str, type[Method]] = discover(__name__, __path__, "METHOD")


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"train.method={name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["EMA", "METHODS", "BlockModel", "EndToEndModel", "Method", "Optimizer", "get_method", "stream_seed",
           "update"]
