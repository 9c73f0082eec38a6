"""Image generation ablations at small scale (the paper's Tables 7 and 10): a sweep over B, and the
partition (equi-probability vs uniform in log sigma, overlap gamma 0.05 vs 0). Every run gets the same
layer-update budget; FD (classifier features) over gen.fd_samples samples, whichever way it falls.

    python benchmarks/imagegen_ablation.py --preset gen-quick --out benchmarks/results/imagegen_ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks.config import apply_overrides, load_preset  # noqa: E402
from diffusionblocks.run import load_model  # noqa: E402
from diffusionblocks.tasks.imagegen import evaluate_samples  # noqa: E402
from diffusionblocks.train import reference_model, train  # noqa: E402


def run(cfg, out: Path) -> dict:
    results = train(cfg, out, progress=False) if not (out / "results.json").exists() else \
        json.loads((out / "results.json").read_text())
    _, model, ds = load_model(out)
    scores = evaluate_samples(model, cfg, ds, reference=reference_model)
    return {"fd": scores["fd_classifier_features"], "class_accuracy": scores.get("class_accuracy"),
            "eval_loss": results["eval_loss"], "train_seconds": results["train_seconds"],
            "sampling_seconds_per_image": scores["seconds_per_image"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gen-quick")
    ap.add_argument("--blocks", default="1,2,3,4,6")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="runs/imagegen-ablation")
    ap.add_argument("--out", default="benchmarks/results/imagegen_ablation.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = apply_overrides(load_preset(args.preset), args.overrides)
    base.train.seed = args.seed
    depth = base.model.depth
    arms = {}
    for B in (int(b) for b in args.blocks.split(",")):
        cfg = apply_overrides(load_preset(args.preset), args.overrides)
        cfg.train.seed = args.seed
        if B == 1:
            cfg.train.method = "e2e"
        else:
            cfg.train.method, cfg.dblocks.num_blocks = "dblocks", B
            if depth % B:
                base_n, extra = divmod(depth, B)
                cfg.dblocks.allocation = ",".join(str(base_n + (i < extra)) for i in range(B))
        arms[f"B={B}"] = cfg
    for kind, gamma in (("equiprob", 0.0), ("uniform-log", 0.05), ("uniform-log", 0.0)):
        cfg = apply_overrides(load_preset(args.preset), args.overrides)
        cfg.train.seed, cfg.train.method = args.seed, "dblocks"
        cfg.dblocks.partition, cfg.dblocks.gamma = kind, gamma
        arms[f"B={cfg.dblocks.num_blocks} {kind} gamma={gamma}"] = cfg
    report = {"preset": args.preset, "seed": args.seed, "rows": {}}
    for name, cfg in arms.items():
        print(f"== {name}", flush=True)
        report["rows"][name] = run(cfg, Path(args.runs) / name.replace(" ", "_").replace("=", ""))
        r = report["rows"][name]
        print(f"{name}: FD {r['fd']:.3f}, denoising loss {r['eval_loss']:.4f}, class acc {r['class_accuracy']}, "
              f"train {r['train_seconds']:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| arm | FD (classifier features) | class accuracy | denoising loss | train s |\n|---|---|---|---|---|")
    for name, r in report["rows"].items():
        acc = f"{100 * r['class_accuracy']:.1f}%" if r["class_accuracy"] is not None else "-"
        print(f"| {name} | {r['fd']:.3f} | {acc} | {r['eval_loss']:.4f} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
