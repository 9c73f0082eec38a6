"""Block-parallel training (issue 5): B blocks on B processes vs the same blocks in one process, one
thread per process, interleaved repeats; checks that both give the same weights and reports the gradient
bytes that crossed between blocks.

    python benchmarks/parallel_bench.py --repeats 3 --out benchmarks/results/parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusionblocks import io  # noqa: E402


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion")
    ap.add_argument("--blocks", type=int, default=2, help="B, and the number of processes")
    ap.add_argument("--steps", type=int, default=150, help="train.steps (each block trains this many steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/parallel.json")
    args = ap.parse_args()
    common = ["--preset", args.preset, "--method", "dblocks", "--num-blocks", str(args.blocks), "--no-progress",
              "dblocks.shared_stem_head=false", "dblocks.block_choice=sequential", f"train.steps={args.steps}",
              "train.threads=1", "train.eval_limit=1000"]
    tmp = Path(tempfile.mkdtemp(prefix="parallel-bench-", dir="."))
    times: dict[str, list[float]] = {"one process": [], f"{args.blocks} processes": []}
    for r in range(args.repeats):
        seq, par = tmp / f"seq{r}", tmp / f"par{r}"
        times["one process"].append(run([sys.executable, "-m", "diffusionblocks", "train", *common,
                                         "--out", str(seq)]))
        times[f"{args.blocks} processes"].append(run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node", str(args.blocks), "-m", "diffusionblocks",
                                                      "train", *common, "--parallel", "blocks", "--out", str(par)]))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    a, _ = io.load_safetensors(tmp / "seq0" / "model.safetensors")
    b, _ = io.load_safetensors(tmp / "par0" / "model.safetensors")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seq_results, par_results = io.load_json(tmp / "seq0" / "results.json"), io.load_json(tmp / "par0" / "results.json")
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"args": vars(args), "cpu_count": os.cpu_count(), "wall_seconds": times, "median_wall_seconds": med,
              "speedup": med["one process"] / med[f"{args.blocks} processes"],
              "train_seconds": {"one process": seq_results["train_seconds"],
                                "slowest rank": par_results["train_seconds"]},
              "weights_identical": identical,
              "test_accuracy": {"one process": seq_results["test_accuracy"],
                                "parallel": par_results["test_accuracy"]},
              "gradient_bytes_between_blocks": par_results["gradient_bytes_between_blocks"],
              "process_groups": par_results["process_groups"],
              "object_bytes_between_blocks": par_results["object_bytes_between_blocks"]}
    print(json.dumps({k: report[k] for k in ("median_wall_seconds", "speedup", "train_seconds", "weights_identical",
                                              "test_accuracy", "gradient_bytes_between_blocks")}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for p in sorted(tmp.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    tmp.rmdir()


if __name__ == "__main__":
    main()
