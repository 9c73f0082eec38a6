"""Autoregressive language modelling, end to end and as DiffusionBlocks (docs/METHOD.md section 7).

End to end: a causal transformer of the same layers, sizes and data as the masked-diffusion model, scored by its
exact likelihood (the floor of `compare --task mdlm`). Each window is modelled on its own, like masked
diffusion's: position i reads [BOS] followed by x_<i (causal attention; [BOS] is an extra id, V) and predicts x_i,
so every token of a held-out window is scored, the first with no context. -log p(window) = sum over its tokens of
the cross-entropy, exactly; padding is never scored (and, being at the end of a window, never seen by a real
token).

DiffusionBlocks (ARDiffusionLM): B denoisers of the next token's normalised embedding over a noisy and a clean
copy of the window; it has no likelihood, so it is scored by next-token accuracy (the headline both forms share)
and its own labelled estimators. Both forms generate with a key/value cache.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import io
from ..blocks import BlockStack, StackModel
from ..config import (
    BackboneConfig,
    BlocksConfig,
    ChainConfig,
    DataConfig,
    RunConfig,
    TrainConfig,
    load_preset,
    preset,
    section,
    setting,
)
from ..measure import interleaved_seconds
from ..models import NoisyCleanStem, NoisyHead, TokenHead, TokenStem, lm_layers
from ..nn import KVCache, run_layers
from ..noise import LogNormalLevels, Partition
from ..precond import ClassEmbedding, EDMPrecond, label_target
from ..sample import euler_step
from .base import check_label_table, evaluating
from .lm import LN2, TEXT_OPTIONS, LMTask, TextData, load_text, token_ce
from .optional import Option, finite, pick


@section("arlm")
@dataclass
class ARLMConfig:
    """Autoregressive language modelling as DiffusionBlocks (task=arlm; paper App. E.4): how the noise level reaches
    the denoiser, and the evaluation's and the sampler's own settings. The Euler chain's are chain.*, as for
    classification."""

    noise_level: str = setting("window", "window: one sigma per window, given to every layer by adaLN (the paper's; "
                                         "one key/value cache per Euler step); token: every noisy token its own sigma, "
                                         "embedded into its input (one cache per block; benchmarks/README.md)",
                               choices=("window", "token"))
    sigma_max_share: float = setting(0.0, "training: this fraction of the noisiest block's levels set to sigma_max, "
                                          "where every chain starts (0: the paper)", range="[0, 1]")
    eval_draws: int = setting(4, "M: chains per token in the chain cross-entropy (one when the chain is "
                                 "deterministic, chain.init=zero)", range="[1, 10_000]")
    temperature: float = setting(1.0, "sampling: the last step's softmax temperature (0: greedy)",
                                 range="[0, inf) 0 = greedy")


class AutoregressiveLM(nn.Module):
    """A causal transformer LM over windows of seq_len tokens, tied input and output embeddings."""

    def __init__(self, model: BackboneConfig, vocab_size: int, seq_len: int):
        super().__init__()
        self.vocab_size, self.bos, self.seq_len = vocab_size, vocab_size, seq_len
        self.num_layers, self.checkpoint_every = model.depth, model.checkpoint
        self.stem = TokenStem(vocab_size + 1, seq_len, model.width, causal=True, conditioned=False,
                              learned_positions=model.positions == "learned")
        self.layers = nn.ModuleList(lm_layers(model))
        self.head = TokenHead(self.stem.embed, model.width, vocab_size)

    def logits(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (N, T) -> logits (N, T, V); position i reads [BOS] + x_<i. (No randomness: `generator` is for models
        that draw, e.g. a recurrent-depth model's initial state.)"""
        inputs = torch.cat([torch.full_like(x[:, :1], self.bos), x[:, :-1]], dim=1)
        h, c = self.stem(inputs)
        return self.head(run_layers(self.layers, h, c, self.checkpoint_every), c)

    def token_nats(self, x: torch.Tensor) -> torch.Tensor:
        """-log p(x_i | x_<i), (N, T)."""
        return token_ce(self.logits(x), x)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Nats per token (N,)."""
        return self.token_nats(x).mean(1)

    def sequence_nats(self, x: torch.Tensor, pad: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """-log p(window) in nats, (N,) float64, exact; padding not scored."""
        nats = self.token_nats(x).double()
        if pad is not None:
            nats = nats * ~pad
        return nats.sum(1).cpu()

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (N, C, V) of `tokens` (N, C) read after the cache's tokens; the cache then holds them too."""
        h, c = self.stem.decode(tokens, cache)
        h = run_layers(self.layers, h, c)
        cache.advance()
        return self.head(h, c)

    @torch.no_grad()
    def sample(self, num: int, length: int, prompt: torch.Tensor | None = None, *, temperature: float = 1.0,
               generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """`num` continuations of `prompt` to `length` tokens (N, length), one token per forward pass of the new
        token, the earlier ones' keys and values cached. Past one window the model reads the last seq_len - 1
        tokens after [BOS], a window as in training, recomputed for every token. Temperature 0: greedy."""
        out, start = prefilled(num, length, prompt, device)
        bos = torch.full((num, 1), self.bos, dtype=torch.long, device=device)
        cache = None
        with evaluating(self):
            for n in range(start, length):
                if n >= self.seq_len:  # a sliding window: its positions move, so nothing cached is valid
                    cache, new = KVCache(), torch.cat([bos, out[:, n - self.seq_len + 1:n]], dim=1)
                elif cache is None:
                    cache, new = KVCache(), torch.cat([bos, out[:, :n]], dim=1)
                else:
                    new = out[:, n - 1:n]
                logits = self.decode(new, cache)[:, -1]
                out[:, n:n + 1] = draw(logits, temperature, generator).to(device)
        return out


def prefilled(num: int, length: int, prompt: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    """The (num, length) token buffer a sampler fills in place (never grown: linear in length) with `prompt` in its
    first positions, and the prompt's length."""
    start = len(prompt) if prompt is not None else 0
    out = torch.empty(num, max(length, start), dtype=torch.long, device=device)
    if start:
        out[:, :start] = prompt.to(device)
    return out, start


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """A token per row of logits (N, V) -> (N, 1): the argmax at temperature 0, else drawn from
    softmax(logits / temperature) (on the CPU, so a seeded generator gives the same text on any device)."""
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature {temperature!r}: expected a finite number >= 0 (0: greedy)")
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = (logits.float() / temperature).softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator)


class NextTokenChain:
    """The Euler chain over the next token's embedding, shared by the models that denoise it (ARDiffusionLM here,
    RecurrentDiffusionLM in tasks/recurrent.py), and the statistics it is scored by. A model sets `partition`,
    `labels` (a ClassEmbedding: the fixed table of unit rows the targets and the bridge use), `chain_cfg` (its
    ChainConfig: grid, bridge, init), `steps_per_block` and `eval_draws`, and implements `context(x)` (what every
    step reads of the clean windows x, computed once per chain) and `step_logits(block, z, sigma, context)` (the
    logits (N, T, V) of one denoiser call at level sigma)."""

    def steps(self, steps_per_block: int | None = None, grid: str | None = None) -> list[tuple[float, float, int]]:
        """The chain's (sigma, sigma_next, block) steps, from sigma_max down to 0."""
        g = self.partition.inference_grid(steps_per_block or self.steps_per_block, grid or self.chain_cfg.grid)
        return [(g[k].item(), g[k + 1].item(), int(self.partition.route(g[k]))) for k in range(len(g) - 1)]

    def start(self, shape, sigma_max: float, init: str | None, generator, device) -> torch.Tensor:
        init = init or self.chain_cfg.init
        if init not in ("zero", "noise"):
            raise ValueError(f"init={init!r}: expected 'zero' or 'noise'")
        if init == "zero":
            return torch.zeros(shape, device=device)
        return sigma_max * torch.randn(shape, generator=generator).to(device)

    def bridge(self, logits: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """The x0 estimate from logits (ClassEmbedding.estimate): softmax(logits) @ e_hat ("soft"), e_hat[argmax]
        ("hard") or the soft one at unit norm ("unit"), from the same normalised rows as the training targets."""
        return self.labels.estimate(logits, kind or self.chain_cfg.bridge)

    def chain(self, x: torch.Tensor, generator: torch.Generator | None = None, *, steps_per_block: int | None = None,
              grid: str | None = None, bridge: str | None = None, init: str | None = None, record=None):
        """The chain run at every position of windows x (N, T) at once (the clean stream reads the true text):
        the last step's logits (N, T, V), float32. record(k, sigma, logits, estimate) sees every step."""
        steps, context = self.steps(steps_per_block, grid), self.context(x)
        z = self.start((*x.shape, self.labels.table.shape[1]), steps[0][0], init, generator, x.device)
        for k, (s, s_next, block) in enumerate(steps):
            logits = self.step_logits(block, z, s, context).float()
            estimate = self.bridge(logits, bridge)
            if record is not None:
                record(k, s, logits, estimate)
            z = euler_step(z, estimate, s, s_next)
        return logits

    def draws(self, init: str | None = None, draws: int | None = None) -> int:
        """M, the chains per token of the chain cross-entropy: one when the chain is deterministic (init zero)."""
        return 1 if (init or self.chain_cfg.init) == "zero" else (draws or self.eval_draws)

    @torch.no_grad()
    def window_stats(self, x: torch.Tensor, pad: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     draws: int | None = None, **options) -> dict[str, torch.Tensor]:
        """Sums over the scored tokens of windows x (N, T) (padding not scored): the cross-entropy at sigma_max
        (block 0 once, from pure noise); the chain cross-entropy -log((1/M) sum_m p_m(x_i)) over M chains; the
        greedy hits of the last step's argmax (per chain, summed over chains) and after every step; the last
        step's top-1 probability and entropy (and the top-1 probability at temperature 2), and the bridge's norm
        ||estimate|| after every step. `tokens`: how many were scored."""
        scored = torch.ones_like(x, dtype=torch.bool) if pad is None else ~pad
        w = scored.float()
        s_max = self.partition.levels.hi
        noise = self.start((*x.shape, self.labels.table.shape[1]), s_max, "noise", generator, x.device)
        first = self.step_logits(0, noise, s_max, self.context(x))
        out = {"ce_sigma_max": (token_ce(first, x) * w).sum().double(), "tokens": w.sum().double()}
        M = self.draws(options.get("init"), draws)
        prob = 0.0
        steps = len(self.steps(options.get("steps_per_block"), options.get("grid")))
        per_step = {"hits_per_step": torch.zeros(steps, dtype=torch.float64),
                    "bridge_norm_per_step": torch.zeros(steps, dtype=torch.float64)}

        def record(k, s, logits, estimate):
            per_step["hits_per_step"][k] += ((logits.argmax(-1) == x).float() * w).sum().double().cpu() / M
            per_step["bridge_norm_per_step"][k] += (estimate.norm(dim=-1) * w).sum().double().cpu() / M

        hits = top1 = top1_t2 = entropy = 0.0
        for _ in range(M):
            logits = self.chain(x, generator, record=record, **options)
            logp = logits.log_softmax(-1)
            prob = prob + logp.gather(-1, x[..., None]).squeeze(-1).exp().double()
            hits += ((logits.argmax(-1) == x).float() * w).sum().double()
            top1 += (logp.max(-1).values.exp() * w).sum().double()
            entropy += (-(logp.exp() * logp).sum(-1) * w).sum().double()
            top1_t2 += ((logits / 2).softmax(-1).max(-1).values * w).sum().double()
        chain_nats = -(prob / M).clamp_min(1e-300).log()
        out.update(chain_ce=(chain_nats * w.double()).sum(), hits=hits / M, top1_last=top1 / M,
                   entropy_last=entropy / M, top1_last_t2=top1_t2 / M, **per_step)
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


class ARDiffusionLM(NextTokenChain, StackModel, nn.Module):
    """Autoregressive language modelling as DiffusionBlocks (paper App. E.4; METHOD.md section 7): B blocks, each a
    denoiser of the next token's normalised embedding on its own range of sigma, reading the clean earlier tokens.

    A window x (N, T) is laid out twice, [z_1..z_T ; x_1..x_T]: z_i = e_hat(x_i) + sigma eps (e_hat a fixed random
    table of unit rows, as classification's labels) sees itself and x_<i, x_i sees x_<=i (models.noisy_clean_layout;
    both copies of position i carry position id i). D_i = c_skip z_i + c_out F_i is read out to logits over the
    vocabulary; the loss is the cross-entropy of every token (times w(sigma) with chain.loss_weight=edm). The
    noise level reaches the denoiser per token or per window (arlm.noise_level; NoisyCleanStem).

    Inference per token: chain.steps_per_block Euler steps per block from sigma_max (init: z = 0 or sigma_max
    eps), the x0 estimate between steps the bridge softmax(logits) @ e_hat (soft) or e_hat[argmax] (hard); the
    last step's logits give the token. All positions of a window can run the chain at once (the clean stream is
    the true text): that is how it is evaluated. Generation runs it a token at a time, each block's clean stream
    cached (the clean stream of block b is an ordinary causal transformer: keys and values of earlier tokens do
    not change)."""

    inference_options = ("steps_per_block", "grid", "bridge", "init")

    def __init__(self, model: BackboneConfig, blocks: BlocksConfig, chain: ChainConfig, arlm: ARLMConfig,
                 vocab_size: int, seq_len: int):
        super().__init__()
        m, a = model, arlm
        self.chain_cfg, self.steps_per_block = chain, chain.steps_per_block
        self.noise_level, self.eval_draws, self.temperature = a.noise_level, a.eval_draws, a.temperature
        self.sigma_max_share = a.sigma_max_share
        self.vocab_size, self.seq_len = vocab_size, seq_len
        label_dim = m.label_dim or m.width
        self.partition = Partition.create(LogNormalLevels(), blocks.num_blocks, kind=blocks.partition,
                                          gamma=blocks.gamma)
        gen = torch.Generator().manual_seed(1234)  # the token table is fixed, and the same in every run
        self.labels = ClassEmbedding(vocab_size, label_dim, learnable=chain.label_table == "learned", generator=gen)
        stem = NoisyCleanStem(vocab_size, seq_len, m.width, label_dim, noise_level=a.noise_level,
                              noise_scale=m.noise_scale, learned_positions=m.positions == "learned")
        self.stack = BlockStack(
            lm_layers(m), stem, NoisyHead(m.width, label_dim), self.partition, allocation=blocks.layers_per_block(),
            shared_stem_head=blocks.shared_stem_head, precond=EDMPrecond(), checkpoint_every=m.checkpoint)
        self.add_readout(lambda: nn.Linear(label_dim, vocab_size))  # per block when stem/head are replicated

    def extra_shared(self) -> list[nn.Parameter]:
        return list(self.labels.parameters())  # a learned token table

    # -- the denoiser and its loss --------------------------------------------------------------------------

    def denoise(self, block: int, z: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """D (N, T, Dy) of block `block` for noisy z (N, T, Dy) at sigma ((N, T) per token or (N,) per window)
        reading the clean window x (N, T)."""
        return self.stack.denoise(block, z, sigma, x)  # EDM's preconditioning takes a level per token too

    def levels_like(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """One level per noisy token (N, T) or per window (N,), all `sigma`."""
        shape = x.shape if self.noise_level == "token" else x.shape[:1]
        return torch.full(shape, float(sigma), device=x.device)

    def block_loss(self, block: int, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Nats per token (N,) of `block` alone, on its own levels: every token's cross-entropy."""
        d = self.chain_cfg
        N, T = x.shape
        target = label_target(self.labels, x, d.input_flip, d.input_mix, generator)  # (N, T, Dy)
        n = N * T if self.noise_level == "token" else N
        sigma = self.partition.sample(block, n, generator, device=x.device).to(target.dtype)
        if self.sigma_max_share and block == 0:  # the noisiest block: some levels at sigma_max, the chain's start
            top = torch.rand(n, generator=generator).to(x.device) < self.sigma_max_share
            sigma = torch.where(top, self.partition.levels.hi, sigma)
        if self.noise_level == "token":
            sigma = sigma.view(N, T)
        z = self.stack.precond.noise(target, sigma, generator)
        ce = token_ce(self.readout_of(block)(self.denoise(block, z, sigma, x)), x)  # (N, T)
        if d.loss_weight == "edm":
            ce = ce * self.stack.precond.weight(sigma).reshape(N, -1)
        return ce.mean(1)

    # -- what every step of the Euler chain reads (NextTokenChain) -------------------------------------------

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return x  # every block reads the clean window itself

    def step_logits(self, block: int, z: torch.Tensor, sigma: float, x: torch.Tensor) -> torch.Tensor:
        return self.readout_of(block)(self.denoise(block, z, self.levels_like(x, sigma), x))

    # -- generation, a token at a time --------------------------------------------------------------------------

    def decode_step(self, block: int, z: torch.Tensor, sigma: float, x_new: torch.Tensor, cache: KVCache):
        """D (N, 1, Dy) of `block` for the noisy next token z (N, 1, Dy) at `sigma`, reading the clean tokens
        x_new (N, C) after the cache's (which then holds them too)."""
        p = self.stack.precond
        stem, head = self.stack.stem_head(block)
        s = torch.full((z.shape[0], 1, 1), sigma, dtype=z.dtype, device=z.device)
        h, cond = stem.decode(p.c_in(s) * z, p.c_noise(s).reshape(-1), x_new, cache)
        h = run_layers(self.stack.blocks[block].layers, h, cond)
        cache.advance()
        return p.c_skip(s) * z + p.c_out(s) * head.project(h[:, -1:])

    @torch.no_grad()
    def sample(self, num: int, length: int, prompt: torch.Tensor | None = None, *, temperature: float | None = None,
               steps_per_block: int | None = None, grid: str | None = None, bridge: str | None = None,
               init: str | None = None, generator: torch.Generator | None = None, device="cpu",
               record=None) -> torch.Tensor:
        """`num` continuations of `prompt` to `length` tokens (N, length): per token the Euler chain, one block call
        per step, the last step's softmax (temperature arlm.temperature; 0: greedy) drawn from. Each block's clean
        stream is cached (one cache per block; with noise_level=window the clean stream depends on sigma, so one
        per step). Past one window the last seq_len - 1 tokens are the context, recomputed for every token.
        record(k, sigma, logits, estimate) sees every step of every token."""
        temperature = self.temperature if temperature is None else temperature
        steps = self.steps(steps_per_block, grid)
        out, start = prefilled(num, length, prompt, device)
        caches: dict = {}
        with evaluating(self):
            for n in range(start, length):
                context = out[:, max(0, n - self.seq_len + 1):n]
                if n >= self.seq_len:
                    caches = {}  # a sliding window: its positions move, so nothing cached is valid
                z = self.start((num, 1, self.labels.table.shape[1]), steps[0][0], init, generator, device)
                for k, (s, s_next, block) in enumerate(steps):
                    cache = caches.setdefault(block if self.noise_level == "token" else k, KVCache())
                    D = self.decode_step(block, z, s, context[:, cache.length:], cache)
                    logits = self.readout_of(block)(D).float()
                    estimate = self.bridge(logits, bridge)
                    if record is not None:
                        record(k, s, logits, estimate)
                    z = euler_step(z, estimate, s, s_next)
                out[:, n:n + 1] = draw(logits[:, 0], temperature, generator).to(device)
        return out


class ARLMTask(LMTask):
    """Autoregressive language modelling: end to end (a causal transformer, exact bits per character) or as
    DiffusionBlocks (a denoiser of next-token embeddings, which has no likelihood: the cross-entropy at sigma_max,
    the chain cross-entropy, a Monte-Carlo estimate, and greedy next-token accuracy). The headline every form
    reports is next-token accuracy; the two kinds of cross-entropy never share a column."""

    name = "arlm"
    metric, higher_is_better = "next_token_accuracy", True
    percent = True
    shared_metrics = ("test_bpc",)  # what the end-to-end model reports for another task's compare (mdlm's floor)
    compare_roles = ("e2e", "control", "dblocks")
    presets = {"full": "lm-ar-cpu", "quick": "lm-ar-quick", "offline": "lm-ar-cpu", "offline-quick": "lm-ar-quick"}
    eval_options = ("limit", *ARDiffusionLM.inference_options)
    sample_options = (*TEXT_OPTIONS, Option("temperature", finite, "the softmax temperature of each drawn token, 0 "
                                            "= greedy (default 1; DiffusionBlocks: arlm.temperature, applied at the "
                                            "chain's last step)"), "init")  # init: DiffusionBlocks runs only
    published = "; a published 124M rebuild: 5.08 at sigma_max vs 4.00 autoregressive"  # quoted in compare
    time_generation = True  # compare times cached generation, end to end vs DiffusionBlocks

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        check_label_table(cfg)

    def build_model(self, cfg: RunConfig, data: TextData, form: str) -> nn.Module:
        if form == "blocks":
            return ARDiffusionLM(cfg.model, cfg.blocks, cfg.chain, cfg.arlm, data.vocab_size, cfg.data.seq_len)
        return AutoregressiveLM(cfg.model, data.vocab_size, cfg.data.seq_len)

    def plan_tokens(self, cfg: RunConfig, shapes, form: str = "end-to-end") -> int:
        """The window, twice over for DiffusionBlocks (noisy and clean copies)."""
        return cfg.data.seq_len * (2 if form == "blocks" else 1)

    def plan_layer_bytes(self, cfg: RunConfig, shapes, element: int, form: str = "end-to-end") -> int:
        """Attention converts the boolean mask into an additive (T, T) mask of the model's dtype, and every layer
        keeps its own (T: the window, or both copies of it)."""
        return self.plan_tokens(cfg, shapes, form) ** 2 * element

    def plan_outer_bytes(self, cfg: RunConfig, shapes, model: nn.Module, element: int) -> int:
        if not isinstance(model, ARDiffusionLM):
            return super().plan_outer_bytes(cfg, shapes, model, element)
        N, T, D, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.width, shapes.vocab_size
        Dy, s = cfg.model.label_dim or D, element
        per_token = (8  # the window's ids: the clean embedding's indices and the loss's targets are one tensor
                     + Dy * s  # c_in z, the noisy input's linear
                     + 2 * D * s + 8  # the head's LayerNorm: its input (a copy of the noisy half), output, stats
                     + Dy * s  # D, into the readout
                     + 4 * V)  # the log-softmax (float32)
        # per noisy token, or per window: c_out (for c_out F) and the noise embedding's MLP; per window also c,
        # which every layer's adaLN reads
        token = cfg.arlm.noise_level == "token"
        extra = (N * T if token else N) * (s + (256 + (2 if token else 3) * D) * s)
        if cfg.model.positions == "learned":  # the position ids that index the learned table (int64)
            extra += 8 * T
        return N * T * per_token + extra + 8

    def _how(self, ev: dict) -> str:
        return " (exact)"

    @torch.no_grad()
    def evaluate(self, model, data: TextData, cfg: RunConfig, *, split: str = "test", limit: int = 0, device="cpu",
                 **options) -> dict:
        """End to end: bits per character and per token, the exact cross-entropy in nats per token (`ce`) and
        greedy next-token accuracy. DiffusionBlocks: `ce_sigma_max`, `chain_ce` (nats per token, M = `eval_draws`
        chains), `next_token_accuracy`, accuracy and the bridge's norm after every step, the last step's top-1
        probability (also at temperature 2) and entropy. On the split's windows as LMTask.evaluate cuts them."""
        options = {k: v for k, v in options.items() if v is not None}
        blocks = isinstance(model, NextTokenChain)
        unused = [k for k in options if k not in (model.inference_options if blocks else ())]
        if unused:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: sampler options of a "
                             f"DiffusionBlocks language model; this run is {type(model).__name__}")
        batches, windows, covered, gen = self.eval_batches(data, cfg, split, limit)
        sums: dict = {}
        with evaluating(model):
            for x, pad in batches:
                x, pad = x.to(device), pad.to(device)
                if blocks:
                    part = model.window_stats(x, pad, gen, **options)
                else:
                    logits = model.logits(x, generator=gen)
                    scored = ~pad
                    part = {"nats": (token_ce(logits, x) * scored).sum().double().cpu(),
                            "hits": ((logits.argmax(-1) == x) & scored).sum().double().cpu(),
                            "tokens": scored.sum().double().cpu()}
                for k, v in part.items():
                    sums[k] = sums[k] + v if k in sums else v
        n_tok = sums["tokens"].item()
        out = {"next_token_accuracy": sums["hits"].item() / n_tok, "tokens": covered, "n": windows}
        if not blocks:
            chars = data.chars_of(split, covered)
            nats = sums["nats"].item()
            return {"bpc": nats / (chars * LN2), "bpt": nats / (n_tok * LN2), "ce": nats / n_tok, "nats": nats,
                    "chars": chars, **out}
        steps = model.steps(options.get("steps_per_block"), options.get("grid"))
        return {"ce_sigma_max": sums["ce_sigma_max"].item() / n_tok, "chain_ce": sums["chain_ce"].item() / n_tok,
                **out, "accuracy_per_step": (sums["hits_per_step"] / n_tok).tolist(),
                "bridge_norm_per_step": (sums["bridge_norm_per_step"] / n_tok).tolist(),
                "top1_last": sums["top1_last"].item() / n_tok, "top1_last_t2": sums["top1_last_t2"].item() / n_tok,
                "entropy_last": sums["entropy_last"].item() / n_tok, "eval_draws": model.draws(options.get("init")),
                "sigma_per_step": [s for s, _, _ in steps]}

    MEASURED = (*LMTask.MEASURED, "ce", "next_token_accuracy", "ce_sigma_max", "chain_ce", "accuracy_per_step",
                "bridge_norm_per_step", "top1_last", "top1_last_t2", "entropy_last")

    def score(self, model, data, cfg: RunConfig, *, split: str = "test", device="cpu", progress: bool = False,
              reference=None, **options) -> dict:
        return dict(self.evaluate(model, data, cfg, split=split, device=device, **options), split=split)

    def describe_score(self, score: dict) -> str:
        what = f"{score.get('split', 'test')}, {score['n']} windows: next-token accuracy " \
               f"{100 * score['next_token_accuracy']:.2f}%"
        if "bpc" in score:
            return f"{what}; bits per character {score['bpc']:.4f} (exact; {score['ce']:.4f} nats per token)"
        return (f"{what}; cross-entropy at sigma_max {score['ce_sigma_max']:.4f} and chain cross-entropy "
                f"{score['chain_ce']:.4f} nats per token (M = {score['eval_draws']}; an estimate, not a likelihood)")

    def summary(self, results: dict) -> str:
        key = "val_" if "val_next_token_accuracy" in results else "test_"
        score = {k[len(key):]: v for k, v in results.items() if k.startswith(key)}
        score.update(split="validation" if key == "val_" else "test", eval_draws=results.get("eval_draws"))
        return (f"{results['method']}: {self.describe_score(score)}; {results['layer_updates']} layer-updates in "
                f"{results['train_seconds']:.1f} s")

    def write_samples(self, model, data: TextData, cfg: RunConfig, out, **kwargs) -> str:
        if kwargs.get("init") is not None and not isinstance(model, NextTokenChain):
            raise ValueError("--init: the start of a DiffusionBlocks run's Euler chain; this run is end to end")
        return super().write_samples(model, data, cfg, out, **kwargs)

    def compare_extras(self, arms, base: RunConfig, out) -> tuple[dict, list[str]]:
        """Each kind of cross-entropy on its own line; the DiffusionBlocks chain's diagnostics (the published
        negative findings: accuracy and the bridge's norm after every step, the last step's confidence); for each
        arm's seed-0 model: samples (written to out/samples-ROLE.txt), their distinct-n, a generative perplexity
        scored by the end-to-end model, and generation time per token (cached, interleaved, median of 3)."""
        extras, lines = {}, []
        mean = lambda arm, key: statistics.mean(r[key] for r in arm.runs)
        for role, arm in arms.items():
            if "test_bpc" in arm.runs[0]:
                lines.append(f"{role}: exact cross-entropy {mean(arm, 'test_ce'):.4f} nats per token, "
                             f"{mean(arm, 'test_bpc'):.4f} bits per character (a likelihood)")
        e2e, blocks = pick(arms, "end-to-end"), pick(arms, "blocks")
        if blocks is not None:
            diag = {k: mean(blocks, "test_" + k) for k in ("ce_sigma_max", "chain_ce", "top1_last", "top1_last_t2",
                                                            "entropy_last")}
            for key in ("accuracy_per_step", "bridge_norm_per_step"):
                diag[key] = [statistics.mean(v) for v in zip(*(r["test_" + key] for r in blocks.runs))]
            diag["sigma_per_step"], diag["eval_draws"] = blocks.runs[0]["sigma_per_step"], blocks.runs[0]["eval_draws"]
            extras[f"{blocks.role}_chain"] = diag
            lines.append(f"{blocks.role}: cross-entropy at sigma_max {diag['ce_sigma_max']:.4f}, chain cross-entropy "
                         f"{diag['chain_ce']:.4f} nats per token (M = {diag['eval_draws']}; estimates, not "
                         f"likelihoods{self.published})")
            steps = ", ".join(f"sigma {s:.3g}: {100 * a:.2f}% / {n:.3f}" for s, a, n in
                              zip(diag["sigma_per_step"], diag["accuracy_per_step"], diag["bridge_norm_per_step"]))
            lines.append(f"{blocks.role} chain, accuracy / bridge norm after each step: {steps}; last step: mean top-1 "
                         f"probability {diag['top1_last']:.3f} ({diag['top1_last_t2']:.3f} at temperature 2), "
                         f"entropy {diag['entropy_last']:.3f} nats")
        models = {role: arm.load() for role, arm in arms.items()}
        if not models:
            return extras, lines
        num, length = 8, base.data.seq_len
        gen = lambda i: torch.Generator().manual_seed(1000 + i)
        samples = {role: m.sample(num, length, generator=gen(0)) for role, m in models.items()}
        if blocks is not None:  # the chain from sigma_max noise (zero start: deterministic), and temperatures
            chain = models[blocks.role]
            samples[f"{blocks.role}-noise"] = chain.sample(num, length, init="noise", generator=gen(0))
            for t in (0.5, 2.0):
                samples[f"{blocks.role}-t{t:g}"] = chain.sample(num, length, temperature=t, generator=gen(0))
        data = load_text(base)
        real = torch.from_numpy(np.asarray(data.splits["test"][:num * length], dtype=np.int64)).view(num, length)
        gen_stats = {"real test text": {"distinct": distinct_n(real)}}
        for name, tokens in samples.items():
            io.atomic_write_text(Path(out) / f"samples-{name}.txt", "".join(
                f"=== sample {i} ===\n{data.tokenizer.decode(row.numpy())}\n\n" for i, row in enumerate(tokens)))
            gen_stats[name] = {"distinct": distinct_n(tokens)}
        if e2e is not None:
            for name, st in gen_stats.items():
                tokens = real if name == "real test text" else samples[name]
                with torch.no_grad():
                    st["perplexity_by_e2e"] = math.exp(models[e2e.role].token_nats(tokens).mean().item())
        extras["generation"] = gen_stats
        lines.append(f"generated text ({num} samples of {length} tokens from no prompt, seed-0 models): "
                     "distinct-1/2/3/4"
                     + (" and generative perplexity scored by the end-to-end model (same budget and data; it favours "
                        "its own samples)" if e2e is not None else "") + ": "
                     + "; ".join(f"{name} " + "/".join(f"{d:.2f}" for d in st["distinct"])
                                 + (f", {st['perplexity_by_e2e']:.2f}" if "perplexity_by_e2e" in st else "")
                                 for name, st in gen_stats.items()))
        if e2e is not None and blocks is not None and self.time_generation:
            seconds = interleaved_seconds({arm.role: lambda i, m=models[arm.role]: m.sample(num, length,
                                                                                             generator=gen(i))
                                           for arm in (e2e, blocks)}, repeats=3)
            per_token = {role: t / length for role, t in seconds.items()}
            extras.update(generation_seconds_per_token=per_token,
                          generation_slowdown=per_token[blocks.role] / per_token[e2e.role])
            B = blocks.runs[0]["num_blocks"]
            lines.append(f"generation, batch of {num}, key/value cache: {1000 * per_token[e2e.role]:.2f} ms per token "
                         f"end-to-end vs {1000 * per_token[blocks.role]:.2f} ms DiffusionBlocks (B = {B}, "
                         f"{len(models[blocks.role].steps())} block calls per token): "
                         f"{extras['generation_slowdown']:.2f}x the time")
        return extras, lines


def distinct_n(tokens: torch.Tensor, orders=(1, 2, 3, 4)) -> list[float]:
    """Distinct-n of a set of samples (N, T): unique n-grams over all n-grams, pooled over the samples, for each n."""
    out = []
    for n in orders:
        grams = [tuple(row[i:i + n]) for row in tokens.tolist() for i in range(len(row) - n + 1)]
        out.append(len(set(grams)) / max(1, len(grams)))
    return out


TASK = ARLMTask


@preset("lm-ar-cpu")
def preset_lm_ar_cpu() -> RunConfig:
    """The autoregressive compare on a 2-core CPU (`compare --task arlm`: e2e, the 2-layer control, DiffusionBlocks):
    lm-cpu's data, model and budget (Shakespeare in the text8 alphabet, windows of 128, 6 layers of width 192,
    320 end-to-end steps of 32 windows, AdamW 1e-3) with B = 3 and the paper's text overlap gamma 0.1; scored on
    the first 512 test windows (of 2,029)."""
    cfg = load_preset("lm-cpu")
    cfg.task = "arlm"
    cfg.blocks.gamma = 0.1
    cfg.chain.input_flip = cfg.chain.input_mix = 0.0  # classification's departures: not measured for text
    cfg.data.test_limit = 512
    return cfg


@preset("lm-ar-quick")
def preset_lm_ar_quick() -> RunConfig:
    """Under a minute for the three arms of the autoregressive compare (a smoke run): 12 steps, windows of 64 (the
    samples and the generation timing are one window long), 64 test windows."""
    cfg = preset_lm_ar_cpu()
    cfg.data.seq_len = 64
    cfg.train.steps = 12
    cfg.train.eval_limit = 16
    cfg.data.test_limit = 64
    return cfg


@preset("lm-ar-lm1b")
def preset_lm_ar_lm1b() -> RunConfig:
    """The paper's autoregressive setting for a GPU (App. E.4): LM1B (through HF `datasets`), windows of 256, 12
    layers of width 768 with 12 heads, B = 4, gamma 0.1, AdamW 3e-4, batch 256. The tokenizer is a BPE of 8,192
    symbols trained on the corpus (data.bpe_vocab), or a local tokenizer.json (data.tokenizer_file=PATH, e.g. GPT-2's
    for OpenWebText). Set train.steps for the budget you have."""
    cfg = RunConfig(task="arlm")
    cfg.data = DataConfig(name="lm1b", tokenizer="bpe", bpe_vocab=8192, seq_len=256)
    cfg.model = BackboneConfig(depth=12, width=768, heads=12, mlp_ratio=4.0, positions="rope")
    cfg.blocks.num_blocks, cfg.blocks.gamma = 4, 0.1
    cfg.chain.input_flip = cfg.chain.input_mix = 0.0
    cfg.train = TrainConfig(steps=100_000, batch_size=256, lr=3e-4, weight_decay=0.03, warmup=0.02, eval_limit=512,
                            eval_batch_size=128, ckpt_every=2000, device="auto")
    return cfg
