import pytest
import torch
from conftest import vector_parts

from diffusionblocks.blocks import BlockStack
from diffusionblocks.noise import LogNormalLevels, Partition
from diffusionblocks.sample import euler, heun


def oracle(y):
    """A perfect denoiser: D(z, sigma) = y whatever z and sigma."""
    return lambda z, sigma, cond=None: y.expand_as(z)


@pytest.mark.parametrize("sampler", [euler, heun])
def test_perfect_denoiser_lands_on_the_next_noise_level(sampler):
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grid = Partition.create(LogNormalLevels(), 3).inference_grid(2)
    for i in range(grid.numel() - 1):
        z = y + grid[i] * eps
        z_next = sampler(oracle(y), z, grid[i:i + 2])
        assert torch.allclose(z_next, y + grid[i + 1] * eps, rtol=0, atol=1e-12)
    # the whole chain from sigma_max returns the data point
    assert torch.allclose(sampler(oracle(y), y + 80.0 * eps, grid), y, atol=1e-12)


def test_euler_step_matches_the_formula_for_an_imperfect_denoiser():
    model = lambda z, sigma, cond=None: 0.5 * z
    z = torch.tensor([[1.0, -2.0]])
    out = euler(model, z, torch.tensor([2.0, 0.5]))
    d = 0.5 * z
    assert torch.allclose(out, z + (0.5 - 2.0) * (z - d) / 2.0)


def test_heun_uses_the_average_slope():
    model = lambda z, sigma, cond=None: z / (1 + sigma[:, None])
    z, s, s_next = torch.tensor([[1.0, 3.0]], dtype=torch.float64), 2.0, 1.0
    d = (z - z / (1 + s)) / s
    z_e = z + (s_next - s) * d
    d2 = (z_e - z_e / (1 + s_next)) / s_next
    out = heun(model, z, torch.tensor([s, s_next], dtype=torch.float64))
    assert torch.allclose(out, z + (s_next - s) * (d + d2) / 2)


def test_callback_sees_every_step():
    seen = []
    grid = torch.tensor([4.0, 1.0, 0.25, 0.0])
    euler(oracle(torch.zeros(1, 2)), torch.ones(1, 2), grid, callback=seen.append)
    assert [(c["i"], c["sigma"], c["sigma_next"]) for c in seen] == [(0, 4.0, 1.0), (1, 1.0, 0.25), (2, 0.25, 0.0)]
    assert all(c["z"].shape == (1, 2) and c["denoised"].shape == (1, 2) for c in seen)


def test_classifier_free_guidance():
    # D(z, s, c) = c (conditional target) or 0 when c is the null condition
    model = lambda z, sigma, cond: cond.expand_as(z).clone()
    z, grid = torch.zeros(2, 3), torch.tensor([1.0, 0.0])
    cond, null = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(euler(model, z, grid, cond, cfg_scale=1.0, uncond=null), euler(model, z, grid, cond))
    assert torch.allclose(euler(model, z, grid, cond, cfg_scale=3.0, uncond=null), 3 * cond)
    with pytest.raises(ValueError, match="uncond"):
        euler(model, z, grid, cond, cfg_scale=2.0)


def test_one_block_per_step_with_the_equiprob_grid():
    layers, stem, head = vector_parts(6)
    stack = BlockStack(layers, stem, head, Partition.create(LogNormalLevels(), 3))
    calls = []
    orig = stack.denoise
    stack.denoise = lambda block, *a, **k: (calls.append(block), orig(block, *a, **k))[1]
    grid = stack.partition.inference_grid(2)
    out = euler(stack, torch.randn(5, 4) * 80, grid, torch.randn(5, 3))
    assert calls == [0, 0, 1, 1, 2, 2] and out.shape == (5, 4)


@pytest.mark.parametrize("grid", [[1.0], [1.0, 2.0], [1.0, 1.0, 0.0], [[2.0, 1.0]], [0.0, 0.0]])
def test_bad_grids_raise(grid):
    with pytest.raises(ValueError, match="sigmas"):
        euler(oracle(torch.zeros(1, 1)), torch.zeros(1, 1), torch.tensor(grid))
