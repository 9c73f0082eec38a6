"""The one training loop. End-to-end and DiffusionBlocks differ only in their step; data, schedules,
budget, logging, evaluation and checkpoints are shared, so comparisons are fair by construction."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from . import io
from .config import RunConfig, save_config, validate
from .data import Batches, ImageDataset, augment, iterate_eval, load_dataset, to_float
from .memory import saved_activation_bytes
from .residency import Residency
from .tasks.classify import build_classifier

CONFIG, WEIGHTS, EMA_WEIGHTS, STATE = "config.json", "model.safetensors", "ema.safetensors", "state.pt"
METRICS, RESULTS = "metrics.jsonl", "results.json"


# -- optimisation ------------------------------------------------------------------------------


def lr_factor(update: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warmup over a fraction of the updates, then cosine decay to min_ratio."""
    n_warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if update < n_warm:
        return (update + 1) / n_warm
    progress = min(1.0, (update - n_warm) / max(1, total - n_warm))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Optimizer:
    """AdamW over some parameters with its own warmup + cosine schedule counted in its own updates.
    Weight decay applies to matrices only (not to biases, norms, positions)."""

    def __init__(self, params: list[nn.Parameter], cfg: RunConfig, total_updates: int):
        t = cfg.train
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.99))
        self.params, self.cfg, self.total, self.updates = params, t, max(1, total_updates), 0

    def step(self) -> float:
        lr = self.cfg.lr * lr_factor(self.updates, self.total, self.cfg.warmup, self.cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.updates += 1
        return lr

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict):
        self.opt.load_state_dict(state["opt"])
        self.updates = state["updates"]


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


# -- the methods: each owns its optimizers and defines one step -----------------------------------


class EndToEnd:
    """Plain backprop through the whole network."""

    name = "e2e"

    def __init__(self, model, cfg: RunConfig, total_steps: int, **_):
        self.model, self.cfg = model, cfg
        self.params = list(model.parameters())
        self.trained = {id(p) for p in self.params}
        self.opt = Optimizer(self.params, cfg, total_steps)
        self.layers = cfg.model.depth

    def next_block(self) -> int:
        return 0

    def step(self, x, y, block: int | None = None) -> dict:
        loss = self.model.loss(x, y).mean()
        norm = _backward(loss, self.params, self.cfg.train.clip)
        if norm is None:
            return {"skipped": True, "loss": loss.item(), "layers": 0}
        lr = self.opt.step()
        _free_grads(self.params)
        return {"loss": loss.item(), "grad_norm": norm.item(), "lr": lr, "layers": self.layers,
                "trained": self.trained}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt.opt]

    def state_dict(self):
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])


class DBlocks:
    """One block per step: sample its noise levels, run only it, update only it (and the shared parts).

    Which block: "random" (the paper), "round-robin", or "sequential" (block 0 for its whole share of
    the steps, then block 1, ...). Under "sequential" a shared stem/head is trained during block 0's
    phase only and frozen afterwards: were it trained on, the later blocks would move the stem/head under
    the earlier ones, which never see it again. With a replicated stem/head (dblocks.shared_stem_head=
    false) the blocks are independent: each has its own optimizer and its own noise stream (and, in the
    loop, its own data order), so round-robin, sequential, per-block jobs and parallel ranks all train
    exactly the same weights (jobs.py).

    `blocks` limits the run to some blocks (a per-block job): the others are not materialised at all
    (their parameters stay on the "meta" device). Where the owned blocks live is the residency policy
    (residency.py): "all" on the device, or only the "active" one.
    """

    name = "dblocks"

    def __init__(self, model, cfg: RunConfig, total_steps: int, *, device: torch.device | str = "cpu",
                 offload_dir: str | os.PathLike | None = None, ema: EMA | None = None,
                 blocks: list[int] | None = None, data_parallel=None):
        self.model, self.cfg, self.total = model, cfg, total_steps
        self.sync = data_parallel.sync if data_parallel is not None else None
        B = model.num_blocks
        self.owned = list(range(B)) if blocks is None else list(blocks)
        self.share = total_steps // len(self.owned)  # steps per block
        self.sequential = cfg.dblocks.block_choice == "sequential"
        self.shared_params = model.shared_parameters()
        all_blocks = {b: model.block_parameters(b) for b in range(B)}
        covered = {id(p) for params in [*all_blocks.values(), self.shared_params] for p in params}
        missing = [n for n, p in model.named_parameters() if id(p) not in covered]
        if missing:
            raise RuntimeError(f"parameters owned by no block and not shared: {missing[:5]}")
        names = {id(p): n for n, p in model.named_parameters()}
        self.unowned_names = {names[id(p)] for b in range(B) if b not in self.owned for p in all_blocks[b]}
        for b in range(B):
            if b not in self.owned:  # not trained here: shapes only, no memory
                for module in model.block_modules(b):
                    module.to("meta")
        self.block_params = {b: all_blocks[b] for b in self.owned}
        self.trained = {b: {id(p) for p in params + self.shared_params} for b, params in self.block_params.items()}
        self.opts = {b: Optimizer(p, cfg, self.share) for b, p in self.block_params.items()}
        self.shared_opt = (Optimizer(self.shared_params, cfg, self.share if self.sequential else total_steps)
                           if self.shared_params else None)
        self.choice = torch.Generator().manual_seed(cfg.train.seed * 7919 + 17)
        # a data-parallel member draws its own noise for its shard of the batch
        member = data_parallel.index if data_parallel is not None else 0
        self.noise = {b: torch.Generator().manual_seed(stream_seed(cfg.train.seed, b) + 2 + 1_000 * member)
                      for b in self.owned}
        self.next_index = 0  # for round-robin
        self.steps_done = 0  # for sequential
        extra = {b: (ema.shadow, [names[id(p)] for p in params]) if ema is not None else ({}, [])
                 for b, params in self.block_params.items()}
        self.residency = Residency(cfg.dblocks.residency, device, self.block_params,
                                   {b: o.opt for b, o in self.opts.items()}, self.shared_params, extra=extra,
                                   directory=offload_dir)

    def next_block(self) -> int:
        n = len(self.owned)
        if self.sequential:
            return self.owned[min(n - 1, self.steps_done * n // self.total)]
        if self.cfg.dblocks.block_choice == "round-robin":
            return self.owned[self.next_index % n]
        return self.owned[int(torch.randint(n, (1,), generator=self.choice))]

    def step(self, x, y, block: int | None = None) -> dict:
        block = self.next_block() if block is None else block
        self.steps_done += 1
        self.next_index += 1
        self.residency.activate(block)
        train_shared = bool(self.shared_params) and (not self.sequential or block == self.owned[0])
        for p in self.shared_params:
            p.requires_grad_(train_shared)
        params = self.block_params[block] + (self.shared_params if train_shared else [])
        loss = self.model.block_loss(block, x, y, self.noise[block]).mean()
        norm = _backward(loss, params, self.cfg.train.clip, self.sync)
        if norm is None:
            return {"skipped": True, "block": block, "loss": loss.item(), "layers": 0}
        lr = self.opts[block].step()
        if train_shared:
            self.shared_opt.step()
        _free_grads(params)
        return {"loss": loss.item(), "grad_norm": norm.item(), "lr": lr, "block": block,
                "layers": self.model.stack.allocation[block], "trained": self.trained[block]}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.opt for o in self.opts.values()] + ([self.shared_opt.opt] if self.shared_opt else [])

    def state_dict(self):
        return {"opts": {b: o.state_dict() for b, o in self.opts.items()},
                "shared_opt": self.shared_opt.state_dict() if self.shared_opt else None,
                "choice": self.choice.get_state(), "noise": {b: g.get_state() for b, g in self.noise.items()},
                "next_index": self.next_index, "steps_done": self.steps_done}

    def load_state_dict(self, state):
        for b, o in self.opts.items():
            o.load_state_dict(state["opts"][b])
        if self.shared_opt is not None:
            self.shared_opt.load_state_dict(state["shared_opt"])
        self.choice.set_state(state["choice"])
        for b, g in self.noise.items():
            g.set_state(state["noise"][b])
        self.next_index, self.steps_done = state["next_index"], state["steps_done"]


def stream_seed(seed: int, block: int | None = None) -> int:
    """Seed of one block's streams (data order, augmentation, noise): a function of (seed, block) only.
    End-to-end training (block None) has one stream seeded by `seed`."""
    return seed if block is None else (seed * 1_000_003 + 7_919 * (block + 1)) % 2**62


class Stream:
    """One block's data order and augmentation randomness (resumable)."""

    def __init__(self, ds: ImageDataset, batch_size: int, seed: int, member: int = 0):
        self.batches = Batches(ds.x_train, ds.y_train, min(batch_size, len(ds.y_train)), seed=seed)
        self.aug = torch.Generator().manual_seed(seed + 1 + 1_000 * member)  # data-parallel members differ

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "aug": self.aug.get_state()}

    def load_state_dict(self, state: dict):
        self.batches.load_state_dict(state["batches"])
        self.aug.set_state(state["aug"])


def _free_grads(params: list[nn.Parameter]):
    """Gradients are dropped once used: a block's gradients must not stay resident while others train."""
    for p in params:
        p.grad = None


def _backward(loss: torch.Tensor, params: list[nn.Parameter], clip: float, sync=None) -> torch.Tensor | None:
    """Gradients of `loss` for `params` (fresh, clipped to norm `clip` if > 0); the gradient norm, or None
    with the gradients cleared when the loss or the gradient is not finite (the step is then skipped).
    `sync(params)` averages the gradients over a data-parallel group before clipping; every member then
    sees the same gradients and takes (or skips) the same step."""
    for p in params:
        p.grad = None
    if sync is None and not torch.isfinite(loss):
        return None
    loss.backward()
    if sync is not None:
        sync(params)
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.zeros(())
    if not torch.isfinite(norm):
        for p in params:
            p.grad = None
        return None
    return norm


METHODS = {"e2e": EndToEnd, "dblocks": DBlocks}


def total_steps_for(cfg: RunConfig) -> tuple[int, str]:
    """Steps for this method, and a sentence saying which budget rule gave them."""
    t = cfg.train
    if t.method == "e2e" or t.budget == "steps":
        return t.steps, f"{t.steps} steps ({t.budget} budget)"
    B = cfg.dblocks.num_blocks
    return t.steps * B, (f"layer-update budget of {t.steps} end-to-end steps x {cfg.model.depth} layers: "
                         f"{t.steps * B} block steps of ~{cfg.model.depth / B:g} layers each")


# -- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, x_test, y_test, cfg: RunConfig, limit: int = 0, device: torch.device | str = "cpu",
             **predict_args) -> dict:
    """Classification: accuracy of the final prediction, and after every inference step (dblocks).
    Image generation: the denoising loss at fixed levels (`eval_loss`); sample quality is `eval`'s job."""
    was_training = model.training
    model.eval()
    if limit:
        x_test, y_test = x_test[:limit], y_test[:limit]
    gen = torch.Generator().manual_seed(cfg.train.seed + 999)
    if cfg.task == "imagegen":
        total = 0.0
        for xb, yb in iterate_eval(x_test, y_test, cfg.train.eval_batch_size):
            total += model.denoising_loss(to_float(xb).to(device), yb.to(device), generator=gen) * len(yb)
        model.train(was_training)
        return {"eval_loss": total / len(y_test), "n": len(y_test)}
    correct = None
    for xb, yb in iterate_eval(x_test, y_test, cfg.train.eval_batch_size):
        preds = model.predict(to_float(xb).to(device), generator=gen, **predict_args)
        hits = torch.stack([(p.cpu() == yb).sum() for p in preds])
        correct = hits if correct is None else correct + hits
    model.train(was_training)
    per_step = (correct.double() / len(y_test)).tolist()
    return {"accuracy": per_step[-1], "accuracy_per_step": per_step, "n": len(y_test)}


# -- the loop ---------------------------------------------------------------------------------


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop at the next step boundary, so the checkpoint it writes is
    consistent; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


class Progress:
    """A one-line progress bar on stderr (a line every 10% when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.start, self.last_pct = time.perf_counter(), -1

    def update(self, step: int, loss: float):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = step / max(elapsed, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        line = (f"[{self.label}] {step}/{self.total} ({100 * step / self.total:.0f}%) loss {loss:.4f} "
                f"{rate:.1f} step/s eta {int(eta) // 60}:{int(eta) % 60:02d}")
        pct = 10 * step // self.total
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", file=sys.stderr, flush=True)
        elif pct != self.last_pct:
            self.last_pct = pct
            print(line, file=sys.stderr, flush=True)


def _prepare_data(cfg: RunConfig) -> ImageDataset:
    ds = load_dataset(cfg.data.name, root=cfg.data.root or None)
    if cfg.data.train_limit:
        ds.x_train, ds.y_train = ds.x_train[:cfg.data.train_limit], ds.y_train[:cfg.data.train_limit]
    if cfg.data.test_limit:
        ds.x_test, ds.y_test = ds.x_test[:cfg.data.test_limit], ds.y_test[:cfg.data.test_limit]
    return ds


def build_model(cfg: RunConfig, ds: ImageDataset) -> nn.Module:
    torch.manual_seed(cfg.train.seed)
    return build_task_model(cfg, ds.image_size, ds.channels, ds.num_classes)


def build_task_model(cfg: RunConfig, image_size, channels: int, num_classes: int) -> nn.Module:
    if cfg.task == "imagegen":
        from .tasks.imagegen import ImageGenerator

        return ImageGenerator(cfg, image_size, channels, num_classes)
    return build_classifier(cfg, image_size, channels, num_classes)


def _model_state(model, method) -> dict:
    """The weights this run holds (a per-block job leaves out the blocks it does not own)."""
    skip = getattr(method, "unowned_names", set())
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def _save_checkpoint(out: Path, model, method, ema, state: dict):
    weights = _model_state(model, method)
    io.save_safetensors(weights, out / WEIGHTS, metadata={"step": str(state["step"])})
    if ema is not None:  # the evaluation weights: the state dict with parameters replaced by their averages
        averaged = dict(weights, **{k: v for k, v in ema.shadow.items() if k in weights})
        io.save_safetensors(averaged, out / EMA_WEIGHTS, metadata={"step": str(state["step"])})
    full = dict(state, method=method.state_dict(), torch_rng=torch.get_rng_state(),
                ema={k: v for k, v in ema.shadow.items() if k in weights} if ema is not None else None)
    io.atomic_torch_save(full, out / STATE)


def load_model(run_dir: str | os.PathLike) -> tuple[RunConfig, nn.Module, ImageDataset]:
    """Rebuild a trained model from a run directory (config.json + model.safetensors, or the averaged
    ema.safetensors when the run kept an EMA: the weights its results were measured with)."""
    run = Path(run_dir)
    if not (run / CONFIG).exists() or not (run / WEIGHTS).exists():
        raise ValueError(f"{run} is not a run directory: it needs {CONFIG} and {WEIGHTS}")
    cfg = validate(RunConfig.from_dict(io.load_json(run / CONFIG)))
    if cfg.train.blocks.strip():
        raise ValueError(f"{run} is a per-block job (blocks {cfg.train.blocks}): merge the jobs of all blocks "
                         f"first (diffusionblocks merge RUN... --out DIR), then evaluate the merged run")
    ds = _prepare_data(cfg)
    model = build_model(cfg, ds)
    weights, _ = io.load_safetensors(run / (EMA_WEIGHTS if (run / EMA_WEIGHTS).exists() else WEIGHTS))
    model.load_state_dict(weights)
    return cfg, model, ds


def build_model_for(cfg: RunConfig) -> nn.Module:
    """The freshly initialised model of a config (its dataset is read for the shapes)."""
    return build_model(cfg, _prepare_data(cfg))


def train(cfg: RunConfig | None, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          data_parallel=None) -> dict:
    """Train one run into `out_dir`; with resume=True continue the run saved there. Returns results.

    With train.blocks set (dblocks only) the run is a per-block job: it trains those blocks only and
    writes job.json for `merge`; with train.parallel=blocks it is one rank of a torchrun (jobs.py)."""
    from .jobs import check_independent

    out = Path(out_dir)
    if resume:
        if not (out / STATE).exists():
            raise ValueError(f"cannot resume: {out / STATE} does not exist (was the run started in {out}?)")
        cfg = RunConfig.from_dict(io.load_json(out / CONFIG))
    validate(cfg)
    partial = cfg.train.method == "dblocks" and bool(cfg.train.blocks.strip())
    if cfg.train.method != "dblocks" and cfg.train.blocks.strip():
        raise ValueError("train.blocks (--blocks) selects DiffusionBlocks blocks: it needs --method dblocks")
    if partial:
        check_independent(cfg, "a per-block job (--blocks)")
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, out, resume, progress, partial, data_parallel)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: RunConfig, out: Path, resume: bool, progress: bool, partial: bool, data_parallel) -> dict:
    from .jobs import JOB, job_record, owned_blocks

    out.mkdir(parents=True, exist_ok=True)
    ds = _prepare_data(cfg)
    model = build_model(cfg, ds)
    device = resolve_device(cfg.train.device)
    B = cfg.dblocks.num_blocks if cfg.train.method == "dblocks" else 1
    owned = owned_blocks(cfg) if cfg.train.method == "dblocks" else [0]
    all_steps, rule = total_steps_for(cfg)
    total = all_steps // B * len(owned) if partial else all_steps
    ema = EMA(model, cfg.train.ema) if cfg.train.ema else None
    method = METHODS[cfg.train.method](model, cfg, total, device=device, ema=ema, blocks=owned,
                                       offload_dir=cfg.train.offload_dir or out, data_parallel=data_parallel)
    residency = getattr(method, "residency", None)
    if cfg.train.method == "e2e":  # one stream, seeded by the run's seed
        streams = {0: Stream(ds, cfg.train.batch_size, stream_seed(cfg.train.seed))}
    else:  # one per block, seeded by (seed, block): a block's data does not depend on the other blocks
        member = data_parallel.index if data_parallel is not None else 0
        streams = {b: Stream(ds, cfg.train.batch_size, stream_seed(cfg.train.seed, b), member) for b in owned}
    state = {"step": 0, "layer_updates": 0, "train_seconds": 0.0, "skipped": 0, "curve": [],
             "block_updates": [0] * B}
    if resume:
        weights, _ = io.load_safetensors(out / WEIGHTS)
        unexpected = set(weights) - set(model.state_dict())
        missing = set(model.state_dict()) - set(weights) - getattr(method, "unowned_names", set())
        if unexpected or missing:
            raise ValueError(f"{out / WEIGHTS} does not match the run's config (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
        model.load_state_dict(weights, strict=False)
        saved = io.load_torch(out / STATE)
        method.load_state_dict(saved["method"])
        torch.set_rng_state(saved["torch_rng"])
        for b, st in streams.items():
            st.load_state_dict(saved["streams"][b])
        if ema is not None:
            ema.shadow.update(saved["ema"])
        state = {k: saved[k] for k in state}
        kept = [r for r in io.read_jsonl(out / METRICS) if r.get("step", 0) <= state["step"]]
        io.atomic_write_text(out / METRICS, "".join(io.json_line(r) for r in kept))
        print(f"resuming {out} at step {state['step']}/{total}", file=sys.stderr)
    else:
        if (out / STATE).exists():
            print(f"warning: {out} holds an earlier run; starting afresh over it", file=sys.stderr)
        io.atomic_write_text(out / CONFIG, save_config(cfg))
        io.atomic_write_text(out / METRICS, "")
    if partial:
        io.save_json(out / JOB, job_record(cfg, model, owned, total // len(owned)))
    _place(model, device, residency, ema)
    n_params = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
    print(f"{cfg.train.method}: {ds.describe()}; {n_params:,} parameters; budget: {rule}"
          + (f"; this job: blocks {owned}, {total} steps" if partial else "")
          + f"; device {device}" + (f", residency {residency.policy}" if residency else ""), file=sys.stderr)
    # ten evaluations over the run's layer-updates (total steps of depth / B layers each); none in a
    # per-block job, which cannot run the whole chain
    eval_every = cfg.train.eval_every or max(1, total * cfg.model.depth // B // 10)

    def checkpoint():
        positions = {b: st.state_dict() for b, st in streams.items()}
        _save_checkpoint(out, model, method, ema, dict(state, streams=positions))

    bar = Progress(total, f"{cfg.train.method}" + (f" blocks {cfg.train.blocks}" if partial else ""), progress)
    window: dict = {"loss": [], "blocks": {}}
    model.train()
    try:
        with StopRequest() as stop:
            while state["step"] < total:
                if stop.requested:
                    checkpoint()
                    print(f"interrupted at step {state['step']}/{total}; checkpoint saved. Continue with: "
                          f"diffusionblocks train --resume {out}", file=sys.stderr)
                    raise KeyboardInterrupt
                block = method.next_block()
                stream = streams[block]
                xb, yb = next(stream.batches)
                if data_parallel is not None:  # every member draws the block's batch and takes its shard
                    xb, yb = data_parallel.shard(xb), data_parallel.shard(yb)
                t0 = time.perf_counter()
                x = augment(to_float(xb), generator=stream.aug, crop_padding=cfg.data.crop_padding,
                            hflip=cfg.data.hflip and ds.hflip).to(device)
                m = method.step(x, yb.to(device), block)
                if ema is not None and not m.get("skipped"):
                    ema.update(model, m["trained"])
                state["train_seconds"] += time.perf_counter() - t0
                state["step"] += 1
                before = state["layer_updates"]
                state["layer_updates"] += m["layers"]
                if m.get("skipped"):
                    state["skipped"] += 1
                    warnings.warn(f"step {state['step']}: non-finite loss or gradient (loss={m['loss']}); "
                                  f"step skipped, weights unchanged", stacklevel=1)
                else:
                    state["block_updates"][block] += 1
                    window["loss"].append(m["loss"])
                    w = window["blocks"].setdefault(block, {"loss": [], "grad_norm": []})
                    w["loss"].append(m["loss"])
                    w["grad_norm"].append(m["grad_norm"])
                if state["step"] % cfg.train.log_every == 0 or state["step"] == total:
                    _log(out, state, window, m, B, warn_starved=cfg.dblocks.block_choice == "random" and not partial)
                    window = {"loss": [], "blocks": {}}
                if not partial and state["layer_updates"] // eval_every > before // eval_every \
                        and state["step"] < total:
                    ev = _evaluate_with(model, ema, ds, cfg, cfg.train.eval_limit, residency)
                    state["curve"].append({"step": state["step"], "layer_updates": state["layer_updates"],
                                           **_metric(ev)})
                    io.append_jsonl(out / METRICS, {"step": state["step"], "layer_updates": state["layer_updates"],
                                                    **{k if k.startswith("eval_") else f"eval_{k}": v
                                                       for k, v in _metric(ev).items() if k != "accuracy_per_step"},
                                                    "eval_n": ev["n"]})
                bar.update(state["step"], m["loss"])
                if state["step"] % cfg.train.ckpt_every == 0:
                    checkpoint()
        checkpoint()
        if partial:
            io.save_json(out / JOB, job_record(cfg, model, owned, total // len(owned), finished=True))
            return _finish_job(out, cfg, state, owned)
        with residency.all_resident() if residency else contextlib.nullcontext():
            return finish(out, cfg, model, ema, ds, state, device)
    finally:  # the offload files go, whatever happened (the checkpoint holds the weights)
        if residency is not None:
            residency.close()


def _finish_job(out: Path, cfg: RunConfig, state: dict, owned: list[int]) -> dict:
    """A per-block job cannot evaluate (the chain needs every block): training facts only."""
    results = {"method": "dblocks", "num_blocks": cfg.dblocks.num_blocks, "blocks": owned, "depth": cfg.model.depth,
               "data": cfg.data.name, "seed": cfg.train.seed, "steps": state["step"],
               "layer_updates": state["layer_updates"], "train_seconds": state["train_seconds"],
               "seconds_per_layer_update": state["train_seconds"] / max(1, state["layer_updates"]),
               "skipped_steps": state["skipped"], "block_updates": state["block_updates"],
               "note": "a per-block job: merge it with the other blocks' jobs, then evaluate the merged run"}
    io.save_json(out / RESULTS, results)
    return results


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available here (use cpu or auto)")
    return device


def _place(model, device, residency, ema):
    """Model (and EMA) onto the device; under residency=active only the shared parts and buffers, the
    blocks going straight to their off-device homes."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    if residency is None or residency.policy == "all":
        for p in model.parameters():
            if p.device.type != "meta":  # a per-block job's other blocks stay shapes only
                p.data = p.data.to(device)
    if ema is not None and (residency is None or residency.policy == "all"):
        ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    if residency is not None:
        residency.start()


def _evaluate_with(model, ema, ds, cfg, limit, residency=None):
    with residency.all_resident() if residency else contextlib.nullcontext():
        if ema is not None:
            ema.swap(model)
        try:
            return evaluate(model, ds.x_test, ds.y_test, cfg, limit, resolve_device(cfg.train.device))
        finally:
            if ema is not None:
                ema.swap(model)


def _log(out: Path, state: dict, window: dict, last: dict, num_blocks: int, warn_starved: bool = True):
    record = {"step": state["step"], "layer_updates": state["layer_updates"],
              "loss": sum(window["loss"]) / max(1, len(window["loss"])), "lr": last.get("lr"),
              "skipped": state["skipped"], "block_updates": list(state["block_updates"])}
    if num_blocks > 1:
        record["blocks"] = {str(b): {"loss": sum(v["loss"]) / len(v["loss"]),
                                     "grad_norm": sum(v["grad_norm"]) / len(v["grad_norm"])}
                            for b, v in sorted(window["blocks"].items())}
        starved = [b for b in range(num_blocks) if b not in window["blocks"]]
        if starved and warn_starved and state["step"] >= 10 * num_blocks:
            record["starved_blocks"] = starved
            print(f"\nwarning: block(s) {starved} received no update in the last window of steps", file=sys.stderr)
    io.append_jsonl(out / METRICS, record)


def activation_bytes(model, cfg: RunConfig, ds: ImageDataset, device: torch.device | str = "cpu") -> int:
    """Bytes saved for backward by one training step of this method, at the configured batch size."""
    n = min(cfg.train.batch_size, len(ds.y_train))
    # copies, as a training batch is: a slice would make the whole label tensor's storage count as saved
    x, y = to_float(ds.x_train[:n]).to(device), ds.y_train[:n].clone().to(device)
    params = list(model.parameters())
    if cfg.train.method == "e2e":
        nbytes, _ = saved_activation_bytes(lambda: model.loss(x, y).mean(), params)
    else:  # the largest block (blocks of an even split are the same size)
        block = max(range(model.num_blocks), key=lambda b: model.stack.allocation[b])
        nbytes, _ = saved_activation_bytes(lambda: model.block_loss(block, x, y).mean(), params)
    return nbytes


def _metric(ev: dict) -> dict:
    """The evaluation's figures of merit (accuracy per inference step, or the denoising loss)."""
    return {k: ev[k] for k in ("accuracy", "accuracy_per_step", "eval_loss") if k in ev}


def finish(out: Path, cfg: RunConfig, model, ema, ds: ImageDataset, state: dict, device="cpu") -> dict:
    ev = _evaluate_with(model, ema, ds, cfg, 0)
    # the curve's last point on the same test subset as the periodic ones, so the curve is comparable
    sub = _evaluate_with(model, ema, ds, cfg, cfg.train.eval_limit) if cfg.train.eval_limit else ev
    state["curve"].append({"step": state["step"], "layer_updates": state["layer_updates"], **_metric(sub)})
    results = {
        "task": cfg.task,
        "method": cfg.train.method,
        "num_blocks": cfg.dblocks.num_blocks if cfg.train.method == "dblocks" else 1,
        "depth": cfg.model.depth,
        "data": cfg.data.name,
        "seed": cfg.train.seed,
        **({"test_accuracy": ev["accuracy"], "accuracy_per_step": ev["accuracy_per_step"]} if "accuracy" in ev
           else {"eval_loss": ev["eval_loss"]}),
        "test_n": ev["n"],
        "steps": state["step"],
        "layer_updates": state["layer_updates"],
        "train_seconds": state["train_seconds"],
        "seconds_per_layer_update": state["train_seconds"] / max(1, state["layer_updates"]),
        "skipped_steps": state["skipped"],
        "block_updates": state["block_updates"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "activation_bytes_per_step": activation_bytes(model, cfg, ds, device),
        "curve": state["curve"],
        "curve_n": sub["n"],
    }
    io.save_json(out / RESULTS, results)
    return results
