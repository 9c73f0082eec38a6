"""Recurrent depth: Huginn's distribution of recurrences and its truncated backpropagation, the tied core
under DiffusionBlocks training and a checkpoint round trip, the FLOP count against a hand count, the compute
ratios, and `compare --task recurrent`, on the tests' small corpus (seconds)."""

import json
import math

import pytest
import torch
from conftest import language_model, randomized
from safetensors.torch import load_file

from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides, load_preset, validate
from diffusionblocks.measure import compute_ratios, step_flops
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.run import load_model
from diffusionblocks.tasks import get_task
from diffusionblocks.tasks.recurrent import (
    REACH,
    HuginnLM,
    RecurrenceWindows,
    RecurrentConfig,
    RecurrentDiffusionLM,
    draw_recurrences,
    expected_huginn_flops,
)
from diffusionblocks.train import train

V = 27  # the text8 alphabet


def tiny(*overrides):
    return apply_overrides(load_preset("recurrent-quick"), [
        "model.width=16", "model.heads=2", "data.seq_len=12", "recurrent.mean_recurrence=3",
        "recurrent.backprop_depth=2", "recurrent.eval_recurrences=0", "train.batch_size=4", "train.eval_batch_size=8",
        "train.eval_limit=4",
        "data.test_limit=4", *overrides])


def test_recurrences_follow_huginns_distribution():
    """r = Poisson(exp(tau)) + 1, tau ~ N(ln r_bar - s^2 / 2, s^2): the empirical distribution of 40,000 draws
    against the exact one (the Poisson mixture integrated over tau), and E[r] = r_bar + 1."""
    rec = RecurrentConfig(mean_recurrence=8, recurrence_sigma=0.5)
    r = draw_recurrences(rec, 40_000, torch.Generator().manual_seed(0))
    assert r.min() >= 1 and abs(r.double().mean().item() - 9) < 0.1
    tau = torch.linspace(-6, 6, 4001, dtype=torch.float64) * 0.5 + math.log(8) - 0.125
    density = torch.exp(-0.5 * ((tau - math.log(8) + 0.125) / 0.5) ** 2)
    density /= density.sum()
    n = torch.arange(0, 60, dtype=torch.float64)
    rate = tau.exp()[:, None]
    poisson = torch.exp(n * rate.log() - rate - torch.lgamma(n + 1))  # P(r - 1 = n | tau)
    exact = (density[:, None] * poisson).sum(0)
    empirical = torch.bincount(r - 1, minlength=60)[:60].double() / len(r)
    assert 0.5 * (exact - empirical).abs().sum().item() < 0.02  # total variation
    shifted = RecurrentConfig(mean_recurrence=8, recurrence_sigma=0.0)  # no spread: Poisson(8) + 1
    assert abs(draw_recurrences(shifted, 40_000, torch.Generator().manual_seed(1)).double().var().item() - 8) < 0.3


def test_the_stream_draws_recurrences_resumably(corpus):
    cfg = tiny(f"data.name={corpus}")
    task = get_task("recurrent")
    data = task.load_data(cfg)
    a = task.stream(data, cfg, seed=3)
    assert isinstance(a, RecurrenceWindows)
    next(a)
    state = a.state_dict()
    first = next(a)
    b = task.stream(data, cfg, seed=3)
    b.load_state_dict(state)
    again = next(b)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    x, r, seed = first
    assert r.shape == seed.shape == (cfg.train.batch_size,) and bool((r == r[0]).all()) and r[0] >= 1


def test_only_the_last_k_iterations_carry_gradients():
    """With r = 6 and k = 2 the core runs six times, the first four without recording gradients; the prelude (the
    core's input at every iteration) still gets its gradient through the last two."""
    model = randomized(language_model(HuginnLM, tiny(), V))
    recorded = []
    model.core[0].register_forward_hook(lambda *_: recorded.append(torch.is_grad_enabled()))
    x = torch.randint(V, (2, 12), generator=torch.Generator().manual_seed(0))
    model.loss(x, torch.full((2,), 6), torch.zeros(2, dtype=torch.long)).mean().backward()
    assert recorded == [False] * 4 + [True] * 2
    assert model.prelude[0].attn.branch.qkv.weight.grad.abs().sum() > 0
    recorded.clear()
    model.loss(x, torch.full((2,), 1), torch.zeros(2, dtype=torch.long)).mean().backward()
    assert recorded == [True]  # fewer than k iterations: all of them carry gradients


def hand_flops(r, k, N, T, D, hidden, V, P, C, Cd, dblocks=False):
    """Matrix-product FLOPs (2 per multiply-add) of one training step, counted by hand. Per layer forward: adaLN's
    two modulations on c (N x D -> 3D), qkv, the scores and their product with v over the full T x T, the attention
    output, the MLP; backward: every weight's gradient, every input's gradient except adaLN's c (zeros, no
    gradient, end to end), the gated output projections recomputed once (nn.GatedResidual) and attention's five
    products (the scores recomputed). The adapter reads [state, prelude output]: 2D -> D."""
    M = N * T
    fwd = 12 * N * D * D + 8 * M * D * D + 4 * N * T * T * D + 4 * M * D * hidden
    bwd = 12 * N * D * D + 12 * M * D * D + 10 * N * T * T * D + 6 * M * D * D + 10 * M * D * hidden
    adapter_fwd, adapter_bwd = 4 * M * D * D, 8 * M * D * D
    g = min(r, k)
    total = (P + Cd) * (fwd + bwd) + 2 * M * D * V + 4 * M * D * V  # prelude, coda, the tied head
    total += g * (adapter_fwd + adapter_bwd + C * (fwd + bwd)) + (r - g) * (adapter_fwd + C * fwd)
    if dblocks:  # c is the noise embedding (a 256 -> D -> D MLP of each window's sigma): it gets gradients
        total += C * 12 * N * D * D + (2 * N * 256 * D + 2 * N * D * D) + (2 * N * 256 * D + 4 * N * D * D)
    return total


def test_the_flop_counter_matches_a_hand_count():
    cfg = tiny("model.width=8", "data.seq_len=4", "recurrent.core=2")
    sizes = dict(k=2, N=2, T=4, D=8, hidden=16, V=V, P=1, C=2, Cd=1)
    huginn, blocks = language_model(HuginnLM, cfg, V), language_model(RecurrentDiffusionLM, cfg, V)
    x, seed = torch.randint(V, (2, 4)), torch.zeros(2, dtype=torch.long)
    for r in (1, 2, 3, 5):
        assert step_flops(lambda r=r: huginn.loss(x, torch.full((2,), r), seed).mean().backward()) == \
            hand_flops(r, **sizes), r
    assert step_flops(lambda: blocks.block_loss(0, x).mean().backward()) == hand_flops(1, **sizes, dblocks=True)
    # the expectation over r: the hand count averaged over the same draws
    rec = cfg.recurrent
    expected = expected_huginn_flops(lambda r: hand_flops(r, **sizes), rec, draws=5_000)
    draws = draw_recurrences(rec, 5_000, torch.Generator().manual_seed(0))
    assert expected["mean"] == pytest.approx(sum(hand_flops(int(r), **sizes) for r in draws) / 5_000, rel=1e-12)


def test_tied_weights_stay_tied_after_a_dblocks_step_and_a_checkpoint(corpus, tmp_path):
    """The core is one set of layers: a DiffusionBlocks step trains it once, the checkpoint holds it once, and after
    loading, every Euler step (a recurrence) runs those same layers; the head stays the stem's table."""
    cfg = tiny(f"data.name={corpus}", "train.method=dblocks", "train.steps=3", "recurrent.eval_recurrences=4")
    model = randomized(language_model(RecurrentDiffusionLM, cfg, V), std=0.05)
    method = DBlocks(model, cfg, 3)
    before = model.core[0].attn.branch.qkv.weight.detach().clone()
    out = method.step((torch.randint(V, (4, 12)), torch.full((4,), 3), torch.zeros(4, dtype=torch.long)), 0)
    assert out["layers"] == 4 and not torch.equal(before, model.core[0].attn.branch.qkv.weight)
    assert model.head.embed is model.stem.embed
    train(cfg, tmp_path / "run", progress=False)
    _, loaded, _ = load_model(tmp_path / "run")
    assert loaded.head.embed.weight.data_ptr() == loaded.stem.embed.weight.data_ptr()
    calls = []
    for layer in loaded.core:
        layer.register_forward_hook(lambda module, *_: calls.append(id(module)))
    loaded.chain(torch.randint(V, (2, 12)))
    assert calls == [id(layer) for layer in loaded.core] * 4  # 4 recurrences, the same two layers each time
    saved = load_file(tmp_path / "run" / "model.safetensors")
    core_keys = [key for key in saved if key.startswith("core.")]
    assert core_keys and len(core_keys) == len(loaded.core.state_dict())


def test_runs_report_their_own_metrics(corpus, tmp_path):
    """Huginn's training reports exact bits per character at the evaluation's recurrences; DiffusionBlocks the
    labelled estimators, one accuracy per recurrence (Euler step); both next-token accuracy."""
    common = [f"data.name={corpus}", "train.steps=6"]
    e2e = train(tiny("train.method=e2e", *common), tmp_path / "e2e", progress=False)
    assert {"test_bpc", "test_ce", "test_next_token_accuracy"} <= set(e2e) and e2e["layer_updates"] == 6 * 6
    db = train(tiny("train.method=dblocks", *common), tmp_path / "db", progress=False)
    assert {"test_ce_sigma_max", "test_chain_ce", "test_next_token_accuracy"} <= set(db) and "test_bpc" not in db
    assert len(db["test_accuracy_per_step"]) == 3 and db["layer_updates"] == 6 * 4  # r_bar = 3 Euler steps
    # the known tokens' states are drawn, so even the zero start gives arlm.eval_draws chains, scored averaged
    assert db["eval_draws"] == 4 and db["test_accuracy_per_step"][-1] == db["test_next_token_accuracy"]
    assert db["test_chain_ce_per_step"][-1] == db["test_chain_ce"] and 0 <= db["test_single_chain_accuracy"] <= 1
    line = get_task("recurrent").summary(db)
    steps = " / ".join(f"{100 * a:.2f}" for a in db["test_accuracy_per_step"])
    assert f"after steps 1 to 3: {steps}%" in line and "one chain's own argmax" in line, line


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_each_position_reads_the_known_tokens_as_training_does(positions):
    """At inference position i's logits are training's forward pass (block_loss's denoise and read) on the states
    [known_<i, z_i]: the known tokens' states beside the chain's own, never another position's chain state."""
    model = randomized(language_model(RecurrentDiffusionLM, tiny(f"model.positions={positions}"), V)).eval()
    N, T, s = 3, 12, 0.7
    x = torch.randint(V, (N, T), generator=torch.Generator().manual_seed(0))
    z = torch.randn(N, T, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        context = model.chain_context(model.context(x), torch.Generator().manual_seed(2))
        logits, known = model.step_logits(0, z, s, context), model.known_states(context, s)
        for i in (0, 1, 5, T - 1):
            states = known.clone()
            states[:, i] = z[:, i]
            ref = model.read(model.denoise(states, torch.full((N,), s), model.encode(x)), model.encode(x)[1])
            assert torch.allclose(logits[:, i], ref[:, i], atol=1e-5), i
        z2 = z.clone()
        z2[:, 5] += 1.0
        changed = (model.step_logits(0, z2, s, context) - logits).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [i == 5 for i in range(T)]  # a chain's state is read at its own position only


def test_known_tokens_states_at_inference_follow_the_training_law():
    """What the core reads at a level sigma: in training (block_loss) and, at inference, at the known tokens, the
    states e_hat(x) + sigma eps with eps ~ N(0, I) (mean, spread and the mass within one sigma of the true
    embedding, over 9,216 coordinates), whatever the chains' states; the chains' states are read as they are."""
    model = randomized(language_model(RecurrentDiffusionLM, tiny(), V)).eval()
    N, T, D, s = 48, 12, 16, 0.7
    x = torch.randint(V, (N, T), generator=torch.Generator().manual_seed(0))
    seen = []  # the states the core reads: the adapter's input is [c_in z, e]
    model.adapter.register_forward_hook(lambda _, inputs, out: seen.append(inputs[0][..., :D] / model.precond.c_in(s)))
    model.partition.sample = lambda block, n, generator=None, device=None: torch.full((n,), s)
    with torch.no_grad():
        model.block_loss(0, x, generator=torch.Generator().manual_seed(1))
        for scale in (0.0, 3.0):  # two sets of chain states, the same draw of the known tokens' noise
            z = scale * torch.randn(N, T, D, generator=torch.Generator().manual_seed(2))
            model.step_logits(0, z, s, model.chain_context(model.context(x), torch.Generator().manual_seed(3)))
            assert seen[-1].shape == (N, 2 * T, D) and torch.allclose(seen[-1][:, :T], z, atol=1e-5)
    assert torch.equal(seen[1][:, T:], seen[2][:, T:])  # the known tokens' states do not depend on the chain's
    target = model.labels(x)
    for states in (seen[0], seen[1][:, T:]):  # training's, then inference's known tokens'
        r = (states - target) / s
        assert abs(r.mean().item()) < 0.04 and abs(r.std().item() - 1) < 0.03
        assert abs((r.abs() < 1).float().mean().item() - 0.6827) < 0.02


def test_settings_are_checked():
    task = get_task("recurrent")
    with pytest.raises(ValueError, match="model.depth"):
        task.check(tiny("recurrent.core=3"))
    with pytest.raises(ValueError, match="num_blocks"):
        task.check(tiny("blocks.num_blocks=2"))
    for override, key in (("recurrent.core=0", "core"), ("recurrent.backprop_depth=0", "backprop_depth"),
                          ("recurrent.mean_recurrence=0", "mean_recurrence"),
                          ("recurrent.dblocks_epochs=0", "dblocks_epochs")):
        with pytest.raises(ValueError, match=key):
            validate(tiny(override))


def curve(values, every):
    return [{"step": every * (i + 1), "next_token_accuracy": v, "ce": 3 - v, "chain_ce": 3 - v}
            for i, v in enumerate(values)]


def test_compute_ratios():
    """(a) per step, (b) over the arms' steps, (c) to the first curve point from which the DiffusionBlocks curve stays
    at or past the end-to-end arm's final figure (a crossing it falls back from does not count)."""
    compute = {"flops_per_step": {"e2e": 30.0, "dblocks": 10.0}, "seconds_per_step_mean": {"e2e": 2.0, "dblocks": 1.0}}
    runs = {"e2e": [{"seed": 0, "steps": 100, "curve": curve([0.1, 0.3], 50)}],
            "dblocks": [{"seed": 0, "steps": 300, "curve": curve([0.1, 0.31, 0.2, 0.3, 0.35, 0.4], 50)}]}
    ratios = lambda: compute_ratios(compute["flops_per_step"], compute["seconds_per_step_mean"], runs, "e2e", "dblocks",
                                    REACH)
    r = ratios()
    assert r["per_step"] == {"flops": 3.0, "seconds": 2.0}
    assert r["protocol"]["flops"] == pytest.approx(1.0) and r["protocol"]["seconds"] == pytest.approx(2 / 3)
    acc = r["reach"]["next-token accuracy"][0]
    assert acc["reached_at_step"] == 200 and acc["flops"] == pytest.approx(30 * 100 / (10 * 200))
    runs["dblocks"][0]["curve"] = curve([0.1, 0.2, 0.29], 100)
    assert ratios()["reach"]["cross-entropy"][0]["reached_at_step"] is None


def test_compare_measures_both_arms_compute(corpus, tmp_path, capsys):
    """`compare --task recurrent --json`: DiffusionBlocks and the plain control (an autoregressive model of the same
    layers, the core once) train 3 times the end-to-end steps; FLOPs per step of each arm, the three ratios, and
    each arm's quality lines."""
    assert main(["compare", "--task", "recurrent", "--preset", "recurrent-quick", "--data", str(corpus), "--json",
                 "--out", str(tmp_path / "cmp"), "--no-progress", "train.steps=2", "model.width=16",
                 "data.seq_len=12", "train.batch_size=4", "data.test_limit=4", "train.eval_limit=4",
                 "recurrent.mean_recurrence=3", "recurrent.backprop_depth=2"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("\n{\n") + 1:])  # after the table: compare.json's object
    assert report == json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = report["rows"]
    assert rows["dblocks"]["steps"] == rows["arlm"]["steps"] == 3 * rows["e2e"]["steps"] == 6
    assert rows["e2e-steps"]["steps"] == 6 and rows["e2e-steps"]["method"] == "e2e"  # Huginn at DiffusionBlocks' steps
    assert rows["e2e-steps"]["layer_updates"] == 3 * rows["e2e"]["layer_updates"]
    assert rows["arlm"]["depth"] == 4 and rows["arlm"]["method"] == "e2e"
    flops = report["flops_per_step"]
    assert set(flops) == {"e2e", "dblocks", "arlm"} and flops["e2e"] > flops["dblocks"] > flops["arlm"] > 0
    r = report["ratios"]
    assert r == report["compute"]["ratios"]
    assert r["per_step"]["flops"] == pytest.approx(flops["e2e"] / flops["dblocks"])
    assert r["protocol"]["flops"] == pytest.approx(r["per_step"]["flops"] / 3)
    assert set(r["reach"]) == {"next-token accuracy", "cross-entropy"}
    assert "(c) compute for DiffusionBlocks" in out and "exact cross-entropy" in out


def test_the_ratios_read_huginn_at_its_own_budget_whatever_the_arms_order(corpus, tmp_path):
    """With Huginn at DiffusionBlocks' steps named first, the ratios still compare Huginn's own budget (a third of
    DiffusionBlocks' steps) against DiffusionBlocks."""
    assert main(["compare", "--task", "recurrent", "--preset", "recurrent-quick", "--data", str(corpus),
                 "--methods", "e2e-steps,dblocks,e2e", "--out", str(tmp_path / "cmp"), "--no-progress",
                 "train.steps=2", "model.width=16", "data.seq_len=12", "train.batch_size=4", "data.test_limit=4",
                 "train.eval_limit=4", "recurrent.mean_recurrence=3", "recurrent.backprop_depth=2"]) == 0
    r = json.loads((tmp_path / "cmp" / "compare.json").read_text())["ratios"]
    assert r["protocol"]["flops"] == pytest.approx(r["per_step"]["flops"] / 3)  # 2 Huginn steps against 6
