"""Backbones: the ViT pieces (patch embedding, a plain end-to-end classifier, and the stem and head that
make the same layers a label denoiser under the block wrapper), the DiT stem and head, the smallest
stem and head, for vectors, and the language-model pieces (token stem with an attention mask, tied head)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import cut
from .config import BackboneConfig
from .nn import AttentionLayout, NoiseEmbedding, PreNormLayer, SequenceLayer, TransformerLayer, run_layers


def vit_layers(m: BackboneConfig, layer: str | None = None) -> list[nn.Module]:
    """The backbone's transformer layers: adaLN-zero conditioned, or plain pre-norm ("prenorm", ignores c); `layer`
    defaults to the backbone's."""
    layer = layer or m.layer
    if layer == "prenorm":
        return [PreNormLayer(m.width, m.heads, m.mlp_ratio, m.dropout) for _ in range(m.depth)]
    if layer != "adaln":
        raise ValueError(f"layer={layer!r}: expected 'adaln' or 'prenorm'")
    return [TransformerLayer(m.width, m.heads, m.width, m.mlp_ratio, m.dropout, m.gate_recompute)
            for _ in range(m.depth)]


class PatchEmbed(nn.Module):
    """Images (N, C, H, W) -> patch tokens with learned positions (N, T, D), T = ceil(H/p) * ceil(W/p).
    Images whose sides are not a multiple of the patch are zero-padded on the bottom/right."""

    def __init__(self, image_size: tuple[int, int], channels: int, patch: int, width: int):
        super().__init__()
        self.image_size, self.patch = tuple(image_size), patch
        grid = [math.ceil(s / patch) for s in self.image_size]
        self.num_tokens = grid[0] * grid[1]
        self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.num_tokens, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"expected images of size {self.image_size}, got {tuple(x.shape[-2:])}")
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % self.patch, (-W) % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos  # (N, T, D)


class ViTClassifier(nn.Module):
    """The end-to-end baseline: [CLS] + patches through all layers, logits from the CLS token.

    It uses the same adaLN-zero layers as the block model with a zero conditioning vector, so the
    modulation reduces to learned per-layer shift/scale/gate (a pre-norm ViT with zero-init residual
    gates): the two methods differ only in how they are trained.
    """

    def __init__(self, layers: list[nn.Module], image_size, channels: int, patch: int, width: int, num_classes: int,
                 checkpoint_every: int = 0):
        super().__init__()
        self.width, self.checkpoint_every = width, checkpoint_every
        self.patches = PatchEmbed(image_size, channels, patch, width)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised CLS token (N, D) that the linear head reads."""
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.patches(x)], dim=1)  # (N, 1+T, D)
        c = h.new_zeros(x.shape[0], self.width)
        h = run_layers(self.layers, h, c, self.checkpoint_every)
        return self.norm(h[:, 0].contiguous())  # a copy, so backward keeps not all of h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, V)


class CutViT(nn.Module):
    """ViTClassifier's stem ([CLS] + patch embedding) and layers cut into blocks, for the methods that train
    each block on a loss of its own (methods/dgl.py, methods/dtp.py); the head is theirs.

    A subclass calls `build_stem` and `build_blocks` in the order that fixes its initial weights: layers first,
    then the stem, is ViTClassifier's order (the end-to-end model's weights for the same seed).
    """

    def build_stem(self, image_size, channels: int, patch: int, width: int):
        self.width = width
        self.patches = PatchEmbed(image_size, channels, patch, width)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))

    def build_blocks(self, layers: list[nn.Module], allocation: list[int], checkpoint_every: int = 0):
        self.allocation, self.num_layers, self.checkpoint_every = list(allocation), len(layers), checkpoint_every
        self.blocks = nn.ModuleList(nn.ModuleList(own) for own in cut(layers, allocation))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The first block's input: images (N, C, H, W) -> [CLS] + patch tokens (N, 1+T, D)."""
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), self.patches(x)], dim=1)

    def block(self, b: int, h: torch.Tensor) -> torch.Tensor:
        """Block b's layers, (N, 1+T, D) -> (N, 1+T, D), with a zero conditioning vector (as ViTClassifier)."""
        return run_layers(self.blocks[b], h, h.new_zeros(h.shape[0], self.width), self.checkpoint_every)

    def stem_parameters(self, b: int) -> list[nn.Parameter]:
        """What block b's loss trains besides its layers: block 0's graph starts at the image, so the stem."""
        return [*self.patches.parameters(), self.cls] if b == 0 else []


class LabelStem(nn.Module):
    """For the block wrapper: the noisy label embedding (times c_in) takes the CLS token's place.

    (z_in (N, Dy), c_noise (N,), images (N, C, H, W)) -> h (N, 1+T, D), c = noise embedding (N, D)
    """

    def __init__(self, image_size, channels: int, patch: int, width: int, label_dim: int,
                 noise_scale: float = 1000.0):
        super().__init__()
        self.patches = PatchEmbed(image_size, channels, patch, width)
        self.label_in = nn.Linear(label_dim, width)
        self.label_pos = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.noise = NoiseEmbedding(width, scale=noise_scale)

    def forward(self, z_in: torch.Tensor, c_noise: torch.Tensor, images: torch.Tensor):
        label = self.label_in(z_in)[:, None] + self.label_pos  # (N, 1, D)
        return torch.cat([label, self.patches(images)], dim=1), self.noise(c_noise)


class LabelHead(nn.Module):
    """h (N, 1+T, D) -> F (N, Dy), read at the label token. "plain": LayerNorm then Linear; "adaln": the
    LayerNorm's shift and scale come from the noise embedding c (DiT's final layer; zero-initialised, so it
    starts as a LayerNorm without affine)."""

    def __init__(self, width: int, label_dim: int, kind: str = "plain"):
        super().__init__()
        if kind not in ("plain", "adaln"):
            raise ValueError(f"unknown label head {kind!r}; expected 'plain' or 'adaln'")
        self.kind = kind
        self.norm = nn.LayerNorm(width, elementwise_affine=kind == "plain")
        if kind == "adaln":
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)
        self.out = nn.Linear(width, label_dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.norm(h[:, 0].contiguous())  # a copy: backward must not keep all of h alive
        if self.kind == "adaln":
            shift, scale = self.modulation(c).chunk(2, dim=-1)
            h = torch.addcmul(shift, h, 1 + scale)
        return self.out(h)


# -- DiT: the image denoiser (Peebles & Xie 2023) under the block wrapper ------------------------


class DiTStem(nn.Module):
    """(z_in (N, C, H, W), c_noise (N,), labels (N,) or None) -> patch tokens h (N, T, D) and the
    conditioning c = noise embedding + class embedding (N, D). Label `num_classes` is the null class of
    classifier-free guidance; an unconditional stem (num_classes 0) takes labels None."""

    def __init__(self, image_size, channels: int, patch: int, width: int, num_classes: int = 0,
                 noise_scale: float = 1000.0):
        super().__init__()
        self.patches = PatchEmbed(image_size, channels, patch, width)
        self.noise = NoiseEmbedding(width, scale=noise_scale)
        self.num_classes = num_classes
        if num_classes:
            self.classes = nn.Embedding(num_classes + 1, width)
            nn.init.normal_(self.classes.weight, std=0.02)

    def forward(self, z_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None):
        c = self.noise(c_noise)
        if self.num_classes:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels (num_classes = the null class)")
            c = c + self.classes(labels)
        elif labels is not None:
            raise ValueError("this model is unconditional: it takes no labels")
        return self.patches(z_in), c


class DiTHead(nn.Module):
    """DiT's final layer: adaLN (shift, scale) then a linear to patch pixels, unpatchified to an image.
    Zero-initialised, so a fresh network outputs F = 0 (D = c_skip z)."""

    def __init__(self, image_size, channels: int, patch: int, width: int):
        super().__init__()
        self.image_size, self.channels, self.patch = tuple(image_size), channels, patch
        self.grid = [math.ceil(s / patch) for s in self.image_size]
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, patch * patch * channels)
        for layer in (self.modulation[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)
        x = self.out(torch.addcmul(shift, self.norm(h), 1 + scale))  # (N, T, p*p*C)
        N, (gh, gw), p, C = x.shape[0], self.grid, self.patch, self.channels
        x = x.view(N, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, gh * p, gw * p)
        return x[..., :self.image_size[0], :self.image_size[1]]


# -- vectors: the smallest denoiser (README's minimal use, tests) ------------------------------------------


class VectorStem(nn.Module):
    """(z_in (N, Dz), c_noise (N,), cond (N, Dx) or None) -> h (N, D), c = noise embedding (N, D)."""

    def __init__(self, dz: int, dim: int, cond_dim: int = 0, freq_dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(dz + cond_dim, dim)
        self.noise = NoiseEmbedding(dim, freq_dim=freq_dim)

    def forward(self, z_in: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None):
        x = z_in if cond is None else torch.cat([z_in, cond], dim=-1)
        return self.embed(x), self.noise(c_noise)


class VectorHead(nn.Module):
    """h (N, D) -> F (N, Dz)."""

    def __init__(self, dim: int, dz: int):
        super().__init__()
        self.out = nn.Linear(dim, dz)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.out(h)


# -- language models: token stem and tied head around SequenceLayer stacks (tasks mdlm, arlm) ---------------


def lm_layers(m: BackboneConfig, depth: int | None = None) -> list[nn.Module]:
    """The backbone's adaLN-zero transformer layers (`depth` of them, default its depth) that take (c, attention
    mask) as their conditioning; with positions=rope, rotary positions in attention."""
    return [SequenceLayer(m.width, m.heads, m.width, m.mlp_ratio, m.dropout, m.gate_recompute, m.positions == "rope")
            for _ in range(m.depth if depth is None else depth)]


def attention_mask(seq_len: int, causal: bool, pad: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean mask (True = may attend) for SequenceLayer: lower-triangular (T, T) when causal, the keys of
    padding hidden (N, 1, 1, T) when `pad` (N, T) marks any; None when neither (attention's fast path)."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril() if causal else None
    if pad is not None and bool(pad.any()):
        keys = ~pad[:, None, None, :]  # (N, 1, 1, T)
        mask = keys if mask is None else keys & mask
    return mask


def noisy_clean_layout(seq_len: int, device=None) -> AttentionLayout:
    """Attention over a noisy copy and a clean copy of a sequence laid end to end, [z_1..z_T ; x_1..x_T] (block
    diffusion with blocks of one token, paper App. E.4): z_i sees itself and x_<i, x_i sees x_<=i, nothing else
    (so the clean half is an ordinary causal transformer, and no clean token ever reads a noisy one); both copies
    of position i carry position id i."""
    i = torch.arange(seq_len, device=device)
    earlier = i[None, :] < i[:, None]  # (query i, key j): j < i
    mask = torch.zeros(2 * seq_len, 2 * seq_len, dtype=torch.bool, device=device)
    mask[:seq_len, :seq_len] = torch.eye(seq_len, dtype=torch.bool, device=device)  # z_i -> z_i
    mask[:seq_len, seq_len:] = earlier  # z_i -> x_<i
    mask[seq_len:, seq_len:] = earlier | torch.eye(seq_len, dtype=torch.bool, device=device)  # x_i -> x_<=i
    return AttentionLayout(mask, torch.cat([i, i]))


class TokenStem(nn.Module):
    """(tokens (N, T) int, c_noise (N,) or None, pad (N, T) bool or None) -> h (N, T, D), (c (N, D), mask).

    h = token embedding + learned position (none when the layers rotate queries and keys, model.positions=rope).
    The table has `num_embeddings` rows: the vocabulary and the task's
    extra ids ([MASK] for masked diffusion, [BOS] for autoregression). c is the embedded noise level (the
    masking time t) when `conditioned`, else zeros: the adaLN-zero modulation then reduces to learned per-layer
    shift/scale/gate, as in ViTClassifier. The attention mask is causal when `causal` and hides padding keys.
    """

    def __init__(self, num_embeddings: int, seq_len: int, width: int, *, causal: bool = False,
                 conditioned: bool = True, noise_scale: float = 1000.0, learned_positions: bool = True):
        super().__init__()
        self.width, self.seq_len, self.causal = width, seq_len, causal
        self.embed = nn.Embedding(num_embeddings, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        # learned absolute positions, or none here (the layers' attention rotates queries and keys: rope)
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq_len, width)) if learned_positions else None
        self.noise = NoiseEmbedding(width, scale=noise_scale) if conditioned else None

    def forward(self, tokens: torch.Tensor, c_noise: torch.Tensor | None = None, pad: torch.Tensor | None = None):
        N, T = tokens.shape
        if tokens.shape[1] > self.seq_len:
            raise ValueError(f"a sequence of {T} tokens is longer than the model's {self.seq_len} positions")
        h = self.embed(tokens)  # (N, T, D)
        if self.pos is not None:
            h = h + self.pos[:, :T]
        c = self.noise(c_noise) if self.noise is not None else h.new_zeros(N, self.width)
        return h, (c, attention_mask(T, self.causal, pad, tokens.device))

    def decode(self, tokens: torch.Tensor, cache) -> tuple[torch.Tensor, tuple]:
        """A causal, unconditioned stem's decoding call: tokens (N, C) after the cache's -> h, (c, layout)."""
        if not self.causal or self.noise is not None:
            raise ValueError("a key/value cache is for a causal stem without noise conditioning")
        past, C = cache.length, tokens.shape[1]
        if past + C > self.seq_len:
            raise ValueError(f"position {past + C - 1} is past the model's {self.seq_len} positions")
        h = self.embed(tokens)
        if self.pos is not None:
            h = h + self.pos[:, past:past + C]
        return h, (h.new_zeros(tokens.shape[0], self.width), decode_layout(past, C, False, cache, tokens.device))


class TokenHead(nn.Module):
    """h (N, T, D) -> logits (N, T, V) over the vocabulary: a final LayerNorm, then the input embedding
    transposed (tied weights; the rows of the extra ids are never predicted). `embed` is the stem's table: the
    same module, so state dicts list it under both names and checkpoints save it once (io.TIED_KEY)."""

    def __init__(self, embed: nn.Embedding, width: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.embed, self.vocab_size = embed, vocab_size

    def forward(self, h: torch.Tensor, cond=None) -> torch.Tensor:
        return F.linear(self.norm(h), self.embed.weight[:self.vocab_size])


def decode_layout(past: int, new: int, noisy: bool, cache, device=None) -> AttentionLayout:
    """The layout of a decoding call with a key/value cache of `past` clean tokens: `new` clean tokens (positions
    past..past+new-1; each sees the cache and the new clean tokens up to itself), then, if `noisy`, one noisy
    token at position past+new that sees every clean token and itself. The keys are the cached tokens followed
    by the call's tokens, in that order; the cache keeps the new clean tokens."""
    queries, keys = new + noisy, past + new + noisy
    q = torch.arange(queries, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    mask = k <= past + q  # clean query j sees keys up to its own, past + j
    if noisy:
        mask[-1] = True  # the noisy token: every clean token, and itself (its key is the last)
    positions = torch.arange(past, past + queries, device=device)
    cache.keep = new
    return AttentionLayout(mask, positions, cache)


class NoisyCleanStem(nn.Module):
    """Autoregressive DiffusionBlocks' stem (paper App. E.4): (z_in (N, T, Dy), c_noise, x (N, T)) -> h (N, 2T, D) =
    [noisy ; clean] and (c (N, D), the noisy/clean layout). The noisy token i is a linear map of c_in z_i, the
    clean token i the embedding of x_i; with learned positions both get position i's vector (rotary positions:
    both carry id i). The noise level: `noise_level`="token": c_noise (N, T), one level per noisy token, its
    embedding added to that token, and c = 0 (the clean stream never sees a level); "window": c_noise (N,), one
    level per window, c its embedding, given to every layer of every token by adaLN."""

    def __init__(self, vocab_size: int, seq_len: int, width: int, label_dim: int, *, noise_level: str = "window",
                 noise_scale: float = 1000.0, learned_positions: bool = True):
        super().__init__()
        if noise_level not in ("token", "window"):
            raise ValueError(f"noise_level={noise_level!r}: expected 'token' or 'window'")
        self.width, self.seq_len, self.noise_level = width, seq_len, noise_level
        self.embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.noisy_in = nn.Linear(label_dim, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq_len, width)) if learned_positions else None
        self.noise = NoiseEmbedding(width, scale=noise_scale)

    def _noisy(self, z_in: torch.Tensor, c_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy tokens (N, Tz, D) and c (N, D)."""
        h = self.noisy_in(z_in)
        if self.noise_level == "token":
            level = self.noise(c_noise.reshape(-1)).view(*z_in.shape[:2], self.width)
            return h + level.to(h.dtype), h.new_zeros(h.shape[0], self.width)
        return h, self.noise(c_noise.reshape(-1)).to(h.dtype)

    def _at(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return h if self.pos is None else h + self.pos[:, positions]

    def forward(self, z_in: torch.Tensor, c_noise: torch.Tensor, x: torch.Tensor):
        length = x.shape[1]
        if length > self.seq_len:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's {self.seq_len} positions")
        noisy, c = self._noisy(z_in, c_noise)
        i = torch.arange(length, device=x.device)
        h = torch.cat([self._at(noisy, i), self._at(self.embed(x), i)], dim=1)
        return h, (c, noisy_clean_layout(length, x.device))

    def decode(self, z_in: torch.Tensor, c_noise: torch.Tensor, x_new: torch.Tensor, cache):
        """One decoding call: the clean tokens x_new (N, C) after the cache's, then the noisy token z_in (N, 1, Dy)
        at the next position -> h (N, C + 1, D), (c, layout with the cache)."""
        past, C = cache.length, x_new.shape[1]
        if past + C >= self.seq_len:
            raise ValueError(f"position {past + C} is past the model's {self.seq_len} positions")
        noisy, c = self._noisy(z_in, c_noise)
        positions = torch.arange(past, past + C + 1, device=x_new.device)
        h = self._at(torch.cat([self.embed(x_new), noisy], dim=1), positions)
        return h, (c, decode_layout(past, C, True, cache, x_new.device))


class NoisyHead(nn.Module):
    """h (N, 2T, D) = [noisy ; clean] -> F (N, T, Dy), read at the noisy tokens: LayerNorm, then Linear."""

    def __init__(self, width: int, label_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, label_dim)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(h))

    def forward(self, h: torch.Tensor, cond=None) -> torch.Tensor:
        return self.project(h[:, :h.shape[1] // 2].contiguous())  # a copy: backward must not keep all of h
