"""Memory measurement, one way everywhere (trainers, the `memory` command, benchmarks, tests).

For one training step it reports, in bytes on the compute device:

- params: parameters resident on the device (off-device copies of idle blocks are not counted);
- grads: gradients alive when the optimizer steps;
- optimizer: optimizer state resident on the device (AdamW: two moments per parameter, plus step counters);
- activations: tensors autograd saves for backward, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded;
- peak: the peak of live tensor memory during the step: what was resident when it began (parameters,
  gradients, optimizer state) plus the highest point the allocations of the step reach above that.
  On a CPU the allocations come from the PyTorch profiler's memory events (every allocation and free of
  the CPU allocator, temporaries inside kernels included); on CUDA from torch.cuda.max_memory_allocated,
  also reported as is, with max_memory_reserved.

Measure the steady state: the optimizer state exists from the second step, so `measure_step` runs
`warmup` steps before the one it measures (plan.measure_configuration measures a whole configuration).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def saved_activation_bytes(fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """Run `fn` (a forward pass that builds a graph) and return (bytes saved for backward, fn's result)."""
    counter = SavedTensors(params)
    with counter:
        out = fn()
    return counter.bytes, out


class SavedTensors:
    """Context manager counting the bytes autograd saves inside it: each storage once, parameters not.

    `params` may be a callable returning them, evaluated at the first saved tensor (so parameters
    swapped onto the device inside the context are recognised)."""

    def __init__(self, params: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] = ()):
        self._params, self._param_storages = params, None
        self.seen: set[int] = set()
        self.bytes = 0
        self.count = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._param_storages is None:
            params = self._params() if callable(self._params) else self._params
            self._param_storages = {p.untyped_storage().data_ptr() for p in params}
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and key not in self._param_storages:
            self.seen.add(key)
            self.bytes += storage.nbytes()
            self.count += 1
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def tensor_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages behind `tensors`, skipping storages whose data_ptr is in exclude."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in exclude:
            seen[key] = storage.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [v for opt in optimizers for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]


@dataclass
class StepMemory:
    params: int
    grads: int
    optimizer: int
    activations: int
    peak: int  # peak live tensor bytes during the step (see the module docstring)
    offloaded: int = 0  # bytes of weights and optimizer state held off the device (residency=active)
    saved_tensors: int = 0  # how many distinct storages autograd saved
    cuda_peak_allocated: int | None = None
    cuda_peak_reserved: int | None = None

    @property
    def total(self) -> int:
        """params + grads + optimizer + activations: the four parts the planner predicts."""
        return self.params + self.grads + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return dict(asdict(self), total=self.total)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native library prints start/stop lines on file descriptor 2; hide them."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class AllocationPeak:
    """Highest point that CPU allocations reach inside `measure()`, relative to where they stood when it
    began, from the profiler's memory events. Start the context before the warm-up steps: a tensor
    freed in the measured step must have been allocated while profiling, or its size is unknown."""

    MARK = "diffusionblocks.measured"

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():
            self._prof.__enter__()
        return self

    def measure(self):
        return torch.profiler.record_function(self.MARK)

    def __exit__(self, *exc):
        with _quiet_stderr():
            self._prof.__exit__(*exc)
        events = list(self._prof.profiler.kineto_results.events())
        mark = [e for e in events if e.name() == self.MARK]
        start, end = (mark[-1].start_ns(), mark[-1].end_ns()) if mark else (-math.inf, math.inf)
        memory = sorted((e for e in events if e.name() == "[memory]"
                         and e.device_type() == torch.autograd.DeviceType.CPU and start <= e.start_ns() <= end),
                        key=lambda e: e.start_ns())
        level = self.peak = 0
        for e in memory:
            level += e.nbytes()
            self.peak = max(self.peak, level)
        self.net = level
        return False


def measure_step(step: Callable[[], object], model: torch.nn.Module,
                 optimizers: Callable[[], list[torch.optim.Optimizer]], *, device: torch.device | str = "cpu",
                 offloaded: Callable[[], set[int]] = set, warmup: int = 2) -> StepMemory:
    """Run `step` (one full training step: forward, backward, optimizer) warmup + 1 times and measure
    the last. `optimizers()` lists the optimizers whose state counts, `offloaded()` the storages of
    off-device copies (residency=active), which are not device memory."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    gc.collect()  # earlier garbage must not be freed inside the measurement
    alloc = contextlib.nullcontext() if cuda else AllocationPeak()
    with alloc:
        report = _measure(step, model, optimizers, device, offloaded, warmup, alloc)
    if not cuda:
        report.peak += alloc.peak
    return report


def _measure(step, model, optimizers, device, offloaded, warmup, alloc) -> StepMemory:
    for _ in range(warmup):
        step()
    grads_seen: dict[int, int] = {}

    def before_optimizer_step(opt, args, kwargs):  # gradients are complete and alive here
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads_seen[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()

    def resident(tensors):
        return tensor_bytes((t for t in tensors if t.device.type == device.type), exclude=offloaded())

    start = (resident(model.parameters()) + resident(p.grad for p in model.parameters() if p.grad is not None)
             + resident(optimizer_tensors(optimizers())))
    saved = SavedTensors(lambda: list(model.parameters()))
    handle = register_optimizer_step_pre_hook(before_optimizer_step)
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with saved:
                step()
            torch.cuda.synchronize(device)
            peak = start + torch.cuda.max_memory_allocated(device) - base
        else:
            with alloc.measure(), saved:
                step()
            peak = start  # + the allocations' peak, known when the profiler stops
    finally:
        handle.remove()
    opt_tensors = optimizer_tensors(optimizers())
    report = StepMemory(params=resident(model.parameters()), grads=sum(grads_seen.values()),
                        optimizer=resident(opt_tensors), activations=saved.bytes, peak=peak,
                        offloaded=tensor_bytes(t for t in list(model.parameters()) + opt_tensors
                                               if t.untyped_storage().data_ptr() in offloaded()),
                        saved_tensors=saved.count)
    if cuda:
        report.cuda_peak_allocated = torch.cuda.max_memory_allocated(device)
        report.cuda_peak_reserved = torch.cuda.max_memory_reserved(device)
    return report
