"""DiffusionBlocks' step overhead per layer-update over end-to-end, eager and under train.compile, on the compare
preset: B DiffusionBlocks steps (one per block) against one end-to-end step (the same layer-updates), in one process,
interleaved, medians over repeats. Also what each part of a step costs (forward+backward, clipping, optimizer), so
the overhead can be placed.

    OMP_NUM_THREADS=2 python benchmarks/compile_overhead.py --preset fashion --repeats 30 --out /tmp/compile.json
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
from diffusionblocks.methods.base import compile_step  # noqa: E402
from diffusionblocks.run import build_model  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402


def arm(cfg, ds, method: str, compiled: bool):
    """One step function of `method` (dblocks: one step on each block), a fresh model and its optimizers."""
    cfg = apply_overrides(load_preset("tiny"), []) if cfg is None else cfg
    cfg.train.method = method
    torch.manual_seed(0)
    model = build_model(cfg, ds)
    if compiled:
        compile_step(model)
    m = METHODS[method](model, cfg, 10_000)
    n, B = cfg.train.batch_size, m.num_blocks
    batch = (to_float(ds.x_train[:n]), ds.y_train[:n])

    def step():
        for b in range(B):
            m.step(batch, b)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds (the compiled arms compile in the first)")
    ap.add_argument("--out", default="benchmarks/results/compile_overhead.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = apply_overrides(load_preset(args.preset), args.overrides)
    ds = get_task(base.task).load_data(base)
    arms = {}
    for compiled in (False, True):
        for method in ("e2e", "dblocks"):
            cfg = apply_overrides(load_preset(args.preset), args.overrides)
            t0 = time.perf_counter()
            arms[(method, compiled)] = arm(cfg, ds, method, compiled)
            arms[(method, compiled)]()  # the first call compiles
            print(f"[built] {method} compile={compiled}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times = {k: [] for k in arms}
    for i in range(args.warmup + args.repeats):
        for key, step in arms.items():
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = {("compile" if c else "eager"): med[("dblocks", c)] / med[("e2e", c)] for c in (False, True)}
    rows = [{"method": m, "compile": c, "seconds": med[(m, c)], "q1": statistics.quantiles(times[(m, c)], n=4)[0],
             "q3": statistics.quantiles(times[(m, c)], n=4)[2]} for (m, c) in arms]
    print(f"{args.preset} preset, depth {base.model.depth}, width {base.model.width}, batch {base.train.batch_size}, "
          f"B = {base.blocks.num_blocks}, torch threads {torch.get_num_threads()}; dblocks: B steps, one per block")
    for r in rows:
        print(f"{r['method']:<8} compile={'on ' if r['compile'] else 'off'}  {1e3 * r['seconds']:8.2f} ms "
              f"(quartiles {1e3 * r['q1']:.2f}-{1e3 * r['q3']:.2f})")
    print("DiffusionBlocks overhead per layer-update over e2e: "
          + ", ".join(f"{k} {v:.3f}" for k, v in overhead.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "overrides": args.overrides, "repeats": args.repeats,
                               "threads": torch.get_num_threads(), "rows": rows, "overhead": overhead}, indent=1))


if __name__ == "__main__":
    main()
