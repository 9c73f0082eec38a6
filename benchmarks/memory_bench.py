"""Memory benchmark: the targets, measured on this machine.

1. Activations of one dblocks step vs what the same layers plus stem/head save in an e2e step (an e2e
   model with L/B layers), both with our adaLN-zero layers and with plain pre-norm layers; and the ratio
   full e2e / dblocks, for B in --blocks.
2. Device-resident bytes (params + grads + optimizer + activations) with residency=active vs the target
   1.2 x (e2e total / B) + the shared stem/head's own share; the ratio e2e / dblocks.
3. Planner vs measurement (params, grads, optimizer exact; activations ratio).
4. Overhead of residency=active (swapping blocks) as time per layer-update vs residency=all, for random
   and sequential block choice: rounds of --steps steps per arm, arms interleaved, median over rounds.

    python benchmarks/memory_bench.py --preset vit12 --out benchmarks/results/memory.json \
        --plot benchmarks/figures/memory-vit12.png
    python benchmarks/memory_bench.py --preset vit-s --device cuda    # on a GPU: CUDA peak allocated too
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusionblocks.config import RunConfig, apply_overrides, load_preset  # noqa: E402
from diffusionblocks.methods import METHODS  # noqa: E402
from diffusionblocks.plan import (  # noqa: E402
    Configuration,
    Spec,
    configurations,
    format_table,
    measure_all,
    measure_configuration,
    plot_memory,
)
from diffusionblocks.run import new_model, place, resolve_device  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402

MiB = 2**20


def activation_ratios(cfg: RunConfig, shapes, blocks) -> list[dict]:
    full = measure_configuration(Configuration("e2e").apply(cfg), shapes).activations
    rows = []
    for B in blocks:
        db = measure_configuration(Configuration("dblocks", B).apply(cfg), shapes).activations
        same = {}
        for layer in ("adaln", "prenorm") if cfg.task == "classify" else ("adaln",):  # pre-norm: the ViT only
            c = Configuration("e2e").apply(cfg)
            c.model.depth, c.model.layer = cfg.model.depth // B, layer
            same[layer] = measure_configuration(c, shapes).activations
        row = {"B": B, "dblocks_activations": db, "e2e_full": full, "e2e_over_dblocks": full / db}
        for layer, n in same.items():
            row[f"e2e_same_layers_{layer}"], row[f"ratio_vs_same_{layer}"] = n, db / n
        rows.append(row)
        kinds = {"adaln": "adaLN", "prenorm": "pre-norm"}
        print(f"B={B}: dblocks step {db / MiB:.1f} MiB; same {cfg.model.depth // B} layers e2e "
              + " / ".join(f"{n / MiB:.1f} ({kinds[k]})" for k, n in same.items()) + " -> ratio "
              + " / ".join(f"{db / n:.3f}" for n in same.values()) + f"; full e2e / dblocks = {full / db:.2f}",
              flush=True)
    return rows


def residency_targets(result: dict, spec: Spec) -> list[dict]:
    rows = {r["name"]: r for r in result["rows"]}
    e2e = rows["e2e"]["measured"]
    out = []
    for B in sorted({r["num_blocks"] for r in result["rows"] if r["method"] == "dblocks"}):
        act = rows[f"dblocks B={B} active"]["measured"]
        cfg = Configuration("dblocks", B).apply(spec.cfg)
        with torch.device("meta"):
            model = new_model(cfg, spec.shapes)
        shared = sum(p.numel() for p in model.shared_parameters()) * 4 * 4  # params, grads, two moments
        target = 1.2 * e2e["total"] / B + shared
        out.append({"B": B, "dblocks_active_total": act["total"], "e2e_total": e2e["total"], "target": target,
                    "met": act["total"] <= target, "e2e_over_dblocks_total": e2e["total"] / act["total"],
                    "e2e_over_dblocks_peak": e2e["peak"] / act["peak"],
                    "e2e_over_dblocks_all_total": e2e["total"] / rows[f"dblocks B={B} all"]["measured"]["total"]})
        print(f"B={B}: active total {act['total'] / MiB:.1f} MiB vs target {target / MiB:.1f} "
              f"({'met' if act['total'] <= target else 'MISSED'}); "
              f"e2e/dblocks total {e2e['total'] / act['total']:.2f}, "
              f"peak {e2e['peak'] / act['peak']:.2f}", flush=True)
    return out


def swap_overhead(cfg: RunConfig, shapes, B: int, steps: int, rounds: int, device) -> dict:
    """Seconds per layer-update for residency all/active x block choice random/sequential."""
    arms = {}
    tmp = tempfile.mkdtemp(prefix="membench-", dir=".")
    for residency in ("all", "active"):
        for choice in ("random", "sequential"):
            c = Configuration("dblocks", B, residency).apply(cfg)
            c.dblocks.block_choice = choice
            torch.manual_seed(0)
            model = new_model(c, shapes)
            # the run is steps * rounds long: sequential visits every block once in it
            method = METHODS["dblocks"](model, c, steps * rounds, device=device, offload_dir=tmp)
            place(model, device, method.residency, None)
            arms[(residency, choice)] = method
    batch = tuple(t.to(device) for t in get_task(cfg.task).random_batch(cfg, shapes, torch.Generator().manual_seed(0)))
    times = {k: [] for k in arms}
    for r in range(rounds):
        for key, method in arms.items():
            layers = 0
            t0 = time.perf_counter()
            for _ in range(steps):
                layers += method.step(batch)["layers"]
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:  # round 0 is warm-up
                times[key].append((time.perf_counter() - t0) / layers)
    for method in arms.values():
        method.residency.close()
    Path(tmp).rmdir()
    med = {f"{res}/{choice}": statistics.median(v) for (res, choice), v in times.items()}
    out = {"B": B, "steps_per_round": steps, "rounds": rounds - 1, "seconds_per_layer_update": med,
           "active_over_all_random": med["active/random"] / med["all/random"],
           "active_over_all_sequential": med["active/sequential"] / med["all/sequential"],
           "swaps": {f"{res}/{choice}": m.residency.swaps for (res, choice), m in arms.items()},
           "seconds_per_swap": {}, "seconds_per_step": {k: v * cfg.model.depth / B for k, v in med.items()}}
    for choice in ("random", "sequential"):
        res = arms[("active", choice)].residency
        out["seconds_per_swap"][f"active/{choice}"] = res.swap_seconds / max(1, res.swaps)
    print(f"swap overhead B={B}: active/all = {out['active_over_all_random']:.3f} (random choice), "
          f"{out['active_over_all_sequential']:.3f} (sequential); swaps {out['swaps']}; seconds per swap "
          f"{out['seconds_per_swap']}, per step {out['seconds_per_step']}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vit12")
    ap.add_argument("--blocks", default="2,3,4,6")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overhead-blocks", type=int, default=3)
    ap.add_argument("--overhead-steps", type=int, default=12)
    ap.add_argument("--overhead-rounds", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = apply_overrides(load_preset(args.preset), args.overrides)
    cfg.train.device = args.device
    device = resolve_device(args.device)
    shapes = get_task(cfg.task).plan_shapes(cfg)
    blocks = tuple(int(b) for b in args.blocks.split(","))
    spec = Spec(cfg, shapes, device=device.type)
    report = {"preset": args.preset, "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": cfg.model.__dict__, "batch_size": cfg.train.batch_size}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    print("== 1. activations: dblocks step vs the same layers end to end", flush=True)
    report["activations"] = activation_ratios(cfg, shapes, blocks)
    print("== 2./3. measured table vs planner", flush=True)
    result = measure_all(spec, configurations(cfg.model.depth, blocks), progress=False,
                         offload_dir=Path(args.out).parent)

    print(format_table(result), flush=True)
    report["table"] = result
    report["planner"] = [{"name": r["name"], "exact": (r["params"], r["grads"], r["optimizer"]) ==
                          (r["measured"]["params"], r["measured"]["grads"], r["measured"]["optimizer"]),
                          "activations_pred_over_meas": r["activations"] / r["measured"]["activations"]}
                         for r in result["rows"]]
    ratios = [p["activations_pred_over_meas"] for p in report["planner"]]
    print(f"planner exact on params/grads/optimizer for every row: {all(p['exact'] for p in report['planner'])}; "
          f"activations predicted/measured in [{min(ratios):.3f}, {max(ratios):.3f}]", flush=True)
    print("== 2. residency=active vs the target", flush=True)
    report["residency"] = residency_targets(result, spec)
    print("== 4. swap overhead", flush=True)
    report["overhead"] = swap_overhead(cfg, shapes, args.overhead_blocks, args.overhead_steps,
                                       args.overhead_rounds + 1, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.plot:
        plot_memory(result, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
