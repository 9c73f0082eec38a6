"""DiffusionBlocks' overhead per layer-update: time of B DiffusionBlocks steps (one per block) / time of one
end-to-end step, measured side by side in one process, interleaved, median over repeats. Two figures: the
method's step alone (forward, backward, clipping, optimizer) and the full training step as the loop runs
it (the unit's next batch, its augmentation, then the method's step).

With --decompose, the full steps are also timed at half the depth (same B), in the same interleaved loop:
the difference gives each method's cost per layer and its fixed cost per step (stem, head, loss, batch,
optimizer calls: what does not scale with depth), so the overhead splits into the two.

    python benchmarks/classify_overhead.py --repeats 30 --decompose --out benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusionblocks.config import apply_overrides, load_preset  # noqa: E402
from diffusionblocks.data import to_float  # noqa: E402
from diffusionblocks.methods import METHODS  # noqa: E402
from diffusionblocks.run import build_model  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402


def arm(preset: str, overrides: list[str], method: str, depth: int | None = None):
    """(method object, full-step function, B) for one arm: a fresh model, its method and data streams."""
    cfg = apply_overrides(load_preset(preset), overrides)
    cfg.train.method = method
    if depth is not None:
        cfg.model.depth = depth
    task = get_task(cfg.task)
    ds = task.load_data(cfg)
    torch.manual_seed(0)
    m = METHODS[method](build_model(cfg, ds), cfg, 10_000)
    streams = {b: task.stream(ds, cfg, seed) for b, seed in m.stream_seeds().items()}

    def full():  # as train.Run.step, for every unit once: its batch, prepared, then the step
        for b, stream in streams.items():
            m.step(task.prepare(next(stream), stream, cfg, ds, "cpu"), b)

    return m, full, ds, cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--decompose", action="store_true", help="also time both methods at half the depth")
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    e2e, e2e_full, ds, cfg = arm(args.preset, args.overrides, "e2e")
    dblocks, dblocks_full, _, dcfg = arm(args.preset, args.overrides, "dblocks")
    B, depth, n = dcfg.blocks.num_blocks, cfg.model.depth, cfg.train.batch_size
    x, y = to_float(ds.x_train[:n]), ds.y_train[:n]
    fns = {"e2e": lambda: e2e.step((x, y)), "dblocks_cycle": lambda: [dblocks.step((x, y), b) for b in range(B)],
           "e2e_full": e2e_full, "dblocks_cycle_full": dblocks_full}
    half = depth // 2
    if args.decompose:
        if half % B or half < B:
            raise SystemExit(f"--decompose needs half the depth ({half}) to be a multiple of B = {B}")
        fns["e2e_full_half"] = arm(args.preset, args.overrides, "e2e", half)[1]
        fns["dblocks_cycle_full_half"] = arm(args.preset, args.overrides, "dblocks", half)[1]
    times = {name: [] for name in fns}
    for i in range(args.warmup + args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    paired = {kind: statistics.median(c / e for c, e in zip(times[f"dblocks_cycle{kind}"], times[f"e2e{kind}"]))
              for kind in ("", "_full")}
    result = {
        "preset": args.preset, "overrides": args.overrides, "num_blocks": B, "batch_size": n,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "e2e_step_s_median": med["e2e"], "dblocks_cycle_s_median": med["dblocks_cycle"],
        "ratio_of_medians": med["dblocks_cycle"] / med["e2e"], "median_of_paired_ratios": paired[""],
        "e2e_full_step_s_median": med["e2e_full"], "dblocks_full_cycle_s_median": med["dblocks_cycle_full"],
        "full_ratio_of_medians": med["dblocks_cycle_full"] / med["e2e_full"],
        "full_median_of_paired_ratios": paired["_full"],
        "target": "<= 1.10 (paper: 1.07 on one H100)",
    }
    if args.decompose:  # t(depth) = fixed + depth * per_layer, from the full steps at depth and depth / 2
        for name, key in (("e2e", "e2e_full"), ("dblocks", "dblocks_cycle_full")):
            per_layer = (med[key] - med[f"{key}_half"]) / (depth - half)
            result[f"{name}_s_per_layer"] = per_layer
            result[f"{name}_fixed_s"] = med[key] - depth * per_layer  # per e2e step / per cycle of B block steps
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
