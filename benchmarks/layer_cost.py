"""What the noise conditioning costs one transformer layer: saved activation bytes and forward+backward
time of (a) a plain pre-norm layer, (b) a straightforward adaLN-zero layer (LayerNorm, modulate, branch,
gate: autograd keeps LN(h) and the branch output), (c) ours with the gate not recomputed
(model.gate_recompute=false), (d) ours (the default). Same weights; timings interleaved, median over repeats.

    python benchmarks/layer_cost.py --out benchmarks/results/layer_cost.json                 # vit12's layer
    python benchmarks/layer_cost.py --width 384 --heads 6 --mlp-ratio 4 --batch 64           # a wider one
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffusionblocks.memory import saved_activation_bytes  # noqa: E402
from diffusionblocks.nn import PreNormLayer, TransformerLayer  # noqa: E402


class Straightforward(torch.nn.Module):
    """The textbook adaLN-zero composition over the same modules as `layer` (reference only)."""

    def __init__(self, layer: TransformerLayer):
        super().__init__()
        self.layer = layer

    def forward(self, h, c):
        for sub in (self.layer.attn, self.layer.mlp):
            shift, scale, gate = (t[:, None] for t in sub.modulation(c).chunk(3, dim=-1))
            x = F.layer_norm(h, h.shape[-1:], eps=sub.eps) * (1 + scale) + shift
            h = h + gate * sub.branch(x)
        return h


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-ratio", type=float, default=2.0)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/layer_cost.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    D = args.width
    ours = TransformerLayer(D, args.heads, D, args.mlp_ratio)
    for p in ours.parameters():  # non-zero gates, so every path does real work
        torch.nn.init.normal_(p, std=0.02)
    no_recompute = TransformerLayer(D, args.heads, D, args.mlp_ratio, recompute_gate=False)
    no_recompute.load_state_dict(ours.state_dict())
    layers = {"prenorm": PreNormLayer(D, args.heads, args.mlp_ratio), "straightforward": Straightforward(ours),
              "ours, gate kept": no_recompute, "ours": ours}
    h = torch.randn(args.batch, args.tokens, D, requires_grad=True)
    c = torch.randn(args.batch, D, requires_grad=True)
    saved = {name: saved_activation_bytes(lambda m=m: m(h, c).sum(), list(m.parameters()))[0]
             for name, m in layers.items()}
    times = {name: [] for name in layers}
    for i in range(args.repeats + 3):
        for name, m in layers.items():
            t0 = time.perf_counter()
            m(h, c).sum().backward()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    rows = []
    print(f"layer width {D}, {args.tokens} tokens, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'layer':<18}{'saved MiB':>10}{'vs prenorm':>11}{'ms fwd+bwd':>11}{'vs prenorm':>11}")
    for name in layers:
        t = statistics.median(times[name])
        rows.append({"layer": name, "saved_bytes": saved[name], "saved_vs_prenorm": saved[name] / saved["prenorm"],
                     "seconds": t, "time_vs_prenorm": t / statistics.median(times["prenorm"])})
        print(f"{name:<18}{saved[name] / 2**20:>10.2f}{rows[-1]['saved_vs_prenorm']:>11.3f}{1000 * t:>11.1f}"
              f"{rows[-1]['time_vs_prenorm']:>11.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
