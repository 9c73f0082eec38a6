"""End-to-end backpropagation: the baseline every block-wise method is measured against."""

from __future__ import annotations

from ..config import RunConfig
from .base import Method, Optimizer, stream_seed, update


class EndToEnd(Method):
    """Plain backprop through the whole network, one optimizer, one data stream seeded by the run's seed."""

    name, title = "e2e", "end-to-end"
    model_form = "end-to-end"
    plan = "whole"

    def __init__(self, model, cfg: RunConfig, total_steps: int, **_):
        self.model, self.cfg, self.total = model, cfg, total_steps
        self.params = list(model.parameters())
        self.trained = {id(p) for p in self.params}
        self.opt = Optimizer(self.params, cfg, total_steps)

    def stream_seeds(self) -> dict[int, int]:
        return {0: stream_seed(self.cfg.train.seed)}

    def probe_loss(self, batch):
        return self.model.loss(*batch).mean()

    def next_block(self) -> int:
        return 0

    def step(self, batch, block: int = 0) -> dict:
        loss = self.model.loss(*batch).mean()
        out = update(loss, self.params, [self.opt], self.cfg.train.clip)
        if out.get("skipped"):
            return dict(out, layers=0)
        return dict(out, layers=self.model.num_layers, trained=self.trained)

    def optimizers(self):
        return [self.opt.opt]

    def state_dict(self):
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])


METHOD = EndToEnd
