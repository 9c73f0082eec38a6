"""How far the Euler chain's states are from what the denoiser was trained on, for an autoregressive or recurrent-depth
DiffusionBlocks run (tasks/arlm_models.py NextTokenChain), on the run's validation windows.

Training feeds a block, at level sigma, z = e_hat(x) + sigma eps (e_hat the unit rows of the token table: per-coordinate
std 1/sqrt(D), while EDM's preconditioning assumes sigma_data = 0.5). At every step of the chain (zero start and
sigma_max noise start) this measures, over the scored tokens, the chain's state z against a training draw at the same
sigma on the same windows: the per-coordinate RMS of z, of its noise part z - e_hat(x) (sigma in training) and of the
network's input c_in(sigma) z, and the cosine of z with the true embedding. It also prints the run's validation
figures for both starts: the accuracy of the chains' averaged prediction against one chain's own argmax, and each
block's figure; for a recurrent-depth run also with the earlier positions' states the chains' own estimates (how
inference ran before the known tokens' states were drawn as in training; rebuilt here by patching step_logits).

    python benchmarks/chain_inputs.py RUN_DIR [--limit 128] [--out /tmp/chain_inputs.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks.run import load_model  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402
from diffusionblocks.tasks.arlm import along_chain  # noqa: E402


def moments(z: torch.Tensor, target: torch.Tensor, w: torch.Tensor, c_in: float) -> dict:
    """Per-coordinate RMS of z, z - target and c_in z, and the mean cosine of z with target, over the tokens w marks."""
    D, n = z.shape[-1], w.sum()
    rms = lambda v: math.sqrt(((v.double() ** 2).sum(-1) * w).sum().item() / (n.item() * D))
    cos = torch.nn.functional.cosine_similarity(z.double(), target.double(), dim=-1, eps=1e-12)
    return {"rms_z": rms(z), "rms_noise": rms(z - target), "rms_input": c_in * rms(z),
            "cos_target": ((cos * w).sum() / n).item()}


@torch.no_grad()
def measure(model, batches, init: str, seed: int = 0) -> list[dict]:
    """Per step of one chain from `init`: the chain's state and a training draw at the same sigma, their moments."""
    seen, real = [], model.step_logits
    model.step_logits = lambda block, z, sigma, context: (seen.append((block, sigma, z.clone())),
                                                          real(block, z, sigma, context))[1]
    gen = torch.Generator().manual_seed(seed)
    rows: dict[int, dict] = {}
    try:
        for x, pad in batches:
            seen.clear()
            model.chain(x, gen, init=init)
            target, w = model.labels(x), (~pad).double()
            for k, (block, sigma, z) in enumerate(seen):
                c_in = model.precond.c_in(sigma) if hasattr(model, "precond") else model.stack.precond.c_in(sigma)
                train = target + sigma * torch.randn(target.shape, generator=gen)  # block_loss's law at sigma
                row = rows.setdefault(k, {"step": k, "block": block, "sigma": sigma, "chain": [], "training": [],
                                          "tokens": []})
                row["chain"].append(moments(z, target, w, c_in))
                row["training"].append(moments(train, target, w, c_in))
                row["tokens"].append(w.sum().item())
    finally:
        model.step_logits = real
    out = []
    for row in rows.values():  # token-weighted means over batches (RMS: of the squares)
        t = torch.tensor(row.pop("tokens"), dtype=torch.float64)
        for side in ("chain", "training"):
            parts = row[side]
            row[side] = {key: (math.sqrt(sum(p[key] ** 2 * n for p, n in zip(parts, t.tolist())) / t.sum().item())
                               if key.startswith("rms") else sum(p[key] * n for p, n in zip(parts, t.tolist()))
                               / t.sum().item()) for key in parts[0]}
        out.append(row)
    return out


@contextlib.contextmanager
def chain_estimates_at_earlier_positions(model):
    """A recurrent-depth model whose every position reads the chain's states (the old inference): training's forward
    pass on the chain's states alone, one deterministic chain from a zero start."""
    step_logits, draws = model.step_logits, model.draws
    model.step_logits = lambda block, z, sigma, context: model.read(
        model.denoise(z, torch.full((z.shape[0],), float(sigma)), context), context[1])
    model.draws = lambda init=None, draws=None: 1 if (init or model.chain_cfg.init) == "zero" else (
        draws or model.eval_draws)
    try:
        yield model
    finally:
        model.step_logits, model.draws = step_logits, draws


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="an arlm or recurrent DiffusionBlocks run trained with data.val_size > 0")
    ap.add_argument("--limit", type=int, default=128, help="validation windows (default 128)")
    ap.add_argument("--out", default="", help="write the report as JSON here")
    args = ap.parse_args()
    cfg, model, data = load_model(args.run)
    model.eval()
    if not cfg.data.val_size:
        raise SystemExit(f"{args.run}: trained without data.val_size; this measures on validation windows only")
    task = get_task(cfg.task)
    D = model.labels.table.shape[1]
    report = {"run": args.run, "task": cfg.task, "dim": D, "target_coordinate_std": 1 / math.sqrt(D),
              "sigma_data": 0.5, "limit": args.limit, "steps": {}}
    for init in ("zero", "noise"):
        batches, *_ = task.eval_batches(data, cfg, "validation", args.limit)
        report["steps"][init] = measure(model, list(batches), init)
    evaluate = lambda **options: task.evaluate(model, data, cfg, split="validation", limit=args.limit, **options)
    report["evaluation"] = {"noise start": evaluate(init="noise"), "zero start": evaluate(init="zero")}
    if cfg.task == "recurrent":
        with chain_estimates_at_earlier_positions(model):
            report["evaluation"].update({"noise start, earlier positions' chain states (old)": evaluate(init="noise"),
                                         "zero start, earlier positions' chain states (old)": evaluate(init="zero")})
    print(f"{args.run}: D = {D}, a unit row's per-coordinate std 1/sqrt(D) = {1 / math.sqrt(D):.4f} (sigma_data "
          f"0.5); {args.limit} validation windows; chain vs training at each step's sigma")
    for init, rows in report["steps"].items():
        print(f"start {init}:  step block sigma | RMS z chain/train | RMS z - e_hat chain/train | RMS c_in z "
              "chain/train | cos(z, e_hat) chain/train")
        for r in rows:
            c, t = r["chain"], r["training"]
            print(f"  {r['step']} {r['block']} {r['sigma']:.4g} | {c['rms_z']:.4f} / {t['rms_z']:.4f} | "
                  f"{c['rms_noise']:.4f} / {t['rms_noise']:.4f} | {c['rms_input']:.4f} / {t['rms_input']:.4f} | "
                  f"{c['cos_target']:.3f} / {t['cos_target']:.3f}")
    for name, e in report["evaluation"].items():
        print(f"validation, {name}, M = {e['eval_draws']}: accuracy of the averaged prediction "
              f"{100 * e['next_token_accuracy']:.2f}%{along_chain(e, 'accuracy', 100, '.2f', '%')}, one chain's own "
              f"argmax {100 * e['single_chain_accuracy']:.2f}%; chain CE {e['chain_ce']:.3f}"
              f"{along_chain(e, 'chain_ce', 1, '.3f')}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
