"""The `diffusionblocks` command line: one subcommand per job, each a small function over the library."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .noise import GRID_KINDS, PARTITION_KINDS, LogNormalLevels, MaskLevels, Partition


def _fmt(x: float) -> str:
    return f"{x:.4g}" if x < 1e4 else f"{x:.4e}"


def cmd_partition(args: argparse.Namespace) -> int:
    if args.levels == "sigma":
        levels = LogNormalLevels(p_mean=args.p_mean, p_std=args.p_std, sigma_min=args.sigma_min,
                                 sigma_max=args.sigma_max)
    else:
        levels = MaskLevels(schedule=args.schedule)
    gamma = args.gamma if args.gamma is not None else (0.05 if args.levels == "sigma" else 0.0)
    part = Partition.create(levels, args.num_blocks, kind=args.partition, gamma=gamma)
    grid = part.inference_grid(args.steps_per_block, kind=args.grid)
    info = part.describe()
    info["inference_grid"] = {"kind": args.grid, "steps_per_block": args.steps_per_block, "levels": grid.tolist(),
                              "blocks": part.route(grid[:-1]).tolist()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    name = levels.name
    if isinstance(levels, LogNormalLevels):
        density = f"ln sigma ~ N({levels.p_mean}, {levels.p_std}^2) truncated"
    else:
        density = f"mass uniform in alpha, {levels.schedule} schedule"
    print(f"{name} in [{_fmt(levels.lo)}, {_fmt(levels.hi)}] ({density}) cut into {part.num_blocks} blocks: "
          f"{part.kind}, overlap gamma={part.gamma}")
    print(f"{'block':>5}  {'owns ' + name:>22}  {'trains on ' + name:>22}  {'mass':>7}  {'train mass':>10}")
    for b in info["blocks"]:
        owns = f"[{_fmt(b['lo'])}, {_fmt(b['hi'])}]"
        trains = f"[{_fmt(b['train_lo'])}, {_fmt(b['train_hi'])}]"
        print(f"{b['block']:>5}  {owns:>22}  {trains:>22}  {b['mass']:>7.4f}  {b['train_mass']:>10.4f}")
    steps = " -> ".join(f"{_fmt(s)} [{blk}]" for s, blk in zip(grid.tolist(), info["inference_grid"]["blocks"]))
    print(f"inference grid ({args.grid}, {args.steps_per_block} step(s) per block; [owning block]): "
          f"{steps} -> 0")
    print("block 0 owns the highest noise and runs first at inference")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionblocks",
        description="Train networks block by block as the steps of a reverse diffusion (DiffusionBlocks).")
    parser.add_argument("--version", action="version", version=f"diffusionblocks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("partition", help="show how the noise range is cut into blocks",
                       description="Print each block's noise interval, its widened training interval, its "
                                   "probability mass and the inference grid.")
    p.add_argument("--num-blocks", type=int, required=True, help="number of blocks B")
    p.add_argument("--partition", choices=PARTITION_KINDS, default="equiprob",
                   help="equal training mass per block (paper) or equal width in ln sigma (ablation)")
    p.add_argument("--gamma", type=float, default=None,
                   help="overlap: widen each interval by this fraction in log space (default 0.05 for sigma, "
                        "0 for mask levels)")
    p.add_argument("--levels", choices=("sigma", "mask"), default="sigma",
                   help="continuous EDM noise scale, or masking time for masked diffusion")
    p.add_argument("--schedule", choices=("linear", "cosine"), default="linear", help="mask schedule alpha(t)")
    p.add_argument("--p-mean", type=float, default=-1.2, help="mean of ln sigma (EDM: -1.2)")
    p.add_argument("--p-std", type=float, default=1.2, help="std of ln sigma (EDM: 1.2)")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--steps-per-block", type=int, default=1, help="inference steps per block")
    p.add_argument("--grid", choices=GRID_KINDS, default="equiprob", help="inference grid")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_partition)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except ValueError as e:  # user errors: one clear line, no traceback
        print(f"diffusionblocks {args.command}: error: {e}", file=sys.stderr)
        code = 2
    if argv is None:
        sys.exit(code)
    return code
