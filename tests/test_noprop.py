"""NoProp-DT (methods/noprop.py): its schedule and inference step, block isolation, a tiny run, and the tasks it
refuses."""

import pytest
import torch

from diffusionblocks import io
from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides
from diffusionblocks.methods.noprop import NoPropClassifier, cosine_alpha_bar, snr, step_coefficients
from diffusionblocks.run import validate
from diffusionblocks.tasks.classify import preset_tiny


def model(*overrides):
    cfg = apply_overrides(preset_tiny(), ["train.method=noprop", *overrides])
    torch.manual_seed(0)
    return NoPropClassifier(cfg.model, cfg.blocks, cfg.noprop, (8, 8), 1, 10)


@pytest.mark.parametrize("T", [2, 3, 10])
def test_schedule_and_the_inference_step_is_the_posterior(T):
    ab = cosine_alpha_bar(T)
    assert ab.shape == (T + 1,) and bool((ab[1:] > ab[:-1]).all())
    assert 0 < ab[0] < 1e-3 and 0.7 < ab[-1] < 1  # z_0 about pure noise, z_T the closest to u_y (a finite SNR)
    assert T < 10 or ab[-1] > 0.95
    assert bool((snr(ab).diff() > 0).all())  # the weights of the denoising terms
    a, b, c = step_coefficients(ab)
    # q(z_t | z_(t-1), y) by Bayes' rule in precision form, from q(z_t | y) = N(sqrt(ab_t) u, (1 - ab_t) I) and
    # q(z_(t-1) | z_t) = N(sqrt(alpha) z_t, (1 - alpha) I), alpha = ab_(t-1) / ab_t
    ab_prev, ab_t = ab[:-1], ab[1:]
    alpha = ab_prev / ab_t
    var = 1 / (1 / (1 - ab_t) + alpha / (1 - alpha))
    assert torch.allclose(c, var, rtol=1e-10)
    assert torch.allclose(a, var * ab_t.sqrt() / (1 - ab_t), rtol=1e-10)
    assert torch.allclose(b, var * alpha.sqrt() / (1 - alpha), rtol=1e-10)
    # and so a step with u_hat = u_y carries q(z_(t-1) | y) to q(z_t | y): mean and variance
    assert torch.allclose(a + b * ab_prev.sqrt(), ab_t.sqrt(), rtol=1e-10)
    assert torch.allclose(b**2 * (1 - ab_prev) + c, 1 - ab_t, rtol=1e-10)


def test_predict_with_a_perfect_denoiser_lands_on_q_of_z_T():
    """predict's chain, with u_hat = u_y, ends in z_T ~ q(z_T | y); each block starts at its own level."""
    m = model("blocks.num_blocks=4")
    N, y = 20_000, 3
    u = m.table[y]
    m.denoise = lambda block, z, x: u.expand_as(z)  # the oracle: the clean embedding
    seen = []  # the z_t that p_out(y | z_t) reads
    m.readout.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    preds = m.predict(torch.zeros(N, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert len(preds) == 4 and preds[-1].shape == (N,)
    z_T, ab_T = seen[-1], m.alpha_bar[-1]
    assert torch.allclose(z_T.mean(0), ab_T.sqrt() * u, atol=0.03)
    assert torch.allclose(z_T.var(0), (1 - ab_T).expand_as(u), atol=0.03)
    sigma = snr(cosine_alpha_bar(4)).rsqrt()
    assert m.partition.route(sigma[:-1]).tolist() == [0, 1, 2, 3]  # block b owns its input's level sigma_b


@pytest.mark.parametrize("shared,table", [(True, "learned"), (False, "learned"), (True, "fixed"), (False, "fixed")])
def test_a_block_step_touches_only_its_block(shared, table):
    m = model(f"blocks.shared_stem_head={shared}", f"noprop.label_table={table}", "blocks.num_blocks=2")
    with torch.no_grad():  # leave the zero init, so every parameter gets a gradient
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss = m.block_loss(1, x, y, torch.Generator().manual_seed(0))
    assert loss.shape == (6,)
    loss.mean().backward()
    trained = {id(p) for p in m.block_parameters(1) + m.shared_parameters()}
    assert (m.table.grad is not None) == (table == "learned")
    assert any(p is m.readout.weight for p in m.shared_parameters())  # p(y | z_T) is every block's
    for name, p in m.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad == (id(p) in trained), name


def test_the_loss_falls_on_a_tiny_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--method", "noprop", "--out", str(out), "--no-progress",
                 "train.steps=40", "train.eval_every=100000"]) == 0
    losses = [r["loss"] for r in io.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) >= 5 and losses[-1] < 0.6 * losses[0]
    results = io.load_json(out / "results.json")
    assert results["method"] == "noprop" and 0 <= results["test_accuracy"] <= 1
    assert len(results["accuracy_per_step"]) == 2  # one prediction per block


def test_refused_where_it_cannot_run(tmp_path, capsys):
    out = tmp_path / "gen"
    code = main(["train", "--task", "imagegen", "--preset", "gen-tiny", "--method", "noprop", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.method=noprop trains an image classifier" in err and "imagegen" in err
    assert not out.exists() or not any(out.iterdir())
    tiny = lambda *o: apply_overrides(preset_tiny(), ["train.method=noprop", *o])  # noqa: E731
    with pytest.raises(ValueError, match="trained by every block"):  # the output layer is shared: no per-block jobs
        validate(tiny("train.blocks=0", "blocks.shared_stem_head=false", "dblocks.block_choice=round-robin"))
    with pytest.raises(ValueError, match="noprop.label_table"):
        validate(tiny("noprop.label_table=onehot"))
    with pytest.raises(ValueError, match="noprop.eta"):
        validate(tiny("noprop.eta=-1"))
    with pytest.raises(ValueError, match="noprop.label_scale"):
        validate(tiny("noprop.label_scale=onehot"))


def test_label_scale_sets_the_rows_length_and_only_that():
    """noprop_label_scale=unit-norm: the same directions as unit-variance, each row of length 1 (one-hot's)."""
    wide, unit = model(), model("noprop.label_scale=unit-norm")
    D = wide.table.shape[1]
    assert torch.allclose(unit.table.norm(dim=-1), torch.ones(10), atol=1e-5)
    assert 0.7 * D ** 0.5 < wide.table.norm(dim=-1).mean() < 1.3 * D ** 0.5
    assert torch.allclose(unit.table, wide.table / wide.table.norm(dim=-1, keepdim=True), atol=1e-6)
