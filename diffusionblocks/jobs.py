"""Blocks trained apart: per-block jobs, merging their checkpoints, and block-parallel torchrun.

Blocks need no communication. A job trains some of the blocks (``train.blocks``, e.g. "0,2"), with each
block's data order, augmentation and noise drawn from its own stream seeded by (seed, block) and its own
optimizer, so a block's weights do not depend on which other blocks trained beside it, in which order,
or on which machine: a sequential run, a set of per-block jobs merged afterwards and a torchrun with the
blocks spread over ranks give the same weights (bit-identical on a CPU; tests/test_jobs.py).

This needs independent blocks: a replicated stem/head (``dblocks.shared_stem_head=false``). A shared
stem/head would be trained by every block, so jobs holding different blocks would end with different
copies of it and no merge could be sound; jobs and parallel mode refuse it.

Every job writes ``job.json`` beside its checkpoint: the blocks it owns, the partition, the architecture,
the data config and a hash of the whole config except the settings that may differ between jobs of one
model (which blocks, device, threads, logging). ``merge`` refuses checkpoints that disagree.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

from . import io
from .config import RunConfig, validate

JOB = "job.json"
# settings that may differ between the jobs of one model (where and how a job runs, not what it trains)
JOB_LOCAL = {"train": ("blocks", "parallel", "device", "threads", "offload_dir", "log_every", "ckpt_every",
                       "eval_every", "eval_limit", "eval_batch_size")}


def owned_blocks(cfg: RunConfig) -> list[int]:
    """The blocks this job trains: train.blocks ("" = all), checked against dblocks.num_blocks."""
    B = cfg.dblocks.num_blocks
    text = cfg.train.blocks.strip()
    if not text:
        return list(range(B))
    try:
        blocks = [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"train.blocks={text!r}: expected comma-separated block indices, e.g. 0,2") from None
    bad = [b for b in blocks if not 0 <= b < B]
    if bad:
        raise ValueError(f"train.blocks={text!r}: block(s) {bad} do not exist (blocks are 0..{B - 1})")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"train.blocks={text!r} lists a block twice")
    return sorted(blocks)


def check_independent(cfg: RunConfig, why: str):
    if cfg.train.method != "dblocks":
        raise ValueError(f"{why} trains DiffusionBlocks blocks: it needs train.method=dblocks")
    if cfg.dblocks.shared_stem_head:
        raise ValueError(f"{why} needs independent blocks: set dblocks.shared_stem_head=false (a shared stem/head "
                         f"is trained by every block, so jobs holding different blocks could not be merged)")
    if cfg.dblocks.block_choice == "random" and cfg.train.blocks.strip():
        raise ValueError(f"{why}: block_choice=random draws how many steps each block gets from one stream shared "
                         f"by all blocks; use dblocks.block_choice=sequential or round-robin (every block gets "
                         f"exactly its share)")


def model_identity(cfg: RunConfig) -> dict:
    """What must agree between jobs of one model: everything but the job-local settings."""
    d = cfg.to_dict()
    for section, keys in JOB_LOCAL.items():
        for k in keys:
            d[section].pop(k, None)
    return d


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(model_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def job_record(cfg: RunConfig, model, blocks: list[int], steps_per_block: int, finished: bool = False) -> dict:
    part = model.partition
    return {"blocks": blocks, "num_blocks": cfg.dblocks.num_blocks, "config_hash": config_hash(cfg),
            "partition": {"kind": part.kind, "gamma": part.gamma, "boundaries": part.boundaries.tolist()},
            "architecture": dict(cfg.model.__dict__, allocation=list(model.stack.allocation),
                                 shared_stem_head=cfg.dblocks.shared_stem_head),
            "data": dict(cfg.data.__dict__), "steps_per_block": steps_per_block, "finished": finished}


# -- merge -------------------------------------------------------------------------------------------


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} vs {vb!r}")
    return out


def merge(runs: list[str | os.PathLike], out: str | os.PathLike, *, allow_missing: bool = False) -> dict:
    """Assemble one model from per-block job directories into `out` (config.json, model.safetensors,
    ema.safetensors when every job kept one, merge.json naming the owner of each block). Returns that record."""
    from .train import CONFIG, EMA_WEIGHTS, STATE, WEIGHTS

    if not runs:
        raise ValueError("merge needs at least one run directory")
    jobs = []
    for run in map(Path, runs):
        if not (run / JOB).exists() or not (run / CONFIG).exists():
            raise ValueError(f"{run} is not a per-block job directory (it has no {JOB}; train with "
                             f"--method dblocks --blocks ... or --parallel blocks)")
        job, cfg = io.load_json(run / JOB), RunConfig.from_dict(io.load_json(run / CONFIG))
        if not job["finished"]:
            state = io.load_torch(run / STATE) if (run / STATE).exists() else {"step": 0}
            raise ValueError(f"{run} has not finished (step {state['step']} of "
                             f"{job['steps_per_block'] * len(job['blocks'])}); finish it with: "
                             f"diffusionblocks train --resume {run}")
        jobs.append((run, job, cfg))
    run0, job0, cfg0 = jobs[0]
    for run, job, cfg in jobs[1:]:
        for what in ("partition", "architecture", "data"):
            diff = _differences(job0[what], job[what])
            if diff:
                raise ValueError(f"cannot merge {run0} and {run}: their {what} differs ({'; '.join(diff[:4])})")
        if job["config_hash"] != job0["config_hash"]:
            diff = _differences(model_identity(cfg0), model_identity(cfg))
            raise ValueError(f"cannot merge {run0} and {run}: their configs differ ({'; '.join(diff[:4])})")
    owner: dict[int, Path] = {}
    for run, job, _ in jobs:
        for b in job["blocks"]:
            if b in owner:
                raise ValueError(f"block {b} is owned by both {owner[b]} and {run}; merge takes each block from "
                                 f"exactly one job")
            owner[b] = run
    B = job0["num_blocks"]
    missing = [b for b in range(B) if b not in owner]
    if missing and not allow_missing:
        raise ValueError(f"block(s) {missing} of {B} are in none of the runs {[str(r) for r, _, _ in jobs]}; "
                         f"train them (--blocks {','.join(map(str, missing))}) or pass --allow-missing")
    if missing:
        print(f"WARNING: block(s) {missing} are missing and keep their initial (untrained) weights: the merged "
              f"model is NOT a trained model at those noise levels", file=sys.stderr)
    merged = _merged_weights([r for r, _, _ in jobs], WEIGHTS, cfg0, missing)
    have_ema = all((r / EMA_WEIGHTS).exists() for r, _, _ in jobs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_out = RunConfig.from_dict(cfg0.to_dict())
    cfg_out.train.blocks, cfg_out.train.parallel = "", "none"
    io.atomic_write_text(out / CONFIG, json.dumps(cfg_out.to_dict(), indent=2) + "\n")
    io.save_safetensors(merged, out / WEIGHTS, metadata={"merged_from": json.dumps([str(r) for r, _, _ in jobs])})
    if have_ema:
        io.save_safetensors(_merged_weights([r for r, _, _ in jobs], EMA_WEIGHTS, cfg0, missing), out / EMA_WEIGHTS)
    elif (out / EMA_WEIGHTS).exists():
        (out / EMA_WEIGHTS).unlink()
    record = {"runs": [str(r) for r, _, _ in jobs], "owner": {str(b): str(r) for b, r in sorted(owner.items())},
              "missing": missing, "config_hash": job0["config_hash"], "ema": have_ema}
    io.save_json(out / "merge.json", record)
    return record


def _merged_weights(runs: list[Path], name: str, cfg: RunConfig, missing: list[int]) -> dict:
    """Union of the jobs' tensors; tensors outside every block (e.g. the fixed label table) must agree.
    Missing blocks get the initial weights the seed gives them."""
    import torch

    merged: dict = {}
    for run in runs:
        weights, _ = io.load_safetensors(run / name)
        for k, v in weights.items():
            if k in merged and not torch.equal(merged[k], v):
                raise ValueError(f"tensor {k!r} differs between the jobs (in {run}); the runs are not parts of "
                                 f"one model")
            merged[k] = v
    if missing:
        from .train import build_model_for

        full = build_model_for(validate(cfg))
        for k, v in full.state_dict().items():
            merged.setdefault(k, v)
    return merged


# -- torchrun: blocks spread over ranks -------------------------------------------------------------


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
        self.bytes = 0  # gradient bytes this rank sent inside its block's group

    def shard(self, t):
        n = t.shape[0] // self.size
        if n == 0:
            raise ValueError(f"batch of {t.shape[0]} cannot be split over {self.size} data-parallel ranks")
        return t[self.index * n:(self.index + 1) * n]

    def sync(self, params):
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= self.size
        self.bytes += flat.numel() * flat.element_size()
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()


def train_parallel(cfg: RunConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True) -> dict:
    """Under torchrun: rank r trains its blocks into OUT/rank<r> as a per-block job; at the end rank 0
    merges them into OUT and evaluates the merged model. Between blocks the only collectives are at the
    start (every rank has the same config) and at the end (gathering results): no gradient crosses from one
    block to another. With N > B processes the ranks of one block average their gradients in a sub-group
    of their own (data parallelism inside a block, the batch split between them)."""
    import torch
    import torch.distributed as dist

    from .train import CONFIG, STATE, evaluate, load_model, resolve_device, train

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--parallel blocks runs under torchrun, e.g. torchrun --nproc_per_node 3 -m "
                         "diffusionblocks train --method dblocks --parallel blocks ...")
    check_independent(cfg, "--parallel blocks")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    sent = {"bytes": 0, "collectives": 0}

    def gather(obj):  # the only communication: small Python objects, counted
        objs = [None] * world
        dist.all_gather_object(objs, obj)
        sent["bytes"] += len(pickle.dumps(obj))  # what all_gather_object sends from this rank
        sent["collectives"] += 1
        return objs

    out = Path(out)
    try:
        hashes = gather(config_hash(cfg))
        if len(set(hashes)) > 1:
            raise ValueError(f"the ranks were started with different configs (hashes {hashes})")
        B = cfg.dblocks.num_blocks
        blocks = rank_blocks(B, world, rank)
        data_parallel = None
        if world > B:  # one sub-group per block; every rank takes part in creating every group
            groups = [dist.new_group([b + i * B for i in range(world // B)]) for b in range(B)]
            data_parallel = DataParallel(groups[rank % B], rank // B, world // B)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            io.atomic_write_text(out / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
        job_cfg = RunConfig.from_dict(cfg.to_dict())
        job_cfg.train.blocks, job_cfg.train.parallel = ",".join(map(str, blocks)), "none"
        job_cfg.train.device = str(device)
        run = out / f"rank{rank}"
        if resume and (run / STATE).exists():
            results = train(None, run, resume=True, progress=progress and rank == 0, data_parallel=data_parallel)
        else:
            results = train(job_cfg, run, progress=progress and rank == 0, data_parallel=data_parallel)
        everyone = gather({"rank": rank, "blocks": blocks, "train_seconds": results["train_seconds"],
                           "steps": results["steps"], "layer_updates": results["layer_updates"],
                           "gradient_bytes_within_block": data_parallel.bytes if data_parallel else 0})
        dist.barrier()
        leaders = range(min(world, B))  # in a data-parallel group, rank b (index 0) holds the block
        # no process group other than the default one exists, and nothing but the two gathers above and
        # the barriers uses it: zero bytes of gradients cross a process, by construction
        summary = {"world_size": world, "rank": rank, "blocks": blocks, "ranks": everyone,
                   "layer_updates": results["layer_updates"], "gradient_bytes_between_blocks": 0,
                   "gradient_bytes_within_blocks": sum(r["gradient_bytes_within_block"] for r in everyone),
                   "process_groups": ["default (config agreement at the start, results at the end)"]
                   + ([f"block {b}: ranks {[b + i * B for i in range(world // B)]} (data-parallel)"
                       for b in range(B)] if data_parallel else []),
                   "bytes_sent_by_this_rank": sent["bytes"], "object_gathers": sent["collectives"]}
        if rank == 0:
            merge([out / f"rank{r}" for r in leaders], out)
            cfg_m, model, ds = load_model(out)
            model.to(device)
            ev = evaluate(model, ds.x_test, ds.y_test, cfg_m, 0, device)
            summary.update(method="dblocks", num_blocks=cfg.dblocks.num_blocks, test_accuracy=ev["accuracy"],
                           accuracy_per_step=ev["accuracy_per_step"], test_n=ev["n"],
                           steps=sum(everyone[r]["steps"] for r in leaders),
                           layer_updates=sum(everyone[r]["layer_updates"] for r in leaders),
                           train_seconds=max(r["train_seconds"] for r in everyone))
            io.save_json(out / "results.json", summary)
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()
