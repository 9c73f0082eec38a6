"""The preconditioned denoiser and its per-sample losses (paper Eq. 1-2; Karras et al. 2022, Table 1).

A denoiser D(z, level, cond) estimates the clean target y from a noisy z. EDM wraps any inner network
F so that its input and output have unit variance at every noise level:

    D(z; s) = c_skip(s) z + c_out(s) F(c_in(s) z, c_noise(s), cond)

Losses return one value per sample; the trainer reduces them (so a weight can never broadcast
across the batch, the reference code's defect 1 in METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _expand(level: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample levels (N,), or a scalar, reshaped to broadcast against `like` (N, ...); levels per sample and
    token (N, T) for a `like` of (N, T, ...) (autoregressive DiffusionBlocks: a level per noisy token)."""
    level = torch.as_tensor(level, device=like.device)
    if level.ndim == 0:
        level = level.expand(like.shape[0])
    per_token = level.ndim == 2 and like.ndim > 2 and level.shape == like.shape[:2]
    if level.shape != (like.shape[0],) and not per_token:
        raise ValueError(f"expected one level per sample, shape ({like.shape[0]},), got {tuple(level.shape)}")
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return level.to(dtype).reshape(*level.shape, *[1] * (like.ndim - level.ndim))


@dataclass(frozen=True)
class EDMPrecond:
    """EDM preconditioning for the variance-exploding process z = y + sigma * eps."""

    sigma_data: float = 0.5

    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5

    def c_in(self, sigma):
        return 1 / (sigma**2 + self.sigma_data**2) ** 0.5

    def c_noise(self, sigma):
        return torch.log(torch.as_tensor(sigma)) / 4

    def weight(self, sigma):
        """Loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2 (Eq. 2)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def noise(self, y: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None):
        """z = y + sigma * eps, with sigma per sample."""
        eps = torch.randn(y.shape, generator=generator, dtype=y.dtype,
                          device=generator.device if generator is not None else y.device).to(y.device)
        return y + _expand(sigma, y) * eps

    def denoise(self, net: nn.Module, z: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        s = _expand(sigma, z)  # (N, 1, ..., 1)
        out = net(self.c_in(s) * z, self.c_noise(s.flatten()), cond)
        return self.c_skip(s) * z + self.c_out(s) * out


@dataclass(frozen=True)
class PlainPrecond:
    """No preconditioning: D = F(z, level, cond). For levels that are not a Gaussian noise scale, e.g.
    the masking time t of masked diffusion, where z holds token ids with some set to [MASK]."""

    def c_noise(self, level):
        return torch.as_tensor(level)

    def weight(self, level):
        return torch.ones_like(torch.as_tensor(level, dtype=torch.float32))

    def denoise(self, net: nn.Module, z: torch.Tensor, level: torch.Tensor, cond=None) -> torch.Tensor:
        level = torch.as_tensor(level, device=z.device)
        if level.ndim == 0:
            level = level.expand(z.shape[0])
        return net(z, level.float(), cond)


class Denoiser(nn.Module):
    """Any inner network net(z_in, c_noise, cond) made into a denoiser D(z, level, cond)."""

    def __init__(self, net: nn.Module, precond: EDMPrecond | PlainPrecond | None = None):
        super().__init__()
        self.net = net
        self.precond = precond if precond is not None else EDMPrecond()

    def forward(self, z: torch.Tensor, level: torch.Tensor, cond=None) -> torch.Tensor:
        return self.precond.denoise(self.net, z, level, cond)


# -- per-sample losses -------------------------------------------------------------------------


def _per_sample_weight(weight: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    if weight is None:
        return like.new_ones(n)
    weight = torch.as_tensor(weight, device=like.device, dtype=like.dtype)
    if weight.numel() != n:
        raise ValueError(f"expected one loss weight per sample ({n}), got shape {tuple(weight.shape)}")
    return weight.reshape(n)  # (N,): never (N, 1), which would broadcast a (N,) loss to (N, N)


def mse_loss(denoised: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """w * mean over non-batch dims of (D - y)^2. Shapes (N, ...) -> (N,)."""
    if denoised.shape != target.shape:
        raise ValueError(f"denoised {tuple(denoised.shape)} and target {tuple(target.shape)} differ in shape")
    per_sample = (denoised - target).square().flatten(1).mean(1)  # (N,)
    return _per_sample_weight(weight, target.shape[0], per_sample) * per_sample


def ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """w * cross-entropy for discrete targets (App. B/C). logits (N, ..., V), target (N, ...) int -> (N,).

    Over extra positions (tokens) the CE is averaged per sample, only where `mask` is true if given.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be target {tuple(target.shape)} plus a class dim")
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    ce = ce.reshape(target.shape[0], -1)  # (N, positions)
    if mask is None:
        per_sample = ce.mean(1)
    else:
        m = mask.reshape(target.shape[0], -1).to(ce.dtype)
        per_sample = (ce * m).sum(1) / m.sum(1).clamp(min=1)
    return _per_sample_weight(weight, target.shape[0], per_sample) * per_sample


class ClassEmbedding(nn.Module):
    """Discrete targets as points on the unit sphere: y = E[label] / ||E[label]|| (App. B).

    The table is a fixed random buffer by default so that independently trained blocks agree on their
    targets; ``learnable=True`` makes it a parameter (then it is a shared part of the model).
    ``expected(logits)`` is the soft x0 estimate softmax(logits) @ E_normalised that samplers use:
    the *same normalised rows* as the training targets (the reference code's defect 2 used raw rows).
    """

    def __init__(self, num_classes: int, dim: int, learnable: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        if num_classes < 2 or dim < 1:
            raise ValueError(f"need num_classes >= 2 and dim >= 1, got {num_classes}, {dim}")
        table = torch.randn(num_classes, dim, generator=generator)
        if learnable:
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table)

    @property
    def normalized(self) -> torch.Tensor:  # (V, D)
        return F.normalize(self.table, dim=-1)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.normalized[labels]

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1) @ self.normalized.to(logits.dtype)

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        return self.normalized[logits.argmax(-1)]

    def estimate(self, logits: torch.Tensor, kind: str = "soft") -> torch.Tensor:
        """The x0 estimate a sampler hands to the next step: "soft" softmax(logits) @ E_normalised, "hard" the
        argmax's row, or "unit" the soft estimate scaled back to unit norm (the norm of a clean target: a
        spread softmax shrinks the soft estimate towards 0)."""
        if kind == "soft":
            return self.expected(logits)
        if kind == "hard":
            return self.hard(logits)
        if kind == "unit":
            return F.normalize(self.expected(logits), dim=-1)
        raise ValueError(f"bridge={kind!r}: expected one of {', '.join(BRIDGES)}")


BRIDGES = ("soft", "hard", "unit")


def label_target(labels: ClassEmbedding, y: torch.Tensor, flip: float = 0.0, mix: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The clean points a training step noises for labels y (any shape) -> (*y.shape, Dy): the labels' normalised
    embeddings, with two optional departures (DiffusionClassifier.training_target says why): a fraction `flip`
    of the labels replaced by a uniformly drawn other label, and a fraction `mix` of the points replaced by a
    random soft mixture softmax(k * onehot(label) + g) @ E (k ~ U(0, 6), g ~ N(0, I))."""
    V = labels.table.shape[0]
    if flip:
        flipped = torch.rand(y.shape, generator=generator).to(y.device) < flip
        y = torch.where(flipped, (y + torch.randint(1, V, y.shape, generator=generator).to(y.device)) % V, y)
    target = labels(y)
    if mix:
        k = 6.0 * torch.rand(*y.shape, 1, generator=generator).to(y.device)
        g = torch.randn(*y.shape, V, generator=generator).to(y.device)
        mixed = (k * F.one_hot(y, V) + g).softmax(-1) @ labels.normalized
        pick = torch.rand(*y.shape, 1, generator=generator).to(y.device) < mix
        target = torch.where(pick, mixed, target)
    return target
