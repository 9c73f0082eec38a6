"""The classification task's pieces, without training: targets, isolation, inference chain."""

import pytest
import torch

from diffusionblocks.config import apply_overrides, construct
from diffusionblocks.tasks.classify import DiffusionClassifier, EndToEndClassifier, preset_tiny


def model(*overrides, cls=DiffusionClassifier):
    cfg = apply_overrides(preset_tiny(), list(overrides))
    torch.manual_seed(0)
    return construct(cls, cfg, image_size=(8, 8), channels=1, num_classes=10)


def test_training_target_paper_flip_and_mix():
    y = torch.arange(10).repeat(20)
    plain = model("chain.input_flip=0", "chain.input_mix=0")
    assert torch.equal(plain.training_target(y), plain.labels(y))
    flipped = model("chain.input_flip=1", "chain.input_mix=0")
    t = flipped.training_target(y, torch.Generator().manual_seed(0))
    # every target is the embedding of some class, never the true one
    sims = t @ flipped.labels.normalized.T  # (N, V)
    assert torch.allclose(sims.max(-1).values, torch.ones(len(y)), atol=1e-5)
    assert bool((sims.argmax(-1) != y).all())
    mixed = model("chain.input_flip=0", "chain.input_mix=1")
    t = mixed.training_target(y, torch.Generator().manual_seed(0))
    norms = t.norm(dim=-1)
    assert bool((norms < 1 - 1e-3).all())  # strictly inside the ball: true mixtures
    half = model("chain.input_flip=0", "chain.input_mix=0.5").training_target(y, torch.Generator().manual_seed(1))
    is_vertex = (half.norm(dim=-1) - 1).abs() < 1e-5
    assert 0.3 < is_vertex.float().mean() < 0.7


@pytest.mark.parametrize("shared,head", [(True, "plain"), (False, "plain"), (True, "adaln"), (False, "adaln")])
def test_a_block_step_touches_only_its_block(shared, head):
    m = model(f"blocks.shared_stem_head={shared}", f"model.label_head={head}")
    with torch.no_grad():  # leave the zero init, so every parameter gets a gradient
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    m.block_loss(1, x, y, torch.Generator().manual_seed(0)).mean().backward()
    trained = {id(p) for p in m.block_parameters(1) + m.shared_parameters()}
    assert bool(m.shared_parameters()) == shared
    for name, p in m.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad == (id(p) in trained), name


def test_block_loss_is_per_sample_and_weighting_switch():
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    plain = model("chain.loss_weight=none").block_loss(0, x, y, torch.Generator().manual_seed(0))
    edm = model("chain.loss_weight=edm").block_loss(0, x, y, torch.Generator().manual_seed(0))
    assert plain.shape == edm.shape == (5,)
    assert bool((edm > plain).all())  # w(sigma) >= 4 on block 0's range, same draws and weights


def test_inference_chain_options():
    m = model()
    m.eval()
    x = torch.randn(4, 1, 8, 8)
    preds = m.predict(x, generator=torch.Generator().manual_seed(0))
    assert len(preds) == 2 and preds[-1].shape == (4,)
    assert len(m.predict(x, steps_per_block=3, generator=torch.Generator().manual_seed(0))) == 6
    # starting at sigma 5 drops the grid levels above it but keeps one step per block
    assert len(m.predict(x, sigma_start=5.0, generator=torch.Generator().manual_seed(0))) == 2
    # init zero is deterministic whatever the generator; init noise starts at sigma_max * eps from the generator
    a = m.predict(x, init="zero", bridge="soft", generator=torch.Generator().manual_seed(0))
    b = m.predict(x, init="zero", bridge="soft", generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    first = []  # the chain's first input z, as the first block sees it
    denoise = m.stack.denoise
    m.stack.denoise = lambda block, z, *rest: (first.append(z.clone()), denoise(block, z, *rest))[1]
    for init, seed in (("zero", 0), ("noise", 0), ("noise", 1)):
        m.predict(x, init=init, generator=torch.Generator().manual_seed(seed))
    zero, noise0, noise1 = first[0], first[2], first[4]  # two blocks: two calls per chain
    assert torch.equal(zero, torch.zeros_like(zero))
    expected = 80.0 * torch.randn(4, m.labels.table.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noise0, expected) and not torch.allclose(noise0, noise1)
    e2e = model("train.method=e2e", cls=EndToEndClassifier)
    assert e2e.predict(x)[0].shape == (4,)


@pytest.mark.parametrize("method", ["e2e", "dblocks"])
def test_activation_checkpointing_same_gradients_fewer_saved_bytes(method):
    from diffusionblocks.memory import saved_activation_bytes

    cls = EndToEndClassifier if method == "e2e" else DiffusionClassifier
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    grads, saved = {}, {}
    for every in (0, 1, 2):
        m = model(f"train.method={method}", f"model.checkpoint={every}", "blocks.allocation=2,2", cls=cls)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if method == "e2e":
            loss_fn = lambda m=m: m.loss(x, y).mean()
        else:
            loss_fn = lambda m=m: m.block_loss(0, x, y, torch.Generator().manual_seed(0)).mean()
        saved[every], loss = saved_activation_bytes(loss_fn, m.parameters())
        loss.backward()
        grads[every] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for every in (1, 2):
        assert grads[every].keys() == grads[0].keys()
        assert all(torch.allclose(grads[every][n], grads[0][n], atol=1e-6) for n in grads[0])
        assert saved[every] < saved[0]


def test_a_learned_label_table_is_a_shared_parameter():
    from diffusionblocks.run import validate

    fixed = model()
    assert "labels.table" in dict(fixed.named_buffers()) and not any("labels" in n for n, _ in fixed.named_parameters())
    learned = model("chain.label_table=learned")
    assert any(p is learned.labels.table for p in learned.shared_parameters())
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    learned.block_loss(1, x, y, torch.Generator().manual_seed(0)).mean().backward()
    assert learned.labels.table.grad is not None and learned.labels.table.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="label_table=learned.*shared_stem_head=true"):
        validate(apply_overrides(preset_tiny(), ["chain.label_table=learned", "blocks.shared_stem_head=false"]))


def test_the_paper_side_settings():
    """model.label_head=adaln (modulated by the noise embedding, as the official head), model.noise_scale
    and train.beta2 reach the model and the optimizer; bad values are refused by name."""
    from diffusionblocks.config import validate
    from diffusionblocks.methods.base import Optimizer
    from diffusionblocks.models import LabelHead

    head = LabelHead(16, 8, "adaln")
    h, c1, c2 = torch.randn(4, 5, 16), torch.randn(4, 16), torch.randn(4, 16)
    assert torch.equal(head(h, c1), head(h, c2))  # zero-initialised: a LayerNorm without affine at first
    with torch.no_grad():
        head.modulation[1].weight.normal_()
    assert not torch.allclose(head(h, c1), head(h, c2))
    assert not hasattr(LabelHead(16, 8), "modulation")
    assert model("model.label_head=adaln").stack.head.kind == "adaln"
    assert model("model.noise_scale=1").stack.stem.noise.scale == 1.0
    assert model().stack.stem.noise.scale == 1000.0
    opt = Optimizer([torch.nn.Parameter(torch.zeros(2, 2))], apply_overrides(preset_tiny(), ["train.beta2=0.999"]), 10)
    assert opt.opt.defaults["betas"] == (0.9, 0.999)
    for bad, key in (("model.label_head=mlp", "model.label_head"), ("model.noise_scale=0", "model.noise_scale"),
                     ("train.beta2=1", "train.beta2")):
        with pytest.raises(ValueError, match=key):
            validate(apply_overrides(preset_tiny(), [bad]))
    with pytest.raises(ValueError, match="label head"):
        LabelHead(16, 8, "mlp")


@pytest.mark.parametrize("clean", [0.0, 1.0])
def test_input_clean_feeds_the_unnoised_point(clean):
    m = model(f"chain.input_clean={clean}", "chain.input_flip=0", "chain.input_mix=0")
    seen = {}
    denoise = m.stack.denoise

    def spy(block, z, sigma, x):
        seen["z"] = z
        return denoise(block, z, sigma, x)

    m.stack.denoise = spy
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    m.block_loss(1, x, y, torch.Generator().manual_seed(0))
    assert torch.allclose(seen["z"], m.labels(y)) == (clean == 1.0)
    with pytest.raises(ValueError, match="chain.input_clean"):
        from diffusionblocks.config import validate
        validate(apply_overrides(preset_tiny(), ["chain.input_clean=1.5"]))
