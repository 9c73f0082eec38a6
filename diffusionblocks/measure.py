"""Compute measurement, one way everywhere (the tasks' compare reports, benchmarks, tests), beside memory.py's memory
measurement: wall time of calls interleaved (a shared, noisy machine slows them alike), the FLOPs of a training step
as torch's FlopCounterMode counts them and their expectation over a recurrent model's random depth, and the ratios
of two arms' training compute, per step, as trained, and to reach a held-out figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# -- wall time ----------------------------------------------------------------------------------------------------


def interleaved_times(calls: dict[str, Callable[[int], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call in each of `repeats` rounds, the calls interleaved within a round; a round 0 before them
    warms up and is not timed. Each call gets its round's index (e.g. for a seed)."""
    times = {k: [] for k in calls}
    for i in range(repeats + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(i)
            if torch.cuda.is_available():  # a GPU's kernels run after the call returns
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def interleaved_seconds(calls: dict[str, Callable[[int], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call (no gradients) over `repeats` interleaved rounds (interleaved_times)."""
    return {k: statistics.median(v) for k, v in interleaved_times(calls, repeats).items()}


def training_step(model: nn.Module, loss: Callable[[int], torch.Tensor]) -> Callable[[int], None]:
    """A call for interleaved_times: one training step of `model`, loss(i).backward() and an AdamW update (lr 1e-6,
    so the timed model barely moves), gradients freed."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(i: int) -> None:
        loss(i).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# -- FLOPs --------------------------------------------------------------------------------------------------------


def _cpu_attention_flops() -> dict:
    """FLOP formulas for the CPU's fused attention, which torch's counter leaves out (it registers the CUDA kernels
    only): the same counts as for those (two products forward; backward five, the scores recomputed)."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v)}


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs of `step()` (a forward and backward pass) as torch's FlopCounterMode counts them: matrix products and
    attention (2 per multiply-add; attention over the full T x T scores whatever the mask), forward and backward;
    elementwise work, norms and softmaxes are not counted."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        step()
    return counter.get_total_flops()


def expected_flops(flops_at: Callable[[int], int], recurrences: torch.Tensor, backprop_depth: int) -> dict:
    """E[FLOPs per step] of a recurrent model whose step runs r recurrences, the last k = backprop_depth with
    gradients, over `recurrences` (draws of r). flops_at(r) is counted for r = 1..k+2; past r = k every further
    recurrence adds one no-grad pass, the same FLOPs each time (checked: F(k+2) - F(k+1) = F(k+1) - F(k)), so
    F(r) = F(k+2) + (r - k - 2) * that pass for larger r."""
    k, r = backprop_depth, recurrences
    counted = {n: flops_at(n) for n in range(1, k + 3)}
    per_pass = counted[k + 2] - counted[k + 1]
    if counted[k + 1] - counted[k] != per_pass:
        raise RuntimeError(f"FLOPs per step are not affine in r past k: {counted}")
    table = [counted.get(n, counted[k + 2] + (n - k - 2) * per_pass) for n in range(int(r.max()) + 1)]
    values = torch.tensor(table, dtype=torch.float64)[r]
    return {"mean": values.mean().item(), "mean_recurrences": r.double().mean().item(),
            "per_recurrence_no_grad": per_pass, "counted": {str(n): f for n, f in counted.items()}}


# -- two arms' training compute ------------------------------------------------------------------------------------


def compute_ratios(flops: dict[str, float], seconds: dict[str, float], runs: dict[str, list[dict]], a: str, b: str,
                   targets: tuple[tuple[str, str, str, bool], ...]) -> dict:
    """Arm a's training compute over arm b's (above 1: b used less), from each arm's FLOPs and seconds per step and
    its runs: (a) per step; (b) over the steps each trained; (c) to reach a's final held-out figure, per seed and
    target (label, a's curve key, b's curve key, higher is better): b's compute to the first point of its evaluation
    curve from which it stays at or past the target (a noisy curve may cross early and fall back), an upper bound
    at the curve's resolution."""
    out = {"per_step": {"flops": flops[a] / flops[b], "seconds": seconds[a] / seconds[b]}}
    steps = {role: statistics.mean(r["steps"] for r in runs[role]) for role in (a, b)}
    out["protocol"] = {"steps": steps, "flops": flops[a] * steps[a] / (flops[b] * steps[b]),
                       "seconds": seconds[a] * steps[a] / (seconds[b] * steps[b])}
    reach = {}
    for label, key_a, key_b, higher in targets:
        per_seed = []
        for ra, rb in zip(runs[a], runs[b]):
            target = ra["curve"][-1][key_a]
            past = [p[key_b] >= target if higher else p[key_b] <= target for p in rb["curve"]]
            hit = next((p for i, p in enumerate(rb["curve"]) if all(past[i:])), None)
            row = {"seed": ra["seed"], "target": target, f"{b}_final": rb["curve"][-1][key_b],
                   "reached_at_step": hit["step"] if hit else None}
            if hit:
                row["flops"] = flops[a] * ra["steps"] / (flops[b] * hit["step"])
                row["seconds"] = seconds[a] * ra["steps"] / (seconds[b] * hit["step"])
            per_seed.append(row)
        reach[label] = per_seed
    out["reach"] = reach
    return out
