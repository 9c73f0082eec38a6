"""Block-parallel training: B blocks on B processes vs the same blocks in one process, one thread per process,
interleaved repeats; checks that both give the same weights and measures the bytes the ranks hand to
torch.distributed collectives, between blocks and within a block.

    python benchmarks/parallel_bench.py --repeats 3 --out benchmarks/results/parallel.json

Run by torchrun as `parallel_bench.py --metered DIR train ARGS`, this file is a worker: `diffusionblocks train
ARGS` under a CollectiveMeter, writing this rank's counts to DIR/rank<r>.json (tests/test_jobs.py uses it too).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from diffusionblocks import cli, io  # noqa: E402


class CollectiveMeter:
    """Counts, per process group, the bytes this rank hands to torch.distributed collectives while inside
    the context: tensors (all_reduce, all_gather, broadcast, ...) and pickled objects (all_gather_object,
    ...). It wraps the functions of torch.distributed, so every caller is counted, not only the package."""

    # the position of the parameter holding what this rank sends (a tensor, or a list of them)
    TENSOR_OPS = {"all_reduce": 0, "broadcast": 0, "reduce": 0, "send": 0, "isend": 0, "gather": 0,
                  "all_gather": 1, "all_gather_into_tensor": 1, "reduce_scatter": 1, "reduce_scatter_tensor": 1,
                  "all_to_all": 1, "all_to_all_single": 1, "scatter": 1}
    OBJECT_OPS = {"all_gather_object": 1, "gather_object": 0, "broadcast_object_list": 0, "scatter_object_list": 1}

    def __init__(self):
        self.groups: dict[tuple[int, ...], dict[str, int]] = {}
        self._saved: dict[str, object] = {}

    def _count(self, group, kind: str, nbytes: int):
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
        entry = self.groups.setdefault(ranks, {"tensor_bytes": 0, "object_bytes": 0, "calls": 0})
        entry[kind] += nbytes
        entry["calls"] += 1

    def _wrap(self, name: str, fn):
        signature = inspect.signature(fn)
        what = list(signature.parameters)[self.TENSOR_OPS.get(name, self.OBJECT_OPS.get(name))]

        def counted(*args, **kwargs):
            given = signature.bind_partial(*args, **kwargs).arguments  # by position or by keyword alike
            sent, group = given.get(what), given.get("group")
            if name in self.OBJECT_OPS:
                self._count(group, "object_bytes", len(pickle.dumps(sent)))
            else:
                tensors = [sent] if torch.is_tensor(sent) else [t for t in sent or () if torch.is_tensor(t)]
                self._count(group, "tensor_bytes", sum(t.numel() * t.element_size() for t in tensors))
            return fn(*args, **kwargs)
        return counted

    def __enter__(self):
        for name in [*self.TENSOR_OPS, *self.OBJECT_OPS]:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        return False

    def report(self) -> list[dict]:
        return [{"ranks": list(ranks), **counts} for ranks, counts in sorted(self.groups.items())]


def metered(counts: Path, argv: list[str]) -> int:
    """`diffusionblocks <argv>` on this torchrun rank with its collectives counted into counts/rank<r>.json."""
    with CollectiveMeter() as meter:
        code = cli.main(argv)
    counts.mkdir(parents=True, exist_ok=True)
    io.save_json(counts / f"rank{os.environ['RANK']}.json", meter.report())
    return code


def read_counts(counts: Path) -> dict[int, list[dict]]:
    """{rank: what it handed to collectives, per process group} as the metered workers wrote it."""
    return {int(p.stem.removeprefix("rank")): io.load_json(p) for p in counts.glob("rank*.json")}


def collective_bytes(per_rank: dict[int, list[dict]], results: dict) -> dict:
    """Tensor bytes over process groups holding two or more blocks (between blocks) and one block (within), and
    the pickled-object bytes between blocks; `results` is the run's results.json (which rank holds which blocks)."""
    block_of = {r["rank"]: set(r["blocks"]) for r in results["ranks"]}
    spans = lambda ranks: len(set().union(*(block_of[r] for r in ranks))) > 1
    groups = [g for report in per_rank.values() for g in report]
    return {"gradient_bytes_between_blocks": sum(g["tensor_bytes"] for g in groups if spans(g["ranks"])),
            "gradient_bytes_within_blocks": sum(g["tensor_bytes"] for g in groups if not spans(g["ranks"])),
            "object_bytes_between_blocks": sum(g["object_bytes"] for g in groups if spans(g["ranks"]))}


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
              "blocks.shared_stem_head=false", "dblocks.block_choice=sequential", f"train.steps={args.steps}",
              "train.threads=1", "train.eval_limit=1000"]
    tmp = Path(tempfile.mkdtemp(prefix="parallel-bench-", dir="."))
    times: dict[str, list[float]] = {"one process": [], f"{args.blocks} processes": []}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.blocks),
                str(Path(__file__).resolve()), "--metered"]  # each rank counts its collectives into a folder
    for r in range(args.repeats):
        seq, par = tmp / f"seq{r}", tmp / f"par{r}"
        times["one process"].append(run([sys.executable, "-m", "diffusionblocks", "train", *common,
                                         "--out", str(seq)]))
        times[f"{args.blocks} processes"].append(run([*torchrun, str(tmp / f"counts{r}"), "train", *common,
                                                      "--parallel", "blocks", "--out", str(par)]))
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
              **collective_bytes(read_counts(tmp / "counts0"), par_results),
              "process_groups": par_results["process_groups"]}
    print(json.dumps({k: report[k] for k in ("median_wall_seconds", "speedup", "train_seconds", "weights_identical",
                                              "test_accuracy", "gradient_bytes_between_blocks",
                                              "object_bytes_between_blocks")}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for p in sorted(tmp.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    tmp.rmdir()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--metered"]:  # a torchrun worker of the parallel arm
        sys.exit(metered(Path(sys.argv[2]), sys.argv[3:]))
    main()
