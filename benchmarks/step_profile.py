"""Where a training step's time goes: one end-to-end step against the B DiffusionBlocks steps that make
the same layer-updates (one per block), profiled side by side in one process with torch.profiler. A step
is what the training loop runs: the unit's next batch, its augmentation, then the method's step.

Prints, per arm, the ops with the most self CPU time (per e2e step / per cycle of B block steps) and the
difference between the arms op by op, and writes JSON. Use it to find the fixed per-step costs that
benchmarks/classify_overhead.py sums up.

    python benchmarks/step_profile.py --preset fashion --steps 20 --out benchmarks/results/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from diffusionblocks.config import apply_overrides, load_preset  # noqa: E402
from diffusionblocks.methods import METHODS  # noqa: E402
from diffusionblocks.run import build_model  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402


def self_times(fn, steps: int) -> tuple[dict[str, float], float]:
    """Self CPU milliseconds per call of `fn`, by op name, and the profiled total per call."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    rows = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    return rows, sum(rows.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/step_profile.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    arms = {}
    for method in ("e2e", "dblocks"):
        cfg = apply_overrides(load_preset(args.preset), args.overrides)
        cfg.train.method = method
        task = get_task(cfg.task)
        ds = task.load_data(cfg)
        m = METHODS[method](build_model(cfg, ds), cfg, 10_000)
        arms[method] = (m, {b: task.stream(ds, cfg, seed) for b, seed in m.stream_seeds().items()})
    B = cfg.blocks.num_blocks

    def full(method, streams, block):  # as train.Run.step: the unit's batch, prepared, then the step
        stream = streams[block]
        method.step(task.prepare(next(stream), stream, cfg, ds, "cpu"), block)

    fns = {"e2e": lambda: full(*arms["e2e"], 0), "dblocks": lambda: [full(*arms["dblocks"], b) for b in range(B)]}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    profiles = {name: self_times(fn, args.steps) for name, fn in fns.items()}
    report = {"preset": args.preset, "overrides": args.overrides, "num_blocks": B, "steps": args.steps,
              "threads": torch.get_num_threads(), "unit": "self CPU ms per e2e step / per cycle of B block steps",
              "total_ms": {k: v[1] for k, v in profiles.items()},
              "ops_ms": {k: v[0] for k, v in profiles.items()}}
    for name, (rows, total) in profiles.items():
        print(f"\n== {name}: {total:.2f} ms profiled per {'step' if name == 'e2e' else f'{B} block steps'}")
        for op, ms in sorted(rows.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {ms:8.3f} ms  {op}")
    e2e, db = profiles["e2e"][0], profiles["dblocks"][0]
    diff = {op: db.get(op, 0.0) - e2e.get(op, 0.0) for op in set(e2e) | set(db)}
    print(f"\n== dblocks - e2e: {profiles['dblocks'][1] - profiles['e2e'][1]:+.2f} ms; the largest differences")
    for op, ms in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        print(f"  {ms:+8.3f} ms  {op}  (e2e {e2e.get(op, 0.0):.3f}, dblocks {db.get(op, 0.0):.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
