"""Plug-ins: the tasks and methods a run can name, found in three ways.

- inside the package: every module of tasks/ or methods/ that defines TASK or METHOD (`discover`), so adding a
  built-in plug-in is adding a file;
- from the user's code: `register(MyTask)` in a script or notebook, or `load("mytask.py")` / `load("pkg.mod")` of a
  module that defines TASK and/or METHOD (the command line's `--plugin`, and $DIFFUSIONBLOCKS_PLUGINS);
- from installed packages: the entry-point group "diffusionblocks.plugins", each entry a module or a class.

A run records where its outside plug-ins came from (`origins`, in config.json's "plugins"): `eval`, `--resume`,
`merge` and other processes import them by module name where this environment can (`require`), and otherwise say
which file to pass to --plugin (a run directory, which may come from anywhere, never runs a file it names). A module
without TASK or METHOD (an interface, a pipeline the plug-ins share) is no plug-in.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Iterable
from pathlib import Path

GROUP = "diffusionblocks.plugins"  # the entry-point group of installed plug-ins
ENV = "DIFFUSIONBLOCKS_PLUGINS"  # plug-ins to load, comma-separated modules or .py files
KINDS: dict[str, tuple[type, dict[str, type]]] = {}  # "TASK" / "METHOD" -> (its base class, {name: class})
_loaded_installed = False
_scripts: list[str] = []  # runs' plug-ins that a script defined (module __main__): no other process can import them


def discover(package: str, path: Iterable[str], attr: str) -> dict[str, type]:
    """{cls.name: cls} for `attr` of each public module of `package` that defines it, in module-name order."""
    found = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            cls = getattr(importlib.import_module(f"{package}.{info.name}"), attr, None)
            if cls is not None:
                found[cls.name] = cls
    return found


def table(attr: str, base: type, found: dict[str, type]) -> dict[str, type]:
    """Declare the registry of plug-ins of kind `attr` ("TASK"), subclasses of `base`; returns `found`, now live."""
    KINDS[attr] = (base, found)
    return found


def register(cls: type) -> type:
    """Make a Task or Method subclass nameable by runs (cfg.task, train.method) in this process; returns it, so it
    can decorate the class. A name taken by another class is refused."""
    for attr, (base, found) in KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"{cls.__qualname__} needs a class attribute `name`, an identifier such as "
                                 f"'points', to be registered as a {attr.lower()}")
            old = found.get(name)
            if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                                              cls.__qualname__):
                raise ValueError(f"{attr.lower()} name {name!r} is taken by {old.__module__}.{old.__qualname__}")
            found[name] = cls
            return cls
    bases = " or ".join(f"diffusionblocks.{'tasks.Task' if a == 'TASK' else 'methods.Method'}" for a in KINDS)
    raise TypeError(f"register takes a subclass of {bases}, not {cls!r}")


def _register_module(module) -> list[str]:
    """Register what a plug-in module defines (TASK, METHOD); the names registered, or that it registered itself."""
    names = [register(getattr(module, attr)).name for attr in KINDS if getattr(module, attr, None) is not None]
    names += [n for _, found in KINDS.values() for n, cls in found.items()
              if cls.__module__ == module.__name__ and n not in names]
    if not names:
        raise ValueError(f"plug-in {module.__name__} defines neither TASK nor METHOD and registers nothing (name its "
                         "class TASK = ... or METHOD = ..., or call diffusionblocks.register on it)")
    return names


def load(spec: str) -> list[str]:
    """Import a plug-in, a module name ("mypkg.tasks") or a .py file, and register its TASK and METHOD; the names
    registered. Its config sections and presets register as it is imported."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise ValueError(f"plug-in {spec}: no such file")
        name = path.stem
        module = sys.modules.get(name)
        if module is None or Path(getattr(module, "__file__", "") or "").resolve() != path.resolve():
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            try:
                loader.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        return _register_module(module)
    try:
        module = importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise ValueError(f"plug-in {spec!r}: no module of that name here (give a .py file's path, or put its "
                             "folder on PYTHONPATH)") from None
        raise
    return _register_module(module)


def load_installed() -> None:
    """Load the plug-ins of installed packages (the entry-point group) and of $DIFFUSIONBLOCKS_PLUGINS, once."""
    global _loaded_installed
    if _loaded_installed:
        return
    _loaded_installed = True
    for entry in importlib.metadata.entry_points(group=GROUP):
        obj = entry.load()
        _register_module(obj) if isinstance(obj, type(sys)) else register(obj)
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        load(spec)


def lookup(attr: str, name: str, key: str) -> type:
    """The registered class of kind `attr` named `name` (installed plug-ins loaded first if it is not yet known)."""
    found = KINDS[attr][1]
    if name not in found:
        load_installed()
    if name not in found:
        script = (f"; the run's plug-in was defined in the script {_scripts[-1]}, which no other process can import: "
                  "move the class into a module (a .py file the script imports)") if _scripts else ""
        raise ValueError(f"{key}={name!r}: expected one of {', '.join(found)} (a {attr.lower()} of your own: "
                         f"diffusionblocks.register it, or load its module with --plugin FILE.py){script}")
    return found[name]


def origin(cls: type) -> dict | None:
    """How another process imports the module that defines `cls`: {"module", "file"}; None for the package's own."""
    module = sys.modules.get(cls.__module__)
    if cls.__module__.split(".")[0] == __name__.split(".")[0]:
        return None
    file = getattr(module, "__file__", None)
    return {"module": cls.__module__, "file": str(Path(file).resolve()) if file else ""}


def origins(classes: Iterable[type]) -> list[dict]:
    """The distinct origins of the classes that come from outside the package, in order."""
    out = []
    for cls in classes:
        o = origin(cls)
        if o is not None and o not in out:
            out.append(o)
    return out


def require(origins_: list) -> None:
    """Import the plug-ins a run recorded (config.json's "plugins") that this process does not hold yet, by module
    name only; a ValueError names the recorded file to pass to --plugin. A script's own classes (module __main__)
    cannot be imported again."""
    for o in origins_:
        if not isinstance(o, dict) or not isinstance(o.get("module"), str):
            raise ValueError(f"plugins: {o!r} is not a plug-in's origin ({{\"module\": ..., \"file\": ...}})")
        name, file = o["module"], o.get("file") or ""
        if name == "__main__":
            _scripts.append(file or "(unknown)")  # lookup's error says how to make the script's task importable
            continue
        if name in sys.modules:
            continue
        try:  # by name only, from this environment's own paths: a run directory never makes us run a file it names
            load(name)
        except ValueError:
            raise ValueError(f"this run's task or method comes from the plug-in {name!r} ({file or 'no file recorded'}"
                             f"), which is not loaded: pass --plugin {file or 'FILE.py'} (or put its folder on "
                             "PYTHONPATH); a run directory never runs the code it names by itself") from None
