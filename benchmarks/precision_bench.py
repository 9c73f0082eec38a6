"""train.precision and train.compile side by side: step time and saved activation bytes of fp32 / bf16, compile off /
on, for e2e and dblocks, in one process, interleaved, medians over repeats; and DiffusionBlocks' overhead per
layer-update over e2e (B DiffusionBlocks steps, one per block, against one end-to-end step) with and without compile
(train.compile: methods.base.compile_step).

    OMP_NUM_THREADS=1 python benchmarks/precision_bench.py --preset tiny --repeats 20 --out /tmp/precision.json
    OMP_NUM_THREADS=1 python benchmarks/precision_bench.py --preset fashion --precisions fp32 --repeats 30  # compile
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
from diffusionblocks.memory import saved_activation_bytes  # noqa: E402
from diffusionblocks.methods import METHODS  # noqa: E402
from diffusionblocks.methods.base import autocast, compile_step  # noqa: E402
from diffusionblocks.run import build_model  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402


def arm(preset: str, overrides: list[str], method: str, precision: str, compiled: bool, ds=None):
    """(step function, saved bytes of one step, cfg, data) for one arm: a fresh model and its method."""
    cfg = apply_overrides(load_preset(preset), overrides)
    cfg.train.method, cfg.train.precision = method, precision
    ds = ds if ds is not None else get_task(cfg.task).load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, ds)
    if compiled:
        compile_step(model)
    m = METHODS[method](model, cfg, 10_000)
    n, B = cfg.train.batch_size, m.num_blocks
    batch = (to_float(ds.x_train[:n]), ds.y_train[:n])

    def step():  # e2e: one step; dblocks: one step on each block (the same layer-updates)
        with autocast(precision, "cpu"):
            for b in range(B):
                m.step(batch, b)

    with autocast(precision, "cpu"), torch.compiler.set_stance("force_eager"):
        nbytes, _ = saved_activation_bytes(lambda: m.probe_loss(batch), list(model.parameters()))
    return step, nbytes, cfg, ds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds (the compiled arms compile in the first)")
    ap.add_argument("--no-compile", action="store_true", help="eager arms only")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated (fp32 alone: the compile overhead)")
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    arms, ds, cfg = {}, None, None
    for compiled in (False,) if args.no_compile else (False, True):
        for precision in args.precisions.split(","):
            for method in ("e2e", "dblocks"):
                t0 = time.perf_counter()
                step, nbytes, cfg, ds = arm(args.preset, args.overrides, method, precision, compiled, ds)
                arms[(method, precision, compiled)] = {"step": step, "bytes": nbytes}
                print(f"[built] {method} {precision} compile={compiled}: {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr)
    times = {k: [] for k in arms}
    for i in range(args.warmup + args.repeats):
        for key, a in arms.items():
            t0 = time.perf_counter()
            a["step"]()
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for (method, precision, compiled), a in arms.items():
        base = (method, "fp32", False)
        rows.append({"method": method, "precision": precision, "compile": compiled,
                     "seconds_per_step": med[(method, precision, compiled)],
                     "time_vs_fp32_eager": med[(method, precision, compiled)] / med[base],
                     "saved_bytes": a["bytes"], "bytes_vs_fp32": a["bytes"] / arms[base]["bytes"]})
    overhead = {f"{p}{' compile' if c else ''}": med[("dblocks", p, c)] / med[("e2e", p, c)]
                for (_, p, c) in arms if _ == "e2e"}
    print(f"{args.preset} preset, depth {cfg.model.depth}, width {cfg.model.width}, batch {cfg.train.batch_size}, "
          f"B = {cfg.blocks.num_blocks}, torch threads {torch.get_num_threads()}; dblocks rows: B steps, one per block")
    print(f"{'method':<9}{'precision':<10}{'compile':<8}{'ms/step':>9}{'vs fp32':>9}{'saved KiB':>11}{'vs fp32':>9}")
    for r in rows:
        print(f"{r['method']:<9}{r['precision']:<10}{'on' if r['compile'] else 'off':<8}"
              f"{1e3 * r['seconds_per_step']:>9.2f}{r['time_vs_fp32_eager']:>9.2f}{r['saved_bytes'] / 1024:>11.1f}"
              f"{r['bytes_vs_fp32']:>9.2f}")
    print("DiffusionBlocks overhead per layer-update over e2e: "
          + ", ".join(f"{k} {v:.3f}" for k, v in overhead.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "overrides": args.overrides, "repeats": args.repeats,
                               "threads": torch.get_num_threads(), "rows": rows, "overhead": overhead}, indent=1))


if __name__ == "__main__":
    main()
