"""Autoregressive language modelling, end to end: a causal transformer of the same layers, sizes and data as the
masked-diffusion model, scored by its exact likelihood. It is the floor of `compare --task mdlm` (its
DiffusionBlocks version, a denoiser of next-token embeddings, is issue 13: METHOD.md section 7).

Each window is modelled on its own, like masked diffusion's: position i reads [BOS] followed by x_<i (causal
attention; [BOS] is an extra id, V) and predicts x_i, so every token of a held-out window is scored, the first
with no context. -log p(window) = sum over its tokens of the cross-entropy, exactly; padding is never scored
(and, being at the end of a window, never seen by a real token).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig
from ..models import TokenHead, TokenStem, lm_layers
from ..nn import run_layers
from .lm import LMTask, TextData, token_ce


class AutoregressiveLM(nn.Module):
    """A causal transformer LM over windows of data.seq_len tokens, tied input and output embeddings."""

    def __init__(self, cfg: RunConfig, vocab_size: int):
        super().__init__()
        m = cfg.model
        self.vocab_size, self.bos, self.seq_len = vocab_size, vocab_size, cfg.data.seq_len
        self.num_layers, self.checkpoint_every = m.depth, m.checkpoint
        self.stem = TokenStem(vocab_size + 1, cfg.data.seq_len, m.width, causal=True, conditioned=False,
                              learned_positions=m.positions == "learned")
        self.layers = nn.ModuleList(lm_layers(m.depth, m.width, m.heads, m.mlp_ratio, m.dropout,
                                              recompute_gate=m.gate_recompute, rope=m.positions == "rope"))
        self.head = TokenHead(self.stem.embed, m.width, vocab_size)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, T) -> logits (N, T, V); position i reads [BOS] + x_<i."""
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

    @torch.no_grad()
    def sample(self, num: int, length: int, prompt: torch.Tensor | None = None, *,
               generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """`num` continuations of `prompt` to `length` tokens (N, length), one token per forward pass; past
        seq_len the model reads the last seq_len - 1 tokens after [BOS], a window as in training."""
        out = torch.empty(num, 0, dtype=torch.long, device=device)
        if prompt is not None and len(prompt):
            out = prompt.to(device).expand(num, -1).clone()
        was_training = self.training
        self.eval()
        try:
            while out.shape[1] < length:
                context = out[:, max(0, out.shape[1] - self.seq_len + 1):]
                # append a placeholder: the logits at the last position read [BOS] + the whole context
                window = torch.cat([context, out.new_zeros(num, 1)], dim=1)
                probs = self.logits(window)[:, -1].float().softmax(-1).cpu()
                out = torch.cat([out, torch.multinomial(probs, 1, generator=generator).to(device)], dim=1)
        finally:
            self.train(was_training)
        return out


class ARLMTask(LMTask):
    """Autoregressive language modelling (end to end only in this issue), exact bits per character."""

    name = "arlm"
    compare_roles = ("e2e", "control")
    presets = {"full": "lm-cpu", "quick": "lm-quick", "offline": "lm-cpu", "offline-quick": "lm-quick"}

    def build_model(self, cfg: RunConfig, data: TextData, form: str) -> nn.Module:
        if form != "end-to-end":
            raise ValueError(f"task 'arlm' trains end to end only (train.method=e2e); its DiffusionBlocks version "
                             f"(training form {form!r}) is not built yet")
        return AutoregressiveLM(cfg, data.vocab_size)

    def plan_layer_bytes(self, cfg: RunConfig, shapes, element: int) -> int:
        """Attention converts the boolean causal mask into an additive (T, T) mask of the model's dtype, and
        every layer keeps its own."""
        return cfg.data.seq_len ** 2 * element

    def _how(self, ev: dict) -> str:
        return " (exact)"


TASK = ARLMTask
