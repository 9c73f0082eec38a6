"""Your network and your tensors in the harness: a task you write in a few lines, trained by the one loop with
everything a built-in task has (resume, Ctrl-C and SIGTERM safety, metrics.jsonl and results.json, `compare` against
end-to-end training and the one-block-depth control, `memory`, per-block jobs, `merge`, torchrun).

The model is an EDM denoiser of target tensors y, optionally conditioned on tensors x: your stem, layers and head
(the contract in blocks.py: stem(z_in, c_noise, x) -> (h, c), layer(h, c) -> h, head(h, c) -> shaped like y) cut
into blocks.num_blocks blocks for DiffusionBlocks, or trained as one block over every noise level end to end. A
subclass names itself and gives its tensors and its network:

    import torch
    from diffusionblocks import register
    from diffusionblocks.models import VectorHead, VectorStem
    from diffusionblocks.nn import ResidualMLP
    from diffusionblocks.tasks.tensors import TensorTask

    @register
    class Circle(TensorTask):
        name = "circle"

        def tensors(self, cfg):  # {"train": (y, x), "test": (y, x)}; (y,) alone for an unconditional model
            x = torch.rand(2048, 1, generator=torch.Generator().manual_seed(0))
            y = torch.cat([(6 * x).cos(), (6 * x).sin()], dim=1)
            return {"train": (y[:1792], x[:1792]), "test": (y[1792:], x[1792:])}

        def network(self, cfg, shapes):  # build cfg.model.depth layers: compare's control asks for fewer
            D = cfg.model.width
            return (VectorStem(2, D, cond_dim=1), [ResidualMLP(D) for _ in range(cfg.model.depth)],
                    VectorHead(D, 2))

Its headline is the denoising loss on the evaluation split (EDM-weighted MSE at fixed noise draws, the same for
every arm), with each block's own noise levels reported beside it (denoising_loss_block0, ...); `sample` writes
samples to an .npz. For classification subclass `TensorClassifierTask` instead: y holds class ids, the same network
denoises the label's embedding (the paper's Sec. 4.1; shapes.target is the embedding's size), the end-to-end arm is
that network as a plain classifier, and the headline is accuracy after every Euler step. Override `evaluate` or
`score` for a metric of your own. Put the class in a module and load it with `--plugin FILE.py` (or an entry point)
for the command line, `eval` and other processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..blocks import BlockStack, StackModel
from ..config import BlocksConfig, ChainConfig, RunConfig, apply_overrides, preset
from ..data import Batches
from ..noise import LogNormalLevels, Partition
from ..precond import EDMPrecond, ce_loss, mse_loss
from ..sample import euler
from .base import VALIDATION_SEED, Task, check_label_table, evaluating
from .classify import LabelChain

EVAL_LEVELS = 8  # noise levels per block at which the denoising loss is measured


@dataclass(frozen=True)
class TensorShapes:
    """What the network is built from: one sample's shape of y and of x (None: unconditional); a classifier's y is
    the label embedding (label_dim,) of its num_classes classes."""

    target: tuple[int, ...]
    cond: tuple[int, ...] | None = None
    num_classes: int = 0


class TensorData:
    """The task's tensors: y_train, x_train (None when unconditional), the same for test and the validation split."""

    def __init__(self, splits: dict, val_size: int, shapes=None):
        self.y_train, self.x_train = splits["train"]
        self.y_test, self.x_test = splits["test"]
        self.y_val = self.x_val = None
        if val_size:  # held out of the training tensors, the same for every run seed
            n = self.y_train.shape[0]
            if val_size >= n:
                raise ValueError(f"data.val_size={val_size} leaves no training samples (the training split has {n})")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
            val, train = perm[:val_size], perm[val_size:]
            take = lambda t, idx: None if t is None else t[idx]
            self.y_val, self.x_val = take(self.y_train, val), take(self.x_train, val)
            self.y_train, self.x_train = take(self.y_train, train), take(self.x_train, train)
        cond = None if self.x_train is None else tuple(self.x_train.shape[1:])
        self.shapes = shapes or TensorShapes(tuple(self.y_train.shape[1:]), cond)
        # the tensors' fingerprints: eval and --resume refuse a run whose tensors changed (RunFiles.check_run)
        self.sources = {f"tensors:{name}": _sha256(t) for name, t in splits.items()}

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if split == "test":
            return self.y_test, self.x_test
        if split == "validation":
            if self.y_val is None:
                raise ValueError("this run holds out no validation split (train it with data.val_size=N)")
            return self.y_val, self.x_val
        raise ValueError(f"split={split!r}: expected test or validation")

    def describe(self) -> str:
        if self.shapes.num_classes:
            cond = f", {self.shapes.num_classes} classes of x {list(self.shapes.cond)}"
            val = f", {len(self.y_val)} validation" if self.y_val is not None else ""
            return f"tensors{cond}; {len(self.y_train)} training{val}, {len(self.y_test)} test samples"
        cond = f", conditioned on x {list(self.shapes.cond)}" if self.shapes.cond else ", unconditional"
        val = f", {len(self.y_val)} validation" if self.y_val is not None else ""
        return (f"tensors: y {list(self.shapes.target)}{cond}; {len(self.y_train)} training{val}, "
                f"{len(self.y_test)} test samples")


def _sha256(tensors: tuple) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_splits(splits, task: str, labels: bool = False) -> dict:
    """The tensors() dict, checked: train and test, each (y,) or (y, x) with as many samples in y and x (labels:
    y holds class ids, and x is required)."""
    if not isinstance(splits, dict) or not {"train", "test"} <= set(splits):
        raise ValueError(f"{task}.tensors(cfg) must return {{'train': (y, x), 'test': (y, x)}} ((y,) alone for an "
                         f"unconditional model), not {type(splits).__name__}")
    out = {}
    for name in ("train", "test"):
        pair = splits[name]
        pair = (pair,) if isinstance(pair, torch.Tensor) else tuple(pair)
        if not 1 <= len(pair) <= 2 or not all(isinstance(t, torch.Tensor) for t in pair):
            raise ValueError(f"{task}.tensors(cfg)[{name!r}]: expected (y, x) or (y,) of tensors")
        y, x = pair[0], pair[1] if len(pair) == 2 else None
        if labels:
            if y.is_floating_point() or y.is_complex() or y.ndim != 1 or x is None or (y.numel() and y.min() < 0):
                raise ValueError(f"{task}.tensors(cfg)[{name!r}]: a classifier takes (y, x), y the class ids (N,) "
                                 f"as integers >= 0 and x the inputs (N, ...); got y {y.dtype} {tuple(y.shape)}")
            out[name] = (y.long(), x)
            continue
        if not y.is_floating_point():
            raise ValueError(f"{task}.tensors(cfg)[{name!r}]: y is {y.dtype}; the denoiser's target is a float tensor "
                             "(class ids: TensorClassifierTask)")
        if x is not None and x.shape[0] != y.shape[0]:
            raise ValueError(f"{task}.tensors(cfg)[{name!r}]: y has {y.shape[0]} samples and x {x.shape[0]}")
        if y.ndim < 2 or y.shape[0] == 0:
            raise ValueError(f"{task}.tensors(cfg)[{name!r}]: y must be (N, ...) with N >= 1, got {tuple(y.shape)}")
        out[name] = (y.float(), x)
    if (out["train"][1] is None) != (out["test"][1] is None) or out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise ValueError(f"{task}.tensors(cfg): train and test differ in y's shape or in having x")
    if labels and out["train"][1].shape[1:] != out["test"][1].shape[1:]:
        raise ValueError(f"{task}.tensors(cfg): train and test differ in x's shape")
    return out


class TensorDenoiser(StackModel, nn.Module):
    """An EDM denoiser D(z, sigma, x) of y built from your stem, layers and head, as `num_blocks` blocks (1: the
    end-to-end model over every noise level)."""

    def __init__(self, stem: nn.Module, layers: Sequence[nn.Module], head: nn.Module, blocks: BlocksConfig,
                 num_blocks: int, sigma_data: float, checkpoint_every: int = 0):
        super().__init__()
        B = num_blocks
        self.partition = Partition.create(LogNormalLevels(), B, kind=blocks.partition,
                                          gamma=blocks.gamma if B > 1 else 0.0)
        self.stack = BlockStack(list(layers), stem, head, self.partition,
                                allocation=blocks.layers_per_block() if B > 1 else None,
                                shared_stem_head=blocks.shared_stem_head or B == 1,
                                precond=EDMPrecond(sigma_data), checkpoint_every=checkpoint_every)

    def block_loss(self, block: int, y: torch.Tensor, x: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample EDM loss (N,) of `block` alone, on its own noise levels."""
        z, sigma = self.stack.noisy_input(block, y, generator)
        return mse_loss(self.stack.denoise(block, z, sigma, x), y, self.stack.precond.weight(sigma))

    def loss(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """End to end: the one block over every level."""
        return self.block_loss(0, y, x)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, x: torch.Tensor | None = None, steps_per_block: int = 8) -> torch.Tensor:
        """Euler from sigma_max to 0 over `steps_per_block` levels per block of `partition` (one block per step
        when 1); `noise` is a standard normal draw shaped like y."""
        grid = self.partition.inference_grid(steps_per_block)
        with evaluating(self):
            return euler(self.stack, grid[0].item() * noise, grid, x)


class TensorTask(Task):
    """Subclass it: set `name`, implement `tensors(cfg)` and `network(cfg, shapes)` (module docstring)."""

    metric, higher_is_better = "denoising_loss", False
    sigma_data: ClassVar[float] = 0.5  # the data's scale (EDM's sigma_data): about y's standard deviation
    sample_steps: ClassVar[int] = 8  # Euler steps per block of `sample`
    presets = {"full": "tensors", "quick": "tensors"}  # train's and compare's starting config (your own: @preset)
    compare_roles = ("e2e", "e2e-steps", "control", "dblocks")

    def tensors(self, cfg: RunConfig) -> dict:
        """{"train": (y, x), "test": (y, x)}: float targets y (N, ...) and conditions x (N, ...), or (y,) alone."""
        raise NotImplementedError(f"{type(self).__name__}.tensors(cfg): return {{'train': (y, x), 'test': (y, x)}}")

    def network(self, cfg: RunConfig, shapes: TensorShapes) -> tuple[nn.Module, Sequence[nn.Module], nn.Module]:
        """(stem, layers, head) on the contract of blocks.py: cfg.model.depth layers (compare's control asks for
        fewer)."""
        raise NotImplementedError(f"{type(self).__name__}.network(cfg, shapes): return (stem, layers, head)")

    # -- the Task core ----------------------------------------------------------------------------------------

    def load_data(self, cfg: RunConfig) -> TensorData:
        return TensorData(_check_splits(self.tensors(cfg), type(self).__name__), cfg.data.val_size)

    def _parts(self, cfg: RunConfig, shapes: TensorShapes) -> tuple:
        parts = self.network(cfg, shapes)
        if not (isinstance(parts, (tuple, list)) and len(parts) == 3):
            raise ValueError(f"{type(self).__name__}.network(cfg, shapes) must return (stem, layers, head)")
        return parts

    def build_model(self, cfg: RunConfig, data, form: str) -> TensorDenoiser:
        shapes = data.shapes if isinstance(data, TensorData) else data
        stem, layers, head = self._parts(cfg, shapes)
        B = cfg.blocks.num_blocks if form == "blocks" else 1
        return TensorDenoiser(stem, layers, head, cfg.blocks, B, self.sigma_data, cfg.model.checkpoint)

    def stream(self, data: TensorData, cfg: RunConfig, seed: int, member: int = 0):
        return TensorBatches(data.y_train, data.x_train, cfg.train.batch_size, seed)

    def probe_batch(self, data: TensorData, cfg: RunConfig, device) -> tuple:
        n = cfg.train.batch_size
        return _batch(data.y_train[:n], None if data.x_train is None else data.x_train[:n], device)

    @torch.no_grad()
    def evaluate(self, model: TensorDenoiser, data: TensorData, cfg: RunConfig, *, split: str = "test",
                 limit: int = 0, device="cpu", **options) -> dict:
        """The denoising loss at EVAL_LEVELS levels per block of cfg's partition (equal training mass apart, fixed
        noise draws): `denoising_loss` over all of them, `denoising_loss_block{b}` over block b's, the same for every
        arm."""
        y, x = data.split(split)
        if limit:
            y, x = y[:limit], None if x is None else x[:limit]
        part = Partition.create(LogNormalLevels(), cfg.blocks.num_blocks, kind=cfg.blocks.partition, gamma=0.0)
        levels = part.levels
        u_lo, u_hi = (levels.cdf(torch.tensor(v, dtype=torch.float64)) for v in (levels.lo, levels.hi))
        count = EVAL_LEVELS * part.num_blocks
        sigmas = levels.icdf(u_lo + (torch.arange(count, dtype=torch.float64) + 0.5) / count * (u_hi - u_lo))
        owner = part.route(sigmas)
        losses, n = torch.zeros(count, dtype=torch.float64), cfg.train.eval_batch_size
        with evaluating(model):
            for j, s in enumerate(sigmas.tolist()):  # the noise of level j drawn whole: no batch size changes it
                z_all = y + s * torch.randn(y.shape, generator=torch.Generator().manual_seed(j), dtype=y.dtype)
                for i in range(0, y.shape[0], n):
                    yb, z = y[i:i + n].to(device), z_all[i:i + n].to(device)
                    sigma = torch.full((yb.shape[0],), s, dtype=yb.dtype, device=device)
                    out = model.stack(z, sigma, None if x is None else x[i:i + n].to(device))
                    losses[j] += mse_loss(out, yb, model.stack.precond.weight(sigma)).sum().item()
        losses /= y.shape[0]
        out = {"denoising_loss": float(losses.mean()), "n": int(y.shape[0])}
        out.update({f"denoising_loss_block{b}": float(losses[owner == b].mean()) for b in range(part.num_blocks)})
        return out

    def summary(self, results: dict) -> str:
        blocks = " ".join(f"{results[k]:.4f}" for k in sorted(results) if k.startswith("denoising_loss_block"))
        return f"denoising loss {results['denoising_loss']:.4f} (per block, highest noise first: {blocks})"

    def describe_score(self, score: dict) -> str:
        return self.summary(score)

    # -- run files, sampling, memory ------------------------------------------------------------------------

    def shapes_record(self, data: TensorData) -> dict:
        cond = data.shapes.cond
        return {"target": list(data.shapes.target), "cond": None if cond is None else list(cond)}

    def shapes_from_record(self, record: dict) -> TensorShapes:
        cond = record.get("cond")
        return TensorShapes(tuple(record["target"]), None if cond is None else tuple(cond))

    def sample(self, model: TensorDenoiser, data, cfg: RunConfig, out: str, *, num: int, seed: int, writable,
               device="cpu", **options) -> str:
        """`num` samples into the .npz `out` (y, and x: the test split's conditions cycled, when conditional)."""
        if not out.endswith(".npz"):
            raise ValueError(f"--out {out}: a {self.name} run writes its samples to an .npz file")
        shapes = data.shapes if isinstance(data, TensorData) else data
        gen = torch.Generator().manual_seed(seed)
        x = None
        if shapes.cond is not None:
            if not isinstance(data, TensorData):
                raise ValueError("a conditional model samples for the test split's conditions: its data is needed")
            x = data.x_test[torch.arange(num) % data.x_test.shape[0]]
        noise = torch.randn((num, *shapes.target), generator=gen).to(device)
        y = model.sample(noise, None if x is None else x.to(device), self.sample_steps).cpu()
        arrays = {"y": y.numpy()} | ({} if x is None else {"x": x.numpy()})
        np.savez(out, **arrays)
        return f"wrote {num} samples to {out}"

    def plan_shapes(self, cfg: RunConfig, **given) -> TensorShapes:
        if any(v is not None for v in given.values()):
            raise ValueError(f"task {self.name} takes its shapes from its tensors, not from the command line")
        return self.load_data(cfg).shapes

    def random_batch(self, cfg: RunConfig, shapes: TensorShapes, generator: torch.Generator) -> tuple:
        n = cfg.train.batch_size
        x = None if shapes.cond is None else torch.randn((n, *shapes.cond), generator=generator)
        return _batch(torch.randn((n, *shapes.target), generator=generator), x, "cpu")


def _batch(y: torch.Tensor, x: torch.Tensor | None, device) -> tuple:
    return (y.to(device),) if x is None else (y.to(device), x.to(device))


class TensorBatches:
    """Resumable shuffled batches (y,) or (y, x) of the training tensors (data.Batches underneath)."""

    def __init__(self, y: torch.Tensor, x: torch.Tensor | None, batch_size: int, seed: int):
        self.conditional = x is not None
        self.batches = Batches(y, x if x is not None else y, batch_size, seed=seed)

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        y, x = next(self.batches)
        return (y, x) if self.conditional else (y,)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


# -- classification: your network as a label denoiser -------------------------------------------------------------


class TensorClassifier(LabelChain):
    """Your stem, layers and head as B label denoisers (classify.LabelChain): the stem reads the noisy label
    embedding z_in (N, label_dim) and conditions on x."""

    def __init__(self, stem: nn.Module, layers: Sequence[nn.Module], head: nn.Module, blocks: BlocksConfig,
                 chain: ChainConfig, num_classes: int, label_dim: int, checkpoint_every: int = 0):
        super().__init__(stem, list(layers), head, blocks, chain, num_classes, label_dim, checkpoint_every)


class PlainTensorClassifier(TensorClassifier):
    """End to end: the same network as a plain classifier, trained by backprop through all of it: one block read at
    sigma_max with its label input held at zero (the chain's first step from a zero start)."""

    inference_options = ()

    def __init__(self, stem, layers, head, blocks: BlocksConfig, chain: ChainConfig, num_classes: int,
                 label_dim: int, checkpoint_every: int = 0):
        one = BlocksConfig(num_blocks=1, partition=blocks.partition, gamma=0.0, allocation="", shared_stem_head=True)
        super().__init__(stem, layers, head, one, chain, num_classes, label_dim, checkpoint_every)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(x.shape[0], self.labels.table.shape[1], dtype=x.dtype, device=x.device)
        sigma = torch.full((x.shape[0],), self.partition.levels.hi, dtype=x.dtype, device=x.device)
        return self.readout_of(0)(self.stack.denoise(0, z, sigma, x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ce_loss(self.logits(x), y)

    @torch.no_grad()
    def step_logits(self, x: torch.Tensor, **_) -> list[torch.Tensor]:
        return [self.logits(x)]


class TensorClassifierTask(TensorTask):
    """Subclass it for classification: `tensors(cfg)` gives (y, x) with y the class ids (N,) and x the inputs;
    `network(cfg, shapes)` builds a stem that reads z_in of shapes.target = (label_dim,) and conditions on x, and a
    head back to (label_dim,): the contract TensorTask's is. Headline: accuracy, and after every Euler step."""

    metric, higher_is_better, percent = "accuracy", True, True
    eval_options = ("steps_per_block", "grid", "bridge", "sigma_start", "init")

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        check_label_table(cfg)

    def load_data(self, cfg: RunConfig) -> TensorData:
        splits = _check_splits(self.tensors(cfg), type(self).__name__, labels=True)
        classes = int(max(splits["train"][0].max(), splits["test"][0].max())) + 1
        shapes = TensorShapes((cfg.model.label_dim or cfg.model.width,), tuple(splits["train"][1].shape[1:]), classes)
        return TensorData(splits, cfg.data.val_size, shapes)

    def build_model(self, cfg: RunConfig, data, form: str) -> TensorClassifier:
        shapes = data.shapes if isinstance(data, TensorData) else data
        stem, layers, head = self._parts(cfg, shapes)
        model = TensorClassifier if form == "blocks" else PlainTensorClassifier
        return model(stem, layers, head, cfg.blocks, cfg.chain, shapes.num_classes, shapes.target[0],
                     cfg.model.checkpoint)

    def stream(self, data: TensorData, cfg: RunConfig, seed: int, member: int = 0):
        return Batches(data.x_train, data.y_train, cfg.train.batch_size, seed=seed)

    def probe_batch(self, data: TensorData, cfg: RunConfig, device) -> tuple:
        n = cfg.train.batch_size
        return data.x_train[:n].to(device), data.y_train[:n].to(device)

    @torch.no_grad()
    def predictions(self, model: TensorClassifier, data: TensorData, cfg: RunConfig, *, split: str = "test",
                    limit: int = 0, device="cpu", **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, x, the class predicted after every Euler step (steps, N)) on `split`, seeded as every evaluation is."""
        y, x = data.split(split)
        if limit:
            y, x = y[:limit], x[:limit]
        options = {k: v for k, v in options.items() if v is not None}
        gen, preds = torch.Generator().manual_seed(cfg.train.seed + 999), []
        with evaluating(model):
            for i in range(0, y.shape[0], cfg.train.eval_batch_size):
                logits = model.step_logits(x[i:i + cfg.train.eval_batch_size].to(device), generator=gen, **options)
                preds.append(torch.stack([lg.argmax(-1).cpu() for lg in logits]))
        return y, x, torch.cat(preds, dim=1)

    def evaluate(self, model: TensorClassifier, data: TensorData, cfg: RunConfig, *, split: str = "test",
                 limit: int = 0, device="cpu", **options) -> dict:
        """Accuracy of the last Euler step, and after every step (`accuracy_per_step`: one per block at one step per
        block)."""
        y, _, preds = self.predictions(model, data, cfg, split=split, limit=limit, device=device, **options)
        per_step = (preds == y).double().mean(1).tolist()
        return {"accuracy": per_step[-1], "accuracy_per_step": per_step, "n": int(y.shape[0])}

    def summary(self, results: dict) -> str:
        steps = ", ".join(f"{100 * a:.2f}" for a in results["accuracy_per_step"])
        return f"accuracy {100 * results['accuracy']:.2f}% (after each Euler step: {steps})"

    def shapes_record(self, data: TensorData) -> dict:
        return dict(super().shapes_record(data), num_classes=data.shapes.num_classes)

    def shapes_from_record(self, record: dict) -> TensorShapes:
        shapes = super().shapes_from_record(record)
        return TensorShapes(shapes.target, shapes.cond, int(record["num_classes"]))

    def random_batch(self, cfg: RunConfig, shapes: TensorShapes, generator: torch.Generator) -> tuple:
        n = cfg.train.batch_size
        return (torch.randn((n, *shapes.cond), generator=generator),
                torch.randint(shapes.num_classes, (n,), generator=generator))

    def sample(self, model, data, cfg, out, **_) -> str:
        raise ValueError(f"a {self.name} run classifies: it has nothing to sample (inference.load(run) classifies)")


@preset("tensors")
def preset_tensors() -> RunConfig:
    """A small start for a TensorTask of your own (give its name: --task NAME, or cfg.task): 6 layers of width 64
    in 3 blocks, 600 steps of 128."""
    cfg = RunConfig("tensors")
    return apply_overrides(cfg, ["data.name=tensors", "model.depth=6", "model.width=64", "train.steps=600",
                                 "train.batch_size=128", "train.lr=2e-3", "train.ckpt_every=200",
                                 "blocks.num_blocks=3"])
