"""The Task interface (what the loop, the run directory and the harness ask of a task) and the image
pipeline that the image tasks share.

A task owns its data (train/test, a one-line description), builds its model in the form a method trains
(`Method.model_form`: "end-to-end" or "blocks"), turns a raw batch into a training batch (images:
to-float and augmentation), evaluates (a dict; cheap enough to run during training) and scores (its
headline metric, `metric`, better when `higher_is_better`). The loop never asks which task it runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .. import io
from ..config import RunConfig
from ..data import DATA_SHAPES, Batches, DataError, ImageDataset, augment, iterate_eval, load_dataset, to_float
from ..noise import GRID_KINDS
from ..precond import BRIDGES

SPLITS = ("test", "validation")
VALIDATION_SEED = 20_261_201  # the validation split is the same for every run seed (data.val_size)
DATA_FILE = "data.json"  # in a run directory: the sha256 of each data file the run read (data.sources)


def run_split(cfg: RunConfig) -> str:
    """The split a run evaluates on: its validation split when it holds one out, else the test split."""
    return "validation" if cfg.data.val_size else "test"


def split_arrays(data, split: str):
    """(inputs, labels) of an evaluation split: "test", or "validation" (held out from training)."""
    if split == "test":
        return data.x_test, data.y_test
    if split == "validation":
        if getattr(data, "x_val", None) is None:
            raise ValueError("this run holds out no validation split (train it with data.val_size=N)")
        return data.x_val, data.y_val
    raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")


# A reference model for sample-quality metrics: reference(cfg, name, progress) returns the model of a run of
# `cfg`, trained once and cached under `name` (provided by the loop's layer: train.reference_model).
Reference = Callable[[RunConfig, str, bool], nn.Module]


@dataclass(frozen=True)
class ImageShapes:
    """The shapes an image task builds its model from, without loading data (the memory planner)."""

    image_size: tuple[int, int]
    channels: int
    num_classes: int


@cache
def at_least(low: int) -> Callable[[str], int]:
    """A parser of an option's text: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    return parse


def finite(text: str) -> float:
    """A parser of an option's text: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


@dataclass(frozen=True)
class Option:
    """A keyword option of a task's score() (the `eval` command) or sample() (`sample`): the flag --NAME
    (underscores as dashes), None unless given."""

    name: str
    type: Callable[[str], Any] | None = None  # parses the flag's text (None: the text itself; bool: a switch)
    help: str = ""
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# what an option's name stands for in a task's eval_options / sample_options: the evaluation's prefix and the
# diffusion-inference options the models name (their inference_options)
COMMON_OPTIONS = {o.name: o for o in (
    Option("limit", at_least(0), "evaluate on the split's first N images (text: windows) only"),
    Option("steps_per_block", at_least(1), "Euler steps per block"),
    Option("grid", help="the inference grid", choices=GRID_KINDS),
    Option("bridge", help="x0 estimate from the logits: soft, hard, or unit (the soft one at unit norm)",
           choices=BRIDGES),
    Option("sigma_start", finite, "first level of the grid (default sigma_max)"),
    Option("init", help="DiffusionBlocks: start the Euler chain from sigma_max noise or from z = 0 (deterministic; "
                        "default chain.init)", choices=("noise", "zero")))}


class Task:
    """One task. Subclasses set the class attributes and implement the methods that raise here."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the headline metric: a key of score()'s dict
    higher_is_better: ClassVar[bool]
    result_metric: ClassVar[str | None] = None  # key of results.json holding the headline (None: score() it)
    curve_metric: ClassVar[str]  # key of evaluate()'s dict plotted against layer-updates
    percent: ClassVar[bool] = False  # the headline is a fraction, shown in percent (differences in points)
    paper_gap: ClassVar[str] = ""  # the paper's DiffusionBlocks - e2e difference, quoted beside ours
    compare_roles: ClassVar[tuple[str, ...]] = ("e2e", "dblocks")  # the arms of `compare`
    shared_metrics: ClassVar[tuple[str, ...]] = ()  # results keys besides result_metric that its e2e runs hold,
    # so another task's compare may take this task as an arm reporting that key (arlm's test_bpc for mdlm)
    eval_options: ClassVar[tuple[Option | str, ...]] = ()  # score()'s keyword options (`eval` flags)
    sample_options: ClassVar[tuple[Option | str, ...]] = ()  # sample()'s keyword options (`sample` flags)
    named_options: ClassVar[dict[str, Option]] = COMMON_OPTIONS  # what a name in those two stands for
    run_files: ClassVar[tuple[str, ...]] = (DATA_FILE,)  # files save_with_run writes into a run directory
    # config presets `compare` starts from: "full", "quick", and "offline"/"offline-quick" without Fashion-MNIST
    presets: ClassVar[dict[str, str]] = {}
    train_preset: ClassVar[str | None] = None  # the preset `train` starts from without --preset (None: "full")

    model_forms: ClassVar[tuple[str, ...]] = ("end-to-end", "blocks")  # the model forms build_model makes
    classifies_images: ClassVar[bool] = False  # builds a method's own image classifier (build_classifier)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Raise ValueError for settings this task cannot use."""

    @classmethod
    def options(cls, kind: str) -> tuple[Option, ...]:
        """The Options this task takes in `eval` (kind "eval") or `sample` ("sample")."""
        return tuple(cls.named_options[o] if isinstance(o, str) else o for o in getattr(cls, f"{kind}_options"))

    def compare_preset(self, quick: bool) -> str:
        """The preset `compare` starts from without --preset."""
        return self.presets["quick" if quick else "full"]

    def arm_config(self, cfg: RunConfig, role: str) -> RunConfig:
        """A `compare` arm's config after the harness set its method and budget (compare.role_config), for the
        compared task's arms (another task's included); a task may adjust it (recurrent depth: DiffusionBlocks and
        the plain control train the paper's multiple of the end-to-end steps)."""
        return cfg

    def load_data(self, cfg: RunConfig):
        raise NotImplementedError

    def build_model(self, cfg: RunConfig, data, form: str) -> nn.Module:
        """The model in the form a method trains ("end-to-end" or "blocks")."""
        raise NotImplementedError

    def build_classifier(self, cfg: RunConfig, data, model: type[nn.Module]) -> nn.Module:
        """A method's own image classifier (Method.classifier: the block-wise baselines), on this task's data."""
        raise ValueError(f"task {self.name!r} does not classify images")

    def save_with_run(self, data, out) -> None:
        """Write what a run keeps beside its weights to rebuild its outputs: its data files' fingerprints (text adds
        the tokenizer)."""
        io.save_json(Path(out) / DATA_FILE, {"files": getattr(data, "sources", {})})

    def check_run(self, data, run) -> None:
        """Raise ValueError when `data`, loaded now for the run in directory `run`, is not what it trained on: a data
        file's fingerprint differs (a run saved without fingerprints is not checked)."""
        saved = Path(run) / DATA_FILE
        if not saved.exists():
            return
        before, now = io.load_json(saved)["files"], getattr(data, "sources", {})
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            names = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
            raise ValueError(f"the data of {run} changed since it trained (changed: {names}): restore the files it "
                             f"read (data.name / data.root in its config.json say where), or delete {saved} to score "
                             "it on the data as it is now")

    def stream(self, data, cfg: RunConfig, seed: int, member: int = 0):
        """A resumable iterator of raw training batches (tuples of tensors) with its own randomness."""
        raise NotImplementedError

    def prepare(self, raw: tuple, stream, cfg: RunConfig, data, device) -> tuple:
        """A raw batch -> the batch a method steps on, on `device`."""
        return tuple(t.to(device) for t in raw)

    def probe_batch(self, data, cfg: RunConfig, device) -> tuple:
        """A training batch of cfg.train.batch_size (for counting saved activations)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data, cfg: RunConfig, *, split: str = "test", limit: int = 0,
                 device="cpu", **options) -> dict[str, Any]:
        """Metrics on an evaluation split (the first `limit` items if > 0), with "n" the items used."""
        raise NotImplementedError

    def results(self, ev: dict, split: str = "test") -> dict:
        """The entries of results.json that an evaluation of `split` gives."""
        return dict(ev)

    def score(self, model: nn.Module, data, cfg: RunConfig, *, split: str = "test", device="cpu",
              progress: bool = False, reference: Reference | None = None, **options) -> dict[str, Any]:
        """The headline evaluation (`eval`, `compare`, a block-parallel run); holds `metric`."""
        return self.evaluate(model, data, cfg, split=split, device=device, **options)

    # -- the memory planner (plan.py) and `diffusionblocks memory`: shapes and formulas, no data --------------

    def plan_shapes(self, cfg: RunConfig, **given) -> Any:
        """What build_model reads of the data (e.g. ImageShapes), without loading it; `given` (from the command
        line) overrides what the config implies."""
        raise ValueError(f"the memory planner does not cover task={self.name!r} yet")

    def random_batch(self, cfg: RunConfig, shapes, generator: torch.Generator) -> tuple:
        """A training batch of cfg.train.batch_size with random values (what a step saves does not depend on
        them), for measuring a step without data."""
        raise ValueError(f"`diffusionblocks memory` does not cover task={self.name!r} yet")

    def plan_tokens(self, cfg: RunConfig, shapes, form: str = "end-to-end") -> int:
        """Tokens per sample through the transformer layers of the model in `form` (Method.model_form)."""
        raise ValueError(f"the planner's activation formula does not cover task={self.name!r} yet")

    def plan_layer_bytes(self, cfg: RunConfig, shapes, element: int, form: str = "end-to-end") -> int:
        """Bytes each layer saves beyond the transformer layer's formula (plan.layer_activation_bytes)."""
        return 0

    def plan_outer_bytes(self, cfg: RunConfig, shapes, model: nn.Module, element: int) -> int:
        """Bytes autograd saves outside the layers in one training step of `model` (as build_model made it, on
        the meta device): stem, head and loss, at cfg.train.batch_size and `element` bytes per element."""
        raise ValueError(f"the planner's activation formula does not cover task={self.name!r} yet")

    def sample(self, model: nn.Module, data, cfg: RunConfig, out: str, *, num: int, seed: int,
               writable: Callable[[str, str], None], **options) -> str:
        """Draw `num` samples (seeded) into the file `out` (the `sample` command; `options`: sample_options given);
        `writable(path, flag)` refuses any other file to write. Returns a line saying what was written."""
        raise ValueError(f"a {self.name} run has nothing to sample: sample draws images from an image generation "
                         "run or text from a language-model run")

    def summary(self, results: dict) -> str:
        """One line on a finished training run's results."""
        raise NotImplementedError

    def describe_score(self, score: dict) -> str:
        """One line on a score."""
        return f"{self.metric} {score[self.metric]:.4f}"

    def compare_extras(self, runs: dict[str, list[dict]], load: Callable[[str], nn.Module], base: RunConfig,
                       out) -> tuple[dict, list[str]]:
        """Task-specific parts of `compare`: (entries for compare.json, markdown lines)."""
        return {}, []


def fitting_batch(batch_size: int, data: ImageDataset) -> int:
    """`batch_size`, when the training images hold that many (a smaller batch would train another setting)."""
    if batch_size > len(data.y_train):
        raise ValueError(f"train.batch_size={batch_size} is larger than the {len(data.y_train):,} training images "
                         f"(after data.train_limit and data.val_size): lower train.batch_size")
    return batch_size


class ImageStream:
    """One unit's image batches and augmentation randomness (resumable)."""

    def __init__(self, data: ImageDataset, batch_size: int, seed: int, member: int = 0):
        self.batches = Batches(data.x_train, data.y_train, fitting_batch(batch_size, data), seed=seed)
        self.aug = torch.Generator().manual_seed(seed + 1 + 1_000 * member)  # data-parallel members differ

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.batches)

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "aug": self.aug.get_state()}

    def load_state_dict(self, state: dict):
        self.batches.load_state_dict(state["batches"])
        self.aug.set_state(state["aug"])


class ImageTask(Task):
    """Labelled images (data.py): uint8 batches made float in [-1, 1] and augmented per unit stream."""

    train_preset = "fashion"

    def compare_preset(self, quick: bool) -> str:
        """The digits presets where Fashion-MNIST is missing (it is never downloaded here)."""
        try:
            load_dataset("fashion-mnist", download=False)
        except DataError:
            print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist); comparing on digits",
                  file=sys.stderr)
            return self.presets["offline-quick" if quick else "offline"]
        return super().compare_preset(quick)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.model.positions != "learned":
            raise ValueError(f"model.positions={cfg.model.positions!r}: the image models use learned positions "
                             "(rotary positions are for the language models)")

    def load_data(self, cfg: RunConfig) -> ImageDataset:
        ds = load_dataset(cfg.data.name, root=cfg.data.root or None)
        if cfg.data.train_limit:  # before the validation split: it comes out of these
            ds.x_train, ds.y_train = ds.x_train[:cfg.data.train_limit], ds.y_train[:cfg.data.train_limit]
        if cfg.data.test_limit:
            ds.x_test, ds.y_test = ds.x_test[:cfg.data.test_limit], ds.y_test[:cfg.data.test_limit]
        if cfg.data.val_size:
            ds.hold_out(cfg.data.val_size, VALIDATION_SEED)
        return ds

    def stream(self, data: ImageDataset, cfg: RunConfig, seed: int, member: int = 0) -> ImageStream:
        return ImageStream(data, cfg.train.batch_size, seed, member)

    def prepare(self, raw, stream: ImageStream, cfg: RunConfig, data: ImageDataset, device) -> tuple:
        x, y = raw
        x = augment(to_float(x), generator=stream.aug, crop_padding=cfg.data.crop_padding,
                    hflip=cfg.data.hflip and data.hflip)
        return x.to(device), y.to(device)

    def eval_batches(self, data: ImageDataset, cfg: RunConfig, split: str, limit: int):
        """(batches of the split's first `limit` images, all if 0; how many; the evaluation's generator)."""
        x, y = split_arrays(data, split)
        if limit:
            x, y = x[:limit], y[:limit]
        gen = torch.Generator().manual_seed(cfg.train.seed + 999)
        return iterate_eval(x, y, cfg.train.eval_batch_size), len(y), gen

    def plan_shapes(self, cfg: RunConfig, image_size=None, channels=None, classes=None) -> ImageShapes:
        known = DATA_SHAPES.get(cfg.data.name, (None, None, None))
        image_size, channels, classes = (v if v is not None else k
                                         for v, k in zip((image_size, channels, classes), known))
        if image_size is None or channels is None or classes is None:
            raise ValueError(f"data {cfg.data.name!r} has no known shape; give --image-size, --channels and --classes")
        for name, value in (("image height", image_size[0]), ("image width", image_size[-1]), ("channels", channels),
                            ("classes", classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return ImageShapes((image_size[0], image_size[-1]), channels, classes)

    def random_batch(self, cfg: RunConfig, shapes: ImageShapes, generator: torch.Generator) -> tuple:
        n = cfg.train.batch_size
        return (torch.rand(n, shapes.channels, *shapes.image_size, generator=generator),
                torch.randint(shapes.num_classes, (n,), generator=generator))

    def probe_batch(self, data: ImageDataset, cfg: RunConfig, device) -> tuple:
        n = fitting_batch(cfg.train.batch_size, data)
        # copies, as a training batch is: a slice would make the whole label tensor's storage count as saved
        return to_float(data.x_train[:n]).to(device), data.y_train[:n].clone().to(device)


@torch.no_grad()
def interleaved_seconds(calls: dict[str, Callable[[int], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call over `repeats` rounds, the calls interleaved within a round (a shared, noisy
    machine slows them alike); a round 0 before them warms up and is not timed. Each call gets its round's index
    (e.g. for a seed)."""
    times = {k: [] for k in calls}
    for i in range(repeats + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(i)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def check_label_table(cfg: RunConfig) -> None:
    """A learned label (or token) table is trained by every block, a shared parameter: refuse it with blocks that
    share nothing."""
    if cfg.chain.label_table == "learned" and not cfg.blocks.shared_stem_head:
        raise ValueError("chain.label_table=learned is trained by every block (a shared parameter): it needs "
                         "blocks.shared_stem_head=true; independent blocks share the fixed table")


def unknown_form(task: str, form: str, known: tuple[str, ...]) -> ValueError:
    return ValueError(f"task {task!r} has no model for training form {form!r} (it has: {', '.join(known)})")
