"""The autoregressive language models (docs/METHOD.md section 7; the task is tasks/arlm.py) and the Euler chain over
the next token's embedding that tasks/recurrent.py shares; no TASK here.

End to end (AutoregressiveLM): a causal transformer of the same layers, sizes and data as the masked-diffusion
model, scored by its exact likelihood (the floor of `compare --task mdlm`). Each window is modelled on its own,
like masked diffusion's: position i reads [BOS] followed by x_<i (causal attention; [BOS] is an extra id, V) and
predicts x_i, so every token of a held-out window is scored, the first with no context. -log p(window) = sum over
its tokens of the cross-entropy, exactly; padding is never scored (and, being at the end of a window, never seen
by a real token).

DiffusionBlocks (ARDiffusionLM): B denoisers of the next token's normalised embedding over a noisy and a clean
copy of the window; it has no likelihood, so it is scored by next-token accuracy (the headline both forms share)
and its own labelled estimators. Both forms generate with a key/value cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import BlockStack, StackModel
from ..config import BackboneConfig, BlocksConfig, ChainConfig, section, setting
from ..models import NoisyCleanStem, NoisyHead, TokenHead, TokenStem, lm_layers
from ..nn import KVCache, run_layers
from ..noise import LogNormalLevels, Partition
from ..precond import ClassEmbedding, EDMPrecond, label_target
from ..sample import euler_step
from .base import evaluating
from .lm import token_ce


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
    sigma_data: float = setting(0.5, "EDM's data scale in the preconditioning (the paper's 0.5; the clean targets are "
                                     "unit-norm embedding rows, per-coordinate std 1/sqrt(model.width))",
                                range="(0, inf)")


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
    step reads of the clean windows x, computed once), optionally `chain_context(context, generator)` (what one
    chain's steps read: the context and that chain's own draws) and `step_logits(block, z, sigma, context)` (the
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

    def chain_context(self, context, generator: torch.Generator | None = None):
        """What one chain's steps read: the context itself (the clean tokens draw nothing)."""
        return context

    def bridge(self, logits: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """The x0 estimate from logits (ClassEmbedding.estimate): softmax(logits) @ e_hat ("soft"), e_hat[argmax]
        ("hard") or the soft one at unit norm ("unit"), from the same normalised rows as the training targets."""
        return self.labels.estimate(logits, kind or self.chain_cfg.bridge)

    def chains(self, x: torch.Tensor, draws: int = 1, generator: torch.Generator | None = None, *,
               steps_per_block: int | None = None, grid: str | None = None, bridge: str | None = None,
               init: str | None = None, context=None):
        """`draws` chains run in lockstep at every position of windows x (N, T) (the clean stream reads the true
        text): yields (k, sigma, m, logits (N, T, V) float32, estimate) for step k of chain m, every chain's step k
        before any chain's step k + 1, so a caller can average the chains' predictions step by step. Each chain's
        start (and its chain_context draws) are drawn up front, chain by chain."""
        steps = self.steps(steps_per_block, grid)
        context = self.context(x) if context is None else context
        shape = (*x.shape, self.labels.table.shape[1])
        states = []
        for _ in range(draws):
            z = self.start(shape, steps[0][0], init, generator, x.device)
            states.append([z, self.chain_context(context, generator)])
        for k, (s, s_next, block) in enumerate(steps):
            for m, state in enumerate(states):
                logits = self.step_logits(block, state[0], s, state[1]).float()
                estimate = self.bridge(logits, bridge)
                yield k, s, m, logits, estimate
                state[0] = euler_step(state[0], estimate, s, s_next)

    def chain(self, x: torch.Tensor, generator: torch.Generator | None = None, *, steps_per_block: int | None = None,
              grid: str | None = None, bridge: str | None = None, init: str | None = None, record=None):
        """One chain run at every position of windows x (N, T) at once (the clean stream reads the true text):
        the last step's logits (N, T, V), float32. record(k, sigma, logits, estimate) sees every step."""
        for k, s, _, logits, estimate in self.chains(x, 1, generator, steps_per_block=steps_per_block, grid=grid,
                                                     bridge=bridge, init=init):
            if record is not None:
                record(k, s, logits, estimate)
        return logits

    def draws(self, init: str | None = None, draws: int | None = None) -> int:
        """M, the chains per token of the chain cross-entropy: one when the chain is deterministic (init zero)."""
        return 1 if (init or self.chain_cfg.init) == "zero" else (draws or self.eval_draws)

    @torch.no_grad()
    def window_stats(self, x: torch.Tensor, pad: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     draws: int | None = None, **options) -> dict[str, torch.Tensor]:
        """Sums over the scored tokens of windows x (N, T) (padding not scored), from M chains run in lockstep: the
        cross-entropy at sigma_max (block 0 once, from pure noise); after every step, the hits of the chains'
        averaged prediction (the argmax of (1/M) sum_m p_m, the distribution the chain cross-entropy scores), the
        chain cross-entropy -log((1/M) sum_m p_m(x_i)) and the bridge's norm ||estimate|| (a mean over chains); at
        the last step, each chain's own greedy hits (one draw's accuracy, a mean over chains), top-1 probability,
        entropy and top-1 probability at temperature 2 (means over chains). `tokens`: how many were scored."""
        scored = torch.ones_like(x, dtype=torch.bool) if pad is None else ~pad
        w = scored.float()
        s_max = self.partition.levels.hi
        context = self.context(x)
        noise = self.start((*x.shape, self.labels.table.shape[1]), s_max, "noise", generator, x.device)
        first = self.step_logits(0, noise, s_max, self.chain_context(context, generator))
        out = {"ce_sigma_max": (token_ce(first, x) * w).sum().double(), "tokens": w.sum().double()}
        M = self.draws(options.get("init"), draws)
        steps = len(self.steps(options.get("steps_per_block"), options.get("grid")))
        per_step = {key: torch.zeros(steps, dtype=torch.float64)
                    for key in ("hits_per_step", "chain_nats_per_step", "bridge_norm_per_step")}
        last = dict.fromkeys(("single_chain_hits", "top1_last", "entropy_last", "top1_last_t2"), 0.0)
        for k, _, m, logits, estimate in self.chains(x, M, generator, context=context, **options):
            logp = logits.log_softmax(-1)
            if m == 0:
                prob, true_prob = 0.0, 0.0
            prob = prob + logp.exp()  # (N, T, V): the chains' summed prediction at step k
            true_prob = true_prob + logp.gather(-1, x[..., None]).squeeze(-1).exp().double()
            per_step["bridge_norm_per_step"][k] += (estimate.norm(dim=-1) * w).sum().double().cpu() / M
            if k == steps - 1:  # one chain's own figures at the last step, averaged over the chains
                last["single_chain_hits"] += ((logits.argmax(-1) == x).float() * w).sum().double() / M
                last["top1_last"] += (logp.max(-1).values.exp() * w).sum().double() / M
                last["entropy_last"] += (-(logp.exp() * logp).sum(-1) * w).sum().double() / M
                last["top1_last_t2"] += ((logits / 2).softmax(-1).max(-1).values * w).sum().double() / M
            if m == M - 1:  # every chain has taken step k: score the averaged prediction
                per_step["hits_per_step"][k] = ((prob.argmax(-1) == x).float() * w).sum().double().cpu()
                chain_nats = -(true_prob / M).clamp_min(1e-300).log()
                per_step["chain_nats_per_step"][k] = (chain_nats * w.double()).sum().cpu()
        out.update(chain_ce=per_step["chain_nats_per_step"][-1], hits=per_step["hits_per_step"][-1], **last,
                   **per_step)
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
            shared_stem_head=blocks.shared_stem_head, precond=EDMPrecond(a.sigma_data), checkpoint_every=m.checkpoint)
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
