"""`compare --task imagegen`: end-to-end DiT vs DiffusionBlocks on one layer-update budget; FD (classifier
features) over seeds, sample grids side by side, and sampling time at equal steps."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from . import io
from .compare import train_arms
from .config import RunConfig
from .images import grid, save_png, to_uint8
from .train import load_model

ROLES = ("e2e", "dblocks")


def sample_scores(run: Path, progress: bool) -> dict:
    """FD etc. of a finished run, cached in run/samples.json (recomputed when the config changed)."""
    from .tasks.imagegen import evaluate_samples

    cfg, model, ds = load_model(run)
    cached = run / "samples.json"
    if cached.exists():
        scores = io.load_json(cached)
        if scores.get("config") == cfg.gen.__dict__:
            return scores
    scores = evaluate_samples(model, cfg, ds, progress=progress)
    scores["config"] = dict(cfg.gen.__dict__)
    io.save_json(cached, scores)
    return scores


@torch.no_grad()
def sampling_speed(models: dict, steps: int, batch: int, repeats: int = 7) -> dict:
    """Seconds per sampling call of `batch` images over `steps` steps, models interleaved, median."""
    times = {k: [] for k in models}
    for i in range(repeats + 1):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.sample(batch, steps, generator=torch.Generator().manual_seed(i))
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def compare_imagegen(base: RunConfig, out_dir: str | Path, seeds: list[int], progress: bool = True) -> dict:
    out = Path(out_dir)
    runs = train_arms(base, out, seeds, ROLES, progress)
    for role, results in runs.items():
        for seed, r in zip(seeds, results):
            r["samples"] = sample_scores(out / f"{role}-seed{seed}", progress)
    models = {role: load_model(out / f"{role}-seed{seeds[0]}")[1] for role in ROLES}
    steps = base.gen.steps
    speed = sampling_speed(models, steps, batch=64)
    # the same noise and classes through both models, grids side by side
    grids = []
    for role in ROLES:
        x, _ = models[role].sample(40, steps, classes=list(range(models[role].num_classes)) or None,
                                   generator=torch.Generator().manual_seed(0), cfg_scale=base.gen.cfg_scale)
        grids.append(grid(to_uint8(x), nrow=10))
    c, h, w = grids[0].shape
    both = torch.zeros(c, h, 2 * w + 8, dtype=torch.uint8)
    both[..., :w], both[..., w + 8:] = grids[0], grids[1]
    save_png(both, out / "samples.png")
    rows = {}
    for role, results in runs.items():
        fd = [r["samples"]["fd_classifier_features"] for r in results]
        acc = [r["samples"].get("class_accuracy") for r in results]
        rows[role] = {"method": role, "num_blocks": results[0]["num_blocks"], "seeds": [r["seed"] for r in results],
                      "fd": fd, "fd_mean": statistics.mean(fd), "class_accuracy": acc,
                      "eval_loss": [r["eval_loss"] for r in results], "layer_updates": results[0]["layer_updates"],
                      "steps": results[0]["steps"],
                      "train_seconds": statistics.median(r["train_seconds"] for r in results),
                      "sampling_seconds_per_batch_of_64": speed[role]}
    ratio = speed["e2e"] / speed["dblocks"]
    fd_ratio = rows["dblocks"]["fd_mean"] / rows["e2e"]["fd_mean"]
    verdict = [f"sampling at {steps} steps: DiffusionBlocks (B={rows['dblocks']['num_blocks']}) is {ratio:.2f}x "
               f"faster than end-to-end (ideal B = {rows['dblocks']['num_blocks']})",
               f"FD dblocks / e2e = {fd_ratio:.2f} (lower FD is better; the issue's target: <= 1.2)"]
    report = {"rows": rows, "sampling_speedup": ratio, "fd_ratio": fd_ratio, "seeds": seeds, "steps": steps,
              "verdict": verdict}
    io.save_json(out / "compare.json", report)
    lines = ["| arm | FD (classifier features) | generated classified as their class | denoising loss | "
             "layer-updates | train s | sampling s / 64 images |", "|---|---|---|---|---|---|---|"]
    for role, r in rows.items():
        acc = [a for a in r["class_accuracy"] if a is not None]
        lines.append(f"| {role}{' B=' + str(r['num_blocks']) if role == 'dblocks' else ''} | {_mean_std(r['fd'])} | "
                     f"{100 * statistics.mean(acc):.1f}% | {_mean_std(r['eval_loss'])} | {r['layer_updates']} | "
                     f"{r['train_seconds']:.1f} | {r['sampling_seconds_per_batch_of_64']:.3f} |" if acc else
                     f"| {role} | {_mean_std(r['fd'])} | - | {_mean_std(r['eval_loss'])} | {r['layer_updates']} | "
                     f"{r['train_seconds']:.1f} | {r['sampling_seconds_per_batch_of_64']:.3f} |")
    md = "\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in verdict) + "\n\nsamples.png: e2e left, dblocks right\n"
    io.atomic_write_text(out / "compare.md", md)
    print("\n" + md, end="")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'samples.png'}")
    return report
