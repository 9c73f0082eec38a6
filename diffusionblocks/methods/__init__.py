"""Training methods, one file each; every module here that defines `METHOD` is registered in `METHODS`
under its name, so a new method is one new file (its class on the `base.Method` interface). Methods from outside the
package: registry.py."""

from __future__ import annotations

from ..registry import discover, lookup, table
from .base import EMA, BlockModel, EndToEndModel, Method, Optimizer, stream_seed, update

METHODS: dict[str, type[Method]] = table("METHOD", Method, discover(__name__, __path__, "METHOD"))


def get_method(name: str) -> type[Method]:
    return lookup("METHOD", name, "train.method")


__all__ = ["EMA", "METHODS", "BlockModel", "EndToEndModel", "Method", "Optimizer", "get_method", "stream_seed",
           "update"]
