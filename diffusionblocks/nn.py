"""Layers with noise conditioning: the adaLN-zero residual layer and a transformer layer built from it.

Every layer of a block takes the state h and a conditioning vector c (the embedded noise level, plus
whatever the task adds, e.g. a class embedding) and returns the new state: ``layer(h, c) -> h``.
adaLN-zero (Peebles & Xie 2023, as in the paper Sec. 3.2) modulates a residual branch f:

    h + gate(c) * f(LN(h) * (1 + scale(c)) + shift(c))

with the (shift, scale, gate) projection zero-initialised, so a fresh layer is the identity. Two small
autograd functions make the conditioning free in memory: the layer saves for backward exactly what a
plain pre-norm layer saves (benchmarks/README.md, "Memory").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class NoiseEmbedding(nn.Module):
    """c_noise (N,) -> conditioning vector (N, dim): sinusoidal features, then a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10_000.0, scale: float = 1000.0):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {freq_dim}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.freq_dim, self.max_period, self.scale = freq_dim, max_period, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=c_noise.device) / half)
        # c_noise = ln(sigma)/4 is O(1); scaled up (model.noise_scale) so the low frequencies still resolve it
        args = self.scale * c_noise.float()[:, None] * freqs[None]  # (N, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class ModulatedNorm(torch.autograd.Function):
    """LN(h) * (1 + scale) + shift, fused: backward keeps h and the per-token statistics only.

    The straightforward composition also keeps LN(h) for the gradient of `scale`, one more activation
    of the full size per sublayer; here LN(h) is recomputed from h in backward (elementwise, cheap).
    What is saved is then exactly what a plain affine LayerNorm saves.
    """

    @staticmethod
    def forward(ctx, h, shift, scale, eps):
        normed, mean, rstd = torch.native_layer_norm(h, h.shape[-1:], None, None, eps)
        ctx.save_for_backward(h, mean, rstd, scale)
        return torch.addcmul(shift, normed, 1 + scale)

    @staticmethod
    def backward(ctx, g):
        h, mean, rstd, scale = ctx.saved_tensors
        grad_h = torch.ops.aten.native_layer_norm_backward(g * (1 + scale), h, h.shape[-1:], mean, rstd, None,
                                                           None, [True, False, False])[0]
        normed = ((h - mean) * rstd).to(h.dtype)  # LN(h) again, for the gradient of scale
        return grad_h, _sum_to(g, scale.shape), _sum_to(g * normed, scale.shape), None


class GatedResidual(torch.autograd.Function):
    """h + gate * linear(x, weight, bias), the end of an adaLN-zero sublayer.

    The gate's gradient needs the projection's output b; the straightforward composition keeps b (one
    more full-size activation per sublayer). Here b is recomputed from x in backward, and x is what the
    projection keeps anyway: one extra matmul of the output projection buys the memory back.
    """

    @staticmethod
    def forward(ctx, h, gate, x, weight, bias):
        ctx.save_for_backward(gate, x, weight, bias)
        return torch.addcmul(h, gate, F.linear(x, weight, bias))

    @staticmethod
    def backward(ctx, g):
        gate, x, weight, bias = ctx.saved_tensors
        need_h, need_gate, need_x, need_w, need_b = ctx.needs_input_grad
        grad_gate = grad_x = grad_w = grad_b = None
        if need_gate:
            grad_gate = _sum_to(g * F.linear(x, weight, bias), gate.shape)
        gb = g * gate
        if need_x:
            grad_x = gb @ weight
        if need_w:
            grad_w = gb.reshape(-1, gb.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if need_b and bias is not None:
            grad_b = gb.reshape(-1, gb.shape[-1]).sum(0)
        return g if need_h else None, grad_gate, grad_x, grad_w, grad_b


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast result back to `shape` (e.g. (N, T, D) -> (N, 1, D))."""
    lead = t.ndim - len(shape)
    dims = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and t.shape[i + lead] != 1)
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


class AdaLNZero(nn.Module):
    """A residual branch made into a conditioned layer: h + gate(c) * out(features(modulate(LN(h), c))).

    The branch exposes `features(x)` and its output projection `out` (an nn.Linear); splitting it there
    lets the layer keep no more activations than a plain pre-norm layer (ModulatedNorm, GatedResidual).
    """

    def __init__(self, branch: nn.Module, dim: int, cond_dim: int, eps: float = 1e-6, recompute_gate: bool = True):
        super().__init__()
        if not (hasattr(branch, "features") and isinstance(getattr(branch, "out", None), nn.Linear)):
            raise TypeError(f"{type(branch).__name__} must define features(x) and an nn.Linear `out`")
        self.branch, self.eps = branch, eps
        self.recompute_gate = recompute_gate  # False: keep out(x) for the gate (more memory, no extra matmul)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # h (N, T, D) or (N, D); c (N, Dc) -> shift, scale, gate (N, 1, D) or (N, D)
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        if h.ndim == 3:
            shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
        normed = ModulatedNorm.apply(h, shift, scale, self.eps)
        # an attention mask goes to an attention branch (SequenceLayer); other branches take none
        x = self.branch.features(normed) if mask is None else self.branch.features(normed, mask)
        if not self.recompute_gate:
            return torch.addcmul(h, gate, self.branch.out(x))
        return GatedResidual.apply(h, gate, x, self.branch.out.weight, self.branch.out.bias)


_ROTARY_TABLES: dict = {}


def rotary_tables(seq_len: int, head_dim: int, device, dtype, base: float = 10_000.0):
    """(cos, sin), each (T, Dh / 2): the angle p * base^(-2i / Dh) of pair i at position p. One table per head
    width, device and dtype is kept, grown to the next power of two when a longer sequence comes; views of it
    are returned."""
    key = (head_dim, str(device), dtype, base)
    if key not in _ROTARY_TABLES or len(_ROTARY_TABLES[key][0]) < seq_len:
        length = 1 << max(0, seq_len - 1).bit_length()
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angle = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
        _ROTARY_TABLES[key] = (angle.cos().to(device, dtype), angle.sin().to(device, dtype))
    cos, sin = _ROTARY_TABLES[key]
    return cos[:seq_len], sin[:seq_len]


def _rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = qkv.clone()
    c, s = cos[:, None], sin[:, None]  # (T, 1, Dh / 2): broadcast over heads
    for j in (0, 1):  # q and k; v is copied as it is
        x1, x2 = qkv[:, :, j, :, 0::2], qkv[:, :, j, :, 1::2]
        out[:, :, j, :, 0::2] = x1 * c - x2 * s
        out[:, :, j, :, 1::2] = x1 * s + x2 * c
    return out


class Rotary(torch.autograd.Function):
    """Rotary position embedding (RoPE, Su et al. 2021) of queries and keys: qkv (N, T, 3, H, Dh) -> the same
    with each pair (x_2i, x_2i+1) of q and k at position p turned by the angle p * base^(-2i / Dh), so that
    q_p . k_r depends on p - r only. Backward turns the gradient back (the transpose of a rotation is the
    rotation by the opposite angle): nothing is saved for backward, so a layer keeps what it keeps without it."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.tables = (cos, sin)  # constants (no gradient), not activations
        return _rotate(qkv, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.tables
        return _rotate(grad, cos, -sin), None, None


class KVCache:
    """Keys and values of earlier tokens, one entry per attention module, for decoding a token at a time: a call
    attends from its new tokens to the cached ones followed by the new ones, and appends the new tokens' first
    `keep` keys and values (the others, e.g. a noisy token that nothing else reads, are seen by this call only).
    `length` counts the cached tokens (every module holds as many)."""

    def __init__(self, keep: int = 0):
        self.kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length, self.keep = 0, keep

    def attend(self, module: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (N, H, T_new, Dh) -> the keys and values to attend to, (N, H, length + T_new, Dh)."""
        past = self.kv.get(module)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        if self.keep:
            kept = self.length + self.keep
            self.kv[module] = (keys[:, :, :kept], values[:, :, :kept])
        return keys, values

    def advance(self) -> None:
        """After a forward pass through every layer: the kept tokens are now cached."""
        self.length, self.keep = self.length + self.keep, 0


class AttentionLayout(NamedTuple):
    """What attention may be told besides the tokens: a boolean mask (True = may attend, broadcastable to
    (N, heads, T, T); None: every token sees every token), each token's position id for rotary positions
    ((T,) int; None: 0..T-1), and a key/value cache of earlier tokens (then the mask's keys are the cached
    tokens followed by the new ones). Two copies of a sequence laid end to end share their ids this way."""

    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    cache: KVCache | None = None


class Attention(nn.Module):
    """Multi-head self-attention over (N, T, D), optional boolean mask (True = may attend); with `rope`, rotary
    position embedding of queries and keys (the positions are then relative, and the stem adds none)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, rope: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by the number of heads {heads}")
        if rope and (dim // heads) % 2:
            raise ValueError(f"rotary positions need an even head width, got {dim} / {heads} = {dim / heads:g}")
        self.heads, self.dropout, self.rope = heads, dropout, rope
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def features(self, x: torch.Tensor, mask: torch.Tensor | AttentionLayout | None = None) -> torch.Tensor:
        N, T, D = x.shape
        mask, positions, cache = mask if isinstance(mask, AttentionLayout) else (mask, None, None)
        qkv = self.qkv(x).view(N, T, 3, self.heads, D // self.heads)
        if self.rope:
            span = T if positions is None else int(positions.max()) + 1
            cos, sin = rotary_tables(span, D // self.heads, x.device, x.dtype)
            if positions is not None:
                cos, sin = cos[positions], sin[positions]
            qkv = Rotary.apply(qkv, cos, sin)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (N, H, T, Dh)
        if cache is not None:
            k, v = cache.attend(self, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(N, T, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.features(x, mask))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc, self.drop, self.out = nn.Linear(dim, hidden), nn.Dropout(dropout), nn.Linear(hidden, dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.gelu(self.fc(x), approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer, both sublayers adaLN-zero conditioned: layer(h, c) -> h."""

    def __init__(self, dim: int, heads: int, cond_dim: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, recompute_gate: bool = True, rope: bool = False):
        super().__init__()
        cond_dim = cond_dim or dim
        self.attn = AdaLNZero(Attention(dim, heads, dropout, rope), dim, cond_dim, recompute_gate=recompute_gate)
        self.mlp = AdaLNZero(Mlp(dim, int(dim * mlp_ratio), dropout), dim, cond_dim, recompute_gate=recompute_gate)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(h, c), c)


class SequenceLayer(TransformerLayer):
    """A TransformerLayer whose conditioning also carries the attention mask: layer(h, (c, mask)) -> h, with c
    (N, Dc) and mask None (every token sees every token) or boolean, broadcastable to (N, heads, T, T), True =
    may attend (causal for autoregression, keys of padding hidden). The stem builds the pair once per forward,
    so a BlockStack passes it to every layer unchanged."""

    def forward(self, h: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        c, mask = cond
        return self.mlp(self.attn(h, c, mask), c)


class PreNormLayer(nn.Module):
    """The standard (unconditioned) pre-norm transformer layer, h + attn(LN(h)), then h + mlp(LN(h)).

    Not used by DiffusionBlocks; it is the reference that the conditioning's memory cost is measured
    against (`model.layer=prenorm` gives an end-to-end ViT built from it). It ignores c.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


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
