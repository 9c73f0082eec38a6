"""Plug-in discovery: every module of a package that defines a given name (e.g. TASK, METHOD) contributes that class
under its `name`, so adding a plug-in is adding a file. A module without the name (an interface, a pipeline the
plug-ins share) is no plug-in."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def discover(package: str, path: Iterable[str], attr: str) -> dict[str, type]:
    """{cls.name: cls} for `attr` of each public module of `package` that defines it, in module-name order."""
    found = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            cls = getattr(importlib.import_module(f"{package}.{info.name}"), attr, None)
            if cls is not None:
                found[cls.name] = cls
    return found
