"""Tasks, one file each; every module here that defines `TASK` is registered in `TASKS` under its name, so
a new task is one new file (its class on the `base.Task` interface) plus its backbone in models.py."""

from __future__ import annotations

import importlib
import pkgutil

from .base import ImageTask, Task


def _discover() -> dict[str, type[Task]]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
        if cls is not None:
            found[cls.name] = cls
    return found


TASKS: dict[str, type[Task]] = _discover()


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "ImageTask", "Task", "get_task"]
