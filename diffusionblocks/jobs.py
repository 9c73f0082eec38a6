"""Blocks trained apart: per-block jobs and merging their checkpoints into one model (parallel.py runs
the jobs as the ranks of one torchrun).

Blocks need no communication. A job trains some of the blocks (``train.blocks``, e.g. "0,2"), with each
block's data order, augmentation and noise drawn from its own stream seeded by (seed, block) and its own
optimizer, so a block's weights do not depend on which other blocks trained beside it, in which order,
or on which machine: a sequential run, a set of per-block jobs merged afterwards and a torchrun with the
blocks spread over ranks give the same weights (bit-identical on a CPU; tests/test_jobs.py).

This needs independent blocks: a replicated stem/head (``blocks.shared_stem_head=false``). A shared
stem/head would be trained by every block, so jobs holding different blocks would end with different
copies of it and no merge could be sound; jobs and parallel mode refuse it.

Every job writes ``job.json`` beside its checkpoint: the blocks it owns, the partition, the architecture,
the data config and a hash of the whole config except the settings that may differ between jobs of one
model (which blocks, device, threads, logging). ``merge`` refuses checkpoints that disagree.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from . import io
from .config import RunConfig, model_identity, save_config
from .run import CONFIG, EMA_WEIGHTS, JOB, MERGE, STATE, WEIGHTS, WRITER, build_model, read_config, validate
from .tasks import get_task

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
    out = Path(out)
    inputs = {Path(r).resolve() for r in runs}
    if out.resolve() in inputs:
        raise ValueError(f"--out {out} is one of the jobs being merged: merge into a new directory")
    held = [name for name in (STATE, JOB) if (out / name).exists()]
    if held:  # a trained run or a job: a merged config over its state would break --resume
        raise ValueError(f"--out {out} holds a run ({', '.join(held)}): merge into a new directory")
    jobs = _read_jobs(runs)
    _check_one_model(jobs)
    owner, missing = _owners(jobs, allow_missing)
    run_dirs = [r for r, _, _ in jobs]
    cfg0, job0 = jobs[0][2], jobs[0][1]
    task = get_task(validate(cfg0).task)
    shapes = task.saved_shapes(run_dirs[0]) or task.load_data(cfg0)  # the data only for jobs without shapes.json
    with torch.device("meta"):  # the names and shapes of the whole model, without its memory
        whole = {k: v.shape for k, v in build_model(cfg0, shapes).state_dict().items()}
    initial = build_model(cfg0, shapes).state_dict() if missing else {}  # the seed's weights of the missing blocks
    merged = _merged_weights(run_dirs, WEIGHTS, initial, whole)
    have_ema = all((r / EMA_WEIGHTS).exists() for r in run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    cfg_out = RunConfig.from_dict(cfg0.to_dict())
    cfg_out.train.blocks, cfg_out.train.parallel = "", "none"
    io.atomic_write_text(out / CONFIG, save_config(cfg_out))
    for name in task.run_files:  # what the jobs kept beside their weights (data fingerprints, ...)
        if (run_dirs[0] / name).is_file():
            io.atomic_write_bytes(out / name, (run_dirs[0] / name).read_bytes())
    meta = {"merged_from": json.dumps([str(r) for r in run_dirs]), "writer": WRITER}
    io.save_safetensors(merged, out / WEIGHTS, metadata=meta)
    if have_ema:
        io.save_safetensors(_merged_weights(run_dirs, EMA_WEIGHTS, initial, whole), out / EMA_WEIGHTS,
                           metadata=meta)
    elif (out / EMA_WEIGHTS).exists():
        (out / EMA_WEIGHTS).unlink()
    record = {"runs": [str(r) for r in run_dirs], "owner": {str(b): str(r) for b, r in sorted(owner.items())},
              "missing": missing, "config_hash": job0["config_hash"], "ema": have_ema}
    io.save_json(out / MERGE, record)
    return record


def _read_jobs(runs) -> list[tuple[Path, dict, RunConfig]]:
    """(directory, job record, config) of each finished per-block job."""
    if not runs:
        raise ValueError("merge needs at least one run directory")
    jobs = []
    for run in map(Path, runs):
        if not (run / JOB).exists() or not (run / CONFIG).exists():
            raise ValueError(f"{run} is not a per-block job directory (it has no {JOB}; train with "
                             f"--method dblocks --blocks ... or --parallel blocks)")
        job, cfg = io.load_json(run / JOB), read_config(run / CONFIG)
        if not job["finished"]:
            state = io.load_torch(run / STATE) if (run / STATE).exists() else {"step": 0}
            raise ValueError(f"{run} has not finished (step {state['step']} of "
                             f"{job['steps_per_block'] * len(job['blocks'])}); finish it with: "
                             f"diffusionblocks train --resume {run}")
        jobs.append((run, job, cfg))
    return jobs


def _check_one_model(jobs):
    """The jobs agree on partition, architecture, data and every setting but the job-local ones."""
    run0, job0, cfg0 = jobs[0]
    for run, job, cfg in jobs[1:]:
        for what in ("partition", "architecture", "data"):
            diff = _differences(job0[what], job[what])
            if diff:
                raise ValueError(f"cannot merge {run0} and {run}: their {what} differs ({'; '.join(diff[:4])})")
        diff = _differences(model_identity(cfg0), model_identity(cfg))  # as loaded: any version's config.json
        if diff:
            raise ValueError(f"cannot merge {run0} and {run}: their configs differ ({'; '.join(diff[:4])})")


def _owners(jobs, allow_missing: bool) -> tuple[dict[int, Path], list[int]]:
    """The job each block comes from (exactly one), and the blocks no job holds."""
    owner: dict[int, Path] = {}
    for run, job, _ in jobs:
        for b in job["blocks"]:
            if b in owner:
                raise ValueError(f"block {b} is owned by both {owner[b]} and {run}; merge takes each block from "
                                 f"exactly one job")
            owner[b] = run
    B = jobs[0][1]["num_blocks"]
    missing = [b for b in range(B) if b not in owner]
    if missing and not allow_missing:
        raise ValueError(f"block(s) {missing} of {B} are in none of the runs {[str(r) for r, _, _ in jobs]}; "
                         f"train them (--blocks {','.join(map(str, missing))}) or pass --allow-missing")
    if missing:
        print(f"WARNING: block(s) {missing} are missing and keep their initial (untrained) weights: the merged "
              f"model is NOT a trained model at those noise levels", file=sys.stderr)
    return owner, missing


def _merged_weights(runs: list[Path], name: str, initial: dict, whole: dict) -> dict:
    """Union of the jobs' tensors; tensors outside every block (e.g. the fixed label table) must agree, and together
    they must be the whole model (`whole`: name -> shape). Missing blocks take theirs from `initial`."""
    merged: dict = {}
    for run in runs:
        weights, _ = io.load_safetensors(run / name)
        for k, v in weights.items():
            if k in merged and not torch.equal(merged[k], v):
                raise ValueError(f"tensor {k!r} differs between the jobs (in {run}); the runs are not parts of "
                                 f"one model")
            merged[k] = v
    for k, v in initial.items():
        merged.setdefault(k, v)
    lacking = [k for k in whole if k not in merged]
    foreign = [k for k in merged if k not in whole or tuple(merged[k].shape) != tuple(whole[k])]
    if lacking or foreign:
        raise ValueError(f"the jobs' {name} files do not make one model ({len(lacking)} tensors lacking, e.g. "
                         f"{lacking[:2]}; {len(foreign)} foreign, e.g. {foreign[:2]}): a job's weights are not those "
                         f"of the blocks its {JOB} names")
    return merged


