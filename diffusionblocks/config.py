"""Typed run configuration: sections of settings, named presets, and dotted command-line overrides.

A run is described by one :class:`RunConfig`: its task's name and one instance of every section. A section is a
dataclass whose fields declare their default, range or choices and a line of help (`setting`); the core sections
are here, a task or a method declares its own beside its code (`section`), as it does its presets (`preset`).
``train.lr=1e-3`` style overrides are type-checked and unknown keys are rejected; the key names of earlier versions
are taken (ALIASES). The resolved config is saved with every run. `validate` checks values; which task and method
names exist is the registries' business (tasks/, methods/; run.validate checks both).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

from . import registry
from .noise import GRID_KINDS, PARTITION_KINDS, LogNormalLevels
from .precond import BRIDGES
from .text import TOKENIZERS

SECTIONS: dict[str, type] = {}  # name -> section dataclass: the core ones below, then the plug-ins' as imported
PRESETS: dict[str, Callable[[], RunConfig]] = {}  # name -> a function returning a fresh config (beside its task)


def setting(default, help: str, *, range: str | None = None, choices: tuple | None = None):
    """A section's field: its default, a line of help, and what `validate` accepts: a number's `range`, an interval
    ("[" "]" closed, "(" ")" open; inf = no bound, so the value must be finite) and an optional note after it, or a
    string's `choices`. Upper bounds of counts and sizes are sanity bounds far above any real run."""
    return dataclasses.field(default=default, metadata={"help": help, "range": range, "choices": choices})


def section(name: str):
    """Class decorator: register a section dataclass under `name` (cfg.NAME, keys NAME.field)."""
    def register(cls: type) -> type:
        if name in ("task", "sections", "to_dict", "from_dict") or SECTIONS.get(name, cls).__module__ != cls.__module__:
            raise ValueError(f"config section {name!r} is taken")  # (a module reloaded registers its own again)
        SECTIONS[name] = cls
        return cls
    return register


def preset(name: str):
    """Function decorator: register a function returning a config as the preset `name` (load_preset)."""
    def register(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        PRESETS[name] = fn
        return fn
    return register


MAX_PARAMS = 10**11  # a sanity bound on the model's estimated parameters (400 GB of float32 weights)
SIGMA = LogNormalLevels()  # the noise levels a classifier's blocks train on (chain.sigma_start lies among them)


@section("model")
@dataclass
class BackboneConfig:
    """The layer stack every task builds: a ViT over image patches or a transformer over tokens."""

    depth: int = setting(6, "transformer layers", range="[1, 10_000]")
    width: int = setting(128, "the model dimension", range="[1, 65_536]")
    heads: int = setting(4, "attention heads (they divide the width)", range="[1, 65_536]")
    patch: int = setting(4, "image tasks: the side of a square patch, in pixels", range="[1, 4_096]")
    mlp_ratio: float = setting(2.0, "the MLP's hidden width as a multiple of the width",
                               range="(0, 64] the MLP's hidden width is width x mlp_ratio")
    dropout: float = setting(0.0, "dropout in every layer", range="[0, 1)")
    label_dim: int = setting(0, "dimension of the diffused label embedding; 0 = width", range="[0, 65_536] 0 = width")
    checkpoint: int = setting(0, "activation checkpointing: recompute each group of this many layers (0 = off)",
                              range="[0, 10_000] 0 = off")
    layer: str = setting("adaln", "adaln: noise-conditioned (every method); prenorm: a plain ViT layer (e2e only)",
                         choices=("adaln", "prenorm"))
    gate_recompute: bool = setting(True, "adaLN-zero keeps no more activations than a plain layer (one extra matmul)")
    noise_scale: float = setting(1000.0, "c_noise = ln(sigma)/4 is multiplied by this before the sinusoidal features",
                                 range="(0, inf)")
    label_head: str = setting("plain", "classification's label head: plain (LayerNorm + Linear) or adaln",
                              choices=("plain", "adaln"))
    positions: str = setting("learned", "language models: learned absolute positions or rope (rotary, in attention)",
                             choices=("learned", "rope"))

    def check(self):
        # per layer: attention 4 D^2, MLP 2 r D^2, adaLN 6 D^2 (the stem, head and embeddings are smaller)
        params = self.depth * self.width ** 2 * (4 + 2 * self.mlp_ratio + (6 if self.layer == "adaln" else 0))
        if params > MAX_PARAMS:
            raise ValueError(f"model.depth={self.depth}, model.width={self.width}: about {params:.2g} parameters "
                             f"({4 * params / 1e9:.0f} GB of float32 weights), above the sanity bound of "
                             f"{MAX_PARAMS:.0e}; lower model.depth or model.width")
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be divisible by model.heads={self.heads}")
        if int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio}: too small (the MLP's hidden width is width x "
                             "mlp_ratio, here 0)")


@section("data")
@dataclass
class DataConfig:
    """The dataset (images) or corpus (text) and how it is read."""

    name: str = setting("fashion-mnist", "a built-in name or a path to an .npz (text tasks: a corpus, a .txt or a "
                                         "folder)")
    root: str = setting("", "where to look first (\"\" = the standard places)")
    crop_padding: int = setting(2, "augmentation: random crops of the image padded by this many pixels",
                                range="[0, 1_024]")
    hflip: bool = setting(True, "augmentation: random horizontal flips, where the dataset says flips make sense")
    train_limit: int = setting(0, "use only the first N training images (text: tokens; 0 = all)",
                               range="[0, 1e15] 0 = all")
    test_limit: int = setting(0, "use only the first N test images (text: windows; 0 = all)", range="[0, 1e15] 0 = all")
    val_size: int = setting(0, "hold out N training images as a validation split, which the run then evaluates on "
                               "(text: the first N windows of the corpus's validation split); 0 = none, the test split",
                            range="[0, 1e15] 0 = no validation split")
    tokenizer: str = setting("bytes", "text tasks: bytes, chars, text8 (27 symbols) or bpe", choices=tuple(TOKENIZERS))
    bpe_vocab: int = setting(4096, "text tasks, tokenizer=bpe: the vocabulary size",
                             range="[256, 1_048_576] 256: the byte alphabet")
    tokenizer_file: str = setting("", "text tasks, tokenizer=bpe: a local Hugging Face tokenizer.json to use instead "
                                      "of training one on the corpus (e.g. GPT-2's)")
    seq_len: int = setting(128, "text tasks: tokens per training window and per evaluation window",
                           range="[2, 1_048_576]")

    def check(self):
        if self.tokenizer_file and self.tokenizer != "bpe":
            raise ValueError(f"data.tokenizer_file is a BPE tokenizer's JSON: it needs data.tokenizer=bpe, not "
                             f"{self.tokenizer!r}")


@section("train")
@dataclass
class TrainConfig:
    """The training method, its budget and optimizer, evaluation, and where and how the run executes."""

    method: str = setting("dblocks", "the training method (methods/)")
    steps: int = setting(1000, "end-to-end steps; other methods get the same budget in `budget` units",
                         range="[1, 1e9]")
    budget: str = setting("layer-updates", "layer-updates (the paper's matching) or steps",
                          choices=("layer-updates", "steps"))
    batch_size: int = setting(128, "training batch size", range="[1, 10_000_000]")
    lr: float = setting(1e-3, "AdamW's peak learning rate", range="(0, inf)")
    min_lr_ratio: float = setting(0.1, "the cosine schedule's floor, a fraction of lr",
                                  range="[0, 1] the schedule's floor, a fraction of train.lr")
    warmup: float = setting(0.05, "linear warmup, a fraction of each optimizer's updates",
                            range="[0, 1) a fraction of each optimizer's updates")
    weight_decay: float = setting(0.05, "AdamW's weight decay (parameters of two or more dimensions)", range="[0, inf)")
    beta2: float = setting(0.99, "AdamW's second-moment decay (beta1 is 0.9)", range="[0, 1)")
    clip: float = setting(1.0, "gradient-norm clipping (0 = off)", range="[0, inf) 0 = off")
    ema: float = setting(0.0, "EMA decay of the weights used for evaluation (0 = off)", range="[0, 1) 0 = off")
    seed: int = setting(0, "seeds the weights, the data order and every noise stream", range="[0, 1e18]")
    eval_every: int = setting(0, "layer-updates between evaluations; 0 = 10 evaluations per run",
                              range="[0, 1e15] 0 = ten evaluations per run")
    eval_limit: int = setting(2000, "items of the periodic evaluations (the final one uses all; 0 = all)",
                              range="[0, 1e15] 0 = all")
    eval_batch_size: int = setting(500, "evaluation batch size", range="[1, 10_000_000]")
    log_every: int = setting(20, "steps between log lines", range="[1, 1e15] steps between log lines")
    ckpt_every: int = setting(500, "steps between checkpoints (one is also written at the end and on Ctrl-C)",
                              range="[1, 1e15] steps between checkpoints")
    threads: int = setting(0, "torch threads (0 = $OMP_NUM_THREADS if set, else torch's default capped at the usable "
                              "cores)", range="[0, 1_024] 0 = automatic")
    device: str = setting("cpu", "cpu, cuda, cuda:N, or auto (cuda when available)")
    offload_dir: str = setting("", "residency=active on a CPU: where idle blocks are memory-mapped (\"\" = the run's "
                                   "directory)")
    blocks: str = setting("", "a per-block job: train only these blocks, e.g. 0,2 (\"\" = all)")
    parallel: str = setting("none", "blocks: under torchrun, spread the blocks over the ranks (jobs.py)",
                            choices=("none", "blocks"))
    precision: str = setting("fp32", "a step's forward and loss: fp32, or autocast to bf16 or fp16 (fp16 with a loss "
                                     "scaler per optimizer); weights, optimizer state and EMA stay fp32",
                             choices=("fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile what a step runs (each block's network; an end-to-end model's "
                                   "loss): a one-off compile at the start; on by choice only")

    def check(self):
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"train.device={self.device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'")


@section("blocks")
@dataclass
class BlocksConfig:
    """How the layers are cut into blocks, each owning a part of the noise levels: what every block-wise model
    reads (ignored end to end)."""

    num_blocks: int = setting(3, "B, the blocks the layers are cut into", range="[1, 10_000]")
    partition: str = setting("equiprob", "the noise levels' cut: equal training mass per block (equiprob) or "
                                         "uniform in log sigma", choices=PARTITION_KINDS)
    gamma: float = setting(0.05, "overlap: each block also trains on this fraction of its interval's width (in log "
                                 "sigma; masked diffusion: in t) beyond each edge", range="[0, inf)")
    allocation: str = setting("", "layers per block, e.g. 3,2,2 (\"\" = an even split)")
    shared_stem_head: bool = setting(True, "one stem and head trained by every block (false: each block its own, "
                                           "so blocks train apart: per-block jobs, parallel ranks)")

    def layers_per_block(self) -> list[int] | None:
        """The allocation's layers per block, or None for an even split."""
        return parse_ints(self.allocation, "blocks.allocation", "3,2,2") or None


@section("chain")
@dataclass
class ChainConfig:
    """The label chain (classify, arlm, recurrent): how a block learns to denoise a label's embedding, and the Euler
    chain over it at inference. Its departures from the paper: benchmarks/README.md, "Sampler and training defaults
    for classification"."""

    loss_weight: str = setting("none", "none: plain cross-entropy per sample; edm: w(sigma) x cross-entropy (Eq. 2)",
                               choices=("none", "edm"))
    steps_per_block: int = setting(1, "inference: Euler steps per block", range="[1, 10_000]")
    grid: str = setting("equiprob", "inference grid (noise.Partition.inference_grid)", choices=GRID_KINDS)
    bridge: str = setting("soft", "x0 estimate from logits: soft (softmax @ E), hard (E[argmax]) or unit (soft, at "
                                  "unit norm)", choices=BRIDGES)
    sigma_start: float = setting(0.0, "inference: the grid's first level (0 = sigma_max, the paper)",
                                 range="[0, inf) 0 = sigma_max")
    init: str = setting("zero", "inference starts from z = 0 (zero) or z = sigma_start x eps (noise, the paper)",
                        choices=("zero", "noise"))
    input_flip: float = setting(0.2, "training: fraction of samples whose noised label embedding is a wrong class's",
                                range="[0, 1] a fraction")
    input_mix: float = setting(0.5, "training: fraction of samples whose noised point is a random soft label mixture",
                               range="[0, 1] a fraction")
    input_clean: float = setting(0.0, "training: fraction of samples fed their clean point, un-noised (the kind of "
                                      "point the chain hands a block)", range="[0, 1] a fraction")
    label_table: str = setting("fixed", "the label embedding: a fixed random table, or learned (the paper's; a shared "
                                        "parameter, so it needs a shared stem/head)", choices=("fixed", "learned"))

    def check(self):
        if self.sigma_start and not SIGMA.lo <= self.sigma_start <= SIGMA.hi:
            raise ValueError(f"chain.sigma_start={self.sigma_start}: must be 0 (start at sigma_max) or a noise level "
                             f"the blocks train on, in [{SIGMA.lo:g}, {SIGMA.hi:g}]")


class RunConfig:
    """A run's settings: its task's name and one instance of every registered section (cfg.train.lr, cfg.gen.steps)."""

    model: BackboneConfig
    data: DataConfig
    train: TrainConfig
    blocks: BlocksConfig
    chain: ChainConfig

    def __init__(self, task: str = "classify", **sections):
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise TypeError(f"unknown config section(s) {sorted(unknown)}")
        self.task = task
        for name, cls in SECTIONS.items():
            setattr(self, name, sections[name] if name in sections else cls())

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}

    def to_dict(self) -> dict:
        return {"task": self.task, **{name: dataclasses.asdict(s) for name, s in self.sections().items()}}

    def __eq__(self, other) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"RunConfig({self.to_dict()})"

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """A config from its dict (config.json, of this version or an earlier one: ALIASES): a setting missing from
        an older run's file takes its default; a malformed dict is a ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a config is an object of sections ({', '.join(SECTIONS)}), not a {type(d).__name__}")
        missing = [s for s in REQUIRED if s not in d]
        if missing:
            raise ValueError(f"the config has no {' or '.join(map(repr, missing))} section: a run's config.json has "
                             f"{', '.join(REQUIRED)} (is it a run's config.json, written whole?)")
        if "plugins" in d:  # where the run's task, method and sections came from, when outside the package
            if not isinstance(d["plugins"], list):
                raise ValueError(f"plugins={d['plugins']!r}: expected a list of plug-in origins")
            registry.require(d["plugins"])
        known = set(SECTIONS) | {key.split(".")[0] for key in ALIASES}
        cfg = cls()
        for name, values in d.items():
            if name == "plugins":
                continue
            if name == "task":
                if not isinstance(values, str):
                    raise ValueError(f"task={values!r}: expected a task name")
                cfg.task = values
                continue
            if name not in known:
                raise ValueError(f"unknown config section {name!r}; sections: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"config section {name!r} is a {type(values).__name__}, not an object of settings")
            for key, value in values.items():
                set_value(cfg, f"{name}.{key}", value)
        return cfg


REQUIRED = ("task", "model", "data", "train", "dblocks")  # in every config.json ever written; the rest default

# the key names of earlier versions (config.json files, command lines) -> today's
ALIASES = {
    "dblocks.num_blocks": "blocks.num_blocks", "dblocks.partition": "blocks.partition", "dblocks.gamma": "blocks.gamma",
    "dblocks.allocation": "blocks.allocation", "dblocks.shared_stem_head": "blocks.shared_stem_head",
    "dblocks.loss_weight": "chain.loss_weight", "dblocks.steps_per_block": "chain.steps_per_block",
    "dblocks.grid": "chain.grid", "dblocks.bridge": "chain.bridge", "dblocks.sigma_start": "chain.sigma_start",
    "dblocks.init": "chain.init", "dblocks.input_flip": "chain.input_flip", "dblocks.input_mix": "chain.input_mix",
    "dblocks.input_clean": "chain.input_clean", "dblocks.label_table": "chain.label_table",
    "baseline.ff_theta": "ff.theta", "baseline.ff_readout": "ff.readout", "baseline.ff_neutral": "ff.neutral",
    "baseline.aux_pool": "dgl.aux_pool", "baseline.noprop_eta": "noprop.eta",
    "baseline.noprop_label_table": "noprop.label_table", "baseline.noprop_label_scale": "noprop.label_scale",
    "baseline.dtp_inverse_noise": "dtp.inverse_noise", "baseline.dtp_target_step": "dtp.target_step",
}


def construct(cls: type, cfg: RunConfig, **given):
    """cls(**given), each of its parameters named after a section given that section of `cfg`: a model names the
    settings it reads (a method's classifier, built by a task that does not know which)."""
    names = inspect.signature(cls).parameters
    return cls(**{name: getattr(cfg, name) for name in names if name in SECTIONS}, **given)


def _coerce(value: Any, typ: type, key: str):
    bad = ValueError(f"{key}={repr(value)[:40]} is not a valid {typ.__name__}")
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        if typ is bool:
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise bad
            return text in ("true", "1", "yes")
        try:  # an int may be written "1e3" or "2.0"; validate bounds it
            value = int(text) if typ is int and not any(c in text for c in ".e") else float(text)
        except ValueError:
            raise bad from None
    if isinstance(value, bool) and typ is not bool:
        raise bad
    if typ is float and isinstance(value, int):
        if abs(value) > 1e308:  # float() would overflow
            raise bad
        return float(value)
    if typ is int and isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise bad
        return int(value)
    if not isinstance(value, typ):
        raise bad
    return value


@functools.cache
def field_types(section: type) -> dict[str, Any]:
    """A config section's field types, its string annotations resolved once (get_type_hints evaluates every one anew
    on each call, the cost of most of a config's loading)."""
    return get_type_hints(section)


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    """Set a dotted key such as "train.lr" (or its earlier name, ALIASES), converting strings to the field's type."""
    key = ALIASES.get(key, key)
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ValueError(f"unknown config key {key!r}; keys look like SECTION.NAME with SECTION one of "
                         f"{sorted(SECTIONS)}")
    section = getattr(cfg, parts[0])
    hints = field_types(type(section))
    if parts[1] not in hints:
        raise ValueError(f"unknown config key {key!r}; {parts[0]} has: {', '.join(sorted(hints))}")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], key))


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value)
    return cfg


def _range_error(key: str, value, typ: type, spec: str) -> str | None:
    """Why `value` lies outside the range `spec` (setting's), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if typ is float else int):
        return f"{key}={value!r}: must be {'a number' if typ is float else 'an integer'}"
    end = min(i for i in (spec.find("]"), spec.find(")")) if i >= 0)
    interval, note = spec[:end + 1], spec[end + 1:].strip()
    low, high = (float(v) for v in interval[1:-1].split(","))
    if (low <= value if spec[0] == "[" else low < value) and (value <= high if spec[end] == "]" else value < high):
        return None
    if high < math.inf:
        want = f"in {interval}"
    else:  # no upper bound: finite, and above the lower one if any
        want = "a finite number" + ("" if low == -math.inf else f" {'>=' if spec[0] == '[' else '>'} {low:g}")
    shown = f"{value:.3g}" if typ is int and abs(value) >= 10**15 else value
    sanity = typ is int and value > high
    return (f"{key}={shown}: must be {want}" + (f" ({note})" if note else "")
            + ("; larger values are refused as a sanity bound, far beyond any real run" if sanity else ""))


def validate(cfg: RunConfig) -> RunConfig:
    """Check values that types alone do not catch, section by section: each field's range or choices, then the
    section's own `check()` of its fields together; raises ValueError naming the key."""
    for name, values in cfg.sections().items():
        hints = field_types(type(values))
        for f in dataclasses.fields(values):
            key, value, meta = f"{name}.{f.name}", getattr(values, f.name), f.metadata
            if meta.get("range") and (error := _range_error(key, value, hints[f.name], meta["range"])):
                raise ValueError(error)
            if meta.get("choices") and value not in meta["choices"]:
                *first, last = map(repr, meta["choices"])
                raise ValueError(f"{key}={value!r}: expected {', '.join(first)} or {last}")
        if hasattr(values, "check"):
            values.check()
    return cfg


def parse_ints(text: str, what: str, example: str = "0,2") -> list[int]:
    """'0, 2,3' -> [0, 2, 3] ('' -> []); a ValueError naming `what` (a key or an option) otherwise."""
    text = text.strip()
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated integers, e.g. {example}") from None


def load_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()


def plugin_origins(cfg: RunConfig) -> list[dict]:
    """Where the run's task, method and config sections come from when outside the package (registry.origin)."""
    named = [registry.KINDS[kind][1].get(name) for kind, name in (("TASK", cfg.task), ("METHOD", cfg.train.method))
             if kind in registry.KINDS]
    return registry.origins([c for c in named if c is not None] + list(SECTIONS.values()))


def save_config(cfg: RunConfig) -> str:
    """config.json's text: the settings, and the outside plug-ins they need (so other processes load them)."""
    plugins = plugin_origins(cfg)
    return json.dumps({**cfg.to_dict(), **({"plugins": plugins} if plugins else {})}, indent=2) + "\n"


# settings that may differ between the jobs of one model (where and how a job runs, not what it trains)
JOB_LOCAL = {"train": ("blocks", "parallel", "device", "threads", "offload_dir", "log_every", "ckpt_every",
                       "eval_every", "eval_limit", "eval_batch_size")}


def model_identity(cfg: RunConfig) -> dict:
    """What must agree between the per-block jobs of one model: everything but the job-local settings."""
    d = cfg.to_dict()
    for name, keys in JOB_LOCAL.items():
        for k in keys:
            d[name].pop(k, None)
    return d


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(model_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]
