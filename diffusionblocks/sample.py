"""Samplers: the probability-flow ODE integrated over an explicit descending level grid (Sec. 3.4).

Every sampler has the signature ``sampler(model, z, sigmas, cond=None, *, cfg_scale=None, uncond=None,
callback=None)``, where ``model(z, sigma, cond)`` is a denoiser returning the clean-target estimate D.
A :class:`~diffusionblocks.blocks.BlockStack` routes each call to the block that owns sigma, so a
sampler never knows how many blocks there are. With the equi-probability grid and one step per
block, each step runs exactly one block.

Euler step from s to s_next (the sign the official code and EDM use; the paper's printed Eq. 3-5 flip it):
    z_next = z + (s_next - s) * (z - D) / s  =  (s_next / s) z + (1 - s_next / s) D
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Callback = Callable[[dict], None]


def _check_grid(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 levels, got shape {tuple(sigmas.shape)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or bool((sigmas[:-1] <= 0).any()) or sigmas[-1] < 0:
        raise ValueError(f"sigmas must be strictly descending, positive and end at >= 0, got {sigmas.tolist()}")
    return sigmas


def guided(model, z: torch.Tensor, sigma: torch.Tensor, cond, cfg_scale: float | None, uncond):
    """D with classifier-free guidance: D_u + scale * (D_c - D_u), both halves in one batch.
    cfg_scale None (or 1 with nothing to mix) is the plain conditional model."""
    if cfg_scale is None or cfg_scale == 1.0:
        return model(z, sigma, cond)
    if cond is None:
        raise ValueError("classifier-free guidance needs a condition (cond) to guide towards")
    if uncond is None:
        raise ValueError("classifier-free guidance needs the unconditional input (uncond), e.g. a null label")
    both = model(torch.cat([z, z]), torch.cat([sigma, sigma]), _cat(cond, uncond))
    d_cond, d_uncond = both.chunk(2)
    return d_uncond + cfg_scale * (d_cond - d_uncond)


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(_cat(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch a condition of type {type(a).__name__}")


def euler_step(z: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_next given the x0 estimate `denoised`."""
    ratio = sigma_next / sigma
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.to(z.dtype)
    return ratio * z + (1 - ratio) * denoised


@torch.no_grad()
def euler(model, z: torch.Tensor, sigmas: torch.Tensor, cond=None, *, cfg_scale: float | None = None,
          uncond=None, callback: Callback | None = None) -> torch.Tensor:
    """First-order steps over `sigmas` (descending, usually ending at 0). z starts at noise level sigmas[0]."""
    sigmas = _check_grid(sigmas).to(z.device)
    for i in range(sigmas.numel() - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma = s.to(z.dtype).expand(z.shape[0])
        denoised = guided(model, z, sigma, cond, cfg_scale, uncond)
        z = euler_step(z, denoised, s, s_next)
        if callback is not None:
            callback({"i": i, "sigma": s.item(), "sigma_next": s_next.item(), "z": z, "denoised": denoised})
    return z


@torch.no_grad()
def heun(model, z: torch.Tensor, sigmas: torch.Tensor, cond=None, *, cfg_scale: float | None = None,
         uncond=None, callback: Callback | None = None) -> torch.Tensor:
    """Second-order (trapezoidal) steps, EDM Algorithm 1; the step to sigma = 0 is a plain Euler step.
    The correction evaluates D at s_next, i.e. with the block that owns s_next."""
    sigmas = _check_grid(sigmas).to(z.device)
    for i in range(sigmas.numel() - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma = s.to(z.dtype).expand(z.shape[0])
        denoised = guided(model, z, sigma, cond, cfg_scale, uncond)
        d = (z - denoised) / s.to(z.dtype)
        z_next = z + (s_next - s).to(z.dtype) * d
        if s_next > 0:
            denoised_next = guided(model, z_next, s_next.to(z.dtype).expand(z.shape[0]), cond, cfg_scale, uncond)
            d_next = (z_next - denoised_next) / s_next.to(z.dtype)
            z_next = z + (s_next - s).to(z.dtype) * (0.5 * d + 0.5 * d_next)
        z = z_next
        if callback is not None:
            callback({"i": i, "sigma": s.item(), "sigma_next": s_next.item(), "z": z, "denoised": denoised})
    return z


SAMPLERS = {"euler": euler, "heun": heun}
