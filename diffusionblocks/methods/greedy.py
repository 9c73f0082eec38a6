"""Greedy layer-wise (block-wise) training (Belilovsky, Eickenberg, Oyallon 2019): the model of dgl.py, its
blocks trained one after the other. Block b trains for its share of the steps on the output of the blocks
before it, which are frozen by then; its input is computed without a graph, so a step holds one block's
activations. On the layer-update budget each block gets as many steps as the end-to-end run (B times the
steps in all, each on one block's layers), as DiffusionBlocks' blocks do."""

from __future__ import annotations

from ..config import RunConfig
from .base import stream_seed, update
from .dblocks import DBlocks
from .dgl import LocalClassifier, LocalMethod


class Greedy(LocalMethod):
    name, title = "greedy", "greedy local learning"

    @classmethod
    def budget(cls, cfg: RunConfig) -> tuple[int, str]:
        return DBlocks.budget(cfg)  # one block per step, as DiffusionBlocks

    def __init__(self, model: LocalClassifier, cfg: RunConfig, total_steps: int, **_):
        super().__init__(model, cfg, total_steps, max(1, total_steps // model.num_blocks))
        self.num_blocks, self.steps_done = model.num_blocks, 0  # the loop's units: one block per step

    def next_block(self) -> int:
        return min(self.num_blocks - 1, self.steps_done * self.num_blocks // self.total)

    def step(self, batch, block: int | None = None) -> dict:
        block = self.next_block() if block is None else block
        self.steps_done += 1
        x, y = batch
        h = self.model.embed(x) if block == 0 else self.model.input_of(block, x)  # earlier blocks: frozen
        loss, _ = self.model.block_loss(block, h, y)
        m = update(loss.mean(), self.units[block], [self.opts[block]], self.cfg.train.clip)
        if m.get("skipped"):
            return dict(m, block=block, layers=0)
        return dict(m, block=block, layers=self.model.block_layers(block), trained=self.trained_ids[block])

    def stream_seeds(self) -> dict[int, int]:
        """One data stream per block, seeded by (seed, block), as DiffusionBlocks' blocks have."""
        return {b: stream_seed(self.cfg.train.seed, b) for b in range(self.num_blocks)}

    def state_dict(self):
        return dict(super().state_dict(), steps_done=self.steps_done)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.steps_done = state["steps_done"]


METHOD = Greedy
