"""The `diffusionblocks` command line: one subcommand per job, each a small function over the library.

The choices of --task and --method, and the options of eval and sample (each task declares its own), come
from the registries (tasks/, methods/, and the plug-ins of `--plugin`, installed packages and
$DIFFUSIONBLOCKS_PLUGINS, loaded before the parser is built): a new task or method shows up here without editing
this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import io, registry
from .compare import compare
from .config import PRESETS, RunConfig, apply_overrides, load_preset, parse_ints
from .config import validate as config_values
from .jobs import merge
from .methods import METHODS
from .noise import GRID_KINDS, PARTITION_KINDS, LogNormalLevels, MaskLevels, Partition
from .parallel import train_parallel
from .plan import Spec, configurations, format_table, measure_all, parse_bytes, plan, plot_memory
from .run import (
    CONFIG,
    LOCK,
    RUN_FILES,
    inference_device,
    load_model,
    make_out,
    read_config,
    resolve_device,
    validate,
)
from .tasks import SPLITS, TASKS, Option, at_least, get_task
from .train import reference_model, train
from .version import __version__


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


def _run_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_preset(args.preset)
    for value, key in ((getattr(args, "task", None), "task"), (getattr(args, "method", None), "train.method"),
                       (args.num_blocks, "blocks.num_blocks"), (args.data, "data.name"), (args.steps, "train.steps"),
                       (getattr(args, "seed", None), "train.seed"), (getattr(args, "blocks", None), "train.blocks"),
                       (getattr(args, "parallel", None), "train.parallel")):
        if value is not None and value != "":
            if key == "task":
                cfg.task = value
            else:
                apply_overrides(cfg, [f"{key}={value}"])
    return validate(apply_overrides(cfg, args.overrides))


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        given = [flag for flag, value in (("--out", args.out), ("--preset", args.preset), ("--task", args.task),
                                          ("--method", args.method), ("--seed", args.seed),
                                          ("--num-blocks", args.num_blocks), ("--data", args.data),
                                          ("--steps", args.steps), ("--blocks", args.blocks),
                                          ("--overwrite", args.overwrite or None))
                 if value is not None] + list(args.overrides)
        if given:  # they were silently ignored: the run continues exactly as its config.json says
            raise ValueError(f"--resume continues the run in {args.resume} as its config.json says; it takes no "
                             f"{', '.join(given)} (start a new run with --out DIR for other settings)")
        config = Path(args.resume) / CONFIG
        if not config.exists():
            raise ValueError(f"cannot resume: {config} does not exist (was the run started in {args.resume}?)")
        cfg = read_config(config)
        if cfg.train.parallel == "blocks" or args.parallel == "blocks":  # every rank resumes its own job directory
            results = train_parallel(cfg, args.resume, resume=True, progress=not args.no_progress)
        else:
            results = train(None, args.resume, resume=True, progress=not args.no_progress)
    else:
        if not args.out:
            raise ValueError("--out DIR is required (or --resume DIR to continue a run)")
        task = get_task(args.task or "classify")
        args.preset = args.preset or task.train_preset or task.presets["full"]
        cfg = _run_config(args)
        run = train_parallel if cfg.train.parallel == "blocks" else train
        results = run(cfg, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    if "world_size" in results and results["rank"] != 0:
        print(f"rank {results['rank']}: trained blocks {results['blocks']}; rank 0 merged the model")
    elif results.get("per_block_job"):
        print(f"trained blocks {results['blocks']}: {results['layer_updates']} layer-updates; merge the jobs "
              f"of all blocks with: diffusionblocks merge RUN... --out DIR")
    else:
        print(get_task(cfg.task).summary(results))
        print(f"evaluate again with: diffusionblocks eval {args.out or args.resume}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    record = merge(args.runs, args.out, allow_missing=args.allow_missing)
    owners = ", ".join(f"block {b} <- {r}" for b, r in record["owner"].items())
    print(f"merged into {args.out}: {owners}" + (f"; MISSING {record['missing']}" if record["missing"] else ""))
    print(f"evaluate with: diffusionblocks eval {args.out}")
    return 0


def run_owned() -> frozenset[str]:
    """The file names of a run that `sample` never writes over."""
    return frozenset((*RUN_FILES, LOCK, *(f for t in TASKS.values() for f in t.run_files)))


def _declared(kind: str) -> dict[str, list[tuple[str, Option]]]:
    """Every task's options of `kind` ("eval" or "sample"), by name: [(task, its declaration), ...]."""
    found = {}
    for name, task in TASKS.items():
        for o in task.options(kind):
            found.setdefault(o.name, []).append((name, o))
    return found


def _add_options(p: argparse.ArgumentParser, kind: str) -> None:
    """A flag for each option of `kind` some task takes; its help says what it is to each task that takes it."""
    p.add_argument("--steps", dest="training_steps", default=None, help=argparse.SUPPRESS)  # refused by _given
    for declared in _declared(kind).values():
        helps = {}
        for task, o in declared:
            helps.setdefault(o.help, []).append(task)
        o = declared[0][1]
        parse = {"action": "store_true"} if o.type is bool else {"type": o.type, "choices": o.choices}
        p.add_argument(o.flag, dest=o.name, default=None,
                       help="; ".join(f"{', '.join(ts)}: {h}" for h, ts in helps.items()), **parse)


def _given(args: argparse.Namespace, task, kind: str) -> dict:
    """The options of `kind` given on the command line, refused unless the run's task takes them."""
    declared = _declared(kind)
    given = {k: v for k in declared if (v := getattr(args, k)) is not None and v is not False}
    own = [o.name for o in task.options(kind)]
    foreign = [k for k in given if k not in own]
    if foreign:
        flags = lambda keys: ", ".join(declared[k][0][1].flag for k in keys) or "none"
        raise ValueError(f"{flags(foreign)}: not an option of {task.name} runs (they take {flags(own)})")
    return given


def cmd_eval(args: argparse.Namespace) -> int:
    cfg, model, data = load_model(args.run, args.overrides)
    task = get_task(cfg.task)
    given = _given(args, task, "eval")
    device = inference_device(cfg, args.overrides)
    ev = task.score(model.to(device), data, cfg, split=args.split, device=device, progress=not args.json,
                    reference=reference_model, **given)
    ev.update(run=str(args.run), method=cfg.train.method, split=args.split,
              **{k: v for k, v in given.items() if k != "limit"})
    if args.json:
        print(json.dumps(ev, indent=2))
    else:
        print(f"{args.run}: {task.describe_score(ev)}")
    return 0


def _writable(path: str, flag: str, overwrite: bool) -> None:
    """`path` may be written: a file in an existing directory, new unless `overwrite`, and never a run's own file."""
    p = Path(path).resolve()
    if p.is_dir():
        raise ValueError(f"{flag} {path}: a directory; give the file to write")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {path}: the directory {p.parent} does not exist")
    if p.name in run_owned() and (p.parent / CONFIG).exists():
        raise ValueError(f"{flag} {path}: a file of the run in {p.parent}, never written over; write elsewhere")
    if p.exists() and not overwrite:
        raise ValueError(f"{flag} {path} exists: give --overwrite to replace it, or another --out")


def cmd_sample(args: argparse.Namespace) -> int:
    _writable(args.out, "--out", args.overwrite)
    cfg, model, data = load_model(args.run, args.overrides)
    task = get_task(cfg.task)
    device = inference_device(cfg, args.overrides)
    writable = lambda path, flag: _writable(path, flag, args.overwrite)
    print(task.sample(model.to(device), data, cfg, args.out, num=args.num, seed=args.seed, device=device,
                      **_given(args, task, "sample"), writable=writable))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if args.quick and args.preset is not None:
        raise ValueError("--quick picks its own preset; use either --quick or --preset")
    task = get_task(args.task or (load_preset(args.preset).task if args.preset else "classify"))
    args.preset = args.preset or task.compare_preset(args.quick)
    preset_task = load_preset(args.preset).task
    if preset_task != task.name and args.preset not in task.presets.values():  # arlm runs on the lm-* presets
        raise ValueError(f"preset {args.preset!r} is a {preset_task} preset; --task {task.name} needs one of its "
                         f"own (e.g. {task.presets['full']})")
    cfg = _run_config(args)
    seeds = parse_ints(args.seeds, "--seeds", "0,1,2")
    if not seeds:
        raise ValueError("--seeds: give at least one seed, e.g. 0,1,2")
    roles = [r.strip() for r in args.methods.split(",") if r.strip()] if args.methods else None
    tune = {}
    for key, flag, text in (("lr", "--tune-lr", args.tune_lr), ("warmup", "--tune-warmup", args.tune_warmup)):
        try:
            tune[key] = [float(v) for v in (text or "").split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag} {text!r}: expected comma-separated numbers, e.g. "
                             f"{'5e-4,1e-3,2e-3' if key == 'lr' else '0,0.05,0.1'}") from None
    if args.tune_seeds is not None and not any(tune.values()):
        raise ValueError("--tune-seeds seeds the sweep of --tune-lr / --tune-warmup: give one of them too")
    report = compare(cfg, args.out or f"runs/compare-{args.preset}", seeds, roles, progress=not args.no_progress,
                     overwrite=args.overwrite, tune=tune,
                     tune_seeds=parse_ints(args.tune_seeds or "0,1", "--tune-seeds", "0,1"))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def preset_lines() -> list[str]:
    """One line a preset: its name, its task, the first sentence of its description."""
    width = max(map(len, PRESETS))
    lines = []
    for name, make in PRESETS.items():
        doc = " ".join((make.__doc__ or "").split())
        short = doc if len(doc) <= 90 else doc[:87].rsplit(" ", 1)[0] + " ..."
        lines.append(f"  {name:<{width}}  {make().task:<9}  {short}")
    return lines


def cmd_config(args: argparse.Namespace) -> int:
    if args.preset is None:
        print("presets (diffusionblocks config --preset NAME [KEY=VALUE ...] shows one, resolved):")
        print("\n".join(preset_lines()))
        return 0
    cfg = load_preset(args.preset)
    if args.task:
        cfg.task = args.task
    cfg = apply_overrides(cfg, args.overrides)
    config_values(cfg)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    print(f"# preset {args.preset}{' with ' + ' '.join(args.overrides) if args.overrides else ''}; task {cfg.task}")
    for name, values in cfg.sections().items():
        print(f"\n[{name}]  {' '.join((type(values).__doc__ or '').split())}")
        default = type(values)()
        for f in dataclasses.fields(values):
            value, meta = getattr(values, f.name), f.metadata
            changed = " *" if value != getattr(default, f.name) else ""
            allowed = meta.get("range") or (" | ".join(map(str, meta["choices"])) if meta.get("choices") else "")
            print(f"{name}.{f.name} = {json.dumps(value)}{changed}    # {meta.get('help', '')}"
                  + (f"; accepts {allowed}" if allowed else ""))
    print("\n(* differs from the section's default)")
    return 0


def _plan_spec(args: argparse.Namespace) -> Spec:
    cfg = load_preset(args.preset)
    if args.task:
        cfg.task = args.task
    for key, value in (("depth", args.depth), ("width", args.width), ("heads", args.heads),
                       ("mlp_ratio", args.mlp_ratio), ("patch", args.patch)):
        if value is not None:
            setattr(cfg.model, key, value)
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    if args.data:
        cfg.data.name = args.data
    cfg = apply_overrides(cfg, args.overrides)
    if getattr(args, "device", None) and args.command == "memory":
        cfg.train.device = args.device
    given = {}
    if args.image_size:
        parts = parse_ints(args.image_size.lower().replace("x", ","), "--image-size", "28 or 32x32")
        if len(parts) not in (1, 2):
            raise ValueError(f"--image-size {args.image_size!r}: expected N or HxW")
        given["image_size"] = (parts[0], parts[-1])
    for key, value in (("channels", args.channels), ("classes", args.classes)):
        if value is not None:
            given[key] = value
    shapes = get_task(cfg.task).plan_shapes(cfg, **given)
    if args.command == "memory":  # measured here: where the steps will actually run
        try:
            device = resolve_device(cfg.train.device).type
        except RuntimeError:  # torch's message for a device string it does not know
            device = None
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device {cfg.train.device!r} (--device or train.device): expected cpu, cuda, cuda:N "
                             f"or auto")
    else:
        device = "cuda" if (args.device or cfg.train.device).startswith("cuda") else "cpu"
    return Spec(cfg, shapes, dtype=args.dtype, optimizer=args.optimizer, device=device)


def _configurations(args: argparse.Namespace, spec: Spec) -> list:
    """The rows `plan` and `memory` cover: e2e (with checkpointing) and dblocks at each --blocks value."""
    return configurations(spec.cfg.model.depth, tuple(parse_ints(args.blocks, "--blocks", "2,3,4,6")), args.checkpoint)


def cmd_plan(args: argparse.Namespace) -> int:
    spec = _plan_spec(args)
    budget = parse_bytes(args.device_memory) if args.device_memory else None
    result = plan(spec, _configurations(args, spec), budget)
    if all(r["total"] is None for r in result["rows"]):
        raise ValueError(f"the planner has no activation formula for task {spec.cfg.task}: measure its steps with "
                         f"`diffusionblocks memory --task {spec.cfg.task}`")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["model"]
    print(f"{result['task']}: {m['depth']} layers, width {m['width']}, {m['heads']} heads, MLP x{m['mlp_ratio']}, "
          f"{m['tokens']} tokens; batch {result['batch_size']}, {result['dtype']}, {result['optimizer']}")
    print(format_table(result))
    if budget:
        fits = [r["name"] for r in result["rows"] if r["fits"]]
        print(f"fit in {args.device_memory} ({budget / 2**30:.2f} GiB): " + (", ".join(fits) if fits else "none"))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    spec = _plan_spec(args)
    if spec.weight_dtype != "float32":
        raise ValueError("memory measures training as train.precision runs it (float32 weights); give "
                         "train.precision=bf16 or fp16 instead of --dtype, or predict it with plan")
    if spec.optimizer != "adamw":
        raise ValueError("memory measures the trainer's optimizer (adamw); plan predicts other optimizers")
    confs = _configurations(args, spec)
    out = Path(args.out)
    make_out(out)
    result = measure_all(spec, confs, progress=not args.no_progress, offload_dir=out)
    result["device"] = spec.cfg.train.device
    io.save_json(out / "memory.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    plotted = not args.no_plot and plot_memory(result, out / "memory.png")
    print(f"wrote {out / 'memory.json'}" + (f" and {out / 'memory.png'}" if plotted else ""), file=sys.stderr)
    return 0


def _add_size_args(p: argparse.ArgumentParser):
    p.add_argument("--preset", default="vit12", help="model preset to start from (default vit12; listed below)")
    p.add_argument("--task", choices=tuple(TASKS), default=None, help="the task whose model it is (default: the "
                                                                      "preset's)")
    p.add_argument("--depth", type=int, default=None, help="layers")
    p.add_argument("--width", type=int, default=None, help="the model dimension")
    p.add_argument("--heads", type=int, default=None, help="attention heads")
    p.add_argument("--mlp-ratio", type=float, default=None, help="the MLP's hidden width over the width")
    p.add_argument("--patch", type=int, default=None, help="image tasks: the patch side in pixels")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size")
    p.add_argument("--data", default=None, help="dataset whose shape to use (fashion-mnist, digits, cifar10...; "
                   "text presets: shakespeare, text8...)")
    p.add_argument("--image-size", default=None, help="N or HxW (with --channels and --classes, for other data)")
    p.add_argument("--channels", type=int, default=None, help="image channels (with --image-size)")
    p.add_argument("--classes", type=int, default=None, help="classes (with --image-size)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16: train wholly in it (default: as "
                   "train.precision trains: float32 weights, activations in its autocast dtype)")
    p.add_argument("--optimizer", default="adamw", help="adamw, adam, momentum or sgd")
    p.add_argument("--blocks", default="2,3,4,6", help="values of B, comma-separated")
    p.add_argument("--checkpoint", type=int, default=1, help="layers per checkpointed group in the ckpt rows")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.layer=prenorm")


def _add_run_args(p: argparse.ArgumentParser, preset_default: str | None):
    p.add_argument("--preset", default=preset_default, help="starting config (listed below)")
    p.add_argument("--num-blocks", type=int, default=None, help="number of blocks B")
    p.add_argument("--data", default=None, help="fashion-mnist, digits, cifar10, cifar100, or PATH.npz; text tasks: "
                                                "shakespeare, python, text8, or PATH.txt / a folder of .txt files")
    p.add_argument("--steps", type=int, default=None, help="budget in end-to-end steps (train.steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")


def _config_parser(sub):
    p = sub.add_parser("config", help="list the presets, or print one resolved with each key's meaning",
                       description="Without --preset: the presets, a line each. With it: the preset's config after "
                                   "the overrides, every key with its value, its help and what it accepts (the keys "
                                   "that train, compare and the other commands take as KEY=VALUE).")
    p.add_argument("--preset", default=None, help="the preset to show (default: list them)")
    p.add_argument("--task", choices=tuple(TASKS), default=None, help="the task to show it for (default: the "
                                                                      "preset's)")
    p.add_argument("--json", action="store_true", help="print config.json's object instead")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_config)


def _partition_parser(sub):
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
    p.add_argument("--sigma-min", type=float, default=0.002, help="the lowest noise level (EDM: 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="the highest noise level (EDM: 80)")
    p.add_argument("--steps-per-block", type=int, default=1, help="inference steps per block")
    p.add_argument("--grid", choices=GRID_KINDS, default="equiprob", help="inference grid")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_partition)


def _train_parser(sub):
    p = sub.add_parser("train", help="train one model (end-to-end or DiffusionBlocks)",
                       description="Train one run into --out DIR: config.json, metrics.jsonl, model.safetensors, "
                                   "state.pt (resume), results.json.")
    p.add_argument("--task", choices=tuple(TASKS), default=None,
                   help="default: the preset's (classify, or imagegen for the gen-* presets, mdlm for lm-*); "
                        "without --preset a text task (mdlm, arlm) starts from lm-cpu")
    p.add_argument("--method", choices=tuple(METHODS), default=None,
                   help="the training method (train.method; default: the preset's, dblocks)")
    p.add_argument("--seed", type=int, default=None, help="the run's seed: weights, data order, noise (train.seed)")
    p.add_argument("--out", default=None, help="run directory")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out (its files are "
                                                            "removed once the new run's model is built)")
    p.add_argument("--blocks", default=None, metavar="LIST",
                   help="dblocks: train only these blocks, e.g. 0,2 (a per-block job; merge the jobs afterwards)")
    p.add_argument("--parallel", choices=("none", "blocks"), default=None,
                   help="blocks: under torchrun, spread the blocks over the processes")
    _add_run_args(p, None)  # default: fashion, or a text task's own preset (_default_preset)
    p.set_defaults(func=cmd_train)


def _merge_parser(sub):
    p = sub.add_parser("merge", help="assemble one model from per-block jobs",
                       description="Merge per-block job directories (train --blocks ...) into one run directory "
                                   "that `eval` reads. Refuses jobs whose partition, architecture, data or config "
                                   "differ, a block owned twice, unfinished jobs, and missing blocks.")
    p.add_argument("runs", nargs="+", help="per-block job directories")
    p.add_argument("--out", required=True, help="directory of the merged run")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge even if some blocks are in no job (they keep their untrained initial weights)")
    p.set_defaults(func=cmd_merge)


def _eval_parser(sub):
    p = sub.add_parser("eval", help="re-evaluate a trained run",
                       description="Evaluate a run's checkpoint on the full test set; for DiffusionBlocks the "
                                   "inference grid can differ from training's.")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="evaluate on the test split (default) or on the run's validation split (data.val_size)")
    _add_options(p, "eval")
    p.add_argument("--json", action="store_true", help="print the evaluation as one JSON object")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="how to run and evaluate it, e.g. train.device=cuda train.eval_batch_size=100 "
                        "chain.steps_per_block=2 (not model.*, blocks.* or train.method: what was trained)")
    p.set_defaults(func=cmd_eval)


def _sample_parser(sub):
    p = sub.add_parser("sample", help="draw images or text from a trained run",
                       description="Sample with the run's model (DiffusionBlocks: one block per step). Image "
                                   "generation: a PNG grid (and with --npz the raw uint8 samples and their classes). "
                                   "Language models: a text file of --num samples of --length tokens.")
    p.add_argument("run", help="run directory (task imagegen, mdlm or arlm)")
    p.add_argument("--num", type=at_least(1), default=64, help="samples (default 64; what one call may draw is capped: "
                                                                "see --npz, --length)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples' noise (default 0)")
    _add_options(p, "sample")
    p.add_argument("--out", required=True, help="the PNG (images) or text file to write (not a file of a run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and OUT.npz)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="how to run and sample it, e.g. train.device=cuda gen.sampler=heun (not model.*, blocks.* "
                        "or train.method)")
    p.set_defaults(func=cmd_sample)


def _compare_parser(sub):
    p = sub.add_parser("compare", help="the main job: end-to-end vs DiffusionBlocks vs a shallow control",
                       description="Train end-to-end, DiffusionBlocks and an end-to-end control with one block's "
                                   "depth on the same layer-update budget, and end-to-end at DiffusionBlocks' "
                                   "step count (its samples, B times the layer-updates); print a table, write "
                                   "compare.json, compare.md, compare.png and loss.png. Finished arms are reused, "
                                   "interrupted ones "
                                   "resumed; an arm trained under other settings is refused without --overwrite. "
                                   "With --tune-lr (and/or --tune-warmup) each arm's setting is first chosen on a "
                                   "validation split, for each arm on its own.")
    p.add_argument("--task", choices=tuple(TASKS), default=None,
                   help="imagegen: end-to-end DiT vs DiffusionBlocks, FD, sample grids, sampling time; mdlm: masked "
                        "diffusion arms and the autoregressive floor, bits per character; arlm: autoregressive; "
                        "recurrent: Huginn's training vs DiffusionBlocks, with measured training compute "
                        "(default: the preset's task, classify)")
    p.add_argument("--quick", action="store_true",
                   help="the task's small preset: the same arms on a fraction of the steps (a smoke run)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--methods", default=None,
                   help="the arms, comma-separated: training methods (" + ", ".join(METHODS) + "), control "
                        "(end-to-end at one block's depth), e2e-steps (end-to-end for DiffusionBlocks' optimizer "
                        "steps and samples: B times the layer-updates); default: the task's own arms, its "
                        "compare_roles (most tasks: e2e,e2e-steps,control,dblocks)")
    p.add_argument("--tune-lr", default=None, metavar="LR,LR,...",
                   help="choose each arm's train.lr on validation among these, e.g. 5e-4,1e-3,2e-3: every arm trains "
                        "each on the training data less a validation split (data.val_size; when unset, image tasks "
                        "hold out a tenth of the training images and language tasks score 512 windows of their "
                        "validation text) over --tune-seeds, and its test arms take the best mean "
                        "validation headline; the sweep goes to OUT/tune/, reused on a re-run")
    p.add_argument("--tune-warmup", default=None, metavar="W,W,...",
                   help="likewise train.warmup (a fraction of each optimizer's updates), e.g. 0,0.05,0.1; with "
                        "--tune-lr every pair is tried")
    p.add_argument("--tune-seeds", default=None, metavar="S,S,...",
                   help="the sweep's seeds, two at least (default 0,1)")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-PRESET)")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain arms that --out holds under other settings (without it they are refused; arms of "
                        "the same settings are reused either way)")
    p.add_argument("--json", action="store_true", help="also print compare.json's object (recurrent: flops_per_step "
                                                       "per arm and the ratios)")
    _add_run_args(p, None)
    p.set_defaults(func=cmd_compare)


def _plan_parser(sub):
    p = sub.add_parser("plan", help="predict training memory per method, B and residency",
                       description="Predict params, grads, optimizer state and activations of one training step "
                                   "for e2e, e2e+checkpointing and DiffusionBlocks at each B (residency all/active, "
                                   "with checkpointing), and which fit --device-memory. Nothing is trained.")
    _add_size_args(p)
    p.add_argument("--device-memory", default=None, help="memory of the device, e.g. 24GB, 24GiB, 512MiB")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where training runs (AdamW keeps its step counters on the CPU)")
    p.set_defaults(func=cmd_plan)


def _memory_parser(sub):
    p = sub.add_parser("memory", help="measure training memory per method and B on this machine",
                       description="Run a few training steps of every configuration that plan lists (random "
                                   "inputs of the data's shape), measure the steady-state step and print it next to "
                                   "the prediction; writes memory.json and memory.png to --out.")
    _add_size_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the preset's)")
    p.add_argument("--out", default="runs/memory", help="output directory (default runs/memory)")
    p.add_argument("--no-plot", action="store_true", help="write no memory.png")
    p.add_argument("--no-progress", action="store_true", help="no per-configuration progress lines")
    p.set_defaults(func=cmd_memory)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionblocks",
        description="Train networks block by block as the steps of a reverse diffusion (DiffusionBlocks).")
    parser.add_argument("--version", action="version", version=f"diffusionblocks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_config_parser, _partition_parser, _train_parser, _merge_parser, _eval_parser, _sample_parser,
                _compare_parser, _plan_parser, _memory_parser):
        add(sub)
    for p in sub.choices.values():
        if "--preset" in p._option_string_actions and p.prog.split()[-1] != "config":
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            p.epilog = "presets (diffusionblocks config --preset NAME shows one, with each key's meaning):\n" + \
                "\n".join(preset_lines())
        p.add_argument("--plugin", action="append", metavar="MODULE|FILE.py",
                       help="load your own task or method first: a module or .py file defining TASK and/or METHOD "
                            "(repeatable; also $DIFFUSIONBLOCKS_PLUGINS, comma-separated)")
    return parser


def load_plugins(argv: list[str]) -> None:
    """The installed plug-ins and those of --plugin, before the parser lists tasks and methods."""
    registry.load_installed()
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            registry.load(argv[i + 1])
        elif arg.startswith("--plugin="):
            registry.load(arg.split("=", 1)[1])



def main(argv: list[str] | None = None) -> int:
    try:
        load_plugins(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"diffusionblocks: error: {e}", file=sys.stderr)
        if argv is None:
            sys.exit(2)
        return 2
    parser = build_parser()
    # overrides may sit between options: argparse fills the positional list once; the later ones join it here
    try:
        args, extra = parser.parse_known_args(argv)
        stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
    except SystemExit as e:  # a usage error (argparse printed it) or --help / --version
        if argv is None:
            raise
        return e.code if isinstance(e.code, int) else 2
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if getattr(args, "training_steps", None) is not None:  # eval and sample: a flag of another meaning
            raise ValueError("--steps is the training budget (train, compare); the sampling steps are --sample-steps")
        code = args.func(args)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): no traceback
        sys.stderr.close()
        code = 0
    except KeyboardInterrupt as e:  # 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM (train.Stopped)
        code = getattr(e, "code", 130)
    except ValueError as e:  # user errors (DataError and CheckpointError included): one line, no traceback
        print(f"diffusionblocks {args.command}: error: {e}", file=sys.stderr)
        code = 2
    if argv is None:
        sys.exit(code)
    return code
