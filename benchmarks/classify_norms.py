"""The norms a DiffusionBlocks classifier's blocks see: in training (the noised label embedding z = y +
sigma * eps, sigma in the block's widened range; y the label's embedding or, with input_mix, a soft
mixture) and at inference (the point the deterministic Euler chain hands to the block). Reports ||z|| and
the network's input ||c_in(sigma) z|| for each block on both paths (validation images for the chain).

    python benchmarks/classify_norms.py RUN_DIR --out benchmarks/results/classify_norms.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks.data import to_float  # noqa: E402
from diffusionblocks.run import load_model  # noqa: E402
from diffusionblocks.tasks import run_split, split_arrays  # noqa: E402


def stats(v: torch.Tensor) -> dict:
    q = torch.quantile(v.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"mean": v.double().mean().item(), "p05": q[0].item(), "median": q[1].item(), "p95": q[2].item()}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/classify_norms.json")
    args = ap.parse_args()
    cfg, model, data = load_model(args.run)
    model.eval()
    x, y = split_arrays(data, run_split(cfg))
    x, y = to_float(x[:args.n]), y[:args.n]
    stack, precond, gen = model.stack, model.stack.precond, torch.Generator().manual_seed(0)
    report = {"run": args.run, "dim": model.labels.table.shape[1], "input_mix": cfg.chain.input_mix,
              "input_flip": cfg.chain.input_flip, "training": [], "chain": []}
    for b in range(model.num_blocks):  # training inputs, drawn as block_loss draws them
        z, sigma = stack.noisy_input(b, model.training_target(y, gen), gen)
        report["training"].append({"block": b, "sigma": stats(sigma), "z_norm": stats(z.norm(dim=-1)),
                                   "net_input_norm": stats((precond.c_in(sigma)[:, None] * z).norm(dim=-1))})
    seen = []  # the chain: record each block's input (init, grid as in evaluation)
    denoise = stack.denoise
    stack.denoise = lambda block, z, sigma, cond: (seen.append((block, z.clone(), sigma.clone())),
                                                   denoise(block, z, sigma, cond))[1]
    model.predict(x, generator=torch.Generator().manual_seed(0))
    stack.denoise = denoise
    for block, z, sigma in seen:
        report["chain"].append({"block": block, "sigma": sigma[0].item(), "init": cfg.chain.init,
                                "z_norm": stats(z.norm(dim=-1)),
                                "net_input_norm": stats((precond.c_in(sigma)[:, None] * z).norm(dim=-1))})
    fmt = lambda s: f"{s['median']:.3f} [{s['p05']:.3f}, {s['p95']:.3f}]"
    print(f"label embedding dim {report['dim']}; medians [5%, 95%]")
    for t in report["training"]:
        print(f"training block {t['block']}: sigma {fmt(t['sigma'])}  ||z|| {fmt(t['z_norm'])}  "
              f"||c_in z|| {fmt(t['net_input_norm'])}")
    for c in report["chain"]:
        print(f"chain    block {c['block']}: sigma {c['sigma']:.4g}  ||z|| {fmt(c['z_norm'])}  "
              f"||c_in z|| {fmt(c['net_input_norm'])}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
