"""Difference target propagation (methods/dtp.py): no gradient crosses a block boundary, the difference-corrected
targets, a tiny run that learns (and resumes exactly), and the refusal on a task that does not classify images."""

import json
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import randomized, signal_on_step

from diffusionblocks import io
from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides
from diffusionblocks.methods.dtp import DTP, DTPClassifier, targets
from diffusionblocks.tasks.classify import EndToEndClassifier, preset_tiny
from diffusionblocks.train import train


def config(*overrides):
    cfg = preset_tiny()
    cfg.train.method = "dtp"
    return apply_overrides(cfg, list(overrides))


def method(*overrides, randomize=True):
    cfg = config(*overrides)
    torch.manual_seed(0)
    model = DTPClassifier(cfg.model, cfg.blocks, (8, 8), 1, 10)
    if randomize:  # a fresh adaLN-zero layer is the identity, which would hide attention and the inverses
        randomized(model)
    return DTP(model, cfg, cfg.train.steps)


def batch(n=6):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_same_network_as_end_to_end_and_its_cut():
    cfg = config("blocks.num_blocks=2")
    torch.manual_seed(0)
    e2e = EndToEndClassifier(cfg.model, (8, 8), 1, 10)
    torch.manual_seed(0)
    dtp = DTPClassifier(cfg.model, cfg.blocks, (8, 8), 1, 10)
    x, _ = batch()
    assert torch.equal(dtp(x), e2e.vit(x))  # same layers, same initial weights for the same seed
    assert dtp.allocation == [2, 2] and len(dtp.inverses) == 1
    uneven = config("blocks.num_blocks=3", "blocks.allocation=2,1,1")
    assert DTPClassifier(uneven.model, uneven.blocks, (8, 8), 1, 10).allocation == [2, 1, 1]
    with pytest.raises(ValueError, match="do not split evenly"):
        DTPClassifier(cfg.model, config("blocks.num_blocks=3").blocks, (8, 8), 1, 10)


@pytest.mark.parametrize("num_blocks", [2, 4])
def test_no_gradient_crosses_a_block_boundary(num_blocks):
    """Block b's local loss reaches its own parameters only (block 0's also the patch embedding and CLS token),
    inverse g_b's loss g_b's only, the CE the head's only; and each reaches all of its own but the adaLN
    modulation weights (they multiply the zero conditioning vector, so no loss reaches them, end to end neither)."""
    m = method(f"blocks.num_blocks={num_blocks}")
    model = m.model
    out = m.losses(*batch())
    params = list(model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    stem = {id(p) for p in [*model.patches.parameters(), model.cls]}
    cases = [(out["ce"].mean(), model.head_parameters())]
    cases += [(out["blocks"][b], model.block_parameters(b)) for b in range(num_blocks)]
    cases += [(out["inverses"][b], model.inverse_parameters(b)) for b in range(1, num_blocks)]
    for loss, own in cases:
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        reached = {id(p) for p, g in zip(params, grads) if g is not None and bool(g.abs().sum() > 0)}
        reachable = {id(p) for p in own if not names[id(p)].endswith("modulation.1.weight")}
        assert reached == reachable, sorted(names[i] for i in reached ^ reachable)
    assert {id(p) for p in model.block_parameters(0)} >= stem
    assert len(cases) == 2 * num_blocks  # every parameter is some loss's: head, B blocks, B - 1 inverses
    owned = [id(p) for _, own in cases for p in own]
    assert sorted(owned) == sorted(id(p) for p in params)


class Affine:
    """A hand-made chain: f_b(h) = 2h + 1 and its inverse g_b(h) = (h - 1) / 2 + error."""

    def __init__(self, error=0.0):
        self.error = error

    @staticmethod
    def f(h):
        return 2 * h + 1

    def inverse(self, b, h):
        return (h - 1) / 2 + self.error


def test_difference_correction():
    h0 = torch.randn(3, 4)
    outputs = [h0, Affine.f(h0), Affine.f(Affine.f(h0))]  # h_0, h_1, h_2
    top = outputs[-1] + 0.3 * torch.randn(3, 4)
    # a perfect inverse: the targets are the inverse images of the top target, and f maps each onto the next
    exact = targets(Affine(), outputs, top)
    assert torch.allclose(exact[-1], top)
    for b in (1, 2):
        assert torch.allclose(Affine.f(exact[b - 1]), exact[b], atol=1e-6)
    # an inverse with an error: the difference cancels it (plain target propagation, g(h_hat), would not)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(targets(Affine(error=5.0), outputs, top), exact))
    # the model's own (imperfect, random) inverses: h_hat_(b-1) - h_(b-1) = g_b(h_hat_b) - g_b(h_b), and a top
    # target equal to the top gives every block its own output as target
    m = method("blocks.num_blocks=4")
    model = m.model
    with torch.no_grad():
        hs = [model.embed(batch()[0])]
        for b in range(4):
            hs.append(model.block(b, hs[-1]))
        outputs, top = hs[1:], hs[-1] + 0.1 * torch.randn_like(hs[-1])
        hats = targets(model, outputs, top)
        for b in range(1, 4):
            assert torch.allclose(hats[b - 1] - outputs[b - 1],
                                  model.inverse(b, hats[b]) - model.inverse(b, outputs[b]), atol=1e-5)
        assert all(torch.equal(h, o) for h, o in zip(targets(model, outputs, outputs[-1]), outputs))


def test_top_target_is_a_step_down_the_per_sample_loss():
    """||f_top(h) - h_hat_top||^2 = mean((step * dCE_n/dh_top)^2): the step is along the per-sample CE's gradient,
    which reaches the CLS token only."""
    m = method("dtp.target_step=0.5")
    x, y = batch()
    top = m.model.embed(x)
    for b in range(m.model.num_blocks):
        top = m.model.block(b, top)
    top = top.detach().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(m.model.logits(top), y, reduction="sum"), top)
    assert grad[:, 1:].abs().max() == 0 and grad[:, 0].abs().max() > 0
    local = m.losses(x, y)["blocks"][-1]
    assert torch.allclose(local, (0.5 * grad).pow(2).mean(), rtol=1e-4)


def test_tiny_run_learns_and_the_inverses_improve(tmp_path, monkeypatch):
    """Starting from perturbed inverses, their reconstruction error falls; the CE falls; results.json holds the
    test accuracy, above chance."""
    recorded = []
    original_init, original_step = DTP.__init__, DTP.step

    def init(self, model, *args, **kwargs):
        torch.manual_seed(5)
        with torch.no_grad():
            for p in model.inverses.parameters():
                p.add_(0.1 * torch.randn_like(p))
        original_init(self, model, *args, **kwargs)

    def step(self, batch, block=0):
        out = original_step(self, batch, block)
        recorded.append(out)
        return out

    monkeypatch.setattr(DTP, "__init__", init)
    monkeypatch.setattr(DTP, "step", step)
    cfg = config("train.steps=80", "train.eval_limit=100", "train.eval_every=1000", "dtp.target_step=1")
    results = train(cfg, tmp_path / "run", progress=False)
    inverse = [sum(r["inverse_losses"]) for r in recorded]
    ce = [r["loss"] for r in recorded]
    assert sum(inverse[-10:]) < 0.5 * sum(inverse[:10])
    assert sum(ce[-10:]) < 0.8 * sum(ce[:10])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"] > 0.3  # chance is 0.1
    assert saved["layer_updates"] == 80 * 4 and saved["activation_bytes_per_step"] > 0


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """10 steps in one go = 5 steps, a stop, and --resume: the same weights."""
    cfg = config("train.steps=10", "train.eval_every=1000", "train.eval_limit=50")
    train(cfg, tmp_path / "full", progress=False)
    original = signal_on_step(monkeypatch, DTP, 6, signal.SIGINT)  # stops after step 6 finishes
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(DTP, "step", original)
    assert io.load_torch(tmp_path / "cut" / "state.pt")["step"] == 6
    train(None, tmp_path / "cut", resume=True, progress=False)
    a, _ = io.load_safetensors(tmp_path / "full" / "model.safetensors")
    b, _ = io.load_safetensors(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refused_on_image_generation(tmp_path, capsys):
    code = main(["train", "--task", "imagegen", "--preset", "gen-tiny", "--method", "dtp", "--out",
                 str(tmp_path / "gen")])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.method=dtp trains an image classifier" in err and "imagegen" in err
    assert not (tmp_path / "gen" / "config.json").exists()
