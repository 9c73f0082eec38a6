"""The pointer-chasing task (the depth testbed): its examples, its two model forms, its chain's figures, its splits
and its compare arms."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from diffusionblocks import io
from diffusionblocks.compare import role_config
from diffusionblocks.config import apply_overrides, load_preset
from diffusionblocks.run import build_model, validate
from diffusionblocks.tasks import get_task
from diffusionblocks.tasks.hops import HopsStem, generate, hop_counts, memory_mask
from diffusionblocks.train import train

TASK = get_task("hops")
ROOT = Path(__file__).resolve().parents[1]


def tiny(*overrides: str):
    return validate(apply_overrides(load_preset("hops-tiny"), list(overrides)))


def chase(x: torch.Tensor, symbols: int, hops: int, pair_tokens: int) -> list[int]:
    """The answers computed directly, one example at a time: f read off the pairs, applied k times to the start."""
    answers = []
    for example in x.long().tolist():
        (start, hop), rows = example[0], example[1:]
        if pair_tokens == 2:  # (a, KEY), (f(a), VALUE)
            assert [r[1] for r in rows] == [symbols + hops, symbols + hops + 1] * symbols
            pairs = [(key[0], value[0]) for key, value in zip(rows[::2], rows[1::2])]
        else:
            pairs = rows
        f = dict(pairs)
        assert sorted(f) == sorted(f.values()) == list(range(symbols))  # a permutation, every pair once
        for _ in range(hop - symbols + 1):
            start = f[start]
        answers.append(start)
    return answers


@pytest.mark.parametrize("pair_tokens", [1, 2])
def test_examples_are_generated_from_the_seed_and_answer_f_applied_k_times(pair_tokens):
    cfg = tiny("hops.symbols=6", "hops.hops=3", "hops.train_size=300", "hops.test_size=200",
               f"hops.pair_tokens={pair_tokens}")
    a, b = TASK.load_data(cfg), TASK.load_data(cfg)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)  # the same examples every time
    other = TASK.load_data(apply_overrides(cfg, ["hops.data_seed=1"]))
    assert not torch.equal(a.x_train, other.x_train)
    assert a.x_train.shape == (300, 1 + 6 * pair_tokens, 2) and a.y_train.dtype == torch.int64
    for x, y in ((a.x_train, a.y_train), (a.x_test, a.y_test)):
        assert chase(x, 6, 3, pair_tokens) == y.tolist()
    k = hop_counts(a.x_train, 6)
    assert set(k.tolist()) == {1, 2, 3}  # k uniform in [min_hops, hops]
    assert not any(torch.equal(t, a.x_train[0]) for t in a.x_test)  # train and test are drawn apart
    fixed = TASK.load_data(apply_overrides(cfg, ["hops.min_hops=3"]))
    assert set(hop_counts(fixed.x_test, 6).tolist()) == {3}
    assert chase(fixed.x_test, 6, 3, pair_tokens) == fixed.y_test.tolist()
    held = TASK.load_data(apply_overrides(cfg, ["data.val_size=50"]))  # held out of the training examples
    assert len(held.y_val) == 50 and len(held.y_train) == 250 and held.shapes.num_classes == 6


def test_the_noisy_label_goes_to_the_query_token_only_and_the_memory_mask_keeps_pairs_apart():
    stem = HopsStem(symbols=4, hops=2, pair_tokens=2, width=8, label_dim=4)
    x, _ = generate(3, 4, 2, 1, torch.Generator().manual_seed(0), pair_tokens=2)
    c_noise = torch.zeros(3)
    h0, (c, mask) = stem(torch.zeros(3, 4), c_noise, x)
    h1, _ = stem(torch.randn(3, 4), c_noise, x)
    assert h0.shape == (3, 9, 8) and c.shape == (3, 8) and mask is None  # full attention by default
    assert not torch.allclose(h0[:, 0], h1[:, 0]) and torch.equal(h0[:, 1:], h1[:, 1:])
    mask = memory_mask(4, 2)  # the query sees every token; a key token and its value token see each other only
    assert bool(mask[0].all()) and mask[1:, 0].sum() == 0
    assert torch.equal(mask[1:, 1:], torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * 4))
    assert torch.equal(memory_mask(4, 1)[1:, 1:], torch.eye(4, dtype=torch.bool))


@pytest.mark.parametrize("method", ["e2e", "dblocks"])
def test_both_forms_learn_a_fixed_batch(method):
    cfg = tiny(f"train.method={method}", "hops.hops=1")
    data = TASK.load_data(cfg)
    model = build_model(cfg, data)
    x, y = data.x_train[:64], data.y_train[:64]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def loss(step: int) -> torch.Tensor:
        return model.loss(x, y).mean() if method == "e2e" else model.block_loss(step % 2, x, y, gen).mean()

    first = [loss(b).item() for b in range(2)]
    for step in range(80):
        opt.zero_grad()
        loss(step).backward()
        opt.step()
    last = [loss(b).item() for b in range(2)]
    assert all(b < 0.8 * a for a, b in zip(first, last)), (first, last)  # each block's loss falls by a fifth


@pytest.mark.parametrize("method,steps", [("e2e", 1), ("dblocks", 2)])
def test_a_run_trains_and_reports_each_blocks_figure_on_validation(tmp_path, method, steps):
    cfg = tiny(f"train.method={method}", "train.steps=12", "train.log_every=4", "data.val_size=64",
               f"chain.steps_per_block={steps}")
    results = train(cfg, tmp_path / method, progress=False)
    assert results["eval_split"] == "validation" and results["n"] == 64
    per_step = results["accuracy_per_step"]
    assert len(per_step) == (1 if method == "e2e" else 2 * steps) and per_step[-1] == results["accuracy"]
    assert {"accuracy_hops1", "accuracy_hops2"} <= set(results)
    losses = [r["loss"] for r in io.read_jsonl(tmp_path / method / "metrics.jsonl") if "loss" in r]
    assert len(losses) == results["steps"] // 4 and all(loss > 0 for loss in losses)
    if method == "dblocks":  # each block's training loss is logged apart
        assert any("blocks" in r for r in io.read_jsonl(tmp_path / method / "metrics.jsonl"))


def test_evaluation_on_validation_and_test_splits():
    cfg = tiny("data.val_size=100", "chain.steps_per_block=3")
    data = TASK.load_data(cfg)
    model = build_model(cfg, data)
    val = TASK.evaluate(model, data, cfg, split="validation")
    test = TASK.evaluate(model, data, cfg, split="test", limit=40)
    assert (val["n"], test["n"]) == (100, 40)
    assert len(val["accuracy_per_step"]) == 6  # 2 blocks x 3 Euler steps: each step's figure along the chain
    k = hop_counts(data.x_val, 4)
    by_hops = sum(val[f"accuracy_hops{j}"] * int((k == j).sum()) for j in (1, 2)) / 100
    assert by_hops == pytest.approx(val["accuracy"])  # the hop counts' figures make up the whole
    assert TASK.evaluate(model, data, cfg, split="validation", steps_per_block=1)["accuracy_per_step"].__len__() == 2
    with pytest.raises(ValueError, match="val_size"):
        TASK.evaluate(model, TASK.load_data(tiny()), cfg, split="validation")
    e2e_cfg = tiny("train.method=e2e")
    e2e = build_model(e2e_cfg, data)
    assert len(TASK.evaluate(e2e, data, e2e_cfg, split="test")["accuracy_per_step"]) == 1
    with pytest.raises(ValueError, match="--steps-per-block"):
        TASK.evaluate(e2e, data, e2e_cfg, steps_per_block=2)


def test_compare_arms_on_the_testbed_preset():
    base = load_preset("hops")
    control, dblocks, e2e = (validate(role_config(base, role, 1)) for role in ("control", "dblocks", "e2e"))
    B = base.blocks.num_blocks
    assert (control.train.method, control.model.depth, control.train.steps) == ("e2e", base.model.depth // B,
                                                                                base.train.steps * B)
    assert (dblocks.train.method, dblocks.model.depth, e2e.model.depth) == ("dblocks", base.model.depth,
                                                                            base.model.depth)
    assert TASK.compare_roles == ("e2e", "e2e-steps", "control", "dblocks")
    assert TASK.compare_preset(quick=True) == "hops-quick"
    for name in ("hops", "hops-quick", "hops-tiny"):
        assert validate(load_preset(name)).task == "hops"
    with pytest.raises(ValueError, match="min_hops"):
        tiny("hops.min_hops=3")
    with pytest.raises(ValueError, match="even"):
        tiny("model.width=15", "model.heads=1")


def test_the_testbed_script_tunes_tests_once_and_reports_each_block(tmp_path, monkeypatch, capsys):
    """benchmarks/depth_testbed.py on the tiny preset: the lr chosen on validation for the tuned arm, each arm's
    figure after each block, the test split scored once (cached), the verdicts and the plot."""
    spec = importlib.util.spec_from_file_location("depth_testbed", ROOT / "benchmarks" / "depth_testbed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["depth_testbed.py", "--preset", "hops-tiny", "--out", str(tmp_path), "--seeds", "0,1", "--val-size", "64",
            "--arms", "e2e-d4,control-d4-B2,dblocks-d4-B2,e2e-steps-d4-B2", "--lrs", "1e-3,3e-3",
            "--tune", "dblocks-d4-B2",
            "--test", "--plot", str(tmp_path / "hops.png"), "train.steps=6", "model.width=16", "train.eval_limit=64"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    report = io.load_json(tmp_path / "depth_testbed.json")
    arms = report["arms"]
    assert set(arms) == {"e2e-d4", "control-d4-B2", "dblocks-d4-B2", "e2e-steps-d4-B2"}
    assert report["tuned"] == ["dblocks-d4-B2"]
    grid = arms["dblocks-d4-B2"]["lr_grid"]
    assert set(grid) == {"0.001", "0.003"} and arms["dblocks-d4-B2"]["lr"] == float(max(grid, key=grid.get))
    assert arms["e2e-d4"]["lr"] == load_preset("hops-tiny").train.lr and not arms["e2e-d4"]["lr_grid"]
    dblocks = arms["dblocks-d4-B2"]
    assert len(dblocks["validation"]["per_step"]) == 2 and len(dblocks["test"]["per_step"]) == 2  # after each block
    assert all(r["num_blocks"] == 2 and r["depth"] == 4 and r["eval_split"] == "validation" for r in dblocks["runs"])
    assert [r["depth"] for r in arms["control-d4-B2"]["runs"]] == [2, 2]  # one block's depth, end to end
    steps = {arm: a["runs"][0]["steps"] for arm, a in arms.items()}  # end to end at full depth for dblocks' steps
    assert steps["e2e-steps-d4-B2"] == steps["dblocks-d4-B2"] == 2 * steps["e2e-d4"]
    assert arms["e2e-steps-d4-B2"]["runs"][0]["depth"] == 4
    assert all(r["test"]["n"] == 128 for a in arms.values() for r in a["runs"])  # the whole test split
    assert len(report["verdict"]["test"]) == 5 and "e2e-d4 - control-d4-B2" in report["verdict"]["test"][0]
    assert any(line.startswith("dblocks-d4-B2 - e2e-steps-d4-B2 = ") for line in report["verdict"]["test"])
    out = capsys.readouterr().out
    assert "test split:" in out and "| dblocks-d4-B2 | dblocks B=2 | 4 |" in out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "hops.png").stat().st_size > 1000
    test_file = Path(dblocks["runs"][0]["run"]) / "test.json"
    before = test_file.stat().st_mtime_ns
    bench.main()  # a re-run reuses every run and each cached test score
    assert test_file.stat().st_mtime_ns == before


def test_a_per_block_job_of_a_model_with_a_mask_buffer_trains(tmp_path):
    """The other blocks of a per-block job are shapes only (meta), their buffers too: placing the model on the
    device leaves those alone (a non-empty mask buffer in every layer's block, hops.attention=memory)."""
    cfg = tiny("train.method=dblocks", "hops.attention=memory", "blocks.shared_stem_head=false",
               "dblocks.block_choice=round-robin", "train.blocks=1", "train.steps=4")
    results = train(cfg, tmp_path / "job1", progress=False)
    assert results["block_updates"][1] > 0 and results["block_updates"][0] == 0
