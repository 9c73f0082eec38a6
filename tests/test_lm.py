"""Language models (issue 12): the LM backbone, masked diffusion (mdlm) end to end and as DiffusionBlocks, the
autoregressive floor (arlm), bits per character, sampling, and the command line, on a small text file the tests
write (lm-tiny preset: seconds)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_plan_matches, language_model, randomized

from diffusionblocks import io
from diffusionblocks.cli import main
from diffusionblocks.compare import compare
from diffusionblocks.config import RunConfig, apply_overrides, load_preset, validate
from diffusionblocks.jobs import merge
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.run import load_model
from diffusionblocks.run import validate as validate_run
from diffusionblocks.tasks import get_task
from diffusionblocks.tasks.arlm_models import AutoregressiveLM
from diffusionblocks.tasks.lm import TextData, eval_windows
from diffusionblocks.tasks.mdlm import MaskedDiffusionLM
from diffusionblocks.text import Text8Tokenizer
from diffusionblocks.train import train

V = 27  # the text8 alphabet


def tiny(corpus, method="dblocks", task="mdlm", *overrides) -> RunConfig:
    cfg = load_preset("lm-tiny")
    cfg.task = task
    cfg.train.method = method
    return apply_overrides(cfg, [f"data.name={corpus}", *overrides])


def model_cfg(*overrides) -> RunConfig:
    cfg = load_preset("lm-tiny")
    return apply_overrides(cfg, list(overrides))


def test_masking_rate_matches_alpha():
    for schedule in ("linear", "cosine"):
        model = language_model(MaskedDiffusionLM, model_cfg(f"mdlm.schedule={schedule}"), V, num_blocks=1)
        x = torch.randint(V, (64, 256))
        gen = torch.Generator().manual_seed(0)
        for t in (0.1, 0.5, 0.9):
            a = model.alpha(torch.tensor([t], dtype=torch.float64))
            expected = 1 - ((1 - 2e-4) * (1 - t if schedule == "linear" else math.cos(math.pi * t / 2)) + 1e-4)
            assert a.item() == pytest.approx(1 - expected)
            _, masked = model.corrupt(x, torch.full((64,), t, dtype=torch.float64), None, gen)
            assert masked.float().mean().item() == pytest.approx(expected, abs=0.015)  # 16,384 tokens
    ends = model.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.tolist() == pytest.approx([1 - 1e-4, 1e-4])  # MD4's shift: never exactly clean or all masked


def test_block_loss_equals_a_hand_computed_elbo(monkeypatch):
    """t = 0.5, positions 0 and 2 of x = (0, 1, 2) masked, a predictor with fixed probabilities (.4, .3, .2, .1):
    nats per token = (1 - 2 eps) / (1 - alpha(0.5)) * (-ln .4 - ln .2) / 3."""
    model = language_model(MaskedDiffusionLM, model_cfg(), 4, num_blocks=1)
    x = torch.tensor([[0, 1, 2]])
    masked = torch.tensor([[True, False, True]])
    half = torch.tensor([0.5], dtype=torch.float64)
    monkeypatch.setattr(model, "training_times", lambda block, n, generator=None: half)
    monkeypatch.setattr(model, "corrupt", lambda x, t, pad, generator: (torch.where(masked, 4, x), masked))
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    monkeypatch.setattr(model.stack, "denoise", lambda block, z, t, cond=None: probs.log().expand(1, 3, 4))
    eps = 1e-4
    hand = (1 - 2 * eps) / (1 - 0.5) * (-math.log(0.4) - math.log(0.2)) / 3
    assert model.loss(x).item() == pytest.approx(hand, rel=1e-6)
    assert model.weight(torch.tensor([0.25], dtype=torch.float64)).item() == pytest.approx(1 / 0.25, rel=1e-3)  # ~1/t


def test_a_uniform_predictor_scores_log2_V_bits_per_token():
    tokens = np.random.default_rng(0).integers(0, V, 400 * 64).astype(np.uint8)
    data = TextData("toy", Text8Tokenizer(), {"test": tokens}, {"test": len(tokens)}, 64)
    cfg = model_cfg("data.seq_len=64", "data.test_limit=0", "mdlm.eval_t=4", "train.eval_batch_size=200")
    for model in (language_model(AutoregressiveLM, cfg, V), language_model(MaskedDiffusionLM, cfg, V)):
        embed = model.stack.stem.embed if isinstance(model, MaskedDiffusionLM) else model.stem.embed
        embed.weight.data.zero_()  # the tied head then gives logits 0: uniform over the V tokens
        ev = get_task("mdlm").evaluate(model, data, cfg)  # any LM task: evaluation asks the model for its nats
        assert ev["tokens"] == ev["chars"] == len(tokens) and ev["n"] == 400
        if isinstance(model, AutoregressiveLM):
            assert ev["bpc"] == pytest.approx(math.log2(V), rel=1e-6)  # exact
        else:  # the bound's expectation is exactly n ln V (shift terms included); a Monte Carlo estimate of it
            assert ev["bpc"] == pytest.approx(math.log2(V), rel=0.04)


def test_bidirectional_attention_sees_everything_and_causal_cannot_see_the_future():
    cfg = model_cfg("data.seq_len=16")
    x = torch.randint(V, (2, 16))
    later = x.clone()
    later[:, 10:] = (later[:, 10:] + 1) % V
    mdlm = randomized(language_model(MaskedDiffusionLM, cfg, V, num_blocks=1)).eval()
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(mdlm.stack(x, t)[:, 0], mdlm.stack(later, t)[:, 0])  # position 0 sees token 10
        ar = randomized(language_model(AutoregressiveLM, cfg, V)).eval()
        a, b = ar.logits(x), ar.logits(later)
    assert torch.allclose(a[:, :11], b[:, :11], atol=1e-6)  # position i reads [BOS] + x_<i: 0..10 see no change
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_rotary_positions_are_relative_exact_in_gradient_and_save_nothing():
    from diffusionblocks.memory import saved_activation_bytes
    from diffusionblocks.nn import Attention, Rotary, rotary_tables

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 6, 3, 2, 4, dtype=torch.float64, requires_grad=True, generator=g)
    cos, sin = rotary_tables(6, 4, "cpu", torch.float64)
    assert torch.autograd.gradcheck(lambda t: Rotary.apply(t, cos, sin), (qkv,))
    # the same query and key at every position: q_p . k_r depends on p - r only, and not on p alone
    x = torch.zeros(1, 6, 3, 1, 4, dtype=torch.float64)
    x[:, :, 0, 0], x[:, :, 1, 0] = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g,
                                                                                                dtype=torch.float64)
    r = Rotary.apply(x, cos, sin)[0, :, :, 0]
    dots = r[:, 0] @ r[:, 1].T  # (positions of q, positions of k)
    for offset in (-2, 0, 3):
        diag = torch.diagonal(dots, offset)
        assert torch.allclose(diag, diag[0].expand_as(diag))
    assert not torch.allclose(dots[0, 0], dots[0, 3])
    # rope changes what attention computes, not what it keeps for backward
    h = torch.randn(3, 6, 8, requires_grad=True)
    plain, rope = Attention(8, 2), Attention(8, 2, rope=True)
    rope.load_state_dict(plain.state_dict())
    saved = [saved_activation_bytes(lambda m=m: m(h).sum(), list(m.parameters()))[0] for m in (plain, rope)]
    assert saved[0] == saved[1]
    assert not torch.allclose(plain(h), rope(h))
    # positions: an image model refuses rope, a language model with rope has no learned position table
    with pytest.raises(ValueError, match="learned positions"):
        validate_run(apply_overrides(load_preset("tiny"), ["model.positions=rope"]))
    has_table = lambda model: any(name.endswith("stem.pos") for name, _ in model.named_parameters())
    assert not has_table(language_model(MaskedDiffusionLM, model_cfg("model.positions=rope"), V))
    assert has_table(language_model(MaskedDiffusionLM, model_cfg("model.positions=learned"), V))
    assert not has_table(language_model(AutoregressiveLM, model_cfg("model.positions=rope"), V))


def test_noisy_clean_layout_sees_what_block_diffusion_allows_and_shares_position_ids():
    """Issue 13's attention: [z ; x] with z_i -> {z_i, x_<i} and x_i -> x_<=i; both copies of i at position i."""
    from diffusionblocks.models import noisy_clean_layout
    from diffusionblocks.nn import SequenceLayer

    torch.manual_seed(0)
    T, D = 6, 16
    layers = [randomized(SequenceLayer(D, 2, D, 2.0, rope=True)).eval() for _ in range(2)]
    layout = noisy_clean_layout(T)
    c = torch.randn(1, D)

    def run(z, x):
        h = torch.cat([z, x], dim=1)
        for layer in layers:
            h = layer(h, (c, layout))
        return h[:, :T], h[:, T:]

    z, x = torch.randn(1, T, D), torch.randn(1, T, D)
    with torch.no_grad():
        out_z, out_x = run(z, x)
        i = 3
        later = x.clone()
        later[:, i:] += torch.randn(1, T - i, D)  # x_j for j >= i (random: LayerNorm would erase a constant)
        assert torch.allclose(run(z, later)[0][:, i], out_z[:, i], atol=1e-6)  # z_i does not see x_>=i
        earlier = x.clone()
        earlier[:, i - 1] += torch.randn(1, D)
        assert not torch.allclose(run(z, earlier)[0][:, i], out_z[:, i])  # z_i sees x_<i
        assert torch.allclose(run(torch.randn(1, T, D), x)[1], out_x, atol=1e-6)  # no clean token reads a noisy one
        # shared ids: with z = x, z_i sees {x_i, x_<i} at the same positions as x_i sees x_<=i: equal outputs
        same_z, same_x = run(x, x)
        assert torch.allclose(same_z, same_x, atol=1e-5)
    assert layout.positions.tolist() == list(range(T)) * 2


def test_padding_is_never_masked_scored_or_seen():
    cfg = model_cfg("data.seq_len=16")
    x = torch.randint(V, (4, 16))
    pad = torch.zeros(4, 16, dtype=torch.bool)
    pad[:, 12:] = True
    other = x.clone()
    other[pad] = (other[pad] + 5) % V
    mdlm = randomized(language_model(MaskedDiffusionLM, cfg, V, num_blocks=2)).eval()
    _, masked = mdlm.corrupt(x.repeat(50, 1), torch.ones(200, dtype=torch.float64), pad.repeat(50, 1),
                             torch.Generator().manual_seed(0))
    assert not (masked & pad.repeat(50, 1)).any()
    assert masked[~pad.repeat(50, 1)].float().mean() > 0.99  # t = 1: all but padding (and eps of the rest)
    ar = randomized(language_model(AutoregressiveLM, cfg, V)).eval()
    with torch.no_grad():
        for model in (mdlm, ar):
            nats = [model.sequence_nats(v, pad, generator=torch.Generator().manual_seed(0)) for v in (x, other)]
            assert torch.equal(nats[0], nats[1])
    # the last evaluation window of a split is padded, and every token is scored once
    batches, windows, covered = eval_windows(np.arange(40) % V, 16, 2)
    got = list(batches)
    assert windows == 3 and covered == 40 and got[-1][1].sum() == 8 and got[0][1].sum() == 0


def test_tied_embedding_is_saved_once_and_reloads_tied(corpus, tmp_path):
    for shared in ("true", "false"):
        run = tmp_path / shared
        train(tiny(corpus, "dblocks", "mdlm", "train.steps=2", f"blocks.shared_stem_head={shared}"), run,
              progress=False)
        with open(run / "model.safetensors", "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        ties = json.loads(header["__metadata__"][io.TIED_KEY])
        assert set(ties.values()) & {k for k in header if k.endswith("embed.weight")}  # one copy in the file
        assert not any(k in header for k in ties)
        _, model, _ = load_model(run)
        pairs = [(model.stack.stem, model.stack.head)] if shared == "true" else \
            [(b.stem, b.head) for b in model.stack.blocks]
        assert all(stem.embed.weight is head.embed.weight for stem, head in pairs)
        saved, _ = io.load_safetensors(run / "model.safetensors")  # the alias comes back as the same tensor
        assert all(saved[k] is saved[src] for k, src in ties.items())
        assert torch.equal(pairs[0][1].embed.weight, saved[next(iter(ties.values()))])  # the trained values
    run = tmp_path / "ar"
    train(tiny(corpus, "e2e", "arlm", "train.steps=2", "train.ema=0.9"), run, progress=False)
    _, model, _ = load_model(run)  # from ema.safetensors: the averaged table, tied
    assert model.stem.embed.weight is model.head.embed.weight
    weights, _ = io.load_safetensors(run / "ema.safetensors")
    assert weights["stem.embed.weight"] is weights["head.embed.weight"]


def test_per_block_jobs_of_a_tied_model_merge(corpus, tmp_path):
    """Independent blocks each hold their own tied table: a job saves only its own blocks (the table under both of
    its names), and the merged model is tied again."""
    ind = ["train.steps=2", "blocks.shared_stem_head=false", "dblocks.block_choice=sequential"]
    jobs = [tmp_path / f"job{b}" for b in (0, 1)]
    for b, job in enumerate(jobs):
        train(tiny(corpus, "dblocks", "mdlm", *ind, f"train.blocks={b}"), job, progress=False)
        weights, _ = io.load_safetensors(job / "model.safetensors")
        assert {k.split(".")[2] for k in weights if k.startswith("stack.blocks.")} == {str(b)}
    merge(jobs, tmp_path / "merged")
    _, model, _ = load_model(tmp_path / "merged")
    assert all(blk.stem.embed.weight is blk.head.embed.weight for blk in model.stack.blocks)


def test_autoregressive_sampling_with_and_without_a_prompt():
    model = language_model(AutoregressiveLM, model_cfg(), V)
    g = torch.Generator().manual_seed(0)
    assert model.sample(2, 5, generator=g).shape == (2, 5)  # no prompt: the first token reads [BOS] alone
    prompt = torch.tensor([3, 4, 5])
    out = model.sample(2, 40, prompt, generator=g)  # past seq_len (32): a sliding window
    assert out.shape == (2, 40) and (out[:, :3] == prompt).all() and int(out.max()) < V


def test_one_block_call_per_sampling_step():
    model = language_model(MaskedDiffusionLM, model_cfg("blocks.num_blocks=2", "data.seq_len=16"), V)
    calls = []
    denoise = model.stack.denoise
    model.stack.denoise = lambda block, *a, **k: calls.append(block) or denoise(block, *a, **k)
    out = model.sample(3, 16, torch.tensor([1, 2]), steps=6, generator=torch.Generator().manual_seed(0))
    assert calls == [0, 0, 0, 1, 1, 1]  # block 0 owns the most masked end and runs first
    assert out.shape == (3, 16) and (out[:, :2] == torch.tensor([1, 2])).all() and (out < V).all()


def test_a_block_step_trains_only_its_block(corpus):
    for shared in (False, True):
        cfg = apply_overrides(model_cfg("blocks.num_blocks=2", "data.seq_len=16"),
                              [f"blocks.shared_stem_head={shared}"])
        model = language_model(MaskedDiffusionLM, cfg, V)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        DBlocks(model, cfg, 4).step((torch.randint(V, (8, 16)),), block=1)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all(n.startswith("stack.blocks.1.") or (shared and not n.startswith("stack.blocks."))
                               for n in changed), changed


def test_both_tasks_train_and_write_bits_per_character(corpus, tmp_path):
    for task, method in (("mdlm", "e2e"), ("mdlm", "dblocks"), ("arlm", "e2e")):
        results = train(tiny(corpus, method, task), tmp_path / f"{task}-{method}", progress=False)
        assert results["eval_split"] == "test" and results["test_n"] == 16
        assert results["test_bpc"] < math.log2(V) - 0.3  # it learned something in 30 steps
        assert ("eval_t" in results) == (task == "mdlm")
    held = train(tiny(corpus, "dblocks", "mdlm", "data.val_size=4", "train.steps=2"), tmp_path / "val", progress=False)
    assert "val_bpc" in held and "test_bpc" not in held and held["val_n"] == 4
    assert held["validation"]["from"] == "the corpus's validation split"
    # the tokenizer is saved with the run, and a run whose text changed since is refused, not decoded wrongly
    run = tmp_path / "mdlm-e2e"
    assert io.load_json(run / "tokenizer.json") == {"kind": "text8"}
    load_model(run)
    io.save_json(run / "tokenizer.json", {"kind": "chars", "chars": "abc"})
    with pytest.raises(ValueError, match="tokenizer differs"):
        load_model(run)


def test_config_keys_are_checked_and_old_configs_load():
    for override, key in (("data.tokenizer=words", "data.tokenizer"), ("mdlm.eps=0", "mdlm.eps"),
                          ("mdlm.schedule=sqrt", "mdlm.schedule"), ("mdlm.eval_t=0", "mdlm.eval_t")):
        with pytest.raises(ValueError, match=key):
            validate(apply_overrides(load_preset("lm-tiny"), [override]))
    old = load_preset("tiny").to_dict()
    del old["mdlm"]
    for k in ("tokenizer", "bpe_vocab", "seq_len"):
        del old["data"][k]
    assert RunConfig.from_dict(old).to_dict() == load_preset("tiny").to_dict()


def test_cli_train_eval_and_sample(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--task", "mdlm", "--preset", "lm-tiny", "--data", str(corpus), "--out", run,
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", run, "--json", "--eval-t", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eval_t"] == 1 and out["test_bpc"] == out["bpc"] > 0
    text = tmp_path / "s.txt"
    assert main(["sample", run, "--num", "3", "--length", "20", "--prompt", "the king", "--sample-steps", "4",
                 "--out", str(text)]) == 0
    samples = text.read_text().split("=== sample ")[1:]
    assert len(samples) == 3 and all(s.split("\n", 1)[1].startswith("the king") for s in samples)
    assert main(["sample", run, "--out", str(text), "--overwrite", "--cfg-scale", "2"]) == 2
    assert "--cfg-scale: not an option of mdlm runs" in capsys.readouterr().err


def test_compare_has_the_autoregressive_floor(corpus, tmp_path):
    base = tiny(corpus, "dblocks", "mdlm", "train.steps=4", "data.test_limit=4")
    report = compare(base, tmp_path / "cmp", [0], progress=False)
    assert list(report["rows"]) == ["e2e", "e2e-steps", "control", "dblocks", "arlm"]
    assert report["rows"]["arlm"]["method"] == "e2e" and report["rows"]["arlm"]["depth"] == 2
    assert set(report["gap_to_autoregressive"]) == {"e2e", "e2e-steps", "control", "dblocks"}
    assert "autoregressive floor" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.parametrize("task", ["mdlm", "arlm"])
def test_planner_predicts_language_models(task):
    """Parameters, gradients and optimizer state exact, and saved activations to the byte (within 2% with
    checkpointing): the tied head, the vocabulary's log-softmax and, for arlm, the causal mask each layer keeps."""
    from diffusionblocks.plan import Spec, configurations, measure_all

    cfg = apply_overrides(load_preset("lm-tiny"), ["train.batch_size=4"])
    cfg.task = task
    confs = configurations(2, (2,))
    result = measure_all(Spec.of(cfg), confs, progress=False)
    assert result["data"] == {"vocab_size": V}
    for row in result["rows"]:
        # autoregressive DiffusionBlocks runs the noisy and the clean copy of a window
        assert row["tokens"] == cfg.data.seq_len * (2 if task == "arlm" and row["method"] == "dblocks" else 1)
    assert_plan_matches(result)


def test_plan_cli_for_a_text_preset(capsys):
    assert main(["plan", "--preset", "lm-tiny", "--blocks", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "mdlm" and [r["name"] for r in out["rows"]][:3] == ["e2e", "e2e+ckpt1", "dblocks B=2 all"]
    assert main(["plan", "--preset", "lm-tiny", "--image-size", "32"]) == 2
    assert "--image-size: image options" in capsys.readouterr().err
    assert main(["plan", "--preset", "lm-tiny", "model.layer=prenorm"]) == 2
    assert "adaLN-zero layers only" in capsys.readouterr().err
