"""DiffusionBlocks training (paper Sec. 3): one block per step, on its own noise levels, nothing else runs.

Which block: "random" (the paper), "round-robin", or "sequential" (block 0 for its whole share of the
steps, then block 1, ...). Under "sequential" the shared parameters (a shared stem/head) are trained
during block 0's phase only and frozen afterwards: were they trained on, the later blocks would move them
under the earlier ones, which never see them again. With a replicated stem/head
(blocks.shared_stem_head=false) the blocks are independent: each has its own optimizer, its own noise
stream and its own data stream, so round-robin, sequential, per-block jobs and parallel ranks all train
exactly the same weights (jobs.py, parallel.py).

`blocks` limits the run to some blocks (a per-block job): the others are not materialised at all (their
parameters stay on the "meta" device). Where the owned blocks live is the residency policy
(residency.py): "all" on the device, or only the "active" one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ..config import RunConfig, parse_ints, section, setting
from ..residency import Residency
from .base import EMA, Method, Optimizer, loss_scaler, stream_seed, update


@section("dblocks")
@dataclass
class DBlocksConfig:
    """The DiffusionBlocks trainer's own settings: which block a step trains and where idle blocks live."""

    block_choice: str = setting("random", "random (the paper), round-robin, or sequential (each block's whole budget "
                                          "in turn: each block is loaded once)",
                                choices=("random", "round-robin", "sequential"))
    residency: str = setting("all", "all blocks on the device, or only the active one (idle blocks offloaded)",
                             choices=("all", "active"))


def owned_blocks(cfg: RunConfig) -> list[int]:
    """The blocks this job trains: train.blocks ("" = all), checked against blocks.num_blocks."""
    B = cfg.blocks.num_blocks
    blocks = parse_ints(cfg.train.blocks, "train.blocks", "0,2")
    if not blocks:
        return list(range(B))
    bad = [b for b in blocks if not 0 <= b < B]
    if bad:
        raise ValueError(f"train.blocks={cfg.train.blocks!r}: block(s) {bad} do not exist (blocks are 0..{B - 1})")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"train.blocks={cfg.train.blocks!r} lists a block twice")
    return sorted(blocks)


class DBlocks(Method):
    """One block per step: sample its noise levels, run only it, update only it (and the shared parts)."""

    name, title = "dblocks", "DiffusionBlocks"
    model_form = "blocks"
    plan = "blockwise"

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.model.layer != "adaln":
            raise ValueError("model.layer=prenorm has no noise conditioning: it is a reference for e2e only")
        if cfg.train.blocks.strip():
            owned_blocks(cfg)
            cls.check_independent(cfg, "a per-block job (--blocks)")

    @classmethod
    def check_independent(cls, cfg: RunConfig, why: str) -> None:
        """Blocks trained apart (jobs, ranks) must not share parameters and must get a fixed share of steps."""
        if cfg.blocks.shared_stem_head:
            raise ValueError(f"{why} needs independent blocks: set blocks.shared_stem_head=false (a shared "
                             f"stem/head is trained by every block, so jobs holding different blocks could not "
                             f"be merged)")
        if cfg.dblocks.block_choice == "random" and cfg.train.blocks.strip():
            raise ValueError(f"{why}: block_choice=random draws how many steps each block gets from one stream "
                             f"shared by all blocks; use dblocks.block_choice=sequential or round-robin (every "
                             f"block gets exactly its share)")

    @classmethod
    def budget(cls, cfg: RunConfig) -> tuple[int, str]:
        t, B = cfg.train, cfg.blocks.num_blocks
        if t.budget == "steps":
            total, rule = t.steps, f"{t.steps} steps ({t.budget} budget)"
        else:
            total = t.steps * B
            rule = (f"layer-update budget of {t.steps} end-to-end steps x {cfg.model.depth} layers: "
                    f"{total} block steps of ~{cfg.model.depth / B:g} layers each")
        if t.blocks.strip():  # a per-block job: its blocks' share
            total = total // B * len(owned_blocks(cfg))
        return total, rule

    def __init__(self, model, cfg: RunConfig, total_steps: int, *, device: torch.device | str = "cpu",
                 offload_dir: str | os.PathLike | None = None, ema: EMA | None = None,
                 blocks: list[int] | None = None, data_parallel=None):
        self.model, self.cfg, self.total = model, cfg, total_steps
        self.sync = data_parallel.sync if data_parallel is not None else None
        B = self.num_blocks = model.num_blocks
        self.owned = owned_blocks(cfg) if blocks is None else list(blocks)
        self.partial = len(self.owned) < B
        self.warn_starved = cfg.dblocks.block_choice == "random" and not self.partial
        self.share = total_steps // len(self.owned)  # steps per block
        self.sequential = cfg.dblocks.block_choice == "sequential"
        self.shared_params = list(model.shared_parameters())
        all_blocks = {b: list(model.block_parameters(b)) for b in range(B)}
        _check_ownership(model, all_blocks, self.shared_params)
        # every state-dict name of an unowned parameter (a tied weight, e.g. an LM's embedding and output head, is
        # one parameter under several names)
        names = {id(p): n for n, p in model.named_parameters()}
        unowned = {id(p) for b in range(B) if b not in self.owned for p in all_blocks[b]}
        self.unowned_names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in unowned}
        for b in range(B):
            if b not in self.owned:  # not trained here: shapes only, no memory
                for module in model.block_modules(b):
                    module.to("meta")
        self.block_params = {b: all_blocks[b] for b in self.owned}
        self.trained = {b: {id(p) for p in params + self.shared_params} for b, params in self.block_params.items()}
        self.opts = {b: Optimizer(p, cfg, self.share) for b, p in self.block_params.items() if p}
        self.shared_opt = (Optimizer(self.shared_params, cfg, self.share if self.sequential else total_steps)
                           if self.shared_params else None)
        # fp16: each block's loss scaler is its optimizer's; a block with no parameters of its own gets one here, so
        # no scaler sees two blocks' steps (the shared optimizer steps under the scaler of the block that trains)
        self.scalers = {b: self.opts[b].scaler if b in self.opts else loss_scaler(cfg) for b in self.owned}
        self.choice = torch.Generator().manual_seed(cfg.train.seed * 7919 + 17)
        # a data-parallel member draws its own noise for its shard of the batch
        member = data_parallel.index if data_parallel is not None else 0
        self.noise = {b: torch.Generator().manual_seed(stream_seed(cfg.train.seed, b) + 2 + 1_000 * member)
                      for b in self.owned}
        self.next_index = 0  # for round-robin
        self.steps_done = 0  # for sequential
        self.device, self.member = torch.device(device), member
        self.block_steps = {b: 0 for b in self.owned}  # steps taken by each block (its dropout stream)
        extra = {b: (ema.shadow, [names[id(p)] for p in params]) if ema is not None else ({}, [])
                 for b, params in self.block_params.items()}
        self.residency = Residency(cfg.dblocks.residency, device, self.block_params,
                                   {b: self.opts[b].opt if b in self.opts else None for b in self.block_params},
                                   self.shared_params, extra=extra, directory=offload_dir)

    def stream_seeds(self) -> dict[int, int]:
        """One stream per block, seeded by (seed, block): a block's data does not depend on the other blocks."""
        return {b: stream_seed(self.cfg.train.seed, b) for b in self.owned}

    def probe_loss(self, batch):
        """The largest block (blocks of an even split are the same size)."""
        block = max(range(self.num_blocks), key=self.model.block_layers)
        return self.model.block_loss(block, *batch).mean()

    def next_block(self) -> int:
        n = len(self.owned)
        if self.sequential:
            return self.owned[min(n - 1, self.steps_done * n // self.total)]
        if self.cfg.dblocks.block_choice == "round-robin":
            return self.owned[self.next_index % n]
        return self.owned[int(torch.randint(n, (1,), generator=self.choice))]

    def step(self, batch, block: int | None = None) -> dict:
        block = self.next_block() if block is None else block
        self.steps_done += 1
        self.next_index += 1
        self.residency.activate(block)
        train_shared = bool(self.shared_params) and (not self.sequential or block == self.owned[0])
        for p in self.shared_params:
            p.requires_grad_(train_shared)
        params = self.block_params[block] + (self.shared_params if train_shared else [])
        opts = ([self.opts[block]] if block in self.opts else []) + ([self.shared_opt] if train_shared else [])
        with self._block_rng(block):
            loss = self.model.block_loss(block, *batch, generator=self.noise[block]).mean()
            out = update(loss, params, opts, self.cfg.train.clip, self.sync, scaler=self.scalers[block])
        self.block_steps[block] += 1
        if out.get("skipped"):
            return dict(out, block=block, layers=0)
        return dict(out, block=block, layers=self.model.block_layers(block), trained=self.trained[block])

    @contextlib.contextmanager
    def _block_rng(self, block: int):
        """What draws from the global RNG inside a step (dropout) draws from the block's own stream, seeded by
        (seed, block, the block's step count): a block's weights then do not depend on the other blocks."""
        if self.cfg.model.dropout <= 0:
            yield
            return
        seed = stream_seed(self.cfg.train.seed, block) + 3 + 1_000 * self.member
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed((seed + 1_000_003 * self.block_steps[block]) % 2**63)
            yield  # the global RNG is restored afterwards

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.opt for o in self.opts.values()] + ([self.shared_opt.opt] if self.shared_opt else [])

    def state_dict(self):
        return {"opts": {b: o.state_dict() for b, o in self.opts.items()},
                "shared_opt": self.shared_opt.state_dict() if self.shared_opt else None,
                "choice": self.choice.get_state(), "noise": {b: g.get_state() for b, g in self.noise.items()},
                "next_index": self.next_index, "steps_done": self.steps_done, "block_steps": dict(self.block_steps),
                **({"scalers": {b: self.scalers[b].state_dict() for b in self.owned if b not in self.opts}}
                   if self.cfg.train.precision == "fp16" else {})}

    def load_state_dict(self, state):
        for b, o in self.opts.items():
            o.load_state_dict(state["opts"][b])
        if self.shared_opt is not None:
            self.shared_opt.load_state_dict(state["shared_opt"])
        self.choice.set_state(state["choice"])
        for b, g in self.noise.items():
            g.set_state(state["noise"][b])
        self.next_index, self.steps_done = state["next_index"], state["steps_done"]
        self.block_steps.update(state.get("block_steps", {}))  # absent in runs written before 0.2
        for b, scaler_state in state.get("scalers", {}).items():  # fp16: blocks without an optimizer of their own
            self.scalers[b].load_state_dict(scaler_state)


def _check_ownership(model, blocks: dict[int, list], shared: list):
    """Every parameter is some block's own or shared; none is owned by two blocks (tie it as shared)."""
    owner: dict[int, int] = {}
    shared_ids = {id(p) for p in shared}
    names = {id(p): n for n, p in model.named_parameters()}
    for b, params in blocks.items():
        for p in params:
            if id(p) in shared_ids:
                raise RuntimeError(f"parameter {names.get(id(p))} is both block {b}'s own and shared")
            if owner.setdefault(id(p), b) != b:
                raise RuntimeError(f"parameter {names.get(id(p))} is owned by blocks {owner[id(p)]} and {b}: a "
                                   f"parameter trained by several blocks (tied weights) must be a shared parameter")
    missing = [n for n, p in model.named_parameters() if id(p) not in owner and id(p) not in shared_ids]
    if missing:
        raise RuntimeError(f"parameters owned by no block and not shared: {missing[:5]}")


METHOD = DBlocks
