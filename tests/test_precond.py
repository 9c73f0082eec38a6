import pytest
import torch
from torch import nn

from diffusionblocks.precond import ClassEmbedding, Denoiser, EDMPrecond, PlainPrecond, ce_loss, mse_loss

EDM = EDMPrecond()


class ZeroNet(nn.Module):
    def forward(self, z_in, c_noise, cond=None):
        return torch.zeros_like(z_in)


def test_edm_limits_at_small_sigma():
    s = torch.tensor([1e-6, 1e-4], dtype=torch.float64)
    assert EDM.c_skip(s).tolist() == pytest.approx([1.0, 1.0], abs=1e-7)
    assert EDM.c_out(s).tolist() == pytest.approx([0.0, 0.0], abs=1e-3)
    assert bool((EDM.c_out(s) < 2 * s).all())
    # at sigma = sigma_data the skip and the network share the output equally
    assert EDM.c_skip(torch.tensor(0.5)).item() == pytest.approx(0.5)


def test_weight_times_c_out_squared_is_one():
    s = torch.logspace(-3, 2, 50, dtype=torch.float64)
    assert (EDM.weight(s) * EDM.c_out(s) ** 2).tolist() == pytest.approx([1.0] * 50, rel=1e-12)


def test_c_in_gives_unit_variance_input():
    y = 0.5 * torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # sd = 0.5
    for s in (0.01, 1.0, 50.0):
        z = y + s * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        assert (EDM.c_in(torch.tensor(s)) * z).std().item() == pytest.approx(1.0, abs=0.01)


def test_zero_inner_net_gives_c_skip_times_z():
    denoiser = Denoiser(ZeroNet())
    z = torch.randn(5, 3, 4)
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 80.0])
    d = denoiser(z, sigma)
    expected = EDM.c_skip(sigma)[:, None, None] * z
    assert torch.allclose(d, expected, atol=1e-7)


def test_denoiser_passes_preconditioned_inputs():
    seen = {}

    class Spy(nn.Module):
        def forward(self, z_in, c_noise, cond=None):
            seen.update(z_in=z_in, c_noise=c_noise, cond=cond)
            return torch.ones_like(z_in)

    z, sigma, cond = torch.randn(2, 3), torch.tensor([0.2, 3.0]), torch.tensor([1, 2])
    d = Denoiser(Spy())(z, sigma, cond)
    assert torch.allclose(seen["z_in"], z * EDM.c_in(sigma)[:, None])
    assert torch.allclose(seen["c_noise"], torch.log(sigma) / 4)
    assert seen["cond"] is cond
    assert torch.allclose(d, EDM.c_skip(sigma)[:, None] * z + EDM.c_out(sigma)[:, None])
    with pytest.raises(ValueError, match="one level per sample"):
        Denoiser(Spy())(z, torch.tensor([0.2, 0.3, 0.4]))


def test_plain_precond_passes_through():
    net = lambda z, level, cond: z.float() * level[:, None]
    z = torch.tensor([[1, 2], [3, 4]])
    out = Denoiser(net, PlainPrecond())(z, torch.tensor(0.5))
    assert torch.equal(out, torch.tensor([[0.5, 1.0], [1.5, 2.0]]))


def test_mse_loss_is_per_sample_and_weighted_per_sample():
    d = torch.zeros(3, 2, 2)
    y = torch.ones(3, 2, 2)
    w = torch.tensor([1.0, 2.0, 3.0])
    loss = mse_loss(d, y, w)
    assert loss.shape == (3,)
    assert loss.tolist() == [1.0, 2.0, 3.0]
    # a (N, 1) weight, the shape that broadcast to (N, N) in the reference code, still gives (N,)
    loss_col = mse_loss(d, y, w[:, None])
    assert loss_col.shape == (3,) and torch.equal(loss_col, loss)
    # weighting is per sample: changing one sample's weight changes only that sample's loss
    loss2 = mse_loss(d, y, torch.tensor([1.0, 5.0, 3.0]))
    assert loss2.tolist() == [1.0, 5.0, 3.0]
    with pytest.raises(ValueError, match="one loss weight per sample"):
        mse_loss(d, y, torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        mse_loss(d, torch.ones(3, 4))


def test_ce_loss_is_per_sample_weighted_and_masked():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    target = torch.tensor([0, 0, 1])
    plain = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    w = torch.tensor([1.0, 10.0, 0.5])
    loss = ce_loss(logits, target, w[:, None])
    assert loss.shape == (3,)
    assert torch.allclose(loss, plain * w)
    # sequences: per-sample mean over the masked positions only
    seq_logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    seq_target = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    per_tok = torch.nn.functional.cross_entropy(seq_logits.reshape(-1, 7), seq_target.reshape(-1),
                                                reduction="none").reshape(2, 5)
    got = ce_loss(seq_logits, seq_target, mask=mask)
    assert got.shape == (2,)
    assert torch.allclose(got, torch.stack([per_tok[0, :2].mean(), per_tok[1, 4]]))
    with pytest.raises(ValueError, match="class dim"):
        ce_loss(torch.randn(3, 4), torch.tensor([0, 1]))


def test_class_embedding_targets_and_soft_bridge_use_normalised_rows():
    emb = ClassEmbedding(5, 8, generator=torch.Generator().manual_seed(0))
    y = emb(torch.tensor([0, 3]))
    assert torch.allclose(y.norm(dim=-1), torch.ones(2))
    # confident logits: the soft estimate is the (normalised) row of the argmax class
    logits = torch.full((2, 5), -1e4)
    logits[0, 0], logits[1, 3] = 0.0, 0.0
    assert torch.allclose(emb.expected(logits), y, atol=1e-6)
    assert torch.allclose(emb.hard(torch.randn(2, 5)).norm(dim=-1), torch.ones(2))
    assert len(list(emb.parameters())) == 0  # fixed targets by default
    assert len(list(ClassEmbedding(5, 8, learnable=True).parameters())) == 1
