"""FLOPs per training step of a recurrent-depth preset, Huginn's training against DiffusionBlocks' single pass,
without training or a GPU: the models are built at the preset's sizes and one step of each is counted by torch's
FlopCounterMode (measure.step_flops: matrix products and attention, forward and backward) at batch 1, then
scaled to the preset's batch (every count is linear in the batch: checked at batch 2). Huginn's step is averaged
over its distribution of r. Prints ratio (a), per step, and (b), the paper's protocol (DiffusionBlocks trains
recurrent.dblocks_epochs times the steps), beside the paper's arithmetic (5 epochs x ~32 recurrences against 15 x 1:
10.7x); (c) needs trained runs (`compare --task recurrent`). Writes JSON.

    python benchmarks/recurrent_compute.py --preset recurrent-lm1b --out runs/recurrent-compute-lm1b.json
    python benchmarks/recurrent_compute.py --preset recurrent-cpu --out runs/recurrent-compute-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks.config import apply_overrides, load_preset  # noqa: E402
from diffusionblocks.measure import step_flops  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402
from diffusionblocks.tasks.recurrent import HuginnLM, RecurrentDiffusionLM, expected_huginn_flops  # noqa: E402


def flops(cfg, vocab: int, batch: int) -> dict:
    torch.manual_seed(0)
    huginn = HuginnLM(cfg.model, cfg.recurrent, cfg.arlm, vocab, cfg.data.seq_len)
    blocks = RecurrentDiffusionLM(cfg.model, cfg.blocks, cfg.chain, cfg.recurrent, cfg.arlm, vocab, cfg.data.seq_len)
    x = torch.randint(vocab, (batch, cfg.data.seq_len))
    seed = torch.zeros(batch, dtype=torch.long)
    h = expected_huginn_flops(
        lambda r: step_flops(lambda: huginn.loss(x, torch.full((batch,), r), seed).mean().backward()), cfg.recurrent)
    return {"e2e": h, "dblocks": step_flops(lambda: blocks.block_loss(0, x).mean().backward())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="recurrent-lm1b")
    ap.add_argument("--out", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = apply_overrides(load_preset(args.preset), args.overrides)
    task = get_task(cfg.task)
    task.check(cfg)
    vocab = task.plan_shapes(cfg).vocab_size
    one, two = flops(cfg, vocab, 1), flops(cfg, vocab, 2)
    if two["dblocks"] != 2 * one["dblocks"] or any(two["e2e"]["counted"][r] != 2 * c
                                                   for r, c in one["e2e"]["counted"].items()):
        raise SystemExit("FLOPs are not linear in the batch: count at the preset's batch instead")
    N, rec = cfg.train.batch_size, cfg.recurrent
    per_step = {"e2e": N * one["e2e"]["mean"], "dblocks": N * one["dblocks"]}
    a = per_step["e2e"] / per_step["dblocks"]
    report = {"preset": args.preset, "overrides": args.overrides, "batch": N, "seq_len": cfg.data.seq_len,
              "vocab": vocab, "layers": {"prelude": rec.prelude, "core": rec.core, "coda": rec.coda},
              "mean_recurrence": rec.mean_recurrence, "backprop_depth": rec.backprop_depth,
              "mean_r_drawn": one["e2e"]["mean_recurrences"], "flops_per_step": per_step,
              "huginn_flops_per_step_by_r": {r: N * f for r, f in one["e2e"]["counted"].items()},
              "ratio_a_per_step": a, "ratio_b_protocol": a / rec.dblocks_epochs,
              "dblocks_epochs": rec.dblocks_epochs, "paper_arithmetic": 5 * 32 / 15,
              "counted_by": "torch.utils.flop_counter.FlopCounterMode (matrix products and attention, forward and "
                            "backward; elementwise work not counted), at batch 1, times the batch"}
    print(f"{args.preset}: batch {N} x {cfg.data.seq_len} tokens, vocabulary {vocab}, prelude/core/coda "
          f"{rec.prelude}/{rec.core}/{rec.coda}, r_bar {rec.mean_recurrence} (mean r drawn "
          f"{one['e2e']['mean_recurrences']:.2f}), k {rec.backprop_depth}")
    print(f"FLOPs per training step: end-to-end (Huginn) {per_step['e2e'] / 1e12:.3f} TFLOP, DiffusionBlocks "
          f"{per_step['dblocks'] / 1e12:.3f} TFLOP")
    print(f"(a) per step {a:.2f}x; (b) the paper's protocol ({rec.dblocks_epochs:g}x the steps) "
          f"{report['ratio_b_protocol']:.2f}x; the paper's arithmetic 5 x 32 / 15 = {report['paper_arithmetic']:.1f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
