"""Which DiffusionBlocks classification defaults does the evidence support? Chosen on validation.

Trains dblocks variants (loss weighting x input label flips x soft-mixture inputs) on one budget with a
validation split held out from the training images, evaluates each trained model under several samplers
on validation, picks the best (training setting, sampler) there, and only then evaluates on the test set:
once for the chosen setting, once for the paper's (fixed in advance) and once for end-to-end. Prints tables
and writes JSON.

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
PAPER = ({"loss_weight": "edm", "input_flip": 0.0, "input_mix": 0.0},
         dict(bridge="soft", sigma_start=0.0, init="noise", steps_per_block=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--weights", default="edm,none")
    ap.add_argument("--flips", default="0,0.2")
    ap.add_argument("--mixes", default="0,0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-size", type=int, default=10_000, help="training images held out for validation")
    ap.add_argument("--out", default="runs/defaults")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    report = {"steps": args.steps, "preset": args.preset, "overrides": args.overrides, "val_size": args.val_size,
              "runs": []}

    base = apply_overrides(load_preset(args.preset), args.overrides)
    base.train.steps, base.train.seed, base.data.val_size = args.steps, args.seed, args.val_size
    if not (out / "e2e" / "results.json").exists():
        train(role_config(base, "e2e", args.seed), out / "e2e", progress=False, overwrite=True)
    models = {"e2e": load_model(out / "e2e")}
    e2e_val = evaluate(models["e2e"][1], models["e2e"][2], models["e2e"][0], split="validation")["accuracy"]
    print(f"e2e: validation {100 * e2e_val:.2f}", flush=True)

    for weight, flip, mix in itertools.product(args.weights.split(","), [float(f) for f in args.flips.split(",")],
                                               [float(m) for m in args.mixes.split(",")]):
        cfg = role_config(base, "dblocks", args.seed)
        cfg.chain.loss_weight, cfg.chain.input_flip, cfg.chain.input_mix = weight, flip, mix
        run_dir = out / f"dblocks-w{weight}-flip{flip}-mix{mix}"
        if not (run_dir / "results.json").exists():  # finished runs and their evaluations are reused
            train(cfg, run_dir, progress=False, overwrite=True)
        setting = {"loss_weight": weight, "input_flip": flip, "input_mix": mix}
        models[json.dumps(setting)] = load_model(run_dir)
        cfg_m, model, ds = models[json.dumps(setting)]
        cache = run_dir / "val_samplers.json"
        done = json.loads(cache.read_text()) if cache.exists() else {}
        for sampler in SAMPLERS:
            if json.dumps(sampler) not in done:
                ev = evaluate(model, ds, cfg_m, split="validation", **sampler)
                done[json.dumps(sampler)] = {"accuracy": ev["accuracy"], "accuracy_per_step": ev["accuracy_per_step"]}
                cache.write_text(json.dumps(done, indent=1))
            ev = done[json.dumps(sampler)]
            report["runs"].append({**setting, **sampler, "val_accuracy": ev["accuracy"],
                                   "val_accuracy_per_step": ev["accuracy_per_step"]})
            steps = " ".join(f"{100 * a:.1f}" for a in ev["accuracy_per_step"])
            print(f"w={weight:4} flip={flip:.2f} mix={mix:.2f} {json.dumps(sampler):90} val {100 * ev['accuracy']:.2f} "
                  f"[{steps}]", flush=True)

    best = max(report["runs"], key=lambda r: r["val_accuracy"])
    chosen = ({k: best[k] for k in ("loss_weight", "input_flip", "input_mix")},
              {k: best[k] for k in SAMPLERS[-1] if k in best} | {k: best[k] for k in SAMPLERS[0]})
    report["chosen_on_validation"] = {"training": chosen[0], "sampler": chosen[1], "val_accuracy": best["val_accuracy"]}
    report["test"] = {}  # evaluated once each, after the choice
    for name, (setting, sampler) in (("chosen", chosen), ("paper", PAPER)):
        cfg_m, model, ds = models[json.dumps(setting)]
        report["test"][name] = {"training": setting, "sampler": sampler,
                                "test_accuracy": evaluate(model, ds, cfg_m, split="test", **sampler)["accuracy"]}
    cfg_m, model, ds = models["e2e"]
    report["test"]["e2e"] = {"val_accuracy": e2e_val, "test_accuracy": evaluate(model, ds, cfg_m)["accuracy"]}
    print(json.dumps({"chosen_on_validation": report["chosen_on_validation"], "test": report["test"]}, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    (out / "defaults.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
