"""Image generation ablations at small scale (the paper's Tables 7 and 10): the partition (equi-probability
vs uniform in log sigma), the overlap gamma (0.05 vs 0), and the number of blocks B. Every arm gets the same
layer-update budget and is scored on the same grids with the same sampler and the same number of FD samples:

- "cdf": 18 levels equally spaced in the training levels' CDF over the whole range, whatever the
  partition (the default arm's own grid);
- "karras": EDM's rho = 7 schedule, 18 levels;
- "own": the arm's own default grid (its partition's blocks, steps / B each). For an equi-probability
  partition it is the "cdf" grid; for uniform-in-log-sigma it puts one Euler step across [2, 80] and six
  into [3.4, 80] alike: comparing partitions there changes the sampler too, hence the shared grids.

Each arm over several seeds (mean ± std over seeds, and every seed). With --reuse DIR, the e2e (B = 1) and
default arms are taken from a `diffusionblocks compare --task imagegen` output trained with the same
preset and overrides (DIR/e2e-seedS, DIR/dblocks-seedS), when their configs match exactly.

    python benchmarks/imagegen_ablation.py --preset gen-quick --seeds 0,1,2 --reuse runs/compare-gen-quick \\
        --out benchmarks/results/imagegen_ablation.json train.steps=600
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks import io  # noqa: E402
from diffusionblocks.config import RunConfig, apply_overrides, load_preset, parse_ints  # noqa: E402
from diffusionblocks.run import load_model  # noqa: E402
from diffusionblocks.tasks.imagegen import evaluate_samples  # noqa: E402
from diffusionblocks.train import reference_model, train  # noqa: E402

GRIDS = ("cdf", "karras", "own")
DEFAULT = "B=3 equiprob gamma=0.05 (default)"


def arm_configs(preset: str, overrides: list[str]) -> dict[str, RunConfig]:
    """Every arm's config (seed 0): the default, one change at a time from it, and the B sweep."""
    def make(**changes) -> RunConfig:
        cfg = apply_overrides(load_preset(preset), overrides)
        cfg.train.method, cfg.train.budget = "dblocks", "layer-updates"
        for key, value in changes.items():
            setattr(cfg.dblocks, key, value)
        return cfg

    base = make()
    if (base.blocks.num_blocks, base.blocks.partition, base.blocks.gamma) != (3, "equiprob", 0.05):
        raise SystemExit("the arms are defined around B = 3, equiprob, gamma 0.05: the preset has other defaults")
    arms = {DEFAULT: base,
            "B=3 uniform-log gamma=0.05": make(partition="uniform-log"),
            "B=3 equiprob gamma=0": make(gamma=0.0),
            "B=3 uniform-log gamma=0": make(partition="uniform-log", gamma=0.0)}
    e2e = make()
    e2e.train.method = "e2e"
    arms["B=1 (end-to-end)"] = e2e
    depth = base.model.depth
    for B in (2, 4, 6):
        q, r = divmod(depth, B)
        arms[f"B={B}"] = make(num_blocks=B, allocation="" if not r else ",".join(
            str(q + (i < r)) for i in range(B)))
    return arms


def trained_run(cfg: RunConfig, out: Path, reuse: Path | None, role: str | None) -> Path:
    """A finished run of cfg: a matching compare run, a finished one in out, or a new one trained there."""
    if reuse is not None and role is not None:
        candidate = reuse / f"{role}-seed{cfg.train.seed}"
        if (candidate / "results.json").exists() and \
                RunConfig.from_dict(io.load_json(candidate / "config.json")).to_dict() == cfg.to_dict():
            return candidate
        print(f"  ({candidate} does not hold this arm's finished run: training it here)", flush=True)
    if not (out / "results.json").exists():
        train(cfg, out, progress=False, overwrite=True)
    return out


def score(run: Path) -> dict:
    """FD on every grid (cached in run/ablation_scores.json), the denoising loss and the training time."""
    cached = run / "ablation_scores.json"
    scores = io.load_json(cached) if cached.exists() else {}
    cfg, model, ds = load_model(run)
    for grid in GRIDS:
        if grid not in scores:
            s = evaluate_samples(model, cfg, ds, reference=reference_model,
                                 grid=cfg.gen.grid if grid == "own" else grid)
            scores[grid] = {k: s[k] for k in ("fd_classifier_features", "class_accuracy", "num_generated",
                                              "num_real", "fd_real_floor", "steps", "sampler", "grid")}
            io.save_json(cached, scores)
    results = io.load_json(run / "results.json")
    return {"fd": {g: scores[g]["fd_classifier_features"] for g in GRIDS},
            "class_accuracy": {g: scores[g]["class_accuracy"] for g in GRIDS},
            "fd_samples": scores["cdf"]["num_generated"], "fd_real_floor": scores["cdf"]["fd_real_floor"],
            "eval_loss": results["eval_loss"], "train_seconds": results["train_seconds"], "run": str(run)}


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gen-quick")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="", help="comma-separated arm names (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="print the arm names and exit")
    ap.add_argument("--reuse", default="", help="a compare --task imagegen output with the same preset and overrides")
    ap.add_argument("--runs", default="runs/imagegen-ablation")
    ap.add_argument("--out", default="benchmarks/results/imagegen_ablation.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    arms = arm_configs(args.preset, args.overrides)
    if args.list:
        print("\n".join(arms))
        return
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()] or list(arms)
    unknown = [a for a in chosen if a not in arms]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; available: {list(arms)}")
    seeds = parse_ints(args.seeds, "--seeds", "0,1,2")
    reuse = Path(args.reuse) if args.reuse else None
    roles = {DEFAULT: "dblocks", "B=1 (end-to-end)": "e2e"}
    report = {"preset": args.preset, "overrides": args.overrides, "seeds": seeds, "grids": list(GRIDS), "rows": {}}
    for name in chosen:
        rows = []
        for seed in seeds:
            cfg = RunConfig.from_dict(arms[name].to_dict())
            cfg.train.seed = seed
            slug = name.split(" (")[0].replace(" ", "_").replace("=", "")
            print(f"== {name}, seed {seed}", flush=True)
            run = trained_run(cfg, Path(args.runs) / f"{slug}-seed{seed}", reuse, roles.get(name))
            rows.append(dict(score(run), seed=seed))
            r = rows[-1]
            print(f"{name}, seed {seed}: FD " + ", ".join(f"{g} {r['fd'][g]:.2f}" for g in GRIDS) +
                  f" ({r['fd_samples']} samples; real-vs-real floor {r['fd_real_floor']:.2f}); denoising loss "
                  f"{r['eval_loss']:.4f}; train {r['train_seconds']:.0f} s", flush=True)
        report["rows"][name] = rows
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # after every arm: nothing lost

    n = {r["fd_samples"] for rows in report["rows"].values() for r in rows}
    print(f"\nFD (classifier features) over {', '.join(map(str, sorted(n)))} generated vs as many test images, "
          f"18 Euler steps; mean ± std over seeds {seeds}, then each seed")
    print("\n| arm | FD, shared cdf grid | FD, shared karras grid | FD, own grid | class accuracy (cdf) | "
          "denoising loss | train s |\n|---|---|---|---|---|---|---|")
    for name, rows in report["rows"].items():
        cols = []
        for g in GRIDS:
            each = " / ".join(f"{r['fd'][g]:.1f}" for r in rows)
            cols.append(f"{spread([r['fd'][g] for r in rows])} ({each})")
        acc = spread([100 * r["class_accuracy"]["cdf"] for r in rows], "{:.1f}")
        loss = spread([r["eval_loss"] for r in rows], "{:.4f}")
        secs = statistics.mean(r["train_seconds"] for r in rows)
        print(f"| {name} | {' | '.join(cols)} | {acc}% | {loss} | {secs:.0f} |")


if __name__ == "__main__":
    main()
