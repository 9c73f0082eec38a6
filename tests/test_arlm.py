"""Autoregressive language modelling as DiffusionBlocks (issue 13): the noisy/clean layout, the denoiser and its
loss, the Euler chain and its bridge, generation with key/value caches, the metrics a run reports, the planner,
and `compare --task arlm`, on the tests' small corpus (lm-tiny sizes: seconds)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_plan_matches, language_model, randomized

from diffusionblocks.cli import main
from diffusionblocks.compare import compare
from diffusionblocks.config import apply_overrides, load_preset, validate
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.models import NoisyCleanStem, noisy_clean_layout
from diffusionblocks.nn import KVCache
from diffusionblocks.plan import Spec, configurations, measure_all
from diffusionblocks.run import load_model
from diffusionblocks.tasks import get_task
from diffusionblocks.tasks.arlm import along_blocks, along_chain, distinct_n
from diffusionblocks.tasks.arlm_models import ARDiffusionLM, AutoregressiveLM
from diffusionblocks.train import train

V = 27  # the text8 alphabet


def model_cfg(*overrides):
    cfg = load_preset("lm-tiny")
    cfg.task = "arlm"
    return apply_overrides(cfg, ["data.seq_len=12", "chain.input_flip=0", "chain.input_mix=0", *overrides])


LEVELS = ["token", "window"]


@pytest.mark.parametrize("level", LEVELS)
def test_noisy_tokens_see_themselves_and_earlier_clean_tokens_only(level):
    """Perturbing x_j for j >= i leaves z_i's output unchanged; for j < i it changes it; perturbing any noisy
    token leaves every clean output unchanged (the clean stream never reads a noisy token)."""
    model = randomized(language_model(ARDiffusionLM, model_cfg(f"arlm.noise_level={level}"), V)).eval()
    T, Dy = 12, model.labels.table.shape[1]
    x = torch.randint(V, (2, T), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, T, Dy, generator=torch.Generator().manual_seed(1))
    sigma = model.levels_like(x, 1.0)
    stem = model.stack.stem

    def hidden(x, z):
        h, cond = stem(z, torch.log(sigma) / 4, x)
        for layer in model.stack.blocks[0].layers:
            h = layer(h, cond)
        return h  # (N, 2T, D): noisy half, then clean half

    base = hidden(x, z)
    for j in (0, 5, T - 1):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1) % V
        out = hidden(x2, z)
        noisy_diff = (out[:, :T] - base[:, :T]).abs().amax(dim=(0, 2))
        assert torch.all(noisy_diff[:j + 1] == 0), (j, noisy_diff)  # z_i with i <= j does not see x_j
        assert torch.all(noisy_diff[j + 1:] > 1e-6), (j, noisy_diff)  # z_i with i > j does
        z2 = z.clone()
        z2[:, j] += 1.0
        out = hidden(x, z2)
        assert torch.equal(out[:, T:], base[:, T:])  # no clean output reads a noisy token
        changed = (out[:, :T] - base[:, :T]).abs().amax(dim=(0, 2)) > 0
        assert changed.tolist() == [i == j for i in range(T)]  # a noisy token is read by itself only


def test_both_copies_of_a_position_share_its_id():
    layout = noisy_clean_layout(5)
    assert layout.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    stem = NoisyCleanStem(V, 5, 8, 4, learned_positions=True)
    with torch.no_grad():
        stem.noisy_in.weight.zero_()
        stem.noisy_in.bias.zero_()
        stem.embed.weight.zero_()
        stem.noise.mlp[2].weight.zero_()
        stem.noise.mlp[2].bias.zero_()
    h, _ = stem(torch.zeros(1, 5, 4), torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.long))
    assert torch.equal(h[0, :5], stem.pos[0]) and torch.equal(h[0, 5:], stem.pos[0])


def test_the_bridge_uses_the_normalised_rows():
    model = language_model(ARDiffusionLM, model_cfg(), V)
    with torch.no_grad():
        model.labels.table.mul_(torch.linspace(0.5, 3.0, V)[:, None])  # rows of many norms
    logits = torch.randn(4, 3, V)
    unit = F.normalize(model.labels.table, dim=-1)
    assert torch.allclose(model.bridge(logits, "soft"), logits.softmax(-1) @ unit, atol=1e-6)
    assert torch.allclose(model.bridge(logits, "hard"), unit[logits.argmax(-1)])
    assert torch.allclose(model.bridge(logits, "unit"), F.normalize(logits.softmax(-1) @ unit, dim=-1), atol=1e-6)
    assert torch.allclose(model.bridge(logits, "unit").norm(dim=-1), torch.ones(4, 3))
    with pytest.raises(ValueError, match="bridge='raw'"):
        model.bridge(logits, "raw")
    sure = F.one_hot(torch.tensor([7]), V).float() * 100
    assert math.isclose(model.bridge(sure, "soft").norm().item(), 1.0, abs_tol=1e-5)  # not row 7's raw norm
    assert model.bridge(torch.zeros(1, V), "soft").norm() < 0.5  # a flat softmax shrinks the estimate


@pytest.mark.parametrize("level", LEVELS)
def test_one_block_per_euler_step_per_token(level):
    cfg = model_cfg(f"arlm.noise_level={level}", "blocks.num_blocks=2", "chain.steps_per_block=2")
    model = randomized(language_model(ARDiffusionLM, cfg, V))
    calls, real = [], model.decode_step

    def counted(block, z, sigma, x_new, cache):
        calls.append((block, sigma))
        return real(block, z, sigma, x_new, cache)

    model.decode_step = counted
    out = model.sample(3, 7, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 7) and out[:, :2].tolist() == [[1, 2]] * 3
    steps = model.steps()
    assert len(steps) == 4 and [b for _, _, b in steps] == [0, 0, 1, 1]
    assert calls == [(b, s) for _ in range(5) for s, _, b in steps]  # 5 new tokens x 4 steps, one block each
    assert all(int(model.partition.route(torch.tensor(s, dtype=torch.float64))) == b for b, s in calls)


@pytest.mark.parametrize("level,positions", [("token", "rope"), ("window", "rope"), ("token", "learned")])
def test_the_cache_gives_the_logits_of_a_full_forward_pass(level, positions):
    """DiffusionBlocks: D of a noisy token decoded after cached clean tokens equals D at that position of the whole
    window's forward pass; greedy generation is what the teacher-forced chain predicts. End to end: the same."""
    cfg = model_cfg(f"arlm.noise_level={level}", f"model.positions={positions}")
    model = randomized(language_model(ARDiffusionLM, cfg, V)).eval()
    T, Dy = 12, model.labels.table.shape[1]
    x = torch.randint(V, (2, T), generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, T, Dy, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for block in (0, 1):
            full = model.denoise(block, z, model.levels_like(x, 0.7), x)  # (N, T, Dy)
            cache = KVCache()
            for i in (0, 1, 2, 3, 7, 8, T - 1):  # the clean tokens one at a time, and several at once (3 -> 7)
                d = model.decode_step(block, z[:, i:i + 1], 0.7, x[:, cache.length:i], cache)
                assert cache.length == i
                assert torch.allclose(d[:, 0], full[:, i], atol=1e-5), (block, i)
    greedy = model.sample(2, T, temperature=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.chain(greedy).argmax(-1), greedy)
    e2e = randomized(language_model(AutoregressiveLM, model_cfg(f"model.positions={positions}"), V)).eval()
    tokens = e2e.sample(2, T + 3, temperature=0)  # past the window: recomputed, not cached
    assert torch.equal(e2e.logits(tokens[:, :T]).argmax(-1), tokens[:, :T])
    cache, logits = KVCache(), e2e.logits(tokens[:, :T])
    with torch.no_grad():
        first = e2e.decode(torch.cat([torch.full((2, 1), V), tokens[:, :4]], 1), cache)  # [BOS] + 4 tokens
        rest = torch.cat([e2e.decode(tokens[:, i:i + 1], cache) for i in range(4, T - 1)], 1)
    assert torch.allclose(torch.cat([first, rest], 1), logits, atol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
def test_a_block_step_trains_its_own_block_on_its_own_levels(level):
    cfg = model_cfg(f"arlm.noise_level={level}", "blocks.shared_stem_head=false")
    model = randomized(language_model(ARDiffusionLM, cfg, V), std=0.05)
    drawn = []
    real = model.partition.sample
    model.partition.sample = lambda b, n, g=None, device=None: drawn.append((b, n)) or real(b, n, g, device)
    x = torch.randint(V, (4, 12))
    loss = model.block_loss(1, x, torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert drawn == [(1, 48 if level == "token" else 4)]  # a level per noisy token, or per window
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    DBlocks(model, cfg, 4).step((x,), block=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("stack.blocks.1.", "readouts.1.")) for n in changed), changed


def test_sigma_data_is_a_setting_of_the_preconditioning():
    x = torch.randint(V, (4, 12))
    models = {sd: randomized(language_model(ARDiffusionLM, model_cfg(f"arlm.sigma_data={sd}"), V), std=0.05)
              for sd in (0.5, 0.072)}
    assert [m.stack.precond.sigma_data for m in models.values()] == [0.5, 0.072]
    # the same weights and noise, another c_skip/c_out/c_in: another loss
    models[0.072].load_state_dict(models[0.5].state_dict())
    losses = [m.block_loss(1, x, torch.Generator().manual_seed(0)) for m in models.values()]
    assert not torch.allclose(*losses)


def test_the_loss_weight_is_a_setting():
    x = torch.randint(V, (4, 12))
    losses = {}
    for weight in ("none", "edm"):
        model = randomized(language_model(ARDiffusionLM, model_cfg(f"chain.loss_weight={weight}"), V), std=0.05)
        losses[weight] = model.block_loss(0, x, torch.Generator().manual_seed(0))
    # block 0 owns the largest sigma, where w = 1 / c_out^2 is about 4: the weighted loss is larger
    assert torch.all(losses["edm"] > 2 * losses["none"])


def test_runs_report_their_own_metrics(corpus, tmp_path):
    """A DiffusionBlocks arlm run reports the cross-entropy at sigma_max and next-token accuracy (never bits per
    character: it has no likelihood); an end-to-end run exact bits per character and the same accuracy."""
    common = [f"data.name={corpus}", "train.steps=30", "data.test_limit=8"]
    db = train(apply_overrides(model_cfg("train.method=dblocks"), common), tmp_path / "db", progress=False)
    for key in ("test_ce_sigma_max", "test_chain_ce", "test_next_token_accuracy", "test_accuracy_per_step",
                "test_bridge_norm_per_step", "test_top1_last"):
        assert key in db, key
    assert "test_bpc" not in db and db["eval_draws"] == 1  # init zero: one deterministic chain
    assert db["test_ce_sigma_max"] < math.log(V) and 0 < db["test_next_token_accuracy"] <= 1
    assert len(db["test_accuracy_per_step"]) == 2 and db["test_accuracy_per_step"][-1] == db["test_next_token_accuracy"]
    # each block's figure along the chain (one step per block), block 0's beside the headline
    assert db["test_accuracy_per_block"] == db["test_accuracy_per_step"] and db["block_per_step"] == [0, 1]
    assert db["test_chain_ce_per_block"] == db["test_chain_ce_per_step"]
    assert db["test_chain_ce_per_step"][-1] == db["test_chain_ce"]
    assert (db["test_block0_accuracy"], db["test_block0_chain_ce"]) == (db["test_accuracy_per_step"][0],
                                                                        db["test_chain_ce_per_step"][0])
    line = get_task("arlm").summary(db)
    acc = " / ".join(f"{100 * a:.2f}" for a in db["test_accuracy_per_step"])
    ce = " / ".join(f"{c:.4f}" for c in db["test_chain_ce_per_step"])
    assert f"(after blocks 0 / 1: {acc}%)" in line and f"(after blocks 0 / 1: {ce})" in line, line
    e2e = train(apply_overrides(model_cfg("train.method=e2e"), common), tmp_path / "e2e", progress=False)
    assert {"test_bpc", "test_ce", "test_next_token_accuracy"} <= set(e2e) and "test_ce_sigma_max" not in e2e
    assert e2e["test_bpc"] < math.log2(V) - 0.3
    noisy = get_eval(tmp_path / "db", init="noise")
    assert noisy["eval_draws"] == 4  # arlm.eval_draws chains of a random start
    assert "one chain's own argmax" in get_task("arlm").describe_score(noisy)  # apart from the averaged one
    with pytest.raises(ValueError, match="--init"):
        get_eval(tmp_path / "e2e", init="noise")
    assert main(["sample", str(tmp_path / "e2e"), "--init", "noise", "--out", str(tmp_path / "s.txt")]) == 2


def test_accuracy_is_that_of_the_chains_averaged_prediction():
    """With M chains from noise, the hits after every step are those of the argmax of the chains' averaged
    probabilities (the distribution the chain cross-entropy scores), not the mean of each chain's own argmax, which
    is reported apart; the chain cross-entropy after every step is -log of the same average at the true token."""
    model = randomized(language_model(ARDiffusionLM, model_cfg("chain.steps_per_block=2"), V)).eval()
    N, T, M = 6, 12, 5
    x = torch.randint(V, (N, T), generator=torch.Generator().manual_seed(0))
    calls, real = [], model.step_logits
    model.step_logits = lambda *args: calls.append(real(*args).float()) or calls[-1]
    stats = model.window_stats(x, None, torch.Generator().manual_seed(1), draws=M, init="noise")
    logits = torch.stack(calls[1:]).view(4, M, N, T, V)  # (step, chain, N, T, V), after the sigma_max call
    probs = logits.softmax(-1)
    averaged = (probs.mean(1).argmax(-1) == x).double().sum((1, 2))
    own = (logits.argmax(-1) == x).double().sum((2, 3)).mean(1)
    assert torch.equal(stats["hits_per_step"], averaged) and stats["hits"] == averaged[-1]
    assert torch.isclose(stats["single_chain_hits"], own[-1])
    assert not torch.equal(averaged, own)  # here the two differ, so the test tells them apart
    nats = -probs.gather(-1, x.expand(4, M, N, T)[..., None]).squeeze(-1).double().mean(1).log().sum((1, 2))
    assert torch.allclose(stats["chain_nats_per_step"], nats) and stats["chain_ce"] == stats["chain_nats_per_step"][-1]


def test_figures_along_the_chain():
    """A block's figure is the one after its last step; a block that runs no step (a karras grid) has none."""
    assert along_blocks([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], 2) == [0.2, 0.4]
    assert along_blocks([0.1, 0.2], [0, 2], 3) == [0.1, None, 0.2]
    score = {"accuracy_per_block": [0.392, None, 0.36], "accuracy_per_step": [0.392, 0.36]}
    assert along_chain(score, "accuracy", 100, ".1f", "%") == " (after blocks 0 / 1 / 2: 39.2 / - / 36.0%)"
    assert along_chain({"chain_ce_per_block": [2.0], "chain_ce_per_step": [3.0, 2.0]}, "chain_ce", 1, ".1f") == \
        " (after steps 1 to 2: 3.0 / 2.0)"  # one block (recurrent depth): its steps
    assert along_chain({}, "accuracy", 100, ".1f") == ""  # an older run's results


def get_eval(run, **options):
    from diffusionblocks.run import evaluate

    cfg, model, data = load_model(run)
    return evaluate(model, data, cfg, **options)


def test_settings_are_checked():
    for override, key in (("arlm.noise_level=layer", "arlm.noise_level"), ("arlm.eval_draws=0", "arlm.eval_draws"),
                          ("arlm.temperature=-1", "arlm.temperature")):
        with pytest.raises(ValueError, match=key):
            validate(model_cfg(override))


def test_distinct_n():
    assert distinct_n(torch.tensor([[1, 1, 1, 1]]), (1, 2)) == [0.25, 1 / 3]
    assert distinct_n(torch.tensor([[1, 2, 3], [3, 2, 1]]), (1, 3)) == [0.5, 1.0]


@pytest.mark.parametrize("overrides", [[], ["arlm.noise_level=window", "model.positions=learned",
                                             "blocks.shared_stem_head=false"]])
def test_planner_predicts_autoregressive_blocks(overrides):
    """Twice the window through every layer, the (2T)^2 mask, the stem, head, readout and noise embedding: the
    activations to the byte (within 2% with checkpointing). The defaults (a level per token, rotary positions, one
    stem and head), and each of them changed at once (a level per window, a learned position table, a stem and
    head per block): every setting the planner models is in one of the two."""
    cfg = apply_overrides(model_cfg("train.batch_size=4", "data.seq_len=32"), overrides)
    result = measure_all(Spec.of(cfg), configurations(2, (2,)), progress=False)
    assert_plan_matches(result)


def test_compare_runs_the_four_arms_and_measures_generation(corpus, tmp_path):
    base = apply_overrides(model_cfg(), [f"data.name={corpus}", "train.steps=4", "data.test_limit=4"])
    report = compare(base, tmp_path / "cmp", [0], progress=False)
    assert list(report["rows"]) == ["e2e", "e2e-steps", "control", "dblocks"]
    assert report["metric"] == "test_next_token_accuracy"
    rows = report["rows"]  # end to end for DiffusionBlocks' steps: B times the others' layer-updates
    B = rows["dblocks"]["num_blocks"]
    assert rows["e2e-steps"]["steps"] == rows["dblocks"]["steps"] == B * rows["e2e"]["steps"]
    assert report["generation_slowdown"] > 0 and set(report["generation_seconds_per_token"]) == {"e2e", "dblocks"}
    gen = report["generation"]
    assert {"real test text", "e2e", "e2e-steps", "control", "dblocks", "dblocks-noise", "dblocks-t0.5",
            "dblocks-t2"} == set(gen)
    assert all(len(g["distinct"]) == 4 and g["perplexity_by_e2e"] > 1 for g in gen.values())
    assert len(report["dblocks_chain"]["bridge_norm_per_step"]) == 2
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "cross-entropy at sigma_max" in md and "exact cross-entropy" in md
    assert (tmp_path / "cmp" / "samples-dblocks.txt").read_text().startswith("=== sample 0 ===")


def test_cli_trains_evaluates_and_samples_autoregressive_blocks(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--task", "arlm", "--method", "dblocks", "--preset", "lm-tiny", "--data", str(corpus),
                 "--out", run, "--no-progress", "train.steps=4", "data.test_limit=4"]) == 0
    capsys.readouterr()
    assert main(["eval", run, "--json", "--init", "noise", "--steps-per-block", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eval_draws"] == 4 and len(out["accuracy_per_step"]) == 4 and "ce_sigma_max" in out
    per_step = out["accuracy_per_step"]
    assert out["accuracy_per_block"] == [per_step[1], per_step[3]] == [out["block0_accuracy"], per_step[-1]]
    text = tmp_path / "s.txt"
    assert main(["sample", run, "--num", "2", "--length", "40", "--prompt", "the king", "--temperature", "0",
                 "--out", str(text)]) == 0  # past the 32-token window
    samples = text.read_text().split("=== sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("the king") for s in samples)
    assert samples[0].split("\n", 1)[1] == samples[1].split("\n", 1)[1]  # greedy: the same text
    assert main(["sample", run, "--num", "2", "--length", "10", "--init", "noise", "--out", str(text),
                 "--overwrite"]) == 0
    for flags, message in ((["--temperature", "-1"], "temperature"),
                           (["--sample-steps", "3"], "--sample-steps: not an option")):
        assert main(["sample", run, "--out", str(text), "--overwrite", *flags]) == 2
        assert message in capsys.readouterr().err


def test_sigma_max_share_moves_only_the_noisiest_blocks_levels():
    cfg = model_cfg("arlm.sigma_max_share=0.25", "blocks.num_blocks=2", "arlm.noise_level=token")
    model = language_model(ARDiffusionLM, cfg, V)
    seen = []
    real = model.denoise
    model.denoise = lambda block, z, sigma, x: seen.append(sigma) or real(block, z, sigma, x)
    x = torch.randint(V, (64, 12))
    top = model.partition.levels.hi
    for block in (0, 1):
        model.block_loss(block, x, torch.Generator().manual_seed(0))
        lo, hi = model.partition.training_interval(block)
        at_top = (seen[-1] == top).float().mean().item()
        if block == 0:
            assert 0.2 < at_top < 0.3  # a quarter of the 768 noisy tokens
        else:
            assert at_top == 0 and bool((seen[-1] <= hi + 1e-6).all())
    model.sigma_max_share = 0.0
    model.block_loss(0, x, torch.Generator().manual_seed(0))
    assert (seen[-1] == top).float().mean().item() < 0.01  # the paper's density: (almost) never there


def test_a_local_tokenizer_file_replaces_the_trained_bpe(corpus, tmp_path):
    """data.tokenizer_file: a Hugging Face tokenizer.json read from disk (the GPU preset's GPT-2 tokenizer, say)."""
    from diffusionblocks.tasks.lm import load_text
    from diffusionblocks.text import BPETokenizer, TextDataError, load_corpus

    trained = BPETokenizer.from_corpus(load_corpus(str(corpus)), vocab_size=300)
    path = tmp_path / "tokenizer.json"
    trained.tokenizer.save(str(path))
    cfg = model_cfg(f"data.name={corpus}", "data.tokenizer=bpe", f"data.tokenizer_file={path}", "data.bpe_vocab=999")
    data = load_text(cfg)
    assert data.vocab_size == 300 and data.tokenizer.to_dict() == trained.to_dict()
    with pytest.raises(ValueError, match="needs data.tokenizer=bpe"):
        validate(model_cfg(f"data.tokenizer_file={path}"))
    (tmp_path / "bad.json").write_text("{}")
    for bad, message in ((tmp_path / "missing.json", "no such tokenizer file"), (tmp_path / "bad.json", "not a Hug")):
        with pytest.raises(TextDataError, match=message):
            load_text(model_cfg(f"data.name={corpus}", "data.tokenizer=bpe", f"data.tokenizer_file={bad}"))
