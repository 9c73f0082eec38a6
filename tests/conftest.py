"""Tiny models shared by the tests: a vector denoiser built from the library's own layers."""

import torch
from torch import nn

from diffusionblocks.nn import NoiseEmbedding, ResidualMLP


class VectorStem(nn.Module):
    """(z_in (N, Dz), c_noise (N,), cond (N, Dx) or None) -> h (N, D), c (N, D)."""

    def __init__(self, dz: int, dim: int, dx: int = 0):
        super().__init__()
        self.embed = nn.Linear(dz + dx, dim)
        self.noise = NoiseEmbedding(dim, freq_dim=16)

    def forward(self, z_in, c_noise, cond=None):
        x = z_in if cond is None else torch.cat([z_in, cond], dim=-1)
        return self.embed(x), self.noise(c_noise)


class VectorHead(nn.Module):
    def __init__(self, dim: int, dz: int):
        super().__init__()
        self.out = nn.Linear(dim, dz)

    def forward(self, h, c):
        return self.out(h)


def vector_parts(num_layers=6, dz=4, dim=16, dx=3):
    torch.manual_seed(0)
    layers = [ResidualMLP(dim, hidden=2 * dim) for _ in range(num_layers)]
    return layers, VectorStem(dz, dim, dx), VectorHead(dim, dz)
