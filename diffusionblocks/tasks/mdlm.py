"""Masked-diffusion language modelling (MD4, Shi et al. 2024), end to end and as DiffusionBlocks (paper App. D;
METHOD.md sections 3 and 7).

Forward process: each token of a window is kept with probability alpha(t), else replaced by [MASK] (an extra
id, V). alpha is noise.MaskLevels' schedule (linear 1 - t, or cosine cos(pi t / 2)) with MD4's shift,
alpha(t) = (1 - 2 eps) a(t) + eps, so that 1 - alpha stays in [eps, 1 - eps]: the weight below stays finite at
t = 0 and p(z_1) needs no infinitely unlikely event. (MD4's own "cosine" is 1 - cos(pi (1 - t) / 2); ours is
the MaskLevels one.)

The bound, in nats per window of n tokens (continuous time):
    -log p(x) <= E_t~U[0,1][ (-alpha'(t) / (1 - alpha(t))) * sum over masked i of CE(f(z_t, t)_i, x_i) ]
                 + n eps ln V        (reconstruction: a token still masked at t = 0, eps of them, costs ln V)
                 + n eps ln V        (prior: KL(q(z_1 | x) || p(z_1)) with p(z_1) masking each token with
                                      probability 1 - eps, else a uniform token; MD4 counts this term as 0)
The weight is 1/t for the linear schedule as eps -> 0. We draw t uniformly in the mass of a(t) (the training
mass of MaskLevels, which the block partition cuts into equal parts), i.e. t ~ p(t) = |a'(t)|; then
w(t) / p(t) = (1 - 2 eps) / (1 - alpha(t)) for either schedule, and that is the per-sample weight (for the
linear schedule p is uniform and this is MD4's weight). Training draws t antithetically across the batch
(t_j from (u + j / N) mod 1 in the mass, u uniform). Padding is never masked and never scored, and hidden from
attention. Training loss: nats per token of the first term (the constants do not train anything).

DiffusionBlocks: MaskLevels' equal-mass partition, block 0 owning the most masked end (t near 1); overlap
gamma widens block b's interval [lo, hi] to [lo - gamma (hi - lo), hi + gamma (hi - lo)] in t, clamped to
[0, 1]. Each block trains alone on t drawn (antithetically) in its widened interval. The model of B blocks is
still one model: evaluation draws K stratified t per window over the whole of [0, 1] and routes each t to the
block that owns it, so e2e and DiffusionBlocks are scored by the same bound.

Sampling is ancestral over a descending grid 1 = t_0 > ... > t_S = 0, equally spaced in mass: at each step a
masked token is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), its value drawn from the softmax;
the last step reveals every token still masked (MD4's decode). Each step is one call of the block that owns t.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import BlockStack, StackModel
from ..config import BackboneConfig, BlocksConfig, DataConfig, RunConfig, TrainConfig, preset, section, setting
from ..measure import interleaved_seconds
from ..models import TokenHead, TokenStem, lm_layers
from ..noise import MaskLevels, Partition
from ..precond import PlainPrecond
from .base import evaluating
from .lm import TEXT_OPTIONS, LMTask, TextData, token_ce
from .optional import Option, at_least, pick, speedup_note


def masked_ce(logits: torch.Tensor, x: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Sum over the scored positions of the cross-entropy: logits (N, T, V), x (N, T), scored (N, T) -> (N,)."""
    return (token_ce(logits, x) * scored).sum(1)


@section("mdlm")
@dataclass
class MDLMConfig:
    """Masked-diffusion language modelling (task=mdlm, MD4): the schedule, the bound's estimator, sampling."""

    schedule: str = setting("linear", "alpha(t): linear 1 - t, or cosine cos(pi t / 2) (noise.MaskLevels)",
                            choices=("linear", "cosine"))
    eps: float = setting(1e-4, "MD4's shift: alpha = (1 - 2 eps) alpha(t) + eps, so 0 < 1 - alpha < 1 at both ends",
                         range="(0, 0.5)")
    eval_t: int = setting(4, "K: stratified masking times per held-out window in the bound", range="[1, 10_000]")
    sample_steps: int = setting(128, "ancestral sampling steps (a multiple of B gives every block as many)",
                                range="[1, 1_000_000]")


class MaskedDiffusionLM(StackModel, nn.Module):
    """A masked-diffusion LM as B blocks over the masking time t (num_blocks=1: end to end, MD4 itself)."""

    def __init__(self, model: BackboneConfig, blocks: BlocksConfig, mdlm: MDLMConfig, vocab_size: int, seq_len: int,
                 num_blocks: int | None = None):
        super().__init__()
        m, B = model, blocks.num_blocks if num_blocks is None else num_blocks
        self.vocab_size, self.mask_id, self.seq_len = vocab_size, vocab_size, seq_len
        self.eps, self.eval_t, self.sample_steps = mdlm.eps, mdlm.eval_t, mdlm.sample_steps
        self.partition = Partition.create(MaskLevels(mdlm.schedule), B, kind=blocks.partition,
                                          gamma=blocks.gamma if B > 1 else 0.0)
        shared = blocks.shared_stem_head or B == 1
        stem = TokenStem(vocab_size + 1, seq_len, m.width, noise_scale=m.noise_scale,
                         learned_positions=m.positions == "learned")
        self.stack = BlockStack(
            lm_layers(m), stem, TokenHead(stem.embed, m.width, vocab_size), self.partition,
            allocation=blocks.layers_per_block() if B > 1 else None, shared_stem_head=shared, precond=PlainPrecond(),
            checkpoint_every=m.checkpoint)
        if not shared:  # BlockStack deep-copies stem and head apart: tie each block's head to its own stem again
            for blk in self.stack.blocks:
                blk.head.embed = blk.stem.embed

    # -- the forward process and the bound ------------------------------------------------------------

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t, MD4-shifted (float64)."""
        return (1 - 2 * self.eps) * self.partition.levels.alpha(t) + self.eps

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """(-alpha'(t) / (1 - alpha(t))) / p(t) for t drawn uniformly in the mass: (1 - 2 eps) / (1 - alpha(t))."""
        return (1 - 2 * self.eps) / (1 - self.alpha(t))

    def constant(self, n_tokens: torch.Tensor | int) -> torch.Tensor | float:
        """Reconstruction + prior terms of the bound, nats: 2 n eps ln V."""
        return 2 * self.eps * math.log(self.vocab_size) * n_tokens

    def corrupt(self, x: torch.Tensor, t: torch.Tensor, pad: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t: each token kept with probability alpha(t), else [MASK]; padding always kept. Returns (z, masked),
        both (N, T); masked marks the positions the bound scores."""
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        keep = u < self.alpha(t).to(x.device)[:, None]
        if pad is not None:
            keep = keep | pad
        return torch.where(keep, x, torch.full_like(x, self.mask_id)), ~keep

    def training_times(self, block: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n masking times in the block's widened interval, uniform in its mass, antithetic: the j-th at mass
        fraction (u + j / n) mod 1 of the interval. float64 (n,)."""
        levels = self.partition.levels
        lo, hi = self.partition.training_interval(block)
        m_lo, m_hi = (levels.cdf(torch.tensor(v, dtype=torch.float64)) for v in (lo, hi))
        u = torch.rand((), generator=generator, dtype=torch.float64).cpu()
        frac = (u + torch.arange(n, dtype=torch.float64) / n) % 1.0
        return levels.icdf(m_lo + frac * (m_hi - m_lo)).clamp(lo, hi)

    def block_loss(self, block: int, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Nats per token (N,) of the bound's diffusion term on `block`'s own masking times; no other block runs."""
        t = self.training_times(block, x.shape[0], generator)
        z, masked = self.corrupt(x, t, None, generator)
        logits = self.stack.denoise(block, z, t.to(x.device))
        return self.weight(t).to(x.device, torch.float32) * masked_ce(logits, x, masked) / x.shape[1]

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """End to end: the one block over all of [0, 1]."""
        return self.block_loss(0, x)

    def sequence_nats(self, x: torch.Tensor, pad: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      eval_t: int | None = None) -> torch.Tensor:
        """The bound on -log p(window) in nats, (N,) float64: K = eval_t stratified times per window (the k-th
        uniform in the k-th K-th of the mass), each run by the block that owns it."""
        K = eval_t or self.eval_t
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"eval_t={K!r}: expected an integer >= 1")
        levels = self.partition.levels
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for k in range(K):
            t = levels.icdf((k + torch.rand(x.shape[0], generator=generator, dtype=torch.float64).cpu()) / K)
            z, masked = self.corrupt(x, t, pad, generator)
            logits = self.stack(z, t.to(x.device), pad)  # routed: each t to its owning block
            total += self.weight(t) * masked_ce(logits, x, masked).double().cpu() / K
        n = torch.full_like(total, x.shape[1]) if pad is None else (~pad).sum(1).double().cpu()
        return total + self.constant(n)

    # -- sampling ---------------------------------------------------------------------------------------

    def grid(self, steps: int) -> torch.Tensor:
        """`steps` + 1 descending times from 1 to 0, equally spaced in mass (the same for every partition; with
        steps a multiple of B every block gets steps / B of them, the first on its upper edge)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        return Partition.create(self.partition.levels, 1, gamma=0.0).inference_grid(steps, "cdf")

    @torch.no_grad()
    def sample(self, num: int, length: int, prompt: torch.Tensor | None = None, *, steps: int | None = None,
               generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """`num` windows of `length` tokens (N, length), the first positions fixed to `prompt` (never masked)."""
        if length > self.seq_len:
            raise ValueError(f"--length {length}: a masked-diffusion sample is one window, at most {self.seq_len} "
                             f"tokens (data.seq_len)")
        grid = self.grid(steps or self.sample_steps)
        z = torch.full((num, length), self.mask_id, dtype=torch.long, device=device)
        if prompt is not None and len(prompt):
            z[:, :len(prompt)] = prompt.to(device)
        with evaluating(self):
            for i in range(len(grid) - 1):
                t, s = grid[i:i + 2]
                masked = z == self.mask_id
                logits = self.stack(z, torch.full((num,), t.item(), dtype=torch.float64, device=device))
                probs = logits.float().softmax(-1).flatten(0, 1).cpu()
                drawn = torch.multinomial(probs, 1, generator=generator).view(num, length).to(device)
                a_t, a_s = self.alpha(t), self.alpha(s)
                p = 1.0 if i == len(grid) - 2 else ((a_s - a_t) / (1 - a_t)).item()  # the last step reveals all
                reveal = torch.rand((num, length), generator=generator).to(device) < p
                z = torch.where(masked & reveal, drawn, z)
        return z


class MDLMTask(LMTask):
    """Masked-diffusion language modelling, scored by the bound in bits per character; compared against an
    autoregressive model of the same size on the same data (the `arlm` arm: exact bits per character, a floor)."""

    name = "mdlm"
    paper_gap = "paper, text8: 1.45 - 1.56 = -0.11"
    # "arlm": another task's end-to-end model (compare.py), the autoregressive floor
    compare_roles = ("e2e", "e2e-steps", "control", "dblocks", "arlm")
    presets = {"full": "lm-cpu", "quick": "lm-quick", "offline": "lm-cpu", "offline-quick": "lm-quick"}
    eval_options = ("limit", Option("eval_t", at_least(1), "stratified masking times per window in the bound (default "
                                                           "mdlm.eval_t)"))
    sample_options = (*TEXT_OPTIONS, Option("steps", at_least(1), "sampling steps (default mdlm.sample_steps)",
                                                          flag_name="sample_steps"))

    def build_model(self, cfg: RunConfig, data: TextData, form: str) -> nn.Module:
        return MaskedDiffusionLM(cfg.model, cfg.blocks, cfg.mdlm, data.vocab_size, cfg.data.seq_len,
                                 num_blocks=1 if form == "end-to-end" else None)

    def _plan_extra_bytes(self, cfg: RunConfig, shapes, model: nn.Module, element: int) -> int:
        """The masking time's embedding (sinusoidal features, the MLP's hidden before and after SiLU, c), which
        positions are scored (bool) and the per-sample weight (float32); the same end to end and per block."""
        N, T, D = cfg.train.batch_size, cfg.data.seq_len, cfg.model.width
        return N * (256 + 3 * D) * element + N * T + 4 * N

    def estimator(self, model, options: dict) -> dict:
        if not isinstance(model, MaskedDiffusionLM):  # compare scores the autoregressive arm through this task
            return {}
        return {"eval_t": options.get("eval_t") or model.eval_t}  # K: the bound's stratified times per window

    def _how(self, ev: dict) -> str:
        return f" (an upper bound, {ev['eval_t']} stratified t per window)" if "eval_t" in ev else ""

    def compare_extras(self, arms, base: RunConfig, out) -> tuple[dict, list[str]]:
        """The autoregressive floor (the arm of another task) beside each masked-diffusion arm, and sampling time at
        equal steps."""
        extras, lines = {}, []
        floor_arm = next((arm for arm in arms.values() if arm.task != self.name), None)
        if floor_arm is not None:
            floor = statistics.mean(floor_arm.values)
            gaps = {role: statistics.mean(arm.values) - floor for role, arm in arms.items() if arm is not floor_arm}
            extras["gap_to_autoregressive"] = gaps
            lines.append(f"autoregressive floor (exact, same size, data and budget): {floor:.4f} bits per character; "
                         "masked diffusion above it (a bound): "
                         + ", ".join(f"{role} +{gap:.4f}" for role, gap in gaps.items()))
        e2e, blocks = pick(arms, "end-to-end"), pick(arms, "blocks")
        if e2e is not None and blocks is not None:
            steps = base.mdlm.sample_steps
            device = blocks.device  # sampling is timed where the arms trained
            models = {arm.role: arm.load(device) for arm in (e2e, blocks)}
            speed = interleaved_seconds({role: lambda i, m=model: m.sample(8, base.data.seq_len, steps=steps,
                                                                           generator=torch.Generator().manual_seed(i),
                                                                           device=device)
                                         for role, model in models.items()}, repeats=3)
            ratio = speed[e2e.role] / speed[blocks.role]
            B = blocks.runs[0]["num_blocks"]
            extras.update(sampling_seconds_per_batch_of_8=speed, sampling_speedup=ratio,
                          sampling_speedup_above_ideal=ratio > B)
            lines.append(f"sampling {base.data.seq_len} tokens in {steps} steps: DiffusionBlocks (B={B}) is "
                         f"{ratio:.2f}x faster than end-to-end {speedup_note(ratio, B)}; seconds per batch of 8: "
                         + ", ".join(f"{role} {seconds:.3f}" for role, seconds in speed.items()))
        return extras, lines


TASK = MDLMTask


@preset("lm-tiny")
def preset_lm_tiny() -> RunConfig:
    """Seconds on a CPU (tests, smoke runs): masked diffusion, 2 layers of width 32, B = 2, windows of 32 tokens of
    Shakespeare in the text8 alphabet; evaluated on the first 16 test windows, K = 2."""
    cfg = RunConfig(task="mdlm")
    cfg.data = DataConfig(name="shakespeare", tokenizer="text8", seq_len=32, test_limit=16)
    cfg.model = BackboneConfig(depth=2, width=32, heads=2, mlp_ratio=2.0, positions="rope")
    cfg.blocks.num_blocks = 2
    cfg.train = TrainConfig(steps=30, batch_size=16, lr=3e-3, weight_decay=0.03, eval_limit=8, eval_batch_size=64,
                            log_every=10, ckpt_every=1000)
    cfg.mdlm = MDLMConfig(eval_t=2, sample_steps=8)
    return cfg


@preset("lm-cpu")
def preset_lm_cpu() -> RunConfig:
    """The language compare on a 2-core CPU (`compare --task mdlm`: five arms, about 23 minutes for one seed):
    Shakespeare in the text8 alphabet, windows of 128, 6 layers of width 192 (3 heads, MLP x2, rotary positions),
    B = 3, gamma 0.05, 320 end-to-end steps of 32 windows (1.3M tokens, a third of an epoch of the 4.1M training
    characters), AdamW 1e-3 (benchmarks/lm_settings.py). The bound on the whole test split
    (2,029 windows) with K = 2; sampling timed at 126 steps."""
    cfg = RunConfig(task="mdlm")
    cfg.data = DataConfig(name="shakespeare", tokenizer="text8", seq_len=128)
    cfg.model = BackboneConfig(depth=6, width=192, heads=3, mlp_ratio=2.0, positions="rope")
    cfg.blocks.num_blocks, cfg.blocks.gamma = 3, 0.05
    cfg.train = TrainConfig(steps=320, batch_size=32, lr=1e-3, weight_decay=0.03, eval_limit=64, eval_batch_size=64,
                            log_every=20, ckpt_every=500)
    cfg.mdlm = MDLMConfig(eval_t=2, sample_steps=126)
    return cfg


@preset("lm-quick")
def preset_lm_quick() -> RunConfig:
    """About a minute for the five arms of the language compare (a smoke run): the CPU preset on 12 steps, scored
    on the first 64 test windows, sampling time at 12 steps."""
    cfg = preset_lm_cpu()
    cfg.train.steps = 12
    cfg.train.eval_limit = 16
    cfg.data.test_limit = 64
    cfg.mdlm.sample_steps = 12
    return cfg


@preset("lm-text8")
def preset_lm_text8() -> RunConfig:
    """The paper's masked-diffusion setting for a GPU (Table 3): text8, windows of 256, 12 layers of width 768 with
    12 heads, batch 256, AdamW 3e-4 with weight decay 0.03 and 2k warm-up steps, B = 3, gamma 0.05. The steps
    are 100 epochs of text8's 90M training characters (the paper's budget); set train.steps for a shorter run
    (the warm-up is a fraction of the steps: set train.warmup = 2000 / steps to keep 2k)."""
    cfg = RunConfig(task="mdlm")
    cfg.data = DataConfig(name="text8", tokenizer="text8", seq_len=256)
    cfg.model = BackboneConfig(depth=12, width=768, heads=12, mlp_ratio=4.0, positions="rope")
    cfg.blocks.num_blocks, cfg.blocks.gamma = 3, 0.05
    steps = 100 * 90_000_000 // (256 * 256)
    cfg.train = TrainConfig(steps=steps, batch_size=256, lr=3e-4, weight_decay=0.03, warmup=2000 / steps,
                            eval_limit=512, eval_batch_size=256, ckpt_every=2000, device="auto")
    cfg.mdlm = MDLMConfig(eval_t=4, sample_steps=255)
    return cfg
