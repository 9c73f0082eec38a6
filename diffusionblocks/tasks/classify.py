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
from ..config import RunConfig, allocation_of
from ..data import to_float
from ..models import LabelHead, LabelStem, ViTClassifier, vit_layers
from ..noise import LogNormalLevels, Partition
from ..precond import ClassEmbedding, ce_loss, label_target
from ..sample import euler
from .base import ImageShapes, ImageTask, check_label_table, unknown_form


def layers_of(m) -> list[nn.Module]:
    return vit_layers(m.depth, m.width, m.heads, m.mlp_ratio, m.dropout, layer=m.layer,
                      recompute_gate=m.gate_recompute)


class EndToEndClassifier(nn.Module):
    """The plain ViT, trained with cross-entropy through all layers."""

    def __init__(self, cfg: RunConfig, image_size, channels: int, num_classes: int):
        super().__init__()
        m = cfg.model
        self.vit = ViTClassifier(layers_of(m), image_size,
                                 channels, m.patch, m.width, num_classes, checkpoint_every=m.checkpoint)
        self.num_layers = m.depth

    inference_options = ()  # a plain forward pass: no sampler to set

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.vit(x), y, reduction="none")  # (N,)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, **_) -> list[torch.Tensor]:
        return [self.vit(x).argmax(-1)]


class DiffusionClassifier(StackModel, nn.Module):
    """The same layers cut into B label denoisers (DiffusionBlocks)."""

    def __init__(self, cfg: RunConfig, image_size, channels: int, num_classes: int):
        super().__init__()
        m, d = cfg.model, cfg.dblocks
        label_dim = m.label_dim or m.width
        self.cfg = d
        self.partition = Partition.create(LogNormalLevels(), d.num_blocks, kind=d.partition, gamma=d.gamma)
        gen = torch.Generator().manual_seed(1234)  # the label table is fixed, and the same in every run
        self.labels = ClassEmbedding(num_classes, label_dim, learnable=d.label_table == "learned", generator=gen)
        self.stack = BlockStack(layers_of(m),
                                LabelStem(image_size, channels, m.patch, m.width, label_dim, m.noise_scale),
                                LabelHead(m.width, label_dim, m.label_head), self.partition,
                                allocation=allocation_of(cfg), shared_stem_head=d.shared_stem_head,
                                checkpoint_every=m.checkpoint)
        self.add_readout(lambda: nn.Linear(label_dim, num_classes))  # per block when stem/head are replicated

    inference_options = ("steps_per_block", "grid", "bridge", "sigma_start", "init")

    def extra_shared(self) -> list[nn.Parameter]:
        return list(self.labels.parameters())  # a learned label table

    def block_loss(self, block: int, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """Per-sample loss (N,) of `block` alone; no other block runs."""
        target = self.training_target(y, generator)
        z, sigma = self.stack.noisy_input(block, target, generator)
        if self.cfg.input_clean:  # the noise-free kind of point the inference chain hands a block
            clean = torch.rand(y.shape[0], 1, generator=generator).to(y.device) < self.cfg.input_clean
            z = torch.where(clean, target, z)
        logits = self.readout_of(block)(self.stack.denoise(block, z, sigma, x))  # the target stays y
        weight = self.stack.precond.weight(sigma) if self.cfg.loss_weight == "edm" else None
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
        dblocks.input_clean feeds that kind of point: see block_loss.)
        """
        return label_target(self.labels, y, self.cfg.input_flip, self.cfg.input_mix, generator)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, *, steps_per_block: int | None = None, grid: str | None = None,
                bridge: str | None = None, sigma_start: float | None = None, init: str | None = None,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Class predictions after every Euler step (the last entry is the model's prediction)."""
        grid = self.partition.inference_grid(steps_per_block or self.cfg.steps_per_block, grid or self.cfg.grid)
        sigma_start = self.cfg.sigma_start if sigma_start is None else sigma_start
        lo, hi = self.partition.levels.lo, self.partition.levels.hi
        if sigma_start and not lo <= sigma_start <= hi:
            raise ValueError(f"sigma_start={sigma_start:g}: expected 0 (start at sigma_max) or a noise level the "
                             f"blocks trained on, in [{lo:g}, {hi:g}]")
        if sigma_start:  # start lower: drop the levels above sigma_start
            grid = torch.cat([grid.new_tensor([sigma_start]), grid[grid < sigma_start]])
        bridge, init = bridge or self.cfg.bridge, init or self.cfg.init
        estimate = lambda logits: self.labels.estimate(logits, bridge)  # x0 from logits, (N, Dy)
        preds = []

        def denoiser(z, sigma, images):
            block = int(self.partition.route(sigma[:1]))
            logits = self.readout_of(block)(self.stack.denoise(block, z, sigma, images))
            preds.append(logits.argmax(-1))
            return estimate(logits).to(x.dtype)

        noise = torch.randn(x.shape[0], self.labels.table.shape[1], generator=generator, dtype=x.dtype,
                            device=generator.device if generator is not None else "cpu").to(x.device)
        z = grid[0].item() * noise if init == "noise" else torch.zeros_like(noise)  # (N, Dy)
        euler(denoiser, z, grid, x)
        return preds


class ClassifyTask(ImageTask):
    """Image classification: accuracy of the final prediction, and after every inference step."""

    name = "classify"
    metric, higher_is_better, result_metric, curve_metric = "accuracy", True, "test_accuracy", "accuracy"
    percent, paper_gap = True, "paper, CIFAR-100: -0.95"
    compare_roles = ("e2e", "control", "dblocks")
    presets = {"full": "fashion", "quick": "quick", "offline": "digits", "offline-quick": "digits-quick"}
    eval_options = ("limit", *DiffusionClassifier.inference_options)
    forms = {"end-to-end": EndToEndClassifier, "blocks": DiffusionClassifier}
    classifies_images = True

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        check_label_table(cfg)

    def build_model(self, cfg: RunConfig, data, form: str) -> nn.Module:
        if form not in self.forms:
            raise unknown_form(self.name, form, tuple(self.forms))
        return self.forms[form](cfg, data.image_size, data.channels, data.num_classes)

    def build_classifier(self, cfg: RunConfig, data, model: type[nn.Module]) -> nn.Module:
        return model(cfg, data.image_size, data.channels, data.num_classes)

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
        was_training = model.training
        model.eval()
        batches, n, gen = self.eval_batches(data, cfg, split, limit)
        correct, other = None, {}
        for xb, yb in batches:
            x = to_float(xb).to(device)
            preds = model.predict(x, generator=gen, **options)
            hits = torch.stack([(p.cpu() == yb).sum() for p in preds])
            correct = hits if correct is None else correct + hits
            # a second way to read a prediction off the same model (Forward-Forward's linear readout)
            for name, p in getattr(model, "other_predictions", lambda _: {})(x).items():
                other[name] = other.get(name, 0) + int((p.cpu() == yb).sum())
        model.train(was_training)
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

    def compare_extras(self, runs, load, base, out) -> tuple[dict, list[str]]:
        """Accuracy after each inference step of the block-wise arm (mean over seeds)."""
        if "dblocks" not in runs:
            return {}, []
        per_step = [sum(s) / len(s) for s in zip(*(r["accuracy_per_step"] for r in runs["dblocks"]))]
        steps = ", ".join(f"{100 * a:.2f}" for a in per_step)
        line = f"DiffusionBlocks accuracy after each inference step (%): {steps}"
        return {"dblocks_accuracy_per_step": per_step}, [line]


def _others(results: dict, prefix: str) -> str:
    """The other readings of the same model, e.g. "; readout 61.11%" (Forward-Forward's linear readout)."""
    return "".join(f"; {k[len(prefix):]} {100 * v:.2f}%" for k, v in results.items()
                   if k.startswith(prefix) and not k.endswith("per_step"))


TASK = ClassifyTask
