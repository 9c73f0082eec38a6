"""Side-by-side comparison on one budget: end-to-end, DiffusionBlocks, and an end-to-end control
with only one block's depth (does stacking the blocks add anything over one of them?)."""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

from . import io
from .config import RunConfig, save_config
from .train import CONFIG, RESULTS, STATE, train

ROLES = ("e2e", "control", "dblocks")


def role_config(base: RunConfig, role: str, seed: int) -> RunConfig:
    """The config of one arm. All arms get the same layer-update budget (base.train.steps end-to-end
    steps of base.model.depth layers)."""
    cfg = copy.deepcopy(base)
    cfg.train.seed = seed
    cfg.train.budget = "layer-updates"
    B = base.dblocks.num_blocks
    if role == "e2e":
        cfg.train.method = "e2e"
    elif role == "dblocks":
        cfg.train.method = "dblocks"
    elif role == "control":  # one block's depth, trained end to end, B times as many steps
        if base.model.depth % B:
            raise ValueError(f"the control needs model.depth={base.model.depth} divisible by num_blocks={B}")
        cfg.train.method = "e2e"
        cfg.model.depth = base.model.depth // B
        cfg.train.steps = base.train.steps * B
    else:
        raise ValueError(f"unknown role {role!r}")
    return cfg


def run_arm(cfg: RunConfig, out: Path, progress: bool) -> dict:
    """Train one arm, reusing a finished run and resuming an interrupted one in the same directory."""
    same_config = (out / CONFIG).exists() and io.load_json(out / CONFIG) == cfg.to_dict()
    if same_config and (out / RESULTS).exists():
        print(f"reusing finished run {out}", file=sys.stderr)
        return io.load_json(out / RESULTS)
    resumable = same_config and (out / STATE).exists()
    if (out / CONFIG).exists() and not resumable:
        print(f"{out} holds a run with another config or no checkpoint; starting it afresh", file=sys.stderr)
    return train(None if resumable else cfg, out, resume=resumable, progress=progress)


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def summarize(runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for role, results in runs.items():
        acc = [r["test_accuracy"] for r in results]
        rows[role] = {
            "method": results[0]["method"], "depth": results[0]["depth"], "num_blocks": results[0]["num_blocks"],
            "seeds": [r["seed"] for r in results],
            "test_accuracy": acc,
            "test_accuracy_mean": statistics.mean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "steps": results[0]["steps"], "layer_updates": results[0]["layer_updates"],
            "train_seconds": statistics.median(r["train_seconds"] for r in results),
            "seconds_per_layer_update": statistics.median(r["seconds_per_layer_update"] for r in results),
            "activation_bytes_per_step": results[0]["activation_bytes_per_step"],
            "parameters": results[0]["parameters"],
            "accuracy_per_step": [statistics.mean(s) for s in zip(*(r["accuracy_per_step"] for r in results))],
        }
    return rows


def markdown_table(rows: dict) -> str:
    lines = ["| arm | method | layers | test accuracy (%) | steps | layer-updates | train s | "
             "ms / layer-update | activations / step (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for role, r in rows.items():
        lines.append(f"| {role} | {r['method']}{' B=' + str(r['num_blocks']) if r['method'] == 'dblocks' else ''} | "
                     f"{r['depth']} | {_spread(r['test_accuracy'])} | {r['steps']} | {r['layer_updates']} | "
                     f"{r['train_seconds']:.1f} | {1000 * r['seconds_per_layer_update']:.3f} | "
                     f"{r['activation_bytes_per_step'] / 2**20:.1f} |")
    if "dblocks" in rows:
        steps = ", ".join(f"{100 * a:.2f}" for a in rows["dblocks"]["accuracy_per_step"])
        lines.append(f"\nDiffusionBlocks accuracy after each inference step (%): {steps}")
    return "\n".join(lines) + "\n"


def verdict(rows: dict) -> list[str]:
    """Plain sentences on what the numbers say, whichever way they fall."""
    out = []
    e2e, db, ctl = (rows.get(k, {}).get("test_accuracy_mean") for k in ("e2e", "dblocks", "control"))
    if e2e is not None and db is not None:
        out.append(f"dblocks - e2e = {100 * (db - e2e):+.2f} points (paper, CIFAR-100: -0.95)")
    if ctl is not None and e2e is not None:
        out.append(f"e2e - control = {100 * (e2e - ctl):+.2f} points: "
                   + ("depth helped end-to-end training at this budget" if e2e > ctl
                      else "depth did NOT help end-to-end training at this budget"))
    if ctl is not None and db is not None:
        out.append(f"dblocks - control = {100 * (db - ctl):+.2f} points: "
                   + ("the stacked blocks beat one block's depth" if db > ctl
                      else "the blocks added nothing over one block's depth trained end to end"))
    return out


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def plot(runs: dict[str, list[dict]], path: Path) -> bool:
    """Test accuracy vs layer-updates for every arm (mean over seeds). False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for role, results in runs.items():
        xs = [p["layer_updates"] for p in results[0]["curve"]]
        ys = [100 * statistics.mean(r["curve"][i]["accuracy"] for r in results) for i in range(len(xs))]
        label = {"e2e": "end-to-end", "control": "end-to-end, one block's depth",
                 "dblocks": f"DiffusionBlocks (B={results[0]['num_blocks']})"}[role]
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("layer-updates")
    ax.set_ylabel("test accuracy (%)")
    n = next(iter(runs.values()))[0].get("curve_n", "?")
    ax.set_title(f"test accuracy on the first {n} test images, mean over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def train_arms(base: RunConfig, out: Path, seeds: list[int], roles, progress: bool) -> dict[str, list[dict]]:
    """Every arm for every seed into out/ROLE-seedS (finished arms reused, interrupted ones resumed)."""
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(out / "base_config.json", save_config(base))
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        for role in roles:
            print(f"== {role} (seed {seed}) ==", file=sys.stderr)
            runs.setdefault(role, []).append(run_arm(role_config(base, role, seed), out / f"{role}-seed{seed}",
                                                     progress))
    return runs


def compare(base: RunConfig, out_dir: str | Path, seeds: list[int], roles=ROLES, progress: bool = True) -> dict:
    out = Path(out_dir)
    runs = train_arms(base, out, seeds, roles, progress)
    rows = summarize(runs)
    report = {"rows": rows, "verdict": verdict(rows), "seeds": seeds}
    io.save_json(out / "compare.json", report)
    md = markdown_table(rows) + "\n" + "\n".join(f"- {v}" for v in report["verdict"]) + "\n"
    io.atomic_write_text(out / "compare.md", md)
    plotted = plot(runs, out / "compare.png")
    print("\n" + md, end="")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}" + (f", {out / 'compare.png'}" if plotted else ""))
    return report
