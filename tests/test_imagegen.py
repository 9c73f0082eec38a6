"""Image generation: the DiT under EDM, trained both ways; sampling with block routing; FD; the CLI."""

import pytest
import torch

from diffusionblocks import io
from diffusionblocks.blocks import BlockStack
from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides
from diffusionblocks.fd import frechet_distance
from diffusionblocks.images import grid, png_bytes, read_png_size
from diffusionblocks.models import DiTHead, DiTStem
from diffusionblocks.tasks.imagegen import ImageGenerator, preset_gen_tiny

DIGITS = ((8, 8), 1, 10)


def gen_cfg(method="dblocks", *overrides):
    cfg = preset_gen_tiny()
    cfg.train.method = method
    return apply_overrides(cfg, list(overrides))


def model_for(method="dblocks", *overrides):
    torch.manual_seed(0)
    cfg = gen_cfg(method, *overrides)
    return ImageGenerator(cfg.model, cfg.blocks, cfg.gen, *DIGITS, num_blocks=1 if method == "e2e" else None)


def test_dit_head_unpatchifies_and_starts_at_zero():
    stem, head = DiTStem((7, 9), 3, 2, 16, 10), DiTHead((7, 9), 3, 2, 16)  # sides not multiples of the patch
    h, c = stem(torch.randn(2, 3, 7, 9), torch.zeros(2), torch.tensor([1, 10]))
    assert h.shape == (2, 4 * 5, 16) and c.shape == (2, 16)
    out = head(h, c)
    assert out.shape == (2, 3, 7, 9) and out.abs().max() == 0  # zero-init: D = c_skip z at first
    with pytest.raises(ValueError, match="class-conditional"):
        stem(torch.randn(2, 3, 7, 9), torch.zeros(2))
    with pytest.raises(ValueError, match="unconditional"):
        DiTStem((7, 9), 3, 2, 16)(torch.randn(2, 3, 7, 9), torch.zeros(2), torch.tensor([0, 1]))


@pytest.mark.parametrize("method", ["e2e", "dblocks"])
def test_tiny_dit_trains_and_the_loss_falls(tmp_path, method):
    pytest.importorskip("sklearn")
    from diffusionblocks.train import train

    results = train(gen_cfg(method, "train.steps=40", "train.eval_every=20", "train.eval_limit=50"), tmp_path / method,
                    progress=False)
    curve = [p["eval_loss"] for p in results["curve"]]
    assert len(curve) >= 2 and curve[-1] < 0.9 * curve[0]
    # the reported test loss is the saved model's denoising loss on the whole test set
    from diffusionblocks.run import evaluate, load_model

    cfg, model, data = load_model(tmp_path / method)
    assert results["task"] == "imagegen" and results["eval_loss"] == evaluate(model, data, cfg)["eval_loss"]
    assert results["test_n"] == len(data.y_test)
    assert results["num_blocks"] == (2 if method == "dblocks" else 1)


def test_e2e_is_one_block_over_the_whole_range():
    e2e, db = model_for("e2e"), model_for("dblocks")
    assert e2e.num_blocks == 1 and db.num_blocks == 2
    lo, hi = e2e.partition.training_interval(0)
    assert (lo, hi) == (e2e.partition.levels.lo, e2e.partition.levels.hi)
    assert sum(p.numel() for p in e2e.parameters()) == sum(p.numel() for p in db.parameters())  # shared stem/head


def _ode_reference(z, sigmas, sampler, s2):
    """The sampler's steps written out for the exact denoiser of N(0, s2) data, D(z) = s2 / (s2 + sigma^2) z."""
    D = lambda z, sigma: s2 / (s2 + sigma**2) * z
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (z - D(z, s)) / s
        z_next = z + (s_next - s) * d
        if sampler == "heun" and s_next > 0:
            z_next = z + (s_next - s) * 0.5 * (d + (z_next - D(z_next, s_next)) / s_next)
        z = z_next
    return z


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampler_follows_the_probability_flow_of_gaussian_data(sampler):
    """With the exact denoiser of N(0, s2) data, the samples are the ODE steps written out independently, and
    with a fine grid they approach the exact flow x(0) = z_T * s / sqrt(s2 + sigma_max^2)."""
    model, s2 = model_for(), 0.25

    class Gaussian(torch.nn.Module):
        def forward(self, z, sigma, cond=None):
            return s2 / (s2 + sigma.view(-1, 1, 1, 1) ** 2) * z

    model.stack = Gaussian()
    error = {}
    for steps in (6, 200):
        x, _ = model.sample(3, steps, sampler=sampler, classes=[0], generator=torch.Generator().manual_seed(0))
        sigmas = model.grid(steps).double()
        z_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double() * sigmas[0]
        reference = _ode_reference(z_T, sigmas.tolist(), sampler, s2)
        assert torch.allclose(x.double(), reference, rtol=1e-4, atol=1e-4)  # float32 sampler, float64 reference
        exact = z_T * s2**0.5 / (s2 + sigmas[0] ** 2) ** 0.5
        error[steps] = float((x.double() - exact).abs().max() / exact.abs().max())
    assert error[200] < 0.05 and error[200] < 0.1 * error[6], error  # a finer grid converges to the exact flow


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampler_with_an_oracle_denoiser_returns_the_data_point(sampler):
    model = model_for()
    point = torch.rand(1, 1, 8, 8) * 2 - 1

    class Oracle(torch.nn.Module):  # the ideal denoiser of a one-point dataset
        def forward(self, z, sigma, cond=None):
            return point.expand_as(z)

    model.stack = Oracle()
    x, labels = model.sample(3, 6, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, point.expand(3, -1, -1, -1), atol=1e-6) and labels.shape == (3,)


@pytest.mark.parametrize("steps", [2, 4, 6])
def test_sampling_calls_exactly_one_block_per_step(monkeypatch, steps):
    model = model_for()
    calls = []
    original = BlockStack.denoise

    def denoise(self, block, z, level, cond=None):
        calls.append((block, z.shape[0]))
        return original(self, block, z, level, cond)

    monkeypatch.setattr(BlockStack, "denoise", denoise)
    model.sample(5, steps, generator=torch.Generator().manual_seed(0))
    assert len(calls) == steps  # one denoiser call per Euler step, on the whole batch
    assert [b for b, _ in calls] == [0] * (steps // 2) + [1] * (steps // 2) and {n for _, n in calls} == {5}


def test_a_dblocks_step_runs_one_block_of_layers():
    """Sampling cost in layer calls: B times fewer per step than end to end (the paper's 3x at B = 3)."""
    counts = {}
    for method in ("e2e", "dblocks"):
        model = model_for(method)
        n = [0]
        for layer in model.stack.modules():
            if type(layer).__name__ == "TransformerLayer":
                layer.register_forward_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        model.sample(2, 4, generator=torch.Generator().manual_seed(0))
        counts[method] = n[0]
    assert counts == {"e2e": 4 * 4, "dblocks": 4 * 2}


def test_cfg_scale_one_is_the_conditional_model():
    model = model_for()
    for p in model.parameters():  # a model whose output depends on the class
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    a, _ = model.sample(4, 4, cfg_scale=1.0, classes=[3], generator=torch.Generator().manual_seed(1))
    b, _ = model.sample(4, 4, cfg_scale=None, classes=[3], generator=torch.Generator().manual_seed(1))
    c, _ = model.sample(4, 4, cfg_scale=3.0, classes=[3], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_sampling_errors_are_clear():
    model = model_for()
    with pytest.raises(ValueError, match="steps must be"):
        model.sample(2, 0)
    with pytest.raises(ValueError, match=r"unknown class\(es\) \[10\]"):
        model.sample(2, 4, classes=[1, 10])
    with pytest.raises(ValueError, match="sampler"):
        model.sample(2, 4, sampler="dpm")
    with pytest.raises(ValueError, match="number of samples"):
        model.sample(0, 4)
    uncond = model_for("dblocks", "gen.conditional=false")
    x, labels = uncond.sample(2, 4)
    assert labels is None and x.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        uncond.sample(2, 4, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(2, 4, classes=[1])


def test_grid_lands_on_block_edges():
    model = model_for()
    g = model.grid(4)
    assert g.numel() == 5 and g[-1] == 0
    assert model.partition.route(g[:-1]).tolist() == [0, 0, 1, 1]
    assert model.grid(5).numel() == 6 and model.grid(3, "karras").numel() == 4


def test_frechet_distance_is_zero_on_itself_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    noise = torch.randn(500, 8, generator=g, dtype=torch.float64)
    fds = [frechet_distance(a, a + s * noise) for s in (0.1, 0.5, 1.0, 2.0)]
    assert fds == sorted(fds) and fds[0] > 0
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    c = 2 * torch.randn(20000, 4, generator=g, dtype=torch.float64) + 1
    assert frechet_distance(b, c) == pytest.approx(4 * 1 + 4 * (1 + 4 - 2 * 2), rel=0.05)  # closed form
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :4])


def test_png_grid_has_the_right_size(tmp_path):
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    g = grid(images, nrow=5, pad=2)
    assert g.shape == (1, 2 * 10 + 2, 5 * 10 + 2)
    path = tmp_path / "g.png"
    path.write_bytes(png_bytes(g))
    assert read_png_size(path) == (52, 22)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(torch.zeros(2, 4, 4))


def test_train_sample_eval_cli(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--preset", "gen-tiny", "--out", str(run), "--no-progress", "train.steps=20"]) == 0
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--num", "10", "--nrow", "5", "--sample-steps", "4", "--out", str(out),
                 "--classes", "1,2", "--npz"]) == 0
    assert read_png_size(out) == (8 * 52, 8 * 22)  # 8x8 digits shown at 64 px
    assert main(["sample", str(run), "--num", "10", "--nrow", "5", "--sample-steps", "1", "--out", str(out),
                 "--scale", "1", "--overwrite"]) == 0
    assert read_png_size(out) == (52, 22)
    import numpy as np

    saved = np.load(tmp_path / "s.npz")
    assert saved["x"].shape == (10, 1, 8, 8) and saved["y"].tolist() == [1, 2] * 5
    for bad in (["--sample-steps", "0"], ["--classes", "12"], ["--classes", "a"],
                ["--cfg-scale", "2", "--sample-steps", "-1"]):
        assert main(["sample", str(run), "--out", str(out), "--overwrite", *bad]) == 2, bad
    capsys.readouterr()
    monkeypatch.setattr("diffusionblocks.tasks.imagegen.reference_config", _tiny_reference)
    assert main(["eval", str(run), "--num", "50", "--sample-steps", "2", "--json"]) == 0
    import json

    ev = json.loads(capsys.readouterr().out)
    assert ev["fd_classifier_features"] >= 0 and ev["num_generated"] == 50 and len(ev["per_class_accuracy"]) == 10
    assert (tmp_path / "cache" / "fd-digits" / "results.json").exists()
    assert io.load_json(run / "results.json")["task"] == "imagegen"


def _tiny_reference(dataset):
    from diffusionblocks.config import load_preset

    cfg = load_preset("tiny")
    cfg.train.method, cfg.data.name, cfg.train.steps, cfg.train.eval_limit = "e2e", dataset, 20, 40
    return cfg


def test_compare_imagegen_scores_four_arms_at_two_budgets(tmp_path, monkeypatch, capsys):
    """e2e, the one-block-depth control and DiffusionBlocks on one layer-update budget, and e2e for DiffusionBlocks'
    steps, scored by FD with its floor and count; scores are cached and reused on a second run."""
    pytest.importorskip("sklearn")
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("diffusionblocks.tasks.imagegen.reference_config", _tiny_reference)
    out = tmp_path / "cmp"
    args = ["compare", "--task", "imagegen", "--preset", "gen-tiny", "--steps", "4", "--seeds", "0,1", "--out",
            str(out), "--no-progress", "gen.fd_samples=20", "gen.steps=2", "train.eval_every=100000",
            "train.eval_limit=40", "data.test_limit=40"]
    assert main(args) == 0
    report = io.load_json(out / "compare.json")
    rows = report["rows"]
    assert set(rows) == {"e2e", "e2e-steps", "control", "dblocks"} and report["metric"] == "fd_classifier_features"
    assert rows["control"]["depth"] == 2 and rows["e2e"]["depth"] == 4 and rows["dblocks"]["num_blocks"] == 2
    assert rows["e2e"]["layer_updates"] == rows["control"]["layer_updates"] == rows["dblocks"]["layer_updates"]
    assert rows["e2e-steps"]["steps"] == rows["dblocks"]["steps"] and rows["e2e-steps"]["depth"] == 4
    assert all(len(r["fd_classifier_features"]) == 2 and min(r["fd_classifier_features"]) > 0 for r in rows.values())
    assert report["sampling_speedup"] > 0 and (out / "samples.png").exists()
    text = (out / "compare.md").read_text()
    assert "20 generated vs 20 test images" in text and "real-vs-real floor" in text and "| control |" in text
    for figure in ("compare.png", "loss.png", "samples.png"):  # each figure written, linked from compare.md
        assert f"]({figure})" in text and (out / figure).exists()
    scored = (out / "control-seed1" / "score.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "control-seed1" / "score.json").stat().st_mtime_ns == scored  # reused, not rescored


def test_colour_images_and_uneven_sides():
    cfg = gen_cfg("dblocks", "model.patch=3")
    torch.manual_seed(0)
    model = ImageGenerator(cfg.model, cfg.blocks, cfg.gen, (10, 7), 3, 4)  # 3 channels, sides not a patch multiple
    x, y = torch.rand(5, 3, 10, 7) * 2 - 1, torch.randint(4, (5,))
    loss = model.block_loss(1, x, y, torch.Generator().manual_seed(0))
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    samples, labels = model.sample(2, 4, classes=[3])
    assert samples.shape == (2, 3, 10, 7) and labels.tolist() == [3, 3]


def test_presets_build():
    from diffusionblocks.config import load_preset, validate

    for name in ("gen-tiny", "gen-quick", "gen-fashion", "gen-dit-s"):
        cfg = validate(load_preset(name))
        with torch.device("meta"):
            model = ImageGenerator(cfg.model, cfg.blocks, cfg.gen, (32, 32), 3, 10)
        assert model.num_blocks == cfg.blocks.num_blocks


def test_scripted_feature_extractor_is_an_optional_fd_path(tmp_path):
    from diffusionblocks.fd import ScriptedFeatures

    class Pool(torch.nn.Module):  # stands in for an Inception pool3 extractor: (N, 3, S, S) -> (N, D)
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    path = tmp_path / "extractor.pt"
    torch.jit.save(torch.jit.script(Pool()), str(path))
    feats = ScriptedFeatures(path, size=16)
    images = torch.rand(40, 1, 8, 8) * 2 - 1
    f = feats(images)
    assert f.shape == (40, 3 * 4) and f.dtype == torch.float64
    assert abs(frechet_distance(f, f)) < 1e-6 * float(f.var(0).sum())  # zero up to rounding
    with pytest.raises(ValueError, match="not found"):
        ScriptedFeatures(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="TorchScript"):
        ScriptedFeatures(tmp_path / "junk.pt")
