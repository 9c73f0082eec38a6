"""The memory planner: predict the training memory of each method before training anything.

For a model (a preset or given sizes), a batch, a dtype and an optimizer it predicts, per configuration, the four
parts of training memory on the device. The configurations come from the methods: each declares how a step of it is
planned (Method.plan): as a whole network (e2e: with and without activation checkpointing) or one block at a time
(DiffusionBlocks: at each B with each residency policy, and with checkpointing); a method that declares nothing is
named in one line and skipped.

- params, grads, optimizer: exact. The model is built on PyTorch's "meta" device (shapes, no storage),
  so every parameter is counted as the real model has it; AdamW keeps two moments per parameter (and,
  on a CPU, a 4-byte step counter per parameter tensor).
- activations: what autograd saves for backward, from a per-layer formula over the tensors our layers
  save (see `layer_activation_bytes`) plus the task's formula for its stem, head and loss
  (`Task.plan_outer_bytes`: the ViT classifier; the DiT of image generation; the language models, with the
  tied head, the log-softmax over the vocabulary and a causal mask), checked against the measurement module
  (`diffusionblocks memory`, tests/test_memory.py, tests/test_lm.py). It assumes fused
  attention (PyTorch's SDPA on CPU, flash or memory-efficient on GPU); the math fallback also keeps the
  (T x T) attention matrix, which the formula does not include.
  With checkpointing the activations are the groups' inputs, and `transient` adds the one group that
  backward recomputes at a time.

The total (the sum of the parts) is an upper bound on the steady tensors of a step; the measured peak
(`diffusionblocks memory`) also shows the allocator's temporaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import RunConfig
from .images import pyplot
from .memory import StepMemory, measure_step
from .methods import METHODS, get_method
from .methods.base import autocast
from .run import new_model, place, resolve_device, validate
from .tasks import get_task
from .tasks.optional import NoFormula

# train.precision -> the dtype its autocast saves activations in (weights, gradients and optimizer state stay float32)
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
OPTIMIZERS = {"adamw": 2, "adam": 2, "momentum": 1, "sgd": 0}  # state tensors per parameter
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'24GB' (10^9), '24GiB' or '24G' (2^30), '512MiB', '1.5TB', '1000' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 24GB, 24GiB, 512MiB or 1e9 "
                         f"(GB = 10^9 bytes, GiB = 2^30)") from None
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:  # 0.5B would be 0 bytes
        raise ValueError(f"memory size {text!r} must be at least one byte")
    return int(value)


@dataclass
class Spec:
    """What the planner needs: the run config (model sizes, method settings, batch) and the data's shapes (what
    the task's build_model reads: tasks.images.ImageShapes for images, tasks.lm.TextShapes for text; the task's
    `plan_shapes` gives them from a config)."""

    cfg: RunConfig
    shapes: Any
    dtype: str | None = None  # of the activations; None: what the config trains in (train.precision's autocast)
    optimizer: str = "adamw"
    device: str = "cpu"  # where AdamW's step counters live matters for exactness on a CPU only
    # of the weights, gradients and optimizer state; None: float32 when `dtype` is the config's autocast (which keeps
    # them float32), else `dtype` (a run trained wholly in it)
    weight_dtype: str | None = None

    def __post_init__(self):
        derived = self.dtype is None
        if derived:
            self.dtype = PRECISION_DTYPES[self.cfg.train.precision]
        if self.weight_dtype is None:
            self.weight_dtype = "float32" if derived else self.dtype
        for dtype in (self.dtype, self.weight_dtype):
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        m = self.cfg.model
        for name in ("depth", "width", "heads", "patch"):
            value = getattr(m, name)
            if value < 1:
                raise ValueError(f"model.{name}={value}: must be >= 1")
        if m.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={m.mlp_ratio}: must be > 0")
        if self.cfg.train.batch_size < 1:
            raise ValueError(f"batch size {self.cfg.train.batch_size}: must be >= 1")
        validate(self.cfg)

    @classmethod
    def of(cls, cfg: RunConfig, **options) -> Spec:
        """The spec of a config, its shapes from the task (e.g. an image dataset's known shape)."""
        return cls(cfg, get_task(cfg.task).plan_shapes(cfg), **options)

    @property
    def task(self):
        return get_task(self.cfg.task)

    @property
    def bytes_per_element(self) -> int:
        """Of the saved activations (under autocast, the autocast dtype: the planner's model of it)."""
        return DTYPES[self.dtype]

    @property
    def weight_bytes(self) -> int:
        """Of a parameter, its gradient and each optimizer moment."""
        return DTYPES[self.weight_dtype]

    @property
    def tokens(self) -> int:
        """Sequence length through the layers (the task's: patches plus a token, a text window)."""
        return self.task.plan_tokens(self.cfg, self.shapes, self.form)

    @property
    def form(self) -> str:
        """The model form the config's method trains ("end-to-end" or "blocks")."""
        return get_method(self.cfg.train.method).model_form


@dataclass(frozen=True)
class Configuration:
    """A row of the table: a method that declares how it is planned (Method.plan) and its settings."""

    method: str
    num_blocks: int = 1  # a blockwise method's blocks
    residency: str = "all"  # a blockwise method's idle blocks: on the device ("all") or off it ("active")
    checkpoint: int = 0  # layers per checkpointed group (0 = off)

    @property
    def blockwise(self) -> bool:
        plan = get_method(self.method).plan
        if plan is None:
            raise ValueError(f"the memory planner cannot plan train.method={self.method}: it declares no plan "
                             "(Method.plan)")
        return plan == "blockwise"

    @property
    def name(self) -> str:
        blocks = f" B={self.num_blocks} {self.residency}" if self.blockwise else ""
        return self.method + blocks + (f"+ckpt{self.checkpoint}" if self.checkpoint else "")

    def apply(self, cfg: RunConfig) -> RunConfig:
        cfg = RunConfig.from_dict(cfg.to_dict())
        cfg.train.method = self.method
        cfg.model.checkpoint = self.checkpoint
        if self.blockwise:
            cfg.blocks.num_blocks = self.num_blocks
            cfg.dblocks.residency = self.residency
            if cfg.model.depth % self.num_blocks:
                cfg.blocks.allocation = ",".join(str(n) for n in _even_allocation(cfg.model.depth, self.num_blocks))
            elif (given := cfg.blocks.layers_per_block()) and len(given) != self.num_blocks:
                cfg.blocks.allocation = ""
        return cfg


def _even_allocation(depth: int, blocks: int) -> list[int]:
    base, extra = divmod(depth, blocks)
    return [base + 1] * extra + [base] * (blocks - extra)


def configurations(depth: int, blocks=(2, 3, 4, 6), checkpoint: int = 1) -> list[Configuration]:
    """The standard table: each method planned as a whole network with and without checkpointing, then each
    blockwise one at each B with both residencies, and with residency=active and checkpointing."""
    planned = [m for m in METHODS.values() if m.plan is not None]
    out = [Configuration(m.name, checkpoint=c) for m in planned if m.plan == "whole" for c in (0, checkpoint)]
    for B in blocks:
        if not 1 <= B <= depth:
            raise ValueError(f"B={B}: must be between 1 and the number of layers ({depth})")
        out += [Configuration(m.name, B, r, c) for m in planned if m.plan == "blockwise"
                for r, c in (("all", 0), ("active", 0), ("active", checkpoint))]
    return out


def unplanned(cfg: RunConfig) -> list[str]:
    """The methods that could train this config but declare no plan (Method.plan): the planner skips them."""
    out = []
    for name in (name for name, method in METHODS.items() if method.plan is None):
        other = RunConfig.from_dict(cfg.to_dict())
        other.train.method = name
        with contextlib.suppress(ValueError):
            out.append(validate(other).train.method)
    return out


# -- the parts ---------------------------------------------------------------------------------


def _meta_model(spec: Spec, cfg: RunConfig):
    with torch.device("meta"):
        return new_model(cfg, spec.shapes)


def _state_bytes(params: list[torch.nn.Parameter], spec: Spec) -> int:
    """Optimizer state of these parameters: moments in the training dtype, step counters (CPU, 4 bytes)."""
    n = sum(p.numel() for p in params)
    moments = OPTIMIZERS[spec.optimizer] * n * spec.weight_bytes
    counters = 4 * len(params) if spec.optimizer in ("adamw", "adam") and spec.device == "cpu" else 0
    return moments + counters


def layer_activation_bytes(spec: Spec) -> int:
    """Bytes one transformer layer saves for backward at this batch (N), tokens (T), width (D).

    Per token, each sublayer keeps its input h (for the norm) and the normalised, modulated input (for
    the first linear); attention keeps q|k|v (3D) and its output (D, which the output projection reads
    as a view), MLP its hidden pre- and post-activation (2 * hidden). Per token also the norms' mean and
    rstd (float32) and attention's log-sum-exp per head (float32). adaLN-zero adds, per sample, the SiLU
    of the conditioning and the (shift, scale, gate) projection for each sublayer; without gate
    recomputation it keeps each branch's output too (2D per token). Plus what the task's layers keep besides
    (Task.plan_layer_bytes: a causal mask made additive)."""
    m, s = spec.cfg.model, spec.bytes_per_element
    N, T, D = spec.cfg.train.batch_size, spec.tokens, m.width
    hidden = int(D * m.mlp_ratio)
    per_token = s * (8 * D + 2 * hidden) + 4 * (4 + m.heads)
    per_sample = 0
    if m.layer == "adaln":
        per_sample = 2 * s * (D + 3 * D)  # SiLU(c) and the modulation output, per sublayer (cond dim = D)
        if not m.gate_recompute:
            per_token += 2 * s * D
    if m.dropout > 0:  # the MLP's dropout keeps a 1-byte mask (attention dropout is not modelled)
        per_token += hidden
    return N * (T * per_token + per_sample) + spec.task.plan_layer_bytes(spec.cfg, spec.shapes, s, spec.form)


def predict(spec: Spec, conf: Configuration) -> dict:
    """The four parts (and the recomputation transient) for one configuration, in bytes."""
    cfg = conf.apply(spec.cfg)
    model = _meta_model(spec, cfg)
    s, depth = spec.bytes_per_element, cfg.model.depth
    spec = dataclasses.replace(spec, cfg=cfg)  # the method's tokens (autoregressive DiffusionBlocks: twice the window)
    try:
        layer, T = layer_activation_bytes(spec), spec.tokens
    except NoFormula:  # a task without formulas (your own): parameters and optimizer only; `memory` measures the rest
        layer = T = None
    N, D = cfg.train.batch_size, cfg.model.width
    numel = lambda ps: sum(p.numel() for p in ps)

    def layer_part(n_layers: int) -> tuple[int, int]:
        if not conf.checkpoint:
            return n_layers * layer, 0
        k = min(conf.checkpoint, n_layers)
        return math.ceil(n_layers / k) * N * T * D * s, k * layer

    # the units a step may train, each (its parameters, its layers), and the parameters every step trains
    if conf.blockwise:
        units = [(model.block_parameters(b), model.block_layers(b)) for b in range(model.num_blocks)]
        shared = model.shared_parameters()
    else:
        units, shared = [(list(model.parameters()), depth)], []
    params, block_layers = max(units, key=lambda u: (u[1], numel(u[0])))  # the largest unit
    split = [n for _, n in units]
    acts = transient = None
    if layer is not None:
        acts, transient = layer_part(block_layers)
        acts += spec.task.plan_outer_bytes(cfg, spec.shapes, model, s)
    trained = params + shared
    offloaded = conf.blockwise and conf.residency == "active"
    resident = with_state = trained if offloaded else [p for ps, _ in units for p in ps] + shared
    optimizer = _state_bytes(with_state, spec)
    if offloaded and spec.device == "cpu" and spec.optimizer in ("adamw", "adam"):
        # idle blocks' step counters are 0-d CPU tensors: they stay where they are
        optimizer += 4 * (len(list(model.parameters())) - len(with_state))
    out = {"name": conf.name, "method": conf.method, "num_blocks": conf.num_blocks, "residency": conf.residency,
           "checkpoint": conf.checkpoint, "layers_per_step": block_layers, "split": split, "tokens": T,
           "params": numel(resident) * spec.weight_bytes, "grads": numel(trained) * spec.weight_bytes,
           "optimizer": optimizer,
           "activations": acts, "transient": transient}
    out["total"] = None if acts is None else out["params"] + out["grads"] + out["optimizer"] + acts + transient
    return out


def _token_counts(rows: list[dict]) -> int | str:
    """Tokens per sample through the layers: one number, or per method where they differ (autoregressive
    DiffusionBlocks runs a noisy and a clean copy of the window)."""
    counts = {r["method"]: r["tokens"] for r in rows}
    return next(iter(counts.values())) if len(set(counts.values())) == 1 else \
        " / ".join(f"{n} ({method})" for method, n in counts.items())


def plan(spec: Spec, confs: list[Configuration], device_memory: int | None = None) -> dict:
    rows = [predict(spec, c) for c in confs]
    if device_memory is not None:
        for r in rows:
            r["fits"] = r["total"] is not None and r["total"] <= device_memory
    m = spec.cfg.model
    return {"model": {"depth": m.depth, "width": m.width, "heads": m.heads, "mlp_ratio": m.mlp_ratio,
                      "patch": m.patch, "tokens": _token_counts(rows), "layer": m.layer},
            "task": spec.cfg.task, "data": dataclasses.asdict(spec.shapes),
            "batch_size": spec.cfg.train.batch_size, "dtype": spec.dtype, "weight_dtype": spec.weight_dtype,
            "optimizer": spec.optimizer,
            "device_memory": device_memory, "rows": rows, "unplanned": unplanned(spec.cfg)}


def format_table(result: dict) -> str:
    """A fixed-width table in MiB; rows that carry a "measured" entry show the measurement beside them."""
    mib = lambda n: "-" if n is None else f"{n / 2**20:.1f}"
    measured = any("measured" in r for r in result["rows"])
    head = f"{'configuration':<26}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'transient':>10}{'total':>9}"
    if measured:
        head += f" |{'activ':>9}{'total':>9}{'peak':>9}"
    if result.get("device_memory"):
        head += "  fits"
    lines = ["MiB; left of | the planner's prediction, right of it the measurement" if measured else "MiB", head]
    for r in result["rows"]:
        line = (f"{r['name']:<26}{mib(r['params']):>9}{mib(r['grads']):>9}{mib(r['optimizer']):>9}"
                f"{mib(r['activations']):>9}{mib(r['transient']):>10}{mib(r['total']):>9}")
        if measured:
            m = r.get("measured")
            line += f" |{mib(m['activations']):>9}{mib(m['total']):>9}{mib(m['peak']):>9}" if m else " |" + " " * 27
        if result.get("device_memory"):
            line += "  yes" if r["fits"] else "  NO"
        lines.append(line)
    # an uneven split is the planner's choice (training needs it spelled out): say which, once per B
    uneven = {r["num_blocks"]: r["split"] for r in result["rows"] if len(set(r.get("split", ()))) > 1}
    for B, split in uneven.items():
        lines.append(f"B={B} splits the {sum(split)} layers {'+'.join(map(str, split))} (the rows count the largest "
                     f"block); train it with blocks.allocation={','.join(map(str, split))}")
    if result.get("unplanned"):
        lines.append(f"not planned: {', '.join(result['unplanned'])} (a method without a plan declaration, "
                     "Method.plan)")
    return "\n".join(lines)


def measure_all(spec: Spec, confs: list[Configuration], progress: bool = True, offload_dir=None) -> dict:
    """`plan` plus, for every row, a measurement of one steady-state step on this machine."""
    result = plan(spec, confs)
    for i, (conf, row) in enumerate(zip(confs, result["rows"])):
        t0 = time.perf_counter()
        cfg = conf.apply(spec.cfg)
        row["measured"] = measure_configuration(cfg, spec.shapes, offload_dir=offload_dir).to_dict()
        if progress:
            print(f"[memory] {i + 1}/{len(confs)} {conf.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return result


def plot_memory(result: dict, path) -> bool:
    """Measured peak training memory vs B, one line per blockwise method and residency (whole-network methods as
    horizontal lines); the planner's total as crosses. False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    mib = lambda n: n / 2**20
    value = lambda r: mib(r["measured"]["peak"] if "measured" in r else r["total"] or 0)
    what = "measured peak" if all("measured" in r for r in rows) else "predicted total"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    series: dict[str, list[dict]] = {}
    where = {"all": "every block on the device", "active": "idle blocks off the device"}
    for r in rows:
        title = get_method(r["method"]).title or r["method"]
        ckpt = f", checkpointing every {r['checkpoint']} layer(s)" if r["checkpoint"] else ""
        if not Configuration(r["method"]).blockwise:
            c = next(colors)
            ax.axhline(value(r), color=c, ls="--", label=f"{title}{ckpt}")
            if r["total"] is not None:
                ax.axhline(mib(r["total"]), color=c, ls=":", lw=0.8)
        else:
            series.setdefault(f"{title}, {where.get(r['residency'], r['residency'])}{ckpt}", []).append(r)
    for label, rs in series.items():
        c = next(colors)
        xs = [r["num_blocks"] for r in rs]
        ax.plot(xs, [value(r) for r in rs], "o-", color=c, label=label)
        planned = [(x, mib(r["total"])) for x, r in zip(xs, rs) if r["total"] is not None]
        if planned:
            ax.plot(*zip(*planned), "x", color=c, ms=9)
    ax.set_xticks(sorted({r["num_blocks"] for rs in series.values() for r in rs}))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("number of blocks B")
    ax.set_ylabel(f"training memory per step, MiB ({what})")
    m = result["model"]
    ax.set_title(f"Training memory of task {result['task']}: {m['depth']} layers, width {m['width']}, {m['tokens']} "
                 f"tokens, batch {result['batch_size']}, {result['dtype']}\n(lines: {what}; crosses and dotted: the "
                 "planner's prediction)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def measure_configuration(cfg: RunConfig, shapes, *, warmup: int | None = None, offload_dir=None) -> StepMemory:
    """Build the model `cfg` describes for data of these shapes (random weights, a random batch from the task:
    memory does not depend on values) and measure one steady-state training step on cfg.train.device.
    Block-wise steps go round-robin through the blocks during warm-up, twice, so that every block has optimizer
    state and (residency=active) an off-device home already; the measured step trains block 0 after block B-1,
    so under residency=active it includes a swap."""
    cfg = RunConfig.from_dict(cfg.to_dict())
    cfg.dblocks.block_choice = "round-robin"
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = new_model(cfg, shapes)
    method_cls = get_method(cfg.train.method)
    method = method_cls(model, cfg, method_cls.budget(cfg)[0], device=device, offload_dir=offload_dir)
    residency = method.residency
    place(model, device, residency, None)
    batch = tuple(t.to(device) for t in get_task(cfg.task).random_batch(cfg, shapes, torch.Generator().manual_seed(0)))
    try:
        def step():  # under the config's train.precision, as training runs it
            with autocast(cfg.train.precision, device):
                return method.step(batch, method.next_block())

        return measure_step(step, model, method.optimizers,
                            device=device, offloaded=residency.offloaded_storages if residency else set,
                            warmup=2 * method.num_blocks if warmup is None else warmup)
    finally:
        if residency is not None:
            residency.close()
