"""One change at a time from the classification defaults, scored on a validation split: the settings that
depart from the paper or the official code, and the chain-matched training input (chain.input_clean). Every
arm is the defaults plus one override; same seed, budget, split and sampler. The best arm on validation, and
the defaults, are then evaluated once on test.

    python benchmarks/classify_settings.py --steps 300 --out runs/settings model.width=128 model.patch=4 train.lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks.compare import role_config  # noqa: E402
from diffusionblocks.config import apply_overrides, load_preset, parse_ints  # noqa: E402
from diffusionblocks.run import evaluate, load_model  # noqa: E402
from diffusionblocks.train import train  # noqa: E402

ARMS = {
    "defaults": [],
    "label head adaLN (official)": ["model.label_head=adaln"],
    "c_noise unscaled (x1)": ["model.noise_scale=1"],
    "AdamW beta2 0.999": ["train.beta2=0.999"],
    "no weight decay": ["train.weight_decay=0"],
    "half the inputs clean (chain-matched)": ["chain.input_clean=0.5"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--val-size", type=int, default=10_000, help="training images held out for validation")
    ap.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
    ap.add_argument("--out", default="runs/settings")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out, seeds = Path(args.out), parse_ints(args.seeds, "--seeds", "0,1")
    names = [a.strip() for a in args.arms.split(",") if a.strip()] or list(ARMS)
    if unknown := [a for a in names if a not in ARMS]:
        raise SystemExit(f"unknown arm(s) {unknown}; available: {list(ARMS)}")
    report = {"preset": args.preset, "steps": args.steps, "overrides": args.overrides, "val_size": args.val_size,
              "seeds": seeds, "arms": {}}
    for name in names:
        rows = []
        for seed in seeds:
            base = apply_overrides(load_preset(args.preset), args.overrides + ARMS[name])
            base.train.steps, base.data.val_size = args.steps, args.val_size
            cfg = role_config(base, "dblocks", seed)
            run = out / (name.split(" (")[0].replace(" ", "-") + f"-seed{seed}")
            if not (run / "results.json").exists():
                train(cfg, run, progress=False, overwrite=True)
            cfg_m, model, ds = load_model(run)
            val = evaluate(model, ds, cfg_m, split="validation")["accuracy"]
            rows.append({"seed": seed, "val_accuracy": val, "run": str(run),
                         "train_seconds": json.loads((run / "results.json").read_text())["train_seconds"]})
            print(f"{name} (seed {seed}): validation {100 * val:.2f}%", flush=True)
        report["arms"][name] = {"overrides": ARMS[name], "runs": rows,
                                "val_accuracy_mean": sum(r["val_accuracy"] for r in rows) / len(rows)}
    best = max(report["arms"], key=lambda a: report["arms"][a]["val_accuracy_mean"])
    report["chosen_on_validation"] = best
    for name in dict.fromkeys([best, "defaults"]):  # test: once per setting chosen, and the defaults
        if name in report["arms"]:
            accs = []
            for r in report["arms"][name]["runs"]:
                cfg_m, model, ds = load_model(Path(r["run"]))
                accs.append(evaluate(model, ds, cfg_m, split="test")["accuracy"])
            report["arms"][name]["test_accuracy"] = accs
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n| arm | override | validation accuracy, seeds {seeds} | test (chosen and defaults only) |\n"
          "|---|---|---|---|")
    for name, a in report["arms"].items():
        vals = " / ".join(f"{100 * r['val_accuracy']:.2f}" for r in a["runs"])
        test = " / ".join(f"{100 * t:.2f}" for t in a["test_accuracy"]) if "test_accuracy" in a else "-"
        print(f"| {name} | {' '.join(a['overrides']) or '-'} | {vals} | {test} |")
    print(f"chosen on validation: {best}")


if __name__ == "__main__":
    main()
