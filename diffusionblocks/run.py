"""Run directories: their file names, the full config check, building and loading a run's model,
checkpoints, the device, and the record a per-block job leaves for `merge`.

A run directory holds config.json (the resolved config), metrics.jsonl, model.safetensors (and
ema.safetensors with an EMA), state.pt (optimizers, RNG, data positions: an exact resume), results.json,
and for a per-block job job.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from . import io
from .config import RunConfig, apply_overrides, config_hash
from .config import validate as validate_values
from .methods import EMA, Method, get_method
from .tasks import Task, get_task
from .version import __version__

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

CONFIG, WEIGHTS, EMA_WEIGHTS, STATE = "config.json", "model.safetensors", "ema.safetensors", "state.pt"
METRICS, RESULTS, JOB = "metrics.jsonl", "results.json", "job.json"
SCORE = "score.json"  # compare's cached test score of a run
MERGE = "merge.json"  # a merged run's record of which job each block came from
WRITER = f"diffusionblocks {__version__}"  # recorded in every weights file's metadata
LOCK = ".lock"  # held while a process trains into the directory
# what a run writes besides Task.run_files; --overwrite removes them first, so no file of the old run survives
RUN_FILES = (CONFIG, WEIGHTS, EMA_WEIGHTS, STATE, METRICS, RESULTS, JOB, SCORE, MERGE)


def make_out(out: Path) -> None:
    """Make the output directory `out` (of a run, a compare, a measurement), or say in one line why nothing can be
    written there."""
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out}: a broken symbolic link (to {os.readlink(out)})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:  # a read-only place, or a file on the way
        raise ValueError(f"--out {out}: cannot create the directory or write in it ({e.strerror or e})") from None


def check_out(out: Path, overwrite: bool) -> None:
    """A new run goes into a missing or empty directory, or over an earlier one with `overwrite`; the directory is
    made here, so a path that cannot hold a run fails before any data is read."""
    make_out(out)
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"--out {out} is not empty ({shown}): give --overwrite to replace the run in it, or "
                         f"--resume {out} to continue it")


def clear_run(out: Path, task_files: tuple[str, ...] = ()) -> None:
    """Remove an earlier run's files (RUN_FILES and its task's `task_files`) from `out`; other files stay."""
    for name in RUN_FILES + tuple(task_files):
        if (out / name).is_dir():
            raise ValueError(f"{out / name} is a folder where the run keeps a file: move it, then run again")
        (out / name).unlink(missing_ok=True)


def clear_leftovers(out: Path) -> None:
    """What a crash left in a run directory: a checkpoint half moved into place is completed, half-written files and
    the offload folders of idle blocks go. Called with the lock held."""
    io.recover(out)
    for folder in out.glob(".offload-*"):
        shutil.rmtree(folder, ignore_errors=True)


class RunLock:
    """An exclusive lock on a run directory (OUT/.lock, an advisory lock the system releases when its process ends,
    so a crashed run never leaves it held); the file names the holder's host and pid for the message. With `wait`,
    a second process waits for the lock instead of failing."""

    def __init__(self, out: Path, wait: bool = False):
        self.path, self.wait, self.fd = Path(out) / LOCK, wait, None

    def __enter__(self):
        if fcntl is None:  # no advisory locks here (Windows): an exclusive create, never taken over
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                raise ValueError(f"{self.path.parent} is in use ({self.path} exists); remove it if no process "
                                 "trains there") from None
        while self.fd is None:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(f"{self.path.parent} is in use: another process trains there ({holder}); wait for "
                                 "it to finish or stop it") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:  # the holder removed the file as it let go: lock the one that is there now
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        return False


def read_config(path: Path) -> RunConfig:
    """A run's config.json, with errors naming the file."""
    try:
        return RunConfig.from_dict(io.load_json(path))
    except ValueError as e:
        raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def validate(cfg: RunConfig) -> RunConfig:
    """The config's values, its task and method names, and what the task and the method accept."""
    validate_values(cfg)
    task, method = get_task(cfg.task), get_method(cfg.train.method)
    if not (task.classifies_images if method.classifier is not None else method.model_form in task.model_forms):
        what = "an image classifier" if method.classifier is not None else f"a {method.model_form} model"
        raise ValueError(f"train.method={method.name} trains {what}, which task {task.name} does not have (it trains "
                         f"{' and '.join(task.model_forms)} models)")
    task.check(cfg)
    method.check(cfg)
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available here (use cpu or auto)")
    return device


def inference_device(cfg: RunConfig, overrides: Sequence[str] = ()) -> torch.device:
    """Where a trained run is evaluated or sampled: train.device when the command line gives it, else the run's own
    device where it exists here (a GPU run read on a laptop falls back), else the CPU."""
    try:
        return resolve_device(cfg.train.device)
    except ValueError:
        if any(o.split("=")[0].strip() == "train.device" for o in overrides):
            raise  # asked for here: say it is missing rather than run elsewhere
        return torch.device("cpu")


# -- models --------------------------------------------------------------------------------------------


def new_model(cfg: RunConfig, shapes) -> nn.Module:
    """The task's model in the form the method trains; `shapes` is the data (or any object with the
    attributes the task reads, e.g. tasks.images.ImageShapes). Uses the global RNG as it stands.
    A model too large for the host's memory is a user error (a setting or a dataset), not a traceback."""
    task, method = get_task(cfg.task), get_method(cfg.train.method)
    try:
        if method.classifier is not None:
            return task.build_classifier(cfg, shapes, method.classifier)
        return task.build_model(cfg, shapes, method.model_form)
    except RuntimeError as e:  # torch's CPU allocator (and CUDA's OutOfMemoryError, a RuntimeError) on failure
        if "can't allocate memory" not in str(e) and not isinstance(e, torch.OutOfMemoryError):
            raise
        wanted = re.search(r"allocate (\d+) bytes", str(e))
        size = f" (one of its tensors needs {int(wanted.group(1)) / 2**30:.1f} GiB)" if wanted else ""
        classes = getattr(shapes, "num_classes", None)
        raise ValueError(
            f"the {cfg.task} model does not fit in memory{size}: check model.width={cfg.model.width}, "
            f"model.depth={cfg.model.depth}" + (f" and the dataset's {classes:,} classes" if classes else "")
        ) from None


def build_model(cfg: RunConfig, data) -> nn.Module:
    """The freshly initialised model of a run (seeded by train.seed)."""
    torch.manual_seed(cfg.train.seed)
    return new_model(cfg, data)


def place(model: nn.Module, device, residency=None, ema: EMA | None = None):
    """Model (and EMA) onto the device; under residency=active only the shared parts and buffers, the
    blocks going straight to their off-device homes."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":  # a per-block job's other blocks: shapes only
                module._buffers[name] = buf.to(device)
    if residency is None or residency.policy == "all":
        for p in model.parameters():
            if p.device.type != "meta":  # a per-block job's other blocks stay shapes only
                p.data = p.data.to(device)
    if ema is not None:  # in place: the residency manager holds this very dict for the blocks' averages
        homed = residency.extra_names() if residency is not None and residency.policy == "active" else set()
        for k, v in ema.shadow.items():
            if k not in homed:  # under residency=active the blocks' averages go with their blocks
                ema.shadow[k] = v.to(device)
    if residency is not None:
        residency.start()


# the model settings that define the function the weights compute (a changed head count keeps every shape)
ARCHITECTURE = ("depth", "width", "heads", "patch", "mlp_ratio", "label_dim", "layer", "noise_scale", "label_head",
                "positions")


def architecture(cfg: RunConfig) -> dict:
    """The config's architecture settings, recorded (as JSON) in every weights file."""
    return {k: getattr(cfg.model, k) for k in ARCHITECTURE}


def load_weights(model: nn.Module, path: Path, ignore: set[str] = frozenset(), strict: bool = True,
                 cfg: RunConfig | None = None):
    """Load a weights file into `model`, with a clear error (naming the version that wrote the file) when
    it does not fit the model, or when it records architecture settings other than `cfg`'s (a config.json edited
    since training). `ignore`: entries the file may lack (blocks of other per-block jobs)."""
    weights, meta = io.load_safetensors(path)
    if cfg is not None and "architecture" in meta:
        saved, now = json.loads(meta["architecture"]), architecture(cfg)
        changed = [f"model.{k}: {saved[k]!r} in the weights, {now[k]!r} in the config" for k in ARCHITECTURE
                   if k in saved and saved[k] != now[k]]
        if changed:
            raise ValueError(f"{path} was trained with other settings than its run's config.json now says ("
                             + "; ".join(changed) + ")")
    own = model.state_dict()
    unexpected, missing = set(weights) - set(own), set(own) - set(weights) - set(ignore)
    wrong = [k for k in set(weights) & set(own) if tuple(weights[k].shape) != tuple(own[k].shape)]
    if unexpected or missing or wrong:
        writer = meta.get("writer", "a diffusionblocks version before 0.2")
        raise ValueError(f"{path} (written by {writer}) does not match the run's config: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, other shapes "
                         f"{sorted(wrong)[:3]}")
    for k, v in weights.items():  # load_state_dict would cast an int64 tensor and keep a NaN without a word
        if v.dtype != own[k].dtype:
            raise ValueError(f"{path}: {k!r} holds {v.dtype} where the model has {own[k].dtype}: not weights this "
                             f"run wrote")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{path}: {k!r} holds NaN or infinite values: the file is damaged or the run diverged")
    model.load_state_dict(weights, strict=strict and not ignore)


FIXED_AFTER_TRAINING = ("model.", "blocks.", "train.method")  # what the weights were trained as: no override


def load_model(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[RunConfig, nn.Module, object]:
    """Rebuild a trained model from a run directory: (config, model, data). The weights are the averaged
    ema.safetensors when the run kept an EMA (the weights its results were measured with). `overrides` (KEY=VALUE)
    change how it runs and is evaluated (train.device, chain.steps_per_block, ...), never what was trained."""
    run = Path(run_dir)
    cfg = run_config(run)
    if overrides:
        fixed = [o for o in overrides if o.split("=")[0].strip().startswith(FIXED_AFTER_TRAINING)]
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: what the weights were trained as (model.*, blocks.*, train.method) "
                             "cannot change after training")
        cfg = validate(apply_overrides(cfg, list(overrides)))
    task = get_task(cfg.task)
    data = task.load_data(cfg)
    task.check_run(data, run)
    return cfg, trained_model(run, cfg, data), data


def run_config(run: Path) -> RunConfig:
    """The validated config of a whole run (not a per-block job) in directory `run`."""
    if not (run / CONFIG).exists() or not (run / WEIGHTS).exists():
        raise ValueError(f"{run} is not a run directory: it needs {CONFIG} and {WEIGHTS}")
    cfg = validate(read_config(run / CONFIG))
    if cfg.train.blocks.strip():
        raise ValueError(f"{run} is a per-block job (blocks {cfg.train.blocks}): merge the jobs of all blocks "
                         f"first (diffusionblocks merge RUN... --out DIR), then evaluate the merged run")
    return cfg


def trained_model(run: Path, cfg: RunConfig, shapes) -> nn.Module:
    """The run's model built from `shapes` (the data, or the shapes it recorded) with its evaluation weights."""
    model = build_model(cfg, shapes)
    load_weights(model, run / (EMA_WEIGHTS if (run / EMA_WEIGHTS).exists() else WEIGHTS), cfg=cfg)
    return model


def load_model_from_shapes(run_dir: str | os.PathLike) -> tuple[RunConfig, nn.Module, object] | None:
    """(config, model, shapes) rebuilt from the shapes the run recorded (shapes.json) without reading its data; None
    for a run from before shapes were recorded (load_model reads the data for them)."""
    run = Path(run_dir)
    cfg = run_config(run)
    shapes = get_task(cfg.task).saved_shapes(run)
    return None if shapes is None else (cfg, trained_model(run, cfg, shapes), shapes)


def evaluate(model: nn.Module, data, cfg: RunConfig, limit: int = 0, device="cpu", **options) -> dict:
    """The task's evaluation of `model` (the test split unless split="validation"; see Task.evaluate)."""
    return get_task(cfg.task).evaluate(model, data, cfg, limit=limit, device=device, **options)


# -- checkpoints -----------------------------------------------------------------------------------------


def model_state(model: nn.Module, method: Method) -> dict:
    """The weights this run holds (a per-block job leaves out the blocks it does not own, under all their names)."""
    return {k: v for k, v in model.state_dict().items() if k not in method.unowned_names}


def save_checkpoint(out: Path, model: nn.Module, method: Method, ema: EMA | None, state: dict,
                    cfg: RunConfig | None = None):
    """Weights (and averaged weights) as safetensors, with the architecture settings of `cfg` in their metadata,
    everything else needed for an exact resume in state.pt: replaced as one (io.write_together), each file naming
    its step, so a resume can tell a whole checkpoint from a torn one (and equal weights give equal bytes)."""
    weights = model_state(model, method)
    meta = {"step": str(state["step"]), "writer": WRITER,
            **({"architecture": json.dumps(architecture(cfg), sort_keys=True)} if cfg else {})}
    files = {WEIGHTS: lambda f: f.write(io.safetensors_bytes(weights, out / WEIGHTS, meta))}
    if ema is not None:  # the evaluation weights: the state dict with parameters replaced by their averages
        # every name of a tied parameter gets its one average, so the file keeps the tie and holds no raw weights
        first: dict[int, str] = {}
        average_of = {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}
        averaged = dict(weights, **{k: ema.shadow[src] for k, src in average_of.items() if k in weights})
        files[EMA_WEIGHTS] = lambda f: f.write(io.safetensors_bytes(averaged, out / EMA_WEIGHTS, meta))
    full = dict(state, method=method.state_dict(), torch_rng=torch.get_rng_state(),
                ema={k: v for k, v in ema.shadow.items() if k in weights} if ema is not None else None)
    files[STATE] = lambda f: torch.save(full, f)
    io.write_together(out, files)


def check_checkpoint(out: Path, state: dict, ema: bool) -> None:
    """The weights files and state.pt of `out` belong to one checkpoint (the same step)."""
    for name in (WEIGHTS, EMA_WEIGHTS) if ema else (WEIGHTS,):
        meta = io.load_safetensors_metadata(out / name)
        if meta.get("step") != str(state["step"]):
            raise ValueError(f"{out}: {name} (step {meta.get('step')}) and {STATE} (step {state['step']}) are from "
                             f"different checkpoints: the checkpoint was torn (a crash or a full disk while an older "
                             f"version wrote it). Start the run again with --overwrite")


def job_record(cfg: RunConfig, model, blocks: list[int], steps_per_block: int, finished: bool = False) -> dict:
    """What `merge` checks: the job's blocks, partition, architecture, data and config hash."""
    part = model.partition
    return {"blocks": blocks, "num_blocks": cfg.blocks.num_blocks, "config_hash": config_hash(cfg),
            "partition": {"kind": part.kind, "gamma": part.gamma, "boundaries": part.boundaries.tolist()},
            "architecture": dict(cfg.model.__dict__, shared_stem_head=cfg.blocks.shared_stem_head,
                                 allocation=[model.block_layers(b) for b in range(model.num_blocks)]),
            "data": dict(cfg.data.__dict__), "steps_per_block": steps_per_block, "finished": finished}


__all__ = ["CONFIG", "EMA_WEIGHTS", "JOB", "METRICS", "RESULTS", "STATE", "WEIGHTS", "Task", "build_model",
           "evaluate", "job_record", "load_model", "load_model_from_shapes", "load_weights", "make_out",
           "new_model", "place", "resolve_device", "save_checkpoint", "validate"]
