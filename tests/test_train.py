"""The training loop end to end on the tiny preset (scikit-learn digits, seconds per run)."""

import json
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import signal_on_step

from diffusionblocks import io
from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides
from diffusionblocks.data import DataError
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.methods.e2e import EndToEnd
from diffusionblocks.run import evaluate, load_model, validate
from diffusionblocks.tasks.classify import preset_tiny
from diffusionblocks.train import train

pytest.importorskip("sklearn", reason="the tiny preset trains on scikit-learn's digits")


STEPS = 120  # the trained runs' steps


SMALL_EVAL = {"train__eval_limit": 40, "data__test_limit": 40}  # for tests that read no accuracy


def tiny(method, **overrides):
    cfg = preset_tiny()
    cfg.train.method = method
    return apply_overrides(cfg, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both methods trained once on the tiny preset (120 of its 150 steps, its evaluations during training on 40
    images; the final one on all 360), shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("runs")
    return {m: (root / m, train(tiny(m, train__steps=STEPS, train__eval_limit=40), root / m, progress=False))
            for m in ("e2e", "dblocks")}


@pytest.mark.parametrize("method", ["e2e", "dblocks"])
def test_both_methods_learn(trained, method):
    _, results = trained[method]
    assert results["test_accuracy"] > 0.4  # chance is 0.1
    assert results["method"] == method


def test_results_and_files(trained):
    run, results = trained["dblocks"]
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "state.pt", "results.json"):
        assert (run / name).exists(), name
    on_disk = io.load_json(run / "results.json")
    for key in ("test_accuracy", "method", "num_blocks", "train_seconds", "layer_updates"):
        assert key in on_disk
    assert on_disk["num_blocks"] == 2 and len(on_disk["accuracy_per_step"]) == 2
    # layer-update budget: dblocks ran B times the e2e steps, on 1/B of the layers each
    e2e = trained["e2e"][1]
    assert results["steps"] == 2 * e2e["steps"]
    assert results["layer_updates"] == e2e["layer_updates"] == STEPS * 4
    assert sum(results["block_updates"]) == results["steps"] and min(results["block_updates"]) > 0
    records = io.read_jsonl(run / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    assert logged and set(logged[-1]["blocks"]) <= {"0", "1"} and "grad_norm" in logged[-1]["blocks"]["0"]
    assert any("eval_accuracy" in r for r in records)


def test_eval_with_another_number_of_steps(trained, capsys):
    run, results = trained["dblocks"]
    cfg, model, ds = load_model(run)
    again = evaluate(model, ds, cfg)
    assert again["accuracy"] == results["test_accuracy"]  # the checkpoint reproduces the run's result
    three = evaluate(model, ds, cfg, steps_per_block=3)
    assert len(three["accuracy_per_step"]) == 6
    assert main(["eval", str(run), "--steps-per-block", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["accuracy_per_step"]) == 4 and out["steps_per_block"] == 2


@pytest.mark.parametrize("method", ["e2e", "dblocks"])
def test_resume_reaches_the_same_result(tmp_path, monkeypatch, method):
    cfg = tiny(method, train__steps=30, train__ckpt_every=1000, **SMALL_EVAL)
    full = train(cfg, tmp_path / "full", progress=False)

    # interrupt with a real SIGINT in the middle of the run: the loop stops at the next step boundary
    step_cls = EndToEnd if method == "e2e" else DBlocks
    original = signal_on_step(monkeypatch, step_cls, 17, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(step_cls, "step", original)
    assert io.load_torch(tmp_path / "cut" / "state.pt")["step"] == 17
    resumed = train(None, tmp_path / "cut", resume=True, progress=False)

    a, _ = io.load_safetensors(tmp_path / "full" / "model.safetensors")
    b, _ = io.load_safetensors(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["layer_updates"] == full["layer_updates"]
    assert [p["accuracy"] for p in resumed["curve"]] == [p["accuracy"] for p in full["curve"]]


def test_sigterm_checkpoints_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """SIGTERM (Slurm, Kubernetes, torchrun) stops the loop at the next step boundary with a checkpoint, as Ctrl-C
    does; the command exits 143 (128 + SIGTERM), and --resume finishes the run."""
    original = signal_on_step(monkeypatch, EndToEnd, 5, signal.SIGTERM)
    run, before = str(tmp_path / "run"), signal.getsignal(signal.SIGTERM)
    assert main(["train", "--preset", "tiny", "--method", "e2e", "--out", run, "--no-progress", "train.steps=12",
                 "train.ckpt_every=1000", "train.eval_limit=40", "data.test_limit=40"]) == 143
    assert "stopped by SIGTERM at step 5/12; checkpoint saved" in capsys.readouterr().err
    assert io.load_torch(tmp_path / "run" / "state.pt")["step"] == 5
    assert signal.getsignal(signal.SIGTERM) == before  # the loop's handler is gone after it
    monkeypatch.setattr(EndToEnd, "step", original)
    assert main(["train", "--resume", run, "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 12


def test_a_window_of_skipped_steps_stops_training(tmp_path, monkeypatch, capsys):
    """Issue 16, item 5: when every step of a logging window is skipped (a learning rate that overflows, broken
    data) training stops with an error instead of running on and exiting 0."""
    monkeypatch.setattr(EndToEnd, "step", lambda self, batch, block=None: {"skipped": True, "loss": float("inf"),
                                                                            "layers": 0})
    with pytest.warns(UserWarning, match="skipped"):
        assert main(["train", "--preset", "tiny", "--method", "e2e", "--out", str(tmp_path / "run"), "--no-progress",
                     "train.steps=50", "train.log_every=5"]) == 2
    assert "the last 5 steps (to step 5) were all skipped" in capsys.readouterr().err


def test_non_finite_step_is_skipped(tmp_path, monkeypatch):
    cfg = tiny("dblocks", train__steps=5, **SMALL_EVAL)
    original, calls = DBlocks.step, []

    def step(self, batch, block=None):
        calls.append(1)
        if len(calls) == 3:
            x = batch[0].clone()
            x[0, 0, 0, 0] = float("nan")
            batch = (x, *batch[1:])
        return original(self, batch, block)

    monkeypatch.setattr(DBlocks, "step", step)
    with pytest.warns(UserWarning, match="skipped"):
        results = train(cfg, tmp_path / "nan", progress=False)
    assert results["skipped_steps"] == 1 and results["steps"] == 10
    weights, _ = io.load_safetensors(tmp_path / "nan" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_starved_block_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(DBlocks, "next_block", lambda self: 0)
    train(tiny("dblocks", train__steps=20, train__log_every=20, **SMALL_EVAL), tmp_path / "starve", progress=False)
    records = [r for r in io.read_jsonl(tmp_path / "starve" / "metrics.jsonl") if "starved_blocks" in r]
    assert records and records[-1]["starved_blocks"] == [1]
    assert "received no update" in capsys.readouterr().err


def test_round_robin_visits_blocks_in_turn(tmp_path):
    results = train(tiny("dblocks", train__steps=5, dblocks__block_choice="round-robin", **SMALL_EVAL), tmp_path / "rr",
                    progress=False)
    assert results["block_updates"] == [5, 5]


def test_user_npz_trains(tmp_path):
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, 90), rng.integers(0, 3, 30)
    # class k is a bright square in corner k: learnable
    def images(labels):
        x = rng.integers(0, 40, (len(labels), 8, 8)).astype(np.uint8)
        for i, k in enumerate(labels):
            x[i, 4 * (k // 2):4 * (k // 2) + 4, 4 * (k % 2):4 * (k % 2) + 4] = 250
        return x
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    results = train(tiny("e2e", data__name=str(path), train__batch_size=30, train__steps=50), tmp_path / "npz",
                    progress=False)
    assert results["test_n"] == 30 and results["test_accuracy"] > 0.6


def test_a_model_too_large_for_memory_is_a_clear_error(tmp_path, capsys):
    # num_classes = 10^12 asks for a 10^12-row classifier head: more than any address space, so no machine
    # allocates it (the allocator refuses at once, nothing is touched)
    x = np.zeros((4, 8, 8), np.uint8)
    path = tmp_path / "huge.npz"
    np.savez(path, x_train=x, y_train=np.arange(4), x_test=x, y_test=np.arange(4), num_classes=np.array(10**12))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), f"data.name={path}", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "does not fit in memory" in err and "1,000,000,000,000 classes" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists()


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        apply_overrides(preset_tiny(), ["train.nope=1"])
    with pytest.raises(ValueError, match="not a valid int"):
        apply_overrides(preset_tiny(), ["train.steps=many"])
    with pytest.raises(ValueError, match="train.method"):
        validate(apply_overrides(preset_tiny(), ["train.method=sgd"]))
    with pytest.raises(DataError, match="not found"):
        train(tiny("e2e", data__name=str(tmp_path / "missing.npz")), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="cannot resume"):
        train(None, tmp_path / "never-started", resume=True, progress=False)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "y"), "model.depth=zero"]) == 2


@pytest.mark.parametrize("override", ["train.log_every=0", "train.ckpt_every=0", "train.threads=-1",
                                      "model.mlp_ratio=0", "train.min_lr_ratio=-5", "train.lr=inf",
                                      "data.train_limit=-5", "data.test_limit=-1", "train.eval_batch_size=0",
                                      "chain.steps_per_block=0", "train.eval_limit=-1",
                                      "ff.theta=nan", "dgl.aux_pool=max", "noprop.eta=-1",
                                      "dtp.target_step=0"])
def test_bad_values_are_refused_before_training(tmp_path, capsys, override):
    """Each of these crashed or trained wrongly (issue 16, items 4 and 5); now a one-line error naming the key, and
    nothing is written."""
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(apply_overrides(preset_tiny(), [override]))
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), override]) == 2
    assert key in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_overrides_may_follow_options(tmp_path, capsys):
    """`train --out DIR train.steps=3 --no-progress train.log_every=1` (issue 16, item 7): both overrides apply; an
    unknown option is still refused, and so is an override given to a command that takes none."""
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=3", "--no-progress",
                 "train.log_every=1"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["train"]["steps"], cfg["train"]["log_every"]) == (3, 1)
    capsys.readouterr()
    for argv in (["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--stpes", "3"],
                 ["partition", "--num-blocks", "3", "train.steps=3"]):
        assert main(argv) == 2
        assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["sample", "RUN", "--out", "s.png", "--nrow", "0"], "--nrow: 0 must be >= 1"),
    (["sample", "RUN", "--out", "s.png", "--nrow", "-1"], "--nrow: -1 must be >= 1"),
    (["sample", "RUN", "--out", "s.png", "--num", "0"], "--num: 0 must be >= 1"),
    (["sample", "RUN", "--out", "s.png", "--cfg-scale", "nan"], "--cfg-scale: nan is not a finite number"),
    (["eval", "RUN", "--steps-per-block", "0"], "--steps-per-block: 0 must be >= 1"),
    (["eval", "RUN", "--limit", "-5"], "--limit: -5 must be >= 0"),
    (["sample", "RUN", "--out", "missing/s.png"], "does not exist"),
])
def test_bad_command_line_values_are_refused(tmp_path, capsys, argv, message):
    """Values that drew black images, dropped items or showed a torch-internal message (issue 16, items 4, 5, 8):
    a one-line error, exit status 2, before any run is loaded."""
    argv = [str(tmp_path / a) if a in ("RUN", "s.png", "missing/s.png") else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_new_run_never_mixes_with_an_old_one(tmp_path, capsys):
    """Issue 16, item 1: a non-empty --out is refused without --overwrite (the old run untouched); with it, the old
    run's files are removed before the new run writes any, so a kill before the first checkpoint leaves no old
    weights beside the new config."""
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "train.steps=2"]) == 0
    (run / "job.json").write_text("{}")  # files only the old run had
    (run / "merge.json").write_text("{}")
    weights = (run / "model.safetensors").read_bytes()
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "train.steps=3"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (run / "model.safetensors").read_bytes() == weights
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 2

    def killed(self, batch, block=None):
        assert not any((run / name).exists() for name in ("model.safetensors", "job.json", "merge.json"))
        assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3
        raise KeyboardInterrupt  # killed before the first checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EndToEnd, "step", killed)
        assert main(["train", "--preset", "tiny", "--method", "e2e", "--out", str(run), "--no-progress",
                     "--overwrite", "train.steps=3"]) == 130
    assert main(["eval", str(run)]) == 2  # a clear error, not a mix of two runs
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "--overwrite", "train.steps=3"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3
    assert (run / "results.json").exists() and not (run / ".lock").exists()


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run of the tiny preset from the command line; the tests below work on copies of it."""
    run = tmp_path_factory.mktemp("two-steps") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "train.steps=2"]) == 0
    return run


@pytest.mark.parametrize("extra", [["train.steps=50"], ["--out", "elsewhere"], ["--num-blocks", "2"], ["--steps", "9"]])
def test_resume_refuses_settings_it_would_ignore(two_steps, tmp_path, capsys, extra):
    """Issue 16, item 6: --resume used to ignore overrides, --out and --num-blocks silently; now it refuses them."""
    run = shutil.copytree(two_steps, tmp_path / "run")
    assert main(["train", "--resume", str(run), "--no-progress", *extra]) == 2
    assert extra[0].split("=")[0] in capsys.readouterr().err


@pytest.mark.parametrize("edit", [("heads", 1), ("width", 64), ("depth", 2)])
def test_a_config_edited_since_training_is_a_clear_error(two_steps, tmp_path, capsys, edit):
    """Issue 16, item 4: eval and --resume of a run whose config.json no longer matches its weights: one line naming
    what changed (a changed head count keeps every shape, so the weights record the architecture)."""
    run = shutil.copytree(two_steps, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"][edit[0]] = edit[1]
    (run / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    for argv in (["eval", str(run)], ["train", "--resume", str(run), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err and f"model.{edit[0]}: " in err


def test_a_run_directory_is_locked(tmp_path, capsys):
    """A second training into a directory in use gets a clear error and writes nothing; the lock goes with its
    holder (tests/test_robust_run.py: other processes, damaged lock files, races)."""
    from diffusionblocks.run import RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "train.steps=2"]) == 2
    assert "is in use" in capsys.readouterr().err and not (run / "config.json").exists()
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "train.steps=2"]) == 0
    assert not (run / ".lock").exists()


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "tiny", "--steps", "10", "--out", str(out), "--no-progress", "train.eval_limit=40",
            "data.test_limit=40"]
    assert main(args) == 0
    report = json.loads((out / "compare.json").read_text())
    assert set(report["rows"]) == {"e2e", "e2e-steps", "control", "dblocks"}
    assert report["provenance"]["torch"] == torch.__version__ and report["provenance"]["argv"]
    assert report["provenance"]["started"] <= report["provenance"]["ended"]
    rows = report["rows"]
    assert rows["control"]["depth"] == 2 and rows["e2e"]["depth"] == 4
    assert rows["e2e"]["layer_updates"] == rows["control"]["layer_updates"] == rows["dblocks"]["layer_updates"]
    assert (out / "compare.png").stat().st_size > 1000
    md = (out / "compare.md").read_text()
    assert "| dblocks |" in md and "±" not in md and "one seed (n=1)" in md  # one seed: no spread shown
    assert report["rows"]["e2e"]["test_accuracy_std"] is None
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)  # every figure written is linked, and nothing else
    assert linked == ["compare.png", "loss.png"] and all((out / f).stat().st_size > 1000 for f in linked)
    assert "dblocks - e2e" in capsys.readouterr().out
    # finished arms are reused, not retrained
    assert main(args) == 0
    assert "reusing finished run" in capsys.readouterr().err


def test_compare_verdict_calls_a_difference_inside_the_seed_spread_a_tie():
    """A baseline 0.1 points under DiffusionBlocks with seed spreads of a point is no win; 5 points over spreads
    of 0.5 is; one seed has no spread to judge by: its table shows none and its verdict names no winner."""
    from diffusionblocks.compare import markdown_table, separated, summarize, verdict
    from diffusionblocks.tasks import get_task

    def arm(method, values):
        return [{"method": method, "depth": 6, "num_blocks": 3, "seed": s, "test_accuracy": v, "steps": 10,
                 "layer_updates": 60, "train_seconds": 1.0, "seconds_per_layer_update": 0.01,
                 "activation_bytes_per_step": 1, "parameters": 1} for s, v in enumerate(values)]

    task = get_task("classify")
    rows = summarize({"dblocks": arm("dblocks", [0.840, 0.850, 0.830]), "greedy": arm("greedy", [0.849, 0.829, 0.839]),
                      "ff": arm("ff", [0.790, 0.800, 0.785])}, "test_accuracy")
    lines = verdict(rows, "test_accuracy", task)
    assert separated(rows, "test_accuracy", "greedy", "dblocks") is False
    assert ("greedy - dblocks = -0.10 points: a tie at 3 seeds: the difference is under two standard errors of it"
            in lines)
    assert separated(rows, "test_accuracy", "ff", "dblocks") is True
    assert "ff - dblocks = -4.83 points: DiffusionBlocks beat ff" in lines
    table = markdown_table(rows, "test_accuracy", "test accuracy (%)", 100).splitlines()
    assert "| greedy | greedy B=3 | 6 | 83.90 ± 1.00 | 84.90, 82.90, 83.90 | 10 |" in table[3]  # each seed's too
    assert all(line.count("|") == 11 for line in table)
    one = summarize({"dblocks": arm("dblocks", [0.84]), "greedy": arm("greedy", [0.83])}, "test_accuracy")
    assert separated(one, "test_accuracy", "greedy", "dblocks") is None
    assert verdict(one, "test_accuracy", task) == [  # one seed names no winner, whichever mean is higher
        "greedy - dblocks = -1.00 points: one seed names no winner: no spread to judge the difference by (run "
        "--seeds 0,1,2)"]
    table = markdown_table(one, "test_accuracy", "test accuracy (%)", 100)
    assert "±" not in table and "| 84.00 |" in table and one["dblocks"]["test_accuracy_std"] is None
    same = summarize({"dblocks": arm("dblocks", [0.5, 0.5]), "greedy": arm("greedy", [0.5, 0.5])}, "test_accuracy")
    assert separated(same, "test_accuracy", "greedy", "dblocks") is False  # equal means: never a win


def test_ema_weights_are_what_eval_uses(tmp_path):
    results = train(tiny("dblocks", train__steps=20, train__ema=0.9, **SMALL_EVAL), tmp_path / "ema", progress=False)
    assert (tmp_path / "ema" / "ema.safetensors").exists()
    cfg, model, ds = load_model(tmp_path / "ema")
    assert evaluate(model, ds, cfg)["accuracy"] == results["test_accuracy"]
    raw, _ = io.load_safetensors(tmp_path / "ema" / "model.safetensors")
    averaged = dict(model.state_dict())
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)  # really different weights


def test_compare_argument_errors(tmp_path, capsys):
    assert main(["compare", "--quick", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "--quick" in capsys.readouterr().err
    assert main(["compare", "--preset", "tiny", "--seeds", "0,x", "--out", str(tmp_path)]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_a_validation_split_is_held_out_and_runs_report_on_it(tmp_path, capsys):
    """data.val_size: the run trains on the rest, its curves and results are on validation; test is for eval."""
    cfg = tiny("dblocks", train__steps=20, data__val_size=200)
    results = train(cfg, tmp_path / "val", progress=False)
    assert results["eval_split"] == "validation" and results["val_n"] == 200 and "test_accuracy" not in results
    assert results["validation"]["size"] == 200 and 0 <= results["val_accuracy"] <= 1
    records = [r for r in io.read_jsonl(tmp_path / "val" / "metrics.jsonl") if "eval_accuracy" in r]
    assert records and all(r["eval_split"] == "validation" and r["eval_n"] == 200 for r in records)
    cfg_m, model, data = load_model(tmp_path / "val")
    assert len(data.y_train) == 1437 - 200 and len(data.y_val) == 200
    train_rows = {tuple(x.flatten().tolist()) for x in data.x_train}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in data.x_val[:50])  # disjoint
    again = evaluate(model, data, cfg_m, split="validation")
    assert again["accuracy"] == results["val_accuracy"]
    assert main(["eval", str(tmp_path / "val"), "--split", "test", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "test" and out["n"] == 360
    cfg2 = tiny("e2e", train__steps=5)
    train(cfg2, tmp_path / "noval", progress=False)
    assert main(["eval", str(tmp_path / "noval"), "--split", "validation"]) == 2
    assert "no validation split" in capsys.readouterr().err


def test_the_validation_split_is_fixed_and_checked():
    from diffusionblocks.tasks.classify import ClassifyTask

    a = ClassifyTask().load_data(tiny("e2e", data__val_size=100, train__seed=1))
    b = ClassifyTask().load_data(tiny("e2e", data__val_size=100, train__seed=2))
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)  # the same whatever the seed
    assert len(set(a.y_val.tolist())) == 10  # drawn across the training set, not its first rows
    with pytest.raises(DataError, match="cannot hold out 5000"):
        ClassifyTask().load_data(tiny("e2e", data__val_size=5000))
    with pytest.raises(ValueError, match="data.val_size"):
        validate(tiny("e2e", data__val_size=-1))


def test_results_record_their_provenance(trained, tmp_path):
    """results.json says what produced it: versions, commit, device, times, command (logs.provenance)."""
    import platform
    import sys

    from diffusionblocks.logs import git_commit

    run, results = trained["dblocks"]
    p = io.load_json(run / "results.json")["provenance"]
    assert p == results["provenance"] and p["torch"] == torch.__version__ and p["python"] == platform.python_version()
    assert p["device"] == "cpu" and p["argv"] == sys.argv and p["git_commit"] == git_commit()
    assert p["started"] <= p["ended"] and p["started"].endswith("+00:00") and "resumed" not in p
    job = tiny("dblocks", train__steps=2, train__blocks="1", blocks__shared_stem_head="false",
               dblocks__block_choice="sequential")
    assert train(job, tmp_path / "job", progress=False)["per_block_job"]  # a per-block job's results too
    assert io.load_json(tmp_path / "job" / "results.json")["provenance"]["torch"] == torch.__version__
