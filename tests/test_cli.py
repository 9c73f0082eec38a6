import json
import runpy
import sys

import pytest

from diffusionblocks.cli import main


def test_partition_json_prints_reference_boundaries(capsys):
    assert main(["partition", "--num-blocks", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["boundaries"] == pytest.approx([0.002, 0.1796, 0.5050, 80.0], abs=1e-3)
    assert [b["block"] for b in info["blocks"]] == [0, 1, 2]
    assert info["blocks"][0]["hi"] == 80.0  # block 0 owns the highest noise
    assert [b["mass"] for b in info["blocks"]] == pytest.approx([1 / 3] * 3)
    assert info["gamma"] == 0.05
    assert info["inference_grid"]["blocks"] == [0, 1, 2]


def test_partition_options(capsys):
    assert main(["partition", "--num-blocks", "2", "--gamma", "0", "--partition", "uniform-log", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "uniform-log" and info["gamma"] == 0.0
    assert info["boundaries"][1] == pytest.approx((0.002 * 80) ** 0.5)  # geometric midpoint
    assert info["blocks"][0]["train_lo"] == info["blocks"][0]["lo"]
    assert main(["partition", "--num-blocks", "4", "--levels", "mask", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["boundaries"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])


def test_partition_table(capsys):
    assert main(["partition", "--num-blocks", "3", "--steps-per-block", "2"]) == 0
    out = capsys.readouterr().out
    assert "[0.505, 80]" in out and "[0.392, 80]" in out and "0.3333" in out
    assert "80 [0] -> " in out and out.count("[2]") >= 2


@pytest.mark.parametrize(
    "args, match",
    [
        (["--num-blocks", "0"], "num_blocks"),
        (["--num-blocks", "3", "--gamma", "-0.5"], "gamma"),
        (["--num-blocks", "3", "--sigma-min", "90"], "sigma_min"),
        (["--num-blocks", "3", "--steps-per-block", "0"], "steps_per_block"),
    ],
)
def test_partition_bad_input_exits_2_with_a_message(args, match, capsys):
    assert main(["partition", *args]) == 2
    assert match in capsys.readouterr().err


def test_module_entry_point_lists_subcommands_and_exits_with_the_command_code(monkeypatch, capsys):
    """`python -m diffusionblocks` as the interpreter runs it (its module run as __main__), in this process."""
    for argv, code in ((["--help"], 0), (["partition", "--num-blocks", "0"], 2)):
        monkeypatch.setattr(sys, "argv", ["diffusionblocks", *argv])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("diffusionblocks", run_name="__main__", alter_sys=True)
        assert exit_.value.code == code
    out, err = capsys.readouterr()
    assert "partition" in out and "error" in err


def test_help_lists_every_preset_and_config_resolves_one_with_each_keys_meaning(capsys):
    from diffusionblocks.cli import build_parser
    from diffusionblocks.config import PRESETS
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    listed = [line.split()[0] for line in text.split("presets (")[1].splitlines()[1:] if line.strip()]
    assert listed == list(PRESETS)
    assert main(["config"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == list(PRESETS)
    assert main(["config", "--preset", "tiny", "train.lr=3e-3"]) == 0
    out = capsys.readouterr().out
    assert 'train.lr = 0.003 *    # AdamW\'s peak learning rate; accepts (0, inf)' in out
    assert 'blocks.partition = "equiprob"    # the noise levels\' cut' in out and "[chain]" in out
    assert main(["config", "--preset", "tiny", "--json", "model.depth=2"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["depth"] == 2
    assert main(["config", "--preset", "tiny", "train.nope=1"]) == 2


def test_every_option_of_every_command_has_help():
    from diffusionblocks.cli import build_parser
    missing = [(name, a.option_strings or a.dest)
               for name, p in build_parser()._subparsers._group_actions[0].choices.items()
               for a in p._actions if not a.help]
    assert missing == []


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_steps_means_the_training_budget_and_sampling_has_its_own_flag(command, capsys, tmp_path):
    out = ["--out", str(tmp_path / "x.png")] if command == "sample" else []
    argv = [command, str(tmp_path), "--steps", "4", *out]
    assert main(argv) == 2
    assert "--steps is the training budget (train, compare); the sampling steps are --sample-steps" in \
        capsys.readouterr().err
