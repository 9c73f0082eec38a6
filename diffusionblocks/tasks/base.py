"""The Task interface: what the training loop, a run directory and `eval` ask of a task.

A task owns its data, builds its model in the form a method trains (`Method.model_form`: "end-to-end" or
"blocks"), streams raw training batches and prepares them (images: to-float and augmentation), evaluates (a dict,
cheap enough to run during training) and scores (its headline `metric`, better when `higher_is_better`). The loop
never asks which task it runs. The optional parts (run files, command-line options, compare, the memory planner)
have defaults in tasks/optional.py; the image pipeline is tasks/images.py, the language one tasks/lm.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from ..config import RunConfig
from .optional import Commands, Comparison, Planning, RunFiles

SPLITS = ("test", "validation")
VALIDATION_SEED = 20_261_201  # the validation split is the same for every run seed (data.val_size)

# A reference model for sample-quality metrics: reference(cfg, name, progress) returns the model of a run of
# `cfg`, trained once and cached under `name` (provided by the loop's layer: train.reference_model).
Reference = Callable[[RunConfig, str, bool], nn.Module]


class Task(RunFiles, Commands, Comparison, Planning):
    """One task. Subclasses set the class attributes and implement the methods that raise here."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the headline: a key of score()'s dict, and of evaluate()'s unless curve_metric is set
    higher_is_better: ClassVar[bool]
    # what evaluate() reports instead where the headline is scored only after training (image generation: the FD of
    # samples): compare plots it against layer-updates and scores the headline of each run; None: the headline
    curve_metric: ClassVar[str | None] = None
    model_forms: ClassVar[tuple[str, ...]] = ("end-to-end", "blocks")  # the model forms build_model makes
    classifies_images: ClassVar[bool] = False  # builds a method's own image classifier (build_classifier)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Raise ValueError for settings this task cannot use."""

    def load_data(self, cfg: RunConfig):
        raise NotImplementedError

    def build_model(self, cfg: RunConfig, data, form: str) -> nn.Module:
        """The model in the form a method trains, one of model_forms (run.validate refuses any other)."""
        raise NotImplementedError

    def build_classifier(self, cfg: RunConfig, data, model: type[nn.Module]) -> nn.Module:
        """A method's own image classifier (Method.classifier: the block-wise baselines), on this task's data."""
        raise ValueError(f"task {self.name!r} does not classify images")

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
        """The entries of results.json that an evaluation of `split` gives (the headline as test_<metric>)."""
        return dict(ev)

    def score(self, model: nn.Module, data, cfg: RunConfig, *, split: str = "test", device="cpu",
              progress: bool = False, reference: Reference | None = None, **options) -> dict[str, Any]:
        """The headline evaluation (`eval`, `compare`, a block-parallel run); holds `metric`."""
        return self.evaluate(model, data, cfg, split=split, device=device, **options)

    def summary(self, results: dict) -> str:
        """One line on a finished training run's results."""
        raise NotImplementedError

    def describe_score(self, score: dict) -> str:
        """One line on a score."""
        return f"{self.metric} {score[self.metric]:.4f}"


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


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """`model` in eval mode inside the block; its training mode as it was after it (an error included)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_label_table(cfg: RunConfig) -> None:
    """A learned label (or token) table is trained by every block, a shared parameter: refuse it with blocks that
    share nothing."""
    if cfg.chain.label_table == "learned" and not cfg.blocks.shared_stem_head:
        raise ValueError("chain.label_table=learned is trained by every block (a shared parameter): it needs "
                         "blocks.shared_stem_head=true; independent blocks share the fixed table")
