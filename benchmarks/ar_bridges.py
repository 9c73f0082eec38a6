"""Free generation of a trained autoregressive DiffusionBlocks run under each bridge and start of the Euler chain:
distinct-n and a generative perplexity scored by an end-to-end run, the same seed and sample count
for every arm; also the samples' most frequent tokens (the chain's bias under the soft bridge).

    python benchmarks/ar_bridges.py runs/compare-ar-cpu/dblocks-seed0 runs/compare-ar-cpu/e2e-seed0
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusionblocks.run import load_model  # noqa: E402
from diffusionblocks.tasks.arlm import distinct_n  # noqa: E402

ARMS = {"soft, zero start (default)": {}, "unit": {"bridge": "unit"}, "hard": {"bridge": "hard"},
        "soft, noise start": {"init": "noise"}, "unit, noise start": {"bridge": "unit", "init": "noise"},
        "soft, 2 steps per block": {"steps_per_block": 2}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a DiffusionBlocks arlm run")
    ap.add_argument("scorer", help="an end-to-end arlm run (the generative perplexity's scorer)")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cfg, model, data = load_model(args.run)
    _, scorer, _ = load_model(args.scorer)
    out = {}
    for name, options in ARMS.items():
        tokens = model.sample(args.num, cfg.data.seq_len, generator=torch.Generator().manual_seed(1000), **options)
        with torch.no_grad():
            ppl = math.exp(scorer.token_nats(tokens).mean().item())
        common = collections.Counter(tokens.flatten().tolist()).most_common(4)
        text = data.tokenizer.decode(tokens[0].numpy())
        out[name] = {"options": options, "distinct": distinct_n(tokens), "perplexity_by_e2e": ppl,
                     "most_common": [(data.tokenizer.decode([t]), n / tokens.numel()) for t, n in common],
                     "sample": text}
        print(f"{name}: distinct-1..4 {'/'.join(f'{d:.2f}' for d in out[name]['distinct'])}, perplexity by e2e "
              f"{ppl:.2f}, most common {out[name]['most_common']}\n  {text[:100]!r}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
