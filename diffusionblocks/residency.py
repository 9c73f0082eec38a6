"""Which blocks live on the compute device while DiffusionBlocks trains.

The reference code keeps every block's weights and optimizer state resident, so only activations shrink
with B. Here the residency policy decides:

- ``all``: every block on the device (the reference code's behaviour);
- ``active``: only the block being trained holds device memory (weights, gradients, optimizer state),
  plus the shared stem/head. Idle blocks live off the device: in host memory when the device is a GPU,
  in memory-mapped files on disk when it is the CPU (the kernel may then drop their pages). A block is
  copied in when its turn comes and copied back out (bit-exact) when another block's turn comes.

Swapping costs two copies of a block per change of block; with ``dblocks.block_choice=sequential`` each
block changes once per run, so the cost vanishes (benchmarks/README.md, "Memory").
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


class Residency:
    """Moves blocks on and off `device`. `blocks[b]` are the parameters only block b trains,
    `optimizers[b]` its torch optimizer, `extra[b]` a dict whose tensors belong to block b too (e.g.
    its EMA weights; values are replaced in place), `shared` the parameters every block uses."""

    def __init__(self, policy: str, device: torch.device | str, blocks: dict[int, list[nn.Parameter]] | list,
                 optimizers: dict[int, torch.optim.Optimizer] | list, shared: list[nn.Parameter] = (),
                 extra: dict[int, tuple[dict, list[str]]] | None = None, directory: str | Path | None = None):
        """`directory`: where a CPU run's offload files go (a fresh hidden subfolder, deleted by close();
        None = the system's temporary folder)."""
        if policy not in ("all", "active"):
            raise ValueError(f"residency={policy!r}: expected 'all' or 'active'")
        self.policy, self.device = policy, torch.device(device)
        as_dict = lambda v: dict(enumerate(v)) if isinstance(v, (list, tuple)) else dict(v)
        self.blocks, self.optimizers, self.shared = as_dict(blocks), as_dict(optimizers), list(shared)
        self.extra = as_dict(extra) if extra is not None else {b: ({}, []) for b in self.blocks}
        self.active: int | None = None
        self.swaps, self.swap_seconds = 0, 0.0
        self._store: dict[tuple[int, str], torch.Tensor] = {}  # (block, slot) -> off-device copy
        self._homes: set[int] = set()  # their storages
        self._tmp = None
        if policy == "active" and self.device.type == "cpu":
            # on disk, not in a tmpfs such as /tmp may be: the point is to leave RAM
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.mkdtemp(prefix=".offload-", dir=directory)
            self.directory = Path(self._tmp)

    # -- the slots of a block: every tensor it owns, by a stable name --------------------------

    def _slots(self, b: int):
        """(name, get, set) for each tensor of block b: weights, optimizer state, extras."""
        opt = self.optimizers[b]
        for i, p in enumerate(self.blocks[b]):
            yield f"p{i}", (lambda p=p: p.data), (lambda t, p=p: setattr(p, "data", t))
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.ndim > 0:  # AdamW's step counter stays a CPU scalar
                    yield f"p{i}.{key}", (lambda s=opt.state[p], k=key: s[k]), \
                        (lambda t, s=opt.state[p], k=key: s.__setitem__(k, t))
        table, names = self.extra[b]
        for name in names:
            yield f"x.{name}", (lambda n=name: table[n]), (lambda t, n=name: table.__setitem__(n, t))

    def _offload_copy(self, b: int, slot: str, t: torch.Tensor) -> torch.Tensor:
        """The off-device home of one tensor (created once, then reused), holding t's values."""
        home = self._store.get((b, slot))
        if home is None or home.shape != t.shape or home.dtype != t.dtype:
            if self.device.type == "cpu":
                path = self.directory / f"block{b}.{slot}.bin"
                home = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
            else:
                home = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            self._store[(b, slot)] = home
            self._homes.add(home.untyped_storage().data_ptr())
        home.copy_(t)
        return home

    # -- moving blocks -----------------------------------------------------------------------

    def evict(self, b: int):
        for slot, get, put in self._slots(b):
            t = get()
            if not self.is_offloaded(t):
                put(self._offload_copy(b, slot, t))

    def load(self, b: int):
        for _, get, put in self._slots(b):
            t = get()
            if self.is_offloaded(t) or t.device != self.device:
                put(t.to(self.device, copy=True))

    def is_offloaded(self, t: torch.Tensor) -> bool:
        """True when t is one of this manager's off-device copies."""
        return t.untyped_storage().data_ptr() in self._homes

    def start(self):
        """Place everything according to the policy (after the model and its state are loaded)."""
        for p in self.shared:
            p.data = p.data.to(self.device)
        for b in self.blocks:
            if self.policy == "all":
                self.load(b)
            else:
                self.evict(b)
        self.active = None

    def activate(self, b: int):
        """Make block b resident (and, under `active`, the previously active block not)."""
        if self.policy == "all" or self.active == b:
            return
        t0 = time.perf_counter()
        if self.active is not None:
            self.evict(self.active)
        self.load(b)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.active = b
        self.swaps += 1
        self.swap_seconds += time.perf_counter() - t0

    @contextlib.contextmanager
    def all_resident(self):
        """Every block usable for computation (evaluation, sampling). Off-device copies on a CPU are
        memory-mapped CPU tensors and usable as they are; on a GPU the blocks are brought in and sent back."""
        if self.policy == "all" or self.device.type == "cpu":
            yield
            return
        previous = self.active
        for b in self.blocks:
            self.load(b)
        try:
            yield
        finally:
            for b in self.blocks:
                if b != previous:
                    self.evict(b)

    def extra_names(self) -> set[str]:
        """The names of the extra tensors (e.g. EMA averages) that move with their blocks."""
        return {n for _, names in self.extra.values() for n in names}

    def offloaded_storages(self) -> set[int]:
        return set(self._homes)

    def offloaded_bytes(self) -> int:
        """Bytes currently held off the device."""
        live = set()
        for b in self.blocks:
            for _, get, _ in self._slots(b):
                t = get()
                if self.is_offloaded(t):
                    live.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return sum(n for _, n in live)

    def close(self):
        """Delete the offload files. Tensors mapped from them stay readable until dropped (POSIX)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
