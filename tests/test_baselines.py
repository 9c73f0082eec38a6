"""The block-wise baselines DiffusionBlocks is compared against: Hinton's Forward-Forward (ff), Contrastive
Forward-Forward (cff), decoupled greedy local learning (dgl) and greedy block-wise training (greedy). NoProp-DT, DTP and
Contrastive Forward-Forward's own parts have their own test files."""

import json
import math
import signal

import pytest
import torch
from conftest import randomized, signal_on_step

from diffusionblocks import io
from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides, construct
from diffusionblocks.methods import base as base_module
from diffusionblocks.methods import cff as cff_module
from diffusionblocks.methods import dgl as dgl_module
from diffusionblocks.methods import ff as ff_module
from diffusionblocks.methods import get_method
from diffusionblocks.methods import greedy as greedy_module
from diffusionblocks.methods.ff import negative_labels
from diffusionblocks.run import validate
from diffusionblocks.tasks.classify import preset_tiny

pytest.importorskip("sklearn", reason="the tiny preset trains on scikit-learn's digits")
LOCAL = ("ff", "cff", "dgl", "greedy")


def build(method, *overrides):
    cfg = apply_overrides(preset_tiny(), [f"train.method={method}", *overrides])
    torch.manual_seed(0)
    shape = {"image_size": (8, 8), "channels": 1, "num_classes": 10}
    model = randomized(construct(get_method(method).classifier, cfg, **shape))  # every parameter gets a gradient
    return cfg, model, get_method(method)(model, cfg, 20)


def test_negatives_are_never_the_true_label_and_cover_the_others():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(500)
    neg = negative_labels(y, 10, g)
    assert bool((neg != y).all()) and neg.min() >= 0 and neg.max() <= 9
    for c in range(10):  # every other class drawn, about equally (450 draws each expected)
        counts = torch.bincount(neg[y == c], minlength=10)
        assert counts[c] == 0 and int(counts.sum()) == 500 and counts[torch.arange(10) != c].min() > 30
    two = negative_labels(torch.tensor([0, 1] * 50), 2, g)  # two classes: always the other one
    assert torch.equal(two, torch.tensor([1, 0] * 50))


@pytest.mark.parametrize("method", LOCAL)
def test_no_gradient_crosses_a_unit_boundary(monkeypatch, method):
    """Every update a step makes: after its backward, only the parameters it updates hold a gradient (the
    previous layers' or blocks' outputs reach it detached)."""
    cfg, model, trainer = build(method)
    module = {"ff": ff_module, "cff": cff_module, "dgl": dgl_module, "greedy": greedy_module}[method]
    names = {id(p): n for n, p in model.named_parameters()}
    calls = []

    def checked_update(loss, params, optimizers, clip, sync=None):
        for p in model.parameters():
            p.grad = None
        loss.backward()
        mine = {id(p) for p in params}
        stray = [names[id(p)] for p in model.parameters() if p.grad is not None and id(p) not in mine]
        assert not stray, f"a gradient crossed into {stray[:3]}"
        assert all(p.grad is not None for p in params if p.requires_grad)
        calls.append(len(params))
        for p in model.parameters():
            p.grad = None
        return {"loss": loss.item(), "grad_norm": 1.0, "lr": 0.0}

    monkeypatch.setattr(module, "update", checked_update)
    monkeypatch.setattr(base_module, "update", checked_update)  # the layer-by-layer loop ff and cff share
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    if method == "greedy":  # a step on each block, block 1 after block 0's phase
        trainer.step((x, y), 0)
        trainer.step((x, y), 1)
        assert len(calls) == 2
    else:
        trainer.step((x, y), 0)
        # ff, cff: every layer, then the readout or the head
        units = {"ff": cfg.model.depth + 1, "cff": cfg.model.depth + 1, "dgl": cfg.blocks.num_blocks}[method]
        assert len(calls) == units


def test_ff_layers_read_direction_not_goodness():
    """The next layer's input is the output normalised per token: scaling a layer's output changes nothing after."""
    _, model, _ = build("ff")
    h = model.embed(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    assert torch.allclose(h.pow(2).mean(-1), torch.ones(3, h.shape[1]), atol=1e-4)
    out, g = model.layer(0, h)
    assert torch.allclose(g, out.pow(2).mean((1, 2)))
    assert torch.allclose(ff_module.rms_normalize(5 * out), ff_module.rms_normalize(out), atol=1e-5)


def test_ff_neutral_label_is_its_own_row_or_the_mean_of_the_class_rows():
    """ff.neutral: the readout's label token; class tokens are the same either way, and so is the init."""
    _, own, _ = build("ff")
    _, mean, _ = build("ff", "ff.neutral=mean")
    assert all(torch.equal(a, b) for a, b in zip(own.parameters(), mean.parameters()))
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([4, 10])  # a class, then the neutral label
    table = own.labels.weight
    rms = lambda v: v / v.pow(2).mean().add(1e-6).sqrt()  # noqa: E731
    assert torch.allclose(own.embed(x, labels)[:, 0], torch.stack([rms(table[4]), rms(table[10])]), atol=1e-5)
    assert torch.allclose(mean.embed(x, labels)[:, 0], torch.stack([rms(table[4]), rms(table[:10].mean(0))]),
                          atol=1e-5)
    with pytest.raises(ValueError, match="ff.neutral"):
        validate(apply_overrides(preset_tiny(), ["train.method=ff", "ff.neutral=zero"]))


def test_ff_sweep_runs_one_pass_per_class():
    _, model, _ = build("ff")
    labels = []
    run = model.run
    model.run = lambda x, lab: (labels.append(int(lab[0])), run(x, lab))[1]
    preds = model.predict(torch.randn(4, 1, 8, 8))
    assert labels == list(range(10)) and len(preds) == 1 and preds[0].shape == (4,)
    assert set(model.other_predictions(torch.randn(4, 1, 8, 8))) == {"readout"}


@pytest.mark.parametrize("method", LOCAL)
def test_loss_falls_and_results_hold_test_accuracy(tmp_path, capsys, method):
    # the layer-local objectives learn slowest: more steps at a higher rate than the tiny preset's 3e-3
    steps, lr = {"ff": (200, 6e-3), "cff": (150, 1e-2)}.get(method, (100, 3e-3))
    out = tmp_path / method
    assert main(["train", "--preset", "tiny", "--method", method, "--out", str(out), "--no-progress",
                 f"train.steps={steps}", f"train.lr={lr}", "train.log_every=20", "train.eval_every=100000",
                 "data.test_limit=100"]) == 0
    losses = [r["loss"] for r in io.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.95 * losses[0], losses
    if method == "ff":  # below 2 ln 2, where a layer lands that gives every label the same goodness (= theta)
        assert losses[-1] < 2 * math.log(2) - 0.03, losses
    results = io.load_json(out / "results.json")
    assert 0 <= results["test_accuracy"] <= 1 and results["layer_updates"] == steps * 4
    if method == "ff":  # both readings, in results.json and in the line the run prints
        assert 0 <= results["test_accuracy_readout"] <= 1
        assert f"readout {100 * results['test_accuracy_readout']:.2f}%" in capsys.readouterr().out
    elif method == "cff":  # one prediction, the head's, well above chance (10%) after 150 steps (84% when written)
        assert results["accuracy_per_step"] == [results["test_accuracy"]] and results["test_accuracy"] > 0.5
    else:  # one prediction per block, the last block's is the model's
        assert len(results["accuracy_per_step"]) == 2 and results["accuracy_per_step"][-1] == results["test_accuracy"]
    assert main(["eval", str(out)]) == 0  # a saved baseline evaluates again


def test_greedy_trains_its_blocks_in_order_and_freezes_the_earlier_ones(tmp_path):
    out = tmp_path / "g"
    assert main(["train", "--preset", "tiny", "--method", "greedy", "--out", str(out), "--no-progress",
                 "train.steps=20", "train.log_every=5", "train.eval_limit=50", "data.test_limit=50"]) == 0
    updates = [r["block_updates"] for r in io.read_jsonl(out / "metrics.jsonl") if "block_updates" in r]
    assert updates[-1] == [20, 20]
    assert all(u[1] == 0 for u in updates if u[0] < 20)  # block 1 starts only once block 0 is done


@pytest.mark.parametrize("method", LOCAL)
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, method):
    common = ["--preset", "tiny", "--method", method, "--no-progress", "train.steps=8", "train.threads=1",
              "train.eval_limit=30", "data.test_limit=30", "train.ckpt_every=1000"]
    assert main(["train", "--out", str(tmp_path / "whole"), *common]) == 0
    original = signal_on_step(monkeypatch, get_method(method), 5, signal.SIGINT)
    assert main(["train", "--out", str(tmp_path / "cut"), *common]) == 130
    monkeypatch.setattr(get_method(method), "step", original)
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    a, b = (io.load_safetensors(tmp_path / run / "model.safetensors")[0] for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", LOCAL)
def test_a_baseline_on_a_task_without_an_image_classifier_is_a_clear_error(tmp_path, capsys, method):
    assert main(["train", "--task", "imagegen", "--preset", "gen-tiny", "--method", method,
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"train.method={method} trains an image classifier, which task imagegen does not have" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_compare_takes_baselines_as_arms(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", "tiny", "--methods", "e2e,ff,dgl", "--out", str(out), "--no-progress",
                 "train.steps=10", "train.eval_limit=30", "data.test_limit=30"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert list(report["rows"]) == ["e2e", "ff", "dgl"]
    assert all(r["layer_updates"] == 40 for r in report["rows"].values())  # one budget for every arm
    assert main(["compare", "--preset", "tiny", "--methods", "e2e,nope", "--out", str(tmp_path / "c2")]) == 2
    assert "unknown arm 'nope'" in capsys.readouterr().err and not (tmp_path / "c2" / "e2e-seed0").exists()


@pytest.mark.parametrize("method", ["ff", "cff", "dgl"])
def test_a_non_finite_unit_stops_the_step_and_counts_the_layers_updated_before_it(monkeypatch, method):
    _, model, trainer = build(method)
    module = {"ff": ff_module, "cff": cff_module, "dgl": dgl_module}[method]
    calls = []

    def skip_the_second(loss, params, optimizers, clip, sync=None):
        calls.append(1)
        return {"skipped": True, "loss": float("nan")} if len(calls) == 2 else {"loss": 1.0, "grad_norm": 1.0, "lr": 0}

    monkeypatch.setattr(module, "update", skip_the_second)
    monkeypatch.setattr(base_module, "update", skip_the_second)
    m = trainer.step((torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))), 0)
    # ff, cff: layer 0 updated (1 layer), dgl: block 0 updated (2 layers of the tiny model's 4)
    assert m["skipped"] and len(calls) == 2 and m["layers"] == {"ff": 1, "cff": 1, "dgl": 2}[method]
