"""Autoregressive language modelling, end to end and as DiffusionBlocks (docs/METHOD.md section 7): the task, its
presets and its compare report; the models and their config section (arlm.*) are tasks/arlm_models.py."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import io
from ..config import BackboneConfig, DataConfig, RunConfig, TrainConfig, load_preset, preset
from ..measure import interleaved_seconds
from .arlm_models import ARDiffusionLM, AutoregressiveLM, NextTokenChain
from .base import check_label_table, evaluating
from .lm import LN2, TEXT_OPTIONS, LMTask, TextData, load_text, token_ce
from .optional import Option, finite, pick


class ARLMTask(LMTask):
    """Autoregressive language modelling: end to end (a causal transformer, exact bits per character) or as
    DiffusionBlocks (a denoiser of next-token embeddings, which has no likelihood: the cross-entropy at sigma_max,
    the chain cross-entropy, a Monte-Carlo estimate, and the greedy next-token accuracy of the chains' averaged
    prediction, each also after every block along the chain). The headline every form reports is next-token
    accuracy; the two kinds of cross-entropy never share a column."""

    name = "arlm"
    metric, higher_is_better = "next_token_accuracy", True
    percent = True
    shared_metrics = ("test_bpc",)  # what the end-to-end model reports for another task's compare (mdlm's floor)
    compare_roles = ("e2e", "e2e-steps", "control", "dblocks")
    presets = {"full": "lm-ar-cpu", "quick": "lm-ar-quick", "offline": "lm-ar-cpu", "offline-quick": "lm-ar-quick"}
    eval_options = ("limit", *ARDiffusionLM.inference_options)
    sample_options = (*TEXT_OPTIONS, Option("temperature", finite, "the softmax temperature of each drawn token, 0 "
                                            "= greedy (default 1; DiffusionBlocks: arlm.temperature, applied at the "
                                            "chain's last step)"), "init")  # init: DiffusionBlocks runs only
    published = "; a published 124M rebuild: 5.08 at sigma_max vs 4.00 autoregressive"  # quoted in compare
    time_generation = True  # compare times cached generation, end to end vs DiffusionBlocks

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        check_label_table(cfg)

    def build_model(self, cfg: RunConfig, data: TextData, form: str) -> nn.Module:
        if form == "blocks":
            return ARDiffusionLM(cfg.model, cfg.blocks, cfg.chain, cfg.arlm, data.vocab_size, cfg.data.seq_len)
        return AutoregressiveLM(cfg.model, data.vocab_size, cfg.data.seq_len)

    def plan_tokens(self, cfg: RunConfig, shapes, form: str = "end-to-end") -> int:
        """The window, twice over for DiffusionBlocks (noisy and clean copies)."""
        return cfg.data.seq_len * (2 if form == "blocks" else 1)

    def plan_layer_bytes(self, cfg: RunConfig, shapes, element: int, form: str = "end-to-end") -> int:
        """Attention converts the boolean mask into an additive (T, T) mask of the model's dtype, and every layer
        keeps its own (T: the window, or both copies of it)."""
        return self.plan_tokens(cfg, shapes, form) ** 2 * element

    def plan_outer_bytes(self, cfg: RunConfig, shapes, model: nn.Module, element: int) -> int:
        if not isinstance(model, ARDiffusionLM):
            return super().plan_outer_bytes(cfg, shapes, model, element)
        N, T, D, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.width, shapes.vocab_size
        Dy, s = cfg.model.label_dim or D, element
        per_token = (8  # the window's ids: the clean embedding's indices and the loss's targets are one tensor
                     + Dy * s  # c_in z, the noisy input's linear
                     + 2 * D * s + 8  # the head's LayerNorm: its input (a copy of the noisy half), output, stats
                     + Dy * s  # D, into the readout
                     + 4 * V)  # the log-softmax (float32)
        # per noisy token, or per window: c_out (for c_out F) and the noise embedding's MLP; per window also c,
        # which every layer's adaLN reads
        token = cfg.arlm.noise_level == "token"
        extra = (N * T if token else N) * (s + (256 + (2 if token else 3) * D) * s)
        if cfg.model.positions == "learned":  # the position ids that index the learned table (int64)
            extra += 8 * T
        return N * T * per_token + extra + 8

    def _how(self, ev: dict) -> str:
        return " (exact)"

    @torch.no_grad()
    def evaluate(self, model, data: TextData, cfg: RunConfig, *, split: str = "test", limit: int = 0, device="cpu",
                 **options) -> dict:
        """End to end: bits per character and per token, the exact cross-entropy in nats per token (`ce`) and
        greedy next-token accuracy. DiffusionBlocks: `ce_sigma_max`, `chain_ce` (nats per token, M = `eval_draws`
        chains) and `next_token_accuracy` (of the chains' averaged prediction, the one `chain_ce` scores); both after
        every step and after every block's last step along the chain (`*_per_step`, `*_per_block`: None for a
        block that runs no step; `block0_*`: after the chain's first block); `single_chain_accuracy` (the mean of
        each chain's own argmax: one draw's accuracy); the bridge's norm after every step, the last step's top-1
        probability (also at temperature 2) and entropy. On the split's windows as LMTask.evaluate cuts them."""
        options = {k: v for k, v in options.items() if v is not None}
        blocks = isinstance(model, NextTokenChain)
        unused = [k for k in options if k not in (model.inference_options if blocks else ())]
        if unused:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: sampler options of a "
                             f"DiffusionBlocks language model; this run is {type(model).__name__}")
        batches, windows, covered, gen = self.eval_batches(data, cfg, split, limit)
        sums: dict = {}
        with evaluating(model):
            for x, pad in batches:
                x, pad = x.to(device), pad.to(device)
                if blocks:
                    part = model.window_stats(x, pad, gen, **options)
                else:
                    logits = model.logits(x, generator=gen)
                    scored = ~pad
                    part = {"nats": (token_ce(logits, x) * scored).sum().double().cpu(),
                            "hits": ((logits.argmax(-1) == x) & scored).sum().double().cpu(),
                            "tokens": scored.sum().double().cpu()}
                for k, v in part.items():
                    sums[k] = sums[k] + v if k in sums else v
        n_tok = sums["tokens"].item()
        out = {"next_token_accuracy": sums["hits"].item() / n_tok, "tokens": covered, "n": windows}
        if not blocks:
            chars = data.chars_of(split, covered)
            nats = sums["nats"].item()
            return {"bpc": nats / (chars * LN2), "bpt": nats / (n_tok * LN2), "ce": nats / n_tok, "nats": nats,
                    "chars": chars, **out}
        steps = model.steps(options.get("steps_per_block"), options.get("grid"))
        per_step = {"accuracy_per_step": (sums["hits_per_step"] / n_tok).tolist(),
                    "chain_ce_per_step": (sums["chain_nats_per_step"] / n_tok).tolist()}
        per_block = {key.replace("_step", "_block"): along_blocks(values, [b for _, _, b in steps],
                                                                   model.partition.num_blocks)
                     for key, values in per_step.items()}
        return {"ce_sigma_max": sums["ce_sigma_max"].item() / n_tok, "chain_ce": sums["chain_ce"].item() / n_tok,
                **out, "single_chain_accuracy": sums["single_chain_hits"].item() / n_tok,
                "block0_accuracy": per_block["accuracy_per_block"][0],
                "block0_chain_ce": per_block["chain_ce_per_block"][0], **per_step, **per_block,
                "bridge_norm_per_step": (sums["bridge_norm_per_step"] / n_tok).tolist(),
                "top1_last": sums["top1_last"].item() / n_tok, "top1_last_t2": sums["top1_last_t2"].item() / n_tok,
                "entropy_last": sums["entropy_last"].item() / n_tok, "eval_draws": model.draws(options.get("init")),
                "sigma_per_step": [s for s, _, _ in steps], "block_per_step": [b for _, _, b in steps]}

    MEASURED = (*LMTask.MEASURED, "ce", "next_token_accuracy", "ce_sigma_max", "chain_ce", "accuracy_per_step",
                "bridge_norm_per_step", "top1_last", "top1_last_t2", "entropy_last", "single_chain_accuracy",
                "chain_ce_per_step", "accuracy_per_block", "chain_ce_per_block", "block0_accuracy", "block0_chain_ce")

    def score(self, model, data, cfg: RunConfig, *, split: str = "test", device="cpu", progress: bool = False,
              reference=None, **options) -> dict:
        return dict(self.evaluate(model, data, cfg, split=split, device=device, **options), split=split)

    def describe_score(self, score: dict) -> str:
        what = f"{score.get('split', 'test')}, {score['n']} windows: next-token accuracy " \
               f"{100 * score['next_token_accuracy']:.2f}%"
        if "bpc" in score:
            return f"{what}; bits per character {score['bpc']:.4f} (exact; {score['ce']:.4f} nats per token)"
        M = score.get("eval_draws")
        single = score.get("single_chain_accuracy")
        one = "" if single is None or M == 1 else f"; one chain's own argmax {100 * single:.2f}% (a mean over chains)"
        return (f"{what}{along_chain(score, 'accuracy', 100, '.2f', '%')}{one}; cross-entropy at sigma_max "
                f"{score['ce_sigma_max']:.4f} and chain cross-entropy {score['chain_ce']:.4f}"
                f"{along_chain(score, 'chain_ce', 1, '.4f')} nats per token (M = {M}, averaged over the chains; an "
                f"estimate, not a likelihood)")

    def summary(self, results: dict) -> str:
        key = "val_" if "val_next_token_accuracy" in results else "test_"
        score = {k[len(key):]: v for k, v in results.items() if k.startswith(key)}
        score.update(split="validation" if key == "val_" else "test", eval_draws=results.get("eval_draws"))
        return (f"{results['method']}: {self.describe_score(score)}; {results['layer_updates']} layer-updates in "
                f"{results['train_seconds']:.1f} s")

    def write_samples(self, model, data: TextData, cfg: RunConfig, out, **kwargs) -> str:
        if kwargs.get("init") is not None and not isinstance(model, NextTokenChain):
            raise ValueError("--init: the start of a DiffusionBlocks run's Euler chain; this run is end to end")
        return super().write_samples(model, data, cfg, out, **kwargs)

    def compare_extras(self, arms, base: RunConfig, out) -> tuple[dict, list[str]]:
        """Each kind of cross-entropy on its own line; the DiffusionBlocks chain's headline with its figures after
        every block, and its diagnostics (the published negative findings: accuracy, chain cross-entropy and the
        bridge's norm after every step, the last step's confidence); for each arm's seed-0 model: samples (written
        to out/samples-ROLE.txt), their distinct-n, a generative perplexity scored by the end-to-end model, and
        generation time per token (cached, interleaved, median of 3)."""
        extras, lines = {}, []
        mean = lambda arm, key: statistics.mean(r[key] for r in arm.runs)
        for role, arm in arms.items():
            if "test_bpc" in arm.runs[0]:
                lines.append(f"{role}: exact cross-entropy {mean(arm, 'test_ce'):.4f} nats per token, "
                             f"{mean(arm, 'test_bpc'):.4f} bits per character (a likelihood)")
        e2e, blocks = pick(arms, "end-to-end"), pick(arms, "blocks")
        if blocks is not None:
            diag = {k: mean(blocks, "test_" + k) for k in ("ce_sigma_max", "chain_ce", "top1_last", "top1_last_t2",
                                                            "entropy_last", "next_token_accuracy")}
            for key in ("accuracy_per_step", "chain_ce_per_step", "bridge_norm_per_step", "accuracy_per_block",
                        "chain_ce_per_block"):  # the chain's figures along it (an older run may lack some)
                if all("test_" + key in r for r in blocks.runs):
                    diag[key] = [None if None in v else statistics.mean(v)
                                 for v in zip(*(r["test_" + key] for r in blocks.runs))]
            diag["sigma_per_step"], diag["eval_draws"] = blocks.runs[0]["sigma_per_step"], blocks.runs[0]["eval_draws"]
            extras[f"{blocks.role}_chain"] = diag
            lines.append(f"{blocks.role}: next-token accuracy {100 * diag['next_token_accuracy']:.2f}%"
                         f"{along_chain(diag, 'accuracy', 100, '.2f', '%')}; cross-entropy at sigma_max "
                         f"{diag['ce_sigma_max']:.4f}, chain cross-entropy {diag['chain_ce']:.4f}"
                         f"{along_chain(diag, 'chain_ce', 1, '.4f')} nats per token (M = {diag['eval_draws']}, "
                         f"averaged over the chains; estimates, not likelihoods{self.published})")
            per_step = zip(diag["sigma_per_step"], diag["accuracy_per_step"],
                           diag.get("chain_ce_per_step", [math.nan] * len(diag["sigma_per_step"])),
                           diag["bridge_norm_per_step"])
            steps = ", ".join(f"sigma {s:.3g}: {100 * a:.2f}% / {c:.3f} / {n:.3f}" for s, a, c, n in per_step)
            lines.append(f"{blocks.role} chain, accuracy / chain cross-entropy / bridge norm after each step: {steps}; "
                         f"last step: mean top-1 probability {diag['top1_last']:.3f} ({diag['top1_last_t2']:.3f} at "
                         f"temperature 2), entropy {diag['entropy_last']:.3f} nats")
        models = {role: arm.load() for role, arm in arms.items()}
        if not models:
            return extras, lines
        num, length = 8, base.data.seq_len
        gen = lambda i: torch.Generator().manual_seed(1000 + i)
        samples = {role: m.sample(num, length, generator=gen(0)) for role, m in models.items()}
        if blocks is not None:  # the chain from sigma_max noise (zero start: deterministic), and temperatures
            chain = models[blocks.role]
            samples[f"{blocks.role}-noise"] = chain.sample(num, length, init="noise", generator=gen(0))
            for t in (0.5, 2.0):
                samples[f"{blocks.role}-t{t:g}"] = chain.sample(num, length, temperature=t, generator=gen(0))
        data = load_text(base)
        real = torch.from_numpy(np.asarray(data.splits["test"][:num * length], dtype=np.int64)).view(num, length)
        gen_stats = {}
        for name, tokens in {"real test text": real, **samples}.items():
            if name in samples:
                io.atomic_write_text(Path(out) / f"samples-{name}.txt", "".join(
                    f"=== sample {i} ===\n{data.tokenizer.decode(row.numpy())}\n\n" for i, row in enumerate(tokens)))
            st = gen_stats[name] = {"distinct": distinct_n(tokens)}
            if e2e is not None:
                with torch.no_grad():
                    st["perplexity_by_e2e"] = math.exp(models[e2e.role].token_nats(tokens).mean().item())
        extras["generation"] = gen_stats
        lines.append(f"generated text ({num} samples of {length} tokens from no prompt, seed-0 models): "
                     "distinct-1/2/3/4"
                     + (" and generative perplexity scored by the end-to-end model (same budget and data; it favours "
                        "its own samples)" if e2e is not None else "") + ": "
                     + "; ".join(f"{name} " + "/".join(f"{d:.2f}" for d in st["distinct"])
                                 + (f", {st['perplexity_by_e2e']:.2f}" if "perplexity_by_e2e" in st else "")
                                 for name, st in gen_stats.items()))
        if e2e is not None and blocks is not None and self.time_generation:
            seconds = interleaved_seconds({arm.role: lambda i, m=models[arm.role]: m.sample(num, length,
                                                                                             generator=gen(i))
                                           for arm in (e2e, blocks)}, repeats=3)
            per_token = {role: t / length for role, t in seconds.items()}
            extras.update(generation_seconds_per_token=per_token,
                          generation_slowdown=per_token[blocks.role] / per_token[e2e.role])
            B = blocks.runs[0]["num_blocks"]
            lines.append(f"generation, batch of {num}, key/value cache: {1000 * per_token[e2e.role]:.2f} ms per token "
                         f"end-to-end vs {1000 * per_token[blocks.role]:.2f} ms DiffusionBlocks (B = {B}, "
                         f"{len(models[blocks.role].steps())} block calls per token): "
                         f"{extras['generation_slowdown']:.2f}x the time")
        return extras, lines


def along_blocks(per_step: list[float], block_per_step: list[int], num_blocks: int) -> list[float | None]:
    """A figure after each block of the chain: the value at the last step block b runs (None where it runs none)."""
    out: list[float | None] = [None] * num_blocks
    for value, block in zip(per_step, block_per_step):
        out[block] = value
    return out


def along_chain(score: dict, key: str, scale: float, fmt: str, unit: str = "") -> str:
    """The figure `key` along the chain, for a headline: after every block (score[key + "_per_block"]) or, when the
    chain is one block (recurrent depth), after every step; "" for a chain of one step or an older run's results."""
    cell = lambda v: "-" if v is None else format(scale * v, fmt)
    blocks, steps = score.get(f"{key}_per_block") or [], score.get(f"{key}_per_step") or []
    if len(blocks) > 1:
        return f" (after blocks {' / '.join(map(str, range(len(blocks))))}: {' / '.join(map(cell, blocks))}{unit})"
    if len(steps) > 1:
        return f" (after steps 1 to {len(steps)}: {' / '.join(map(cell, steps))}{unit})"
    return ""


def distinct_n(tokens: torch.Tensor, orders=(1, 2, 3, 4)) -> list[float]:
    """Distinct-n of a set of samples (N, T): unique n-grams over all n-grams, pooled over the samples, for each n."""
    out = []
    for n in orders:
        grams = [tuple(row[i:i + n]) for row in tokens.tolist() for i in range(len(row) - n + 1)]
        out.append(len(set(grams)) / max(1, len(grams)))
    return out


TASK = ARLMTask


@preset("lm-ar-cpu")
def preset_lm_ar_cpu() -> RunConfig:
    """The autoregressive compare on a 2-core CPU (`compare --task arlm`: e2e at two budgets, the 2-layer control,
    DiffusionBlocks; about 23 minutes for one seed):
    lm-cpu's data, model and budget (Shakespeare in the text8 alphabet, windows of 128, 6 layers of width 192,
    320 end-to-end steps of 32 windows, AdamW 1e-3) with B = 3 and the paper's text overlap gamma 0.1; scored on
    the first 512 test windows (of 2,029). Half of a block's training inputs are soft mixtures of embeddings
    (chain.input_mix 0.5, chosen on validation), so later blocks can read the estimates the chain hands them."""
    cfg = load_preset("lm-cpu")
    cfg.task = "arlm"
    cfg.blocks.gamma = 0.1
    cfg.chain.input_flip, cfg.chain.input_mix = 0.0, 0.5
    cfg.data.test_limit = 512
    return cfg


@preset("lm-ar-quick")
def preset_lm_ar_quick() -> RunConfig:
    """Under a minute for the four arms of the autoregressive compare (a smoke run): 12 steps, windows of 64 (the
    samples and the generation timing are one window long), 64 test windows."""
    cfg = preset_lm_ar_cpu()
    cfg.data.seq_len = 64
    cfg.train.steps = 12
    cfg.train.eval_limit = 16
    cfg.data.test_limit = 64
    return cfg


@preset("lm-ar-lm1b")
def preset_lm_ar_lm1b() -> RunConfig:
    """The paper's autoregressive setting for a GPU (App. E.4): LM1B (through HF `datasets`), windows of 256, 12
    layers of width 768 with 12 heads, B = 4, gamma 0.1, AdamW 3e-4, batch 256. The tokenizer is a BPE of 8,192
    symbols trained on the corpus (data.bpe_vocab), or a local tokenizer.json (data.tokenizer_file=PATH, e.g. GPT-2's
    for OpenWebText). Set train.steps for the budget you have."""
    cfg = RunConfig(task="arlm")
    cfg.data = DataConfig(name="lm1b", tokenizer="bpe", bpe_vocab=8192, seq_len=256)
    cfg.model = BackboneConfig(depth=12, width=768, heads=12, mlp_ratio=4.0, positions="rope")
    cfg.blocks.num_blocks, cfg.blocks.gamma = 4, 0.1
    cfg.chain.input_flip = cfg.chain.input_mix = 0.0
    cfg.train = TrainConfig(steps=100_000, batch_size=256, lr=3e-4, weight_decay=0.03, warmup=0.02, eval_limit=512,
                            eval_batch_size=128, ckpt_every=2000, device="auto")
    return cfg
