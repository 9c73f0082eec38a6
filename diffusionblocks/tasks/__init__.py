"""Tasks, one file each; every module here that defines `TASK` is registered in `TASKS` under its name, so
a new task is one new file (its class on the `base.Task` interface) plus its backbone in models.py."""

from __future__ import annotations

from ..registry import discover
from .base import SPLITS, ImageTask, Option, Task, at_least, run_split, split_arrays

TASKS: dict[str, type[Task]] = discover(__name__, __path__, "TASK")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["SPLITS", "TASKS", "ImageTask", "Option", "Task", "at_least", "get_task", "run_split", "split_arrays"]
