"""Typed run configuration: dataclasses, named presets, and dotted command-line overrides.

A run is described by one :class:`RunConfig`; ``train.lr=1e-3`` style overrides are type-checked and
unknown keys are rejected. The resolved config is saved with every run. `validate` checks values; which
task and method names exist is the registries' business (tasks/, methods/; run.validate checks both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from .noise import GRID_KINDS, LogNormalLevels
from .precond import BRIDGES
from .text import TOKENIZERS


@dataclass
class ModelConfig:
    """A ViT: patch embedding, `depth` pre-norm adaLN-zero transformer layers, a classifier readout."""

    depth: int = 6
    width: int = 128
    heads: int = 4
    patch: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    label_dim: int = 0  # dimension of the diffused label embedding; 0 = width
    checkpoint: int = 0  # activation checkpointing: recompute each group of this many layers (0 = off)
    layer: str = "adaln"  # "adaln" (noise-conditioned, both methods) or "prenorm" (a plain ViT layer; e2e only)
    gate_recompute: bool = True  # adaLN-zero keeps no more activations than a plain layer (one extra matmul)
    noise_scale: float = 1000.0  # c_noise = ln(sigma)/4 is multiplied by this before the sinusoidal features
    label_head: str = "plain"  # classification's label head: "plain" (LayerNorm + Linear) or "adaln"
    positions: str = "learned"  # language models: "learned" absolute positions or "rope" (rotary, in attention)


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # a built-in name or a path to an .npz (text tasks: a corpus, a .txt or a folder)
    root: str = ""  # where to look first ("" = the standard places)
    crop_padding: int = 2
    hflip: bool = True  # only where the dataset says flips make sense
    train_limit: int = 0  # use only the first N training images (0 = all)
    test_limit: int = 0
    # hold out N training images as a validation split (0 = none). Runs with one evaluate on it only (curves
    # and results); the test split is for `eval --split test`, once a setting is chosen. Text tasks: evaluate
    # on the first N windows of the corpus's own validation split (train_limit: tokens; test_limit: windows)
    val_size: int = 0
    tokenizer: str = "bytes"  # text tasks: "bytes", "chars", "text8" (27 symbols) or "bpe"
    bpe_vocab: int = 4096  # text tasks, tokenizer=bpe: vocabulary size
    tokenizer_file: str = ""  # text tasks, tokenizer=bpe: a Hugging Face tokenizer.json to use instead of training
    # one on the corpus (e.g. GPT-2's, as a local file; nothing is downloaded)
    seq_len: int = 128  # text tasks: tokens per training window and per evaluation window


@dataclass
class DBlocksConfig:
    """The DiffusionBlocks settings (ignored by e2e)."""

    num_blocks: int = 3
    partition: str = "equiprob"  # or "uniform-log"
    gamma: float = 0.05
    allocation: str = ""  # explicit layers per block, e.g. "3,2,2"; "" = even split
    shared_stem_head: bool = True
    block_choice: str = "random"  # "random" (the paper), "round-robin", or "sequential" (block 0's whole
    # budget, then block 1's, ...: each block is loaded once; with a shared stem/head, see train.DBlocks)
    residency: str = "all"  # "all" blocks on the device, or only the "active" one (idle blocks offloaded)
    loss_weight: str = "none"  # "none": plain CE per sample; "edm": w(sigma) * CE (Eq. 2). See benchmarks/README
    steps_per_block: int = 1  # inference Euler steps per block
    grid: str = "equiprob"  # inference grid: "equiprob", "cdf" or "karras" (noise.Partition.inference_grid)
    bridge: str = "soft"  # x0 estimate from logits: "soft" (softmax @ E), "hard" (E[argmax]) or "unit" (soft, at
    # unit norm)
    sigma_start: float = 0.0  # first level of the inference grid (0 = sigma_max, the paper)
    init: str = "zero"  # inference starts from z = 0 ("zero") or z = sigma_start * eps ("noise", the paper)
    input_flip: float = 0.2  # training: fraction of samples whose noised label embedding is a wrong class's
    input_mix: float = 0.5  # training: fraction of samples whose noised point is a random soft label mixture
    input_clean: float = 0.0  # training: fraction of samples fed their clean point, un-noised (the chain's kind)
    label_table: str = "fixed"  # the class-label embedding: a "fixed" random table, or "learned" (the paper's;
    # a shared parameter, so it needs a shared stem/head)


@dataclass
class TrainConfig:
    method: str = "dblocks"
    steps: int = 1000  # end-to-end steps; other methods get the same budget in `budget` units
    budget: str = "layer-updates"  # "layer-updates" (the paper's matching) or "steps"
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # fraction of each optimizer's updates
    weight_decay: float = 0.05
    beta2: float = 0.99  # AdamW's second-moment decay (beta1 is 0.9)
    clip: float = 1.0  # gradient-norm clipping (0 = off)
    ema: float = 0.0  # EMA decay of the weights used for evaluation (0 = off)
    seed: int = 0
    eval_every: int = 0  # in layer-updates; 0 = 10 evaluations per run
    eval_limit: int = 2000  # test images for the periodic evaluations (the final one uses all)
    eval_batch_size: int = 500
    log_every: int = 20
    ckpt_every: int = 500  # steps; a checkpoint is also written at the end and on Ctrl-C
    threads: int = 0  # torch threads (0 = torch's default)
    device: str = "cpu"  # "cpu", "cuda", "cuda:N", or "auto" (cuda when available)
    offload_dir: str = ""  # residency=active on a CPU: where idle blocks are memory-mapped ("" = the run's dir)
    blocks: str = ""  # dblocks: train only these blocks, e.g. "0,2" (a per-block job; "" = all)
    parallel: str = "none"  # "blocks": under torchrun, spread the blocks over the ranks (jobs.py)


@dataclass
class GenConfig:
    """Image generation (task=imagegen): EDM settings and the sampler used by eval/compare."""

    conditional: bool = True  # class-conditional, with a null class for classifier-free guidance
    label_dropout: float = 0.1  # training: fraction of labels replaced by the null class
    sigma_data: float = 0.5  # EDM's data scale (images are in [-1, 1])
    steps: int = 18  # sampling steps (a multiple of B gives every block the same number)
    sampler: str = "euler"  # "euler" or "heun"
    grid: str = "equiprob"  # "equiprob" (each block's levels), "cdf" (whatever the partition) or "karras"
    cfg_scale: float = 1.0  # classifier-free guidance scale at sampling (1 = none)
    fd_samples: int = 1000  # generated images for the Frechet distance


@dataclass
class MDLMConfig:
    """Masked-diffusion language modelling (task=mdlm, MD4): the schedule, the bound's estimator, sampling."""

    schedule: str = "linear"  # alpha(t): "linear" 1 - t, or "cosine" cos(pi t / 2) (noise.MaskLevels)
    eps: float = 1e-4  # MD4's shift: alpha = (1 - 2 eps) alpha(t) + eps, so 0 < 1 - alpha < 1 at both ends
    eval_t: int = 4  # K: stratified masking times per held-out window in the bound
    sample_steps: int = 128  # ancestral sampling steps (a multiple of B gives every block as many)


@dataclass
class ARLMConfig:
    """Autoregressive language modelling as DiffusionBlocks (task=arlm, train.method=dblocks; paper App. E.4): how
    the noise level reaches the denoiser, and the evaluation's and the sampler's own settings. The Euler chain's
    settings are dblocks.* (steps_per_block, grid, bridge, init, loss_weight), as for classification."""

    noise_level: str = "window"  # "window": one sigma per window, given to every layer by adaLN (the paper's
    # conditioning; the clean stream then depends on sigma: one key/value cache per Euler step); "token": every
    # noisy token its own sigma, embedded into its input (the clean stream never sees sigma: one cache per block;
    # 9 points of validation accuracy below "window" on lm-ar-cpu, benchmarks/README.md)
    sigma_max_share: float = 0.0  # training: this fraction of the noisiest block's noise levels set to sigma_max,
    # where every chain starts (the truncated log-normal puts well under 1% of block 0's levels above sigma = 10);
    # only that block's own training changes. 0: the paper
    eval_draws: int = 4  # M: chains per token in the chain cross-entropy (with dblocks.init=zero the chain is
    # deterministic and one draw is used)
    temperature: float = 1.0  # sampling: the last step's softmax temperature (0: greedy)


@dataclass
class RecurrentConfig:
    """Recurrent depth (task=recurrent; Huginn, Geiping et al. 2025; paper Sec. 5.5): prelude layers, a core of
    tied layers applied r times, coda layers. End to end (Huginn's training) r is drawn per step from
    Poisson(LogNormal(ln mean_recurrence - sigma^2 / 2, sigma)) + 1 and backpropagation runs through the last
    backprop_depth iterations only; DiffusionBlocks trains the same network as one denoiser in a single pass and
    reads the recurrences as Euler steps at inference (docs/METHOD.md section 8)."""

    prelude: int = 1  # layers before the core
    core: int = 2  # layers of the core (one set of weights, applied r times)
    coda: int = 1  # layers after the core
    mean_recurrence: int = 8  # r_bar: the mean of the log-normal rate (Huginn: 32; E[r] = r_bar + 1)
    recurrence_sigma: float = 0.5  # the log-normal's standard deviation (Huginn: 0.5)
    backprop_depth: int = 4  # k: iterations that carry gradients, the last k (Huginn: 8)
    state_std: float = 1.0  # end to end: the random initial state's standard deviation
    eval_recurrences: int = 0  # recurrences at evaluation and sampling, for both forms (0 = mean_recurrence)
    dblocks_epochs: float = 3.0  # compare: the DiffusionBlocks arm's steps as a multiple of the end-to-end arm's
    # (the paper's protocol: 15 epochs against Huginn's 5)

    def recurrences(self) -> int:
        return self.eval_recurrences or self.mean_recurrence


@dataclass
class BaselineConfig:
    """The block-wise baselines DiffusionBlocks is compared against (train.method=ff, greedy, dgl, noprop, dtp;
    image classification). Each reads only its own settings; the blocks of greedy, dgl and noprop are
    dblocks.num_blocks (dblocks.allocation), the same cut as DiffusionBlocks."""

    ff_theta: float = 0.5  # Forward-Forward: the goodness threshold (goodness = mean squared activation; 1 for a
    # fresh layer on its normalised input). Chosen on validation (benchmarks/README.md, baselines): 2 was 16 points
    # lower, 4 was 27 lower, 1 within a point
    ff_readout: bool = True  # Forward-Forward: also train a linear readout on the frozen features (neutral label)
    ff_neutral: str = "own"  # Forward-Forward: the readout's neutral label token: "own" (a row of the label table
    # that no goodness loss sees) or "mean" (the mean of the class rows: Hinton's neutral label, 1/C of each class)
    aux_pool: str = "mean"  # greedy/dgl: the auxiliary head's pooling over tokens ("mean" or "cls")
    noprop_eta: float = 0.1  # NoProp-DT: the weight eta of the denoising terms
    noprop_label_table: str = "learned"  # NoProp-DT: the class embedding ("learned" jointly, or "fixed")
    noprop_label_scale: str = "unit-variance"  # NoProp-DT: the class embedding's initial rows: "unit-variance"
    # (each coordinate N(0, 1), |u_y| about sqrt(D), the VP noise's per-coordinate scale) or "unit-norm" (|u_y| = 1,
    # a one-hot label's length)
    dtp_inverse_noise: float = 0.1  # DTP: std of the noise that trains each approximate inverse
    dtp_target_step: float = 0.3  # DTP: the step size of the top target (h_top - step * dLoss/dh_top); chosen on
    # validation (benchmarks/README.md, baselines): 0.1 was 4 points lower, 0.3 to 10 within a point


# The range of every numeric setting, checked by `validate`: an interval ("[" "]" closed, "(" ")" open; inf = no
# bound, so the value must be finite) and an optional note. The upper bounds of counts and sizes are sanity bounds
# far above any real run: an unbounded value would allocate or loop without end instead of failing.
RANGES = {
    "model.depth": "[1, 10_000]", "model.width": "[1, 65_536]", "model.heads": "[1, 65_536]",
    "model.patch": "[1, 4_096]", "model.mlp_ratio": "(0, 64] the MLP's hidden width is width x mlp_ratio",
    "model.dropout": "[0, 1)", "model.label_dim": "[0, 65_536] 0 = width", "model.checkpoint": "[0, 10_000] 0 = off",
    "model.noise_scale": "(0, inf)",
    "data.crop_padding": "[0, 1_024]", "data.train_limit": "[0, 1e15] 0 = all", "data.test_limit": "[0, 1e15] 0 = all",
    "data.val_size": "[0, 1e15] 0 = no validation split", "data.bpe_vocab": "[256, 1_048_576] 256: the byte alphabet",
    "data.seq_len": "[2, 1_048_576]",
    "dblocks.num_blocks": "[1, 10_000]", "dblocks.gamma": "[0, inf)", "dblocks.steps_per_block": "[1, 10_000]",
    "dblocks.sigma_start": "[0, inf) 0 = sigma_max", "dblocks.input_flip": "[0, 1] a fraction",
    "dblocks.input_mix": "[0, 1] a fraction", "dblocks.input_clean": "[0, 1] a fraction",
    "train.steps": "[1, 1e9]", "train.batch_size": "[1, 10_000_000]", "train.lr": "(0, inf)",
    "train.min_lr_ratio": "[0, 1] the schedule's floor, a fraction of train.lr",
    "train.warmup": "[0, 1) a fraction of each optimizer's updates", "train.weight_decay": "[0, inf)",
    "train.beta2": "[0, 1)", "train.clip": "[0, inf) 0 = off", "train.ema": "[0, 1) 0 = off",
    "train.seed": "[0, 1e18]", "train.eval_every": "[0, 1e15] 0 = ten evaluations per run",
    "train.eval_limit": "[0, 1e15] 0 = all", "train.eval_batch_size": "[1, 10_000_000]",
    "train.log_every": "[1, 1e15] steps between log lines", "train.ckpt_every": "[1, 1e15] steps between checkpoints",
    "train.threads": "[0, 1_024] 0 = torch's default",
    "gen.label_dropout": "[0, 1)", "gen.sigma_data": "(0, inf)", "gen.steps": "[1, 100_000]",
    "gen.cfg_scale": "(-inf, inf)", "gen.fd_samples": "[2, 10_000_000] a Frechet distance needs 2",
    "mdlm.eps": "(0, 0.5)", "mdlm.eval_t": "[1, 10_000]", "mdlm.sample_steps": "[1, 1_000_000]",
    "arlm.sigma_max_share": "[0, 1]", "arlm.eval_draws": "[1, 10_000]", "arlm.temperature": "[0, inf) 0 = greedy",
    "recurrent.prelude": "[0, 10_000]", "recurrent.core": "[1, 10_000]", "recurrent.coda": "[0, 10_000]",
    "recurrent.mean_recurrence": "[1, 10_000]", "recurrent.recurrence_sigma": "[0, 10)",
    "recurrent.backprop_depth": "[1, 10_000]", "recurrent.state_std": "[0, inf)",
    "recurrent.eval_recurrences": "[0, 10_000] 0 = the mean", "recurrent.dblocks_epochs": "(0, 1000)",
    "baseline.ff_theta": "(-inf, inf)", "baseline.noprop_eta": "[0, inf)", "baseline.dtp_inverse_noise": "[0, inf)",
    "baseline.dtp_target_step": "(0, inf)",
}
MAX_PARAMS = 10**11  # a sanity bound on the model's estimated parameters (400 GB of float32 weights)
SIGMA = LogNormalLevels()  # the noise levels a classifier's blocks train on (dblocks.sigma_start lies among them)
REQUIRED = ("task", "model", "data", "train", "dblocks")  # in every config.json ever written; later sections default


@dataclass
class RunConfig:
    task: str = "classify"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dblocks: DBlocksConfig = field(default_factory=DBlocksConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    mdlm: MDLMConfig = field(default_factory=MDLMConfig)
    arlm: ARLMConfig = field(default_factory=ARLMConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """A config from its dict (config.json): a setting missing from an older run's file takes its default; a
        malformed dict is a ValueError naming what is wrong."""
        sections = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict):
            raise ValueError(f"a config is an object of sections ({', '.join(sections)}), not a {type(d).__name__}")
        missing = [s for s in REQUIRED if s not in d]
        if missing:
            raise ValueError(f"the config has no {' or '.join(map(repr, missing))} section: a run's config.json has "
                             f"{', '.join(REQUIRED)} (is it a run's config.json, written whole?)")
        cfg = cls()
        for section, values in d.items():
            if section == "task":
                if not isinstance(values, str):
                    raise ValueError(f"task={values!r}: expected a task name")
                cfg.task = values
                continue
            if section not in sections:
                raise ValueError(f"unknown config section {section!r}; sections: {', '.join(sections)}")
            if not isinstance(values, dict):
                raise ValueError(f"config section {section!r} is a {type(values).__name__}, not an object of settings")
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value)
        return cfg


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


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    """Set a dotted key such as "train.lr", converting strings to the field's type."""
    parts = key.split(".")
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    if len(parts) != 2 or parts[0] not in sections:
        raise ValueError(f"unknown config key {key!r}; keys look like SECTION.NAME with SECTION one of "
                         f"{sorted(sections)}")
    section = getattr(cfg, parts[0])
    hints = get_type_hints(type(section))
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


def _numbers(cfg: RunConfig):
    """(dotted key, value, type) of every int and float setting."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if dataclasses.is_dataclass(values):
            for name, typ in get_type_hints(type(values)).items():
                if typ in (int, float):
                    yield f"{section.name}.{name}", getattr(values, name), typ


def _range_error(key: str, value, typ: type) -> str | None:
    """Why `value` lies outside RANGES[key], or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if typ is float else int):
        return f"{key}={value!r}: must be {'a number' if typ is float else 'an integer'}"
    spec = RANGES[key]
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
    """Check values that types alone do not catch; raises ValueError naming the key."""
    for key, value, typ in _numbers(cfg):
        error = _range_error(key, value, typ)
        if error:
            raise ValueError(error)
    t, d, m, b = cfg.train, cfg.dblocks, cfg.model, cfg.baseline
    params = m.depth * m.width ** 2 * (4 + 2 * m.mlp_ratio + (6 if m.layer == "adaln" else 0))  # per layer:
    # attention 4 D^2, MLP 2 r D^2, adaLN 6 D^2 (the stem, head and embeddings are smaller)
    checks = [
        (params <= MAX_PARAMS, f"model.depth={m.depth}, model.width={m.width}: about {params:.2g} parameters "
                               f"({4 * params / 1e9:.0f} GB of float32 weights), above the sanity bound of "
                               f"{MAX_PARAMS:.0e}; lower model.depth or model.width"),
        (cfg.gen.sampler in ("euler", "heun"), f"gen.sampler={cfg.gen.sampler!r}: expected 'euler' or 'heun'"),
        (cfg.gen.grid in GRID_KINDS, f"gen.grid={cfg.gen.grid!r}: expected one of {', '.join(GRID_KINDS)}"),
        (t.budget in ("layer-updates", "steps"), f"train.budget={t.budget!r}: expected 'layer-updates' or 'steps'"),
        (m.width % m.heads == 0, f"model.width={m.width} must be divisible by model.heads={m.heads}"),
        (int(m.width * m.mlp_ratio) >= 1,
         f"model.mlp_ratio={m.mlp_ratio}: too small (the MLP's hidden width is width x mlp_ratio, here 0)"),
        (m.layer in ("adaln", "prenorm"), f"model.layer={m.layer!r}: expected 'adaln' or 'prenorm'"),
        (m.label_head in ("plain", "adaln"), f"model.label_head={m.label_head!r}: expected 'plain' or 'adaln'"),
        (m.positions in ("learned", "rope"), f"model.positions={m.positions!r}: expected 'learned' or 'rope'"),
        (d.block_choice in ("random", "round-robin", "sequential"),
         f"dblocks.block_choice={d.block_choice!r}: expected 'random', 'round-robin' or 'sequential'"),
        (d.residency in ("all", "active"), f"dblocks.residency={d.residency!r}: expected 'all' or 'active'"),
        (t.parallel in ("none", "blocks"), f"train.parallel={t.parallel!r}: expected 'none' or 'blocks'"),
        (t.device == "auto" or t.device.split(":")[0] in ("cpu", "cuda"),
         f"train.device={t.device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'"),
        (d.loss_weight in ("edm", "none"), f"dblocks.loss_weight={d.loss_weight!r}: expected 'edm' or 'none'"),
        (d.bridge in BRIDGES, f"dblocks.bridge={d.bridge!r}: expected one of {', '.join(BRIDGES)}"),
        (d.init in ("noise", "zero"), f"dblocks.init={d.init!r}: expected 'noise' or 'zero'"),
        (d.label_table in ("fixed", "learned"),
         f"dblocks.label_table={d.label_table!r}: expected 'fixed' or 'learned'"),
        (d.sigma_start == 0 or SIGMA.lo <= d.sigma_start <= SIGMA.hi,
         f"dblocks.sigma_start={d.sigma_start}: must be 0 (start at sigma_max) or a noise level the blocks train on, "
         f"in [{SIGMA.lo:g}, {SIGMA.hi:g}]"),
        (cfg.data.tokenizer in TOKENIZERS,
         f"data.tokenizer={cfg.data.tokenizer!r}: expected one of {', '.join(TOKENIZERS)}"),
        (not cfg.data.tokenizer_file or cfg.data.tokenizer == "bpe",
         f"data.tokenizer_file is a BPE tokenizer's JSON: it needs data.tokenizer=bpe, not {cfg.data.tokenizer!r}"),
        (cfg.mdlm.schedule in ("linear", "cosine"),
         f"mdlm.schedule={cfg.mdlm.schedule!r}: expected 'linear' or 'cosine'"),
        (cfg.arlm.noise_level in ("token", "window"),
         f"arlm.noise_level={cfg.arlm.noise_level!r}: expected 'token' or 'window'"),
        (b.aux_pool in ("mean", "cls"), f"baseline.aux_pool={b.aux_pool!r}: expected 'mean' or 'cls'"),
        (b.noprop_label_table in ("learned", "fixed"),
         f"baseline.noprop_label_table={b.noprop_label_table!r}: expected 'learned' or 'fixed'"),
        (b.noprop_label_scale in ("unit-variance", "unit-norm"),
         f"baseline.noprop_label_scale={b.noprop_label_scale!r}: expected 'unit-variance' or 'unit-norm'"),
        (b.ff_neutral in ("own", "mean"), f"baseline.ff_neutral={b.ff_neutral!r}: expected 'own' or 'mean'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
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


def allocation_of(cfg: RunConfig) -> list[int] | None:
    return parse_ints(cfg.dblocks.allocation, "dblocks.allocation", "3,2,2") or None


# -- presets: named functions returning a config ---------------------------------------------


def preset_tiny() -> RunConfig:
    """Seconds on a CPU: digits, a 4-layer width-32 ViT. For tests and smoke runs."""
    cfg = RunConfig()
    cfg.data = DataConfig(name="digits", crop_padding=0, hflip=False)
    cfg.model = ModelConfig(depth=4, width=32, heads=2, patch=2, mlp_ratio=2.0)
    cfg.dblocks.num_blocks = 2
    cfg.train = TrainConfig(steps=150, batch_size=64, lr=3e-3, eval_limit=360, log_every=10, ckpt_every=1000)
    return cfg


def preset_fashion() -> RunConfig:
    """The compare preset, about 15 minutes for its three arms on 2 CPU cores (14 min 44 s measured on a fresh
    machine): Fashion-MNIST, a 6-layer ViT of width 96 with 7x7 patches (16 tokens), 2500 end-to-end steps
    of batch 128 (5.3 epochs).
    Sized by measurement (benchmarks/README.md): at width 128 / patch 4 the same 10 minutes buy only
    about 1.3 epochs."""
    cfg = RunConfig()
    cfg.model = ModelConfig(depth=6, width=96, heads=4, patch=7, mlp_ratio=2.0)
    cfg.train.lr = 2e-3
    cfg.train.steps = 2500
    return cfg


def preset_quick() -> RunConfig:
    """About one minute for the three arms: the fashion preset on a tenth of the steps."""
    cfg = preset_fashion()
    cfg.train.steps = 250
    cfg.train.eval_limit = 1000
    return cfg


def preset_digits() -> RunConfig:
    """The compare preset where Fashion-MNIST is missing: scikit-learn digits (8x8)."""
    cfg = preset_tiny()
    cfg.model = ModelConfig(depth=6, width=64, heads=4, patch=2, mlp_ratio=2.0)
    cfg.dblocks.num_blocks = 3
    cfg.train.steps = 600
    return cfg


def preset_digits_quick() -> RunConfig:
    cfg = preset_digits()
    cfg.train.steps = 100
    return cfg


def preset_vit12() -> RunConfig:
    """The memory benchmark's model: Fashion-MNIST, a 12-layer ViT of width 128 with 4x4 patches (50
    tokens), batch 128. B = 2, 3, 4, 6 split it evenly."""
    cfg = RunConfig()
    cfg.model = ModelConfig(depth=12, width=128, heads=4, patch=4, mlp_ratio=2.0)
    return cfg


def preset_vit_s() -> RunConfig:
    """A larger ViT for a GPU: 12 layers of width 384, 6 heads, 4x4 patches on Fashion-MNIST."""
    cfg = preset_vit12()
    cfg.model = ModelConfig(depth=12, width=384, heads=6, patch=4, mlp_ratio=4.0)
    cfg.train.device = "auto"
    return cfg


def preset_gen_tiny() -> RunConfig:
    """Seconds on a CPU: class-conditional DiT on digits (8x8, 2x2 patches), 4 layers of width 32, B = 2."""
    cfg = preset_tiny()
    cfg.task = "imagegen"
    cfg.data.crop_padding = 0
    cfg.train.lr = 2e-3
    cfg.gen.steps = 8
    cfg.gen.fd_samples = 360
    return cfg


def preset_gen_fashion() -> RunConfig:
    """Fashion-MNIST DiT: 6 layers of width 128, 4x4 patches (49 tokens), B = 3, no augmentation."""
    cfg = RunConfig(task="imagegen")
    cfg.model = ModelConfig(depth=6, width=128, heads=4, patch=4, mlp_ratio=2.0)
    cfg.data.crop_padding = 0
    cfg.data.hflip = False
    cfg.train.lr = 1e-3
    cfg.train.steps = 2000
    cfg.train.eval_limit = 500
    return cfg


def preset_gen_dit_s() -> RunConfig:
    """DiT-S/2-like for a GPU: CIFAR-10 (32x32x3, 2x2 patches: 256 tokens), 12 layers of width 384, 6 heads."""
    cfg = preset_gen_fashion()
    cfg.data = DataConfig(name="cifar10", crop_padding=0, hflip=True)
    cfg.model = ModelConfig(depth=12, width=384, heads=6, patch=2, mlp_ratio=4.0)
    cfg.train.lr, cfg.train.steps, cfg.train.ema, cfg.train.device = 2e-4, 100_000, 0.9999, "auto"
    return cfg


def preset_gen_quick() -> RunConfig:
    """A few minutes: the Fashion-MNIST DiT on a tenth of the steps, FD over 500 samples."""
    cfg = preset_gen_fashion()
    cfg.train.steps = 200
    cfg.gen.fd_samples = 500
    return cfg


def preset_lm_tiny() -> RunConfig:
    """Seconds on a CPU (tests, smoke runs): masked diffusion, 2 layers of width 32, B = 2, windows of 32 tokens of
    Shakespeare in the text8 alphabet; evaluated on the first 16 test windows, K = 2."""
    cfg = RunConfig(task="mdlm")
    cfg.data = DataConfig(name="shakespeare", tokenizer="text8", seq_len=32, test_limit=16)
    cfg.model = ModelConfig(depth=2, width=32, heads=2, mlp_ratio=2.0, positions="rope")
    cfg.dblocks.num_blocks = 2
    cfg.train = TrainConfig(steps=30, batch_size=16, lr=3e-3, weight_decay=0.03, eval_limit=8, eval_batch_size=64,
                            log_every=10, ckpt_every=1000)
    cfg.mdlm = MDLMConfig(eval_t=2, sample_steps=8)
    return cfg


def preset_lm_cpu() -> RunConfig:
    """The language compare on a 2-core CPU (`compare --task mdlm`: four arms, 13 min 25 s measured for one seed on
    2026-12-01): Shakespeare in the text8 alphabet, windows of 128, 6 layers of width 192 (3 heads, MLP x2,
    rotary positions), B = 3, gamma 0.05, 320 end-to-end steps of 32 windows (1.3M tokens, a third of an epoch
    of the 4.1M training characters), AdamW 1e-3 (chosen on validation: benchmarks/lm_settings.py). The bound on
    the whole test split (2,029 windows) with K = 2; sampling timed at 126 steps."""
    cfg = RunConfig(task="mdlm")
    cfg.data = DataConfig(name="shakespeare", tokenizer="text8", seq_len=128)
    cfg.model = ModelConfig(depth=6, width=192, heads=3, mlp_ratio=2.0, positions="rope")
    cfg.dblocks.num_blocks, cfg.dblocks.gamma = 3, 0.05
    cfg.train = TrainConfig(steps=320, batch_size=32, lr=1e-3, weight_decay=0.03, eval_limit=64, eval_batch_size=64,
                            log_every=20, ckpt_every=500)
    cfg.mdlm = MDLMConfig(eval_t=2, sample_steps=126)
    return cfg


def preset_lm_quick() -> RunConfig:
    """Under a minute for the four arms of the language compare (a smoke run): the CPU preset on 12 steps, scored
    on the first 64 test windows, sampling time at 12 steps."""
    cfg = preset_lm_cpu()
    cfg.train.steps = 12
    cfg.train.eval_limit = 16
    cfg.data.test_limit = 64
    cfg.mdlm.sample_steps = 12
    return cfg


def preset_lm_text8() -> RunConfig:
    """The paper's masked-diffusion setting for a GPU (Table 3): text8, windows of 256, 12 layers of width 768 with
    12 heads, batch 256, AdamW 3e-4 with weight decay 0.03 and 2k warm-up steps, B = 3, gamma 0.05. The steps
    are 100 epochs of text8's 90M training characters (the paper's budget); set train.steps for a shorter run
    (the warm-up is a fraction of the steps: set train.warmup = 2000 / steps to keep 2k)."""
    cfg = RunConfig(task="mdlm")
    cfg.data = DataConfig(name="text8", tokenizer="text8", seq_len=256)
    cfg.model = ModelConfig(depth=12, width=768, heads=12, mlp_ratio=4.0, positions="rope")
    cfg.dblocks.num_blocks, cfg.dblocks.gamma = 3, 0.05
    steps = 100 * 90_000_000 // (256 * 256)
    cfg.train = TrainConfig(steps=steps, batch_size=256, lr=3e-4, weight_decay=0.03, warmup=2000 / steps,
                            eval_limit=512, eval_batch_size=256, ckpt_every=2000, device="auto")
    cfg.mdlm = MDLMConfig(eval_t=4, sample_steps=255)
    return cfg


def preset_lm_ar_cpu() -> RunConfig:
    """The autoregressive compare on a 2-core CPU (`compare --task arlm`: e2e, the 2-layer control, DiffusionBlocks):
    lm-cpu's data, model and budget (Shakespeare in the text8 alphabet, windows of 128, 6 layers of width 192,
    320 end-to-end steps of 32 windows, AdamW 1e-3) with B = 3 and the paper's text overlap gamma 0.1; scored on
    the first 512 test windows (of 2,029)."""
    cfg = preset_lm_cpu()
    cfg.task = "arlm"
    cfg.dblocks.gamma = 0.1
    cfg.dblocks.input_flip = cfg.dblocks.input_mix = 0.0  # classification's departures: not measured for text
    cfg.data.test_limit = 512
    return cfg


def preset_lm_ar_quick() -> RunConfig:
    """Under a minute for the three arms of the autoregressive compare (a smoke run): 12 steps, windows of 64 (the
    samples and the generation timing are one window long), 64 test windows."""
    cfg = preset_lm_ar_cpu()
    cfg.data.seq_len = 64
    cfg.train.steps = 12
    cfg.train.eval_limit = 16
    cfg.data.test_limit = 64
    return cfg


def preset_lm_ar_lm1b() -> RunConfig:
    """The paper's autoregressive setting for a GPU (App. E.4): LM1B (through HF `datasets`), windows of 256, 12
    layers of width 768 with 12 heads, B = 4, gamma 0.1, AdamW 3e-4, batch 256. The tokenizer is a BPE of 8,192
    symbols trained on the corpus (data.bpe_vocab), or a local tokenizer.json (data.tokenizer_file=PATH, e.g. GPT-2's
    for OpenWebText). Set train.steps for the budget you have."""
    cfg = RunConfig(task="arlm")
    cfg.data = DataConfig(name="lm1b", tokenizer="bpe", bpe_vocab=8192, seq_len=256)
    cfg.model = ModelConfig(depth=12, width=768, heads=12, mlp_ratio=4.0, positions="rope")
    cfg.dblocks.num_blocks, cfg.dblocks.gamma = 4, 0.1
    cfg.dblocks.input_flip = cfg.dblocks.input_mix = 0.0
    cfg.train = TrainConfig(steps=100_000, batch_size=256, lr=3e-4, weight_decay=0.03, warmup=0.02, eval_limit=512,
                            eval_batch_size=128, ckpt_every=2000, device="auto")
    return cfg


def _one_denoiser(cfg: RunConfig) -> None:
    """Recurrent depth's DiffusionBlocks: one block over the whole range of sigma (the core is tied), no overlap to
    widen; classification's training-input departures off (not measured for text)."""
    cfg.dblocks.num_blocks, cfg.dblocks.gamma = 1, 0.0
    cfg.dblocks.input_flip = cfg.dblocks.input_mix = 0.0


def preset_recurrent_cpu() -> RunConfig:
    """Recurrent depth on a 2-core CPU (`compare --task recurrent`: Huginn's training against DiffusionBlocks'
    single pass): Shakespeare in the text8 alphabet, windows of 128, prelude 1 / core 2 / coda 1 layers of width
    128 (4 heads, MLP x2, rotary positions), r_bar 8 (E[r] = 9), backpropagation through the last 4 iterations,
    batch 32, AdamW 1e-3 (lm-cpu's, chosen on validation there); the end-to-end arm trains 500 steps (2M tokens,
    half an epoch), DiffusionBlocks and the plain control 3 times as many (the paper's 5 vs 15 epochs). Scored at 8
    recurrences on the first 512 test windows."""
    cfg = RunConfig(task="recurrent")
    cfg.data = DataConfig(name="shakespeare", tokenizer="text8", seq_len=128, test_limit=512)
    cfg.model = ModelConfig(depth=4, width=128, heads=4, mlp_ratio=2.0, positions="rope")
    cfg.recurrent = RecurrentConfig(prelude=1, core=2, coda=1, mean_recurrence=8, backprop_depth=4)
    _one_denoiser(cfg)
    cfg.train = TrainConfig(steps=500, batch_size=32, lr=1e-3, weight_decay=0.03, eval_limit=64, eval_batch_size=64,
                            log_every=20, ckpt_every=500)
    return cfg


def preset_recurrent_quick() -> RunConfig:
    """Under a minute for the three arms of the recurrent-depth compare (a smoke run): 10 end-to-end steps (30 for
    DiffusionBlocks and the control), windows of 64, 32 test windows, evaluated and sampled at 4 recurrences."""
    cfg = preset_recurrent_cpu()
    cfg.data.seq_len, cfg.data.test_limit = 64, 32
    cfg.train.steps, cfg.train.eval_limit = 10, 16
    cfg.recurrent.eval_recurrences = 4
    return cfg


def preset_recurrent_lm1b() -> RunConfig:
    """The paper's recurrent-depth setting for a GPU (Sec. 5.5, App. E.5): prelude 2 / core 4 / coda 2 layers of
    width 512 with 8 heads, r_bar 32, backpropagation through the last 8 iterations, LM1B (through HF `datasets`,
    a BPE of 8,192 symbols or data.tokenizer_file) in windows of 256, batch 256, AdamW 3e-4. train.steps is a
    placeholder for 5 epochs: set it from your corpus's token count (DiffusionBlocks trains 3 times as many)."""
    cfg = RunConfig(task="recurrent")
    cfg.data = DataConfig(name="lm1b", tokenizer="bpe", bpe_vocab=8192, seq_len=256)
    cfg.model = ModelConfig(depth=8, width=512, heads=8, mlp_ratio=4.0, positions="rope")
    cfg.recurrent = RecurrentConfig(prelude=2, core=4, coda=2, mean_recurrence=32, backprop_depth=8)
    _one_denoiser(cfg)
    cfg.train = TrainConfig(steps=50_000, batch_size=256, lr=3e-4, weight_decay=0.03, warmup=0.02, eval_limit=512,
                            eval_batch_size=128, ckpt_every=2000, device="auto")
    return cfg


PRESETS = {"tiny": preset_tiny, "fashion": preset_fashion, "quick": preset_quick, "digits": preset_digits,
           "digits-quick": preset_digits_quick, "vit12": preset_vit12, "vit-s": preset_vit_s,
           "gen-tiny": preset_gen_tiny, "gen-fashion": preset_gen_fashion, "gen-quick": preset_gen_quick,
           "gen-dit-s": preset_gen_dit_s, "lm-tiny": preset_lm_tiny, "lm-cpu": preset_lm_cpu,
           "lm-quick": preset_lm_quick, "lm-text8": preset_lm_text8, "lm-ar-cpu": preset_lm_ar_cpu,
           "lm-ar-quick": preset_lm_ar_quick, "lm-ar-lm1b": preset_lm_ar_lm1b,
           "recurrent-cpu": preset_recurrent_cpu, "recurrent-quick": preset_recurrent_quick,
           "recurrent-lm1b": preset_recurrent_lm1b}


def load_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()


def save_config(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2) + "\n"


# settings that may differ between the jobs of one model (where and how a job runs, not what it trains)
JOB_LOCAL = {"train": ("blocks", "parallel", "device", "threads", "offload_dir", "log_every", "ckpt_every",
                       "eval_every", "eval_limit", "eval_batch_size")}


def model_identity(cfg: RunConfig) -> dict:
    """What must agree between the per-block jobs of one model: everything but the job-local settings."""
    d = cfg.to_dict()
    for section, keys in JOB_LOCAL.items():
        for k in keys:
            d[section].pop(k, None)
    return d


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(model_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]
