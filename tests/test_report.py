"""compare's report on hand-made runs (nothing trains): a speed-up above the ideal B is flagged, the figures draw
each seed, their mean and its spread, the training losses come from each run's metrics.jsonl, and sample sheets
are scaled up and labelled (plain and scaled up without matplotlib)."""

import json

import pytest
import torch

from diffusionblocks import images
from diffusionblocks.compare import metric_words, plot, plot_losses, training_losses
from diffusionblocks.config import load_preset
from diffusionblocks.images import read_png_size, readable_factor, save_sheet, upscale
from diffusionblocks.tasks import get_task
from diffusionblocks.tasks.optional import Arm, speedup_note

plt = pytest.importorskip("matplotlib.pyplot")


@pytest.fixture
def figures(monkeypatch):
    """The figures the code under test closes, kept open to be read."""
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


class FakeGenerator:
    """Stands in for a trained model: random images in [-1, 1] and the classes cycled as ImageGenerator does."""

    num_classes = 10

    def sample(self, num, steps, *, classes=None, generator=None, **options):
        x = torch.rand(num, 1, 8, 8, generator=generator) * 2 - 1
        return x, torch.tensor(classes).repeat(num // len(classes) + 1)[:num]


def arm(role, form, runs, task="imagegen"):
    return Arm(role, form, task, True, runs, [0.5] * len(runs), lambda at="cpu": FakeGenerator())


def test_speedup_note_flags_a_ratio_above_the_ideal():
    assert speedup_note(2.9, 3) == speedup_note(3.0, 3) == "(ideal B = 3)"
    above = speedup_note(3.4, 3)
    assert "ABOVE the ideal B = 3" in above and "timing noise" in above and "cache" in above
    assert "not the method's gain" in above


@pytest.mark.parametrize("task,preset", [("imagegen", "gen-tiny"), ("mdlm", "lm-tiny")])
@pytest.mark.parametrize("e2e_seconds,above", [(1.0, True), (0.3, False)])
def test_the_report_flags_a_sampling_speedup_above_B(tmp_path, monkeypatch, task, preset, e2e_seconds, above):
    """B = 2: 1.0 s against 0.2 s is 5x, above the ideal, and said so; 0.3 s against 0.2 s (1.5x) is not."""
    monkeypatch.setattr(f"diffusionblocks.tasks.{task}.interleaved_seconds",
                        lambda fns, repeats: {"e2e": e2e_seconds, "dblocks": 0.2})
    arms = {"e2e": arm("e2e", "end-to-end", [{"num_blocks": 1}], task),
            "dblocks": arm("dblocks", "blocks", [{"num_blocks": 2}], task)}
    extras, lines = get_task(task).compare_extras(arms, load_preset(preset), tmp_path)
    said = next(line for line in lines if "faster than end-to-end" in line)
    assert extras["sampling_speedup"] == pytest.approx(e2e_seconds / 0.2)
    assert extras["sampling_speedup_above_ideal"] is above
    assert ("ABOVE the ideal B = 2" in said) is above and ("(ideal B = 2)" in said) is not above


@pytest.mark.parametrize("task,preset", [("imagegen", "gen-tiny"), ("mdlm", "lm-tiny")])
def test_sampling_speed_is_timed_where_the_arms_trained(tmp_path, monkeypatch, task, preset):
    """A compare trained on a GPU times sampling there: both models are loaded onto the arms' device and every
    sample (timed or drawn for the sheet) is drawn on it."""
    seen = []

    class Placed(FakeGenerator):
        def __init__(self, at="cpu"):
            seen.append(("load", at))

        def sample(self, num, *args, device="cpu", generator=None, classes=None, **options):
            seen.append(("sample", device))
            return super().sample(num, 0, classes=classes or [0], generator=generator)

    monkeypatch.setattr(f"diffusionblocks.tasks.{task}.interleaved_seconds",
                        lambda fns, repeats: {role: (fn(0), 1.0)[1] for role, fn in fns.items()})
    arms = {role: Arm(role, form, task, True, [{"num_blocks": b}], [0.5], Placed, device="cuda:1")
            for role, form, b in (("e2e", "end-to-end", 1), ("dblocks", "blocks", 2))}
    get_task(task).compare_extras(arms, load_preset(preset), tmp_path)
    assert {what for what, _ in seen} == {"load", "sample"}
    assert all(where == "cuda:1" for _, where in seen), seen


def test_imagegen_samples_are_a_scaled_up_labelled_sheet(tmp_path, monkeypatch, figures):
    monkeypatch.setattr("diffusionblocks.tasks.imagegen.interleaved_seconds",
                        lambda fns, repeats: {"e2e": 1, "dblocks": 1})
    arms = {"e2e": arm("e2e", "end-to-end", [{"num_blocks": 1}]),
            "dblocks": arm("dblocks", "blocks", [{"num_blocks": 2}])}
    get_task("imagegen").compare_extras(arms, load_preset("gen-tiny"), tmp_path)
    width, height = read_png_size(tmp_path / "samples.png")
    assert width >= 2 * 10 * 64 and height >= 4 * 64  # 2 arms of 10 columns, 4 rows, each 8x8 image >= 64 px
    left, right = figures[-1].axes
    assert (left.get_title(), right.get_title()) == ("end-to-end (e2e)", "DiffusionBlocks, B=2 (dblocks)")
    assert [t.get_text() for t in left.get_xticklabels()] == [f"class {c}" for c in range(10)]
    colour = {"a": torch.zeros(6, 3, 28, 28, dtype=torch.uint8), "b": torch.ones(6, 3, 28, 28, dtype=torch.uint8)}
    assert save_sheet(tmp_path / "rows.png", colour, nrow=3, row_labels=["class 0", "class 1"])  # a class per row
    first, second = figures[-1].axes
    assert [t.get_text() for t in first.get_yticklabels()] == ["class 0", "class 1"] and not second.get_yticks().size
    assert read_png_size(tmp_path / "rows.png")[1] >= 2 * 84  # 28 px images scaled 3x


def test_a_sheet_without_matplotlib_is_plain_and_scaled_up(tmp_path, monkeypatch):
    assert torch.equal(upscale(torch.tensor([[[1, 2], [3, 4]]]), 2),
                       torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]]))
    assert (readable_factor(8, 8), readable_factor(28, 28), readable_factor(64, 64)) == (8, 3, 1)
    panels = {"a": torch.zeros(20, 1, 8, 8, dtype=torch.uint8), "b": torch.full((20, 1, 8, 8), 255, dtype=torch.uint8)}
    monkeypatch.setattr(images, "_pyplot_quiet", lambda: None)
    assert save_sheet(tmp_path / "s.png", panels, nrow=10) is False
    grid_w, grid_h = 8 * (10 * 10 + 2), 8 * (2 * 10 + 2)  # grid(): 10 x 2 images of 8 + 2 padding, scaled 8x
    assert read_png_size(tmp_path / "s.png") == (2 * grid_w + 4 * 2 * 8, grid_h)


def curve(values, seed_shift):
    return [{"step": i, "layer_updates": 10 * i, "accuracy": v + seed_shift} for i, v in enumerate(values, 1)]


@pytest.mark.parametrize("seeds", [2, 1])
def test_the_compare_plot_draws_each_seed_the_mean_and_its_spread(tmp_path, figures, seeds):
    runs = lambda values, blocks: [{"num_blocks": blocks, "curve": curve(values, 0.02 * s), "eval_split": "test",
                                    "curve_n": 50} for s in range(seeds)]
    arms = {"e2e": arm("e2e", "end-to-end", runs([0.2, 0.4, 0.5], 1)),
            "dblocks": arm("dblocks", "blocks", runs([0.1, 0.3, 0.45], 2))}
    assert plot(arms, get_task("classify"), tmp_path / "compare.png")
    ax = figures[-1].axes[0]
    # per arm: a thin line per seed and a bold mean, with the band mean ± std between; one seed: its line alone
    assert len(ax.get_lines()) == (seeds + 1 if seeds > 1 else 1) * 2
    assert len(ax.collections) == (2 if seeds > 1 else 0)
    assert ax.get_ylabel() == "test accuracy (%)" and "_" not in ax.get_title()
    assert ax.get_title().startswith("Accuracy during training") and ("one seed" in ax.get_title()) is (seeds == 1)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["end-to-end", "DiffusionBlocks (B=2)"]


def write_metrics(run, blocks):
    run.mkdir(parents=True)
    records = []
    for step in (10, 20, 30):
        records.append({"step": step, "layer_updates": 2 * step, "eval_accuracy": 0.5, "eval_n": 8})  # not a loss
        record = {"step": step, "layer_updates": 2 * step, "loss": 3.0 / step, "lr": 1e-3}
        if blocks:
            record["blocks"] = {str(b): {"loss": (b + 1) / step, "grad_norm": 1.0} for b in range(blocks)}
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_loss_figure_reads_each_runs_metrics(tmp_path, figures):
    for seed in (0, 1):
        write_metrics(tmp_path / f"e2e-seed{seed}", 0)
        write_metrics(tmp_path / f"dblocks-seed{seed}", 2)
    assert training_losses(tmp_path / "e2e-seed0") == {"all": {20: 0.3, 40: 0.15, 60: 0.1}}
    assert set(training_losses(tmp_path / "dblocks-seed0")) == {"block 0", "block 1"}
    arms = {"e2e": arm("e2e", "end-to-end", [{"num_blocks": 1}] * 2),
            "dblocks": arm("dblocks", "blocks", [{"num_blocks": 2}] * 2)}
    runs = {role: [tmp_path / f"{role}-seed{s}" for s in (0, 1)] for role in arms}
    assert plot_losses(arms, runs, tmp_path / "loss.png") and (tmp_path / "loss.png").stat().st_size > 1000
    shown = [ax for ax in figures[-1].axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["end-to-end", "DiffusionBlocks (B=2)"]
    assert [t.get_text() for t in shown[1].get_legend().get_texts()] == ["block 0", "block 1"]
    assert not plot_losses(arms, {role: [tmp_path / "none"] for role in arms}, tmp_path / "none.png")  # no metrics
    assert not (tmp_path / "none.png").exists()


def test_metric_names_are_words():
    assert metric_words("test_bpc") == "test bits per character"
    assert metric_words("val_accuracy") == "validation accuracy"
    assert "_" not in metric_words("fd_classifier_features") and metric_words("some_key") == "some key"
