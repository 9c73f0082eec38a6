"""The optional parts of a task, each a group with defaults, so that a task implements only the core (tasks/base.py)
and overrides here what it offers:

- RunFiles: what a run directory keeps beside the weights (the data's fingerprints), checked on `eval` and `--resume`;
- Commands: the options of `eval` and `sample`, `sample` itself, and the presets `train` and `compare` start from;
- Comparison: `compare`'s arms, how the headline is shown, and the task's own entries in the report;
- Planning: the memory planner's shapes and activation formulas (plan.py) and `memory`'s random batches.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .. import io
from ..config import RunConfig
from ..noise import GRID_KINDS
from ..precond import BRIDGES

# -- RunFiles -----------------------------------------------------------------------------------------------------

DATA_FILE = "data.json"  # in a run directory: the sha256 of each data file the run read (data.sources)
SHAPES_FILE = "shapes.json"  # in a run directory: what the model was built from (its shapes), so no data is read


class RunFiles:
    """What a run keeps beside its weights: its data files' fingerprints and the shapes its model was built from
    (text adds the tokenizer)."""

    run_files: ClassVar[tuple[str, ...]] = (DATA_FILE, SHAPES_FILE)  # the files save_with_run writes into a run

    def save_with_run(self, data, out) -> None:
        io.save_json(Path(out) / DATA_FILE, {"files": getattr(data, "sources", {})})
        io.save_json(Path(out) / SHAPES_FILE, self.shapes_record(data))

    def shapes_record(self, data) -> dict:
        """What build_model reads of `data`, as JSON (the task's override); {} records nothing."""
        return {}

    def shapes_from_record(self, record: dict) -> Any:
        """The object build_model takes in place of the data, from shapes_record's dict."""
        raise ValueError(f"task {self.name!r} records no shapes: its model is rebuilt from its data")

    def saved_shapes(self, run) -> Any | None:
        """The shapes a run recorded at its start (shapes.json), None for a run from before they were recorded."""
        path = Path(run) / SHAPES_FILE
        if not path.exists():
            return None
        record = io.load_json(path)
        return self.shapes_from_record(record) if record else None

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


# -- Commands -----------------------------------------------------------------------------------------------------


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
    """A keyword option `name` of a task's score() (the `eval` command) or sample() (`sample`): the flag --NAME
    (underscores as dashes) unless `flag_name` names it otherwise, None unless given."""

    name: str
    type: Callable[[str], Any] | None = None  # parses the flag's text (None: the text itself; bool: a switch)
    help: str = ""
    choices: tuple[str, ...] | None = None
    flag_name: str = ""  # the flag's own name where --NAME would mean something else elsewhere (--steps: training)

    @property
    def flag(self) -> str:
        return "--" + (self.flag_name or self.name).replace("_", "-")


# what a name in a task's eval_options / sample_options stands for: the evaluation's prefix and the
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


class Commands:
    """What the command line asks of a task beyond the core."""

    eval_options: ClassVar[tuple[Option | str, ...]] = ()  # an Option, or the name of one in COMMON_OPTIONS
    sample_options: ClassVar[tuple[Option | str, ...]] = ()
    # the presets `compare` starts from: "full", "quick", and "offline"/"offline-quick" without Fashion-MNIST
    presets: ClassVar[dict[str, str]] = {}
    train_preset: ClassVar[str | None] = None  # the preset `train` starts from without --preset (None: "full")

    @classmethod
    def options(cls, kind: str) -> tuple[Option, ...]:
        """The Options this task takes in `eval` (kind "eval") or `sample` ("sample")."""
        return tuple(COMMON_OPTIONS[o] if isinstance(o, str) else o for o in getattr(cls, f"{kind}_options"))

    def compare_preset(self, quick: bool) -> str:
        """The preset `compare` starts from without --preset."""
        return self.presets["quick" if quick else "full"]

    def sample(self, model: nn.Module, data, cfg: RunConfig, out: str, *, num: int, seed: int,
               writable: Callable[[str, str], None], **options) -> str:
        """Draw `num` samples (seeded) into the file `out` (`options`: the sample_options given); `writable(path,
        flag)` refuses any other file to write. Returns a line saying what was written."""
        raise ValueError(f"a {self.name} run has nothing to sample: sample draws images from an image generation "
                         "run or text from a language-model run")


# -- Comparison ---------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One arm of `compare`, as the compared task's hooks see it."""

    role: str  # compare's name for it (e2e, control, dblocks, a method's or another task's): its key in the report
    form: str  # the model form its method trains (Method.model_form)
    task: str  # the task whose model it trains (another task's, for an arm such as mdlm's autoregressive floor)
    own: bool  # the compared task's model at the compared depth (not the control's one block of depth)
    runs: list[dict]  # results.json of each seed
    values: list[float]  # the compared headline of each seed
    load: Callable[..., nn.Module]  # its seed-0 model; load(device) puts it there (default the CPU)
    batch_size: int = 0  # samples per optimizer step (train.batch_size), for curves against samples seen; 0: unknown
    device: str = "cpu"  # where the compare trains (train.device, resolved): where sampling speed is timed


def pick(arms: dict[str, Arm], form: str) -> Arm | None:
    """The arm that trains the compared task's own model in `form` (Method.model_form): the end-to-end reference
    ("end-to-end") or the block-wise arm ("blocks"); None where compare runs none. Of several, the fewest steps: the
    arm at the shared layer-update budget, not end-to-end at DiffusionBlocks' steps, whatever order they were named."""
    own = [a for a in arms.values() if a.own and a.form == form]
    return min(own, key=lambda a: a.runs[0].get("steps", 0), default=None)


def speedup_note(ratio: float, num_blocks: int) -> str:
    """What a measured sampling speed-up of DiffusionBlocks over end-to-end at equal steps says against its ideal: a
    step runs one block of B, so B (stem and head aside) is the most the method itself gives."""
    if ratio <= num_blocks:
        return f"(ideal B = {num_blocks})"
    return (f"(ABOVE the ideal B = {num_blocks}: each step runs one block of {num_blocks}, so the method gives at most "
            f"{num_blocks}x; the excess is timing noise or cache effects, e.g. one block's smaller weights and "
            "activations fitting in cache, not the method's gain)")


class Comparison:
    """What `compare` (compare.py) asks of the task it compares besides the headline."""

    # the arms without --methods; the built-in tasks add "e2e-steps" (end-to-end for DiffusionBlocks' optimizer steps
    # and samples, B times the layer-updates of the others) and "control" (end-to-end at one block's depth)
    compare_roles: ClassVar[tuple[str, ...]] = ("e2e", "dblocks")
    percent: ClassVar[bool] = False  # the headline is a fraction, shown in percent (differences in points)
    paper_gap: ClassVar[str] = ""  # the paper's DiffusionBlocks - e2e difference, quoted beside ours
    # results keys besides the headline that this task's end-to-end runs hold, so that another task's compare may take
    # this task as an arm reporting that key (arlm's test_bpc, mdlm's autoregressive floor)
    shared_metrics: ClassVar[tuple[str, ...]] = ()

    def arm_config(self, cfg: RunConfig, form: str) -> RunConfig:
        """An arm's config after compare set its task, method (training `form`) and budget (compare.role_config), for
        every arm of this task's compare; a task may adjust it (recurrent depth: the arms other than Huginn's train
        the paper's multiple of its steps)."""
        return cfg

    def sweep_validation(self, base: RunConfig) -> tuple[int, str]:
        """The validation split compare's settings sweep (--tune-lr) trains beside and chooses on when data.val_size
        is not given: (its size, where it came from). A task with no split of its own asks for data.val_size."""
        raise ValueError(f"choosing settings on validation needs a validation split: give data.val_size=N (task "
                         f"{self.name}: N validation items)")

    def compare_extras(self, arms: dict[str, Arm], base: RunConfig, out) -> tuple[dict, list[str]]:
        """The task's own parts of the report, (entries for compare.json, markdown lines)."""
        return {}, []


# -- Planning -----------------------------------------------------------------------------------------------------


class NoFormula(ValueError):
    """The planner has no activation formula for this task: `memory` measures it, `plan` cannot predict it."""


class Planning:
    """The memory planner's view of a task (plan.py, `diffusionblocks memory`): shapes and formulas, no data."""

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
        raise NoFormula(f"the planner's activation formula does not cover task={self.name!r} yet")

    def plan_layer_bytes(self, cfg: RunConfig, shapes, element: int, form: str = "end-to-end") -> int:
        """Bytes each layer saves beyond the transformer layer's formula (plan.layer_activation_bytes)."""
        return 0

    def plan_outer_bytes(self, cfg: RunConfig, shapes, model: nn.Module, element: int) -> int:
        """Bytes autograd saves outside the layers in one training step of `model` (as build_model made it, on
        the meta device): stem, head and loss, at cfg.train.batch_size and `element` bytes per element."""
        raise NoFormula(f"the planner's activation formula does not cover task={self.name!r} yet")
