"""Contrastive Forward-Forward for a ViT (Aghagolzadeh and Ezoji 2025), the method the DiffusionBlocks paper adapts
for its Table 1 Forward-Forward baseline (App. E.1); Hinton's supervised Forward-Forward is methods/ff.py.

Each layer is trained alone on a supervised contrastive loss of its own output, mean-pooled over the tokens and
L2-normalised: for an anchor i with positives P(i) (the other samples of its class in the batch),
loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(s'_ip / tau) / sum_{a != i} exp(s'_ia / tau) ),
s'_ia = min(s_ia + m_l, 1) for a positive, s_ia otherwise (s: cosine similarity); the positive margin m_l runs
linearly from cff.margin_first at the first layer to cff.margin_last at the last (the "marginal" contrastive loss:
early layers stop pulling a class together sooner). A layer's input is the previous layer's output, detached: no
gradient crosses a layer. One AdamW per layer; the patch embedding trains with layer 0. Prediction: a LayerNorm +
linear head on the last layer's token mean, trained with cross-entropy on detached features (no layer learns from
it); one forward pass per image.

What departs from the original (its paper and its public code, read for facts):
- one view per image: the original contrasts two augmented views of each image (two forward passes per layer);
  here each image is seen once per step, its positives the other same-class samples of the batch (the original
  code's one-view variant). The digits preset has no augmentation, so a second view would repeat the first.
- the head trains alongside the layers, each step on that step's detached last-layer features, instead of in a
  second stage on the frozen encoder; it adds no layer-updates to the budget.
- the layers are this library's ViT layers (adaLN-zero with a zero condition, the same as every other method's),
  not the original's post-residual pre-norm blocks, and the stem is the shared patch embedding (a convolution and
  learned positions, no ReLU); one learning-rate schedule (train.*) for layers and head alike.
- an anchor with no positive in the batch contributes zero loss (the original code's convention as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig, RunConfig, section, setting
from ..models import PatchEmbed, vit_layers
from .base import Method, Optimizer, layer_by_layer, stream_seed, update
from .dgl import AuxHead


@section("cff")
@dataclass
class CFFConfig:
    """Contrastive Forward-Forward (train.method=cff). Values chosen on validation: benchmarks/README.md, baselines."""

    temperature: float = setting(0.15, "the contrastive loss's temperature tau (the original's default 0.15)",
                                 range="(0, inf)")
    margin_first: float = setting(0.4, "the positive margin added to same-class cosine similarities (capped at 1) at "
                                       "the first layer", range="[0, 2]")
    margin_last: float = setting(0.1, "the positive margin at the last layer (linear in between)", range="[0, 2]")


def contrastive_loss(z: torch.Tensor, y: torch.Tensor, temperature: float, margin: float) -> torch.Tensor:
    """Supervised contrastive loss per anchor (N,) of features z (N, D) with labels y (N,): positives are the other
    samples of the same class, their cosine similarity raised by `margin` (capped at 1); 0 for an anchor without one."""
    z = F.normalize(z, dim=-1)
    s = z @ z.T  # (N, N) cosine similarities
    self_pair = torch.eye(len(y), dtype=torch.bool, device=z.device)
    positive = (y[:, None] == y[None, :]) & ~self_pair
    s = torch.where(positive, (s + margin).clamp(max=1.0), s)
    logits = (s / temperature).masked_fill(self_pair, float("-inf"))  # an anchor is not its own candidate
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positive.sum(1)
    return -log_prob.masked_fill(~positive, 0.0).sum(1) / count.clamp(min=1)


class CFFClassifier(nn.Module):
    """Patches through the ViT layers, each trained on its contrastive loss; a linear head on the last one."""

    inference_options = ()  # no sampler to set

    def __init__(self, model: BackboneConfig, cff: CFFConfig, image_size, channels: int, num_classes: int):
        super().__init__()
        self.width, self.num_layers = model.width, model.depth
        self.patches = PatchEmbed(image_size, channels, model.patch, model.width)
        self.layers = nn.ModuleList(vit_layers(model))
        self.head = AuxHead(model.width, num_classes, "mean")  # LayerNorm, token mean, linear: the original's head
        self.temperature = cff.temperature
        self.margins = torch.linspace(cff.margin_first, cff.margin_last, model.depth).tolist()  # one per layer

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the first layer's input (N, T, D)."""
        return self.patches(x)

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i, (N, T, D) -> (N, T, D), with a zero condition (adaLN layers, as every method's ViT)."""
        return self.layers[i](h, h.new_zeros(h.shape[0], self.width))

    def layer_loss(self, i: int, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i on its input: (its contrastive loss per sample (N,), its output)."""
        out = self.layer(i, h)
        return contrastive_loss(out.mean(1), y, self.temperature, self.margins[i]), out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output (N, T, D)."""
        h = self.embed(x)
        for i in range(self.num_layers):
            h = self.layer(i, h)
        return h

    @torch.no_grad()
    def predict(self, x: torch.Tensor, **_) -> list[torch.Tensor]:
        return [self.head(self.encode(x)).argmax(-1)]


class ContrastiveForwardForward(Method):
    """Every step trains every layer once, each on its own contrastive loss, in order; then the head."""

    name, title = "cff", "Contrastive Forward-Forward"
    model_form = "contrastive forward-forward"
    classifier = CFFClassifier

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.model.checkpoint:
            raise ValueError("model.checkpoint: Contrastive Forward-Forward keeps one layer's activations at a time "
                             "already")

    def __init__(self, model: CFFClassifier, cfg: RunConfig, total_steps: int, **_):
        self.model, self.cfg, self.total = model, cfg, total_steps
        stem = list(model.patches.parameters())
        self.units = [stem * (i == 0) + list(layer.parameters()) for i, layer in enumerate(model.layers)]
        self.opts = [Optimizer(p, cfg, total_steps) for p in self.units]
        self.head = list(model.head.parameters())
        self.head_opt = Optimizer(self.head, cfg, total_steps)
        self.trained = {id(p) for p in model.parameters()}

    def stream_seeds(self) -> dict[int, int]:
        return {0: stream_seed(self.cfg.train.seed)}

    def next_block(self) -> int:
        return 0

    def probe_loss(self, batch):
        """The first layer's loss with the stem: the most a step holds at once (one layer's graph)."""
        x, y = batch
        return self.model.layer_loss(0, self.model.embed(x), y)[0].mean()

    def step(self, batch, block: int = 0) -> dict:
        x, y = batch
        out, h = layer_by_layer(self.units, self.opts, self.model.embed(x),
                                lambda i, h: self.model.layer_loss(i, h, y), self.cfg.train.clip)
        if out.get("skipped"):
            return out
        ce = F.cross_entropy(self.model.head(h), y)  # the head on the last layer's detached output
        head = update(ce, self.head, [self.head_opt], self.cfg.train.clip)
        return dict(out, layers=self.model.num_layers, trained=self.trained, head_loss=head["loss"])

    def optimizers(self):
        return [o.opt for o in self.opts] + [self.head_opt.opt]

    def state_dict(self):
        return {"opts": [o.state_dict() for o in self.opts], "head_opt": self.head_opt.state_dict()}

    def load_state_dict(self, state):
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)
        self.head_opt.load_state_dict(state["head_opt"])


METHOD = ContrastiveForwardForward
