"""Config values that used to be accepted but wrong, crash with a traceback, or go unbounded: each is now a one-line
ValueError naming the key, raised by the config functions before any data is loaded or any model is built."""

import dataclasses
import math
import typing

import pytest
import torch

from diffusionblocks.cli import main
from diffusionblocks.config import PRESETS, SECTIONS, RunConfig, apply_overrides, load_preset
from diffusionblocks.methods.base import update
from diffusionblocks.run import validate
from diffusionblocks.tasks import TASKS
from diffusionblocks.tasks.tensors import TensorTask


def refused(*overrides: str) -> str:
    """The message of the ValueError that overriding and validating the tiny preset raises."""
    with pytest.raises(ValueError) as e:
        validate(apply_overrides(load_preset("tiny"), list(overrides)))
    assert "\n" not in str(e.value)
    return str(e.value)


def numeric_keys(types=(int, float)) -> list[str]:
    return [f"{s}.{name}" for s, cls in SECTIONS.items()
            for name, typ in typing.get_type_hints(cls).items() if typ in types]


def metadata(key: str) -> dict:
    section, name = key.split(".")
    return next(f.metadata for f in dataclasses.fields(SECTIONS[section]) if f.name == name)


def test_every_setting_has_help_every_numeric_one_a_range_and_every_integer_an_upper_bound():
    for s, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{s}.{f.name}"
    for key in numeric_keys():
        assert metadata(key).get("range"), key
    for key in numeric_keys((int,)):
        assert not metadata(key)["range"].split("]")[0].split(")")[0].endswith("inf"), key


@pytest.mark.parametrize("key", numeric_keys((float,)))
def test_non_finite_floats_are_refused_naming_the_key(key):
    for value in ("nan", "inf", "-inf"):
        assert refused(f"{key}={value}").startswith(key)


@pytest.mark.parametrize("override,message", [
    ("train.steps=1e400", "train.steps='1e400' is not a valid int"),  # was an OverflowError traceback
    ("train.steps=1.5", "train.steps='1.5' is not a valid int"),
    ("train.steps=1e-3", "not a valid int"),  # was silently 0 steps
    ("train.steps=1e30", r"train.steps=1e\+30: must be in \[1, 1e9\]; .*sanity bound"),  # was accepted: trained forever
    ("model.depth=100000000", r"model.depth=100000000: must be in \[1, 10_000\]; .*sanity bound"),  # grew to 22 GB
    ("train.batch_size=1e12", "train.batch_size"),
    ("train.seed=1e30", "train.seed"),
    ("model.dropout=nan", r"model.dropout=nan: must be in \[0, 1\)"),
])
def test_absurd_numbers_are_refused_with_the_bound(override, message):
    with pytest.raises(ValueError, match=message):
        validate(apply_overrides(load_preset("tiny"), [override]))


def test_a_model_too_large_for_any_host_is_refused_before_it_is_built():
    cfg = apply_overrides(load_preset("tiny"), ["model.depth=10000", "model.width=4096"])  # each within its range
    with pytest.raises(ValueError, match=r"model.depth=10000, model.width=4096: about 2.3e\+12 parameters .* 1e\+11"):
        validate(cfg)


def test_integers_written_as_whole_floats_are_taken():
    cfg = apply_overrides(load_preset("tiny"), ["train.steps=1e3", "model.depth=8.0"])
    assert (cfg.train.steps, cfg.model.depth) == (1000, 8) and type(cfg.train.steps) is int


@pytest.mark.parametrize("override", ["train.clip=nan", "train.clip=-1", "train.weight_decay=nan",
                                      "train.weight_decay=-0.1", "train.beta2=1", "train.ema=1", "train.warmup=1",
                                      "train.lr=0", "train.min_lr_ratio=nan", "model.dropout=1",
                                      "blocks.gamma=nan", "data.crop_padding=-1"])
def test_optimizer_and_schedule_settings_are_checked(override):
    assert refused(override).startswith(override.split("=")[0])


def test_only_a_zero_clip_turns_clipping_off():
    assert validate(apply_overrides(load_preset("tiny"), ["train.clip=0"])).train.clip == 0
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    step = type("Step", (), {"step": lambda self: opt.step() or 0.1})()
    for clip in (-1.0, math.nan):
        with pytest.raises(ValueError, match="train.clip"):
            update((w ** 2).sum(), [w], [step], clip)
    assert update((w * 100).sum(), [w], [step], 1.0)["grad_norm"] == pytest.approx(100 * math.sqrt(3))


@pytest.mark.parametrize("value", ["1000", "1e-9", "-1"])
def test_sigma_start_outside_the_trained_levels_says_so(value):
    message = refused(f"chain.sigma_start={value}")
    assert message.startswith("chain.sigma_start=") and ("0.002" in message or ">= 0" in message)


def test_sigma_start_inside_the_trained_levels_is_taken():
    for value in ("0", "0.002", "5", "80"):
        validate(apply_overrides(load_preset("tiny"), [f"chain.sigma_start={value}"]))


def test_every_preset_is_within_the_bounds():
    for name in PRESETS:
        cfg = load_preset(name)
        if name == "tensors":  # the start of a task of your own (TensorTask): it runs under that task's name
            cfg.task = "circle"
            TASKS["circle"] = type("Circle", (TensorTask,), {"name": "circle"})
        try:
            validate(cfg)
        finally:
            TASKS.pop("circle", None)


def whole(**changes) -> dict:
    d = load_preset("tiny").to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize("d,message", [
    ([1, 2], "a config is an object of sections .* not a list"),
    ("config", "not a str"),
    ({k: v for k, v in whole().items() if k != "dblocks"}, "no 'dblocks' section"),  # was a block-allocation error
    (whole(model=[4, 32]), "config section 'model' is a list, not an object of settings"),
    (whole(train="fast"), "config section 'train' is a str"),
    (whole(task=3), "task=3: expected a task name"),
    (whole(extra={}), "unknown config section 'extra'"),
    (whole(model={"depth": [4]}), r"model.depth=\[4\] is not a valid int"),
    (whole(model={"depth": True}), "model.depth=True is not a valid int"),
    (whole(train={"lr": 10**400}), "train.lr=1000.* is not a valid float"),  # was an OverflowError
])
def test_malformed_config_dicts_are_one_line_errors(d, message):
    with pytest.raises(ValueError, match=message) as e:
        RunConfig.from_dict(d)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_non_finite_numbers_in_a_config_dict_are_refused_by_validate():
    with pytest.raises(ValueError, match="train.weight_decay=nan"):
        validate(RunConfig.from_dict(whole(train={"weight_decay": float("nan")})))


@pytest.mark.parametrize("override", ["model.dropout=nan", "train.steps=1e400", "model.depth=100000000",
                                      "train.clip=-1"])
def test_the_cli_prints_one_line_and_writes_nothing(tmp_path, capsys, override):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert override.split("=")[0] in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
