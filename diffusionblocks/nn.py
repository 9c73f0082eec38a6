"""Layers with noise conditioning: the adaLN-zero residual layer and a transformer layer built from it.

Every layer of a block takes the state h and a conditioning vector c (the embedded noise level, plus
whatever the task adds, e.g. a class embedding) and returns the new state: ``layer(h, c) -> h``.
adaLN-zero (Peebles & Xie 2023, as in the paper Sec. 3.2) modulates a residual branch f:

    h + gate(c) * f(LN(h) * (1 + scale(c)) + shift(c))

with the (shift, scale, gate) projection zero-initialised, so a fresh layer is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class NoiseEmbedding(nn.Module):
    """c_noise (N,) -> conditioning vector (N, dim): sinusoidal features, then a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {freq_dim}")
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=c_noise.device) / half)
        # c_noise = ln(sigma)/4 is O(1); scale it up so the low frequencies still resolve it
        args = 1000.0 * c_noise.float()[:, None] * freqs[None]  # (N, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class AdaLNZero(nn.Module):
    """A residual branch f(x) (shape-preserving on the last dim) made into a conditioned layer."""

    def __init__(self, branch: nn.Module, dim: int, cond_dim: int):
        super().__init__()
        self.branch = branch
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # h (N, T, D) or (N, D); c (N, Dc) -> shift, scale, gate (N, 1, D) or (N, D)
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        if h.ndim == 3:
            shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
        return h + gate * self.branch(torch.addcmul(shift, self.norm(h), 1 + scale))


class Attention(nn.Module):
    """Multi-head self-attention over (N, T, D), optional boolean mask (True = may attend)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by the number of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (N, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                         nn.Linear(hidden, dim))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer, both sublayers adaLN-zero conditioned: layer(h, c) -> h."""

    def __init__(self, dim: int, heads: int, cond_dim: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.0):
        super().__init__()
        cond_dim = cond_dim or dim
        self.attn = AdaLNZero(Attention(dim, heads, dropout), dim, cond_dim)
        self.mlp = AdaLNZero(Mlp(dim, int(dim * mlp_ratio), dropout), dim, cond_dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(h, c), c)


class ResidualMLP(nn.Module):
    """The smallest conditioned residual layer, for vectors (N, D): h + gate * MLP(modulated LN(h))."""

    def __init__(self, dim: int, cond_dim: int | None = None, hidden: int | None = None):
        super().__init__()
        self.layer = AdaLNZero(Mlp(dim, hidden or 4 * dim), dim, cond_dim or dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.layer(h, c)


def run_layers(layers: Sequence[nn.Module], h: torch.Tensor, c: torch.Tensor, checkpoint_every: int = 0):
    """h -> layer_n(... layer_1(h, c) ..., c). With checkpoint_every = k > 0 (and autograd recording),
    each group of k layers keeps only its input for backward and recomputes the rest (activation
    checkpointing: less memory, one more forward of each group)."""
    if checkpoint_every <= 0 or not torch.is_grad_enabled():
        for layer in layers:
            h = layer(h, c)
        return h

    def group(h, c, chunk):
        for layer in chunk:
            h = layer(h, c)
        return h

    layers = list(layers)
    for i in range(0, len(layers), checkpoint_every):
        h = checkpoint(group, h, c, layers[i:i + checkpoint_every], use_reentrant=False)
    return h
