"""Block-parallel training under torchrun: rank r trains its blocks as a per-block job into OUT/rank<r>; rank 0
merges them into OUT and scores the merged model with the task's headline metric.

Between blocks the only collectives are at the start (every rank has the same config) and at the end
(gathering results): no gradient crosses from one block to another. With N > B processes the ranks of one
block average their gradients in a sub-group of their own (data parallelism inside a block, the batch split
between them).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import io
from .config import RunConfig, config_hash, save_config
from .data import absolute_data_paths
from .jobs import merge
from .logs import provenance
from .methods import get_method
from .run import CONFIG, STATE, check_out, clear_run, load_model, resolve_device
from .tasks import get_task, run_split
from .train import Stopped, reference_model, train


def rank_blocks(num_blocks: int, world: int, rank: int) -> list[int]:
    """N <= B processes: rank r trains blocks r, r + N, r + 2N, ... N > B (a multiple of B): rank r trains
    block r mod B, data-parallel with the other ranks of that block."""
    if world > num_blocks and world % num_blocks:
        raise ValueError(f"{world} processes for {num_blocks} blocks: with more processes than blocks, the "
                         f"number of processes must be a multiple of B (each block gets N / B data-parallel "
                         f"ranks); use e.g. --nproc_per_node {num_blocks} or {2 * num_blocks}")
    if world > num_blocks:
        return [rank % num_blocks]
    return list(range(rank, num_blocks, world))


class DataParallel:
    """The ranks that share one block (N > B): each takes its shard of the block's batch, and gradients are
    averaged over this sub-group only; no other block's rank is in it."""

    def __init__(self, group, index: int, size: int):
        self.group, self.index, self.size = group, index, size

    def shard(self, t):
        n = t.shape[0] // self.size
        if n == 0:
            raise ValueError(f"batch of {t.shape[0]} cannot be split over {self.size} data-parallel ranks")
        return t[self.index * n:(self.index + 1) * n]

    def sync(self, params):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= self.size
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()


def train_parallel(cfg: RunConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
                   overwrite: bool = False) -> dict:
    """Under torchrun: this rank's share of the blocks, then (rank 0) the merge and the score. A new run over an
    earlier one in OUT needs `overwrite`: OUT is checked as train() checks a run directory, by every rank before
    any writes, and each rank's job directory again by its job."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--parallel blocks runs under torchrun, e.g. torchrun --nproc_per_node 3 -m "
                         "diffusionblocks train --method dblocks --parallel blocks ...")
    get_method(cfg.train.method).check_independent(cfg, "--parallel blocks")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg, out = absolute_data_paths(cfg), Path(out)
    if not resume:  # every rank checks OUT before the first collective, after which rank 0 writes into it
        check_out(out, overwrite)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        hashes = _gather(config_hash(cfg), world)
        if len(set(hashes)) > 1:
            raise ValueError(f"the ranks were started with different configs (hashes {hashes})")
        B = cfg.blocks.num_blocks
        blocks = rank_blocks(B, world, rank)
        data_parallel = None
        if world > B:  # one sub-group per block; every rank takes part in creating every group
            groups = [dist.new_group([b + i * B for i in range(world // B)]) for b in range(B)]
            data_parallel = DataParallel(groups[rank % B], rank // B, world // B)
        if rank == 0 and not resume and out.is_dir():
            _clear_earlier_run(out, cfg, world)
        try:
            results = _train_rank(cfg, out, rank, blocks, device, data_parallel, resume, progress, overwrite)
        except Stopped:  # every rank saved its checkpoint: the run goes on as a whole, merge included
            if rank == 0:
                print(f"the whole run continues with: torchrun --nproc_per_node {world} -m diffusionblocks "
                      f"train --resume {out}", file=sys.stderr)
            raise
        everyone = _gather({"rank": rank, "blocks": blocks, "train_seconds": results["train_seconds"],
                            "steps": results["steps"], "layer_updates": results["layer_updates"]}, world)
        dist.barrier()
        summary = {"world_size": world, "rank": rank, "blocks": blocks, "ranks": everyone,
                   "layer_updates": results["layer_updates"],
                   "process_groups": ["default (config agreement at the start, results at the end)"]
                   + ([f"block {b}: ranks {[b + i * B for i in range(world // B)]} (data-parallel)"
                       for b in range(B)] if data_parallel else [])}
        if rank == 0:
            leaders = range(min(world, B))  # in a data-parallel group, rank b (index 0) holds the block
            summary.update(_merge_and_score(cfg, out, [out / f"rank{r}" for r in leaders], device))
            summary.update(steps=sum(everyone[r]["steps"] for r in leaders),
                           layer_updates=sum(everyone[r]["layer_updates"] for r in leaders),
                           train_seconds=max(r["train_seconds"] for r in everyone),
                           provenance=results.get("provenance") or provenance(device))
            io.save_json(out / "results.json", summary)
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()


def _gather(obj, world: int) -> list:
    """Small Python objects from every rank (the config check at the start, the results at the end)."""
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def _clear_earlier_run(out: Path, cfg: RunConfig, world: int) -> None:
    """Under --overwrite: the earlier run's files in OUT go, and so do its rank directories beyond this run's
    ranks (those below are replaced by their ranks' own jobs), so OUT never mixes two runs."""
    clear_run(out, get_task(cfg.task).run_files)
    for rank_dir in out.glob("rank*"):
        if rank_dir.name[4:].isdigit() and int(rank_dir.name[4:]) >= world and (rank_dir / CONFIG).exists():
            shutil.rmtree(rank_dir)


def _train_rank(cfg: RunConfig, out: Path, rank: int, blocks: list[int], device, data_parallel, resume: bool,
                progress: bool, overwrite: bool = False) -> dict:
    """This rank's blocks as a per-block job in OUT/rank<r> (resumed when asked and possible)."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(out / CONFIG, save_config(cfg))
    job_cfg = RunConfig.from_dict(cfg.to_dict())
    job_cfg.train.blocks, job_cfg.train.parallel = ",".join(map(str, blocks)), "none"
    job_cfg.train.device = str(device)
    run = out / f"rank{rank}"
    show = progress and rank == 0
    if resume and (run / STATE).exists():
        return train(None, run, resume=True, progress=show, data_parallel=data_parallel)
    return train(job_cfg, run, progress=show, data_parallel=data_parallel, overwrite=overwrite)


def _merge_and_score(cfg: RunConfig, out: Path, jobs: list[Path], device) -> dict:
    """Merge the jobs into OUT and score the merged model with the task's headline metric."""
    merge(jobs, out)
    cfg_m, model, data = load_model(out)
    model.to(device)
    task = get_task(cfg_m.task)
    split = run_split(cfg_m)
    score = task.score(model, data, cfg_m, split=split, device=device, reference=reference_model)
    return {"task": cfg.task, "method": cfg.train.method, "num_blocks": cfg.blocks.num_blocks,
            "metric": task.metric, "eval_split": split, **task.results(score, split)}
