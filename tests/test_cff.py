"""Contrastive Forward-Forward's own parts: the marginal supervised contrastive loss, the margin per layer, its head and
its settings. What it shares with the other block-wise baselines (no gradient across layers, training, resuming, a
non-finite layer) is in test_baselines.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomized

from diffusionblocks.config import apply_overrides, construct
from diffusionblocks.methods import get_method
from diffusionblocks.methods.cff import CFFClassifier, contrastive_loss
from diffusionblocks.run import validate
from diffusionblocks.tasks.classify import preset_tiny

SHAPE = {"image_size": (8, 8), "channels": 1, "num_classes": 10}


def build(*overrides):
    cfg = apply_overrides(preset_tiny(), ["train.method=cff", *overrides])
    torch.manual_seed(0)
    model = randomized(construct(CFFClassifier, cfg, **SHAPE))
    return cfg, model, get_method("cff")(model, cfg, 20)


def reference_loss(z, y, temperature, margin):
    """The loss anchor by anchor, written out as the formula in the module's docstring."""
    z = [v / v.norm() for v in z]
    out = []
    for i in range(len(y)):
        others = [a for a in range(len(y)) if a != i]
        positives = [p for p in others if y[p] == y[i]]
        sim = {a: min(float(z[i] @ z[a]) + margin, 1.0) if a in positives else float(z[i] @ z[a]) for a in others}
        log_denominator = math.log(sum(math.exp(sim[a] / temperature) for a in others))
        terms = [sim[p] / temperature - log_denominator for p in positives]
        out.append(-sum(terms) / len(terms) if terms else 0.0)
    return torch.tensor(out)


def test_the_loss_is_the_formula_anchor_by_anchor():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(9, 5, generator=g), torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 2])  # class 3: no positive
    for temperature, margin in [(0.15, 0.0), (0.15, 0.4), (0.5, 0.1), (1.0, 2.0)]:  # margin 2: every positive at 1
        loss = contrastive_loss(z, y, temperature, margin)
        assert loss.shape == (9,) and loss[6] == 0
        assert torch.allclose(loss, reference_loss(z, y, temperature, margin).float(), atol=1e-4)


def test_a_known_value_and_the_length_of_a_feature_does_not_matter():
    """Two classes on orthogonal axes, tau 1, no margin: each anchor's candidates are its twin (cosine 1) and two
    strangers (cosine 0): loss = -(1 - log(e + 2)) for every anchor."""
    z, y = torch.tensor([[1.0, 0], [3.0, 0], [0, 2.0], [0, 0.5]]), torch.tensor([0, 0, 1, 1])
    expected = math.log(math.e + 2) - 1
    assert torch.allclose(contrastive_loss(z, y, 1.0, 0.0), torch.full((4,), expected), atol=1e-6)
    assert torch.allclose(contrastive_loss(7 * z, y, 1.0, 0.0), torch.full((4,), expected), atol=1e-6)


def test_a_margin_lowers_the_loss_and_pulls_a_class_together_less():
    """The positive margin raises same-class similarities (capped at 1), so the loss and its pull on a positive pair
    shrink as the margin grows; a pair already at cosine 1 - margin or closer is not pulled at all."""
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(12, 6, generator=g), torch.arange(12) % 3
    losses = [contrastive_loss(z, y, 0.15, m).mean() for m in (0.0, 0.1, 0.4)]
    assert losses[0] > losses[1] > losses[2]
    pair = torch.tensor([[1.0, 0.0], [math.cos(0.2), math.sin(0.2)]], requires_grad=True)  # cosine 0.98
    stranger = torch.tensor([[-1.0, 0.3]])
    for margin, pulled in [(0.0, True), (0.05, False)]:
        feats = torch.cat([pair, stranger])
        contrastive_loss(feats, torch.tensor([0, 0, 1]), 0.15, margin)[0].backward()
        assert (pair.grad[1].abs().sum() > 1e-6) == pulled  # anchor 0's loss moves its positive only without the cap
        pair.grad = None


def test_the_margin_runs_linearly_from_the_first_layer_to_the_last():
    _, model, _ = build("cff.margin_first=0.4", "cff.margin_last=0.1")
    assert model.margins == pytest.approx([0.4, 0.3, 0.2, 0.1])  # the tiny preset's 4 layers
    _, one, _ = build("model.depth=1", "cff.margin_first=0.3")
    assert one.margins == pytest.approx([0.3])


def test_each_layer_reads_the_mean_of_its_output_tokens_and_the_head_the_last_layer():
    _, model, _ = build()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    h = model.embed(x)
    loss, out = model.layer_loss(0, h, y)
    assert torch.allclose(loss, contrastive_loss(out.mean(1), y, model.temperature, model.margins[0]))
    for i in range(1, model.num_layers):
        out = model.layer(i, out)
    assert torch.allclose(model.encode(x), out)
    assert torch.equal(model.predict(x)[0], model.head(out).argmax(-1))
    feats = F.layer_norm(out, (model.width,), model.head.norm.weight, model.head.norm.bias).mean(1)
    assert torch.allclose(model.head(out), model.head.out(feats), atol=1e-6)


def test_a_step_trains_the_head_on_the_last_layer_and_reports_each_layer():
    _, model, trainer = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = trainer.step((torch.randn(8, 1, 8, 8), torch.tensor([0, 1] * 4)), 0)
    assert len(m["layer_losses"]) == 4 and m["layers"] == 4 and math.isfinite(m["head_loss"])
    assert m["trained"] == {id(p) for p in model.parameters()}
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # every unit and the head moved


@pytest.mark.parametrize("override, message", [("cff.temperature=0", "cff.temperature"),
                                               ("cff.margin_first=-0.1", "cff.margin_first"),
                                               ("model.checkpoint=1", "model.checkpoint")])
def test_bad_settings_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        validate(apply_overrides(preset_tiny(), ["train.method=cff", override]))
