"""Side-by-side comparison on one layer-update budget, for any task: end-to-end, DiffusionBlocks and (where the task
lists it) an end-to-end control with only one block's depth (does stacking the blocks add anything over one of
them?). At matched layer-updates DiffusionBlocks and the control take B times the optimizer steps and samples of
end-to-end (the paper's protocol), so the role "e2e-steps" trains end-to-end for DiffusionBlocks' steps (B times the
layer-updates); each arm's learning rate (and warm-up) may be chosen on a validation split, for each arm on its own,
before the test arms train (sweep). Every arm over the same seeds; the task's headline metric with its spread (one
seed: none, and no winner named); figures of each seed, their mean and spread (against layer-updates and samples
seen), and of the training losses, linked from compare.md; the task's own extras (Task.compare_extras:
classification's accuracy after each inference step, image generation's sampling time and sample grids), which see
each arm with the model form its method trains (tasks.optional.Arm). A role that names another method trains the
task's model with it (the block-wise baselines); a role that names another registered task is that task's end-to-end
model on the same config (same data, size and budget) and must report the same headline: masked diffusion's
autoregressive floor, role "arlm"."""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import sys
from pathlib import Path

from . import io
from .config import RunConfig, save_config
from .data import absolute_data_paths
from .images import pyplot
from .logs import provenance, utc_now
from .methods import METHODS, get_method
from .run import (
    CONFIG,
    METRICS,
    RESULTS,
    SCORE,
    STATE,
    WEIGHTS,
    inference_device,
    load_model,
    make_out,
    read_config,
    resolve_device,
    validate,
)
from .tasks import TASKS, Task, get_task
from .tasks.optional import Arm
from .train import reference_model, train

ROLES = ("e2e", "e2e-steps", "control", "dblocks")  # and any other method's name (METHODS), and another task's
LABELS = {"e2e": "end-to-end", "e2e-steps": "end-to-end, DiffusionBlocks' steps",
          "control": "end-to-end, one block's depth", "dblocks": "DiffusionBlocks"}


# the tasks' metrics in words, for the report's tables, verdicts and figures (any other key: its underscores as spaces)
METRIC_WORDS = {"accuracy": "accuracy", "next_token_accuracy": "next-token accuracy", "bpc": "bits per character",
                "fd_classifier_features": "Frechet distance in a classifier's features (FD)",
                "eval_loss": "denoising loss"}


def metric_words(key: str) -> str:
    """A results key in words: test_bpc -> "test bits per character"."""
    for prefix, said in (("test_", "test "), ("val_", "validation ")):
        if key.startswith(prefix):
            return said + metric_words(key[len(prefix):])
    return METRIC_WORDS.get(key, key.replace("_", " "))


def role_config(base: RunConfig, role: str, seed: int) -> RunConfig:
    """The config of one arm. All arms but e2e-steps get the same layer-update budget (base.train.steps end-to-end
    steps of base.model.depth layers); e2e-steps trains end to end for the dblocks arm's optimizer steps (so it sees
    its samples too), B times that budget."""
    cfg = copy.deepcopy(base)
    cfg.train.seed = seed
    cfg.train.budget = "layer-updates"
    B = base.blocks.num_blocks
    if role == "e2e-steps":  # the full depth end to end, one step per DiffusionBlocks step
        cfg.train.method = "e2e"
        cfg.train.budget = "steps"
        cfg.train.steps = get_method("dblocks").budget(role_config(base, "dblocks", seed))[0]
    elif role == "control":  # one block's depth, trained end to end, B times as many steps
        if base.model.depth % B:
            raise ValueError(f"the control needs model.depth={base.model.depth} divisible by num_blocks={B}")
        cfg.train.method = "e2e"
        cfg.model.depth = base.model.depth // B
        cfg.train.steps = base.train.steps * B
    elif role in METHODS:  # e2e, dblocks, or a block-wise baseline, on the same model and budget
        cfg.train.method = role
    elif role in TASKS:  # another task's model of the same size on the same data, end to end
        cfg.task = role
        cfg.train.method = "e2e"
    else:
        raise ValueError(f"unknown role {role!r}")
    return get_task(base.task).arm_config(cfg, get_method(cfg.train.method).model_form)


# train.* settings that change where and how fast an arm runs, or how often it logs and checkpoints, never what it
# trains: a finished arm run under other values of these is reused, an interrupted one resumed
RUNTIME = ("threads", "device", "offload_dir", "log_every", "ckpt_every")


def changed(old: RunConfig, new: RunConfig) -> list[str]:
    """The settings, RUNTIME ones aside, in which `new` differs from `old`, as "key: old -> new"."""
    a, b = old.to_dict(), new.to_dict()
    return [f"task: {a['task']} -> {b['task']}"] * (a["task"] != b["task"]) + [
        f"{s}.{k}: {a[s][k]!r} -> {v!r}" for s in b if s != "task" for k, v in b[s].items()
        if a[s][k] != v and not (s == "train" and k in RUNTIME)]


def arm_action(cfg: RunConfig, out: Path, overwrite: bool = False) -> str:
    """What compare does with the arm in `out`: "reuse" a finished run of cfg's settings, "resume" an interrupted one,
    else "train" it afresh. A run of other settings that holds weights or results is replaced only with `overwrite`."""
    if (out / CONFIG).exists():
        diff = changed(read_config(out / CONFIG), cfg)
        if not diff:
            return "reuse" if (out / RESULTS).exists() else "resume" if (out / STATE).exists() else "train"
    else:
        diff = [f"no {CONFIG}"]
    if overwrite or not any((out / f).exists() for f in (RESULTS, STATE, WEIGHTS)):
        return "train"
    shown = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
    raise ValueError(f"{out} holds an arm trained with other settings ({shown}): give --overwrite to retrain it, "
                     f"or another --out")


def run_arm(cfg: RunConfig, out: Path, progress: bool, overwrite: bool = False) -> dict:
    """Train one arm, reusing a finished run and resuming an interrupted one in the same directory."""
    action = arm_action(cfg, out, overwrite)
    if action == "reuse":
        print(f"reusing finished run {out}", file=sys.stderr)
        return io.load_json(out / RESULTS)
    if action == "resume" and read_config(out / CONFIG).to_dict() != cfg.to_dict():
        io.atomic_write_text(out / CONFIG, save_config(cfg))  # this call's RUNTIME settings for the rest of the run
    if action == "train" and (out / CONFIG).exists():
        print(f"{out} holds no finished run of these settings; starting it afresh", file=sys.stderr)
    return train(None if action == "resume" else cfg, out, resume=action == "resume", progress=progress,
                 overwrite=True)


def with_settings(base: RunConfig, settings: dict[str, float]) -> RunConfig:
    """`base` with train.KEY = value for each of `settings` (e.g. {"lr": 1e-3}: an arm's chosen learning rate)."""
    cfg = copy.deepcopy(base)
    for k, v in settings.items():
        setattr(cfg.train, k, v)
    return cfg


def train_arms(base: RunConfig, out: Path, seeds: list[int], roles, progress: bool, overwrite: bool = False,
               settings: dict[str, dict] | None = None) -> dict[str, list[dict]]:
    """Every arm for every seed into out/ROLE-seedS (finished arms reused, interrupted ones resumed), each role with
    its own train.* `settings` where given (its learning rate chosen on validation); a stale arm (see arm_action) is
    refused before any arm trains."""
    settings = settings or {}
    arms = {(role, seed): role_config(with_settings(base, settings.get(role, {})), role, seed)
            for seed in seeds for role in roles}
    for (role, seed), cfg in arms.items():
        arm_action(cfg, out / f"{role}-seed{seed}", overwrite)
    make_out(out)  # after every check: a refused compare leaves nothing behind
    io.atomic_write_text(out / "base_config.json", save_config(base))
    runs: dict[str, list[dict]] = {}
    for k, ((role, seed), cfg) in enumerate(arms.items(), 1):
        print(f"== {role} (seed {seed}; arm run {k} of {len(arms)}) ==", file=sys.stderr)
        runs.setdefault(role, []).append(run_arm(cfg, out / f"{role}-seed{seed}", progress, overwrite))
    return runs


def headline_key(task: Task, split: str = "test") -> str:
    """The key compare reports: <prefix>_<metric> of results.json (test_, or val_ for the validation split) where
    training's evaluation measures the headline, else the metric itself, scored after training (Task.curve_metric)."""
    prefix = "val_" if split == "validation" else "test_"
    return f"{prefix}{task.metric}" if task.curve_metric in (None, task.metric) else task.metric


def headline(task: Task, run: Path, results: dict, progress: bool, split: str = "test") -> tuple[float, dict | None]:
    """The task's headline metric of a finished run on `split`: from results.json when training measured it there,
    else the task's score on that split (cached in run/score.json, recomputed when the config or the split changed)."""
    key = headline_key(task, split)
    if key != task.metric and key in results:
        return results[key], None
    cached = run / SCORE
    cfg = io.load_json(run / CONFIG)
    if cached.exists():
        score = io.load_json(cached)
        if score.get("config") == cfg and score.get("split", "test") == split:
            return score[task.metric], score
    cfg_m, model, data = load_model(run)
    device = inference_device(cfg_m)
    score = task.score(model.to(device), data, cfg_m, split=split, device=device, progress=progress,
                       reference=reference_model)
    io.save_json(cached, dict(score, config=cfg, split=split))
    return score[task.metric], score


# -- settings chosen on validation (compare --tune-lr, --tune-warmup) ---------------------------------------------

TUNE_DIR = "tune"  # in a compare's directory: the sweep's runs, ROLE-lrX[-warmupW]-seedS
TUNABLE = ("lr", "warmup")  # the train.* settings a sweep may choose, in the order they name a run
FAILED = "failed.json"  # in a sweep run's directory: why the loop stopped it (a diverged candidate), reused as a result
DIVERGED = "non-finite loss or gradient"  # in the loop's error when a whole logging window of steps was skipped


def tuned(tune: dict[str, list[float]]) -> list[str]:
    """The settings `tune` chooses (a TUNABLE key -> its candidate values; a key left out or empty keeps the base's)."""
    return [k for k in TUNABLE if tune.get(k)]


def candidates(tune: dict[str, list[float]]) -> list[dict[str, float]]:
    """Every combination of the candidate values in `tune`, in the order given."""
    keys = tuned(tune)
    return [dict(zip(keys, values)) for values in itertools.product(*(tune[k] for k in keys))]


def sweep_name(role: str, setting: dict[str, float], seed: int) -> str:
    return "-".join([role, *(f"{k}{v:g}" for k, v in setting.items()), f"seed{seed}"])


def validation_size(base: RunConfig, task: Task) -> tuple[int, str]:
    """The validation split the sweep trains beside and chooses on, and where its size came from: data.val_size when
    given, else the task's own (Comparison.sweep_validation)."""
    if base.data.val_size:
        return base.data.val_size, "data.val_size, held out by the test arms too"
    return task.sweep_validation(base)


def sweep_configs(base: RunConfig, roles, tune: dict, seeds: list[int], val_size: int) -> dict[tuple, RunConfig]:
    """(role, candidate's index, seed) -> the config of that sweep run: the arm's config with the candidate's settings,
    trained on the training split less `val_size` held-out items, evaluated on those alone."""
    held = copy.deepcopy(base)
    held.data.val_size = val_size
    return {(role, i, seed): validate(role_config(with_settings(held, setting), role, seed))
            for role in roles for i, setting in enumerate(candidates(tune)) for seed in seeds}


def sweep_run(cfg: RunConfig, out: Path, progress: bool, overwrite: bool) -> dict:
    """One run of the sweep: its results, or {"failed": why} where the loop stopped it (every step of a logging window
    non-finite: the candidate diverged). A failure is kept in out/failed.json and reused as a finished run is."""
    marker = out / FAILED
    if marker.exists() and (out / CONFIG).exists() and not (out / RESULTS).exists() \
            and not changed(read_config(out / CONFIG), cfg):
        print(f"reusing failed run {out}", file=sys.stderr)
        return io.load_json(marker)
    marker.unlink(missing_ok=True)
    try:
        return run_arm(cfg, out, progress, overwrite)
    except ValueError as e:
        if DIVERGED not in str(e):  # anything else (missing data, a bad setting) stops the compare, kept nowhere
            raise
        print(f"{out}: {e}", file=sys.stderr)  # a diverged candidate is a result of the sweep
        record = {"failed": str(e)}
        io.save_json(marker, record)
        return record


def choose(task: Task, tune: dict, seeds: list[int], values: dict[tuple[int, int], float | str]) -> dict:
    """One arm's sweep summarised: each candidate's validation value per seed (the failure's message for a failed run)
    and their mean; the chosen candidate has the best mean among those whose every seed finished with a finite value
    (a tie goes to the earlier candidate)."""
    rows = []
    for i, setting in enumerate(candidates(tune)):
        each = [values[i, seed] for seed in seeds]
        ok = all(isinstance(v, float) and math.isfinite(v) for v in each)
        rows.append({**setting, "values": [v if isinstance(v, float) else None for v in each],
                     "mean": statistics.mean(each) if ok else None,
                     **({"failed": {str(s): v for s, v in zip(seeds, each) if isinstance(v, str)}}
                        if any(isinstance(v, str) for v in each) else {})})
    finished = [r for r in rows if r["mean"] is not None]
    if not finished:
        why = "; ".join(f"{r.get('failed') or r['values']}" for r in rows)
        raise ValueError(f"no candidate of the sweep finished with a finite validation value on every seed: {why}")
    best = (max if task.higher_is_better else min)(finished, key=lambda r: r["mean"])  # the first of equal means
    return {"chosen": {k: best[k] for k in tuned(tune)}, "candidates": rows}


def sweep(task: Task, configs: dict[tuple, RunConfig], out: Path, roles, tune: dict, seeds: list[int],
          progress: bool, overwrite: bool) -> dict[str, dict]:
    """Train (or reuse) every sweep run into out/TUNE_DIR and choose each arm's settings on its validation value
    (headline(split="validation")); the test split is never read."""
    settings = candidates(tune)
    values = {}
    for n, ((role, i, seed), cfg) in enumerate(configs.items(), 1):
        run = out / TUNE_DIR / sweep_name(role, settings[i], seed)
        print(f"== sweep: {role}, {', '.join(f'{k}={v:g}' for k, v in settings[i].items())} (seed {seed}; "
              f"sweep run {n} of {len(configs)}) ==", file=sys.stderr)
        results = sweep_run(cfg, run, progress, overwrite)
        values[role, i, seed] = results["failed"] if "failed" in results else \
            float(headline(task, run, results, progress, split="validation")[0])
    return {role: choose(task, tune, seeds, {(i, s): v for (r, i, s), v in values.items() if r == role})
            for role in roles}


def check_tuned_arms(base: RunConfig, out: Path, seeds: list[int], roles, tune: dict, overwrite: bool) -> None:
    """Refuse, before the sweep trains, a test arm that holds a run no candidate's settings would reuse (arm_action),
    so that a stale arm is found before the sweep's time is spent."""
    for role in roles:
        for seed in seeds:
            errors = []
            for setting in candidates(tune):
                try:
                    arm_action(role_config(with_settings(base, setting), role, seed), out / f"{role}-seed{seed}",
                               overwrite)
                    break
                except ValueError as e:
                    errors.append(e)
            else:
                raise errors[0]


def sweep_table(task: Task, tuning: dict) -> str:
    """compare.md's record of the sweep: each arm, candidate and seed's validation value, their mean, the choice."""
    scale = 100 if task.percent else 1
    keys, seeds = tuning["settings"], tuning["seeds"]
    show = lambda v: "failed" if v is None else f"{scale * v:.2f}" if scale != 1 else f"{v:.4g}"
    lines = [f"| arm | {' | '.join(keys)} | {' | '.join(f'seed {s}' for s in seeds)} | mean | chosen |",
             "|---|" + "---|" * (len(keys) + len(seeds) + 2)]
    for role, arm in tuning["arms"].items():
        for c in arm["candidates"]:
            chosen = all(c[k] == arm["chosen"][k] for k in keys)
            lines.append(f"| {role} | {' | '.join(f'{c[k]:g}' for k in keys)} | "
                         f"{' | '.join(show(v) for v in c['values'])} | "
                         f"{show(c['mean']) if c['mean'] is not None else 'out'} | {'**yes**' if chosen else ''} |")
    failed = [f"{role} {', '.join(f'{k}={c[k]:g}' for k in keys)} seed {s}: {why}"
              for role, arm in tuning["arms"].items() for c in arm["candidates"]
              for s, why in c.get("failed", {}).items()]
    return "\n".join(lines) + "\n" + "".join(f"\n- failed: {f}" for f in failed) + ("\n" if failed else "")


# -- the initial plateau ------------------------------------------------------------------------------------------

PLATEAU_POINTS = 0.02  # a headline in percent leaves the plateau by more than 2 points over the first evaluation
PLATEAU_RELATIVE = 0.02  # any other curve by more than 2% of the first evaluation's value


def left_plateau(curve: list[dict], key: str, task: Task) -> dict | None:
    """The first evaluation after the first whose `key` beats the first evaluation's by more than the margin
    (PLATEAU_POINTS for the headline in percent, else PLATEAU_RELATIVE of the first value), as {"step",
    "layer_updates"}; {} for a curve that never does, None for one of under two evaluations."""
    points = [p for p in curve if key in p and math.isfinite(p[key])]
    if len(points) < 2:
        return None
    first = points[0][key]
    margin = PLATEAU_POINTS if task.percent and key == task.metric else PLATEAU_RELATIVE * abs(first)
    for p in points[1:]:
        if (p[key] - first if task.higher_is_better else first - p[key]) > margin:
            return {"step": p["step"], "layer_updates": p["layer_updates"]}
    return {}


def plateau_said(task: Task) -> str:
    key = task.curve_metric or task.metric
    margin = (f"{100 * PLATEAU_POINTS:g} points" if task.percent and key == task.metric
              else f"{100 * PLATEAU_RELATIVE:g}% of the first evaluation's value")
    return (f"Left the initial plateau: the first evaluation during training whose {metric_words(key)} "
            f"{'exceeds' if task.higher_is_better else 'falls below'} the first evaluation's by more than {margin} "
            "(its step; samples seen = steps x batch size). The first evaluation comes after a tenth of the run "
            "(train.eval_every unset), so an arm already off the plateau by then shows its second evaluation; "
            "\"not within the run\": no evaluation did; \"-\": under two evaluations.")


def budget_table(rows: dict, task: Task) -> str:
    """compare.md's budgets: each arm's learning rate, steps, samples seen and layer-updates, and per seed the step
    at which it left the initial plateau (left_plateau)."""
    lines = ["| arm | lr | steps | samples seen | layer-updates | left the initial plateau at step (per seed) |",
             "|---|---|---|---|---|---|"]
    for role, r in rows.items():
        each = ", ".join("-" if p is None else "not within the run" if not p else f"{p['step']}"
                         for p in r["left_plateau"])
        lines.append(f"| {role} | {r['lr']:g} | {r['steps']} | {r['samples_seen']:,} | {r['layer_updates']:,} | "
                     f"{each} |")
    return "\n".join(lines) + "\n\n" + plateau_said(task) + "\n"


def _spread(values: list[float], scale: float) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}" if scale != 1 else f"{values[0]:.4g}"
    mean, std = scale * statistics.mean(values), scale * statistics.stdev(values)
    return f"{mean:.2f} ± {std:.2f}" if scale != 1 else f"{mean:.4g} ± {std:.2g}"


def summarize(runs: dict[str, list[dict]], key: str) -> dict:
    """Per arm: the headline values over seeds (key, key_mean, key_std: None from one seed) and the training
    facts."""
    rows = {}
    for role, results in runs.items():
        values = [r[key] for r in results]
        rows[role] = {
            "method": results[0]["method"], "depth": results[0]["depth"], "num_blocks": results[0]["num_blocks"],
            "seeds": [r["seed"] for r in results],
            key: values, f"{key}_mean": statistics.mean(values),
            f"{key}_std": statistics.stdev(values) if len(values) > 1 else None,  # one seed has no spread
            "steps": results[0]["steps"], "layer_updates": results[0]["layer_updates"],
            "train_seconds": statistics.median(r["train_seconds"] for r in results),
            "seconds_per_layer_update": statistics.median(r["seconds_per_layer_update"] for r in results),
            "activation_bytes_per_step": results[0]["activation_bytes_per_step"],
            "parameters": results[0]["parameters"],
        }
    return rows


def markdown_table(rows: dict, key: str, label: str, scale: float) -> str:
    """The report's table: the headline as mean ± standard deviation over seeds and each seed's value; from one seed
    the value alone, its column marked n=1."""
    seeds = max(len(r[key]) for r in rows.values()) > 1  # then each seed's value too, in the seeds' order
    label += "" if seeds else ", one seed (n=1)"
    lines = [f"| arm | method | layers | {label} |{' per seed |' if seeds else ''} steps | layer-updates | train s | "
             f"ms / layer-update | activations / step (MB) |", "|---|---|---|---|" + "---|" * (5 + seeds)]
    for role, r in rows.items():
        each = ", ".join(_spread([v], scale) for v in r[key])
        lines.append(f"| {role} | {r['method']}{' B=' + str(r['num_blocks']) if r['num_blocks'] > 1 else ''} | "
                     f"{r['depth']} | {_spread(r[key], scale)} |{f' {each} |' if seeds else ''} {r['steps']} | "
                     f"{r['layer_updates']} | {r['train_seconds']:.1f} | {1000 * r['seconds_per_layer_update']:.3f} | "
                     f"{r['activation_bytes_per_step'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def seeds_separate(a: list[float], b: list[float]) -> bool | None:
    """Do the seeds separate values a and b? True when their means differ by more than two standard errors of the
    difference, sqrt(s_a^2 / n_a + s_b^2 / n_b); None with one seed in either (no spread to judge by)."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.stdev(a) ** 2 / len(a) + statistics.stdev(b) ** 2 / len(b))
    return abs(statistics.mean(a) - statistics.mean(b)) > 2 * se  # equal means are never separated


def separated(rows: dict, key: str, a: str, b: str) -> bool | None:
    """Do the seeds separate arms a and b of summarize's rows (seeds_separate on their values)?"""
    return seeds_separate(rows[a][key], rows[b][key])


NO_WINNER = "one seed names no winner: no spread to judge the difference by (run --seeds 0,1,2)"


def verdict(rows: dict, key: str, task: Task) -> list[str]:
    """Plain sentences on what the numbers say, whichever way they fall; a difference the seeds do not separate
    (under two standard errors of it) is called a tie, whichever mean is higher, and one seed names no winner."""
    unit, scale = (" points", 100) if task.percent else ("", 1)
    mean = {role: r[f"{key}_mean"] for role, r in rows.items()}
    better = lambda a, b: (a > b) if task.higher_is_better else (a < b)
    diff = lambda a, b: f"{scale * (mean[a] - mean[b]):+.2f}{unit}"

    def judge(a: str, b: str, if_better: str, if_not: str) -> str:
        sep = separated(rows, key, a, b)
        if sep is None:
            return NO_WINNER
        n = min(len(rows[a][key]), len(rows[b][key]))
        if not sep:
            return f"a tie at {n} seeds: the difference is under two standard errors of it"
        return if_better if better(mean[a], mean[b]) else if_not

    out = []
    if "e2e" in mean and "dblocks" in mean:
        paper = f" ({task.paper_gap})" if task.paper_gap else ""
        out.append(f"dblocks - e2e = {diff('dblocks', 'e2e')}{paper}; {metric_words(key)}, "
                   f"{'higher' if task.higher_is_better else 'lower'} is better: " + judge(
                       "dblocks", "e2e", "DiffusionBlocks beat end-to-end", "end-to-end beat DiffusionBlocks"))
        if not task.percent and mean["e2e"]:
            out.append(f"{metric_words(key)}, dblocks / e2e = {mean['dblocks'] / mean['e2e']:.2f}")
    for a, b, won, lost in (  # e2e-steps: the same optimizer steps and samples as dblocks, B x the layer-updates
            ("dblocks", "e2e-steps", "DiffusionBlocks beat end-to-end trained for its steps",
             "end-to-end trained for DiffusionBlocks' steps beat DiffusionBlocks"),
            ("e2e-steps", "e2e", "end-to-end gained from DiffusionBlocks' B times the steps",
             "end-to-end lost with B times the steps"),
            ("e2e", "control", "depth helped end-to-end training at this budget",
             "depth did NOT help end-to-end training at this budget"),
            ("dblocks", "control", "the stacked blocks beat one block's depth",
             "the blocks added nothing over one block's depth trained end to end")):
        if a in mean and b in mean:
            out.append(f"{a} - {b} = {diff(a, b)}: " + judge(a, b, won, lost))
    for role in (r for r in mean if r in METHODS and r not in ROLES):  # a baseline against DiffusionBlocks
        if "dblocks" in mean:
            out.append(f"{role} - dblocks = {diff(role, 'dblocks')}: " + judge(
                role, "dblocks", f"{role} beat DiffusionBlocks", f"DiffusionBlocks beat {role}"))
    return out


def arm_label(role: str, arm: Arm) -> str:
    """An arm in words: the paper's names for compare's own roles, a baseline by its method's title, another task's
    arm by its task."""
    label = LABELS.get(role) or (get_method(role).title or role if role in METHODS else f"{role}, end-to-end")
    return label + (f" (B={arm.runs[0]['num_blocks']})" if arm.form == "blocks" else "")


def _seeds_and_mean(ax, series: list[dict[float, float]], color, label: str) -> None:
    """One {x: y} per seed: each seed a thin line, their mean a bold one, mean ± one standard deviation a band
    (with two seeds or more), over the x every seed has."""
    common = sorted(set.intersection(*(set(s) for s in series)))
    many = len(series) > 1
    for s in series if many else ():
        xs = sorted(s)
        ax.plot(xs, [s[x] for x in xs], color=color, linewidth=0.7, alpha=0.4)
    mean = [statistics.mean(s[x] for s in series) for x in common]
    ax.plot(common, mean, color=color, linewidth=2 if many else 1.5, marker="o", markersize=2.5, label=label)
    if many:
        std = [statistics.stdev(s[x] for s in series) for x in common]
        ax.fill_between(common, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], color=color,
                        alpha=0.15, linewidth=0)


def _seeds_said(n: int) -> str:
    return ("thin lines: each seed; bold: their mean; band: mean ± one standard deviation" if n > 1
            else "one seed: no spread to show")


def plot(arms: dict[str, Arm], task: Task, path: Path) -> bool:
    """The task's curve metric for every arm, vs layer-updates and, where every arm knows its batch size, in a second
    panel vs samples seen (steps x batch size): each seed, their mean and its spread. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    key = task.curve_metric or task.metric
    scale = 100 if task.percent and key == task.metric else 1
    samples = all(arm.batch_size for arm in arms.values())
    fig, axes = plt.subplots(1, 2 if samples else 1, figsize=(12.5 if samples else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (role, arm) in enumerate(arms.items()):
        series = [{p["layer_updates"]: scale * p[key] for p in r["curve"] if key in p} for r in arm.runs]
        _seeds_and_mean(ax, series, colors[i % len(colors)], arm_label(role, arm))
        if samples:  # the same points against the samples each arm has seen
            seen = [{p["step"] * arm.batch_size: scale * p[key] for p in r["curve"] if key in p} for r in arm.runs]
            _seeds_and_mean(axes[0, 1], seen, colors[i % len(colors)], arm_label(role, arm))
    first = next(iter(arms.values())).runs
    split, n = first[0].get("eval_split", "test"), first[0].get("curve_n", "?")
    ylabel = f"{split} {metric_words(key)}" + (" (%)" if scale == 100 else "")
    ax.set_xlabel("training budget spent: layer-updates (layers updated, summed over steps)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{metric_words(key).capitalize()} during training, on the first {n} {split} items\n"
                 f"{_seeds_said(len(first))}", fontsize=9)
    ax.legend(fontsize=8)
    if samples:
        right = axes[0, 1]
        right.set_xlabel("samples seen (optimizer steps x batch size)")
        right.set_ylabel(ylabel)
        right.set_title("The same against samples seen: at matched layer-updates, DiffusionBlocks\nand the "
                        "control take B times the steps (and samples) of end-to-end", fontsize=9)
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def training_losses(run: Path) -> dict[str, dict[float, float]]:
    """The training loss a run logged (metrics.jsonl), vs layer-updates: {"all": ...} for a run of one block, one
    series per block ("block 0", ...) for a block-wise run; {} when it logged none."""
    if not (run / METRICS).exists():
        return {}
    series: dict[str, dict[float, float]] = {}
    for r in io.read_jsonl(run / METRICS, skip_bad=True):
        if "loss" not in r:  # an evaluation's record
            continue
        for name, loss in ({f"block {b}": v["loss"] for b, v in r["blocks"].items()} if "blocks" in r
                           else {"all": r["loss"]}).items():
            series.setdefault(name, {})[r["layer_updates"]] = loss
    return series


def plot_losses(arms: dict[str, Arm], runs: dict[str, list[Path]], path: Path) -> bool:
    """Every arm's training loss vs layer-updates in a panel of its own (each method's own objective, so the panels
    do not share a scale): end to end one curve, block-wise one per block; each seed, their mean and its spread.
    False without matplotlib or without any logged loss."""
    losses = {role: [training_losses(run) for run in runs[role]] for role in arms}
    losses = {role: per_seed for role, per_seed in losses.items() if per_seed and all(per_seed)}
    if not losses:
        return False
    plt = pyplot()
    if plt is None:
        return False
    cols = min(3, len(losses))
    rows = math.ceil(len(losses) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (ax, (role, per_seed)) in enumerate(zip(axes.flat, losses.items())):
        names = sorted(set.intersection(*(set(s) for s in per_seed)), key=lambda n: (len(n), n))
        for k, name in enumerate(names):
            blocks = plt.get_cmap("viridis")(0.85 * k / max(1, len(names) - 1))  # short of its pale yellow end
            color = colors[i % len(colors)] if name == "all" else blocks
            _seeds_and_mean(ax, [s[name] for s in per_seed], color, "training loss" if name == "all" else name)
        values = [v for s in per_seed for name in names for v in s[name].values()]
        if min(values) > 0 and max(values) / min(values) > 20:  # a loss that falls by orders of magnitude
            ax.set_yscale("log")
        ax.set_title(arm_label(role, arms[role]), fontsize=9)
        ax.set_xlabel("layer-updates", fontsize=8)
        ax.set_ylabel("training loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
        if max(len(s[name]) for s in per_seed for name in names) < 2:  # a lone dot needs saying why
            ax.text(0.5, 0.1, "one logged point: a lower train.log_every draws a curve", transform=ax.transAxes,
                    ha="center", fontsize=7)
    for ax in list(axes.flat)[len(losses):]:
        ax.set_visible(False)
    seeds = len(next(iter(losses.values())))
    fig.suptitle("Training loss of each arm (its method's own objective, mean over each logging window; block-wise "
                 f"arms: each block's)\n{_seeds_said(seeds)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare(base: RunConfig, out_dir: str | Path, seeds: list[int], roles=None, progress: bool = True,
            overwrite: bool = False, tune: dict[str, list[float]] | None = None,
            tune_seeds: list[int] | None = None) -> dict:
    """Train (or reuse) every arm over `seeds` into `out_dir` and report; `overwrite` retrains arms whose settings
    changed (without it they are refused). With `tune` (train.lr and/or train.warmup -> candidate values) each arm
    first trains every candidate over `tune_seeds` (two at least) on the training data less a validation split, and
    its test arms then train with the candidate of the best mean validation headline (the sweep reads no test
    item)."""
    base, out = absolute_data_paths(base), Path(out_dir)
    started = utc_now()
    task = get_task(base.task)
    roles = roles or task.compare_roles
    tune = {k: v for k, v in (tune or {}).items() if v}
    tune_seeds = list(tune_seeds if tune_seeds is not None else (0, 1))
    unknown = sorted(set(tune) - set(TUNABLE))
    if unknown:
        raise ValueError(f"cannot choose {', '.join(unknown)} on validation: expected {' or '.join(TUNABLE)}")
    for what, items in (("seed", seeds), ("arm", roles), ("tune seed", tune_seeds),
                        *((f"candidate {k}", v) for k, v in tune.items())):
        twice = sorted({str(x) for x in items if list(items).count(x) > 1})
        if twice:
            raise ValueError(f"{what} {', '.join(twice)} given twice: each {what} runs once (a duplicate would count "
                             f"one run twice in the spread)")
    if tune and len(tune_seeds) < 2:
        raise ValueError(f"--tune-seeds {','.join(map(str, tune_seeds))}: choosing on validation needs two seeds at "
                         "least (one seed cannot tell a better setting from a lucky one), e.g. 0,1")
    key = headline_key(task)  # scored on the test split: compare reports settings chosen before
    configs = {}
    for role in roles:
        if role not in ROLES and role not in METHODS and role not in TASKS:
            raise ValueError(f"unknown arm {role!r}: expected a method ({', '.join(METHODS)}), "
                             f"{', '.join(r for r in ROLES if r not in METHODS)}, or a task ({', '.join(TASKS)})")
        configs[role] = validate(role_config(base, role, seeds[0]))  # every arm's config before any arm trains
        other = get_task(role) if role in TASKS else task
        if headline_key(other) != key and key not in other.shared_metrics:
            raise ValueError(f"role {role!r} reports {headline_key(other)}, not {key}: an arm of another task must "
                             f"report the same headline")
    tuning, chosen = None, {}
    if tune:
        val_size, val_from = validation_size(base, task)
        held = sweep_configs(base, roles, tune, tune_seeds, val_size)  # every sweep run's config, checked
        for (role, i, seed), cfg in held.items():
            arm_action(cfg, out / TUNE_DIR / sweep_name(role, candidates(tune)[i], seed), overwrite)
        check_tuned_arms(base, out, seeds, roles, tune, overwrite)
        make_out(out)
        picked = sweep(task, held, out, roles, tune, tune_seeds, progress, overwrite)
        chosen = {role: arm["chosen"] for role, arm in picked.items()}
        tuning = {"settings": tuned(tune), "seeds": tune_seeds, "metric": headline_key(task, "validation"),
                  "val_size": val_size, "val_size_from": val_from, "runs": TUNE_DIR, "arms": picked}
        configs = {role: validate(role_config(with_settings(base, chosen[role]), role, seeds[0])) for role in roles}
    runs = train_arms(base, out, seeds, roles, progress, overwrite, chosen)
    for role, results in runs.items():
        for seed, r in zip(seeds, results):
            r[key], score = headline(task, out / f"{role}-seed{seed}", r, progress)
            if score is not None:
                r["score"] = score
    device = resolve_device(base.train.device)
    arms = {role: Arm(role, get_method(cfg.train.method).model_form, cfg.task,
                      cfg.task == base.task and cfg.model.depth == base.model.depth, runs[role],
                      [r[key] for r in runs[role]],
                      lambda at="cpu", run=out / f"{role}-seed{seeds[0]}": load_model(run)[1].to(at),
                      cfg.train.batch_size, str(device))
            for role, cfg in configs.items()}
    rows = summarize(runs, key)
    curve_key = task.curve_metric or task.metric
    for role, row in rows.items():  # what each arm spent: its settings, samples, and when it left the plateau
        t = configs[role].train
        plateaus = [left_plateau(r.get("curve", []), curve_key, task) for r in runs[role]]
        row.update(lr=t.lr, warmup=t.warmup, batch_size=t.batch_size, samples_seen=row["steps"] * t.batch_size,
                   left_plateau=[p if not p else dict(p, samples_seen=p["step"] * t.batch_size) for p in plateaus])
    scale = 100 if task.percent else 1
    name = metric_words(key)
    label = f"{name} (%)" if scale == 100 else f"{name} ({'higher' if task.higher_is_better else 'lower'} is better)"
    extras, lines = task.compare_extras(arms, base, out)
    report = {"provenance": provenance(device, started),
              "task": task.name, "metric": key, "higher_is_better": task.higher_is_better, "rows": rows,
              "verdict": verdict(rows, key, task), "seeds": seeds, "plateau": plateau_said(task),
              **({"tuning": tuning} if tuning else {}), **extras}
    io.save_json(out / "compare.json", report)
    figures = {}  # file name -> caption, in the order compare.md shows them
    if plot(arms, task, out / "compare.png"):
        figures["compare.png"] = f"{metric_words(task.curve_metric or task.metric)} during training"
    if plot_losses(arms, {role: [out / f"{role}-seed{seed}" for seed in seeds] for role in runs}, out / "loss.png"):
        figures["loss.png"] = "training loss of each arm"
    for f in sorted(out.glob("*.png")):  # the task's figures: the PNGs its lines name, captioned by the line
        said = next((line for line in lines if f.name in line), None)
        if said and f.name not in figures:
            figures[f.name] = said
    chose = "" if tuning is None else (
        f"\nSettings chosen on validation, for each arm on its own: {', '.join(tuning['settings'])} of the best mean "
        f"{metric_words(tuning['metric'])} over seeds {', '.join(map(str, tuning['seeds']))}; validation split: "
        f"{tuning['val_size']} items ({tuning['val_size_from']}); the sweep's runs in {TUNE_DIR}/ read no test item. A "
        "candidate with a failed or non-finite seed is out.\n\n" + sweep_table(task, tuning))
    md = markdown_table(rows, key, label, scale) + "\n" + budget_table(rows, task) + chose \
        + "".join(f"\n{line}\n" for line in lines) + "\n" \
        + "\n".join(f"- {v}" for v in report["verdict"]) + "\n" \
        + "".join(f"\n![{caption}]({name})\n" for name, caption in figures.items())
    io.atomic_write_text(out / "compare.md", md)
    print("\n" + md, end="")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}" + "".join(f", {out / f}" for f in figures))
    return report
