"""Choosing settings on the validation split (the language presets', and the block-wise baselines' on the image
presets, roles ff, dgl, greedy, noprop, dtp): each arm is the preset plus one override,
trained for each role (end-to-end and DiffusionBlocks by default) on the same seed and budget, and scored by the
task's validation figure (masked diffusion: the bound in bits per character, same K, same windows). Nothing
here reads the test split; the chosen setting then goes into the preset and `compare` reports test once.

    python benchmarks/lm_settings.py --preset lm-cpu --arms "lr 1e-3,lr 2e-3,lr 4e-3" --out runs/lm-settings

Autoregressive DiffusionBlocks (the validation split capped at 512 windows, the sampler's own settings
evaluated on the first arm's DiffusionBlocks run with --inference):

    python benchmarks/lm_settings.py --preset lm-ar-cpu --arms base --inference --out runs/ar-settings data.val_size=512
    python benchmarks/lm_settings.py --preset lm-ar-cpu --roles dblocks \\
        --arms "noise per window,edm weight,gamma 0,B 2,B 6" --out runs/ar-settings2 data.val_size=512

The block-wise baselines on scikit-learn digits, 300 training images held out:

    python benchmarks/lm_settings.py --preset digits --roles ff --arms "base,ff theta 1,ff theta 4,lr 1e-3" \
        --out runs/baseline-settings data.val_size=300
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
from diffusionblocks.tasks import get_task  # noqa: E402
from diffusionblocks.train import train  # noqa: E402

ARMS = {
    "base": [],
    "lr 5e-4": ["train.lr=5e-4"],
    "lr 1e-3": ["train.lr=1e-3"],
    "lr 2e-3": ["train.lr=2e-3"],
    "lr 4e-3": ["train.lr=4e-3"],
    "learned positions": ["model.positions=learned"],
    "cosine schedule": ["mdlm.schedule=cosine"],
    "no weight decay": ["train.weight_decay=0"],
    "noise per window": ["arlm.noise_level=window"],
    "edm weight": ["chain.loss_weight=edm"],
    "gamma 0": ["blocks.gamma=0"],
    "B 2": ["blocks.num_blocks=2"],
    "B 6": ["blocks.num_blocks=6"],
    "sigma_max share 0.25": ["arlm.sigma_max_share=0.25"],
    "sigma_max share 0.5": ["arlm.sigma_max_share=0.5"],
    # the block-wise baselines (roles ff, dgl, greedy, noprop, dtp on an image preset)
    "ff theta 0.5": ["ff.theta=0.5"],
    "ff theta 1": ["ff.theta=1"],
    "ff theta 4": ["ff.theta=4"],
    "aux pool cls": ["dgl.aux_pool=cls"],
    "ff neutral mean": ["ff.neutral=mean"],
    "noprop unit-norm labels": ["noprop.label_scale=unit-norm"],
}
# the sampler's settings of a trained DiffusionBlocks model (--inference: evaluated on the first arm's run)
INFERENCE = {"init noise": {"init": "noise"}, "hard bridge": {"bridge": "hard"}, "unit bridge": {"bridge": "unit"},
             "2 steps per block": {"steps_per_block": 2},
             "init noise, unit bridge": {"init": "noise", "bridge": "unit"}}
EXTRA = ("ce_sigma_max", "chain_ce", "ce", "bpc", "accuracy_readout")  # also recorded where the task reports them


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lm-cpu")
    ap.add_argument("--roles", default="e2e,dblocks", help="compare roles to train per arm")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
    ap.add_argument("--out", default="runs/lm-settings")
    ap.add_argument("--inference", action="store_true", help="also the sampler's settings (INFERENCE) on the first "
                                                              "arm's DiffusionBlocks run")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out, seeds = Path(args.out), parse_ints(args.seeds, "--seeds", "0,1")
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    names = [a.strip() for a in args.arms.split(",") if a.strip()] or list(ARMS)
    if unknown := [a for a in names if a not in ARMS]:
        raise SystemExit(f"unknown arm(s) {unknown}; available: {list(ARMS)}")
    task = get_task(load_preset(args.preset).task)
    report = {"preset": args.preset, "overrides": args.overrides, "seeds": seeds, "roles": roles,
              "metric": f"validation {task.metric}", "higher_is_better": task.higher_is_better, "arms": {}}
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        arm = report["arms"][name] = {"overrides": ARMS[name], "roles": {}}
        for role in roles:
            rows = []
            for seed in seeds:
                cfg = role_config(apply_overrides(load_preset(args.preset), args.overrides + ARMS[name]), role, seed)
                run = out / f"{name.replace(' ', '-')}-{role}-seed{seed}"
                if not (run / "results.json").exists():
                    train(cfg, run, progress=False, overwrite=True)
                cfg_m, model, data = load_model(run)
                ev = evaluate(model, data, cfg_m, split="validation")
                value, extra = ev[task.metric], {k: ev[k] for k in EXTRA if k in ev}
                rows.append({"seed": seed, "value": value, "run": str(run), **extra})
                print(f"{name} / {role} (seed {seed}): validation {task.metric} {value:.4f} {extra}", flush=True)
                if args.inference and role == "dblocks" and name == names[0]:
                    for what, options in INFERENCE.items():
                        ev = evaluate(model, data, cfg_m, split="validation", **options)
                        report.setdefault("inference", {})[what] = {
                            "options": options, "seed": seed, task.metric: ev[task.metric],
                            **{k: ev[k] for k in EXTRA if k in ev}}
                        print(f"  sampler {what}: validation {task.metric} {ev[task.metric]:.4f} "
                              f"{ {k: ev[k] for k in EXTRA if k in ev} }", flush=True)
            arm["roles"][role] = {"runs": rows, "mean": sum(r["value"] for r in rows) / len(rows)}
        (out / "settings.json").write_text(json.dumps(report, indent=2) + "\n")  # after every arm: nothing lost

    pick = max if task.higher_is_better else min
    report["chosen_on_validation"] = {role: pick(names, key=lambda a: report["arms"][a]["roles"][role]["mean"])
                                      for role in roles}
    (out / "settings.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| arm | override | " + " | ".join(f"{r}: validation {task.metric}" for r in roles) + " |")
    print("|---|---|" + "---|" * len(roles))
    for name, a in report["arms"].items():
        cells = [" / ".join(f"{r['value']:.4f}" for r in a["roles"][role]["runs"]) for role in roles]
        print(f"| {name} | {' '.join(a['overrides'])} | " + " | ".join(cells) + " |")
    print("chosen on validation: " + ", ".join(f"{r}: {a}" for r, a in report["chosen_on_validation"].items()))


if __name__ == "__main__":
    main()
