"""A user's own task and method from outside the package: registered by a call, by --plugin, by an entry point or by
$DIFFUSIONBLOCKS_PLUGINS, and given every harness feature (train, eval from elsewhere, resume, sample, compare with
its control, measured memory, per-block jobs, merge, torchrun)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import signal_on_step
from sklearn.datasets import load_digits

from diffusionblocks import inference, io, registry
from diffusionblocks.cli import build_parser, main
from diffusionblocks.compare import compare
from diffusionblocks.config import RunConfig, apply_overrides, load_preset
from diffusionblocks.methods import METHODS, Method
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.run import load_model
from diffusionblocks.tasks import TASKS, Task, get_task
from diffusionblocks.tasks.tensors import PlainTensorClassifier, TensorClassifier, TensorClassifierTask, TensorTask
from diffusionblocks.train import train

PLUGIN = textwrap.dedent('''
    import torch
    from diffusionblocks.models import VectorHead, VectorStem
    from diffusionblocks.nn import ResidualMLP
    from diffusionblocks.tasks.tensors import PlainTensorClassifier, TensorClassifier, TensorClassifierTask, TensorTask


    class Circle(TensorTask):
        name = "{name}"

        def tensors(self, cfg):
            x = torch.rand(640, 1, generator=torch.Generator().manual_seed(0))
            y = torch.cat([(6 * x).cos(), (6 * x).sin()], dim=1)
            return {{"train": (y[:512], x[:512]), "test": (y[512:], x[512:])}}

        def network(self, cfg, shapes):
            D = cfg.model.width
            return (VectorStem(shapes.target[0], D, cond_dim=shapes.cond[0]),
                    [ResidualMLP(D) for _ in range(cfg.model.depth)], VectorHead(D, shapes.target[0]))


    TASK = Circle
''')
SMALL = ["model.width=32", "train.batch_size=64", "train.eval_batch_size=128"]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plug-in file of the user's, with a task name of this test's own; the registries restored afterwards."""
    name = f"circle_{tmp_path.name.replace('-', '_')}"
    path = tmp_path / "user" / f"{name}.py"
    path.parent.mkdir()
    path.write_text(PLUGIN.format(name=name))
    monkeypatch.setattr(registry, "_loaded_installed", True)  # no installed plug-ins unless a test says so
    before = dict(TASKS), dict(METHODS)
    yield name, path
    for table, saved in zip((TASKS, METHODS), before):
        table.clear()
        table.update(saved)
    sys.modules.pop(name, None)


def test_a_plugin_file_trains_evaluates_elsewhere_and_samples(plugin, tmp_path, monkeypatch, capsys):
    name, path = plugin
    run = tmp_path / "run"
    assert main(["train", "--plugin", str(path), "--task", name, "--out", str(run), "--no-progress",
                 "train.steps=120", *SMALL]) == 0
    results = io.load_json(run / "results.json")
    assert results["task"] == name and results["layer_updates"] == 120 * 6
    blocks = [results[f"denoising_loss_block{b}"] for b in range(3)]
    assert results["denoising_loss"] == pytest.approx(np.mean(blocks))
    torch.manual_seed(0)
    task = TASKS[name]()
    cfg = RunConfig.from_dict(io.load_json(run / "config.json"))
    data = task.load_data(cfg)
    untrained = task.evaluate(task.build_model(cfg, data, "blocks"), data, cfg)["denoising_loss"]
    assert results["denoising_loss"] < 0.5 * untrained  # it learned
    assert io.load_json(run / "config.json")["plugins"] == [{"module": name, "file": str(path.resolve())}]

    # another process and folder: without --plugin the error names the file (a run never runs a file by itself);
    # with its folder on the import path the recorded module name loads it (one process for both: one torch import)
    elsewhere = textwrap.dedent(f"""
        import sys
        from diffusionblocks.cli import main
        print("CODE", main(["eval", {str(run)!r}, "--json"]), flush=True)
        sys.path.insert(0, {str(path.parent)!r})  # as PYTHONPATH would
        print("CODE", main(["eval", {str(run)!r}, "--json"]), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", elsewhere], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.findall(r"CODE (\d+)", proc.stdout) == ["2", "0"], proc.stderr[-2000:]
    assert f"pass --plugin {path.resolve()}" in proc.stderr
    assert '"denoising_loss": ' + repr(results["denoising_loss"]) in proc.stdout

    predictor = inference.load(run)  # a plain module: no task, no data read
    x = torch.rand(64, 1, generator=torch.Generator().manual_seed(1))
    drawn = predictor.sample(64, x=x, seed=3)
    close = (drawn - torch.cat([(6 * x).cos(), (6 * x).sin()], 1)).norm(dim=1).mean()
    assert drawn.shape == (64, 2) and close < 0.5  # a sample at the origin is 1 away
    with pytest.raises(ValueError, match="conditioned on x of shape \\[1\\]: give x"):
        predictor.sample(4)

    capsys.readouterr()
    assert main(["sample", str(run), "--num", "64", "--out", str(tmp_path / "s.npz")]) == 0
    drawn = np.load(tmp_path / "s.npz")
    y, x = drawn["y"], drawn["x"]
    target = np.concatenate([np.cos(6 * x), np.sin(6 * x)], 1)
    noise_only = np.linalg.norm(target, axis=1).mean()  # a sample at the origin
    assert y.shape == (64, 2) and np.linalg.norm(y - target, axis=1).mean() < 0.5 * noise_only


def test_a_registered_task_resumes_exactly_and_compares_with_its_control(plugin, tmp_path, monkeypatch):
    name, path = plugin
    registry.load(str(path))
    cfg = apply_overrides(load_preset("tensors"), [*SMALL, "train.steps=8", "train.ckpt_every=1000"])
    cfg.task = name
    train(cfg, tmp_path / "full", progress=False)
    original = signal_on_step(monkeypatch, DBlocks, 11, signal.SIGINT)  # a real Ctrl-C in the middle of the run
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(DBlocks, "step", original)
    assert io.load_torch(tmp_path / "cut" / "state.pt")["step"] == 11
    train(None, tmp_path / "cut", resume=True, progress=False)
    a, _ = io.load_safetensors(tmp_path / "full" / "model.safetensors")
    b, _ = io.load_safetensors(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    report = compare(cfg, tmp_path / "cmp", [0], None, progress=False)
    assert set(report["rows"]) == {"e2e", "e2e-steps", "dblocks", "control"}
    control = io.load_json(tmp_path / "cmp" / "control-seed0" / "results.json")
    assert control["depth"] == 2 and control["parameters"] < 0.5 * io.load_json(
        tmp_path / "cmp" / "e2e-seed0" / "results.json")["parameters"]


def test_per_block_jobs_merge_and_memory_of_a_plugin(plugin, tmp_path, capsys):
    name, path = plugin
    common = ["--plugin", str(path), "--task", name, "--no-progress", "train.steps=6", "blocks.shared_stem_head=false",
              "dblocks.block_choice=round-robin", *SMALL]
    assert main(["train", "--out", str(tmp_path / "whole"), *common]) == 0
    for b in range(3):
        assert main(["train", "--out", str(tmp_path / f"job{b}"), "--blocks", str(b), *common]) == 0
    assert main(["merge", *(str(tmp_path / f"job{b}") for b in range(3)), "--out", str(tmp_path / "merged")]) == 0
    a, _ = io.load_safetensors(tmp_path / "whole" / "model.safetensors")
    b, _ = io.load_safetensors(tmp_path / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # jobs apart = one run
    assert io.load_json(tmp_path / "merged" / "config.json")["plugins"][0]["module"] == name

    capsys.readouterr()
    assert main(["memory", "--plugin", str(path), "--task", name, "--preset", "tensors", "--blocks", "3",
                 "--out", str(tmp_path / "mem"), "--no-plot", "--no-progress", "--json", *SMALL]) == 0
    rows = {r["name"]: r for r in io.load_json(tmp_path / "mem" / "memory.json")["rows"]}
    e2e, active = rows["e2e"]["measured"], rows["dblocks B=3 active"]["measured"]
    assert rows["e2e"]["total"] is None  # no activation formula for a user's task: measured, not predicted
    assert 0 < active["activations"] < 0.6 * e2e["activations"]  # a block keeps about a third of the activations
    assert main(["plan", "--plugin", str(path), "--task", name, "--preset", "tensors"]) == 2
    assert "measure its steps with `diffusionblocks memory" in capsys.readouterr().err


def test_torchrun_trains_a_plugin_block_parallel(plugin, tmp_path):
    name, path = plugin
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "diffusionblocks", "train", "--plugin", str(path), "--task", name, "--parallel", "blocks", "--out",
           str(tmp_path / "par"), "--no-progress", "train.steps=12", "blocks.shared_stem_head=false",
           "dblocks.block_choice=round-robin", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = io.load_json(tmp_path / "par" / "results.json")
    assert results["world_size"] == 2 and [r["blocks"] for r in results["ranks"]] == [[0, 2], [1]]
    assert results["task"] == name and np.isfinite(results["denoising_loss"])


# -- the registry's own rules ------------------------------------------------------------------------------


def test_register_refuses_what_is_not_a_plugin_and_a_taken_name(plugin):
    class NoName(TensorTask):
        pass

    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        registry.register(NoName)
    with pytest.raises(TypeError, match="subclass of"):
        registry.register(dict)

    class Clash(TensorTask):
        name = "classify"

    with pytest.raises(ValueError, match="taken by diffusionblocks.tasks.classify"):
        registry.register(Clash)


def test_an_unknown_task_says_how_to_register_one(plugin):
    with pytest.raises(ValueError, match="register it, or load its module with --plugin"):
        get_task("nope")


def test_a_module_without_task_or_method_is_refused(tmp_path):
    (tmp_path / "empty_plugin_mod.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="defines neither TASK nor METHOD"):
        registry.load(str(tmp_path / "empty_plugin_mod.py"))
    with pytest.raises(ValueError, match="no module of that name"):
        registry.load("no_such_plugin_module_here")


def test_entry_points_and_the_environment_variable_register_plugins(plugin, tmp_path, monkeypatch):
    """An installed package's entry point (a dist-info folder on sys.path, as pip leaves it) and
    $DIFFUSIONBLOCKS_PLUGINS are loaded the first time a name is not found."""
    name, path = plugin
    site = tmp_path / "site"
    (site / "userpkg-1.0.dist-info").mkdir(parents=True)
    (site / "userpkg-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: userpkg\nVersion: 1.0\n")
    (site / "userpkg-1.0.dist-info" / "entry_points.txt").write_text(f"[diffusionblocks.plugins]\ncircle = {name}\n")
    (site / f"{name}.py").write_text(path.read_text())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_loaded_installed", False)
    assert TASKS.get(name) is None
    assert registry.lookup("TASK", name, "task").name == name

    other = tmp_path / "method_plugin_file.py"
    other.write_text("from diffusionblocks.methods.e2e import EndToEnd\n\n"
                     "class Plain(EndToEnd):\n    name = 'plain_e2e_env'\n\nMETHOD = Plain\n")
    monkeypatch.setenv(registry.ENV, str(other))
    monkeypatch.setattr(registry, "_loaded_installed", False)
    assert registry.lookup("METHOD", "plain_e2e_env", "train.method").name == "plain_e2e_env"
    sys.modules.pop("method_plugin_file", None)


def test_a_bad_tensors_or_network_is_a_clear_error(plugin):
    class BadTensors(TensorTask):
        name = "bad_tensors"

        def tensors(self, cfg):
            return torch.zeros(3)

    class BadNetwork(TensorTask):
        name = "bad_network"

        def tensors(self, cfg):
            y = torch.randn(8, 2)
            return {"train": (y,), "test": (y,)}

        def network(self, cfg, shapes):
            return torch.nn.Linear(2, 2)

    cfg = load_preset("tensors")
    with pytest.raises(ValueError, match=r"must return \{'train': \(y, x\), 'test'"):
        BadTensors().load_data(cfg)
    with pytest.raises(ValueError, match=r"must return \(stem, layers, head\)"):
        BadNetwork().build_model(cfg, BadNetwork().load_data(cfg), "blocks")


def test_a_task_or_method_of_the_users_registers_by_a_call(plugin, tmp_path):
    """A script's own classes (no file to load) work in its process: register, train, load."""

    @registry.register
    class Line(TensorTask):
        name = "line_in_script"

        def tensors(self, cfg):
            x = torch.linspace(-1, 1, 256)[:, None]
            return {"train": (x.clone(),), "test": (x[::4].clone(),)}

        def network(self, cfg, shapes):
            from diffusionblocks.models import VectorHead, VectorStem
            from diffusionblocks.nn import ResidualMLP
            return VectorStem(1, 16), [ResidualMLP(16) for _ in range(cfg.model.depth)], VectorHead(16, 1)

    cfg = load_preset("tensors")
    cfg.task, cfg.train.steps, cfg.train.batch_size = "line_in_script", 10, 32
    results = train(cfg, tmp_path / "line", progress=False)
    assert results["task"] == "line_in_script" and "denoising_loss_block2" in results
    assert "plugins" in io.load_json(tmp_path / "line" / "config.json")
    assert load_model(tmp_path / "line")[1].num_layers == cfg.model.depth
    assert issubclass(Line, Task) and not issubclass(Line, Method)


def test_a_run_of_a_script_defined_task_says_to_move_it_into_a_module(plugin, tmp_path, monkeypatch, capsys):
    """A task defined in a script (module __main__) trains there; eval in another process (this one, which never
    saw the script's class) says what to do."""
    script = tmp_path / "script.py"
    script.write_text(PLUGIN.format(name="in_script") + textwrap.dedent(f'''
        from diffusionblocks import load_preset, register, train
        register(Circle)
        cfg = load_preset("tensors")
        cfg.task, cfg.train.steps, cfg.model.depth = "in_script", 3, 3
        train(cfg, {str(tmp_path / "run")!r}, progress=False)
    '''))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert io.load_json(tmp_path / "run" / "config.json")["plugins"][0] == {"module": "__main__",
                                                                          "file": str(script.resolve())}
    monkeypatch.setattr(registry, "_scripts", [])  # what this eval learns about scripts stays in this test
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"defined in the script {script.resolve()}" in err
    assert "move the class into a module" in err and "Traceback" not in err


def test_the_readme_task_of_your_own_runs_as_written(plugin, tmp_path, monkeypatch, capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"Your model in the harness:.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    results = namespace["results"]
    assert results["task"] == "circle" and (tmp_path / "runs" / "circle" / "results.json").exists()
    assert results["denoising_loss"] < 0.2 and "denoising loss" in capsys.readouterr().out
    # the commands beside it: each subcommand takes each flag it is given there (what they do: the tests above)
    commands = re.search(r"name the file with `--plugin`.*?```bash\n(.*?)```", text, re.S).group(1)
    parsers = build_parser()._subparsers._group_actions[0].choices
    for command in re.split(r"\n|&&", commands.replace("\\\n", " ")):
        words = command.split()
        if not words:
            continue
        at = words.index("diffusionblocks") + 1
        flags = {w.split("=")[0] for w in words[at + 1:] if w.startswith("--")}
        assert flags <= set(parsers[words[at]]._option_string_actions), (words[at], flags)


def test_eval_takes_overrides_of_how_it_runs_and_its_figure_does_not_depend_on_the_batch(plugin, tmp_path, capsys):
    name, path = plugin
    run = tmp_path / "run"
    assert main(["train", "--plugin", str(path), "--task", name, "--out", str(run), "--no-progress",
                 "train.steps=4", *SMALL]) == 0
    figures = []
    for batch in (7, 128):
        capsys.readouterr()
        assert main(["eval", str(run), "--json", f"train.eval_batch_size={batch}"]) == 0
        figures.append(json.loads(capsys.readouterr().out)["denoising_loss"])
    assert figures[0] == pytest.approx(figures[1], rel=1e-6)
    assert main(["eval", str(run), "model.depth=3"]) == 2
    assert "cannot change after training" in capsys.readouterr().err


class DigitsMLP(TensorClassifierTask):
    """The issue's researcher: an MLP of their own on digits, classified as DiffusionBlocks and end to end."""

    name = "digits_mlp_test"

    def tensors(self, cfg):
        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 8 - 1, torch.tensor(d.target)
        return {"train": (y[:1500], x[:1500]), "test": (y[1500:], x[1500:])}

    def network(self, cfg, shapes):
        from diffusionblocks.models import VectorHead, VectorStem
        from diffusionblocks.nn import ResidualMLP
        D = cfg.model.width
        return (VectorStem(shapes.target[0], D, cond_dim=shapes.cond[0]),
                [ResidualMLP(D) for _ in range(cfg.model.depth)], VectorHead(D, shapes.target[0]))


@pytest.mark.parametrize("method", ["dblocks", "e2e"])
def test_a_classifier_of_your_own_learns_and_reports_each_blocks_accuracy(plugin, tmp_path, method):
    registry.register(DigitsMLP)
    cfg = apply_overrides(load_preset("tensors"), ["model.width=32", "train.steps=60", "train.batch_size=64",
                                                   f"train.method={method}"])
    cfg.task = DigitsMLP.name
    results = train(cfg, tmp_path / method, progress=False)
    assert results["accuracy"] > 0.6  # chance is 0.1
    assert len(results["accuracy_per_step"]) == (3 if method == "dblocks" else 1)
    assert results["accuracy_per_step"][-1] == results["accuracy"]
    cfg_loaded, model, _ = load_model(tmp_path / method)
    assert isinstance(model, PlainTensorClassifier if method == "e2e" else TensorClassifier)
    assert io.load_json(tmp_path / method / "shapes.json") == {"target": [32], "cond": [64], "num_classes": 10}


def test_a_classifier_takes_class_ids_and_inputs():
    class Floats(DigitsMLP):
        name = "floats"

        def tensors(self, cfg):
            return {"train": (torch.rand(8), torch.rand(8, 2)), "test": (torch.rand(8), torch.rand(8, 2))}

    with pytest.raises(ValueError, match=r"a classifier takes \(y, x\), y the class ids"):
        Floats().load_data(load_preset("tensors"))
