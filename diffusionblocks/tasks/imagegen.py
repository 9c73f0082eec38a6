"""Image generation with a DiT under EDM (paper Sec. 4.2, Table 2).

One model class serves both methods: end-to-end training is the same stack with one block that owns the
whole noise range (plain EDM), DiffusionBlocks cuts the layers into B blocks over an equi-probability
partition. Training: sigma from the (block's part of the) log-normal, z = x + sigma * eps, loss
lambda(sigma) * ||D(z, sigma, label) - x||^2 per image; labels are replaced by the null class with
probability gen.label_dropout (classifier-free guidance). Sampling integrates the probability-flow ODE over
a descending grid; the stack routes each step to the block that owns its level, so with B blocks each
step runs one block: B times cheaper than a step of the end-to-end model.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import io
from ..blocks import BlockStack, StackModel
from ..config import BackboneConfig, BlocksConfig, RunConfig, load_preset, parse_ints, preset, section, setting
from ..data import to_float
from ..fd import ScriptedFeatures, features, frechet_distance
from ..images import grid, readable_factor, save_png, save_sheet, to_uint8, upscale
from ..measure import interleaved_seconds
from ..models import DiTHead, DiTStem, vit_layers
from ..noise import GRID_KINDS, LogNormalLevels, Partition
from ..precond import EDMPrecond, mse_loss
from ..sample import SAMPLERS
from .base import Reference, evaluating, split_arrays
from .images import ImageShapes, ImageTask
from .optional import Option, at_least, finite, pick, speedup_note


@section("gen")
@dataclass
class GenConfig:
    """Image generation (task=imagegen): EDM settings and the sampler used by eval/compare."""

    conditional: bool = setting(True, "class-conditional, with a null class for classifier-free guidance")
    label_dropout: float = setting(0.1, "training: fraction of labels replaced by the null class", range="[0, 1)")
    sigma_data: float = setting(0.5, "EDM's data scale (images are in [-1, 1])", range="(0, inf)")
    steps: int = setting(18, "sampling steps (a multiple of B gives every block the same number)",
                         range="[1, 100_000]")
    sampler: str = setting("euler", "the ODE sampler", choices=tuple(SAMPLERS))
    grid: str = setting("equiprob", "sampling grid: equiprob (each block's levels), cdf (whatever the partition) or "
                                    "karras", choices=GRID_KINDS)
    cfg_scale: float = setting(1.0, "classifier-free guidance scale at sampling (1 = none)", range="(-inf, inf)")
    fd_samples: int = setting(1000, "generated images for the Frechet distance",
                              range="[2, 10_000_000] a Frechet distance needs 2")


class ImageGenerator(StackModel, nn.Module):
    """An EDM denoiser D(z, sigma, label) over images, as B blocks (num_blocks=1: end-to-end, plain EDM;
    default: blocks.num_blocks)."""

    def __init__(self, model: BackboneConfig, blocks: BlocksConfig, gen: GenConfig, image_size, channels: int,
                 num_classes: int, num_blocks: int | None = None):
        super().__init__()
        m, B = model, blocks.num_blocks if num_blocks is None else num_blocks
        self.image_size, self.channels, self.label_dropout = tuple(image_size), channels, gen.label_dropout
        self.num_classes = num_classes if gen.conditional else 0
        self.partition = Partition.create(LogNormalLevels(), B, kind=blocks.partition,
                                          gamma=blocks.gamma if B > 1 else 0.0)
        self.stack = BlockStack(
            vit_layers(m, layer="adaln"),
            DiTStem(image_size, channels, m.patch, m.width, self.num_classes, m.noise_scale),
            DiTHead(image_size, channels, m.patch, m.width), self.partition,
            allocation=blocks.layers_per_block() if B > 1 else None,
            shared_stem_head=blocks.shared_stem_head or B == 1, precond=EDMPrecond(gen.sigma_data),
            checkpoint_every=m.checkpoint)

    @property
    def null_class(self) -> int:
        return self.num_classes

    # -- training ---------------------------------------------------------------------------------

    def training_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The class labels with a fraction gen.label_dropout replaced by the null class; None if unconditional."""
        if not self.num_classes:
            return None
        p = self.label_dropout
        if p > 0:
            drop = torch.rand(y.shape, generator=generator).to(y.device) < p
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return y

    def block_loss(self, block: int, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """Per-image EDM loss (N,) of `block` alone, on its own noise levels."""
        z, sigma = self.stack.noisy_input(block, x, generator)
        denoised = self.stack.denoise(block, z, sigma, self.training_labels(y, generator))
        return mse_loss(denoised, x, self.stack.precond.weight(sigma))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """End-to-end: the one block over the whole range."""
        return self.block_loss(0, x, y)

    # -- sampling ---------------------------------------------------------------------------------

    def grid(self, steps: int, kind: str = "equiprob") -> torch.Tensor:
        """`steps` descending levels and a final 0. "equiprob": with steps a multiple of B every block gets
        steps / B levels, equally spaced in training mass within its interval, its first on its upper edge
        (otherwise "cdf"). "cdf": equally spaced in training mass over the whole range, the same for every
        partition (for an equi-probability partition it is the "equiprob" grid). "karras": EDM's schedule."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if kind not in GRID_KINDS:
            raise ValueError(f"unknown grid {kind!r}; expected one of {GRID_KINDS}")
        B = self.num_blocks
        if kind == "equiprob" and steps % B == 0:
            return self.partition.inference_grid(steps // B, "equiprob")
        return Partition.create(self.partition.levels, 1, gamma=0.0) \
            .inference_grid(steps, "cdf" if kind == "equiprob" else kind)

    def check_classes(self, classes) -> torch.Tensor | None:
        if classes is None:
            return None
        classes = torch.as_tensor(classes, dtype=torch.long).flatten()
        if not self.num_classes:
            raise ValueError("this model is unconditional: it takes no classes")
        bad = classes[(classes < 0) | (classes >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"unknown class(es) {bad.tolist()}: this model has classes 0..{self.num_classes - 1}")
        return classes

    @torch.no_grad()
    def sample(self, num: int, steps: int, *, sampler: str = "euler", grid: str = "equiprob",
               cfg_scale: float | None = None, classes=None, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", callback=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`num` images (N, C, H, W) in about [-1, 1], and their class labels (None if unconditional).
        classes: None (uniformly drawn), or a list cycled over the samples."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"number of samples must be an integer >= 1, got {num!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {tuple(SAMPLERS)}")
        if cfg_scale is not None and cfg_scale != 1.0 and not self.num_classes:
            raise ValueError("classifier-free guidance (cfg_scale) needs a class-conditional model")
        classes = self.check_classes(classes)
        sigmas = self.grid(steps, grid)
        labels = None
        if self.num_classes:
            if classes is None:
                labels = torch.randint(self.num_classes, (num,), generator=generator)
            else:
                labels = classes.repeat((num + classes.numel() - 1) // classes.numel())[:num]
            labels = labels.to(device)
        z = torch.randn(num, self.channels, *self.image_size, generator=generator).to(device) * sigmas[0].item()
        uncond = torch.full_like(labels, self.null_class) if labels is not None else None
        with evaluating(self):
            x = SAMPLERS[sampler](self.stack, z, sigmas, labels, cfg_scale=cfg_scale, uncond=uncond,
                                  callback=callback)
        return x, labels

    # -- a cheap quality signal for training curves --------------------------------------------

    @torch.no_grad()
    def denoising_loss(self, x: torch.Tensor, y: torch.Tensor, levels: int = 8,
                       generator: torch.Generator | None = None) -> float:
        """Mean EDM loss of the routed denoiser at `levels` fixed noise levels, equally spaced in the
        training distribution's mass (so every block is measured on its own range)."""
        lv = self.partition.levels
        u_lo, u_hi = (lv.cdf(torch.tensor(v, dtype=torch.float64)) for v in (lv.lo, lv.hi))
        sigmas = lv.icdf(u_lo + (torch.arange(levels, dtype=torch.float64) + 0.5) / levels * (u_hi - u_lo))
        labels = y if self.num_classes else None
        total = 0.0
        for s in sigmas.tolist():
            sigma = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
            z = self.stack.precond.noise(x, sigma, generator)
            total += mse_loss(self.stack(z, sigma, labels), x, self.stack.precond.weight(sigma)).mean().item()
        return total / levels


def generate(model: ImageGenerator, num: int, *, batch_size: int = 500, seed: int = 0, progress: bool = False,
             uint8: bool = False, **sample_args) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """`num` samples in batches; returns (images, labels, seconds spent sampling). uint8: each batch kept as
    to_uint8 images (a quarter of the memory)."""
    gen = torch.Generator().manual_seed(seed)
    images, labels, seconds = [], [], 0.0
    classes = sample_args.pop("classes", None)
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        cls = None
        if classes is not None:  # keep cycling the list across batches
            cls = [classes[(start + i) % len(classes)] for i in range(n)]
        t0 = time.perf_counter()
        x, y = model.sample(n, generator=gen, classes=cls, **sample_args)
        seconds += time.perf_counter() - t0
        images.append(to_uint8(x) if uint8 else x.cpu())
        labels.append(y.cpu() if y is not None else None)
        if progress:
            print(f"[sample] {start + n}/{num}", file=sys.stderr, flush=True)
    return torch.cat(images), (torch.cat(labels) if labels[0] is not None else None), seconds


def reference_config(dataset: str) -> RunConfig:
    """The classifier behind FD: the quick classification preset's e2e ViT (digits: its own preset)."""
    cfg = load_preset("digits-quick" if dataset == "digits" else "quick")
    cfg.task, cfg.train.method, cfg.data.name = "classify", "e2e", dataset
    cfg.train.steps = 400 if dataset == "digits" else 800
    cfg.train.eval_limit = 0
    return cfg


def reference_classifier(dataset: str, reference: Reference, progress: bool = False) -> nn.Module:
    """The FD reference classifier for `dataset`, trained once and cached (fd-<dataset>)."""
    name = Path(dataset).stem if dataset.endswith(".npz") else dataset
    return reference(reference_config(dataset), f"fd-{name}", progress)


def evaluate_samples(model: ImageGenerator, cfg: RunConfig, ds, *, reference: Reference, split: str = "test",
                     num: int | None = None,
                     steps: int | None = None, sampler: str | None = None, grid: str | None = None,
                     cfg_scale: float | None = None, device="cpu", progress: bool = False,
                     fd_model: str | None = None) -> dict:
    """FD (classifier features) of `num` generated images against as many images of `split`, the reference
    classifier's accuracy on the classes they were generated for, and the sampling time. With `fd_model`
    (a TorchScript feature extractor, e.g. Inception-v3 pool3) also the FD in its features."""
    scripted = ScriptedFeatures(fd_model) if fd_model else None  # fail early on a bad path

    g = cfg.gen
    num = num or g.fd_samples
    args = {"steps": steps or g.steps, "sampler": sampler or g.sampler, "grid": grid or g.grid,
            "cfg_scale": g.cfg_scale if cfg_scale is None else cfg_scale}
    images, labels, seconds = generate(model, num, batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed + 7,
                                       device=device, progress=progress, **args)
    classifier = reference_classifier(cfg.data.name, reference, progress)
    images = images.clamp(-1, 1)  # the range of real images, as the Inception path does
    x_split, _ = split_arrays(ds, split)
    real = to_float(x_split[:num])
    f_gen, pred = features(classifier, images)
    f_real, _ = features(classifier, real)
    floor, floor_sets = real_floor(classifier, x_split, ds.x_train, num, f_real, split)
    out = {"fd_classifier_features": frechet_distance(f_gen, f_real), "num_generated": num, "num_real": len(real),
           "split": split,
           "fd_real_floor": floor, "fd_real_floor_sets": floor_sets,
           "sampling_seconds": seconds, "seconds_per_image": seconds / num, **args,
           "num_blocks": model.num_blocks, "method": cfg.train.method}
    if scripted is not None:
        out[f"fd_{scripted.path.name}"] = frechet_distance(scripted(images), scripted(real))
    if labels is not None:
        hit = (pred == labels).double()
        out["class_accuracy"] = float(hit.mean())
        out["per_class_accuracy"] = [float(hit[labels == k].mean()) if bool((labels == k).any()) else None
                                     for k in range(model.num_classes)]
    return out


def real_floor(classifier, x_split, x_train, num: int, f_real: torch.Tensor, split: str) -> tuple[float, str]:
    """FD between the `num` real images the samples are scored against and as many other real images (the
    split's next ones, or training images where the split is too small): what a perfect generator would
    score at this sample count."""
    if len(x_split) >= 2 * num:
        other, where = x_split[num:2 * num], f"{split}[:{num}] vs {split}[{num}:{2 * num}]"
    else:
        other, where = x_train[:num], f"{split}[:{num}] vs train[:{num}]"
    f_other, _ = features(classifier, to_float(other))
    return frechet_distance(f_other, f_real), where


MAX_GRID = 4096  # images in one PNG grid (64 x 64): a bigger one is no use to look at; --npz takes more
SHEET_ROWS, SHEET_COLUMNS = 4, 10  # compare's samples.png: 4 rows of 10, one class per column when 10 classes
MAX_NPZ_BYTES = 2**31  # the samples of one `sample` call are held in memory (uint8) until written
MAX_PNG_SIDE = 4096  # the default scale keeps a sample grid at most this many pixels a side
STEPS = Option("steps", at_least(1), "sampling steps (default gen.steps)", flag_name="sample_steps")
SAMPLER = Option("sampler", help="the ODE sampler (default gen.sampler)", choices=tuple(SAMPLERS))
CFG_SCALE = Option("cfg_scale", finite, "classifier-free guidance scale (conditional models; default gen.cfg_scale)")


class ImageGenTask(ImageTask):
    """Class-conditional image generation (DiT under EDM). Evaluated during training by the denoising loss
    at fixed levels; scored by FD (classifier features) of generated samples, lower is better."""

    name = "imagegen"
    metric, higher_is_better, curve_metric = "fd_classifier_features", False, "eval_loss"
    compare_roles = ("e2e", "e2e-steps", "control", "dblocks")
    presets = {"full": "gen-fashion", "quick": "gen-quick", "offline": "gen-tiny", "offline-quick": "gen-tiny"}
    eval_options = (Option("num", at_least(1), "samples for the FD (default gen.fd_samples)"), STEPS, SAMPLER, "grid",
                    CFG_SCALE, Option("fd_model", help="also an FD in the features of the TorchScript extractor at "
                                      "this path (e.g. Inception-v3 pool3, images given at 299x299 in [0, 255]: the "
                                      "standard FID); never downloaded"))
    sample_options = (STEPS, SAMPLER, "grid", CFG_SCALE,
                      Option("classes", help="comma-separated classes, cycled over the samples"),
                      Option("nrow", at_least(1), "images per row of the grid"),
                      Option("scale", at_least(1), "PNG pixels a side per image pixel (default: each image at least "
                                                   f"64 px, the grid at most {MAX_PNG_SIDE} px a side)"),
                      Option("npz", bool, f"also write the uint8 samples (and classes) as OUT.npz: up to "
                                          f"{MAX_NPZ_BYTES // 2**30} GiB, past the grid's {MAX_GRID} images"))

    def build_model(self, cfg: RunConfig, data, form: str) -> nn.Module:
        return ImageGenerator(cfg.model, cfg.blocks, cfg.gen, data.image_size, data.channels, data.num_classes,
                              num_blocks=1 if form == "end-to-end" else None)

    def plan_tokens(self, cfg: RunConfig, shapes: ImageShapes, form: str = "end-to-end") -> int:
        """The patches (the class and the noise level condition through adaLN, not as tokens)."""
        p = cfg.model.patch
        return math.ceil(shapes.image_size[0] / p) * math.ceil(shapes.image_size[1] / p)

    def plan_outer_bytes(self, cfg: RunConfig, shapes: ImageShapes, model: nn.Module, element: int) -> int:
        """The same end to end and per block: the scaled input for the patch embedding, the class ids (int64,
        when conditional), the noise embedding (sinusoidal features, the MLP's hidden before and after SiLU, and
        c); DiT's final layer (its LayerNorm's input, statistics and output, the modulated input of its linear,
        SiLU(c) and the scale); EDM's per-sample output scale (float32), the loss's difference image and
        per-sample weight (float32), and the loss scalar the update's finiteness check keeps."""
        N, D, s = cfg.train.batch_size, cfg.model.width, element
        image = N * shapes.channels * shapes.image_size[0] * shapes.image_size[1] * s
        T = self.plan_tokens(cfg, shapes)
        labels = 8 * N if cfg.gen.conditional else 0
        noise_embedding = N * (256 + 3 * D) * s
        head = 3 * N * T * D * s + 8 * N * T + 2 * N * D * s
        return 2 * image + labels + noise_embedding + head + 4 * N + 4 * N + 4

    @torch.no_grad()
    def evaluate(self, model, data, cfg: RunConfig, *, split: str = "test", limit: int = 0, device="cpu",
                 **options) -> dict:
        """The denoising loss at fixed levels (`eval_loss`); sample quality is score()'s job."""
        batches, n, gen = self.eval_batches(data, cfg, split, limit)
        total = 0.0
        with evaluating(model):
            for xb, yb in batches:
                total += model.denoising_loss(to_float(xb).to(device), yb.to(device), generator=gen) * len(yb)
        return {"eval_loss": total / n, "n": n}

    def results(self, ev: dict, split: str = "test") -> dict:
        out = {k: v for k, v in ev.items() if k != "n"}
        if split == "validation" and "eval_loss" in out:
            out["val_loss"] = out.pop("eval_loss")
        if "n" in ev:
            out["val_n" if split == "validation" else "test_n"] = ev["n"]
        return out

    def score(self, model, data, cfg: RunConfig, *, split: str = "test", device="cpu", progress: bool = False,
              reference: Reference | None = None, **options) -> dict:
        if reference is None:
            raise ValueError("FD needs a reference classifier: pass reference=train.reference_model")
        return evaluate_samples(model, cfg, data, reference=reference, split=split, device=device, progress=progress,
                                **{k: v for k, v in options.items() if v is not None})

    def sample(self, model: ImageGenerator, data, cfg: RunConfig, out: str, *, num: int, seed: int, writable,
               classes: str | None = None, nrow: int | None = None, npz: bool = False, scale: int | None = None,
               device="cpu", **ode) -> str:
        """A PNG grid of the first MAX_GRID samples at `out`; with `npz` all of them and their classes in OUT.npz.
        `ode`: steps, sampler, grid, cfg_scale (default: the run's gen settings)."""
        if not out.lower().endswith(".png"):
            raise ValueError(f"--out {out!r}: expected a .png path")
        npz_path = out[:-4] + ".npz"
        if npz:
            writable(npz_path, "--npz")
        classes = parse_ints(classes, "--classes", "0,1,2") if classes else None
        if classes is not None:
            model.check_classes(classes)
        if num > MAX_GRID and not npz:
            raise ValueError(f"--num {num}: a PNG grid shows at most {MAX_GRID} images; add --npz for more (the grid "
                             f"then shows the first {MAX_GRID})")
        shape = (model.channels, *model.image_size)
        if num * math.prod(shape) > MAX_NPZ_BYTES:
            raise ValueError(f"--num {num}: samples of {'x'.join(map(str, shape))} take "
                             f"{num * math.prod(shape) / 2**30:.1f} GiB, over the {MAX_NPZ_BYTES / 2**30:g} GiB one "
                             f"call holds; sample fewer per call (another --seed for more)")
        ode = {k: ode.get(k, getattr(cfg.gen, k)) for k in ("steps", "sampler", "grid", "cfg_scale")}
        images, labels, seconds = generate(model, num, seed=seed, classes=classes, uint8=True, device=device, **ode)
        sheet = grid(images[:MAX_GRID], nrow=nrow)
        scale = scale or min(readable_factor(*model.image_size), max(1, MAX_PNG_SIDE // max(sheet.shape[1:])))
        save_png(upscale(sheet, scale), out)
        said = (f"wrote {out}: {min(num, MAX_GRID)} of {num} samples, each pixel {scale}x{scale}, {ode['steps']} "
                f"steps, {seconds:.2f} s of sampling")
        if not npz:
            return said
        with io.atomic_file(npz_path) as f:
            np.savez(f, x=images.numpy(), **({"y": labels.numpy()} if labels is not None else {}))
        return f"{said}\nwrote {npz_path} (x: uint8 images" + (", y: classes)" if labels is not None else ")")

    def summary(self, results: dict) -> str:
        if self.metric in results:  # a scored run (block-parallel)
            return f"{results['method']}: {self.describe_score(results)}"
        what, key = ("validation", "val_loss") if "val_loss" in results else ("test", "eval_loss")
        return (f"{results['method']}: denoising loss on the {what} set {results[key]:.4f}; "
                f"{results['layer_updates']} layer-updates in {results['train_seconds']:.1f} s")

    def describe_score(self, score: dict) -> str:
        acc = f"; generated images classified as their class: {100 * score['class_accuracy']:.1f}%" \
            if "class_accuracy" in score else ""
        return (f"FD (classifier features) {score['fd_classifier_features']:.3f} over {score['num_generated']} "
                f"samples vs {score['num_real']} {score.get('split', 'test')} images (real-vs-real floor at this count "
                f"{score['fd_real_floor']:.3f}; {score['steps']} {score['sampler']} steps, cfg {score['cfg_scale']})"
                f"{acc}; sampling {1000 * score['seconds_per_image']:.2f} ms per image")

    def compare_extras(self, arms, base: RunConfig, out) -> tuple[dict, list[str]]:
        """Sampling time at equal steps (interleaved, median) and the same noise through the end-to-end and the
        block-wise arm's models."""
        e2e, blocks = pick(arms, "end-to-end"), pick(arms, "blocks")
        if e2e is None or blocks is None:
            return {}, []
        device = blocks.device  # sampling is timed where the arms trained
        models = {arm.role: arm.load(device) for arm in (e2e, blocks)}
        steps = base.gen.steps
        speed = interleaved_seconds({role: lambda i, m=model: m.sample(64, steps, device=device,
                                                                       generator=torch.Generator().manual_seed(i))
                                     for role, model in models.items()}, repeats=7)
        B = blocks.runs[0]["num_blocks"]
        panels, labels = {}, None
        for arm, model in zip((e2e, blocks), models.values()):
            x, labels = model.sample(SHEET_ROWS * SHEET_COLUMNS, steps, classes=list(range(model.num_classes)) or None,
                                     generator=torch.Generator().manual_seed(0), cfg_scale=base.gen.cfg_scale,
                                     device=device)
            panels[f"end-to-end ({arm.role})" if arm is e2e else f"DiffusionBlocks, B={B} ({arm.role})"] = to_uint8(x)
        # a class per column when the classes cycle with the grid's width (10 classes, 10 columns)
        cols = labels is not None and all(labels[i] == labels[i % SHEET_COLUMNS] for i in range(len(labels)))
        save_sheet(Path(out) / "samples.png", panels, nrow=SHEET_COLUMNS,
                   col_labels=[f"class {int(c)}" for c in labels[:SHEET_COLUMNS]] if cols else None,
                   title=f"the same noise{' and classes' if labels is not None else ''} through both models, "
                         f"{steps} Euler steps")
        ratio = speed[e2e.role] / speed[blocks.role]
        scores = [r["score"] for arm in arms.values() for r in arm.runs if "score" in r]
        acc = {role: [r["score"]["class_accuracy"] for r in arm.runs if "class_accuracy" in r.get("score", {})]
               for role, arm in arms.items()}
        counts = sorted({(s["num_generated"], s["num_real"]) for s in scores})
        floors = [s["fd_real_floor"] for s in scores if "fd_real_floor" in s]
        lines = ["generated images classified as their class: " + ", ".join(
            f"{role} {100 * statistics.mean(a):.1f}%" for role, a in acc.items() if a)] if any(acc.values()) else []
        if counts:
            lines.insert(0, "FD over " + ", ".join(f"{g} generated vs {r} test images" for g, r in counts)
                         + (f"; real-vs-real floor at that count {statistics.mean(floors):.3f}" if floors else ""))
        lines += [f"sampling at {steps} steps: DiffusionBlocks (B={B}) is {ratio:.2f}x faster than end-to-end "
                  f"{speedup_note(ratio, B)}; seconds per batch of 64: "
                  + ", ".join(f"{role} {seconds:.3f}" for role, seconds in speed.items()),
                  f"samples.png: the same noise through {e2e.role} (left) and {blocks.role} (right)"]
        return {"sampling_seconds_per_batch_of_64": speed, "sampling_speedup": ratio,
                "sampling_speedup_above_ideal": ratio > B}, lines


TASK = ImageGenTask


@preset("gen-tiny")
def preset_gen_tiny() -> RunConfig:
    """Seconds on a CPU: class-conditional DiT on digits (8x8, 2x2 patches), 4 layers of width 32, B = 2."""
    cfg = load_preset("tiny")
    cfg.task = "imagegen"
    cfg.data.crop_padding = 0
    cfg.train.lr = 2e-3
    cfg.gen.steps = 8
    cfg.gen.fd_samples = 360
    return cfg


@preset("gen-fashion")
def preset_gen_fashion() -> RunConfig:
    """Fashion-MNIST DiT: 6 layers of width 128, 4x4 patches (49 tokens), B = 3, no augmentation."""
    cfg = RunConfig(task="imagegen")
    cfg.model = BackboneConfig(depth=6, width=128, heads=4, patch=4, mlp_ratio=2.0)
    cfg.data.crop_padding = 0
    cfg.data.hflip = False
    cfg.train.lr = 1e-3
    cfg.train.steps = 2000
    cfg.train.eval_limit = 500
    return cfg


@preset("gen-quick")
def preset_gen_quick() -> RunConfig:
    """A few minutes: the Fashion-MNIST DiT on a tenth of the steps, FD over 500 samples."""
    cfg = preset_gen_fashion()
    cfg.train.steps = 200
    cfg.gen.fd_samples = 500
    return cfg


@preset("gen-dit-s")
def preset_gen_dit_s() -> RunConfig:
    """DiT-S/2-like for a GPU: CIFAR-10 (32x32x3, 2x2 patches: 256 tokens), 12 layers of width 384, 6 heads."""
    cfg = preset_gen_fashion()
    cfg.data.name, cfg.data.hflip = "cifar10", True
    cfg.model = BackboneConfig(depth=12, width=384, heads=6, patch=2, mlp_ratio=4.0)
    cfg.train.lr, cfg.train.steps, cfg.train.ema, cfg.train.device = 2e-4, 100_000, 0.9999, "auto"
    return cfg
