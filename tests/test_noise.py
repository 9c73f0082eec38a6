import math

import pytest
import torch

from diffusionblocks.noise import LogNormalLevels, MaskLevels, Partition

REFERENCE = {  # METHOD.md section 3, ascending
    2: [0.002, 0.3012, 80.0],
    3: [0.002, 0.1796, 0.5050, 80.0],
    4: [0.002, 0.1341, 0.3012, 0.6766, 80.0],
}


@pytest.mark.parametrize("num_blocks", [2, 3, 4])
def test_equiprob_boundaries_match_reference(num_blocks):
    part = Partition.create(LogNormalLevels(), num_blocks)
    assert part.boundaries.tolist() == pytest.approx(REFERENCE[num_blocks], abs=1e-3)


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 6, 12])
@pytest.mark.parametrize("kind", ["equiprob", "uniform-log"])
def test_boundaries_monotone_and_cover_range(num_blocks, kind):
    levels = LogNormalLevels()
    part = Partition.create(levels, num_blocks, kind=kind)
    edges = part.boundaries
    assert edges.numel() == num_blocks + 1
    assert bool((edges[1:] > edges[:-1]).all())
    assert edges[0].item() == levels.sigma_min and edges[-1].item() == levels.sigma_max
    # block 0 owns the top of the range, the last block the bottom
    assert part.interval(0)[1] == levels.sigma_max
    assert part.interval(num_blocks - 1)[0] == levels.sigma_min
    masses = [part.mass(b) for b in range(num_blocks)]
    assert sum(masses) == pytest.approx(1.0, abs=1e-12)
    if kind == "equiprob":
        assert masses == pytest.approx([1 / num_blocks] * num_blocks, abs=1e-9)
    else:  # equal widths in ln sigma, and so unequal masses
        widths = torch.diff(torch.log(edges))
        assert widths.tolist() == pytest.approx([widths[0].item()] * num_blocks, rel=1e-9)
        if num_blocks > 1:
            assert max(masses) - min(masses) > 0.1


def test_cdf_and_icdf_are_inverse_and_match_the_normal_cdf():
    levels = LogNormalLevels()
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert levels.cdf(levels.icdf(u)).tolist() == pytest.approx(u.tolist(), abs=1e-9)
    # the untruncated median exp(P_mean) sits at Phi(0)=0.5 before truncation
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    q_min, q_max = phi((math.log(0.002) + 1.2) / 1.2), phi((math.log(80) + 1.2) / 1.2)
    assert levels.cdf(torch.tensor(math.exp(-1.2))).item() == pytest.approx((0.5 - q_min) / (q_max - q_min))


def test_overlap_widens_in_log_space_and_is_clamped():
    levels = LogNormalLevels()
    gamma = 0.1
    part = Partition.create(levels, 3, gamma=gamma)
    for b in range(3):
        lo, hi = part.interval(b)
        a = (hi / lo) ** gamma
        tlo, thi = part.training_interval(b)
        assert tlo == pytest.approx(max(lo / a, levels.sigma_min))
        assert thi == pytest.approx(min(hi * a, levels.sigma_max))
        assert tlo <= lo and thi >= hi
    assert part.training_interval(0)[1] == levels.sigma_max  # clamped at the top
    assert part.training_interval(2)[0] == levels.sigma_min  # clamped at the bottom
    assert part.training_interval(1)[0] < part.interval(1)[0]  # the middle block really widens
    no_overlap = Partition.create(levels, 3, gamma=0.0)
    assert [no_overlap.training_interval(b) for b in range(3)] == [no_overlap.interval(b) for b in range(3)]


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.3])
def test_sampled_levels_lie_in_the_widened_interval(gamma):
    part = Partition.create(LogNormalLevels(), 4, gamma=gamma)
    gen = torch.Generator().manual_seed(1)
    for b in range(4):
        lo, hi = part.training_interval(b)
        s = part.sample(b, 20_000, gen)
        assert s.shape == (20_000,)
        assert bool((s >= lo).all()) and bool((s <= hi).all())
        # inverse-CDF sampling: the sample's training CDF is uniform over the interval's CDF range; the
        # Kolmogorov-Smirnov distance to U(0, 1) stays below its 0.1% critical value 1.95 / sqrt(n)
        u_lo, u_hi = part.levels.cdf(torch.tensor(lo)), part.levels.cdf(torch.tensor(hi))
        v = ((part.levels.cdf(s) - u_lo) / (u_hi - u_lo)).sort().values
        n = v.numel()
        ks = torch.maximum(torch.arange(1, n + 1) / n - v, v - torch.arange(n) / n).max().item()
        assert ks < 1.95 / math.sqrt(n), ks


def test_sampling_is_reproducible_with_a_generator():
    part = Partition.create(LogNormalLevels(), 3)
    a = part.sample(1, 100, torch.Generator().manual_seed(7))
    b = part.sample(1, 100, torch.Generator().manual_seed(7))
    c = part.sample(1, 100, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5])
def test_routing_returns_the_block_a_level_was_drawn_for(num_blocks):
    part = Partition.create(LogNormalLevels(), num_blocks, gamma=0.0)
    gen = torch.Generator().manual_seed(0)
    for b in range(num_blocks):
        s = part.sample(b, 5000, gen)
        assert bool((part.route(s) == b).all())
    # exact edges: the top of the range is block 0, an inner edge belongs to the block below it
    assert part.route(torch.tensor(80.0)).item() == 0
    assert part.route(torch.tensor(0.002)).item() == num_blocks - 1
    for b in range(1, num_blocks):
        assert part.route(torch.tensor(part.interval(b)[1], dtype=torch.float64)).item() == b


@pytest.mark.parametrize("steps_per_block", [1, 2, 5])
def test_equiprob_grid_gives_each_block_its_steps(steps_per_block):
    part = Partition.create(LogNormalLevels(), 3)
    grid = part.inference_grid(steps_per_block)
    assert grid.numel() == 3 * steps_per_block + 1
    assert grid[0].item() == 80.0 and grid[-1].item() == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    owners = part.route(grid[:-1]).tolist()
    assert owners == [b for b in range(3) for _ in range(steps_per_block)]
    # the grid is equally spaced in the truncated CDF
    u = part.levels.cdf(grid[:-1])
    assert torch.diff(u).tolist() == pytest.approx([-1 / (3 * steps_per_block)] * (3 * steps_per_block - 1))


def test_cdf_grid_is_the_same_for_every_partition():
    """The shared grid of the partition ablation: equal training mass between levels over the whole range,
    equal to an equi-probability partition's own grid, and not the uniform-in-log partition's own grid."""
    levels = LogNormalLevels()
    equi, uniform = Partition.create(levels, 3), Partition.create(levels, 3, kind="uniform-log")
    cdf = uniform.inference_grid(6, kind="cdf")
    assert torch.equal(cdf, equi.inference_grid(6, kind="cdf")) and cdf.numel() == 19
    assert cdf[0].item() == 80.0 and cdf[-1].item() == 0.0
    assert torch.allclose(cdf, equi.inference_grid(6), rtol=1e-12, atol=0)
    u = levels.cdf(cdf[:-1])
    assert torch.diff(u).tolist() == pytest.approx([float(u[1] - u[0])] * 17)
    own = uniform.inference_grid(6)
    assert (own[1] - cdf[1]).abs() > 1.0  # uniform-in-log's own grid: 80 -> 5.6, the shared one 80 -> 2.0
    assert equi.route(cdf[:-1]).tolist() == [b for b in range(3) for _ in range(6)]


def test_karras_grid():
    part = Partition.create(LogNormalLevels(), 3)
    grid = part.inference_grid(4, kind="karras")
    assert grid.numel() == 13 and grid[0].item() == 80.0 and grid[-2].item() == pytest.approx(0.002)
    assert grid[-1].item() == 0.0 and bool((grid[1:] < grid[:-1]).all())
    rho = 7
    expected = [(80 ** (1 / rho) + i / 11 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho for i in range(12)]
    assert grid[:-1].tolist() == pytest.approx(expected)


def test_mask_levels_partition_uniform_in_alpha():
    part = Partition.create(MaskLevels(), 4, gamma=0.0)
    assert part.boundaries.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for b in range(4):  # block b owns t in [1 - (b+1)/B, 1 - b/B]: block 0 the most masked
        assert part.interval(b) == pytest.approx((1 - (b + 1) / 4, 1 - b / 4))
    t = part.sample(2, 1000, torch.Generator().manual_seed(0))
    assert bool((t >= 0.25).all()) and bool((t <= 0.5).all()) and bool((part.route(t) == 2).all())
    cos = Partition.create(MaskLevels(schedule="cosine"), 2, gamma=0.0)
    levels = cos.levels
    # mass uniform in alpha: the midpoint edge has alpha halfway between alpha(0)=1 and alpha(1)=0
    assert levels.alpha(cos.boundaries[1]).item() == pytest.approx(0.5)
    assert levels.mask_rate(torch.tensor(1.0)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="uniform-log"):
        Partition.create(MaskLevels(), 2, kind="uniform-log")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Partition.create(LogNormalLevels(), 0), "num_blocks"),
        (lambda: Partition.create(LogNormalLevels(), 2.5), "num_blocks"),
        (lambda: Partition.create(LogNormalLevels(), 3, gamma=-0.1), "gamma"),
        (lambda: Partition.create(LogNormalLevels(), 3, kind="cosine"), "partition kind"),
        (lambda: LogNormalLevels(sigma_min=1.0, sigma_max=1.0), "sigma_min"),
        (lambda: LogNormalLevels(sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (lambda: LogNormalLevels(sigma_min=0.0), "sigma_min"),
        (lambda: MaskLevels(t_min=0.5, t_max=0.2), "t_min"),
        (lambda: Partition.create(LogNormalLevels(), 3).route(torch.tensor([1.0, 81.0])), "outside"),
        (lambda: Partition.create(LogNormalLevels(), 3).route(torch.tensor(0.001)), "outside"),
        (lambda: Partition.create(LogNormalLevels(), 3).interval(3), "block"),
        (lambda: Partition.create(LogNormalLevels(), 3).inference_grid(0), "steps_per_block"),
        (lambda: Partition.create(LogNormalLevels(), 3).inference_grid(1, kind="linear"), "grid kind"),
    ],
)
def test_bad_input_raises_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
