"""Decoupled greedy local learning (DGL; Belilovsky, Eickenberg, Oyallon 2019/2020): the ViT's layers cut into
the same B blocks as DiffusionBlocks, each with an auxiliary classifier (LayerNorm, pooling over tokens,
linear) and a cross-entropy loss of its own; a block's input is the previous block's output, detached, so
no gradient crosses a block boundary. DGL trains every block at every step (one forward through the
blocks, each block's backward right after its forward, so only one block's activations are held);
greedy layer-wise training (greedy.py) trains them one after the other on the same model.

The prediction is the last block's auxiliary classifier; every block's is reported (accuracy after each
block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import split_layers
from ..config import BackboneConfig, BlocksConfig, RunConfig, section, setting
from ..models import CutViT, vit_layers
from .base import Method, Optimizer, stream_seed, update


@section("dgl")
@dataclass
class DGLConfig:
    """DGL's and greedy's auxiliary heads (train.method=dgl or greedy)."""

    aux_pool: str = setting("mean", "the auxiliary head's pooling over tokens: mean, or the CLS token",
                            choices=("mean", "cls"))


class AuxHead(nn.Module):
    """A block's own classifier: LayerNorm, mean over tokens (or the CLS token), linear."""

    def __init__(self, width: int, num_classes: int, pool: str):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"dgl.aux_pool={pool!r}: expected 'mean' or 'cls'")
        self.pool = pool
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return self.out(h.mean(1) if self.pool == "mean" else h[:, 0])


class LocalClassifier(CutViT):
    """[CLS] + patches through B blocks of layers, an auxiliary head after each."""

    inference_options = ()

    def __init__(self, model: BackboneConfig, blocks: BlocksConfig, dgl: DGLConfig, image_size, channels: int,
                 num_classes: int):
        super().__init__()
        m = model
        self.build_stem(image_size, channels, m.patch, m.width)  # stem first: the weights every result here had
        self.build_blocks(vit_layers(m), split_layers(m.depth, blocks.num_blocks, blocks.layers_per_block()),
                          m.checkpoint)
        self.heads = nn.ModuleList(AuxHead(m.width, num_classes, dgl.aux_pool) for _ in self.allocation)

    def block_layers(self, block: int) -> int:
        return self.allocation[block]

    def unit_parameters(self, block: int) -> list[nn.Parameter]:
        """What block `block`'s loss trains: its layers and head (block 0: the patch embedding and CLS too)."""
        own = [*self.blocks[block].parameters(), *self.heads[block].parameters()]
        return self.stem_parameters(block) + own

    def block_loss(self, block: int, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `block` on its input h: (its cross-entropy per sample (N,), its output)."""
        out = self.block(block, h)
        return F.cross_entropy(self.heads[block](out), y, reduction="none"), out

    @torch.no_grad()
    def input_of(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Block `block`'s input, by the blocks before it (nothing trains)."""
        h = self.embed(x)
        for b in range(block):
            h = self.block(b, h)
        return h

    @torch.no_grad()
    def predict(self, x: torch.Tensor, **_) -> list[torch.Tensor]:
        """Every block's auxiliary prediction; the last block's is the model's."""
        h, preds = self.embed(x), []
        for b in range(self.num_blocks):
            h = self.block(b, h)
            preds.append(self.heads[b](h).argmax(-1))
        return preds


class LocalMethod(Method):
    """What greedy and DGL share: the blocks as units, each with its own optimizer over its own parameters."""

    model_form = "local"
    classifier = LocalClassifier

    def __init__(self, model: LocalClassifier, cfg: RunConfig, total_steps: int, updates_per_block: int):
        self.model, self.cfg, self.total = model, cfg, total_steps
        self.units = [model.unit_parameters(b) for b in range(model.num_blocks)]
        self.opts = [Optimizer(p, cfg, updates_per_block) for p in self.units]
        self.trained_ids = [{id(p) for p in params} for params in self.units]

    def stream_seeds(self) -> dict[int, int]:
        return {0: stream_seed(self.cfg.train.seed)}

    def probe_loss(self, batch):
        """The largest block's loss with its input detached (block 0 with the patch embedding when sizes tie)."""
        x, y = batch
        block = max(range(self.model.num_blocks), key=self.model.block_layers)
        h = self.model.embed(x) if block == 0 else self.model.input_of(block, x)
        return self.model.block_loss(block, h, y)[0].mean()

    def optimizers(self):
        return [o.opt for o in self.opts]

    def state_dict(self):
        return {"opts": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state):
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)


class DGL(LocalMethod):
    """Every step: each block in turn on the previous block's detached output, updated right after its forward."""

    name, title = "dgl", "DGL (decoupled greedy)"

    def __init__(self, model: LocalClassifier, cfg: RunConfig, total_steps: int, **_):
        super().__init__(model, cfg, total_steps, total_steps)
        self.trained = set().union(*self.trained_ids)  # one unit per step (num_blocks 1 for the loop): all blocks

    def next_block(self) -> int:
        return 0

    def step(self, batch, block: int = 0) -> dict:
        x, y = batch
        h, losses, norms, lr = self.model.embed(x), [], [], None
        for b in range(self.model.num_blocks):
            loss, out = self.model.block_loss(b, h, y)
            m = update(loss.mean(), self.units[b], [self.opts[b]], self.cfg.train.clip)
            if m.get("skipped"):  # a non-finite block: the later ones wait for the next step; the earlier ones
                # were updated (their layers count)
                return {"skipped": True, "loss": m["loss"], "layers": sum(self.model.allocation[:b])}
            losses.append(m["loss"])
            norms.append(m["grad_norm"])
            lr = m["lr"]
            h = out.detach()  # no gradient crosses into the previous block
        return {"loss": losses[-1], "grad_norm": max(norms), "lr": lr, "layers": self.model.num_layers,
                "trained": self.trained, "block_losses": losses}


METHOD = DGL
