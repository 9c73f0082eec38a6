"""A digest of the weights that tiny runs of every task train, and of a per-block job merge: run it before and after a
change that must not change behaviour, and compare the two JSON files (equal digests: bit-identical weights).

    python benchmarks/weights_digest.py --out before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks import io  # noqa: E402
from diffusionblocks.config import apply_overrides, load_preset  # noqa: E402
from diffusionblocks.train import train  # noqa: E402

RUNS = {  # name: (preset, overrides)
    "classify-e2e": ("tiny", ["train.method=e2e", "train.steps=20"]),
    "classify-dblocks": ("tiny", ["train.method=dblocks", "train.steps=20"]),
    "imagegen-dblocks": ("gen-tiny", ["train.method=dblocks", "train.steps=10"]),
    "mdlm-dblocks": ("lm-tiny", ["train.method=dblocks", "train.steps=10"]),
    "arlm-dblocks": ("lm-tiny", ["task=arlm", "train.method=dblocks", "train.steps=10"]),
    "recurrent-dblocks": ("recurrent-quick", ["train.method=dblocks", "train.steps=4", "model.width=32",
                                              "data.seq_len=16"]),
    "recurrent-e2e": ("recurrent-quick", ["train.method=e2e", "train.steps=4", "model.width=32", "data.seq_len=16"]),
}
JOB = ["train.method=dblocks", "train.steps=20", "blocks.shared_stem_head=false", "dblocks.block_choice=round-robin"]


def digest(path: Path) -> str:
    weights, _ = io.load_safetensors(path)
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config(preset, overrides):
    cfg = load_preset(preset)
    task = [o for o in overrides if o.startswith("task=")]
    if task:
        cfg.task = task[0].split("=", 1)[1]
    return apply_overrides(cfg, [o for o in overrides if not o.startswith("task=")])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    root, digests = Path(tempfile.mkdtemp(prefix="digest-")), {}
    for name, (preset, overrides) in RUNS.items():
        train(config(preset, overrides), root / name, progress=False)
        digests[name] = digest(root / name / "model.safetensors")
        print(f"{name}: {digests[name][:16]}", flush=True)
    from diffusionblocks.jobs import merge

    jobs = [root / f"job{b}" for b in (0, 1)]
    for b, job in enumerate(jobs):
        train(config("tiny", [*JOB, f"train.blocks={b}"]), job, progress=False)
    merge(jobs, root / "merged")
    whole = root / "whole"
    train(config("tiny", JOB), whole, progress=False)
    digests["classify-jobs-merged"] = digest(root / "merged" / "model.safetensors")
    digests["classify-jobs-whole"] = digest(whole / "model.safetensors")
    print(f"merged jobs: {digests['classify-jobs-merged'][:16]}, one run: {digests['classify-jobs-whole'][:16]}")
    Path(args.out).write_text(json.dumps(digests, indent=2) + "\n")


if __name__ == "__main__":
    main()
