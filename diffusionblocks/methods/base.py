"""What every training method shares: the contract a model offers them, the Method interface, one update
helper (backward, skip a non-finite step, clip, optimizer step, free gradients), AdamW with its schedule,
the EMA of the weights, and the seeds of per-block random streams.

A method decides which graph is built and which parameters get gradients; the loop (train.py) feeds it
prepared batches and never asks which method it is.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..blocks import BlockStack
from ..config import RunConfig
from ..noise import Partition

# -- the model's side of the contract -------------------------------------------------------------


@runtime_checkable
class EndToEndModel(Protocol):
    """A model trained by backprop through all of it."""

    num_layers: int  # layer applications of one training step (the layer-update budget's unit)

    def loss(self, *batch: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (N,) of a prepared batch."""


@runtime_checkable
class BlockModel(Protocol):
    """A model made of B blocks, each trainable alone (DiffusionBlocks and other block-wise methods).

    Parameters come in two kinds: a block's own (`block_parameters(b)`: only steps on block b train them;
    no parameter belongs to two blocks) and shared ones (`shared_parameters()`: every block's steps train
    them: a shared stem/head, or the tied core of a recurrent-depth model, whose blocks then own few or no
    parameters of their own). `block_modules(b)` are the modules that hold block b's own parameters (a
    per-block job leaves the other blocks' modules unmaterialised). `block_layers(b)` counts the layer
    applications of one step on block b, tied or not: the unit of the layer-update budget. `partition` is
    the noise partition (noise.Partition) the blocks own; per-block jobs record it for `merge`. A model built on a
    BlockStack gets all of it but `block_loss` from blocks.StackModel.
    """

    num_blocks: int
    partition: Partition

    def block_parameters(self, block: int) -> list[nn.Parameter]: ...

    def block_modules(self, block: int) -> list[nn.Module]: ...

    def shared_parameters(self) -> list[nn.Parameter]: ...

    def block_layers(self, block: int) -> int: ...

    def block_loss(self, block: int, *batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample loss (N,) of `block` alone; no other block runs."""


# -- the method interface ----------------------------------------------------------------------------


class Method:
    """One training method. Subclasses set `name`, implement `budget`, `__init__`, `next_block`, `step`,
    `optimizers`, `state_dict` and `load_state_dict`, and may override the defaults below.

    The loop draws batches from one data stream per unit the method trains (`stream_seeds`: a block, or 0
    for the whole network), asks `next_block()` which unit to feed, and calls `step(batch, block)`, which
    returns {"loss", "grad_norm", "lr", "layers", "trained"} or {"skipped": True, "loss", "layers": 0}.
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""  # the name people know it by (plots, tables); "" = name
    model_form: ClassVar[str]  # the form of the task's model it trains: "end-to-end" or "blocks"
    num_blocks: int = 1  # units the model is cut into (1: the whole network)
    owned: list[int] = [0]  # the units this run trains
    partial: bool = False  # a per-block job: trains some blocks only, cannot evaluate the whole model
    residency = None  # a residency.Residency when idle parts live off the device
    unowned_names: set[str] = frozenset()  # state-dict entries this run does not hold (other jobs' blocks)
    warn_starved: bool = False  # report units that got no update in a logging window
    # a method that brings its own image classifier (the block-wise baselines: model_form names it) sets its class
    # here; tasks that classify images build it with image_size, channels, num_classes and the config sections its
    # constructor's parameters name (config.construct)
    classifier: ClassVar[type[nn.Module] | None] = None
    # how the memory planner (plan.py) counts a training step: "whole" (the whole network: every parameter, its
    # gradient and optimizer state, every layer's activations) or "blockwise" (one block of a BlockModel at a time: its
    # parameters and the shared ones trained, its layers' activations; the idle blocks' weights and optimizer state on
    # the device, or off it under residency=active); None: the planner cannot plan this method
    plan: ClassVar[str | None] = None

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Raise ValueError when the config asks for something this method cannot do. By default: a per-block job
        (train.blocks), which only a method whose blocks train apart can run."""
        if cfg.train.blocks.strip():
            raise ValueError(f"train.blocks (--blocks) makes a per-block job, which needs --method dblocks "
                             f"(train.method={cls.name} trains the whole network in one run)")

    @classmethod
    def check_independent(cls, cfg: RunConfig, why: str) -> None:
        """Raise ValueError unless this method can train blocks apart (per-block jobs, torchrun ranks)."""
        raise ValueError(f"{why} trains blocks apart: it needs a block-wise method (train.method=dblocks), not "
                         f"train.method={cls.name}")

    @classmethod
    def budget(cls, cfg: RunConfig) -> tuple[int, str]:
        """Training steps of this run for cfg.train's budget, and a sentence saying which rule gave them. By default
        a step updates every layer once: the end-to-end steps."""
        t = cfg.train
        return t.steps, f"{t.steps} steps, each updating all {cfg.model.depth} layers once ({t.budget} budget)"

    def stream_seeds(self) -> dict[int, int]:
        """Seed of the data stream of each unit this run trains."""
        raise NotImplementedError

    def probe_loss(self, batch) -> torch.Tensor:
        """The scalar loss of one training step on the largest unit (for counting saved activations)."""
        raise NotImplementedError

    def next_block(self) -> int:
        raise NotImplementedError

    def step(self, batch, block: int) -> dict[str, Any]:
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


# -- optimisation ------------------------------------------------------------------------------------


def lr_factor(update: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warmup over a fraction of the updates, then cosine decay to min_ratio."""
    n_warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if update < n_warm:
        return (update + 1) / n_warm
    progress = min(1.0, (update - n_warm) / max(1, total - n_warm))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# train.precision -> the dtype a step's forward and loss are autocast to (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a step's forward and loss run in: autocast to train.precision's dtype on `device` (nothing for
    fp32). Weights, gradients, optimizer state and the EMA stay float32; `update` leaves autocast for backward."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def loss_scaler(cfg: RunConfig) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for train.precision=fp16 (float16 gradients underflow without one), else None."""
    if cfg.train.precision != "fp16":
        return None
    device = cfg.train.device.split(":")[0]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.amp.GradScaler(device)


class Optimizer:
    """AdamW over some parameters with its own warmup + cosine schedule counted in its own updates.
    Weight decay applies to every parameter of two or more dimensions: weight matrices, convolution kernels,
    and the learned positions and CLS/label tokens (shaped (1, T, D)); not to biases and norm scales.
    Under train.precision=fp16 it has its own loss scaler (`scaler`), saved with its state."""

    def __init__(self, params: list[nn.Parameter], cfg: RunConfig, total_updates: int):
        t = cfg.train
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, t.beta2))
        self.params, self.cfg, self.total, self.updates = params, t, max(1, total_updates), 0
        self.scaler = loss_scaler(cfg)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> float:
        """One AdamW step (through `scaler`, whose gradients were unscaled, when the loss was scaled)."""
        lr = self.cfg.lr * lr_factor(self.updates, self.total, self.cfg.warmup, self.cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if scaler is None:
            self.opt.step()
        else:
            scaler.step(self.opt)
        self.updates += 1
        return lr

    def state_dict(self) -> dict:
        state = {"opt": self.opt.state_dict(), "updates": self.updates}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict):
        self.opt.load_state_dict(state["opt"])
        self.updates = state["updates"]
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def update(loss: torch.Tensor, params: list[nn.Parameter], optimizers: list[Optimizer], clip: float,
           sync=None, scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """One update of `params` from a scalar `loss`: fresh gradients, (averaged over a data-parallel group
    by `sync(params)`), clipped to norm `clip` (0: not clipped), one step of each optimizer, gradients freed.

    A non-finite loss or gradient norm skips the step: the gradients are cleared and the weights stay as
    they were. Returns {"loss", "grad_norm", "lr"} or {"skipped": True, "loss"}. With `sync`, every member
    of the group sees the same gradients and takes (or skips) the same step.

    Under fp16 the loss is scaled by `scaler` (default: the first optimizer's), the gradients unscaled before
    clipping, and the scaler updated; an overflow is a skipped step like any non-finite gradient. Clipping and
    the optimizer steps run outside autocast."""
    if not 0 <= clip < math.inf:  # only 0 turns clipping off; a negative or NaN clip is a mistake, not "off"
        raise ValueError(f"train.clip={clip}: must be a finite number >= 0 (0 = off)")
    scaler = (scaler or getattr(optimizers[0], "scaler", None)) if optimizers else None  # a custom stepper: none
    free_grads(params)
    if sync is None and not torch.isfinite(loss):
        return {"skipped": True, "loss": loss.item()}
    (loss if scaler is None else scaler.scale(loss)).backward()  # in the forward's autocast state: the layers'
    # own autograd Functions recompute in it
    if sync is not None:
        sync(params)
    device = loss.device.type
    with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext():
        if scaler is not None:
            for opt in optimizers:
                scaler.unscale_(opt.opt)
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
                else torch.zeros(())
        if not torch.isfinite(norm):
            if scaler is not None:
                scaler.update()  # the overflow backs the scale off
            free_grads(params)
            return {"skipped": True, "loss": loss.item()}
        lrs = [opt.step() if scaler is None else opt.step(scaler) for opt in optimizers]  # a custom stepper: step()
        if scaler is not None:
            scaler.update()
    free_grads(params)  # a block's gradients must not stay resident while others train
    return {"loss": loss.item(), "grad_norm": norm.item(), "lr": lrs[0] if lrs else None}


def layer_by_layer(units: list[list[nn.Parameter]], opts: list[Optimizer], h: torch.Tensor, layer_loss,
                   clip: float, handoff=lambda out: out) -> tuple[dict[str, Any], torch.Tensor]:
    """One update per layer in order (the local baselines), each on its own loss: layer_loss(i, h) -> (per-sample
    loss, output); the next layer's input is handoff(output.detach()), so no gradient crosses a layer. A non-finite
    layer ends the step: the earlier layers were updated and count. Returns (the step's record, the last input)."""
    losses, norms, lr = [], [], None
    for i, (params, opt) in enumerate(zip(units, opts)):
        loss, out = layer_loss(i, h)
        m = update(loss.mean(), params, [opt], clip)
        if m.get("skipped"):
            return {"skipped": True, "loss": m["loss"], "layers": i}, h
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        lr = m["lr"]
        h = handoff(out.detach())
    return {"loss": sum(losses) / len(losses), "grad_norm": max(norms), "lr": lr, "layer_losses": losses}, h


def compile_layers(model: nn.Module) -> int:
    """torch.compile, in place, each layer a step runs: every element of a module list that holds no module list
    itself (a stack's layers, not the blocks that group them). Parameters and state-dict names are unchanged; the
    compile happens at a layer's first call. Returns how many modules were compiled."""
    layers = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst
              if not any(isinstance(sub, nn.ModuleList) for sub in m.modules())]
    if not layers:
        raise ValueError(f"train.compile: {type(model).__name__} has no list of layers to compile")
    for layer in layers:
        layer.compile()
    return len(layers)


def compile_step(model: nn.Module) -> str:
    """torch.compile, in place, what a training step runs: each block's network of a block stack (stem, layers,
    head; the noise and label draws around it stay eager), else an end-to-end model's loss, else its layers
    (compile_layers). Parameters and state-dict names are unchanged. Returns what was compiled."""
    stacks = [m for m in model.modules() if isinstance(m, BlockStack)]
    for stack in stacks:
        stack.compile_net()
    if stacks:
        return f"the network of each block ({len(stacks)} stack)"
    if callable(getattr(model, "loss", None)):
        model.loss = torch.compile(model.loss)
        return "the loss"
    return f"{compile_layers(model)} layers"


def compile_error(error: Exception) -> RuntimeError:
    """The one-line error of a torch.compile failure (train.compile)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RuntimeError(f"train.compile: torch.compile could not compile this model's layers ({first}); "
                        f"train without it (train.compile=false)")


def free_grads(params: list[nn.Parameter]):
    for p in params:
        p.grad = None


class EMA:
    """Exponential moving average of parameters, updated for the parameters a step trained."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, trained: set[int]):
        for name, p in model.named_parameters():
            if id(p) in trained:
                self.shadow[name].lerp_(p, 1 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module):
        """Exchange the model's weights with the averages (call twice to undo)."""
        for name, p in model.named_parameters():
            tmp = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name] = tmp


def stream_seed(seed: int, block: int | None = None) -> int:
    """Seed of one block's streams (data order, augmentation, noise): a function of (seed, block) only.
    End-to-end training (block None) has one stream seeded by `seed`."""
    return seed if block is None else (seed * 1_000_003 + 7_919 * (block + 1)) % 2**62

