"""Memory measurement, one way everywhere: bytes that autograd saves for the backward pass.

Saved activations are counted exactly with ``torch.autograd.graph.saved_tensors_hooks``: every tensor
packed for backward is attributed to its storage, each storage counted once, parameters not counted
(they are weights, not activations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_activation_bytes(fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """Run `fn` (a forward pass that builds a graph) and return (bytes saved for backward, fn's result)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in param_storages:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out
