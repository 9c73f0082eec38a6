"""Hinton's supervised Forward-Forward for a ViT (Hinton 2022). The DiffusionBlocks paper's Table 1 baseline adapts
Contrastive Forward-Forward instead (Aghagolzadeh and Ezoji 2025; methods/cff.py); this one is kept beside it.

The label is an extra token beside the image patches. A positive sample carries its true label, a negative
one the same image with a wrong label (drawn uniformly from the other classes, never the true one). Each
layer is trained alone to make its goodness g (the mean squared activation of its output) high on
positives and low on negatives: softplus(theta - g_pos) + softplus(g_neg - theta). Between layers the
activations are detached and every token is normalised to unit root-mean-square, so a layer cannot read
the previous layer's goodness, only the direction of its output. One optimizer per layer; the patch
embedding and label table train with the first layer.

Inference (two ways, both reported): the label sweep runs the network once per class and picks the class
with the highest goodness summed over the layers (all but the first when there are two or more, as Hinton
does): C forward passes per image, `test_accuracy`. The readout is a linear classifier on the frozen,
normalised, token-averaged outputs of the same layers under a neutral label token, trained alongside on
detached features: one forward pass, `test_accuracy_readout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig, RunConfig, section, setting
from ..models import PatchEmbed, vit_layers
from .base import Method, Optimizer, layer_by_layer, stream_seed, update


@section("ff")
@dataclass
class FFConfig:
    """Hinton's Forward-Forward (train.method=ff). Departures chosen on validation: benchmarks/README.md, baselines."""

    theta: float = setting(0.5, "the goodness threshold (goodness: the mean squared activation; 1 for a fresh layer "
                                "on its normalised input)", range="(-inf, inf)")
    readout: bool = setting(True, "also train a linear readout on the frozen features (under the neutral label)")
    neutral: str = setting("own", "the readout's neutral label token: own (a row of the label table that no goodness "
                                  "loss sees) or mean (of the class rows: Hinton's, 1/C of each class)",
                           choices=("own", "mean"))


def rms_normalize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token to unit root-mean-square: its length (the goodness) is hidden from the next layer."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class FFClassifier(nn.Module):
    """[label token] + patches through the ViT layers; every layer is read by its goodness."""

    inference_options = ()  # no sampler to set

    def __init__(self, model: BackboneConfig, ff: FFConfig, image_size, channels: int, num_classes: int):
        super().__init__()
        self.num_classes, self.width = num_classes, model.width
        self.patches = PatchEmbed(image_size, channels, model.patch, model.width)
        self.labels = nn.Embedding(num_classes + 1, model.width)  # row num_classes: the neutral label (readout)
        self.layers = nn.ModuleList(vit_layers(model))
        self.num_layers = model.depth
        self.scored = list(range(1, model.depth)) if model.depth > 1 else [0]  # the layers the sweep and readout read
        self.readout = nn.Linear(len(self.scored) * model.width, num_classes)
        self.theta, self.neutral = ff.theta, ff.neutral

    def embed(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), (N,) -> the first layer's input (N, 1 + T, D), normalised. Label num_classes is the
        neutral one: its own row, or (ff.neutral=mean) the mean of the class rows."""
        tokens = self.labels(labels)
        if self.neutral == "mean":
            tokens = torch.where((labels == self.num_classes)[:, None],
                                 self.labels.weight[:self.num_classes].mean(0), tokens)
        return rms_normalize(torch.cat([tokens[:, None], self.patches(x)], dim=1))

    def layer(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i on its input: (its output, its goodness per sample (N,))."""
        out = self.layers[i](h, h.new_zeros(h.shape[0], self.width))  # adaLN layers with a zero condition
        return out, out.pow(2).mean((1, 2))

    def layer_loss(self, i: int, h: torch.Tensor, positives: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The goodness loss per sample pair (positives,) of layer i on [positives; negatives], and its output."""
        out, g = self.layer(i, h)
        loss = F.softplus(self.theta - g[:positives]) + F.softplus(g[positives:] - self.theta)
        return loss, out

    def run(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers: (goodness summed over the scored layers (N,), their normalised token means (N, S * D))."""
        h, total, features = self.embed(x, labels), 0, []
        for i in range(self.num_layers):
            out, g = self.layer(i, h)
            h = rms_normalize(out)
            if i in self.scored:
                total = total + g
                features.append(h.mean(1))
        return total, torch.cat(features, dim=-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The readout's input: the layers' outputs under the neutral label."""
        return self.run(x, torch.full((x.shape[0],), self.num_classes, device=x.device))[1]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, **_) -> list[torch.Tensor]:
        """The label sweep: one pass per class, the class of highest goodness."""
        goodness = torch.stack([self.run(x, torch.full((x.shape[0],), c, device=x.device))[0]
                                for c in range(self.num_classes)], dim=-1)  # (N, C)
        return [goodness.argmax(-1)]

    @torch.no_grad()
    def other_predictions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"readout": self.readout(self.features(x)).argmax(-1)}


def negative_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A wrong label for each sample, uniform over the other classes (never the true one)."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator).to(y.device)
    return (y + shift) % num_classes


class ForwardForward(Method):
    """Every step trains every layer once, each on its own goodness loss, in order; then the readout."""

    name, title = "ff", "Hinton's Forward-Forward"
    model_form = "forward-forward"
    classifier = FFClassifier

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.model.checkpoint:
            raise ValueError("model.checkpoint: Hinton's Forward-Forward keeps one layer's activations at a time "
                             "already")

    def __init__(self, model: FFClassifier, cfg: RunConfig, total_steps: int, **_):
        self.model, self.cfg, self.total = model, cfg, total_steps
        stem = list(model.patches.parameters()) + list(model.labels.parameters())
        self.units = [stem * (i == 0) + list(layer.parameters()) for i, layer in enumerate(model.layers)]
        self.opts = [Optimizer(p, cfg, total_steps) for p in self.units]
        self.readout = list(model.readout.parameters()) if cfg.ff.readout else []
        self.readout_opt = Optimizer(self.readout, cfg, total_steps) if self.readout else None
        self.trained = {id(p) for p in model.parameters()}
        self.negatives = torch.Generator().manual_seed(stream_seed(cfg.train.seed) + 5)

    def stream_seeds(self) -> dict[int, int]:
        return {0: stream_seed(self.cfg.train.seed)}

    def next_block(self) -> int:
        return 0

    def _inputs(self, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        y_neg = negative_labels(y, self.model.num_classes, self.negatives)
        return self.model.embed(torch.cat([x, x]), torch.cat([y, y_neg])), len(y)

    def probe_loss(self, batch):
        """The first layer's loss with the stem: the most a step holds at once (one layer's graph on 2N)."""
        h, n = self._inputs(batch)
        return self.model.layer_loss(0, h, n)[0].mean()

    def step(self, batch, block: int = 0) -> dict:
        h, n = self._inputs(batch)
        out, _ = layer_by_layer(self.units, self.opts, h, lambda i, h: self.model.layer_loss(i, h, n),
                                self.cfg.train.clip, handoff=rms_normalize)  # the next layer sees the direction only
        if out.get("skipped"):
            return out
        out.update(layers=self.model.num_layers, trained=self.trained)
        if self.readout_opt is not None:  # the linear readout on detached features: no layer learns from it
            x, y = batch
            with torch.no_grad():
                features = self.model.features(x)
            ce = F.cross_entropy(self.model.readout(features), y)
            out["readout_loss"] = update(ce, self.readout, [self.readout_opt], self.cfg.train.clip)["loss"]
        return out

    def optimizers(self):
        return [o.opt for o in self.opts] + ([self.readout_opt.opt] if self.readout_opt else [])

    def state_dict(self):
        return {"opts": [o.state_dict() for o in self.opts],
                "readout_opt": self.readout_opt.state_dict() if self.readout_opt else None,
                "negatives": self.negatives.get_state()}

    def load_state_dict(self, state):
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)
        if self.readout_opt is not None:
            self.readout_opt.load_state_dict(state["readout_opt"])
        self.negatives.set_state(state["negatives"])


METHOD = ForwardForward
