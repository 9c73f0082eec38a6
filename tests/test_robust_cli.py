"""The command line against user mistakes and unbounded requests: compare never replaces a finished arm without
--overwrite and refuses duplicate arms and seeds; sample never writes over an existing file (a run's own files
never) and refuses requests past its caps; paths and devices that cannot work are one-line errors (exit 2)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import language_model, randomized

from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides, load_preset
from diffusionblocks.images import read_png_size
from diffusionblocks.tasks import imagegen
from diffusionblocks.tasks.arlm import ARLMTask
from diffusionblocks.tasks.arlm_models import ARDiffusionLM, AutoregressiveLM
from diffusionblocks.tasks.lm import MAX_TEXT_TOKENS

COMPARE = ["compare", "--preset", "tiny", "--methods", "e2e", "--no-progress", "train.steps=4"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-arm compare (tiny, 4 steps)."""
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    assert main([*COMPARE, "--out", str(out)]) == 0
    return out


@pytest.fixture
def cmp(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / "cmp")


@pytest.fixture(scope="module")
def text_run(corpus, tmp_path_factory):
    """An autoregressive run (lm-tiny, 4 steps) on the tests' corpus."""
    run = tmp_path_factory.mktemp("arlm") / "run"
    assert main(["train", "--task", "arlm", "--method", "e2e", "--preset", "lm-tiny", "--data", str(corpus), "--out",
                 str(run), "--no-progress", "train.steps=4", "data.test_limit=4"]) == 0
    return run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """An image generation run (gen-tiny, 4 steps)."""
    pytest.importorskip("sklearn")
    run = tmp_path_factory.mktemp("gen") / "run"
    assert main(["train", "--preset", "gen-tiny", "--out", str(run), "--no-progress", "train.steps=4"]) == 0
    return run


def test_compare_refuses_a_finished_arm_of_other_settings_unless_overwrite(cmp, capsys):
    arm = cmp / "e2e-seed0"
    weights = (arm / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*COMPARE, "--out", str(cmp), "train.lr=0.002"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(arm) in err and "train.lr: 0.003 -> 0.002" in err
    assert "--overwrite" in err and "another --out" in err
    assert (arm / "model.safetensors").read_bytes() == weights and (arm / "results.json").exists()
    assert main([*COMPARE, "--out", str(cmp), "train.lr=0.002", "--overwrite"]) == 0
    assert json.loads((arm / "config.json").read_text())["train"]["lr"] == 0.002


def test_compare_reuses_a_finished_arm_run_under_other_runtime_settings(cmp, capsys):
    capsys.readouterr()
    assert main([*COMPARE, "--out", str(cmp), "train.threads=1", "train.device=auto", "train.log_every=1",
                 "train.ckpt_every=2"]) == 0
    assert "reusing finished run" in capsys.readouterr().err


def test_compare_resumes_an_interrupted_arm_with_this_calls_runtime_settings(cmp, capsys):
    arm = cmp / "e2e-seed0"
    (arm / "results.json").unlink()  # its checkpoint stays: an interrupted run
    capsys.readouterr()
    assert main([*COMPARE, "--out", str(cmp), "train.threads=1"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert json.loads((arm / "config.json").read_text())["train"]["threads"] == 1


def test_compare_refuses_duplicate_seeds_and_arms_and_a_file_as_out(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert main([*COMPARE, "--out", out, "--seeds", "0,1,0"]) == 2
    assert "seed 0 given twice" in capsys.readouterr().err
    assert main([*COMPARE[:3], "--methods", "e2e,dblocks,e2e", *COMPARE[5:], "--out", out]) == 2
    assert "arm e2e given twice" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    (tmp_path / "f").write_text("x")
    assert main([*COMPARE, "--out", str(tmp_path / "f")]) == 2
    assert "a file, not a directory" in capsys.readouterr().err
    assert main([*COMPARE, "--out", str(tmp_path / "f" / "c")]) == 2
    assert "cannot create the directory" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("[1, 2]", "config is an object of sections"), ("{", "not valid JSON"),
                                           ('{"train": 5}', "has no 'task' or 'model'")])
def test_a_malformed_config_json_is_a_one_line_error(tmp_path, capsys, text, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    (run / "model.safetensors").write_bytes(b"")
    (run / "state.pt").write_bytes(b"")
    for argv in (["eval", str(run)], ["sample", str(run), "--out", str(tmp_path / "s.txt")],
                 ["train", "--resume", str(run)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, argv


def test_compare_refuses_an_arm_with_a_malformed_config(cmp, capsys):
    (cmp / "e2e-seed0" / "config.json").write_text("[]")
    capsys.readouterr()
    assert main([*COMPARE, "--out", str(cmp)]) == 2
    assert "config is an object of sections" in capsys.readouterr().err


def test_sample_never_writes_over_a_runs_own_files(text_run, capsys):
    for name in ("model.safetensors", "config.json", "state.pt", "tokenizer.json"):
        before = (text_run / name).read_bytes()
        assert main(["sample", str(text_run), "--num", "1", "--length", "4", "--overwrite", "--out",
                     str(text_run / name)]) == 2, name
        assert "a file of the run" in capsys.readouterr().err
        assert (text_run / name).read_bytes() == before


def test_sample_refuses_an_existing_file_without_overwrite_and_a_directory(text_run, tmp_path, capsys):
    out = tmp_path / "s.txt"
    out.write_text("keep")
    argv = ["sample", str(text_run), "--num", "1", "--length", "4", "--out", str(out)]
    assert main(argv) == 2
    assert "exists: give --overwrite" in capsys.readouterr().err and out.read_text() == "keep"
    assert main([*argv, "--overwrite"]) == 0 and out.read_text().startswith("=== sample 0 ===")
    assert main([*argv[:-1], str(tmp_path)]) == 2
    assert "a directory" in capsys.readouterr().err


def test_sample_refuses_text_past_its_cap_before_sampling(text_run, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(ARLMTask, "write_samples", never)
    for flags in (["--length", "1000000000"], ["--num", "100000", "--length", "8"]):
        assert main(["sample", str(text_run), *flags, "--out", str(tmp_path / "s.txt")]) == 2
        assert f"over the {MAX_TEXT_TOKENS:,}" in capsys.readouterr().err


def test_sample_refuses_images_past_its_caps_before_sampling(image_run, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(imagegen, "generate", never)
    out = str(tmp_path / "s.png")
    assert main(["sample", str(image_run), "--num", "100000000", "--out", out]) == 2
    assert f"at most {imagegen.MAX_GRID} images; add --npz" in capsys.readouterr().err
    assert main(["sample", str(image_run), "--num", "100000000", "--npz", "--out", out]) == 2
    assert "GiB" in capsys.readouterr().err


def test_sample_npz_past_the_grid_and_never_over_an_existing_npz(image_run, tmp_path, capsys):
    out = tmp_path / "s.png"
    (tmp_path / "s.npz").write_bytes(b"data")
    argv = ["sample", str(image_run), "--num", str(imagegen.MAX_GRID + 1), "--sample-steps", "1", "--npz", "--out",
            str(out)]
    assert main(argv) == 2
    assert "exists: give --overwrite" in capsys.readouterr().err and (tmp_path / "s.npz").read_bytes() == b"data"
    assert not out.exists()
    assert main([*argv, "--overwrite"]) == 0
    # the first 64 x 64 of the 4097 8x8 images (a 642 px grid), scaled up as far as 4096 px allows: 6x
    assert read_png_size(out) == (6 * (64 * 10 + 2),) * 2
    assert np.load(tmp_path / "s.npz")["x"].shape == (imagegen.MAX_GRID + 1, 1, 8, 8)


@pytest.mark.parametrize("model_cls", [AutoregressiveLM, ARDiffusionLM])
def test_text_sampling_never_copies_the_whole_sample_per_token(model_cls, monkeypatch):
    """Past the window the sampler fills a preallocated buffer: no concatenation of token ids is ever wider than one
    window (growing the sample by concatenation is quadratic in its length)."""
    cfg = apply_overrides(load_preset("lm-tiny"), ["data.seq_len=12"])
    cfg.task = "arlm"
    model = randomized(language_model(model_cls, cfg, 27))
    cat, widths = torch.cat, []

    def recording(tensors, dim=0, **kwargs):
        out = cat(tensors, dim, **kwargs)
        if out.dtype == torch.long and out.ndim == 2:  # token ids
            widths.append(out.shape[1])
        return out

    monkeypatch.setattr(torch, "cat", recording)
    tokens = model.sample(2, 30, torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 30) and tokens[:, :3].tolist() == [[1, 2, 3]] * 2
    assert max(widths, default=0) <= model.seq_len


def test_memory_out_and_device_mistakes_are_one_line_errors(tmp_path, capsys):
    base = ["memory", "--preset", "tiny", "--blocks", "2", "--no-plot", "--no-progress"]
    (tmp_path / "f").write_text("x")
    for out, message in ((tmp_path / "f", "a file, not a directory"), (tmp_path / "f" / "x", "cannot create")):
        assert main([*base, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert main([*base, "--device", "tpu", "--out", str(tmp_path / "m")]) == 2
    assert "expected cpu, cuda, cuda:N or auto" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main([*base, "--out", str(locked / "m")]) == 2
        assert "cannot create" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_eval_and_sample_run_where_the_run_says_or_the_command_line_asks(tmp_path, capsys):
    """A run trained on a GPU (train.device=cuda in its config) is evaluated on a machine without one on the CPU;
    train.device=cuda given to eval there is a one-line error, not a silent run on the CPU."""
    run = tmp_path / "run"
    assert main(["train", "--preset", "hops-tiny", "--out", str(run), "--no-progress", "train.steps=2"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["device"] = "cuda"  # as a GPU machine would have written it
    (run / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 128
    assert main(["eval", str(run), "train.device=cuda"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err
    gen = tmp_path / "gen"
    assert main(["train", "--preset", "gen-tiny", "--out", str(gen), "--no-progress", "train.steps=2"]) == 0
    assert main(["sample", str(gen), "--out", str(tmp_path / "s.png"), "--num", "4", "train.device=cpu"]) == 0
    assert main(["sample", str(gen), "--out", str(tmp_path / "t.png"), "--num", "4", "train.device=cuda"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err
