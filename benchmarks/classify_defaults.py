"""Which DiffusionBlocks classification defaults does the evidence support?

Trains dblocks variants (loss weighting x input label flips) on one budget and evaluates each trained
model under several samplers (bridge, start level, start from noise or zero, steps per block), next to an
end-to-end run. Prints a table and writes JSON.

    python benchmarks/classify_defaults.py --steps 300 --out runs/defaults
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks.compare import role_config  # noqa: E402
from diffusionblocks.config import apply_overrides, load_preset  # noqa: E402
from diffusionblocks.run import evaluate, load_model  # noqa: E402
from diffusionblocks.train import train  # noqa: E402

SAMPLERS = [dict(bridge=b, sigma_start=s, init=i, steps_per_block=k)
            for b, s, i, k in itertools.product(("soft", "hard"), (0.0, 5.0), ("noise", "zero"), (1,))]
SAMPLERS += [dict(bridge="hard", sigma_start=0.0, init="noise", steps_per_block=3),
             dict(bridge="soft", sigma_start=0.0, init="noise", steps_per_block=3, grid="karras")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--weights", default="edm,none")
    ap.add_argument("--flips", default="0,0.2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=5000)
    ap.add_argument("--out", default="runs/defaults")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    report = {"steps": args.steps, "preset": args.preset, "overrides": args.overrides, "runs": []}

    base = apply_overrides(load_preset(args.preset), args.overrides)
    base.train.steps, base.train.seed = args.steps, args.seed
    r = train(role_config(base, "e2e", args.seed), out / "e2e", progress=False)
    report["e2e"] = {"test_accuracy": r["test_accuracy"]}
    print(f"e2e: {100 * r['test_accuracy']:.2f}", flush=True)

    for weight, flip in itertools.product(args.weights.split(","), [float(f) for f in args.flips.split(",")]):
        cfg = role_config(base, "dblocks", args.seed)
        cfg.dblocks.loss_weight, cfg.dblocks.input_flip = weight, flip
        run_dir = out / f"dblocks-w{weight}-flip{flip}"
        train(cfg, run_dir, progress=False)
        _, model, ds = load_model(run_dir)
        for sampler in SAMPLERS:
            ev = evaluate(model, ds, cfg, args.eval_limit, **sampler)
            row = {"loss_weight": weight, "input_flip": flip, **sampler, "accuracy": ev["accuracy"],
                   "accuracy_per_step": ev["accuracy_per_step"]}
            report["runs"].append(row)
            steps = " ".join(f"{100 * a:.1f}" for a in ev["accuracy_per_step"])
            print(f"w={weight:4} flip={flip:.2f} {json.dumps(sampler):90} acc {100 * ev['accuracy']:.2f} "
                  f"[{steps}]", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "defaults.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
