"""The language pipeline the language tasks share (tasks/mdlm.py, tasks/arlm.py, tasks/recurrent.py); no TASK here.
A run's text data (tokenizer, memory-mapped token arrays of the three splits, characters per split), random training
windows, evaluation windows, and the common half of the task interface: bits per character, results, summaries,
written samples.

Evaluation cuts a held-out split into consecutive windows of data.seq_len tokens, the last one padded; every
token is scored exactly once, in its window, with the window as its only context (the same windows for every
model, so masked diffusion and the autoregressive floor are scored on the same footing). A model gives the
negative log-likelihood in nats of each window, or an upper bound on it (`sequence_nats`); bits per character
= total nats / (characters ln 2). The characters are the split's `n_chars` from the prepared tokens'
metadata (the normalized text's length, so bytes, characters and BPE are comparable); an evaluation of only
the first windows (a limit) counts the characters of its tokens decoded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import io
from ..config import RunConfig
from ..text import (
    CORPORA,
    HF_PATHS,
    TOKENIZERS,
    BPETokenizer,
    Tokenizer,
    check_length,
    load_corpus,
    make_tokenizer,
    prepare_tokens,
    tokens_meta,
)
from .base import Task, evaluating
from .optional import Option, at_least

LN2 = math.log(2.0)
TOKENIZER_FILE = "tokenizer.json"  # saved in every language-model run directory
EVAL_SPLITS = ("validation", "test")
SWEEP_WINDOWS = 512  # without data.val_size, compare's settings sweep scores this many validation-text windows


def token_ce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats of every token, in float32: logits (N, T, V), x (N, T) -> (N, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="none").view(x.shape)


@dataclass(frozen=True)
class TextShapes:
    """What a language model is built from, without loading the text (the memory planner): the vocabulary."""

    vocab_size: int


class TextData:
    """The token arrays of a corpus's train / validation / test splits under one tokenizer, and what bits per
    character need: each split's character count."""

    def __init__(self, name: str, tokenizer: Tokenizer, splits: dict[str, np.ndarray], chars: dict[str, int],
                 seq_len: int, sources: dict[str, str] | None = None):
        self.name, self.tokenizer, self.splits, self.chars, self.seq_len = name, tokenizer, splits, chars, seq_len
        self.sources = sources or {}  # sha256 of each file of the corpus, by name (a run checks them)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def chars_of(self, split: str, n_tokens: int) -> int:
        """Characters of the split's first `n_tokens` tokens: the prepared count for the whole split, else the
        length of those tokens decoded."""
        tokens = self.splits[split]
        if n_tokens >= len(tokens):
            return self.chars[split]
        return len(self.tokenizer.decode(np.asarray(tokens[:n_tokens])))

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {len(t):,}" for s, t in self.splits.items())
        return (f"{self.name}, {self.tokenizer.kind} tokens (vocabulary {self.vocab_size}), windows of "
                f"{self.seq_len}; tokens: {sizes}")


def load_text(cfg: RunConfig) -> TextData:
    """cfg.data's corpus, tokenized by cfg.data.tokenizer (cached as memory maps by text.prepare_tokens); every
    split must hold at least one window. data.train_limit keeps the first N training tokens."""
    d = cfg.data
    # a user's files that are not UTF-8 text load for the tokenizer that takes any bytes (the others refuse them)
    any_bytes = {"any_bytes": True} if TOKENIZERS[d.tokenizer].any_bytes and d.name not in CORPORA else {}
    corpus = load_corpus(d.name, root=d.root, **any_bytes)
    if d.tokenizer_file:  # a given BPE (e.g. GPT-2's), not one trained on this corpus
        tokenizer = BPETokenizer.from_file(d.tokenizer_file)
    else:
        tokenizer = make_tokenizer(d.tokenizer, corpus, **({"vocab_size": d.bpe_vocab} if d.tokenizer == "bpe" else {}))
    splits, chars = {}, {}
    for split in ("train", *EVAL_SPLITS):
        tokens = prepare_tokens(corpus, tokenizer, split)
        chars[split] = tokens_meta(tokens)["n_chars"]
        if split == "train" and d.train_limit:
            tokens = tokens[:d.train_limit]
        check_length(len(tokens), d.seq_len, f"the {split} split of {corpus.name}")
        splits[split] = tokens
    # the python and Hugging Face corpora change with the installation: only files a user points at are checked
    sources = {} if d.name in ("python", *HF_PATHS) else dict(corpus.manifest)
    return TextData(corpus.name, tokenizer, splits, chars, d.seq_len, sources)


class TokenWindows:
    """One unit's training batches: `batch` windows of `seq_len` tokens at uniformly drawn starts, as (x,) with
    x (N, T) int64; resumable. Every data-parallel member draws the same batch (the loop shards it)."""

    def __init__(self, tokens: np.ndarray, batch: int, seq_len: int, seed: int):
        self.tokens, self.batch, self.seq_len = tokens, batch, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def __next__(self) -> tuple[torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.seq_len + 1, (self.batch,), generator=self.gen).numpy()
        return (torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.seq_len)].astype(np.int64)),)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict):
        self.gen.set_state(state["gen"])


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, limit: int = 0):
    """(batches of (x (N, T) int64, pad (N, T) bool), windows, tokens covered): consecutive windows of the first
    `limit` windows (all if 0); the last window of the split is padded (pad True; its ids are 0)."""
    windows = -(-len(tokens) // seq_len)
    if limit:
        windows = min(windows, limit)
    covered = min(len(tokens), windows * seq_len)

    def batches():
        for first in range(0, windows, batch_size):
            n = min(batch_size, windows - first)
            flat = np.zeros(n * seq_len, dtype=np.int64)
            part = tokens[first * seq_len:min(covered, (first + n) * seq_len)]
            flat[:len(part)] = part
            pad = np.arange(n * seq_len) >= len(part)
            yield torch.from_numpy(flat.reshape(n, seq_len)), torch.from_numpy(pad.reshape(n, seq_len))

    return batches(), windows, covered


MAX_TEXT_TOKENS = 2**18  # --num x --length: text samples are drawn as one batch, a forward pass per token
# every language task samples --length tokens after a --prompt
TEXT_OPTIONS = (Option("length", at_least(1), "tokens per sample, the prompt's included (default data.seq_len; "
                                              f"--num x --length at most {MAX_TEXT_TOKENS:,})"),
                Option("prompt", help="the start of every sample"))


class LMTask(Task):
    """A language model of text, scored in bits per character (lower is better) on held-out windows. A model
    offers `loss(x)` or `block_loss(block, x)` (nats per token, for training), `sequence_nats(x, pad,
    generator, **options)` (nats of each window, or a bound on them) and `sample(num, length, prompt,
    generator, device, **options)` (token ids)."""

    metric, higher_is_better = "bpc", False
    eval_options = ("limit",)
    sample_options = TEXT_OPTIONS  # a task adds the options its models' sample() takes
    run_files: ClassVar[tuple[str, ...]] = (*Task.run_files, TOKENIZER_FILE)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.model.layer != "adaln":
            raise ValueError(f"model.layer={cfg.model.layer!r}: the language models are built of adaLN-zero layers "
                             "only (model.layer=adaln)")

    def load_data(self, cfg: RunConfig) -> TextData:
        return load_text(cfg)

    def save_with_run(self, data: TextData, out) -> None:
        super().save_with_run(data, out)
        data.tokenizer.save(Path(out) / TOKENIZER_FILE)

    def check_run(self, data: TextData, run) -> None:
        """The corpus's files and the tokenizer rebuilt from them must be those the run trained with (a user's corpus
        may have changed since: its ids would decode into other text)."""
        super().check_run(data, run)
        saved = Path(run) / TOKENIZER_FILE
        if saved.exists() and io.load_json(saved) != data.tokenizer.to_dict():
            raise ValueError(f"{saved}: the run's tokenizer differs from the one built now from data "
                             f"{data.name!r} ({data.tokenizer.kind}); the text changed since training, so its ids "
                             f"would decode into other text. Point data.name / data.root at the text it trained on")

    def sweep_validation(self, base: RunConfig) -> tuple[int, str]:
        """The corpus's own validation text, which no arm trains on: its first SWEEP_WINDOWS windows."""
        return SWEEP_WINDOWS, (f"the first {SWEEP_WINDOWS} windows of the corpus's validation text (or all, if "
                               "fewer), which no arm trains on")

    def shapes_record(self, data: TextData) -> dict:
        return {"vocab_size": data.vocab_size, "seq_len": data.seq_len}

    def shapes_from_record(self, record: dict) -> TextShapes:
        return TextShapes(record["vocab_size"])

    # -- the memory planner: windows of data.seq_len tokens over the tokenizer's vocabulary

    def plan_shapes(self, cfg: RunConfig, **given) -> TextShapes:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{flags}: image options; task {self.name!r} takes its shapes from data.tokenizer "
                             "and data.seq_len")
        vocab = getattr(TOKENIZERS[cfg.data.tokenizer], "vocab_size", None)  # fixed by the kind (bytes, text8)
        if cfg.data.tokenizer_file:
            vocab = BPETokenizer.from_file(cfg.data.tokenizer_file).vocab_size
        elif cfg.data.tokenizer == "bpe":  # the size it is trained to (planning a GPU run needs no download)
            vocab = cfg.data.bpe_vocab
        elif vocab is None:  # from the training split (chars): prepared once, cached
            vocab = load_text(cfg).vocab_size
        return TextShapes(vocab)

    def random_batch(self, cfg: RunConfig, shapes: TextShapes, generator: torch.Generator) -> tuple:
        return (torch.randint(shapes.vocab_size, (cfg.train.batch_size, cfg.data.seq_len), generator=generator),)

    def plan_tokens(self, cfg: RunConfig, shapes: TextShapes, form: str = "end-to-end") -> int:
        return cfg.data.seq_len

    def plan_outer_bytes(self, cfg: RunConfig, shapes: TextShapes, model: nn.Module, element: int) -> int:
        """What every language model saves outside its layers: the stem's token ids (int64); the head's
        LayerNorm input, statistics (float32) and output (the tied linear's input; its weight is a parameter);
        the loss's log-softmax over the vocabulary (float32 whatever the dtype) and its targets (int64); two
        float32 scalars (the cross-entropy's weight total, and the loss, which the update's finiteness check
        keeps). The task adds its own (`_plan_extra_bytes`)."""
        N, T, D, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.width, shapes.vocab_size
        per_token = 8 + 2 * D * element + 8 + 4 * V + 8
        return N * T * per_token + 8 + self._plan_extra_bytes(cfg, shapes, model, element)

    def _plan_extra_bytes(self, cfg: RunConfig, shapes: TextShapes, model: nn.Module, element: int) -> int:
        return 0

    def stream(self, data: TextData, cfg: RunConfig, seed: int, member: int = 0) -> TokenWindows:
        return TokenWindows(data.splits["train"], cfg.train.batch_size, cfg.data.seq_len, seed)

    def probe_batch(self, data: TextData, cfg: RunConfig, device) -> tuple:
        return (next(TokenWindows(data.splits["train"], cfg.train.batch_size, cfg.data.seq_len, 0))[0].to(device),)

    def estimator(self, model: nn.Module, options: dict) -> dict:
        """Entries saying how the nats were estimated (masked diffusion: K), added to every evaluation."""
        return {}

    def eval_batches(self, data: TextData, cfg: RunConfig, split: str, limit: int = 0):
        """(batches of (x, pad), windows, tokens covered, the evaluation's seeded generator) of an evaluation split's
        windows: the first `limit` if > 0, data.val_size / data.test_limit capping the validation / test ones."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"split={split!r}: expected one of {', '.join(EVAL_SPLITS)}")
        cap = cfg.data.val_size if split == "validation" else cfg.data.test_limit
        limit = min((v for v in (limit, cap) if v), default=0)
        batches, windows, covered = eval_windows(data.splits[split], cfg.data.seq_len, cfg.train.eval_batch_size,
                                                 limit)
        return batches, windows, covered, torch.Generator().manual_seed(cfg.train.seed + 999)

    @torch.no_grad()
    def evaluate(self, model, data: TextData, cfg: RunConfig, *, split: str = "test", limit: int = 0, device="cpu",
                 **options) -> dict[str, Any]:
        """Bits per character (`bpc`) and per token (`bpt`) on the split's windows (the first `limit` if > 0;
        data.val_size / data.test_limit cap the validation / test windows). Seeded, so it is reproducible."""
        options = {k: v for k, v in options.items() if v is not None}
        batches, windows, covered, gen = self.eval_batches(data, cfg, split, limit)
        nats = 0.0
        with evaluating(model):
            for x, pad in batches:
                nats += model.sequence_nats(x.to(device), pad.to(device), generator=gen, **options).sum().item()
        chars = data.chars_of(split, covered)
        return {"bpc": nats / (chars * LN2), "bpt": nats / (covered * LN2), "nats": nats, "chars": chars,
                "tokens": covered, "n": windows, **self.estimator(model, options)}

    MEASURED = ("bpc", "bpt", "nats", "chars", "tokens", "n")  # results.json holds them as test_ / val_ (n: windows)

    def results(self, ev: dict, split: str = "test") -> dict:
        prefix = "val_" if split == "validation" else "test_"
        out = {(prefix + k if k in self.MEASURED else k): v for k, v in ev.items()}
        if split == "validation":
            out["validation"] = {"windows": ev["n"], "from": "the corpus's validation split"}
        return out

    def score(self, model, data, cfg: RunConfig, *, split: str = "test", device="cpu", progress: bool = False,
              reference=None, **options) -> dict:
        ev = self.evaluate(model, data, cfg, split=split, device=device, **options)
        return dict(ev, split=split, **{("val_" if split == "validation" else "test_") + "bpc": ev["bpc"]})

    def summary(self, results: dict) -> str:
        what, key = ("validation", "val_") if "val_bpc" in results else ("test", "test_")
        return (f"{results['method']}: {what} bits per character {results[key + 'bpc']:.4f} over "
                f"{results[key + 'n']} windows{self._how(results)}; {results['layer_updates']} layer-updates in "
                f"{results['train_seconds']:.1f} s")

    def describe_score(self, score: dict) -> str:
        return (f"{score.get('split', 'test')} bits per character {score['bpc']:.4f} ({score['bpt']:.4f} per token) "
                f"over {score['n']} windows, {score['chars']:,} characters{self._how(score)}")

    def _how(self, ev: dict) -> str:
        """How the figure was estimated, for summaries (" (exact)", " (an upper bound, K ...)")."""
        return ""

    def sample(self, model, data: TextData, cfg: RunConfig, out, *, num: int, seed: int, writable,
               length: int | None = None, prompt: str = "", device="cpu", **options) -> str:
        length = length or cfg.data.seq_len
        if num * length > MAX_TEXT_TOKENS:
            raise ValueError(f"--num {num} x --length {length} = {num * length:,} tokens, over the "
                             f"{MAX_TEXT_TOKENS:,} of one call (drawn as one batch, a forward pass per token)")
        return self.write_samples(model, data, cfg, out, num=num, length=length, prompt=prompt, seed=seed,
                                  device=device, **options)

    def write_samples(self, model, data: TextData, cfg: RunConfig, out: str | Path, *, num: int, length: int,
                      prompt: str = "", seed: int = 0, device="cpu", **options) -> str:
        """`num` samples of `length` tokens (the prompt's included) decoded into a text file; returns a line
        saying what was written."""
        options = {k: v for k, v in options.items() if v is not None}
        ids = data.tokenizer.encode_seen(prompt, "--prompt") if prompt else np.zeros(0, dtype=np.int64)
        prompt_ids = torch.from_numpy(ids.astype(np.int64))
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"--num {num!r}: expected an integer >= 1")
        if length <= len(prompt_ids):
            raise ValueError(f"--length {length}: must exceed the prompt's {len(prompt_ids)} tokens")
        t0 = time.perf_counter()
        tokens = model.sample(num, length, prompt_ids, generator=torch.Generator().manual_seed(seed), device=device,
                              **options)
        seconds = time.perf_counter() - t0
        texts = [data.tokenizer.decode(row.cpu().numpy()) for row in tokens]
        io.atomic_write_text(out, "".join(f"=== sample {i} ===\n{text}\n\n" for i, text in enumerate(texts)))
        return f"wrote {out}: {num} samples of {length} tokens in {seconds:.2f} s"
