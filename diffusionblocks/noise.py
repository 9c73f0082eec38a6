"""Noise levels and their partition into blocks (paper Sec. 3.3, App. C and D).

A *level* says how noisy a training example is: the EDM noise scale sigma for continuous targets, or
the masking time t for masked (absorbing-state) diffusion. Both are described by a distribution over
[lo, hi] with a CDF, and "higher level = noisier". A :class:`Partition` cuts [lo, hi] into
``num_blocks`` intervals; block 0 owns the highest levels and runs first at inference.

All level arithmetic is done in float64 (the tails of the log-normal need it) and returned in float64;
callers cast to their working dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

PARTITION_KINDS = ("equiprob", "uniform-log")
GRID_KINDS = ("equiprob", "cdf", "karras")


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device="cpu")


class Levels(Protocol):
    """What the partition needs from a distribution of noise levels."""

    name: str  # "sigma" or "t", used in messages and tables

    @property
    def lo(self) -> float: ...
    @property
    def hi(self) -> float: ...
    def cdf(self, level: torch.Tensor) -> torch.Tensor: ...  # training mass below `level`, in [0, 1]
    def icdf(self, u: torch.Tensor) -> torch.Tensor: ...  # inverse of cdf
    def warp(self, level: torch.Tensor) -> torch.Tensor: ...  # space where overlap widens intervals
    def unwarp(self, w: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class LogNormalLevels:
    """EDM training noise: ln sigma ~ N(p_mean, p_std^2), truncated to [sigma_min, sigma_max]."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    name = "sigma"

    def __post_init__(self):
        if not (self.sigma_min > 0 and math.isfinite(self.sigma_max)):
            raise ValueError(f"need 0 < sigma_min and a finite sigma_max, got sigma_min={self.sigma_min}, "
                             f"sigma_max={self.sigma_max}")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={self.sigma_min} >= "
                             f"sigma_max={self.sigma_max}")
        if not self.p_std > 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")

    @property
    def lo(self) -> float:
        return self.sigma_min

    @property
    def hi(self) -> float:
        return self.sigma_max

    def _phi(self, sigma: torch.Tensor) -> torch.Tensor:  # untruncated normal CDF of ln sigma
        return torch.special.ndtr((torch.log(_f64(sigma)) - self.p_mean) / self.p_std)

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        q_min, q_max = self._phi(self.sigma_min), self._phi(self.sigma_max)
        return ((self._phi(sigma) - q_min) / (q_max - q_min)).clamp(0.0, 1.0)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        q_min, q_max = self._phi(self.sigma_min), self._phi(self.sigma_max)
        q = q_min + _f64(u) * (q_max - q_min)
        sigma = torch.exp(self.p_mean + self.p_std * torch.special.ndtri(q))
        return sigma.clamp(self.sigma_min, self.sigma_max)  # ndtri's last ulp must not leave the range

    def warp(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(_f64(sigma))

    def unwarp(self, w: torch.Tensor) -> torch.Tensor:
        return torch.exp(_f64(w))


@dataclass(frozen=True)
class MaskLevels:
    """Masked-diffusion time t in [t_min, t_max]: a token is masked with probability 1 - alpha(t).

    The training mass is uniform in alpha (App. D), so with the linear schedule alpha(t) = 1 - t it is
    uniform in t and block b of B owns t in [1 - (b+1)/B, 1 - b/B]. The cosine schedule
    alpha(t) = cos(pi t / 2) is offered for experiments; its mass is still uniform in alpha.
    """

    schedule: str = "linear"
    t_min: float = 0.0
    t_max: float = 1.0
    name = "t"

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown mask schedule {self.schedule!r}; expected 'linear' or 'cosine'")
        if not (0.0 <= self.t_min < self.t_max <= 1.0):
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")

    @property
    def lo(self) -> float:
        return self.t_min

    @property
    def hi(self) -> float:
        return self.t_max

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t."""
        t = _f64(t)
        return 1.0 - t if self.schedule == "linear" else torch.cos(0.5 * math.pi * t)

    def mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha(t)

    def _alpha_inv(self, a: torch.Tensor) -> torch.Tensor:
        return 1.0 - a if self.schedule == "linear" else torch.arccos(a.clamp(-1.0, 1.0)) * (2.0 / math.pi)

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        a_lo, a_hi = self.alpha(_f64(self.t_min)), self.alpha(_f64(self.t_max))
        return ((a_lo - self.alpha(t)) / (a_lo - a_hi)).clamp(0.0, 1.0)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        a_lo, a_hi = self.alpha(_f64(self.t_min)), self.alpha(_f64(self.t_max))
        return self._alpha_inv(a_lo - _f64(u) * (a_lo - a_hi)).clamp(self.t_min, self.t_max)

    def warp(self, t: torch.Tensor) -> torch.Tensor:
        return _f64(t)

    def unwarp(self, w: torch.Tensor) -> torch.Tensor:
        return _f64(w)


class Partition:
    """``num_blocks`` contiguous level intervals; block 0 owns the highest (noisiest) levels.

    ``boundaries`` holds the B+1 interval edges in *ascending* order, so block b owns
    [boundaries[B-1-b], boundaries[B-b]]. For routing, a level that sits exactly on an inner edge
    belongs to the lower (less noisy) block, whose upper edge it is; the inference grid starts each
    block exactly there.
    """

    def __init__(self, levels: Levels, boundaries: torch.Tensor, gamma: float = 0.0, kind: str = "custom"):
        boundaries = _f64(boundaries).flatten()
        if boundaries.numel() < 2:
            raise ValueError("a partition needs at least 2 boundaries (1 block)")
        if not bool((boundaries[1:] > boundaries[:-1]).all()):
            raise ValueError(f"partition boundaries must be strictly ascending, got {boundaries.tolist()}")
        if abs(boundaries[0].item() - levels.lo) > 1e-12 or abs(boundaries[-1].item() - levels.hi) > 1e-9:
            raise ValueError(f"partition boundaries must span [{levels.lo}, {levels.hi}], "
                             f"got [{boundaries[0].item()}, {boundaries[-1].item()}]")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"overlap gamma must be a finite number >= 0, got {gamma!r}")
        self.levels = levels
        self.boundaries = boundaries
        self.gamma = float(gamma)
        self.kind = kind

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, levels: Levels, num_blocks: int, kind: str = "equiprob", gamma: float = 0.05) -> Partition:
        """Equi-probability (each block carries 1/B of the training mass, Sec. 3.3) or uniform in
        the warped level (equal intervals in ln sigma: the App. E.6.2 ablation baseline). The overlap
        gamma defaults to the paper's 0.05 (App. C; 0.1 for text)."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        frac = torch.arange(num_blocks + 1, dtype=torch.float64, device="cpu") / num_blocks
        if kind == "equiprob":
            edges = levels.icdf(frac)
        elif kind == "uniform-log":
            if not isinstance(levels, LogNormalLevels):
                raise ValueError(f"partition kind 'uniform-log' needs sigma levels; for {levels.name} "
                                 f"levels use 'equiprob'")
            w_lo, w_hi = levels.warp(_f64(levels.lo)), levels.warp(_f64(levels.hi))
            edges = levels.unwarp(w_lo + frac * (w_hi - w_lo))
        else:
            raise ValueError(f"unknown partition kind {kind!r}; expected one of {PARTITION_KINDS}")
        edges[0], edges[-1] = levels.lo, levels.hi  # exact ends, whatever the rounding of icdf/exp
        return cls(levels, edges, gamma=gamma, kind=kind)

    @property
    def num_blocks(self) -> int:
        return self.boundaries.numel() - 1

    def _check_block(self, block: int) -> int:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be an integer in [0, {self.num_blocks - 1}], got {block!r}")
        return block

    # -- per-block intervals ------------------------------------------------------------------

    def interval(self, block: int) -> tuple[float, float]:
        """The (lo, hi) levels block `block` owns at inference."""
        b = self.num_blocks - 1 - self._check_block(block)
        return self.boundaries[b].item(), self.boundaries[b + 1].item()

    def training_interval(self, block: int) -> tuple[float, float]:
        """The owned interval widened by the overlap gamma in warped (log-sigma) space, clamped to
        the global range: [lo, hi] -> [lo / a, hi * a] with a = (hi / lo)^gamma for sigma (App. C)."""
        lo, hi = self.interval(block)
        if self.gamma == 0.0:
            return lo, hi
        w_lo, w_hi = self.levels.warp(_f64(lo)), self.levels.warp(_f64(hi))
        pad = self.gamma * (w_hi - w_lo)
        lo_w = self.levels.unwarp(w_lo - pad).item()
        hi_w = self.levels.unwarp(w_hi + pad).item()
        return max(lo_w, self.levels.lo), min(hi_w, self.levels.hi)

    def mass(self, block: int, widened: bool = False) -> float:
        """Training probability mass of the block's interval (1/B for an equi-probability partition)."""
        lo, hi = self.training_interval(block) if widened else self.interval(block)
        return (self.levels.cdf(_f64(hi)) - self.levels.cdf(_f64(lo))).item()

    # -- sampling and routing -----------------------------------------------------------------

    def sample(self, block: int, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """n training levels for `block`, by inverse-CDF sampling of the training density truncated
        to the block's widened interval. Returns float64 of shape (n,)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of samples must be an integer >= 0, got {n!r}")
        lo, hi = self.training_interval(block)
        u_lo, u_hi = self.levels.cdf(_f64(lo)), self.levels.cdf(_f64(hi))
        gen_device = generator.device if generator is not None else "cpu"
        r = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)
        level = self.levels.icdf(u_lo + r.cpu() * (u_hi - u_lo)).clamp(lo, hi)
        return level.to(device) if device is not None else level

    def check_levels(self, level: torch.Tensor) -> None:
        level = torch.as_tensor(level)
        if level.numel() == 0:
            return
        bad = (level < self.levels.lo) | (level > self.levels.hi) | torch.isnan(level)
        if bool(bad.any()):
            raise ValueError(f"{self.levels.name} outside the range [{self.levels.lo}, {self.levels.hi}]: "
                             f"{level[bad].flatten()[:5].tolist()}")

    def route(self, level: torch.Tensor | float) -> torch.Tensor:
        """Index of the block that owns each level (same shape as `level`, int64).

        Levels are compared with the edges rounded to the levels' dtype, so a float32 sampler grid
        routes exactly like its float64 original."""
        level = torch.as_tensor(level)
        self.check_levels(level)
        # compare in the level's own dtype: a float32 grid level equals the float32 edge exactly
        dtype = level.dtype if level.is_floating_point() else torch.float64
        inner = self.boundaries[1:-1].to(device=level.device, dtype=dtype)
        from_bottom = torch.searchsorted(inner, level.to(dtype).contiguous(), right=False)
        return (self.num_blocks - 1) - from_bottom

    # -- inference grid -----------------------------------------------------------------------

    def inference_grid(self, steps_per_block: int = 1, kind: str = "equiprob", rho: float = 7.0) -> torch.Tensor:
        """Descending levels for a sampler: num_blocks * steps_per_block levels, then a final 0.

        "equiprob": each block's interval split into steps_per_block equal parts of training mass, the
        block's first step exactly at its upper edge (for an equi-probability partition this is the grid
        equally spaced in the truncated CDF). "cdf": equally spaced in the truncated CDF over the whole range,
        whatever the partition (the same grid for every partition of the same levels). "karras": the EDM
        rho-schedule between the range ends. With "cdf" and "karras" blocks may get unequal step counts;
        routing picks the owner of each level.
        """
        if isinstance(steps_per_block, bool) or not isinstance(steps_per_block, int) or steps_per_block < 1:
            raise ValueError(f"steps_per_block must be an integer >= 1, got {steps_per_block!r}")
        n = self.num_blocks * steps_per_block
        if kind == "equiprob":
            k = torch.arange(steps_per_block, dtype=torch.float64, device="cpu") / steps_per_block
            parts = []
            for b in range(self.num_blocks):
                lo, hi = self.interval(b)
                u_lo, u_hi = self.levels.cdf(_f64(lo)), self.levels.cdf(_f64(hi))
                part = self.levels.icdf(u_hi - k * (u_hi - u_lo))
                part[0] = hi  # exactly on the edge, so routing sends it to this block
                parts.append(part)
            grid = torch.cat(parts)
        elif kind == "cdf":
            # mass fractions j / n, as `create` computes edges: at j / n = b / B the equiprob edge bit for bit
            grid = self.levels.icdf(torch.arange(n, 0, -1, dtype=torch.float64, device="cpu") / n)
            grid[0] = self.levels.hi
        elif kind == "karras":
            i = torch.arange(n, dtype=torch.float64, device="cpu")
            lo, hi = self.levels.lo, self.levels.hi
            if n == 1:
                grid = _f64([hi])
            else:
                grid = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
                grid[0], grid[-1] = hi, lo
        else:
            raise ValueError(f"unknown grid kind {kind!r}; expected one of {GRID_KINDS}")
        return torch.cat([grid, grid.new_zeros(1)])

    def describe(self) -> dict:
        """A JSON-able summary: edges, and per block its interval, widened interval and mass."""
        blocks = []
        for b in range(self.num_blocks):
            lo, hi = self.interval(b)
            tlo, thi = self.training_interval(b)
            blocks.append({"block": b, "lo": lo, "hi": hi, "train_lo": tlo, "train_hi": thi,
                           "mass": self.mass(b), "train_mass": self.mass(b, widened=True)})
        return {"level": self.levels.name, "kind": self.kind, "num_blocks": self.num_blocks,
                "gamma": self.gamma, "boundaries": self.boundaries.tolist(), "blocks": blocks}
