"""compare's fair arms: end-to-end for DiffusionBlocks' optimizer steps (e2e-steps), each arm's learning rate chosen
on a validation split over two seeds (the sweep reads no test item, is recorded in compare.json and compare.md, and
is reused on a re-run), the step at which each arm left its initial plateau, and curves against samples seen."""

import json
import warnings

import pytest

from diffusionblocks import compare as compare_module
from diffusionblocks.cli import main
from diffusionblocks.compare import (
    TUNE_DIR,
    candidates,
    choose,
    compare,
    left_plateau,
    plot,
    role_config,
    sweep_name,
    sweep_run,
    validation_size,
)
from diffusionblocks.config import apply_overrides, load_preset
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.tasks import get_task
from diffusionblocks.tasks.classify import ClassifyTask
from diffusionblocks.tasks.optional import Arm, pick

FAST = ["train.batch_size=16", "train.eval_limit=60", "train.log_every=2"]  # tiny runs; a diverged one stops at once
SANE, ABSURD = 3e-3, 1e6  # AdamW moves every weight by ~lr on its first step: 1e6 makes every later loss non-finite


def tiny(*overrides):
    return apply_overrides(load_preset("tiny"), [*FAST, *overrides])


def test_the_steps_arm_trains_dblocks_steps_and_b_times_the_layer_updates(tmp_path):
    base = tiny("train.steps=4")
    B = base.blocks.num_blocks
    cfg = role_config(base, "e2e-steps", 0)
    assert (cfg.train.method, cfg.train.budget, cfg.model.depth) == ("e2e", "steps", base.model.depth)
    assert cfg.train.steps == DBlocks.budget(role_config(base, "dblocks", 0))[0] == B * base.train.steps
    report = compare(base, tmp_path / "cmp", [0], ["e2e", "e2e-steps", "dblocks"], progress=False)
    rows = report["rows"]
    assert rows["e2e-steps"]["steps"] == rows["dblocks"]["steps"] == B * rows["e2e"]["steps"]
    assert rows["e2e-steps"]["samples_seen"] == rows["dblocks"]["samples_seen"] == 16 * B * 4
    updates = {role: r["layer_updates"] for role, r in rows.items()}
    assert updates["e2e-steps"] == B * updates["e2e"] == B * updates["dblocks"]
    assert any(v.startswith("dblocks - e2e-steps = ") for v in report["verdict"])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| e2e-steps | e2e |" in md and "samples seen" in md and "Left the initial plateau" in md


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One compare of e2e and dblocks with --tune-lr ABSURD,SANE over the default tune seeds 0, 1: its directory, the
    splits every evaluation read (with the run's data.val_size and lr), and what it printed."""
    out = tmp_path_factory.mktemp("tuned") / "cmp"
    seen = []
    evaluate = ClassifyTask.evaluate

    def recording(self, model, data, cfg, *, split="test", **kw):
        seen.append((split, cfg.data.val_size, cfg.train.lr))
        return evaluate(self, model, data, cfg, split=split, **kw)

    args = ["compare", "--preset", "tiny", "--methods", "e2e,dblocks", "--steps", "4", "--out", str(out),
            "--no-progress", "--tune-lr", f"{ABSURD:g},{SANE:g}", *FAST]
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="step .* non-finite loss")  # the absurd lr's, by design
        mp.setattr(ClassifyTask, "evaluate", recording)
        assert main(args) == 0
    return out, seen, args


def test_the_sweep_chooses_the_sane_lr_for_every_arm(tuned):
    out, _, _ = tuned
    tuning = json.loads((out / "compare.json").read_text())["tuning"]
    assert tuning["settings"] == ["lr"] and tuning["seeds"] == [0, 1] and tuning["metric"] == "val_accuracy"
    assert tuning["val_size"] == 1437 // 10  # digits' training images, a tenth held out
    for role in ("e2e", "dblocks"):
        arm = tuning["arms"][role]
        assert arm["chosen"] == {"lr": SANE}
        absurd, sane = arm["candidates"]
        assert absurd["lr"] == ABSURD and absurd["mean"] is None and set(absurd["failed"]) == {"0", "1"}
        assert sane["lr"] == SANE and all(0 <= v <= 1 for v in sane["values"]) and len(sane["values"]) == 2
        assert sane["mean"] == pytest.approx(sum(sane["values"]) / 2)
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert rows["e2e"]["lr"] == rows["dblocks"]["lr"] == SANE  # the test arms trained with the chosen lr


def test_the_sweep_reads_no_test_item(tuned):
    out, seen, _ = tuned
    assert {split for split, val_size, _ in seen if val_size} == {"validation"}  # every sweep evaluation
    tested = [(val_size, lr) for split, val_size, lr in seen if split == "test"]
    assert tested and set(tested) == {(0, SANE)}  # only the test arms, on all the training data, at the chosen lr
    for run in (out / TUNE_DIR).iterdir():
        if (run / "results.json").exists():
            results = json.loads((run / "results.json").read_text())
            assert results["eval_split"] == "validation" and not any(k.startswith("test_") for k in results)


def test_compare_json_and_md_hold_the_whole_sweep(tuned):
    out, _, _ = tuned
    tuning = json.loads((out / "compare.json").read_text())["tuning"]
    names = {sweep_name(role, c, s) for role in ("e2e", "dblocks") for c in candidates({"lr": [ABSURD, SANE]})
             for s in (0, 1)}
    assert {p.name for p in (out / TUNE_DIR).iterdir()} == names  # each lr, each seed, each arm
    md = (out / "compare.md").read_text()
    assert "Settings chosen on validation" in md and md.count("**yes**") == 2 and md.count("| failed | failed |") == 2
    for role, arm in tuning["arms"].items():
        values = " | ".join(f"{100 * v:.2f}" for v in arm["candidates"][1]["values"])
        assert f"| {role} | {SANE:g} | {values} |" in md


def test_a_rerun_reuses_the_sweep_and_the_arms(tuned, monkeypatch, capsys):
    out, _, args = tuned
    before = json.loads((out / "compare.json").read_text())["tuning"]

    def no_training(*a, **kw):
        raise AssertionError("a re-run trained a run it had")

    monkeypatch.setattr(compare_module, "train", no_training)
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("reusing failed run") == 4 and err.count("reusing finished run") == 4 + 2
    assert all(f"sweep run {n} of 8) ==" in err for n in range(1, 9)) and "arm run 2 of 2) ==" in err  # progress
    assert json.loads((out / "compare.json").read_text())["tuning"] == before


def test_only_a_diverged_sweep_run_is_kept_as_a_failure(tmp_path, monkeypatch):
    cfg = role_config(tiny(), "e2e", 0)
    (tmp_path / "run").mkdir()  # as train leaves it

    def raising(message):
        def run_arm(*a, **kw):
            raise ValueError(message)
        return run_arm

    monkeypatch.setattr(compare_module, "run_arm", raising("data.name='nope': no such dataset"))
    with pytest.raises(ValueError, match="no such dataset"):  # not a result of the sweep: the compare stops
        sweep_run(cfg, tmp_path / "run", False, False)
    assert not (tmp_path / "run" / "failed.json").exists()
    diverged = "the last 2 steps (to step 3) were all skipped: non-finite loss or gradient every time (loss=nan)"
    monkeypatch.setattr(compare_module, "run_arm", raising(diverged))
    assert sweep_run(cfg, tmp_path / "run", False, False) == {"failed": diverged}
    assert json.loads((tmp_path / "run" / "failed.json").read_text()) == {"failed": diverged}


def test_choose_takes_the_best_mean_of_finished_candidates():
    classify, mdlm = get_task("classify"), get_task("mdlm")
    tune = {"lr": [1e-3, 2e-3, 4e-3]}
    values = {(0, 0): 0.5, (0, 1): 0.7, (1, 0): 0.9, (1, 1): float("nan"), (2, 0): 0.6, (2, 1): 0.6}
    picked = choose(classify, tune, [0, 1], values)
    assert picked["chosen"] == {"lr": 1e-3}  # 2e-3 has a non-finite seed: out; 0.6 beats 0.6 only by coming first
    assert picked["candidates"][1]["mean"] is None and picked["candidates"][2]["mean"] == pytest.approx(0.6)
    assert choose(mdlm, tune, [0, 1], values)["chosen"] == {"lr": 1e-3}  # lower is better: 0.6 ties, the first
    values[2, 1] = 0.1
    assert choose(mdlm, tune, [0, 1], values)["chosen"] == {"lr": 4e-3}
    failed = {(i, s): "diverged" for i in range(3) for s in (0, 1)}
    partly = choose(classify, tune, [0, 1], {**failed, (0, 0): 0.9, (2, 0): 0.4, (2, 1): 0.4})
    assert partly["chosen"] == {"lr": 4e-3} and partly["candidates"][0]["failed"] == {"1": "diverged"}
    assert partly["candidates"][0]["values"] == [0.9, None]
    with pytest.raises(ValueError, match="no candidate of the sweep finished"):
        choose(classify, tune, [0, 1], failed)
    assert candidates({"lr": [1e-3, 2e-3], "warmup": [0.0, 0.1]})[1] == {"lr": 1e-3, "warmup": 0.1}


def test_the_validation_split_and_the_sweep_options_are_checked(tmp_path, capsys):
    assert validation_size(tiny("data.val_size=50"), get_task("classify"))[0] == 50  # given: used as it is
    assert validation_size(tiny(), get_task("classify"))[0] == 143
    assert validation_size(load_preset("lm-tiny"), get_task("mdlm"))[0] == 512  # the corpus's own validation text
    with pytest.raises(ValueError, match="give data.val_size=N"):
        validation_size(load_preset("hops-tiny"), get_task("hops"))
    with pytest.raises(ValueError, match="two seeds at least"):
        compare(tiny(), tmp_path / "c", [0], ["e2e"], progress=False, tune={"lr": [1e-3]}, tune_seeds=[0])
    with pytest.raises(ValueError, match="candidate lr 0.001 given twice"):
        compare(tiny(), tmp_path / "c", [0], ["e2e"], progress=False, tune={"lr": [1e-3, 1e-3]})
    assert not (tmp_path / "c").exists()  # a refused compare leaves nothing behind
    assert main(["compare", "--preset", "tiny", "--tune-lr", "1e-3,x", "--out", str(tmp_path / "c")]) == 2
    assert "--tune-lr '1e-3,x': expected comma-separated numbers" in capsys.readouterr().err
    assert main(["compare", "--preset", "tiny", "--tune-lr", "1e-3,-1", "--out", str(tmp_path / "c")]) == 2
    assert "train.lr=-1" in capsys.readouterr().err
    assert main(["compare", "--preset", "tiny", "--tune-seeds", "0,1", "--out", str(tmp_path / "c")]) == 2
    assert "give one of them too" in capsys.readouterr().err


def curve(values, batches=10):
    return [{"step": batches * i, "layer_updates": 4 * batches * i, "accuracy": v} for i, v in enumerate(values, 1)]


def test_the_plateau_is_left_at_the_first_evaluation_beyond_the_margin():
    classify, mdlm = get_task("classify"), get_task("mdlm")
    assert left_plateau(curve([0.10, 0.11, 0.12, 0.30]), "accuracy", classify) == {"step": 40, "layer_updates": 160}
    assert left_plateau(curve([0.10, 0.11, 0.115]), "accuracy", classify) == {}  # never more than 2 points
    assert left_plateau(curve([0.10]), "accuracy", classify) is None  # one evaluation: nothing to judge
    bpc = [{"step": s, "layer_updates": s, "bpc": v} for s, v in ((1, 3.0), (2, 2.95), (3, 2.9))]
    assert left_plateau(bpc, "bpc", mdlm) == {"step": 3, "layer_updates": 3}  # lower: by more than 2% of 3.0


def test_the_end_to_end_reference_is_the_layer_update_matched_arm_whatever_the_order():
    arm = lambda role, form, steps: Arm(role, form, "classify", True, [{"steps": steps}], [0.5], None, 32)
    arms = {"e2e-steps": arm("e2e-steps", "end-to-end", 300), "dblocks": arm("dblocks", "blocks", 300),
            "e2e": arm("e2e", "end-to-end", 100)}
    assert pick(arms, "end-to-end").role == "e2e" and pick(arms, "blocks").role == "dblocks"
    assert pick({"dblocks": arms["dblocks"]}, "end-to-end") is None


def test_the_curves_are_drawn_against_samples_seen_too(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    kept, close = [], plt.close
    plt.close = kept.append
    try:
        run = lambda values: {"num_blocks": 1, "curve": curve(values), "eval_split": "test", "curve_n": 50}
        arms = {"e2e": Arm("e2e", "end-to-end", "classify", True, [run([0.1, 0.5])], [0.5], None, 32),
                "e2e-steps": Arm("e2e-steps", "end-to-end", "classify", True, [run([0.1, 0.6])], [0.6], None, 32)}
        assert plot(arms, get_task("classify"), tmp_path / "compare.png")
        left, right = kept[-1].axes
        assert "layer-updates" in left.get_xlabel() and "samples seen" in right.get_xlabel()
        assert list(right.get_lines()[0].get_xdata()) == [320, 640]  # steps x batch size
        assert [t.get_text() for t in left.get_legend().get_texts()] == ["end-to-end",
                                                                          "end-to-end, DiffusionBlocks' steps"]
        arms["e2e"].batch_size = 0  # an arm of unknown batch size: the one panel of before
        assert plot(arms, get_task("classify"), tmp_path / "one.png") and len(kept[-1].axes) == 1
    finally:
        plt.close = close
        for fig in kept:
            close(fig)


def test_a_language_sweep_chooses_on_the_validation_text_and_its_test_arms_read_test(tmp_path):
    """Without data.val_size the sweep of a language task scores the corpus's validation text, which no arm trains
    on, so the test arms keep the whole training text and their run is the one compare makes without a sweep."""
    base = apply_overrides(load_preset("lm-tiny"), ["train.steps=2", "train.log_every=1"])
    report = compare(base, tmp_path / "c", [0], ["e2e"], progress=False, tune={"lr": [3e-3, 1e-3]})
    assert report["tuning"]["val_size"] == 512 and "validation text" in report["tuning"]["val_size_from"]
    sweep = json.loads((tmp_path / "c" / TUNE_DIR / "e2e-lr0.001-seed1" / "results.json").read_text())
    assert "val_bpc" in sweep and "test_bpc" not in sweep
    chosen = report["tuning"]["arms"]["e2e"]["chosen"]["lr"]
    arm = json.loads((tmp_path / "c" / "e2e-seed0" / "config.json").read_text())
    assert arm["data"]["val_size"] == 0 and arm["train"]["lr"] == chosen
    assert report["rows"]["e2e"]["lr"] == chosen and "test_bpc" in report["rows"]["e2e"]

