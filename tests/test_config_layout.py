"""The config's layout: sections declared by their owners, and the layout of earlier versions (one `dblocks` section
for the block structure, the trainer and the label chain; one `baseline` section) still loading, as a config dict, as
command-line keys and as a run directory that evaluates and resumes."""

import json
import signal
import subprocess
import sys

import torch
from conftest import signal_on_step

from diffusionblocks import io
from diffusionblocks.cli import main
from diffusionblocks.config import ALIASES, SECTIONS, RunConfig, apply_overrides, load_preset, validate
from diffusionblocks.methods.dblocks import DBlocks

# config.json as the version of commit 8fa48b6 wrote it for the tiny preset with
#   dblocks.input_clean=0.25 dblocks.steps_per_block=2 dblocks.block_choice=round-robin dblocks.gamma=0.1
#   baseline.ff_theta=0.75 baseline.aux_pool=cls baseline.noprop_label_scale=unit-norm baseline.dtp_target_step=0.5
#   gen.steps=6 arlm.temperature=0.5 recurrent.core=3 mdlm.eval_t=3
OLD = {
    "task": "classify",
    "model": {"depth": 4, "width": 32, "heads": 2, "patch": 2, "mlp_ratio": 2.0, "dropout": 0.0, "label_dim": 0,
              "checkpoint": 0, "layer": "adaln", "gate_recompute": True, "noise_scale": 1000.0, "label_head": "plain",
              "positions": "learned"},
    "data": {"name": "digits", "root": "", "crop_padding": 0, "hflip": False, "train_limit": 0, "test_limit": 0,
             "val_size": 0, "tokenizer": "bytes", "bpe_vocab": 4096, "tokenizer_file": "", "seq_len": 128},
    "train": {"method": "dblocks", "steps": 150, "budget": "layer-updates", "batch_size": 64, "lr": 0.003,
              "min_lr_ratio": 0.1, "warmup": 0.05, "weight_decay": 0.05, "beta2": 0.99, "clip": 1.0, "ema": 0.0,
              "seed": 0, "eval_every": 0, "eval_limit": 360, "eval_batch_size": 500, "log_every": 10,
              "ckpt_every": 1000, "threads": 0, "device": "cpu", "offload_dir": "", "blocks": "", "parallel": "none"},
    "dblocks": {"num_blocks": 2, "partition": "equiprob", "gamma": 0.1, "allocation": "", "shared_stem_head": True,
                "block_choice": "round-robin", "residency": "all", "loss_weight": "none", "steps_per_block": 2,
                "grid": "equiprob", "bridge": "soft", "sigma_start": 0.0, "init": "zero", "input_flip": 0.2,
                "input_mix": 0.5, "input_clean": 0.25, "label_table": "fixed"},
    "gen": {"conditional": True, "label_dropout": 0.1, "sigma_data": 0.5, "steps": 6, "sampler": "euler",
            "grid": "equiprob", "cfg_scale": 1.0, "fd_samples": 1000},
    "mdlm": {"schedule": "linear", "eps": 0.0001, "eval_t": 3, "sample_steps": 128},
    "arlm": {"noise_level": "window", "sigma_max_share": 0.0, "eval_draws": 4, "temperature": 0.5},
    "recurrent": {"prelude": 1, "core": 3, "coda": 1, "mean_recurrence": 8, "recurrence_sigma": 0.5,
                  "backprop_depth": 4, "state_std": 1.0, "eval_recurrences": 0, "dblocks_epochs": 3.0},
    "baseline": {"ff_theta": 0.75, "ff_readout": True, "ff_neutral": "own", "aux_pool": "cls", "noprop_eta": 0.1,
                 "noprop_label_table": "learned", "noprop_label_scale": "unit-norm", "dtp_inverse_noise": 0.1,
                 "dtp_target_step": 0.5},
}
NEW_KEYS = ["chain.input_clean=0.25", "chain.steps_per_block=2", "dblocks.block_choice=round-robin", "blocks.gamma=0.1",
            "ff.theta=0.75", "dgl.aux_pool=cls", "noprop.label_scale=unit-norm", "dtp.target_step=0.5", "gen.steps=6",
            "arlm.temperature=0.5", "recurrent.core=3", "mdlm.eval_t=3"]


def old_layout(d: dict) -> dict:
    """A config dict of today's layout written back in the earlier one (every renamed key under its old name)."""
    new_to_old = {new: old for old, new in ALIASES.items()}
    out = {"task": d["task"]}
    for name, values in d.items():
        for key, value in values.items() if name != "task" else ():
            section, old_key = new_to_old.get(f"{name}.{key}", f"{name}.{key}").split(".")
            out.setdefault(section, {})[old_key] = value
    return out


def keys(d: dict) -> set[str]:
    return {f"{s}.{k}" for s, values in d.items() if s != "task" for k in values}


def test_an_old_layout_config_loads_to_the_same_settings_as_the_new_layout():
    new = apply_overrides(load_preset("tiny"), NEW_KEYS)
    assert RunConfig.from_dict(OLD) == new
    assert validate(RunConfig.from_dict(OLD)).to_dict() == new.to_dict()
    added = {"train.precision", "train.compile", "arlm.sigma_data"}  # settings new since that version
    added |= {k for k in keys(new.to_dict()) if k.split(".")[0] in ("hops", "cff")}  # sections new since then
    assert keys(old_layout(new.to_dict())) - added == keys(OLD)  # the alias table covers every key that moved
    assert RunConfig.from_dict(json.loads(json.dumps(new.to_dict()))) == new


def test_a_config_written_before_later_sections_existed_still_loads():
    early = {k: v for k, v in OLD.items() if k in ("task", "model", "data", "train", "dblocks")}
    expected = apply_overrides(load_preset("tiny"), [k for k in NEW_KEYS if k.split(".")[0] in
                                                     ("chain", "blocks", "dblocks")])
    assert RunConfig.from_dict(early) == expected


def test_every_old_key_on_the_command_line_sets_its_new_key():
    for old, new in ALIASES.items():
        section, key = new.split(".")
        default = getattr(RunConfig(), section).__dict__[key]
        value = not default if isinstance(default, bool) else "x" if isinstance(default, str) else default + 1
        cfg = apply_overrides(RunConfig(), [f"{old}={value}"])
        assert getattr(getattr(cfg, section), key) == value, old
    assert set(ALIASES.values()) <= {f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__}


def test_presets_and_sections_exist_on_importing_the_config_module_alone():
    code = ("from diffusionblocks.config import load_preset; c = load_preset('gen-tiny'); "
            "print(c.task, c.gen.steps, c.ff.theta, c.blocks.num_blocks)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["imagegen", "8", "0.5", "2"]


COMMON = ["--preset", "tiny", "--no-progress", "train.steps=12", "train.threads=1", "train.eval_limit=60",
          "data.test_limit=60", "chain.steps_per_block=2", "chain.input_clean=0.25", "blocks.gamma=0.1"]


def test_an_old_layout_run_directory_evaluates_to_its_results_and_resumes(tmp_path, monkeypatch, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "--out", str(whole), *COMMON]) == 0
    original = signal_on_step(monkeypatch, DBlocks, 5, signal.SIGINT)
    assert main(["train", "--out", str(cut), *COMMON]) == 130
    monkeypatch.setattr(DBlocks, "step", original)
    for run in (cut, whole):  # both written back in the earlier layout
        io.save_json(run / "config.json", old_layout(io.load_json(run / "config.json")))
        assert "blocks" not in io.load_json(run / "config.json") and "baseline" in io.load_json(run / "config.json")
    capsys.readouterr()
    assert main(["eval", str(whole), "--json"]) == 0
    score, results = json.loads(capsys.readouterr().out), io.load_json(whole / "results.json")
    assert (score["accuracy"], score["accuracy_per_step"]) == (results["test_accuracy"], results["accuracy_per_step"])
    assert len(score["accuracy_per_step"]) == 4  # 2 blocks x chain.steps_per_block=2, read from the old dblocks.*
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    a, b = (io.load_safetensors(run / "model.safetensors")[0] for run in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert io.load_json(cut / "results.json")["test_accuracy"] == results["test_accuracy"]
