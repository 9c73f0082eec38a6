"""Tasks, one file each; every module here that defines `TASK` is registered in `TASKS` under its name, so a new task
is one new file (its class on the `base.Task` interface) plus its backbone in models.py. The pipelines the tasks share
(images.py, lm.py, tensors.py) and the optional parts (optional.py) define no TASK and are not tasks. Tasks from
outside the package: registry.py."""

from __future__ import annotations

from ..registry import discover, lookup, table
from .base import SPLITS, Task, run_split, split_arrays
from .optional import Option, at_least

TASKS: dict[str, type[Task]] = table("TASK", Task, discover(__name__, __path__, "TASK"))


def get_task(name: str) -> Task:
    return lookup("TASK", name, "task")()


__all__ = ["SPLITS", "TASKS", "Option", "Task", "at_least", "get_task", "run_split", "split_arrays"]
