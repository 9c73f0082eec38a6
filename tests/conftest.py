"""Tiny models shared by the tests: a vector denoiser built from the library's own layers."""

import torch

from diffusionblocks.models import VectorHead, VectorStem
from diffusionblocks.nn import ResidualMLP


def vector_parts(num_layers=6, dz=4, dim=16, dx=3):
    torch.manual_seed(0)
    layers = [ResidualMLP(dim, hidden=2 * dim) for _ in range(num_layers)]
    return layers, VectorStem(dz, dim, dx), VectorHead(dim, dz)
