"""A trained run as a plain module (diffusionblocks.inference): classify, sample, generate and score text without
the dataset, matching what `eval` reports on the same inputs (tiny presets: seconds per run)."""

import shutil

import numpy as np
import pytest
import torch

from diffusionblocks import io
from diffusionblocks.config import apply_overrides, load_preset
from diffusionblocks.inference import Predictor, load
from diffusionblocks.run import evaluate, load_model
from diffusionblocks.tasks import get_task
from diffusionblocks.tasks.classify import ClassifyTask
from diffusionblocks.tasks.images import ImageTask
from diffusionblocks.tasks.lm import LMTask
from diffusionblocks.train import train


def preset(name, method, *overrides):
    cfg = load_preset(name)
    cfg.train.method = method
    return apply_overrides(cfg, list(overrides))


def no_data(monkeypatch):
    """Any read of a dataset fails: what load() must do without it."""
    def refuse(self, cfg):
        raise AssertionError("the dataset was read")
    for cls in (ImageTask, LMTask):
        monkeypatch.setattr(cls, "load_data", refuse)


@pytest.fixture(scope="module")
def classify_runs(tmp_path_factory):
    """e2e, dblocks and a block-wise baseline on the tiny preset, with the test images they were scored on."""
    pytest.importorskip("sklearn", reason="the tiny preset trains on scikit-learn's digits")
    root = tmp_path_factory.mktemp("classify")
    runs = {m: (root / m, train(preset("tiny", m, "train.steps=40", "train.eval_limit=40"), root / m, progress=False))
            for m in ("e2e", "dblocks", "greedy")}
    cfg = preset("tiny", "e2e")
    return runs, get_task("classify").load_data(cfg)


@pytest.mark.parametrize("method", ["e2e", "dblocks", "greedy"])
def test_classify_matches_eval_without_the_data(classify_runs, monkeypatch, method):
    runs, ds = classify_runs
    run, results = runs[method]
    assert io.load_json(run / "shapes.json") == {"image_size": [8, 8], "channels": 1, "num_classes": 10}
    no_data(monkeypatch)
    clf = load(run)
    assert isinstance(clf, Predictor) and not clf.training and not clf.model.training
    ids = clf.classify(ds.x_test)  # uint8 N x C x H x W, the library's layout
    assert ids.dtype == torch.int64 and ids.shape == (len(ds.y_test),)
    assert (ids == ds.y_test).double().mean().item() == results["test_accuracy"]
    channels_last = ds.x_test.permute(0, 2, 3, 1).numpy()  # as the data files hold them
    assert torch.equal(clf.classify(channels_last), ids)
    floats = ds.x_test.float() / 127.5 - 1  # the model's input range
    assert torch.equal(clf.classify(floats), ids)
    if method == "greedy":
        with pytest.raises(ValueError, match="class ids only"):
            clf.probabilities(ds.x_test[:4])
    else:
        probs = clf.probabilities(ds.x_test)
        assert probs.shape == (len(ds.y_test), 10) and torch.allclose(probs.sum(1), torch.ones(len(probs)))
        assert torch.equal(probs.argmax(1), ids)
    with pytest.raises(ValueError, match=r"sample: .* is a run of task classify .*can classify\(images\)"):
        clf.sample(4)
    with pytest.raises(ValueError, match="this run's model takes 1x8x8 images"):
        clf.classify(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_dblocks_inference_settings_match_eval(classify_runs, monkeypatch):
    """Keyword overrides are the run's inference settings; a drawn start uses eval's generator, so it matches."""
    runs, ds = classify_runs
    run, _ = runs["dblocks"]
    cfg, model, data = load_model(run)
    want = evaluate(model, data, cfg, steps_per_block=2, init="noise")["accuracy"]
    no_data(monkeypatch)
    ids = load(run).classify(ds.x_test, steps_per_block=2, init="noise")
    assert (ids == ds.y_test).double().mean().item() == want


def test_an_old_run_without_shapes_loads_from_its_data(classify_runs, tmp_path):
    runs, ds = classify_runs
    old = tmp_path / "old"
    shutil.copytree(runs["dblocks"][0], old)
    (old / "shapes.json").unlink()
    assert torch.equal(load(old).classify(ds.x_test[:50]), load(runs["dblocks"][0]).classify(ds.x_test[:50]))


def test_sample_images(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="gen-tiny trains on scikit-learn's digits")
    run = tmp_path / "gen"
    train(preset("gen-tiny", "dblocks", "train.steps=20", "train.eval_limit=40", "data.test_limit=40"), run,
          progress=False)
    no_data(monkeypatch)
    gen = load(run)
    images = gen.sample(6, classes=[3, 7], steps=4, seed=1)
    assert images.dtype == torch.uint8 and images.shape == (6, 8, 8, 1)
    assert torch.equal(images, gen.sample(6, classes=[3, 7], steps=4, seed=1))  # seeded
    assert not torch.equal(images, gen.sample(6, classes=[0, 1], steps=4, seed=1))  # the classes condition it
    with pytest.raises(ValueError, match="unknown class"):
        gen.sample(2, classes=[10])
    with pytest.raises(ValueError, match=r"classify: .* is a run of task imagegen .*can sample"):
        gen.classify(torch.zeros(1, 8, 8, dtype=torch.uint8))


@pytest.fixture(scope="module")
def lm_runs(corpus, tmp_path_factory):
    """Masked diffusion (DiffusionBlocks) and an end-to-end autoregressive model on the tests' corpus."""
    root = tmp_path_factory.mktemp("lm")
    runs = {}
    for task, method in (("mdlm", "dblocks"), ("arlm", "e2e"), ("arlm", "dblocks")):
        cfg = preset("lm-tiny", method, f"data.name={corpus}", "train.steps=10")
        cfg.task = task
        runs[task, method] = (root / f"{task}-{method}", train(cfg, root / f"{task}-{method}", progress=False))
    data = get_task(cfg.task).load_data(cfg)  # the same text and tokenizer for every run here
    return runs, data


@pytest.mark.parametrize("kind", [("mdlm", "dblocks"), ("arlm", "e2e")])
def test_score_matches_eval_on_the_same_windows(lm_runs, monkeypatch, kind):
    runs, data = lm_runs
    run, results = runs[kind]
    assert io.load_json(run / "shapes.json") == {"vocab_size": 27, "seq_len": 32}
    # the windows eval scored: data.test_limit = 16 windows of 32 tokens
    text = data.tokenizer.decode(np.asarray(data.splits["test"][:16 * 32]))
    no_data(monkeypatch)
    lm = load(run)
    assert lm.score(text) == pytest.approx(results["test_bpc"], rel=1e-9)
    out = lm.generate("the king", length=20, num=2, seed=3)
    assert len(out) == 2 and all(s.startswith("the king") and len(s) == 20 for s in out)
    assert out == lm.generate("the king", length=20, num=2, seed=3)
    if kind[0] == "mdlm":
        with pytest.raises(ValueError, match="generate: temperature: not an option of a MaskedDiffusionLM"):
            lm.generate("the king", length=20, temperature=0.5)
    with pytest.raises(ValueError, match="fewer than one sequence of 32"):
        lm.score("too short")
    with pytest.raises(ValueError, match=r"classify: .* can generate\(prompt"):
        lm.classify(torch.zeros(1, 8, 8, dtype=torch.uint8))


def test_a_model_without_a_likelihood_refuses_score(lm_runs, monkeypatch):
    runs, data = lm_runs
    run, results = runs["arlm", "dblocks"]
    text = data.tokenizer.decode(np.asarray(data.splits["test"][:16 * 32]))
    no_data(monkeypatch)
    lm = load(run)
    with pytest.raises(ValueError, match="no likelihood"):
        lm.score(text)
    ev = lm.evaluate(text)
    assert ev["next_token_accuracy"] == pytest.approx(results["test_next_token_accuracy"], rel=1e-9)
    assert all(s.startswith("to be") for s in lm.generate("to be", length=12, temperature=0))


def test_unseen_characters_are_refused(corpus, tmp_path, monkeypatch):
    cfg = preset("lm-tiny", "e2e", f"data.name={corpus}", "data.tokenizer=chars", "train.steps=2")
    cfg.task = "arlm"
    train(cfg, tmp_path / "run", progress=False)
    no_data(monkeypatch)
    lm = load(tmp_path / "run")
    with pytest.raises(ValueError, match=r"never saw in training: '#'"):
        lm.generate("the # king", length=20)


def test_the_shapes_file_is_a_run_file():
    assert "shapes.json" in ClassifyTask.run_files and "shapes.json" in LMTask.run_files
