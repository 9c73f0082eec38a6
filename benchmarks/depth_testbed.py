"""The depth testbed (task hops, diffusionblocks/tasks/hops.py): does DiffusionBlocks keep what depth buys?

For a model of D layers cut into B blocks: end to end at full depth (e2e-dD), compare's one-block-depth control (D / B
layers end to end, B times the steps: control-dD-BB) and DiffusionBlocks (dblocks-dD-BB), on one layer-update budget
per model, and end to end at full depth for DiffusionBlocks' steps (e2e-steps-dD-BB: B times the layer-updates), over
seeds, scored on the validation split: each arm's accuracy, each block's figure along the chain (the
accuracy after each block's Euler step) and the accuracy by hop count. The arms: 6 layers in 3 blocks and 4 layers in
2 blocks (blocks of two layers, whose control cannot follow more than 3 hops), and 6 layers in 2 blocks (blocks of
three). With --lrs the learning rate of the --tune arms is chosen first on the validation split (the best mean over
--lr-seeds; the others keep the preset's); --test scores the finished runs of the chosen settings once on the test
split.

    OMP_NUM_THREADS=1 python benchmarks/depth_testbed.py --out /tmp/depth --seeds 0,1,2 [--lrs 1e-3,2e-3,4e-3]
        [--arms e2e-d6,control-d6-B3,...] [--tune control-d6-B3,...] [--test] [--plot FILE.png] [KEY=VALUE ...]

Writes the runs under OUT/ARM-lrLR-seedS/ (a finished run is reused, an interrupted one resumed), OUT/depth_testbed.json
and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks import io  # noqa: E402
from diffusionblocks.compare import role_config, run_arm, seeds_separate  # noqa: E402
from diffusionblocks.config import RunConfig, apply_overrides, load_preset  # noqa: E402
from diffusionblocks.run import load_model, validate  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402

# arm -> (compare's role, D layers, B blocks); the end-to-end arms ignore B
ARMS = {"e2e-d6": ("e2e", 6, 3), "control-d6-B3": ("control", 6, 3), "dblocks-d6-B3": ("dblocks", 6, 3),
        "e2e-d4": ("e2e", 4, 2), "control-d4-B2": ("control", 4, 2), "dblocks-d4-B2": ("dblocks", 4, 2),
        "control-d6-B2": ("control", 6, 2), "dblocks-d6-B2": ("dblocks", 6, 2),
        "dblocks-d6-B1": ("dblocks", 6, 1),  # the ablation: the denoising objective and readout without the cut
        "e2e-steps-d6-B3": ("e2e-steps", 6, 3), "e2e-steps-d4-B2": ("e2e-steps", 4, 2),
        "e2e-steps-d6-B2": ("e2e-steps", 6, 2)}
WALL, TEST = "wall.json", "test.json"  # in a run directory: the wall time of its training call; its test score


def arm_config(base: RunConfig, arm: str, seed: int, lr: float) -> RunConfig:
    """The config of one run: compare's role for the arm's D and B, with learning rate `lr`."""
    role, depth, B = ARMS[arm]
    cfg = copy.deepcopy(base)
    cfg.model.depth, cfg.blocks.num_blocks = depth, B
    cfg = role_config(cfg, role, seed)
    cfg.train.lr = lr
    return validate(cfg)


def run(base: RunConfig, arm: str, seed: int, lr: float, out: Path) -> dict:
    """Train one run (or reuse it): its results.json, with the wall time of the call that trained it."""
    cfg = arm_config(base, arm, seed, lr)
    where = out / f"{arm}-lr{lr:g}-seed{seed}"
    trains, t0 = not (where / "results.json").exists(), time.perf_counter()
    results = run_arm(cfg, where, progress=False)
    if trains:  # this call trained it (or finished it, after an interruption)
        io.save_json(where / WALL, {"seconds": time.perf_counter() - t0})
    print(f"{arm} lr {lr:g} seed {seed}: {get_task(cfg.task).summary(results)}", file=sys.stderr, flush=True)
    return dict(results, run=str(where), lr=lr, wall_seconds=io.load_json(where / WALL)["seconds"])


def test_score(run_dir: str) -> dict:
    """The run's evaluation on the test split, computed once (cached in the run as test.json)."""
    path = Path(run_dir) / TEST
    if not path.exists():
        cfg, model, data = load_model(run_dir)
        io.save_json(path, get_task(cfg.task).evaluate(model, data, cfg, split="test"))
    return io.load_json(path)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def shown(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def summary(runs: list[dict], prefix: str = "") -> dict:
    """An arm's figures over its runs: accuracy (each seed, mean, std), after each Euler step and by hop count (means),
    training time (median)."""
    key = lambda r: r[prefix] if prefix else r  # a run's results, or its test score
    acc = [key(r)["accuracy"] for r in runs]
    per_step = [statistics.mean(s) for s in zip(*(key(r)["accuracy_per_step"] for r in runs))]
    hops = sorted((k for k in key(runs[0]) if k.startswith("accuracy_hops")), key=lambda k: int(k[13:]))
    mean, std = mean_std(acc)
    return {"accuracy": acc, "mean": mean, "std": std, "per_step": per_step,
            "by_hops": {k[13:]: statistics.mean(key(r)[k] for r in runs) for k in hops}}


def verdict(arms: dict, what: str) -> list[str]:
    """For each model and cut: e2e against the control, DiffusionBlocks against e2e and against the control, in points,
    with whether the seeds separate them."""
    lines = []
    pairs = [pair for d, B in ((6, 3), (4, 2), (6, 2)) for pair in (
        (f"e2e-d{d}", f"control-d{d}-B{B}"), (f"dblocks-d{d}-B{B}", f"e2e-d{d}"),
        (f"dblocks-d{d}-B{B}", f"control-d{d}-B{B}"), (f"dblocks-d{d}-B{B}", f"e2e-steps-d{d}-B{B}"),
        (f"e2e-steps-d{d}-B{B}", f"control-d{d}-B{B}"))]
    pairs += [("dblocks-d6-B1", "e2e-d6"), ("dblocks-d6-B3", "dblocks-d6-B1")]  # the objective alone; the cut alone
    for a, b in pairs:
        if a in arms and b in arms:
            va, vb = arms[a][what]["accuracy"], arms[b][what]["accuracy"]
            sep = seeds_separate(va, vb)
            said = "one seed: no spread" if sep is None else "separated (> 2 SE)" if sep else "a tie (< 2 SE)"
            lines.append(f"{a} - {b} = {100 * (statistics.mean(va) - statistics.mean(vb)):+.2f} points: {said}")
    return lines


def table(arms: dict, what: str, label: str) -> str:
    hops = next(iter(arms.values()))[what]["by_hops"]
    head = (f"| arm | method | layers | steps | lr | {label} accuracy (%) | per seed | after each block's step (%) | "
            f"by hop count {'/'.join(hops)} (%) | train s (median) | wall s (median) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, a in arms.items():
        s, r = a[what], a["runs"][0]
        method = r["method"] + (f" B={r['num_blocks']}" if r["num_blocks"] > 1 else "")
        lines.append(f"| {arm} | {method} | {r['depth']} | {r['steps']} | {a['lr']:g} | {shown(s['accuracy'])} | "
                     f"{', '.join(f'{100 * v:.2f}' for v in s['accuracy'])} | "
                     f"{', '.join(f'{100 * v:.2f}' for v in s['per_step'])} | "
                     f"{'/'.join(f'{100 * v:.1f}' for v in s['by_hops'].values())} | "
                     f"{statistics.median(x['train_seconds'] for x in a['runs']):.0f} | "
                     f"{statistics.median(x['wall_seconds'] for x in a['runs']):.0f} |")
    return "\n".join(lines) + "\n"


def plot(arms: dict, what: str, path: Path) -> bool:
    """Accuracy by hop count on the split `what`: one panel per model (6 layers cut in 3, 4 in 2, 6 in 2), each arm's
    seeds as dots and their mean as a line. False without matplotlib."""
    from diffusionblocks.images import pyplot

    plt = pyplot()
    if plt is None:
        return False
    panels = [(d, B) for d, B in ((6, 3), (4, 2), (6, 2)) if f"dblocks-d{d}-B{B}" in arms]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (d, B) in zip(axes[0], panels):
        for arm, label in ((f"e2e-d{d}", f"end to end, {d} layers"),
                           (f"e2e-steps-d{d}-B{B}", f"end to end, {d} layers ({B}x the steps)"),
                           (f"control-d{d}-B{B}", f"end to end, {d // B} layers ({B}x the steps)"),
                           (f"dblocks-d{d}-B{B}", f"DiffusionBlocks, {d} layers in {B} blocks"),
                           (f"dblocks-d{d}-B1" if B == 3 else "", f"DiffusionBlocks' objective, one block of {d}")):
            if arm not in arms or what not in arms[arm]:
                continue
            runs = [r[what] if what == "test" else r for r in arms[arm]["runs"]]
            hops = sorted((k for k in runs[0] if k.startswith("accuracy_hops")), key=lambda k: int(k[13:]))
            x = [int(k[13:]) for k in hops]
            mean = [100 * statistics.mean(r[k] for r in runs) for k in hops]
            line, = ax.plot(x, mean, marker="o", label=label)
            for r in runs:
                ax.scatter(x, [100 * r[k] for k in hops], s=8, alpha=0.5, color=line.get_color())
        ax.set_title(f"{d} layers; one-block depth {d // B}")
        ax.set_xlabel("hops the answer takes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel(f"{what} accuracy (%): mean line, seeds dots")
    fig.suptitle(f"Pointer chasing over 8 symbols: does DiffusionBlocks keep what depth buys? ({what} split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hops")
    ap.add_argument("--out", required=True, help="where the runs and depth_testbed.json go")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--val-size", type=int, default=2000, help="validation examples held out of the training ones")
    ap.add_argument("--lrs", default="", help="learning rates to choose the --tune arms' from (default: the preset's)")
    ap.add_argument("--tune", default="", help="the arms whose learning rate --lrs chooses (default: every arm)")
    ap.add_argument("--lr-seeds", default="0,1", help="the seeds the learning rate is chosen over")
    ap.add_argument("--test", action="store_true", help="also score the chosen runs on the test split, once")
    ap.add_argument("--plot", default="", help="a PNG of accuracy by hop count (the test split with --test)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE settings over the preset")
    args = ap.parse_args()
    base = apply_overrides(load_preset(args.preset), [*args.overrides, f"data.val_size={args.val_size}"])
    if base.task != "hops":
        raise SystemExit(f"--preset {args.preset} is a {base.task} preset: the depth testbed runs task hops")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; expected some of {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(v) for v in args.lrs.split(",") if v.strip()] or [base.train.lr]
    lr_seeds = [int(s) for s in args.lr_seeds.split(",")]
    tune = [a.strip() for a in args.tune.split(",") if a.strip()] or arms
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    report = {"preset": args.preset, "overrides": args.overrides, "val_size": args.val_size, "seeds": seeds,
              "lrs": lrs, "lr_seeds": lr_seeds if len(lrs) > 1 else [], "tuned": tune if len(lrs) > 1 else [],
              "arms": {}}
    for arm in arms:
        grid = {}
        if len(lrs) > 1 and arm in tune:  # the arm's learning rate: the best mean validation accuracy over lr_seeds
            grid = {lr: statistics.mean(run(base, arm, s, lr, out)["accuracy"] for s in lr_seeds) for lr in lrs}
        lr = max(grid, key=grid.get) if grid else lrs[0] if arm in tune else base.train.lr
        runs = [run(base, arm, s, lr, out) for s in seeds]
        report["arms"][arm] = {"lr": lr, "lr_grid": {f"{k:g}": v for k, v in grid.items()},
                               "validation": summary(runs), "runs": runs}
        io.save_json(out / "depth_testbed.json", report)
    if args.test:
        for a in report["arms"].values():
            for r in a["runs"]:
                r["test"] = test_score(r["run"])
            a["test"] = summary(a["runs"], "test")
    report["verdict"] = {what: verdict(report["arms"], what) for what in ("validation", "test")
                         if all(what in a for a in report["arms"].values())}
    io.save_json(out / "depth_testbed.json", report)

    for what in report["verdict"]:
        print(f"\n{what} split:\n")
        print(table(report["arms"], what, what))
        print("\n".join(f"- {line}" for line in report["verdict"][what]))
    grids = {arm: a["lr_grid"] for arm, a in report["arms"].items() if a["lr_grid"]}
    if grids:
        print(f"\nlearning rates, mean validation accuracy (%) over seeds {lr_seeds}:\n")
        print("| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |")
        print("|---|" + "---|" * (len(lrs) + 1))
        for arm, grid in grids.items():
            print(f"| {arm} | " + " | ".join(f"{100 * v:.2f}" for v in grid.values())
                  + f" | {report['arms'][arm]['lr']:g} |")
    if args.plot and plot(report["arms"], "test" if args.test else "validation", Path(args.plot)):
        print(f"wrote {args.plot}")
    print(f"\nwrote {out / 'depth_testbed.json'}")


if __name__ == "__main__":
    main()
