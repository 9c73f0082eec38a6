"""Plug-in discovery: every module of a package that defines a given name (e.g. TASK, METHOD) contributes
that class under its `name`, so adding a plug-in is adding a file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def discover(package: str, path: Iterable[str], attr: str, skip: tuple[str, ...] = ("base",)) -> dict[str, type]:
    """{cls.name: cls} for `attr` of each module of `package` (in module-name order), `skip` and private
    modules left out."""
    found = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name in skip or info.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"{package}.{info.name}"), attr, None)
        if cls is not None:
            found[cls.name] = cls
    return found
