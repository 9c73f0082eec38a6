"""Recurrent depth: a Huginn-style language model (Geiping et al. 2025) trained as Huginn trains it and
as DiffusionBlocks does (paper Sec. 5.5, App. E.5; docs/METHOD.md section 8), and the training compute of each,
measured.

The network, shared by both forms: the [BOS]-shifted window (position i reads [BOS] + x_<i, as tasks/arlm_models.py's
causal model) through `prelude` layers gives e; a state s (N, T, D) goes through the core, `core` layers with one
set of weights, as s <- core(adapter([s, e])), r times; `coda` layers and the tied head read the last state.

End to end (HuginnLM, Huginn's recipe): the initial state is random, r is drawn per step from
Poisson(LogNormal(ln r_bar - sigma^2 / 2, sigma)) + 1, the first r - k iterations run without gradients and
backpropagation runs through the last k only. It is a causal LM at a fixed r: its cross-entropy is exact for the
drawn initial state.

DiffusionBlocks (RecurrentDiffusionLM): the state is the noisy next-token embedding, z = e_hat(x_i) + sigma eps (e_hat
the fixed table of unit rows of tasks/arlm_models.py), one core application is the denoiser, D = c_skip z + c_out core(
adapter([c_in z, e])) with sigma given to the core's layers by adaLN (one sigma per window), and the coda and head
read D out to logits: one pass per training step over the whole range of sigma (one block), the loss the
cross-entropy. At inference the recurrences are the Euler steps of NextTokenChain (tasks/arlm_models.py): r steps from
sigma_max, the x0 estimate between steps the bridge softmax(logits) @ e_hat, so every recurrence runs the core, the
coda and the head; the prelude runs once. The earlier tokens are known at inference, so the states position i reads
at the earlier positions are drawn as in training (their noisy true embeddings at the step's sigma), not the chains'
estimates: the chains' states and the known tokens' run side by side (RecurrentDiffusionLM.step_logits).

Compute (compare_extras, measured by measure.py): FLOPs per training step counted by torch's FlopCounterMode (matrix
products and attention, forward and backward), wall time per step interleaved in one process, saved-activation bytes;
and three ratios:
per step, the paper's protocol (DiffusionBlocks trains `dblocks_epochs` times the steps) and, the only compute
reduction, the compute DiffusionBlocks needs to reach the end-to-end arm's final held-out figure.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import (
    BackboneConfig,
    BlocksConfig,
    ChainConfig,
    DataConfig,
    RunConfig,
    TrainConfig,
    preset,
    section,
    setting,
)
from ..images import pyplot
from ..measure import compute_ratios, expected_flops, interleaved_times, step_flops, training_step
from ..memory import saved_activation_bytes
from ..models import TokenHead, TokenStem, lm_layers, noisy_clean_layout
from ..nn import NoiseEmbedding, run_layers
from ..noise import LogNormalLevels, Partition
from ..precond import ClassEmbedding, EDMPrecond
from .arlm import ARLMTask
from .arlm_models import ARLMConfig, NextTokenChain, draw, prefilled
from .base import evaluating
from .lm import TextData, TokenWindows, token_ce
from .optional import Arm, pick


@section("recurrent")
@dataclass
class RecurrentConfig:
    """Recurrent depth (task=recurrent; Huginn, Geiping et al. 2025; paper Sec. 5.5): prelude layers, a core of
    tied layers applied r times, coda layers. End to end (Huginn's training) r is drawn per step from
    Poisson(LogNormal(ln mean_recurrence - sigma^2 / 2, sigma)) + 1 and backpropagation runs through the last
    backprop_depth iterations only; DiffusionBlocks trains the same network as one denoiser in a single pass and
    reads the recurrences as Euler steps at inference (docs/METHOD.md section 8)."""

    prelude: int = setting(1, "layers before the core", range="[0, 10_000]")
    core: int = setting(2, "layers of the core (one set of weights, applied r times)", range="[1, 10_000]")
    coda: int = setting(1, "layers after the core", range="[0, 10_000]")
    mean_recurrence: int = setting(8, "r_bar: the mean of the log-normal rate (Huginn: 32; E[r] = r_bar + 1)",
                                   range="[1, 10_000]")
    recurrence_sigma: float = setting(0.5, "the log-normal's standard deviation (Huginn: 0.5)", range="[0, 10)")
    backprop_depth: int = setting(4, "k: iterations that carry gradients, the last k (Huginn: 8)", range="[1, 10_000]")
    state_std: float = setting(1.0, "end to end: the random initial state's standard deviation", range="[0, inf)")
    eval_recurrences: int = setting(0, "recurrences at evaluation and sampling, for both forms (0 = mean_recurrence)",
                                    range="[0, 10_000] 0 = the mean")
    dblocks_epochs: float = setting(3.0, "compare: the DiffusionBlocks arm's steps as a multiple of the end-to-end "
                                         "arm's (the paper's protocol: 15 epochs against Huginn's 5)",
                                    range="(0, 1000)")

    def recurrences(self) -> int:
        return self.eval_recurrences or self.mean_recurrence


def draw_recurrences(rec: RecurrentConfig, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n recurrence counts (int64) from Huginn's distribution: r = Poisson(exp(tau)) + 1 with tau ~ N(ln r_bar -
    sigma^2 / 2, sigma^2), so E[exp(tau)] = r_bar and E[r] = r_bar + 1."""
    s = rec.recurrence_sigma
    tau = torch.randn(n, generator=generator, dtype=torch.float64) * s + math.log(rec.mean_recurrence) - s * s / 2
    return torch.poisson(tau.exp(), generator=generator).long() + 1


class RecurrenceWindows(TokenWindows):
    """Training batches (x, r, seed): windows as TokenWindows draws them, the step's recurrence count and the seed of
    its initial state (both repeated per window, so a data-parallel shard keeps them); resumable. Only the
    end-to-end form reads r and seed."""

    def __init__(self, tokens: np.ndarray, batch: int, seq_len: int, seed: int, rec: RecurrentConfig):
        super().__init__(tokens, batch, seq_len, seed)
        self.rec, self.depth = rec, torch.Generator().manual_seed(seed + 7_777)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (x,) = super().__next__()
        r = draw_recurrences(self.rec, 1, self.depth)
        seed = torch.randint(2**62, (1,), generator=self.depth)
        return x, r.expand(len(x)).clone(), seed.expand(len(x)).clone()

    def state_dict(self) -> dict:
        return dict(super().state_dict(), depth=self.depth.get_state())

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        self.depth.set_state(state["depth"])


class RecurrentDepth(nn.Module):
    """What both forms share: the token stem, prelude, adapter of [state, prelude output], core (one set of layers,
    applied as often as asked), coda and the head tied to the stem's table."""

    def __init__(self, model: BackboneConfig, recurrent: RecurrentConfig, arlm: ARLMConfig, vocab_size: int,
                 seq_len: int):
        super().__init__()
        m, r = model, recurrent
        self.vocab_size, self.bos, self.seq_len = vocab_size, vocab_size, seq_len
        self.recurrences, self.sizes, self.temperature = r.recurrences(), (r.prelude, r.core, r.coda), arlm.temperature
        self.stem = TokenStem(vocab_size + 1, seq_len, m.width, causal=True, conditioned=False,
                              learned_positions=m.positions == "learned")
        layers = lambda n: nn.ModuleList(lm_layers(m, n))
        self.prelude, self.core, self.coda = layers(r.prelude), layers(r.core), layers(r.coda)
        self.adapter = nn.Linear(2 * m.width, m.width)
        self.head = TokenHead(self.stem.embed, m.width, vocab_size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(the prelude's output e (N, T, D), the stem's (zero c, causal mask)) of windows x (N, T)."""
        inputs = torch.cat([torch.full_like(x[:, :1], self.bos), x[:, :-1]], dim=1)
        h, cond = self.stem(inputs)
        return run_layers(self.prelude, h, cond), cond

    def core_step(self, s: torch.Tensor, e: torch.Tensor, cond: tuple) -> torch.Tensor:
        """One application of the core: core(adapter([s, e]))."""
        return run_layers(self.core, self.adapter(torch.cat([s, e], dim=-1)), cond)

    def read(self, s: torch.Tensor, cond: tuple) -> torch.Tensor:
        """The coda and the head: state (N, T, D) -> logits (N, T, V)."""
        return self.head(run_layers(self.coda, s, cond))

    def next_logits(self, context: torch.Tensor, generator: torch.Generator | None, **options) -> torch.Tensor:
        """Logits (N, V) of the token after `context` (N, n), n < seq_len, recomputing the window."""
        window = torch.cat([context, context.new_zeros(context.shape[0], 1)], dim=1)
        return self.window_logits(window, generator, **options)[:, -1]

    @torch.no_grad()
    def sample(self, num: int, length: int, prompt: torch.Tensor | None = None, *, temperature: float | None = None,
               generator: torch.Generator | None = None, device="cpu", **options) -> torch.Tensor:
        """`num` continuations of `prompt` to `length` tokens (N, length), the whole window recomputed for every
        token (no key/value cache); past one window the last seq_len - 1 tokens are the context."""
        temperature = self.temperature if temperature is None else temperature
        out, start = prefilled(num, length, prompt, device)
        with evaluating(self):
            for n in range(start, length):
                logits = self.next_logits(out[:, max(0, n - self.seq_len + 1):n], generator, **options)
                out[:, n:n + 1] = draw(logits, temperature, generator).to(device)
        return out


class HuginnLM(RecurrentDepth):
    """Recurrent depth trained end to end as Huginn: r drawn per step, a random initial state, backpropagation
    through the last k iterations only. At evaluation r is fixed (recurrent.eval_recurrences)."""

    inference_options = ()

    def __init__(self, model: BackboneConfig, recurrent: RecurrentConfig, arlm: ARLMConfig, vocab_size: int,
                 seq_len: int):
        super().__init__(model, recurrent, arlm, vocab_size, seq_len)
        r = recurrent
        self.backprop_depth, self.state_std = r.backprop_depth, r.state_std
        # layer applications that carry gradients in a step of r >= k (the layer-update unit)
        self.num_layers = r.prelude + r.backprop_depth * r.core + r.coda

    def logits(self, x: torch.Tensor, generator: torch.Generator | None = None, recurrences: int | None = None,
               ) -> torch.Tensor:
        """Logits (N, T, V) of windows x (N, T) after `recurrences` (default: eval_recurrences) iterations from an
        initial state of N(0, state_std^2) drawn from `generator`; only the last k iterations record gradients."""
        r = recurrences or self.recurrences
        e, cond = self.encode(x)
        s = self.state_std * torch.randn(e.shape, generator=generator, dtype=e.dtype).to(e.device)
        k = min(r, self.backprop_depth)
        with torch.no_grad():
            for _ in range(r - k):
                s = self.core_step(s, e, cond)
        for _ in range(k):
            s = self.core_step(s, e, cond)
        return self.read(s, cond)

    window_logits = logits

    def loss(self, x: torch.Tensor, r: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        """Nats per token (N,) of one training step: r[0] iterations, the initial state drawn from seed[0]."""
        gen = torch.Generator().manual_seed(int(seed[0]))
        return token_ce(self.logits(x, gen, int(r[0])), x).mean(1)

    def token_nats(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """-log p(x_i | x_<i) (N, T) for an initial state drawn from `generator` (default: seeded 0)."""
        return token_ce(self.logits(x, generator or torch.Generator().manual_seed(0)), x)

    def sequence_nats(self, x: torch.Tensor, pad: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """-log p(window) in nats (N,), exact for the drawn initial state; padding not scored."""
        nats = self.token_nats(x, generator).double()
        if pad is not None:
            nats = nats * ~pad
        return nats.sum(1).cpu()


class RecurrentDiffusionLM(NextTokenChain, RecurrentDepth):
    """The same network trained as DiffusionBlocks (one block over the whole range of sigma, a single pass per step)
    and run at inference as an Euler chain of recurrences (NextTokenChain), the known tokens' states drawn as in
    training. The BlockModel interface of one block that owns every parameter."""

    inference_options = ("steps_per_block", "grid", "bridge", "init")

    def __init__(self, model: BackboneConfig, blocks: BlocksConfig, chain: ChainConfig, recurrent: RecurrentConfig,
                 arlm: ARLMConfig, vocab_size: int, seq_len: int):
        super().__init__(model, recurrent, arlm, vocab_size, seq_len)
        if blocks.num_blocks != 1:
            raise ValueError(f"blocks.num_blocks={blocks.num_blocks}: recurrent depth trains its one tied core as a "
                             "single denoiser over the whole range of sigma (num_blocks=1)")
        self.chain_cfg, self.eval_draws = chain, arlm.eval_draws
        self.loss_weight, self.steps_per_block = chain.loss_weight, self.recurrences  # one Euler step per recurrence
        self.partition = Partition.create(LogNormalLevels(), 1, kind=blocks.partition, gamma=blocks.gamma)
        self.labels = ClassEmbedding(vocab_size, model.width, generator=torch.Generator().manual_seed(1234))
        self.noise = NoiseEmbedding(model.width, scale=model.noise_scale)
        self.precond = EDMPrecond()
        self.num_layers = sum(self.sizes)

    # -- BlockModel: one block owning everything -----------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return 1

    def block_parameters(self, block: int) -> list[nn.Parameter]:
        return list(self.parameters())

    def block_modules(self, block: int) -> list[nn.Module]:
        return [self]

    def shared_parameters(self) -> list[nn.Parameter]:
        return []

    def block_layers(self, block: int) -> int:
        return self.num_layers

    # -- the denoiser ------------------------------------------------------------------------------------------

    def context(self, x: torch.Tensor) -> tuple:
        """What every step of every chain reads, once per batch of windows x (N, T): the prelude's output e and the
        stem's (c, causal mask), the known tokens' clean embeddings e_hat(x) (N, T, D), and the layout of the
        chain's states beside the known tokens' (models.noisy_clean_layout)."""
        e, cond = self.encode(x)
        return e, cond, self.labels(x), noisy_clean_layout(x.shape[1], x.device)

    def chain_context(self, context: tuple, generator: torch.Generator | None = None) -> tuple:
        """One chain's draw, eps (N, T, D) ~ N(0, I) as block_loss's precond.noise draws it: the known tokens'
        states along the chain are their noisy true embeddings e_hat(x) + sigma eps (known_states)."""
        target = context[2]
        eps = torch.randn(target.shape, generator=generator, dtype=target.dtype,
                          device=generator.device if generator is not None else target.device).to(target.device)
        return (*context, eps)

    def known_states(self, context: tuple, sigma: float) -> torch.Tensor:
        """The known tokens' states at level sigma (N, T, D): e_hat(x) + sigma eps, training's law at sigma (one eps
        per chain, so a perfect denoiser's own Euler chain from e_hat(x) + sigma_max eps would pass through them)."""
        _, _, target, _, eps = context
        return target + sigma * eps

    def denoise(self, z: torch.Tensor, sigma: torch.Tensor, context: tuple) -> torch.Tensor:
        """D (N, T, D) for states z at sigma (N,): c_skip z + c_out core(adapter([c_in z, e])), sigma by adaLN."""
        e, (_, mask) = context[:2]
        net = lambda z_in, c_noise, _: self.core_step(z_in, e, (self.noise(c_noise), mask))
        return self.precond.denoise(net, z, sigma, None)

    def step_logits(self, block: int, z: torch.Tensor, sigma: float, context: tuple) -> torch.Tensor:
        """Logits (N, T, V) of the chain's states z (N, T, D) at sigma. In training position i reads the states of
        the earlier tokens, their noisy true embeddings; those tokens are known here too, so the states are laid
        out [z ; known] (2T positions, both copies of position i with id i): z_i reads itself and known_<i, known_i
        reads known_<=i, through the core and the coda alike, so z_i's logits are training's forward pass on the
        states [known_<i, z_i] and no chain's estimate is ever read at another position."""
        e, (c, _), _, layout, _ = context
        T = z.shape[1]
        levels = torch.full((z.shape[0],), float(sigma), device=z.device)
        both = torch.cat([e, e], dim=1)  # (N, 2T, D): each copy of position i reads the prelude's output at i
        net = lambda z_in, c_noise, _: self.core_step(z_in, both, (self.noise(c_noise), layout))
        D = self.precond.denoise(net, torch.cat([z, self.known_states(context, sigma)], dim=1), levels, None)
        return self.read(D, (c, layout))[:, :T]

    def draws(self, init: str | None = None, draws: int | None = None) -> int:
        """M: eval_draws chains even from a zero start (the known tokens' states are drawn, so no chain is
        deterministic)."""
        return draws or self.eval_draws

    def block_loss(self, block: int, x: torch.Tensor, r: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Nats per token (N,) of one pass at a sigma per window drawn over the whole range (r and seed, the
        end-to-end form's draws, are not used)."""
        context = self.encode(x)
        target = self.labels(x)  # (N, T, D): every position's state is its token's noisy true embedding
        sigma = self.partition.sample(0, x.shape[0], generator, device=x.device).to(target.dtype)
        z = self.precond.noise(target, sigma, generator)
        ce = token_ce(self.read(self.denoise(z, sigma, context), context[1]), x)
        if self.loss_weight == "edm":
            ce = ce * self.precond.weight(sigma)[:, None]
        return ce.mean(1)

    def window_logits(self, x: torch.Tensor, generator: torch.Generator | None = None, **options) -> torch.Tensor:
        return self.chain(x, generator, **options)


class RecurrentTask(ARLMTask):
    """Recurrent-depth language modelling: Huginn's training (`--method e2e`, exact cross-entropy at a fixed number
    of recurrences) against DiffusionBlocks' single pass (`--method dblocks`, scored like autoregressive
    DiffusionBlocks); next-token accuracy is the headline both report, at the same number of recurrences."""

    name = "recurrent"
    # the control: a plain causal transformer of the same prelude + core + coda layers (tasks/arlm.py), the core once,
    # trained end to end for as many steps as DiffusionBlocks (about its FLOPs): does the recurrence add anything?
    compare_roles = ("e2e", "e2e-steps", "dblocks", "arlm")
    shared_metrics = ()
    presets = {"full": "recurrent-cpu", "quick": "recurrent-quick", "offline": "recurrent-cpu",
               "offline-quick": "recurrent-quick"}
    eval_options = ("limit", *RecurrentDiffusionLM.inference_options)
    published = ""
    time_generation = False  # both recompute the window per token here; training compute is what is measured

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        r = cfg.recurrent
        if cfg.model.depth != r.prelude + r.core + r.coda:
            raise ValueError(f"model.depth={cfg.model.depth}: a recurrent-depth model's distinct layers are "
                             f"prelude + core + coda = {r.prelude + r.core + r.coda}; set model.depth to that")
        if cfg.blocks.num_blocks != 1:
            raise ValueError(f"blocks.num_blocks={cfg.blocks.num_blocks}: recurrent depth trains its one tied core "
                             "as a single denoiser over the whole range of sigma (blocks.num_blocks=1)")

    def build_model(self, cfg: RunConfig, data: TextData, form: str) -> nn.Module:
        if form == "blocks":
            return RecurrentDiffusionLM(cfg.model, cfg.blocks, cfg.chain, cfg.recurrent, cfg.arlm, data.vocab_size,
                                        cfg.data.seq_len)
        return HuginnLM(cfg.model, cfg.recurrent, cfg.arlm, data.vocab_size, cfg.data.seq_len)

    def arm_config(self, cfg: RunConfig, form: str) -> RunConfig:
        """Every arm but Huginn's (this task's end-to-end model) trains recurrent.dblocks_epochs times its steps (the
        paper's protocol); every arm evaluates 20 times over its run, so the compute to reach a figure is resolved to
        1/20."""
        huginn = cfg.task == self.name and form == "end-to-end"
        if not huginn:
            cfg.train.steps = max(1, round(cfg.train.steps * cfg.recurrent.dblocks_epochs))
        r = cfg.recurrent
        layers = r.prelude + r.coda + (r.backprop_depth * r.core if huginn else r.core)
        cfg.train.eval_every = max(1, cfg.train.steps * layers // 20)
        return cfg

    def stream(self, data: TextData, cfg: RunConfig, seed: int, member: int = 0) -> RecurrenceWindows:
        return RecurrenceWindows(data.splits["train"], cfg.train.batch_size, cfg.data.seq_len, seed, cfg.recurrent)

    def _with_draws(self, x: torch.Tensor, cfg: RunConfig) -> tuple:
        """A batch with the mean recurrence count (what a step saves does not depend on r >= k)."""
        r = max(cfg.recurrent.mean_recurrence, cfg.recurrent.backprop_depth)
        return x, torch.full((len(x),), r, device=x.device), torch.zeros(len(x), dtype=torch.long, device=x.device)

    def probe_batch(self, data: TextData, cfg: RunConfig, device) -> tuple:
        return self._with_draws(*super().probe_batch(data, cfg, device), cfg)

    def random_batch(self, cfg: RunConfig, shapes, generator: torch.Generator) -> tuple:
        return self._with_draws(*super().random_batch(cfg, shapes, generator), cfg)

    def plan_tokens(self, cfg: RunConfig, shapes, form: str = "end-to-end") -> int:
        raise ValueError("`plan` and `memory` do not cover recurrent depth yet; `compare --task recurrent` measures "
                         "what a training step of each arm saves for backward (compute.saved_bytes_per_step)")

    # -- compare: quality (ARLMTask's lines) and the measured training compute ------------------------------------

    def compare_extras(self, arms, base: RunConfig, out) -> tuple[dict, list[str]]:
        extras, lines = super().compare_extras(arms, base, out)
        e2e, blocks = pick(arms, "end-to-end"), pick(arms, "blocks")  # Huginn at its own budget: the ratios' reference
        if e2e is None or blocks is None:
            return extras, lines
        plain = [arm for arm in arms.values() if arm.task != self.name]  # the control without recurrence
        compute = measure_compute(e2e, blocks, plain, base, repeats=20 if base.train.steps >= 500 else 5)
        compute["ratios"] = compute_ratios(compute["flops_per_step"], compute["seconds_per_step_mean"],
                                           {arm.role: arm.runs for arm in (e2e, blocks)}, e2e.role, blocks.role, REACH)
        extras["compute"] = compute
        extras["flops_per_step"], extras["ratios"] = compute["flops_per_step"], compute["ratios"]
        lines += compute_lines(compute, e2e.role, blocks.role)
        longer = [a for a in arms.values() if a.own and a.form == "end-to-end" and a is not e2e]  # e2e-steps
        series = [(e2e, "Huginn, end to end", "ce"), (blocks, "DiffusionBlocks", "chain_ce"),
                  *((arm, "plain, core once, end to end", "ce") for arm in plain),
                  *((arm, f"Huginn, end to end, {arm.runs[0]['steps']} steps", "ce") for arm in longer)]
        flops = {**compute["flops_per_step"], **{a.role: compute["flops_per_step"][e2e.role] for a in longer}}
        if plot_compute(series, flops, Path(out) / "compute.png"):  # Huginn's network and law of r at any step count
            lines.append("held-out figures against training FLOPs: compute.png")
        return extras, lines


def expected_huginn_flops(flops_at, rec: RecurrentConfig, draws: int = 200_000) -> dict:
    """E[FLOPs per step] of Huginn's training over `draws` seeded draws of its r (measure.expected_flops)."""
    return expected_flops(flops_at, draw_recurrences(rec, draws, torch.Generator().manual_seed(0)),
                          rec.backprop_depth)


def measure_compute(e2e: Arm, blocks: Arm, plain: list[Arm], base: RunConfig, repeats: int = 20) -> dict:
    """FLOPs per training step of each arm (Huginn's averaged over its distribution of r; the plain control's, not
    timed), the wall time of a step of the end-to-end and the block-wise arm (forward, backward and an AdamW update;
    interleaved in this process, Huginn's steps at r drawn as in training), and the bytes a step saves for backward."""
    rec, N = base.recurrent, base.train.batch_size
    huginn, dblocks = e2e.load().train(), blocks.load().train()
    plain_models = {arm.role: arm.load().train() for arm in plain}
    x = torch.randint(huginn.vocab_size, (N, base.data.seq_len), generator=torch.Generator().manual_seed(0))
    seed = torch.zeros(N, dtype=torch.long)
    noise = torch.Generator().manual_seed(1)
    h_loss = lambda r: huginn.loss(x, torch.full((N,), r), seed).mean()  # one step of each arm, as training takes it
    d_loss = lambda: dblocks.block_loss(0, x, generator=noise).mean()
    flops_h = expected_huginn_flops(lambda r: step_flops(lambda: h_loss(r).backward()), rec)
    flops = {e2e.role: flops_h["mean"], blocks.role: float(step_flops(lambda: d_loss().backward()))}
    for role, model in plain_models.items():
        flops[role] = float(step_flops(lambda m=model: m.loss(x).mean().backward()))
    probe_r = max(rec.mean_recurrence, rec.backprop_depth)  # what a step saves does not depend on r >= k
    saved = {e2e.role: saved_activation_bytes(lambda: h_loss(probe_r), list(huginn.parameters()))[0],
             blocks.role: saved_activation_bytes(d_loss, list(dblocks.parameters()))[0]}
    depth = torch.Generator().manual_seed(2)
    r = [int(draw_recurrences(rec, 1, depth)) for _ in range(repeats + 1)]  # one per round, the warm-up's included
    times = interleaved_times({e2e.role: training_step(huginn, lambda i: h_loss(r[i])),
                               blocks.role: training_step(dblocks, lambda i: d_loss())}, repeats)
    return {"flops_per_step": flops, "huginn_flops": flops_h, "seconds_per_step_median":
            {k: statistics.median(v) for k, v in times.items()},
            "seconds_per_step_mean": {k: statistics.mean(v) for k, v in times.items()},
            "saved_bytes_per_step": saved, "timing_repeats": repeats, "batch": N, "seq_len": base.data.seq_len}


# what DiffusionBlocks must reach of the end-to-end arm's final held-out figures (compute_ratios' targets): next-token
# accuracy, and cross-entropy (the end-to-end exact one against the chain's, the M chains' averaged prediction)
REACH = (("next-token accuracy", "next_token_accuracy", "next_token_accuracy", True),
         ("cross-entropy", "ce", "chain_ce", False))


def plot_compute(series: list[tuple[Arm, str, str]], flops: dict[str, float], path: Path) -> bool:
    """Each arm's held-out next-token accuracy and cross-entropy (`series`: arm, label, its cross-entropy's key)
    against training FLOPs (steps x FLOPs per step), every seed. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for n, (arm, label, ce) in enumerate(series):
        for i, r in enumerate(arm.runs):
            xs = [p["step"] * flops[arm.role] for p in r["curve"]]
            for ax, key in zip(axes, ("next_token_accuracy", ce)):
                scale = 100 if key == "next_token_accuracy" else 1
                ax.plot(xs, [scale * p[key] for p in r["curve"]], color=f"C{n}", alpha=0.8, marker="o", markersize=2,
                        label=(f"{label} ({key})" if i == 0 else None))
    first = series[0][0].runs[0]
    axes[0].set_ylabel(f"{first.get('eval_split', 'test')} next-token accuracy (%)")
    axes[1].set_ylabel("cross-entropy (nats per token)")
    for ax in axes:
        ax.set_xlabel("training FLOPs (FlopCounterMode)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"on the first {first.get('curve_n', '?')} windows, every seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compute_lines(c: dict, a: str, b: str) -> list[str]:
    """The report's lines on the compute of Huginn's arm `a` and DiffusionBlocks' arm `b` (and the plain control's)."""
    f, t, s, r = c["flops_per_step"], c["seconds_per_step_mean"], c["saved_bytes_per_step"], c["ratios"]
    h, med = c["huginn_flops"], c["seconds_per_step_median"]
    plain = "".join(f"; the plain control (no recurrence) {f[role] / 1e9:.3f} GFLOP per step"
                    for role in f if role not in (a, b))
    lines = [f"training compute per step (batch {c['batch']} x {c['seq_len']} tokens; FLOPs counted by torch's "
             f"FlopCounterMode: matrix products and attention, forward and backward): end-to-end (Huginn, r drawn "
             f"per step, mean {h['mean_recurrences']:.2f}) {f[a] / 1e9:.3f} GFLOP, DiffusionBlocks (one pass) "
             f"{f[b] / 1e9:.3f} GFLOP; wall time (mean of {c['timing_repeats']}, interleaved, AdamW included) "
             f"{1000 * t[a]:.1f} vs {1000 * t[b]:.1f} ms (medians {1000 * med[a]:.1f} vs {1000 * med[b]:.1f}); saved "
             f"for backward {s[a] / 2**20:.1f} vs {s[b] / 2**20:.1f} MiB{plain}",
             f"ratios, end-to-end / DiffusionBlocks: (a) per step {r['per_step']['flops']:.2f}x FLOPs, "
             f"{r['per_step']['seconds']:.2f}x time; (b) the paper's protocol ({r['protocol']['steps'][a]:g} vs "
             f"{r['protocol']['steps'][b]:g} steps) {r['protocol']['flops']:.2f}x FLOPs, "
             f"{r['protocol']['seconds']:.2f}x time. Neither is a compute reduction: (b) is compute spent, not "
             f"compute needed for a given quality"]
    for label, rows in r["reach"].items():
        cells = []
        for row in rows:
            if row["reached_at_step"] is None:
                cells.append(f"seed {row['seed']}: not reached (target {row['target']:.4f}, DiffusionBlocks ended at "
                             f"{row[f'{b}_final']:.4f})")
            else:
                cells.append(f"seed {row['seed']}: reached by step {row['reached_at_step']}, {row['flops']:.2f}x "
                             f"FLOPs, {row['seconds']:.2f}x time")
        lines.append(f"(c) compute for DiffusionBlocks to reach the end-to-end arm's final held-out {label} (the "
                     f"only compute reduction): " + "; ".join(cells))
    return lines


TASK = RecurrentTask


def _one_denoiser(cfg: RunConfig) -> None:
    """Recurrent depth's DiffusionBlocks: one block over the whole range of sigma (the core is tied), no overlap to
    widen; classification's training-input departures off (not measured for text)."""
    cfg.blocks.num_blocks, cfg.blocks.gamma = 1, 0.0
    cfg.chain.input_flip = cfg.chain.input_mix = 0.0


@preset("recurrent-cpu")
def preset_recurrent_cpu() -> RunConfig:
    """Recurrent depth on a 2-core CPU (`compare --task recurrent`: Huginn's training against DiffusionBlocks'
    single pass): Shakespeare in the text8 alphabet, windows of 128, prelude 1 / core 2 / coda 1 layers of width
    128 (4 heads, MLP x2, rotary positions), r_bar 8 (E[r] = 9), backpropagation through the last 4 iterations,
    batch 32, AdamW 1e-3 (lm-cpu's); the end-to-end arm trains 500 steps (2M tokens,
    half an epoch), DiffusionBlocks and the plain control 3 times as many (the paper's 5 vs 15 epochs). Scored at 8
    recurrences on the first 512 test windows."""
    cfg = RunConfig(task="recurrent")
    cfg.data = DataConfig(name="shakespeare", tokenizer="text8", seq_len=128, test_limit=512)
    cfg.model = BackboneConfig(depth=4, width=128, heads=4, mlp_ratio=2.0, positions="rope")
    cfg.recurrent = RecurrentConfig(prelude=1, core=2, coda=1, mean_recurrence=8, backprop_depth=4)
    _one_denoiser(cfg)
    cfg.train = TrainConfig(steps=500, batch_size=32, lr=1e-3, weight_decay=0.03, eval_limit=64, eval_batch_size=64,
                            log_every=20, ckpt_every=500)
    return cfg


@preset("recurrent-quick")
def preset_recurrent_quick() -> RunConfig:
    """About two minutes for the four arms of the recurrent-depth compare (a smoke run): 10 end-to-end steps (30 for
    DiffusionBlocks, the control and Huginn at DiffusionBlocks' steps), windows of 64, 32 test windows, evaluated and
    sampled at 4 recurrences."""
    cfg = preset_recurrent_cpu()
    cfg.data.seq_len, cfg.data.test_limit = 64, 32
    cfg.train.steps, cfg.train.eval_limit = 10, 16
    cfg.recurrent.eval_recurrences = 4
    return cfg


@preset("recurrent-lm1b")
def preset_recurrent_lm1b() -> RunConfig:
    """The paper's recurrent-depth setting for a GPU (Sec. 5.5, App. E.5): prelude 2 / core 4 / coda 2 layers of
    width 512 with 8 heads, r_bar 32, backpropagation through the last 8 iterations, LM1B (through HF `datasets`,
    a BPE of 8,192 symbols or data.tokenizer_file) in windows of 256, batch 256, AdamW 3e-4. train.steps is a
    placeholder for 5 epochs: set it from your corpus's token count (DiffusionBlocks trains 3 times as many)."""
    cfg = RunConfig(task="recurrent")
    cfg.data = DataConfig(name="lm1b", tokenizer="bpe", bpe_vocab=8192, seq_len=256)
    cfg.model = BackboneConfig(depth=8, width=512, heads=8, mlp_ratio=4.0, positions="rope")
    cfg.recurrent = RecurrentConfig(prelude=2, core=4, coda=2, mean_recurrence=32, backprop_depth=8)
    _one_denoiser(cfg)
    cfg.train = TrainConfig(steps=50_000, batch_size=256, lr=3e-4, weight_decay=0.03, warmup=0.02, eval_limit=512,
                            eval_batch_size=128, ckpt_every=2000, device="auto")
    return cfg
