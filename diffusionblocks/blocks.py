"""The block wrapper: one stack of residual layers cut into B independently trainable denoisers (Sec. 3).

Block b is the denoiser D_b(z, level, cond) = precond(F_b), with

    F_b(z_in, c_noise, cond) = head(layers_b(stem(z_in, c_noise, cond)))

where layers_b are the block's contiguous slice of the stack. The interfaces are small:

    stem(z_in, c_noise, cond) -> (h, c)   # state h (N, ..., D) and conditioning vector c (N, Dc)
    layer(h, c) -> h                      # e.g. nn.py's TransformerLayer; torch's and HF's layers: adapters.py
    head(h, c) -> out                     # shaped like z (for EDM) or whatever the task reads out

No gradient crosses a block boundary: a block's input is built from the data alone (the clean target
plus noise of its own level), never from another block's output. The stem and head are either shared
by all blocks (one copy, trained by every block) or replicated per block (fully independent blocks).
Calling the stack with a level routes each sample to the block that owns it, so a sampler sees a plain
denoiser whatever the number of blocks. The stack says which parameters each block owns (the BlockModel contract,
methods/base.py); a model built on it gets the contract, with its readout, from StackModel. A layer that does not fit
layer(h, c) -> h is refused, naming what to wrap it in (diffusionblocks.adapters), when the stack is built
(check_layer) or else on its block's first call (probe_layers).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from .nn import run_layers
from .noise import Partition
from .precond import EDMPrecond, PlainPrecond


def cut(layers: Sequence, allocation: Sequence[int]) -> list[list]:
    """The layers in consecutive runs of the allocation's lengths (block b's layers), in order."""
    starts = [sum(allocation[:b]) for b in range(len(allocation))]
    return [list(layers[s:s + n]) for s, n in zip(starts, allocation)]


def split_layers(num_layers: int, num_blocks: int, allocation: Sequence[int] | None = None) -> list[int]:
    """Layers per block. Without an explicit allocation the layers must divide evenly."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
    if num_blocks > num_layers:
        raise ValueError(f"num_blocks={num_blocks} is more than the {num_layers} layers: "
                         f"every block needs at least one layer")
    if allocation is None:
        if num_layers % num_blocks:
            base, extra = divmod(num_layers, num_blocks)
            hint = [base + 1] * extra + [base] * (num_blocks - extra)
            raise ValueError(f"{num_layers} layers do not split evenly into {num_blocks} blocks; pass an "
                             f"explicit allocation that sums to {num_layers}, e.g. {hint}")
        return [num_layers // num_blocks] * num_blocks
    allocation = list(allocation)
    if len(allocation) != num_blocks:
        raise ValueError(f"allocation {allocation} has {len(allocation)} entries, expected one per block "
                         f"({num_blocks})")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in allocation):
        raise ValueError(f"allocation {allocation} must hold integers >= 1 (every block needs a layer)")
    if sum(allocation) != num_layers:
        raise ValueError(f"allocation {allocation} sums to {sum(allocation)}, but there are {num_layers} "
                         f"layers: an allocation may neither drop nor duplicate layers")
    return allocation


class Block(nn.Module):
    """One block's own modules: its layers, and its stem/head when they are replicated."""

    def __init__(self, layers: Sequence[nn.Module], stem: nn.Module | None = None, head: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if stem is not None:
            self.stem, self.head = stem, head


class BlockStack(nn.Module):
    """B noise-conditioned denoisers over a partition of the noise levels; block 0 is the noisiest."""

    def __init__(self, layers: Sequence[nn.Module], stem: nn.Module, head: nn.Module, partition: Partition, *,
                 allocation: Sequence[int] | None = None, shared_stem_head: bool = True,
                 precond: EDMPrecond | PlainPrecond | None = None, checkpoint_every: int = 0):
        super().__init__()
        self.checkpoint_every = checkpoint_every  # activation checkpointing inside a block (0 = off)
        layers = list(layers)
        self.partition = partition
        self.precond = precond if precond is not None else EDMPrecond()
        self.shared_stem_head = shared_stem_head
        for i, layer in enumerate(layers):
            check_layer(layer, i)
        self._checked: set[int] = set()  # blocks whose first call went through (probe_layers)
        self._fast = self._net  # F_block after the first call: eager, or compiled (compile_net)
        self.allocation = split_layers(len(layers), partition.num_blocks, allocation)
        if shared_stem_head:
            self.stem, self.head = stem, head
            self.blocks = nn.ModuleList(Block(own) for own in cut(layers, self.allocation))
        else:  # block b gets its own copy (same initial weights as the given stem/head)
            self.blocks = nn.ModuleList(Block(own, copy.deepcopy(stem), copy.deepcopy(head))
                                        for own in cut(layers, self.allocation))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def layer_range(self, block: int) -> range:
        """Indices, in the original stack, of the layers that block `block` holds."""
        self.partition._check_block(block)
        start = sum(self.allocation[:block])
        return range(start, start + self.allocation[block])

    def stem_head(self, block: int) -> tuple[nn.Module, nn.Module]:
        blk = self.blocks[self.partition._check_block(block)]
        return (self.stem, self.head) if self.shared_stem_head else (blk.stem, blk.head)

    # -- the BlockModel contract (methods/base.py): what each block's optimizer owns ----------------

    @property
    def num_layers(self) -> int:
        """Layers of one pass through every block (the end-to-end step's layer-updates)."""
        return sum(self.allocation)

    def block_layers(self, block: int) -> int:
        return self.allocation[block]

    def block_modules(self, block: int) -> list[nn.Module]:
        """The modules only `block` uses: its layers, and its stem/head when they are replicated."""
        return [self.blocks[self.partition._check_block(block)]]

    def shared_modules(self) -> list[nn.Module]:
        """The modules every block uses: the shared stem/head (none when they are replicated)."""
        return [self.stem, self.head] if self.shared_stem_head else []

    def block_parameters(self, block: int) -> list[nn.Parameter]:
        """Parameters that only a training step on `block` updates."""
        return parameters_of(self.block_modules(block))

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that every block's training step updates."""
        return parameters_of(self.shared_modules())

    # -- the denoiser ------------------------------------------------------------------------

    def net(self, block: int, z_in: torch.Tensor, c_noise: torch.Tensor, cond=None):
        """F_block: the inner network of block `block` (before preconditioning)."""
        if block in self._checked:
            return self._fast(block, z_in, c_noise, cond)
        stem, head = self.stem_head(block)
        return self._first_call(block, stem, head, z_in, c_noise, cond)

    def _net(self, block: int, z_in: torch.Tensor, c_noise: torch.Tensor, cond=None):
        """F_block once the contract is checked: stem, the block's layers, head (what compile_net compiles)."""
        stem, head = self.stem_head(block)
        h, c = stem(z_in, c_noise, cond)
        return head(run_layers(self.blocks[block].layers, h, c, self.checkpoint_every), c)

    def compile_net(self) -> None:
        """torch.compile F_block (one graph per block), in place; parameters and state-dict names are unchanged."""
        self._fast = torch.compile(self._net)

    def _first_call(self, block: int, stem: nn.Module, head: nn.Module, z_in, c_noise, cond):
        """net's first call on `block`: the stem, layers and head checked against the contract as they run."""
        stem_out = stem(z_in, c_noise, cond)
        if not (isinstance(stem_out, (tuple, list)) and len(stem_out) == 2 and isinstance(stem_out[0], torch.Tensor)):
            raise ValueError(f"the stem ({type(stem).__name__}) returned {_describe(stem_out)}: the stem is called as "
                             "stem(z_in, c_noise, cond) and returns (h, c), the state and the conditioning vector "
                             "the layers receive (c carries the noise level: e.g. models.NoiseEmbedding of c_noise)")
        h, c = stem_out
        layers = self.blocks[block].layers
        try:  # the first call: a failure is traced to the layer that does not fit, at no cost when none fails
            out = run_layers(layers, h, c, self.checkpoint_every)
        except Exception:
            probe_layers(layers, self.layer_range(block).start, h, c)
            raise  # every layer fits: the error is not the contract's
        if not isinstance(out, torch.Tensor) or out.shape != h.shape:
            probe_layers(layers, self.layer_range(block).start, h, c)
            raise ValueError(f"block {block}'s layers returned {_describe(out)} for h {tuple(h.shape)}: {_CONTRACT}")
        out = head(out, c)
        if isinstance(self.precond, EDMPrecond) and not (isinstance(out, torch.Tensor) and out.shape == z_in.shape):
            raise ValueError(f"the head ({type(head).__name__}) returned {_describe(out)} for a noisy input "
                             f"{tuple(z_in.shape)}: under EDM the head is called as head(h, c) and returns F shaped "
                             "like the noisy input z (the denoiser is c_skip z + c_out F)")
        self._checked.add(block)
        return out

    def denoise(self, block: int, z: torch.Tensor, level: torch.Tensor, cond=None) -> torch.Tensor:
        """D_block(z, level, cond): run one block only (training, and routing below)."""
        self.partition._check_block(block)
        return self.precond.denoise(lambda z_in, c_noise, c: self.net(block, z_in, c_noise, c), z, level, cond)

    def forward(self, z: torch.Tensor, level: torch.Tensor, cond=None) -> torch.Tensor:
        """D(z, level, cond) with each sample routed to the block that owns its level."""
        level = torch.as_tensor(level, device=z.device)
        if level.ndim == 0:
            level = level.expand(z.shape[0])
        owner = self.partition.route(level)
        first = int(owner[0])
        if bool((owner == first).all()):  # the usual case in a sampler: one block for the whole batch
            return self.denoise(first, z, level, cond)
        out = None
        for block in owner.unique().tolist():
            idx = (owner == block).nonzero().flatten()
            part = self.denoise(block, z[idx], level[idx], _take(cond, idx))
            if out is None:
                out = part.new_empty((z.shape[0], *part.shape[1:]))
            out[idx] = part
        return out

    def noisy_input(self, block: int, y: torch.Tensor, generator: torch.Generator | None = None):
        """A training input for `block`: levels sampled in its (widened) interval and z = y + sigma eps.

        Returns (z, sigma) with sigma (N,) in y's dtype. Only for Gaussian (EDM) levels."""
        if not isinstance(self.precond, EDMPrecond):
            raise TypeError("noisy_input adds Gaussian noise; masked levels corrupt their input in the task")
        sigma = self.partition.sample(block, y.shape[0], generator, device=y.device).to(y.dtype)
        return self.precond.noise(y, sigma, generator), sigma


_CONTRACT = "every layer is a module called as layer(h, c) that returns the new state, shaped like h"


def _adapter_for(layer) -> str:
    """What to wrap a layer in (diffusionblocks.adapters), by what it is."""
    name = type(layer).__name__
    if isinstance(layer, nn.TransformerEncoderLayer):
        return "wrap it as diffusionblocks.adapters.TorchEncoderLayer(layer) (causal=True for autoregression)"
    if isinstance(layer, nn.TransformerDecoderLayer):
        return ("an nn.TransformerDecoderLayer needs a memory to cross-attend to; for causal self-attention use an "
                "nn.TransformerEncoderLayer wrapped as diffusionblocks.adapters.TorchEncoderLayer(layer, causal=True)")
    if type(layer).__module__.startswith("transformers."):
        kind = "decoder" if "Decoder" in name or name.endswith("Block") else "encoder"
        return f"wrap it as diffusionblocks.adapters.HFLayer(layer, kind={kind!r})"
    if type(layer).__module__.startswith("diffusionblocks."):  # one of ours, adapters included: built for other sizes?
        return "check that it was built for the widths of the stem's h and c (dim, cond_dim)"
    return ("wrap a function or module f(h) that returns an update as diffusionblocks.adapters.Residual(f, dim), "
            "which computes h + f(h) conditioned on c")


def check_layer(layer, index: int) -> None:
    """Before any call: layer `index` is a module that can be called as layer(h, c); the layers known not to fit
    (torch's and Hugging Face's transformer layers, which take an attention mask second) are named with their
    adapter."""
    where = f"layer {index} ({type(layer).__name__})"
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{where} is not an nn.Module: {_CONTRACT}; {_adapter_for(layer)}")
    known = type(layer).forward in (nn.TransformerEncoderLayer.forward, nn.TransformerDecoderLayer.forward)
    if known or type(layer).__module__.startswith("transformers."):
        raise ValueError(f"{where} does not take (h, c): {_CONTRACT}; {_adapter_for(layer)}")
    try:
        inspect.signature(layer.forward).bind(None, None)
    except TypeError:
        raise ValueError(f"{where} cannot be called as layer(h, c): {_CONTRACT}; {_adapter_for(layer)}") from None
    except ValueError:  # no signature to read: the first call tells
        pass


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of ({', '.join(_describe(v) for v in x)})"
    return "None" if x is None else f"a {type(x).__name__}"


@torch.no_grad()
def probe_layers(layers: Sequence[nn.Module], first: int, h: torch.Tensor, c) -> None:
    """Run the layers one at a time on (h, c) and raise a ValueError naming the first that fails or does not return
    a state shaped like h (`first` is the index of layers[0] in the stack); return if every layer fits."""
    shape = tuple(h.shape)
    for i, layer in enumerate(layers, first):
        where = f"layer {i} ({type(layer).__name__})"
        try:
            out = layer(h, c)
        except Exception as error:
            raise ValueError(f"{where} failed when called as layer(h, c) with h {_describe(h)} and c {_describe(c)} "
                             f"({type(error).__name__}: {error}): {_CONTRACT}; {_adapter_for(layer)}") from error
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
            raise ValueError(f"{where} returned {_describe(out)} for h {shape}: {_CONTRACT}; {_adapter_for(layer)}")
        h = out


def parameters_of(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The parameters of some modules in order, a tied one once."""
    return list(dict.fromkeys(p for m in modules for p in m.parameters()))


class StackModel:
    """The BlockModel contract (methods/base.py) of a model built on a BlockStack `self.stack` over `self.partition`,
    with an optional readout after the stack: `readout`, shared by every block, or `readouts[b]`, block b's own
    (add_readout). What else every block trains (a learned label table) a model names in `extra_shared`."""

    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks  # known before the stack is built

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers

    def block_layers(self, block: int) -> int:
        return self.stack.block_layers(block)

    def add_readout(self, make) -> None:
        """The readout, made after the stack (`make()` draws its weights): one shared, or one per block when the
        stem/head are replicated."""
        if self.stack.shared_stem_head:
            self.readout = make()
        else:
            self.readouts = nn.ModuleList(make() for _ in range(self.num_blocks))

    def readout_of(self, block: int) -> nn.Module:
        readouts = getattr(self, "readouts", None)
        return self.readout if readouts is None else readouts[block]

    def block_modules(self, block: int) -> list[nn.Module]:
        readouts = getattr(self, "readouts", None)
        return self.stack.block_modules(block) + ([] if readouts is None else [readouts[block]])

    def block_parameters(self, block: int) -> list[nn.Parameter]:
        return parameters_of(self.block_modules(block))

    def extra_shared(self) -> list[nn.Parameter]:
        """The model's own parameters besides the stack's and the readout's that every block trains."""
        return []

    def shared_parameters(self) -> list[nn.Parameter]:
        readout = getattr(self, "readout", None)
        shared = self.stack.shared_modules() + ([] if readout is None else [readout])
        return parameters_of(shared) + self.extra_shared()


def _take(cond, idx: torch.Tensor):
    """Rows `idx` of a condition: None, a tensor, or a dict/list/tuple of them."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[idx]
    if isinstance(cond, dict):
        return {k: _take(v, idx) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_take(v, idx) for v in cond)
    raise TypeError(f"cannot split a condition of type {type(cond).__name__} by sample")
