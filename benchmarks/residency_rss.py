"""What residency=active saves a CPU user, measured as the operating system sees the process: peak resident
set size (VmHWM) and, at the end of training, its anonymous and file-backed parts (RssAnon, RssFile), beside
the tensor accounting of memory.py (what the planner's table calls device memory).

On a CPU, idle blocks live in memory-mapped files: their pages leave the process's anonymous memory but stay
in RAM as page cache (file-backed RSS) until the kernel needs the memory and writes them out. Each policy
runs in a fresh process, one after the other.

    python benchmarks/residency_rss.py --out benchmarks/results/residency_rss.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, torch
from pathlib import Path
from diffusionblocks.config import apply_overrides, load_preset
from diffusionblocks.train import Run
from diffusionblocks.memory import optimizer_tensors, tensor_bytes

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

policy, steps, out, overrides = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
cfg = apply_overrides(load_preset("vit12"), [f"dblocks.residency={policy}", *overrides])
run = Run(cfg, out)
before = status()
from diffusionblocks.run import place
place(run.model, run.device, run.method.residency, None)
run.model.train()
for _ in range(steps):
    run.step()
res = run.method.residency
offloaded = res.offloaded_storages() if res else set()
params = list(run.model.parameters())
opt = optimizer_tensors(run.method.optimizers())
resident = tensor_bytes([*params, *opt], exclude=offloaded)
held_off = tensor_bytes([t for t in [*params, *opt] if t.untyped_storage().data_ptr() in offloaded])
after = status()
res and res.close()
print(json.dumps({"policy": policy, "steps": steps, "before_training": before, "after_training": after,
                  "tensors_resident_bytes": resident, "tensors_offloaded_bytes": held_off,
                  "parameters": sum(p.numel() for p in params)}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="block steps (random block choice: every block trains)")
    ap.add_argument("--out", default="benchmarks/results/residency_rss.json")
    ap.add_argument("overrides", nargs="*", default=["model.width=512", "model.heads=8", "train.batch_size=16",
                                                     "blocks.num_blocks=3"])
    args = ap.parse_args()
    rows = []
    for policy in ("all", "active"):
        with tempfile.TemporaryDirectory(dir=".") as tmp:  # on disk, where the offload files go
            proc = subprocess.run([sys.executable, "-c", CHILD, policy, str(args.steps), tmp, *args.overrides],
                                  capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = lambda n: n / 2**20
    print(f"{'policy':8}{'tensors resident':>18}{'held off':>10}{'peak RSS':>10}{'RssAnon':>10}{'RssFile':>10}  (MiB)")
    for r in rows:
        a = r["after_training"]
        print(f"{r['policy']:8}{mib(r['tensors_resident_bytes']):>18.1f}{mib(r['tensors_offloaded_bytes']):>10.1f}"
              f"{mib(a['VmHWM']):>10.1f}{mib(a['RssAnon']):>10.1f}{mib(a['RssFile']):>10.1f}")
    all_, active = rows
    summary = {"rows": rows, "overrides": args.overrides,
               "anon_saved_bytes": all_["after_training"]["RssAnon"] - active["after_training"]["RssAnon"],
               "file_backed_added_bytes": active["after_training"]["RssFile"] - all_["after_training"]["RssFile"],
               "peak_rss_saved_bytes": all_["after_training"]["VmHWM"] - active["after_training"]["VmHWM"],
               "tensor_accounting_saved_bytes": all_["tensors_resident_bytes"] - active["tensors_resident_bytes"]}
    print(json.dumps({k: v for k, v in summary.items() if k.endswith("bytes")}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
