"""The package's shape: imports go one way, the loop never dispatches on a task's or a method's name, tasks
and methods plug in through their registries, blocks may tie their weights, and the README's minimal use
runs as written."""

import ast
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import diffusionblocks
from diffusionblocks import io
from diffusionblocks.cli import build_parser
from diffusionblocks.config import apply_overrides
from diffusionblocks.methods import METHODS, Method
from diffusionblocks.methods.base import Optimizer, stream_seed, update
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.registry import discover
from diffusionblocks.run import load_model, validate
from diffusionblocks.tasks import TASKS
from diffusionblocks.tasks.base import Task
from diffusionblocks.tasks.classify import preset_tiny
from diffusionblocks.train import train

PACKAGE = Path(diffusionblocks.__file__).parent
ROOT = PACKAGE.parent
# the layers of the import order (README, the package docstring); a module imports only from its own row
# or the rows above, and nothing forms a circle
LAYERS = [
    {"noise", "precond", "blocks", "sample", "nn", "adapters"},
    {"models", "data", "config", "io", "images", "fd", "text", "memory", "measure", "residency", "registry",
     "version", "logs"},
    {"tasks", "methods"},
    {"run"},
    {"train"},
    {"jobs", "parallel", "compare", "plan", "cli", "inference", "__main__"},
]


def _top(module: str) -> str:
    """diffusionblocks.tasks.classify -> tasks; the package itself -> __init__."""
    return module.split(".")[1] if "." in module else "__init__"


def _layer(module: str) -> int:
    top = _top(module)
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return len(LAYERS)  # the package itself (its public API imports everything)


def _imports() -> dict[str, set[str]]:
    """Every import of a package module by a package module, module-level and function-local alike."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_init = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_init else parts)
        package = name.split(".") if is_init else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                mod = ".".join(base + (node.module.split(".") if node.module else []))
                if not mod.startswith("diffusionblocks"):
                    continue
                for alias in node.names:  # "from . import io" imports the module diffusionblocks.io
                    sub = f"{mod}.{alias.name}"
                    edges.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else mod)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("diffusionblocks")}
        graph[name] = {e for e in edges if e != name}
    return graph


def test_imports_go_one_way():
    graph = _imports()
    assert "diffusionblocks.train" in graph and "diffusionblocks.methods.dblocks" in graph
    upward = [(a, b) for a, bs in graph.items() for b in bs if _layer(b) > _layer(a)]
    assert upward == [], f"imports against the layer order: {upward}"
    between_plugins = [(a, b) for a, bs in graph.items() for b in bs
                       if {_top(a), _top(b)} == {"tasks", "methods"}]
    assert between_plugins == [], f"tasks and methods must not import each other: {between_plugins}"
    # no circle: repeatedly remove modules that import nothing left
    left = {a: set(bs) & set(graph) for a, bs in graph.items()}
    while True:
        leaves = [a for a, bs in left.items() if not bs]
        if not leaves:
            break
        for a in leaves:
            del left[a]
        for bs in left.values():
            bs.difference_update(leaves)
    assert not left, f"import circle among {sorted(left)}"


def test_no_function_local_imports_of_the_package():
    local = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                ours = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("diffusion"))
                if ours:
                    local.append(f"{path.name}:{node.lineno}")
    assert local == []


def _name_tests(path: Path) -> list[str]:
    """Comparisons of a `.task`/`.method` (or a variable so named) with a string: dispatch on a name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any((isinstance(s, ast.Attribute) and s.attr in ("task", "method"))
                        or (isinstance(s, ast.Name) and s.id in ("task", "method")) for s in sides)
            if named and any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_the_loop_and_its_plugins_never_dispatch_on_a_name(tmp_path):
    files = [PACKAGE / f for f in ("train.py", "run.py", "jobs.py", "parallel.py", "compare.py", "cli.py")]
    files += sorted((PACKAGE / "tasks").glob("*.py")) + sorted((PACKAGE / "methods").glob("*.py"))
    assert [hit for f in files for hit in _name_tests(f)] == []
    probe = tmp_path / "probe.py"  # the check itself can fail
    probe.write_text("if cfg.train.method == 'e2e':\n    pass\nelif task != 'classify':\n    pass\n")
    assert _name_tests(probe) == ["probe.py:1", "probe.py:3"]


def test_cli_choices_come_from_the_registries():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    train_args = {a.dest: a for a in sub["train"]._actions}
    assert tuple(train_args["method"].choices) == tuple(METHODS) and set(METHODS) >= {"e2e", "dblocks"}
    assert tuple(train_args["task"].choices) == tuple(TASKS) and set(TASKS) >= {"classify", "imagegen"}
    with pytest.raises(ValueError, match="train.method='sgd': expected one of"):
        validate(apply_overrides(preset_tiny(), ["train.method=sgd"]))


def test_a_file_is_a_plugin_only_where_it_defines_one(tmp_path, monkeypatch):
    """A pipeline the plug-ins share (tasks/images.py, tasks/lm.py) or an interface defines no TASK: not a task."""
    pkg = tmp_path / "toyplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline.py").write_text("class Shared:\n    name = 'shared'\n")
    (pkg / "toy.py").write_text("from .pipeline import Shared\n\nclass Toy(Shared):\n    name = 'toy'\n\nTASK = Toy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert list(discover("toyplugins", [str(pkg)], "TASK")) == ["toy"]
    shared = [f"diffusionblocks.tasks.{m}" for m in ("base", "images", "lm", "optional")]
    assert not any(hasattr(sys.modules[m], "TASK") for m in shared)
    assert {cls.__module__ for cls in TASKS.values()}.isdisjoint(shared)


# -- a task and a method that the package has never seen plug into the loop ---------------------------------


class ToyStream:
    """Random regression batches (x, y = x @ w) with a resumable generator."""

    def __init__(self, w, batch: int, seed: int):
        self.w, self.batch, self.gen = w, batch, torch.Generator().manual_seed(seed)

    def __next__(self):
        x = torch.randn(self.batch, self.w.shape[0], generator=self.gen)
        return x, x @ self.w

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


class ToyData:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(4, 2, generator=g)
        self.x_test = torch.randn(64, 4, generator=g)
        self.y_test = self.x_test @ self.w

    def describe(self):
        return "toy regression: 4 -> 2"


class ToyRegressor(nn.Module):
    num_layers = 1

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def loss(self, x, y):
        return (self.lin(x) - y).square().mean(1)


class ToyTask(Task):
    name, metric, higher_is_better = "toy", "mse", False

    def load_data(self, cfg):
        return ToyData()

    def build_model(self, cfg, data, form):
        return ToyRegressor()

    def stream(self, data, cfg, seed, member=0):
        return ToyStream(data.w, cfg.train.batch_size, seed)

    def probe_batch(self, data, cfg, device):
        return data.x_test, data.y_test

    @torch.no_grad()
    def evaluate(self, model, data, cfg, *, limit=0, device="cpu", **options):
        return {"mse": float(model.loss(data.x_test, data.y_test).mean()), "n": len(data.y_test)}

    def summary(self, results):
        return f"mse {results['mse']:.4f}"


class SignSGD(Method):
    """A method the package does not have: sign descent on the whole model, via the shared update helper."""

    name, model_form = "signsgd", "end-to-end"

    @classmethod
    def budget(cls, cfg):
        return cfg.train.steps, f"{cfg.train.steps} steps"

    def __init__(self, model, cfg, total_steps, **_):
        self.model, self.cfg = model, cfg
        self.params = list(model.parameters())
        self.opt = Optimizer(self.params, cfg, total_steps)

    def stream_seeds(self):
        return {0: stream_seed(self.cfg.train.seed)}

    def probe_loss(self, batch):
        return self.model.loss(*batch).mean()

    def next_block(self):
        return 0

    def step(self, batch, block=0):
        loss = self.model.loss(*batch).mean()
        signed = type("Signed", (), {"step": lambda _: self._sign_step()})()
        out = update(loss, self.params, [signed], clip=0.0)
        return dict(out, layers=0) if out.get("skipped") else dict(out, layers=1, trained={id(p) for p in self.params})

    @torch.no_grad()
    def _sign_step(self):
        for p in self.params:
            p -= self.cfg.train.lr * p.grad.sign()
        return self.cfg.train.lr

    def optimizers(self):
        return [self.opt.opt]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_new_task_and_a_new_method_plug_into_the_loop(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "toy", ToyTask)
    monkeypatch.setitem(METHODS, "signsgd", SignSGD)
    cfg = apply_overrides(preset_tiny(), ["train.method=signsgd", "train.steps=100", "train.lr=0.02",
                                          "train.batch_size=32"])
    cfg.task = "toy"
    results = train(cfg, tmp_path / "toy", progress=False)
    first = results["curve"][0]["mse"]
    assert results["task"] == "toy" and results["steps"] == 100 and results["layer_updates"] == 100
    torch.manual_seed(cfg.train.seed)  # the run's initial weights
    assert results["mse"] < 0.2 * ToyTask().evaluate(ToyRegressor(), ToyData(), cfg)["mse"]  # it learned
    assert results["curve"][-1]["mse"] < first
    _, model, _ = load_model(tmp_path / "toy")
    assert isinstance(model, ToyRegressor)
    assert any("eval_mse" in r for r in io.read_jsonl(tmp_path / "toy" / "metrics.jsonl"))


# -- the model contract: blocks that own nothing, a core tied across blocks -----------------------------


class TiedCore(nn.Module):
    """A recurrent-depth shape: one core applied in every block (shared), each block a tiny own scale."""

    num_blocks = 3

    def __init__(self, own=True):
        super().__init__()
        self.core = nn.Linear(4, 4)
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(4)) for _ in range(3)) if own else None

    def block_parameters(self, block):
        return [self.scales[block]] if self.scales is not None else []

    def block_modules(self, block):
        return []

    def shared_parameters(self):
        return list(self.core.parameters())

    def block_layers(self, block):
        return 2  # the core applied twice per block step

    def block_loss(self, block, x, y, generator=None):
        h = x
        for _ in range(2):
            h = h + torch.tanh(self.core(h)) * (self.scales[block] if self.scales is not None else 1)
        return (h - y).square().mean(1)


@pytest.mark.parametrize("own", [True, False])
def test_dblocks_trains_a_core_tied_across_blocks(own):
    cfg = apply_overrides(preset_tiny(), ["blocks.num_blocks=3", "dblocks.block_choice=round-robin"])
    model = TiedCore(own)
    method = DBlocks(model, cfg, 9)
    x, y = torch.randn(16, 4), torch.randn(16, 4)
    core = model.core.weight.detach().clone()
    steps = [method.step((x, y)) for _ in range(6)]
    assert [m["block"] for m in steps] == [0, 1, 2, 0, 1, 2] and all(m["layers"] == 2 for m in steps)
    assert not torch.equal(core, model.core.weight)  # every block's steps train the tied core
    if own:
        assert not torch.equal(model.scales[1], torch.ones(4))
    assert len(method.optimizers()) == (4 if own else 1)


def test_a_parameter_owned_by_two_blocks_is_refused():
    model = TiedCore()
    model.block_parameters = lambda b: [model.scales[0]]  # the same parameter claimed by every block
    with pytest.raises(RuntimeError, match="owned by blocks 0 and 1.*shared parameter"):
        DBlocks(model, apply_overrides(preset_tiny(), ["blocks.num_blocks=3"]), 9)


def test_the_readme_minimal_use_runs_as_written(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"A minimal use of the core.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    samples, y = namespace["samples"], namespace["y"]
    assert samples.shape == y.shape and torch.isfinite(samples).all()
    assert (samples - y).norm(dim=1).mean() < 0.3  # it learned: sigma_max noise is 80 away
    assert "mean distance" in capsys.readouterr().out


def test_the_cli_imports_no_task_module_and_offers_every_option_a_task_declares():
    imported = _imports()["diffusionblocks.cli"]
    assert "diffusionblocks.tasks" in imported  # the registry
    assert {m for m in imported if m.startswith("diffusionblocks.tasks.")} == set()
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for kind in ("eval", "sample"):
        flags = {a.dest: a for a in sub[kind]._actions}
        for task in TASKS.values():
            for o in task.options(kind):  # a flag of the declared name, type and choices (the same for every task)
                parsed = (None, None) if o.type is bool else (o.type, o.choices)
                assert (flags[o.name].type, flags[o.name].choices) == parsed, (kind, task.name, o.name)
