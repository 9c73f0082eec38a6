"""How the DiffusionBlocks-vs-end-to-end gap moves with the budget: one full compare (fresh schedule,
fully trained) per budget, final test accuracy of each arm vs layer-updates. Writes JSON and a PNG.

    python benchmarks/classify_budget.py --fractions 0.25,0.5,1 --out runs/budget
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks.compare import compare  # noqa: E402
from diffusionblocks.config import apply_overrides, load_preset  # noqa: E402
from diffusionblocks.images import pyplot  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--fractions", default="0.25,0.5,1", help="budgets as fractions of the preset's steps")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="runs/budget")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = apply_overrides(load_preset(args.preset), args.overrides)
    seeds = [int(s) for s in args.seeds.split(",")]
    points = []
    for frac in [float(f) for f in args.fractions.split(",")]:
        cfg = apply_overrides(load_preset(args.preset), args.overrides)
        cfg.train.steps = max(1, round(base.train.steps * frac))
        report = compare(cfg, Path(args.out) / f"steps{cfg.train.steps}", seeds, progress=False)
        points.append({"steps": cfg.train.steps, "layer_updates": report["rows"]["e2e"]["layer_updates"],
                       **{role: row["test_accuracy_mean"] for role, row in report["rows"].items()}})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "budget.json").write_text(json.dumps(points, indent=2) + "\n")
    print(json.dumps(points, indent=2))
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"e2e": "end-to-end", "control": "end-to-end, one block's depth", "dblocks": "DiffusionBlocks"}
    for role, label in labels.items():
        ax.plot([p["layer_updates"] for p in points], [100 * p[role] for p in points], marker="o", label=label)
    ax.set_xlabel("budget (layer-updates), each point a separate fully scheduled run")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.out) / "budget.png", dpi=120)


if __name__ == "__main__":
    main()
