"""Noise-conditioning overhead: time of B DiffusionBlocks steps (one per block) / time of one
end-to-end step, measured side by side in one process, interleaved, median over repeats.

    python benchmarks/classify_overhead.py --preset fashion --repeats 30 --out benchmarks/results/overhead.json
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
from diffusionblocks.data import load_dataset, to_float  # noqa: E402
from diffusionblocks.methods import METHODS  # noqa: E402
from diffusionblocks.run import build_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    arms = {}
    for method in ("e2e", "dblocks"):
        cfg = apply_overrides(load_preset(args.preset), args.overrides)
        cfg.train.method = method
        ds = load_dataset(cfg.data.name)
        model = build_model(cfg, ds)
        arms[method] = (cfg, METHODS[method](model, cfg, 10_000))
    n = arms["e2e"][0].train.batch_size
    x, y = to_float(ds.x_train[:n]), ds.y_train[:n]
    B = arms["dblocks"][0].dblocks.num_blocks
    dblocks = arms["dblocks"][1]

    def e2e_step():
        arms["e2e"][1].step((x, y))

    def block_cycle():  # each block once, as B consecutive dblocks steps
        for b in range(B):
            dblocks.step((x, y), b)

    times = {"e2e": [], "dblocks_cycle": []}
    for i in range(args.warmup + args.repeats):
        for name, fn in (("e2e", e2e_step), ("dblocks_cycle", block_cycle)):
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ratios = [c / e for c, e in zip(times["dblocks_cycle"], times["e2e"])]
    result = {
        "preset": args.preset, "overrides": args.overrides, "num_blocks": B, "batch_size": n,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "e2e_step_s_median": statistics.median(times["e2e"]),
        "dblocks_cycle_s_median": statistics.median(times["dblocks_cycle"]),
        "ratio_of_medians": statistics.median(times["dblocks_cycle"]) / statistics.median(times["e2e"]),
        "median_of_paired_ratios": statistics.median(ratios),
        "target": "<= 1.10 (paper: 1.07 on one H100)",
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
