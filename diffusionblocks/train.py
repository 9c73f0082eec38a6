"""The one training loop. It talks to a task (data, batches, evaluation) and a method (which block, one
step, optimizers) and never asks which ones they are; data streams, budget, logging, evaluation and
checkpoints are shared, so comparisons are fair by construction."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from . import io, logs
from .config import RunConfig, save_config
from .data import absolute_data_paths
from .memory import saved_activation_bytes
from .methods import EMA, Method, get_method
from .methods.base import autocast, compile_error, compile_step
from .run import (
    CONFIG,
    JOB,
    METRICS,
    RESULTS,
    STATE,
    WEIGHTS,
    RunLock,
    build_model,
    check_checkpoint,
    check_out,
    clear_leftovers,
    clear_run,
    job_record,
    load_model,
    load_weights,
    place,
    read_config,
    resolve_device,
    save_checkpoint,
    validate,
)
from .tasks import Task, get_task, run_split
from .tasks.base import VALIDATION_SEED

log = logging.getLogger(__name__)


def train(cfg: RunConfig | None, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          data_parallel=None, overwrite: bool = False, tensorboard: bool | None = None) -> dict:
    """Train one run into `out_dir`; with resume=True continue the run saved there. Returns results.

    A new run needs a missing or empty directory, or `overwrite` (the earlier run's files are removed once the new
    run's model is built, before anything of it is written). The directory is locked from before the data is read
    until the run ends, so no other process can train into it meanwhile.
    With train.blocks set (a block-wise method) the run is a per-block job: it trains those blocks only
    and writes job.json for `merge`; with train.parallel=blocks it is one rank of a torchrun (parallel.py).
    `tensorboard` (default: whether $DIFFUSIONBLOCKS_TENSORBOARD is set) also writes metrics.jsonl's scalars as
    TensorBoard events in out_dir/tensorboard. Messages go to the `diffusionblocks` logger (logs.setup)."""
    logs.setup()
    out = Path(out_dir)
    if resume:
        if not (out / STATE).exists():
            raise ValueError(f"cannot resume: {out / STATE} does not exist (was the run started in {out}?)")
        cfg = read_config(out / CONFIG)
    cfg = absolute_data_paths(cfg)  # config.json finds the data from any working directory
    validate(cfg)
    if not resume:
        check_out(out, overwrite)
    previous, threads = torch.get_num_threads(), run_threads(cfg.train.threads)
    torch.set_num_threads(threads)
    check_threads(threads)
    try:
        with RunLock(out):
            if not resume:  # again, now that no other process can write here
                check_out(out, overwrite)
            clear_leftovers(out)
            return Run(cfg, out, data_parallel, logs.tensorboard_wanted(tensorboard)).train(resume, progress)
    finally:
        torch.set_num_threads(previous)


class Run:
    """One training run: the task, its data and model, the method, the data streams and the counters."""

    def __init__(self, cfg: RunConfig, out: Path, data_parallel=None, tensorboard: bool = False):
        # the sessions of the run, each when it started and at which step (a resume adds one): its provenance
        self.sessions = [{"started": logs.utc_now(), "step": 0}]
        self.cfg, self.out, self.tensorboard, self.sink = cfg, out, tensorboard, None
        self.task: Task = get_task(cfg.task)
        self.data = self.task.load_data(cfg)
        self.split = run_split(cfg)  # curves and results: validation when held out, else test
        self.model: nn.Module = build_model(cfg, self.data)
        self.device = resolve_device(cfg.train.device)
        method_cls = get_method(cfg.train.method)
        self.total, self.rule = method_cls.budget(cfg)
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema else None
        self.method: Method = method_cls(self.model, cfg, self.total, device=self.device, ema=self.ema,
                                         offload_dir=cfg.train.offload_dir or out, data_parallel=data_parallel)
        self.data_parallel = data_parallel
        if cfg.train.compile:
            compile_step(self.model)
        member = data_parallel.index if data_parallel is not None else 0
        self.streams = {b: self.task.stream(self.data, cfg, seed, member)
                        for b, seed in self.method.stream_seeds().items()}
        self.job = self.method.partial or bool(cfg.train.blocks.strip())  # leaves job.json for merge
        self.state = {"step": 0, "layer_updates": 0, "train_seconds": 0.0, "skipped": 0, "curve": [],
                      "block_updates": [0] * self.method.num_blocks}
        self.window = {"loss": [], "blocks": {}}  # the steps since the last metrics record (kept across a resume)

    # -- starting and stopping -----------------------------------------------------------------------

    def train(self, resume: bool, progress: bool) -> dict:
        cfg, out, method = self.cfg, self.out, self.method
        if resume:
            self.task.check_run(self.data, out)  # the data it trained on, unchanged
            self.load_checkpoint()
        else:
            if (out / CONFIG).exists() or (out / WEIGHTS).exists():
                log.info(f"{out}: replacing the earlier run in it (--overwrite)")
            clear_run(out, self.task.run_files)
            shutil.rmtree(out / logs.TENSORBOARD_DIR, ignore_errors=True)  # the earlier run's events
            io.atomic_write_text(out / CONFIG, save_config(cfg))
            io.atomic_write_text(out / METRICS, "")
            self.task.save_with_run(self.data, out)
        if self.job:
            self.write_job()
        place(self.model, self.device, method.residency, self.ema)
        n_params = sum(p.numel() for p in self.model.parameters() if p.device.type != "meta")
        log.info(f"{cfg.train.method}: {self.data.describe()}; {n_params:,} parameters; budget: {self.rule}"
                 + (f"; this job: blocks {method.owned}, {self.total} steps" if method.partial else "")
                 + f"; device {self.device}" + (f", residency {method.residency.policy}" if method.residency else ""))
        if self.tensorboard:
            self.sink = logs.TensorBoard.open(out, self.state["step"])
        try:
            self.loop(progress)
            self.checkpoint()
            if self.job:  # a job of every block (torchrun on one process) is also a whole run, evaluated as one
                self.write_job(finished=True)
            return self.finish_job() if method.partial else self.finish()
        finally:  # the offload files go, whatever happened (the checkpoint holds the weights)
            if method.residency is not None:
                method.residency.close()
            if self.sink is not None:
                self.sink.close()

    def write_job(self, finished: bool = False):
        """job.json of a per-block job: what `merge` checks, and whether the job has finished."""
        owned = self.method.owned
        io.save_json(self.out / JOB, job_record(self.cfg, self.model, owned, self.total // len(owned), finished))

    def checkpoint(self):
        positions = {b: st.state_dict() for b, st in self.streams.items()}
        save_checkpoint(self.out, self.model, self.method, self.ema,
                        dict(self.state, streams=positions, window=self.window, sessions=self.sessions), self.cfg)

    def load_checkpoint(self):
        out = self.out
        saved = io.load_torch(out / STATE)
        self.check_state(saved)
        check_checkpoint(out, saved, self.ema is not None)
        load_weights(self.model, out / WEIGHTS, ignore=self.method.unowned_names, cfg=self.cfg)
        self.method.load_state_dict(saved["method"])
        torch.set_rng_state(saved["torch_rng"])
        for b, st in self.streams.items():
            st.load_state_dict(saved["streams"][b])
        if self.ema is not None:
            self.ema.shadow.update(saved["ema"])
        self.state = {k: saved[k] for k in self.state}
        self.window = saved.get("window", self.window)
        # a checkpoint of an earlier version did not record its sessions: when it started is unknown
        earlier = saved.get("sessions") or [{"started": None, "step": 0}]
        self.sessions = [*earlier, {"started": self.sessions[-1]["started"], "step": self.state["step"]}]
        kept = [r for r in io.read_jsonl(out / METRICS, skip_bad=True) if r.get("step", 0) <= self.state["step"]]
        io.atomic_write_text(out / METRICS, "".join(io.json_line(r) for r in kept))
        log.info(f"resuming {out} at step {self.state['step']}/{self.total}")

    def check_state(self, saved):
        """state.pt holds what this run saves, with counters this run can have reached."""
        need = {*self.state, "method", "torch_rng", "streams"}
        if not isinstance(saved, dict) or not need <= set(saved):
            missing = sorted(need - set(saved)) if isinstance(saved, dict) else [f"a {type(saved).__name__}"]
            raise ValueError(f"{self.out / STATE} is not this run's checkpoint (missing {missing[:4]})")
        step, updates = saved["step"], saved["block_updates"]
        if not (isinstance(step, int) and 0 <= step <= self.total):
            raise ValueError(f"{self.out / STATE}: step {step!r} is outside this run's 0..{self.total} steps")
        if not (isinstance(updates, list) and len(updates) == self.method.num_blocks):
            raise ValueError(f"{self.out / STATE}: block_updates {updates!r} does not fit {self.method.num_blocks} "
                             f"block(s)")

    # -- the loop ------------------------------------------------------------------------------------

    def loop(self, progress: bool):
        cfg, state, method = self.cfg, self.state, self.method
        # ten evaluations over the run's layer-updates (steps x depth / B); a per-block job evaluates none
        eval_every = cfg.train.eval_every or max(1, self.total * cfg.model.depth // method.num_blocks // 10)
        bar = logs.Progress(self.total, cfg.train.method + (f" blocks {cfg.train.blocks}" if method.partial else ""),
                            progress, start=state["step"])
        window = self.window
        in_a_row = 0  # consecutive skipped steps
        self.model.train()
        with StopRequest() as stop:
            while state["step"] < self.total:
                if stop.requested:
                    self.checkpoint()
                    log.info(f"stopped by {stop.name} at step {state['step']}/{self.total}; checkpoint saved. "
                             f"Continue with: diffusionblocks train --resume {self.out}")
                    raise Stopped(stop.signum)
                before = state["layer_updates"]
                m = self.step()
                if m.get("skipped"):
                    warnings.warn(f"step {state['step']}: non-finite loss or gradient (loss={m['loss']}); "
                                  f"step skipped, weights unchanged", stacklevel=1)
                    in_a_row += 1
                    if in_a_row >= max(2, cfg.train.log_every):  # a whole logging window: nothing is training
                        raise ValueError(f"the last {in_a_row} steps (to step {state['step']}) were all skipped: "
                                         f"non-finite loss or gradient every time (loss={m['loss']}). Lower "
                                         f"train.lr (now {cfg.train.lr:g}) or look at the data")
                else:
                    in_a_row = 0
                    window["loss"].append(m["loss"])
                    w = window["blocks"].setdefault(m["block"], {"loss": [], "grad_norm": []})
                    w["loss"].append(m["loss"])
                    w["grad_norm"].append(m["grad_norm"])
                if state["step"] % cfg.train.log_every == 0 or state["step"] == self.total:
                    self.log(window, m)
                    window = self.window = {"loss": [], "blocks": {}}
                if not method.partial and state["layer_updates"] // eval_every > before // eval_every \
                        and state["step"] < self.total:
                    self.record_evaluation()
                bar.update(state["step"], m["loss"])
                if state["step"] % cfg.train.ckpt_every == 0:
                    self.checkpoint()

    def step(self) -> dict:
        """One training step on the unit the method picks, with the batch from that unit's stream."""
        state, block = self.state, self.method.next_block()
        stream = self.streams[block]
        raw = next(stream)
        if self.data_parallel is not None:  # every member draws the block's batch and takes its shard
            raw = tuple(self.data_parallel.shard(t) for t in raw)
        t0 = time.perf_counter()
        batch = self.task.prepare(raw, stream, self.cfg, self.data, self.device)
        m = self.train_step(batch, block)
        m.setdefault("block", block)
        if self.ema is not None and not m.get("skipped"):
            self.ema.update(self.model, m["trained"])
        state["train_seconds"] += time.perf_counter() - t0
        state["step"] += 1
        state["layer_updates"] += m["layers"]
        if m.get("skipped"):
            state["skipped"] += 1
        else:
            state["block_updates"][block] += 1
        return m

    def train_step(self, batch, block: int) -> dict:
        """The method's step under train.precision's autocast; a torch.compile failure is a one-line error."""
        with autocast(self.cfg.train.precision, self.device):
            if not self.cfg.train.compile:
                return self.method.step(batch, block)
            try:
                return self.method.step(batch, block)
            except torch._dynamo.exc.TorchDynamoException as e:
                raise compile_error(e) from e

    # -- logging and evaluation ---------------------------------------------------------------------

    def log(self, window: dict, last: dict):
        state, B = self.state, self.method.num_blocks
        record = {"step": state["step"], "layer_updates": state["layer_updates"],
                  "loss": sum(window["loss"]) / max(1, len(window["loss"])), "lr": last.get("lr"),
                  "skipped": state["skipped"], "block_updates": list(state["block_updates"])}
        if B > 1:
            record["blocks"] = {str(b): {"loss": sum(v["loss"]) / len(v["loss"]),
                                         "grad_norm": sum(v["grad_norm"]) / len(v["grad_norm"])}
                                for b, v in sorted(window["blocks"].items())}
            starved = [b for b in range(B) if b not in window["blocks"]]
            if starved and self.method.warn_starved and state["step"] >= 10 * B:
                record["starved_blocks"] = starved
                log.warning(f"block(s) {starved} received no update in the last window of steps")
        self.record(record)

    def record(self, record: dict):
        """A line of metrics.jsonl, and its scalars to TensorBoard when asked for."""
        io.append_jsonl(self.out / METRICS, record)
        if self.sink is not None:
            self.sink.write(record)

    @contextlib.contextmanager
    def all_resident(self):
        residency = self.method.residency
        with residency.all_resident() if residency else contextlib.nullcontext():
            yield

    def evaluate(self, limit: int) -> dict:
        """The task's evaluation with the evaluation weights (the EMA when kept), every block usable."""
        with self.all_resident():
            if self.ema is not None:
                self.ema.swap(self.model)
            try:
                return self.task.evaluate(self.model, self.data, self.cfg, split=self.split, limit=limit,
                                          device=self.device)
            finally:
                if self.ema is not None:
                    self.ema.swap(self.model)

    def record_evaluation(self):
        state, ev = self.state, self.evaluate(self.cfg.train.eval_limit)
        point = {"step": state["step"], "layer_updates": state["layer_updates"], **_metrics(ev)}
        state["curve"].append(point)
        self.record({
            "step": state["step"], "layer_updates": state["layer_updates"],
            **{k if k.startswith("eval_") else f"eval_{k}": v for k, v in _metrics(ev).items()
               if not isinstance(v, list)}, "eval_n": ev["n"], "eval_split": self.split})

    def activation_bytes(self) -> int:
        """Bytes saved for backward by one training step of this method, at the configured batch size."""
        batch = self.task.probe_batch(self.data, self.cfg, self.device)
        eager = torch.compiler.set_stance("force_eager") if self.cfg.train.compile else contextlib.nullcontext()
        with self.all_resident(), autocast(self.cfg.train.precision, self.device), eager:  # what eager saves
            nbytes, _ = saved_activation_bytes(lambda: self.method.probe_loss(batch), list(self.model.parameters()))
        return nbytes

    def finish(self) -> dict:
        cfg, state, method = self.cfg, self.state, self.method
        ev = self.evaluate(0)
        # the curve's last point on the same test subset as the periodic ones, so the curve is comparable
        sub = self.evaluate(cfg.train.eval_limit) if cfg.train.eval_limit else ev
        state["curve"].append({"step": state["step"], "layer_updates": state["layer_updates"], **_metrics(sub)})
        results = {
            "task": cfg.task, "method": cfg.train.method, "num_blocks": method.num_blocks, "depth": cfg.model.depth,
            "data": cfg.data.name, "seed": cfg.train.seed,
            **({"validation": {"size": self.cfg.data.val_size, "seed": VALIDATION_SEED, "held_out_from": "train"}}
               if self.split == "validation" else {}),
            **self.task.results(ev, self.split), "eval_split": self.split,  # a task may say what its validation is
            "steps": state["step"], "layer_updates": state["layer_updates"], "train_seconds": state["train_seconds"],
            "seconds_per_layer_update": state["train_seconds"] / max(1, state["layer_updates"]),
            "skipped_steps": state["skipped"], "block_updates": state["block_updates"],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "activation_bytes_per_step": self.activation_bytes(),
            "curve": state["curve"], "curve_n": sub["n"], "provenance": self.provenance(),
        }
        io.save_json(self.out / RESULTS, results)
        return results

    def finish_job(self) -> dict:
        """A per-block job cannot evaluate (the whole model needs every block): training facts only."""
        cfg, state = self.cfg, self.state
        results = {"method": cfg.train.method, "num_blocks": self.method.num_blocks, "blocks": self.method.owned,
                   "depth": cfg.model.depth, "data": cfg.data.name, "seed": cfg.train.seed, "steps": state["step"],
                   "layer_updates": state["layer_updates"], "train_seconds": state["train_seconds"],
                   "seconds_per_layer_update": state["train_seconds"] / max(1, state["layer_updates"]),
                   "skipped_steps": state["skipped"], "block_updates": state["block_updates"], "per_block_job": True,
                   "note": "a per-block job: merge it with the other blocks' jobs, then evaluate the merged run",
                   "provenance": self.provenance()}
        io.save_json(self.out / RESULTS, results)
        return results

    def provenance(self) -> dict:
        """Version, commit, torch, Python, device, the run's start and end, its resumed sessions, the command."""
        return logs.provenance(self.device, self.sessions[0]["started"], resumed=self.sessions[1:])


def _metrics(ev: dict) -> dict:
    """An evaluation's figures of merit (everything but the item count)."""
    return {k: v for k, v in ev.items() if k != "n"}


def reference_model(cfg: RunConfig, name: str, progress: bool = True) -> nn.Module:
    """The model of a run of `cfg`, trained once and cached in $DIFFUSIONBLOCKS_CACHE/<name> (reference
    networks of sample-quality metrics, e.g. the FD classifier), in eval mode."""
    run = io.cache_dir() / name
    if not (run / RESULTS).exists():
        run.parent.mkdir(parents=True, exist_ok=True)
        with RunLock(run.parent, wait=True):  # a second process waits for the first one's training
            if not (run / RESULTS).exists():
                log.info(f"training the reference model {name} once (cached in {run})")
                train(cfg, run, progress=progress, overwrite=True)  # over an interrupted one, if any
    _, model, _ = load_model(run)
    return model.eval()


class Stopped(KeyboardInterrupt):
    """The loop stopped on a signal after writing its checkpoint; `code` is the exit status, 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what Slurm, Kubernetes and torchrun send) asks the loop to stop at the next step
    boundary, so the checkpoint it writes is consistent; a second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.signum = False, None
        self.previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        log.info(f"{signal.Signals(signum).name}: stopping after this step (a second signal aborts without a "
                 "checkpoint)")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


# -- threads -----------------------------------------------------------------------------------------------

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: a container's CPU quota, "max" or "QUOTA PERIOD"
LOADAVG = Path("/proc/loadavg")  # its 4th field: scheduling entities runnable now / all of them
_warned: set[str] = set()  # the thread warnings this process gave (a compare's arms do not repeat them)
LOAD_RECHECK = 60.0  # seconds: a process's runs started within this of the last load sample are not sampled again
_load_sampled = -math.inf  # when this process last sampled the machine's load (time.monotonic)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (else the machine's count), capped by a cgroup CPU quota
    (a container's --cpus, which the affinity does not show)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on macOS and Windows
        cores = os.cpu_count() or 1
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def run_threads(threads: int) -> int:
    """torch's intra-op threads for train.threads: the setting; for 0, torch's default (OMP_NUM_THREADS when set),
    capped at the usable cores when OMP_NUM_THREADS is not set, because torch counts the cores it sees, which a
    container's quota does not reduce, and threads beyond the cores wait on each other at every op."""
    if threads:
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    return min(torch.get_num_threads(), usable_cores())


def competing_load(samples: int = 4) -> float | None:
    """How many other threads want a CPU: the fewest runnable ones over a few samples 10 ms apart (/proc/loadavg,
    less this thread), else the 1-minute load average; None where neither is known. The count now rather than the
    average, because the average still counts a run that ended a minute ago."""
    try:
        counts = []
        for i in range(samples):
            if i:
                time.sleep(0.01)
            counts.append(int(LOADAVG.read_text().split()[3].split("/")[0]) - 1)
        return float(max(0, min(counts)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def check_threads(threads: int) -> None:
    """A warning with the fix (once per process each) where torch's threads outnumber the cores this process may use,
    or where other processes compete for the machine's cores: either slows every step many times over."""
    cores = usable_cores()
    if threads > cores and "threads" not in _warned:
        _warned.add("threads")
        log.warning(f"torch runs {threads} threads but this process may use {cores} core(s), so the threads wait on "
                    f"each other at every step: set train.threads={cores} (or OMP_NUM_THREADS={cores})")
    global _load_sampled
    if "load" in _warned or time.monotonic() - _load_sampled < LOAD_RECHECK:
        return
    _load_sampled = time.monotonic()
    others, machine = competing_load(), os.cpu_count() or 1
    if others is not None and others + threads > machine:
        _warned.add("load")
        free = int(machine - others)
        fix = (f"set train.threads={free} (or OMP_NUM_THREADS={free})" if free > 0 else
               f"run one job at a time, or give each train.threads=N (or OMP_NUM_THREADS=N), N times the jobs at "
               f"most {machine}")
        log.warning(f"other processes keep {others:g} thread(s) busy on this machine's {machine} core(s), so this "
                    f"run's {threads} thread(s) get a fraction of them and every step slows: {fix}")
