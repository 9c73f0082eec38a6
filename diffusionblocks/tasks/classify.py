"""Image classification as denoising of a label embedding (paper Sec. 4.1, App. A/B; METHOD.md section 4).

The target y is the L2-normalised embedding of the class label. Block b sees the image and
z = y + sigma * eps with sigma in its own range; the noisy embedding (times c_in) takes the CLS token's
place, D is read at that position and a shared linear readout turns D into logits; the loss is a
per-sample (optionally EDM-weighted) cross-entropy. Inference runs Euler steps from sigma_max, each x0
estimate built from the logits (soft: softmax(logits) @ E; hard: E[argmax]); the prediction is the
argmax of the last step's logits.

The defaults depart from the paper in four measured settings (init, input_flip, input_mix, loss_weight;
README and benchmarks/README.md): each can be set back to the paper's value.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..blocks import BlockStack, StackModel
from ..config import BackboneConfig, BlocksConfig, ChainConfig, DataConfig, RunConfig, TrainConfig, construct, preset
from ..data import to_float
from ..models import LabelHead, LabelStem, ViTClassifier, vit_layers
from ..noise import LogNormalLevels, Partition
from ..precond import ClassEmbedding, ce_loss, label_target
from ..sample import euler
from .base import check_label_table, evaluating
from .images import ImageShapes, ImageTask
from .optional import pick


class EndToEndClassifier(nn.Module):
    """The plain ViT, trained with cross-entropy through all layers."""

    def __init__(self, model: BackboneConfig, image_size, channels: int, num_classes: int):
        super().__init__()
        self.vit = ViTClassifier(vit_layers(model), image_size, channels, model.patch, model.width, num_classes,
                                 checkpoint_every=model.checkpoint)
        self.num_layers = model.depth

    inference_options = ()  # a plain forward pass: no sampler to set

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.vit(x), y, reduction="none")  # (N,)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, **_) -> list[torch.Tensor]:
        return [self.vit(x).argmax(-1)]

    @torch.no_grad()
    def step_logits(self, x: torch.Tensor, **_) -> list[torch.Tensor]:
        """The class logits (N, classes), as the one entry of a list (DiffusionClassifier's form)."""
        return [self.vit(x)]


class LabelChain(StackModel, nn.Module):
    """Any stem, layers and head cut into B label denoisers: the stem reads the noisy label embedding z_in
    (N, label_dim) and the input as its condition, the head returns (N, label_dim), a readout per block (or shared)
    gives the class logits; inference is the Euler chain over the label embedding."""

    def __init__(self, stem: nn.Module, layers: list[nn.Module], head: nn.Module, blocks: BlocksConfig,
                 chain: ChainConfig, num_classes: int, label_dim: int, checkpoint_every: int = 0):
        super().__init__()
        self.chain_cfg = chain
        self.partition = Partition.create(LogNormalLevels(), blocks.num_blocks, kind=blocks.partition,
                                          gamma=blocks.gamma)
        gen = torch.Generator().manual_seed(1234)  # the label table is fixed, and the same in every run
        self.labels = ClassEmbedding(num_classes, label_dim, learnable=chain.label_table == "learned", generator=gen)
        self.stack = BlockStack(layers, stem, head, self.partition, allocation=blocks.layers_per_block(),
                                shared_stem_head=blocks.shared_stem_head, checkpoint_every=checkpoint_every)
        self.add_readout(lambda: nn.Linear(label_dim, num_classes))  # per block when stem/head are replicated

    inference_options = ("steps_per_block", "grid", "bridge", "sigma_start", "init")

    def extra_shared(self) -> list[nn.Parameter]:
        return list(self.labels.parameters())  # a learned label table

    def block_loss(self, block: int, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """Per-sample loss (N,) of `block` alone; no other block runs."""
        target = self.training_target(y, generator)
        z, sigma = self.stack.noisy_input(block, target, generator)
        if self.chain_cfg.input_clean:  # the noise-free kind of point the inference chain hands a block
            clean = torch.rand(y.shape[0], 1, generator=generator).to(y.device) < self.chain_cfg.input_clean
            z = torch.where(clean, target, z)
        logits = self.readout_of(block)(self.stack.denoise(block, z, sigma, x))  # the target stays y
        weight = self.stack.precond.weight(sigma) if self.chain_cfg.loss_weight == "edm" else None
        return ce_loss(logits, y, weight)

    def training_target(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The clean point that gets noised for a training step, (N, Dy).

        The paper's is the label's normalised embedding. Two departures, both settings, both keeping each
        block's training independent of the other blocks (benchmarks/README.md has the evidence):
        input_flip: a fraction of labels replaced by a uniformly drawn *other* class, so that a block
        learns to check the label it can read at low noise against the image instead of copying it;
        input_mix: a fraction of points replaced by a random soft mixture softmax(k * onehot(label) + g) @ E
        (k ~ U(0, 6), g ~ N(0, I)): an ambiguous estimate to denoise towards the true class. (It does not
        make the noised input look like the point the chain hands over, which is 3 to 6 times shorter;
        chain.input_clean feeds that kind of point: see block_loss.)
        """
        return label_target(self.labels, y, self.chain_cfg.input_flip, self.chain_cfg.input_mix, generator)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, **options) -> list[torch.Tensor]:
        """Class predictions after every Euler step (the last entry is the model's prediction)."""
        return [logits.argmax(-1) for logits in self.step_logits(x, **options)]

    @torch.no_grad()
    def step_logits(self, x: torch.Tensor, *, steps_per_block: int | None = None, grid: str | None = None,
                    bridge: str | None = None, sigma_start: float | None = None, init: str | None = None,
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The class logits (N, classes) after every Euler step (the last entry is the model's)."""
        c = self.chain_cfg
        grid = self.partition.inference_grid(steps_per_block or c.steps_per_block, grid or c.grid)
        sigma_start = c.sigma_start if sigma_start is None else sigma_start
        lo, hi = self.partition.levels.lo, self.partition.levels.hi
        if sigma_start and not lo <= sigma_start <= hi:
            raise ValueError(f"sigma_start={sigma_start:g}: expected 0 (start at sigma_max) or a noise level the "
                             f"blocks trained on, in [{lo:g}, {hi:g}]")
        if sigma_start:  # start lower: drop the levels above sigma_start
            grid = torch.cat([grid.new_tensor([sigma_start]), grid[grid < sigma_start]])
        bridge, init = bridge or c.bridge, init or c.init
        estimate = lambda logits: self.labels.estimate(logits, bridge)  # x0 from logits, (N, Dy)
        preds = []

        def denoiser(z, sigma, images):
            block = int(self.partition.route(sigma[:1]))
            logits = self.readout_of(block)(self.stack.denoise(block, z, sigma, images))
            preds.append(logits)
            return estimate(logits).to(x.dtype)

        noise = torch.randn(x.shape[0], self.labels.table.shape[1], generator=generator, dtype=x.dtype,
                            device=generator.device if generator is not None else "cpu").to(x.device)
        z = grid[0].item() * noise if init == "noise" else torch.zeros_like(noise)  # (N, Dy)
        euler(denoiser, z, grid, x)
        return preds


class DiffusionClassifier(LabelChain):
    """The ViT's layers cut into B label denoisers (DiffusionBlocks): the image's patches and the noisy label
    embedding in the CLS token's place."""

    def __init__(self, model: BackboneConfig, blocks: BlocksConfig, chain: ChainConfig, image_size, channels: int,
                 num_classes: int):
        m, label_dim = model, model.label_dim or model.width
        layers = vit_layers(m)  # the draws in the order they have always been made: layers, stem, head, readout
        stem = LabelStem(image_size, channels, m.patch, m.width, label_dim, m.noise_scale)
        head = LabelHead(m.width, label_dim, m.label_head)
        super().__init__(stem, layers, head, blocks, chain, num_classes, label_dim, m.checkpoint)


class ClassifyTask(ImageTask):
    """Image classification: accuracy of the final prediction, and after every inference step."""

    name = "classify"
    metric, higher_is_better = "accuracy", True
    percent, paper_gap = True, "paper, CIFAR-100: -0.95"
    compare_roles = ("e2e", "e2e-steps", "control", "dblocks")
    presets = {"full": "fashion", "quick": "quick", "offline": "digits", "offline-quick": "digits-quick"}
    eval_options = ("limit", *DiffusionClassifier.inference_options)
    forms = {"end-to-end": EndToEndClassifier, "blocks": DiffusionClassifier}
    classifies_images = True

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        check_label_table(cfg)

    def build_model(self, cfg: RunConfig, data, form: str) -> nn.Module:
        return self.build_classifier(cfg, data, self.forms[form])

    def build_classifier(self, cfg: RunConfig, data, model: type[nn.Module]) -> nn.Module:
        return construct(model, cfg, image_size=data.image_size, channels=data.channels, num_classes=data.num_classes)

    def plan_tokens(self, cfg: RunConfig, shapes: ImageShapes, form: str = "end-to-end") -> int:
        """Patches plus the CLS / label token."""
        p = cfg.model.patch
        return math.ceil(shapes.image_size[0] / p) * math.ceil(shapes.image_size[1] / p) + 1

    def plan_outer_bytes(self, cfg: RunConfig, shapes: ImageShapes, model: nn.Module, element: int) -> int:
        """The image for the patch convolution, the head's norm and linear on the read token, the loss; for
        dblocks also the label embedding's input and the noise embedding's MLP."""
        m, s = cfg.model, element
        N, D = cfg.train.batch_size, m.width
        h, w = shapes.image_size
        image = N * shapes.channels * h * w * s
        head = N * (2 * D * s + 8) + N * shapes.num_classes * s  # LN input copy + stats, LN output; log-softmax
        if not isinstance(model, DiffusionClassifier):  # end to end
            cond = N * D * s if m.layer == "adaln" else 0  # the zero conditioning vector, once for all layers
            return image + head + cond
        label_dim = m.label_dim or D
        noise_embedding = N * (256 + 3 * D) * s  # sinusoidal features, hidden (SiLU input and output), c
        label = N * label_dim * s  # label_in's input
        readout = N * label_dim * s  # D(z) into the readout
        return image + head + noise_embedding + label + readout

    @torch.no_grad()
    def evaluate(self, model, data, cfg: RunConfig, *, split: str = "test", limit: int = 0, device="cpu",
                 **options) -> dict:
        options = {k: v for k, v in options.items() if v is not None}
        unused = [k for k in options if k not in model.inference_options]
        if unused:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: sampler options of a "
                             f"DiffusionBlocks classifier; this run is {cfg.train.method} "
                             f"({type(model).__name__})")
        batches, n, gen = self.eval_batches(data, cfg, split, limit)
        correct, other = None, {}
        with evaluating(model):
            for xb, yb in batches:
                x = to_float(xb).to(device)
                preds = model.predict(x, generator=gen, **options)
                hits = torch.stack([(p.cpu() == yb).sum() for p in preds])
                correct = hits if correct is None else correct + hits
                # a second way to read a prediction off the same model (Forward-Forward's linear readout)
                for name, p in getattr(model, "other_predictions", lambda _: {})(x).items():
                    other[name] = other.get(name, 0) + int((p.cpu() == yb).sum())
        per_step = (correct.double() / n).tolist()
        return {"accuracy": per_step[-1], "accuracy_per_step": per_step,
                **{f"accuracy_{name}": hits / n for name, hits in other.items()}, "n": n}

    def results(self, ev: dict, split: str = "test") -> dict:
        prefix = "val_" if split == "validation" else "test_"
        other = {prefix + k: v for k, v in ev.items() if k.startswith("accuracy_") and k != "accuracy_per_step"}
        if split == "validation":
            return {"val_accuracy": ev["accuracy"], "val_accuracy_per_step": ev["accuracy_per_step"], "val_n": ev["n"],
                    **other}
        return {"test_accuracy": ev["accuracy"], "accuracy_per_step": ev["accuracy_per_step"], "test_n": ev["n"],
                **other}

    def summary(self, results: dict) -> str:
        what, key = ("validation", "val_") if "val_accuracy" in results else ("test", "test_")
        per_step = results["val_accuracy_per_step" if key == "val_" else "accuracy_per_step"]
        steps = ", ".join(f"{100 * a:.2f}" for a in per_step)
        return (f"{results['method']}: {what} accuracy {100 * results[key + 'accuracy']:.2f}% (after each inference "
                f"step: {steps}{_others(results, key + 'accuracy_')}); {results['layer_updates']} layer-updates in "
                f"{results['train_seconds']:.1f} s")

    def describe_score(self, score: dict) -> str:
        steps = ", ".join(f"{100 * a:.2f}" for a in score["accuracy_per_step"])
        return (f"{score.get('split', 'test')} accuracy {100 * score['accuracy']:.2f}% on {score['n']} images "
                f"(after each inference step: {steps}{_others(score, 'accuracy_')})")

    def compare_extras(self, arms, base, out) -> tuple[dict, list[str]]:
        """Accuracy after each inference step of the block-wise arm (mean over seeds)."""
        blocks = pick(arms, "blocks")
        if blocks is None:
            return {}, []
        per_step = [sum(s) / len(s) for s in zip(*(r["accuracy_per_step"] for r in blocks.runs))]
        steps = ", ".join(f"{100 * a:.2f}" for a in per_step)
        line = f"DiffusionBlocks accuracy after each inference step (%): {steps}"
        return {f"{blocks.role}_accuracy_per_step": per_step}, [line]


def _others(results: dict, prefix: str) -> str:
    """The other readings of the same model, e.g. "; readout 61.11%" (Forward-Forward's linear readout)."""
    return "".join(f"; {k[len(prefix):]} {100 * v:.2f}%" for k, v in results.items()
                   if k.startswith(prefix) and not k.endswith("per_step"))


TASK = ClassifyTask


@preset("tiny")
def preset_tiny() -> RunConfig:
    """Seconds on a CPU: digits, a 4-layer width-32 ViT. For tests and smoke runs."""
    cfg = RunConfig()
    cfg.data = DataConfig(name="digits", crop_padding=0, hflip=False)
    cfg.model = BackboneConfig(depth=4, width=32, heads=2, patch=2, mlp_ratio=2.0)
    cfg.blocks.num_blocks = 2
    cfg.train = TrainConfig(steps=150, batch_size=64, lr=3e-3, eval_limit=360, log_every=10, ckpt_every=1000)
    return cfg


@preset("fashion")
def preset_fashion() -> RunConfig:
    """The compare preset, about 30 minutes for its four arms on 2 CPU cores: Fashion-MNIST, a 6-layer ViT of
    width 96 with 7x7 patches (16 tokens), 2500 end-to-end steps of batch 128 (5.3 epochs); sized in
    benchmarks/README.md."""
    cfg = RunConfig()
    cfg.model = BackboneConfig(depth=6, width=96, heads=4, patch=7, mlp_ratio=2.0)
    cfg.train.lr = 2e-3
    cfg.train.steps = 2500
    return cfg


@preset("quick")
def preset_quick() -> RunConfig:
    """About 3.5 minutes for the four arms: the fashion preset on a tenth of the steps."""
    cfg = preset_fashion()
    cfg.train.steps = 250
    cfg.train.eval_limit = 1000
    return cfg


@preset("digits")
def preset_digits() -> RunConfig:
    """The compare preset where Fashion-MNIST is missing: scikit-learn digits (8x8)."""
    cfg = preset_tiny()
    cfg.model = BackboneConfig(depth=6, width=64, heads=4, patch=2, mlp_ratio=2.0)
    cfg.blocks.num_blocks = 3
    cfg.train.steps = 600
    return cfg


@preset("digits-quick")
def preset_digits_quick() -> RunConfig:
    """The digits preset on a sixth of the steps."""
    cfg = preset_digits()
    cfg.train.steps = 100
    return cfg


@preset("vit12")
def preset_vit12() -> RunConfig:
    """The memory benchmark's model: Fashion-MNIST, a 12-layer ViT of width 128 with 4x4 patches (50
    tokens), batch 128. B = 2, 3, 4, 6 split it evenly."""
    cfg = RunConfig()
    cfg.model = BackboneConfig(depth=12, width=128, heads=4, patch=4, mlp_ratio=2.0)
    return cfg


@preset("vit-s")
def preset_vit_s() -> RunConfig:
    """A larger ViT for a GPU: 12 layers of width 384, 6 heads, 4x4 patches on Fashion-MNIST."""
    cfg = preset_vit12()
    cfg.model = BackboneConfig(depth=12, width=384, heads=6, patch=4, mlp_ratio=4.0)
    cfg.train.device = "auto"
    return cfg
