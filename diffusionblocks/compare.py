"""Side-by-side comparison on one layer-update budget, for any task: end-to-end, DiffusionBlocks and (where
the task lists it) an end-to-end control with only one block's depth (does stacking the blocks add anything
over one of them?). Every arm over the same seeds; the task's headline metric with its spread; the
task's own extras (Task.compare_extras: classification's accuracy after each inference step, image generation's
sampling time and sample grids), which see each arm with the model form its method trains (tasks.optional.Arm).
A role that names another method trains the task's model with it (the block-wise baselines); a role that names
another registered task is that task's end-to-end model on the same config (same data, size and budget) and must
report the same headline: masked diffusion's autoregressive floor, role "arlm"."""

from __future__ import annotations

import copy
import math
import statistics
import sys
from pathlib import Path

from . import io
from .config import RunConfig, save_config
from .data import absolute_data_paths
from .images import pyplot
from .methods import METHODS, get_method
from .run import CONFIG, RESULTS, SCORE, STATE, WEIGHTS, load_model, make_out, read_config, validate
from .tasks import TASKS, Task, get_task
from .tasks.optional import Arm
from .train import reference_model, train

ROLES = ("e2e", "control", "dblocks")  # and any other method's name (METHODS), and another task's
LABELS = {"e2e": "end-to-end", "control": "end-to-end, one block's depth", "dblocks": "DiffusionBlocks"}


def role_config(base: RunConfig, role: str, seed: int) -> RunConfig:
    """The config of one arm. All arms get the same layer-update budget (base.train.steps end-to-end
    steps of base.model.depth layers)."""
    cfg = copy.deepcopy(base)
    cfg.train.seed = seed
    cfg.train.budget = "layer-updates"
    B = base.blocks.num_blocks
    if role == "control":  # one block's depth, trained end to end, B times as many steps
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


def train_arms(base: RunConfig, out: Path, seeds: list[int], roles, progress: bool,
               overwrite: bool = False) -> dict[str, list[dict]]:
    """Every arm for every seed into out/ROLE-seedS (finished arms reused, interrupted ones resumed); a stale arm
    (see arm_action) is refused before any arm trains."""
    arms = {(role, seed): role_config(base, role, seed) for seed in seeds for role in roles}
    for (role, seed), cfg in arms.items():
        arm_action(cfg, out / f"{role}-seed{seed}", overwrite)
    make_out(out)  # after every check: a refused compare leaves nothing behind
    io.atomic_write_text(out / "base_config.json", save_config(base))
    runs: dict[str, list[dict]] = {}
    for (role, seed), cfg in arms.items():
        print(f"== {role} (seed {seed}) ==", file=sys.stderr)
        runs.setdefault(role, []).append(run_arm(cfg, out / f"{role}-seed{seed}", progress, overwrite))
    return runs


def headline_key(task: Task) -> str:
    """The key compare reports: test_<metric> of results.json where training's evaluation measures the headline, else
    the metric itself, scored after training (Task.curve_metric)."""
    return f"test_{task.metric}" if task.curve_metric in (None, task.metric) else task.metric


def headline(task: Task, run: Path, results: dict, progress: bool) -> tuple[float, dict | None]:
    """The task's headline metric of a finished run: from results.json when training measured it, else
    the task's score on the test split (cached in run/score.json, recomputed when the config changed)."""
    key = headline_key(task)
    if key != task.metric and key in results:
        return results[key], None
    cached = run / SCORE
    cfg = io.load_json(run / CONFIG)
    if cached.exists():
        score = io.load_json(cached)
        if score.get("config") == cfg:
            return score[task.metric], score
    cfg_m, model, data = load_model(run)
    score = task.score(model, data, cfg_m, split="test", progress=progress, reference=reference_model)
    io.save_json(cached, dict(score, config=cfg))
    return score[task.metric], score


def _spread(values: list[float], scale: float) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}" if scale != 1 else f"{values[0]:.4g}"
    mean, std = scale * statistics.mean(values), scale * statistics.stdev(values)
    return f"{mean:.2f} ± {std:.2f}" if scale != 1 else f"{mean:.4g} ± {std:.2g}"


def summarize(runs: dict[str, list[dict]], key: str) -> dict:
    """Per arm: the headline values over seeds (key, key_mean, key_std) and the training facts."""
    rows = {}
    for role, results in runs.items():
        values = [r[key] for r in results]
        rows[role] = {
            "method": results[0]["method"], "depth": results[0]["depth"], "num_blocks": results[0]["num_blocks"],
            "seeds": [r["seed"] for r in results],
            key: values, f"{key}_mean": statistics.mean(values),
            f"{key}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "steps": results[0]["steps"], "layer_updates": results[0]["layer_updates"],
            "train_seconds": statistics.median(r["train_seconds"] for r in results),
            "seconds_per_layer_update": statistics.median(r["seconds_per_layer_update"] for r in results),
            "activation_bytes_per_step": results[0]["activation_bytes_per_step"],
            "parameters": results[0]["parameters"],
        }
    return rows


def markdown_table(rows: dict, key: str, label: str, scale: float) -> str:
    seeds = max(len(r[key]) for r in rows.values()) > 1  # then each seed's value too, in the seeds' order
    lines = [f"| arm | method | layers | {label} |{' per seed |' if seeds else ''} steps | layer-updates | train s | "
             f"ms / layer-update | activations / step (MB) |", "|---|---|---|---|" + "---|" * (5 + seeds)]
    for role, r in rows.items():
        each = ", ".join(_spread([v], scale) for v in r[key])
        lines.append(f"| {role} | {r['method']}{' B=' + str(r['num_blocks']) if r['num_blocks'] > 1 else ''} | "
                     f"{r['depth']} | {_spread(r[key], scale)} |{f' {each} |' if seeds else ''} {r['steps']} | "
                     f"{r['layer_updates']} | {r['train_seconds']:.1f} | {1000 * r['seconds_per_layer_update']:.3f} | "
                     f"{r['activation_bytes_per_step'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def separated(rows: dict, key: str, a: str, b: str) -> bool | None:
    """Do the seeds separate arms a and b? True when their means differ by more than two standard errors of the
    difference, sqrt(s_a^2 / n_a + s_b^2 / n_b); None with one seed in either arm (no spread to judge by)."""
    ra, rb = rows[a], rows[b]
    na, nb = len(ra[key]), len(rb[key])
    if na < 2 or nb < 2:
        return None
    se = math.sqrt(ra[f"{key}_std"] ** 2 / na + rb[f"{key}_std"] ** 2 / nb)
    return abs(ra[f"{key}_mean"] - rb[f"{key}_mean"]) > 2 * se  # equal means are never separated


def verdict(rows: dict, key: str, task: Task) -> list[str]:
    """Plain sentences on what the numbers say, whichever way they fall; a difference the seeds do not separate
    (under two standard errors of it) is called a tie, whichever mean is higher."""
    unit, scale = (" points", 100) if task.percent else ("", 1)
    mean = {role: r[f"{key}_mean"] for role, r in rows.items()}
    better = lambda a, b: (a > b) if task.higher_is_better else (a < b)
    diff = lambda a, b: f"{scale * (mean[a] - mean[b]):+.2f}{unit}"

    def judge(a: str, b: str, if_better: str, if_not: str) -> str:
        said = if_better if better(mean[a], mean[b]) else if_not
        sep = separated(rows, key, a, b)
        if sep is None:
            return f"{said} (one seed: no spread to judge it by)"
        n = min(len(rows[a][key]), len(rows[b][key]))
        return said if sep else f"a tie at {n} seeds: the difference is under two standard errors of it"

    out = []
    if "e2e" in mean and "dblocks" in mean:
        paper = f" ({task.paper_gap})" if task.paper_gap else ""
        out.append(f"dblocks - e2e = {diff('dblocks', 'e2e')}{paper}; {key}, "
                   f"{'higher' if task.higher_is_better else 'lower'} is better")
        if not task.percent and mean["e2e"]:
            out.append(f"{key} dblocks / e2e = {mean['dblocks'] / mean['e2e']:.2f}")
    if "control" in mean and "e2e" in mean:
        out.append(f"e2e - control = {diff('e2e', 'control')}: " + judge(
            "e2e", "control", "depth helped end-to-end training at this budget",
            "depth did NOT help end-to-end training at this budget"))
    if "control" in mean and "dblocks" in mean:
        out.append(f"dblocks - control = {diff('dblocks', 'control')}: " + judge(
            "dblocks", "control", "the stacked blocks beat one block's depth",
            "the blocks added nothing over one block's depth trained end to end"))
    for role in (r for r in mean if r in METHODS and r not in ROLES):  # a baseline against DiffusionBlocks
        if "dblocks" in mean:
            out.append(f"{role} - dblocks = {diff(role, 'dblocks')}: " + judge(
                role, "dblocks", f"{role} beat DiffusionBlocks", f"DiffusionBlocks beat {role}"))
    return out


def plot(arms: dict[str, Arm], task: Task, path: Path) -> bool:
    """The task's curve metric vs layer-updates for every arm (mean over seeds). False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    key = task.curve_metric or task.metric
    scale = 100 if task.percent and key == task.metric else 1
    fig, ax = plt.subplots(figsize=(6, 4))
    for role, arm in arms.items():
        results = arm.runs
        xs = [p["layer_updates"] for p in results[0]["curve"]]
        ys = [scale * statistics.mean(r["curve"][i][key] for r in results) for i in range(len(xs))]
        label = LABELS.get(role) or (get_method(role).title or role if role in METHODS  # a baseline by its name,
                                     else f"{role}, end-to-end")  # another task's arm by its task
        label += f" (B={results[0]['num_blocks']})" if arm.form == "blocks" else ""
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("layer-updates")
    first = next(iter(arms.values())).runs[0]
    split, n = first.get("eval_split", "test"), first.get("curve_n", "?")
    ax.set_ylabel(f"{split} {key}" + (" (%)" if scale == 100 else ""))
    ax.set_title(f"{key} on the first {n} {split} items, mean over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(base: RunConfig, out_dir: str | Path, seeds: list[int], roles=None, progress: bool = True,
            overwrite: bool = False) -> dict:
    """Train (or reuse) every arm over `seeds` into `out_dir` and report; `overwrite` retrains arms whose settings
    changed (without it they are refused)."""
    base, out = absolute_data_paths(base), Path(out_dir)
    task = get_task(base.task)
    roles = roles or task.compare_roles
    for what, items in (("seed", seeds), ("arm", roles)):
        twice = sorted({str(x) for x in items if list(items).count(x) > 1})
        if twice:
            raise ValueError(f"{what} {', '.join(twice)} given twice: each {what} runs once (a duplicate would count "
                             f"one run twice in the spread)")
    key = headline_key(task)  # scored on the test split: compare reports settings chosen before
    configs = {}
    for role in roles:
        if role not in ROLES and role not in METHODS and role not in TASKS:
            raise ValueError(f"unknown arm {role!r}: expected a method ({', '.join(METHODS)}), control, or a task "
                             f"({', '.join(TASKS)})")
        configs[role] = validate(role_config(base, role, seeds[0]))  # every arm's config before any arm trains
        other = get_task(role) if role in TASKS else task
        if headline_key(other) != key and key not in other.shared_metrics:
            raise ValueError(f"role {role!r} reports {headline_key(other)}, not {key}: an arm of another task must "
                             f"report the same headline")
    runs = train_arms(base, out, seeds, roles, progress, overwrite)
    for role, results in runs.items():
        for seed, r in zip(seeds, results):
            r[key], score = headline(task, out / f"{role}-seed{seed}", r, progress)
            if score is not None:
                r["score"] = score
    arms = {role: Arm(role, get_method(cfg.train.method).model_form, cfg.task,
                      cfg.task == base.task and cfg.model.depth == base.model.depth, runs[role],
                      [r[key] for r in runs[role]], lambda run=out / f"{role}-seed{seeds[0]}": load_model(run)[1])
            for role, cfg in configs.items()}
    rows = summarize(runs, key)
    scale = 100 if task.percent else 1
    name = key.replace("_", " ")
    label = f"{name} (%)" if scale == 100 else f"{name} ({'higher' if task.higher_is_better else 'lower'} is better)"
    extras, lines = task.compare_extras(arms, base, out)
    report = {"task": task.name, "metric": key, "higher_is_better": task.higher_is_better, "rows": rows,
              "verdict": verdict(rows, key, task), "seeds": seeds, **extras}
    io.save_json(out / "compare.json", report)
    md = markdown_table(rows, key, label, scale) + "".join(f"\n{line}\n" for line in lines) + "\n" \
        + "\n".join(f"- {v}" for v in report["verdict"]) + "\n"
    io.atomic_write_text(out / "compare.md", md)
    plotted = plot(arms, task, out / "compare.png")
    print("\n" + md, end="")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}" + (f", {out / 'compare.png'}" if plotted else ""))
    return report
