"""Multi-hop pointer chasing: a task generated from a seed on which a deep network beats a shallow one by a wide margin
(the depth testbed, benchmarks/README.md), so that a table can say whether DiffusionBlocks keeps what depth buys.

An example is a random permutation f of K symbols, given in context as its K pairs (a, f(a)) in random order, and a
query (s, k): the answer is f^k(s), f applied k times to the start s, with k drawn uniformly from [min_hops, hops].
The input x is (N, 1 + K, 2): row 0 the query (s, K + k - 1: the hop count as a symbol of its own), rows 1..K the
pairs. Each row is one token, [E(first); E(second)], the two halves read from one symbol table E, so a symbol
fetched as a value is already in the coordinates a key is matched in. The answer is read at the query's token.

Why it needs depth: f is fresh in every example, so it cannot be learned, only looked up, and a layer's attention
fetches one pair per token: a token holding a can read f(a) in one layer. The pair tokens can compose f with itself
(pointer doubling: after layer l a pair token can hold f^(2^l)), so L layers follow up to 2^L - 1 hops: 2 layers
at most 3, 3 layers 7. A model short of depth falls back on f's cycles (with K = 8 many are short, and on a short
cycle k hops forward are a few hops back), not on chance alone. f is a permutation so that every answer is uniform
over the symbols (a random function's iterates fall into its few cycles). Two variants, settings, that learn more
slowly: each pair as two tokens (hops.pair_tokens=2, a key token then its value's; a layer is spent binding them) and
a memory mask (hops.attention=memory: a pair's tokens see each other only, so no doubling and k hops take k layers).
What each arm reaches by hop count: benchmarks/README.md, "A depth testbed".

The models are tasks/tensors.py's classifier of tensors: DiffusionBlocks denoises the answer's label embedding, added
to the query's token (classify.LabelChain), and the end-to-end arm is the same network as a plain classifier. The
token ids travel as float32 (exact below 2^24): the label chain draws its noise in its input's dtype.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from ..config import BackboneConfig, BlocksConfig, DataConfig, RunConfig, TrainConfig, preset, section, setting
from ..models import LabelHead, lm_layers
from ..nn import NoiseEmbedding
from .optional import Arm, pick
from .tensors import TensorClassifierTask, TensorData, TensorShapes

TEST_SEED = 1_000_003  # the test examples' stream, apart from the training examples' (both from hops.data_seed)


@section("hops")
@dataclass
class HopsConfig:
    """Pointer chasing (task=hops): a permutation of `symbols` symbols given as pairs, a start and a hop count k in
    [min_hops, hops]; the answer is the start after k hops. The examples are generated from data_seed, the same for
    every run seed."""

    symbols: int = setting(8, "K: the symbols, and the (a, f(a)) pairs in an example's context", range="[2, 4_096]")
    hops: int = setting(6, "the most hops an answer takes", range="[1, 1_000]")
    min_hops: int = setting(1, "the fewest hops an answer takes (= hops: every answer takes the same number)",
                            range="[1, 1_000]")
    train_size: int = setting(200_000, "training examples generated (data.val_size of them held out for validation)",
                              range="[1, 1e8]")
    test_size: int = setting(2_000, "test examples generated", range="[1, 1e8]")
    pair_tokens: int = setting(1, "tokens per pair: 2 (a key token, then its value's), or 1 (both in one token)",
                               range="[1, 2]")
    attention: str = setting("full", "full: every token attends to every token; memory: a pair's tokens to each other "
                                     "only, the query's to every token", choices=("full", "memory"))
    data_seed: int = setting(0, "seeds the generated examples", range="[0, 1e18]")

    def check(self):
        if self.min_hops > self.hops:
            raise ValueError(f"hops.min_hops={self.min_hops} is more than hops.hops={self.hops}")


def generate(n: int, symbols: int, hops: int, min_hops: int, generator: torch.Generator, pair_tokens: int = 1):
    """n examples: x (n, 1 + pair_tokens K, 2) symbol ids as float32 and the answers y = f^k(s) (n,) int64. Row 0 is
    the query (s, K + k - 1); then the pairs in random order, each as one row (a, f(a)) or as two, (a, KEY) and
    (f(a), VALUE), KEY and VALUE the ids after the hop counts'."""
    K = symbols
    f = torch.rand(n, K, generator=generator).argsort(1)  # (n, K): a random permutation per example, f[a]
    keys = torch.rand(n, K, generator=generator).argsort(1)  # (n, K): the order the pairs are given in
    start = torch.randint(K, (n,), generator=generator)
    k = torch.randint(min_hops, hops + 1, (n,), generator=generator)
    y = start
    for j in range(hops):  # one hop for every example that takes more than j
        y = torch.where(k > j, f.gather(1, y[:, None])[:, 0], y)
    query = torch.stack([start, K + k - 1], dim=-1)[:, None]  # (n, 1, 2)
    pairs = torch.stack([keys, f.gather(1, keys)], dim=-1)  # (n, K, 2)
    if pair_tokens == 2:  # (a, KEY), (f(a), VALUE): (n, 2K, 2)
        marks = torch.tensor([K + hops, K + hops + 1]).expand(n, K, 2)
        pairs = torch.stack([pairs, marks], dim=-1).flatten(1, 2)
    return torch.cat([query, pairs], dim=1).float(), y


def hop_counts(x: torch.Tensor, symbols: int) -> torch.Tensor:
    """The hop count k of each example (N,) int64, read off its query."""
    return x[:, 0, 1].long() - symbols + 1


def memory_mask(symbols: int, pair_tokens: int) -> torch.Tensor:
    """(T, T) bool, True = may attend: token 0 (the query) attends to every token, a pair's tokens to each other."""
    pair = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.arange(symbols).repeat_interleave(pair_tokens)])
    mask = pair[:, None] == pair[None, :]  # (T, T): the same pair (the query is pair 0 alone)
    mask[0] = True
    return mask


class HopsStem(nn.Module):
    """(z_in (N, Dy), c_noise (N,), x (N, T, 2) ids) -> h (N, T, D) and (c, mask): c the noise embedding (N, D), mask
    the attention mask of every layer (None: full attention).

    Token t is [E(x[t, 0]); E(x[t, 1])] plus a learned position; the noisy label embedding (times c_in) is added to
    the query's token (t = 0), where the head reads the answer."""

    def __init__(self, symbols: int, hops: int, pair_tokens: int, width: int, label_dim: int, attention: str = "full",
                 noise_scale: float = 1000.0):
        super().__init__()
        if width % 2:
            raise ValueError(f"model.width={width}: a token is two halves of a symbol table, so the width must be even")
        vocab, seq_len = symbols + hops + 2, 1 + pair_tokens * symbols  # symbols, hop counts, KEY, VALUE
        self.symbols = nn.Embedding(vocab, width // 2)  # N(0, 1) rows: one table for keys, values and queries
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq_len, width))
        self.label_in = nn.Linear(label_dim, width)
        self.noise = NoiseEmbedding(width, scale=noise_scale)
        mask = memory_mask(symbols, pair_tokens) if attention == "memory" else None
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, z_in: torch.Tensor, c_noise: torch.Tensor, x: torch.Tensor):
        ids = x.long()  # (N, T, 2)
        h = self.symbols(ids).flatten(2) + self.pos  # (N, T, D): [E(first); E(second)]
        query = h[:, :1] + self.label_in(z_in)[:, None]  # (N, 1, D): the noisy label on the query's token
        return torch.cat([query, h[:, 1:]], dim=1), (self.noise(c_noise), self.mask)


class HopsHead(LabelHead):
    """LabelHead (read at the query's token) under the stem's (c, mask) conditioning."""

    def forward(self, h: torch.Tensor, cond: tuple) -> torch.Tensor:
        return super().forward(h, cond[0])


class HopsTask(TensorClassifierTask):
    """Pointer chasing: accuracy of the final prediction, after every inference step (each block's figure along the
    chain) and for each hop count (accuracy_hops1, ...)."""

    name = "hops"
    presets = {"full": "hops", "quick": "hops-quick"}
    compare_roles = ("e2e", "e2e-steps", "control", "dblocks")

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.model.width % 2:
            raise ValueError(f"model.width={cfg.model.width}: task hops splits a token into two halves of one symbol "
                             "table, so the width must be even")
        if cfg.model.positions != "learned":
            raise ValueError(f"model.positions={cfg.model.positions!r}: task hops uses learned positions")

    def tensors(self, cfg: RunConfig) -> dict:
        h = cfg.hops
        make = lambda n, seed: generate(n, h.symbols, h.hops, h.min_hops, torch.Generator().manual_seed(seed),
                                        h.pair_tokens)
        (x_train, y_train), (x_test, y_test) = make(h.train_size, h.data_seed), make(h.test_size,
                                                                                      h.data_seed + TEST_SEED)
        return {"train": (y_train, x_train), "test": (y_test, x_test)}

    def load_data(self, cfg: RunConfig) -> TensorData:
        data = super().load_data(cfg)
        data.shapes = TensorShapes(data.shapes.target, data.shapes.cond, cfg.hops.symbols)  # K classes in any split
        return data

    def network(self, cfg: RunConfig, shapes: TensorShapes) -> tuple:
        m, h = cfg.model, cfg.hops
        label_dim = shapes.target[0]
        stem = HopsStem(h.symbols, h.hops, h.pair_tokens, m.width, label_dim, h.attention, m.noise_scale)
        return stem, lm_layers(m), HopsHead(m.width, label_dim, m.label_head)

    def evaluate(self, model, data: TensorData, cfg: RunConfig, *, split: str = "test", limit: int = 0, device="cpu",
                 **options) -> dict:
        """Accuracy of the last step, after every Euler step (`accuracy_per_step`: one per block at one step per
        block; end to end a single entry) and of the final prediction for each hop count k (`accuracy_hops{k}`)."""
        options = {k: v for k, v in options.items() if v is not None}
        unused = [k for k in options if k not in model.inference_options]
        if unused:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: sampler options of a "
                             f"DiffusionBlocks model; this run is {cfg.train.method} ({type(model).__name__})")
        y, x, preds = self.predictions(model, data, cfg, split=split, limit=limit, device=device, **options)
        hits = preds == y  # (steps, N)
        per_step = hits.double().mean(1).tolist()
        k = hop_counts(x, cfg.hops.symbols)
        by_hops = {f"accuracy_hops{j}": hits[-1, k == j].double().mean().item()
                   for j in range(cfg.hops.min_hops, cfg.hops.hops + 1) if bool((k == j).any())}
        return {"accuracy": per_step[-1], "accuracy_per_step": per_step, **by_hops, "n": int(y.shape[0])}

    def summary(self, results: dict) -> str:
        steps = ", ".join(f"{100 * a:.2f}" for a in results["accuracy_per_step"])
        hops = ", ".join(f"{k[len('accuracy_hops'):]}: {100 * v:.2f}" for k, v in results.items()
                         if k.startswith("accuracy_hops"))
        split = results.get("eval_split", results.get("split", "test"))
        return (f"{split} accuracy {100 * results['accuracy']:.2f}% (after each Euler step: {steps}; by hop count: "
                f"{hops})")

    def describe_score(self, score: dict) -> str:
        return self.summary(score) + f" on {score['n']} examples"

    def compare_extras(self, arms: dict[str, Arm], base: RunConfig, out) -> tuple[dict, list[str]]:
        """DiffusionBlocks' accuracy after each block's Euler step, and every arm's by hop count (means over seeds, on
        the split the runs evaluated)."""
        mean = lambda runs, key: [statistics.mean(v) for v in zip(*(r[key] for r in runs))]
        extras, lines = {}, []
        blocks = pick(arms, "blocks")
        if blocks is not None:
            per_step = mean(blocks.runs, "accuracy_per_step")
            extras[f"{blocks.role}_accuracy_per_step"] = per_step
            lines.append(f"DiffusionBlocks accuracy after each Euler step ({blocks.runs[0]['eval_split']}, %): "
                         + ", ".join(f"{100 * a:.2f}" for a in per_step))
        for role, arm in arms.items():
            hops = sorted((k for k in arm.runs[0] if k.startswith("accuracy_hops")), key=lambda k: int(k[13:]))
            by_hops = {k[13:]: statistics.mean(r[k] for r in arm.runs) for k in hops}
            extras[f"{role}_accuracy_by_hops"] = by_hops
            lines.append(f"{role} accuracy by hop count ({arm.runs[0]['eval_split']}, %): "
                         + ", ".join(f"{k}: {100 * v:.2f}" for k, v in by_hops.items()))
        return extras, lines

    def random_batch(self, cfg: RunConfig, shapes: TensorShapes, generator: torch.Generator) -> tuple:
        h = cfg.hops
        return generate(cfg.train.batch_size, h.symbols, h.hops, h.min_hops, generator, h.pair_tokens)


TASK = HopsTask


@preset("hops-tiny")
def preset_hops_tiny() -> RunConfig:
    """Seconds on a CPU, for tests: 4 symbols, 1 or 2 hops, 2 layers of width 16 in 2 blocks, 40 steps of 32."""
    cfg = RunConfig(task="hops")
    cfg.data = DataConfig(name="hops")
    cfg.hops = HopsConfig(symbols=4, hops=2, min_hops=1, train_size=1024, test_size=128)
    cfg.model = BackboneConfig(depth=2, width=16, heads=2, mlp_ratio=2.0)
    cfg.blocks = BlocksConfig(num_blocks=2)
    cfg.train = TrainConfig(steps=40, batch_size=32, lr=3e-3, eval_limit=128, log_every=10, ckpt_every=1000)
    return cfg


@preset("hops")
def preset_hops() -> RunConfig:
    """The depth testbed (benchmarks/README.md, "A depth testbed"): 8 symbols, 1 to 6 hops, 200,000 training
    examples, 6 layers of width 64 (4 heads, MLP x2) in 3 blocks of 2 layers, 2000 end-to-end steps of batch 128,
    AdamW 2e-3; a few minutes an arm on one CPU thread. Its control (2 layers) follows at most 3 hops."""
    cfg = RunConfig(task="hops")
    cfg.data = DataConfig(name="hops")
    cfg.hops = HopsConfig(symbols=8, hops=6, min_hops=1)
    cfg.model = BackboneConfig(depth=6, width=64, heads=4, mlp_ratio=2.0)
    cfg.blocks = BlocksConfig(num_blocks=3)
    cfg.train = TrainConfig(steps=2000, batch_size=128, lr=2e-3, eval_limit=1000, ckpt_every=1000)
    return cfg


@preset("hops-d4")
def preset_hops_d4() -> RunConfig:
    """The depth testbed at B = 2 with blocks of 2 layers: the hops preset with 4 layers in 2 blocks."""
    cfg = preset_hops()
    cfg.model.depth, cfg.blocks.num_blocks = 4, 2
    return cfg


@preset("hops-quick")
def preset_hops_quick() -> RunConfig:
    """The hops preset on a tenth of the steps (a smoke run of compare)."""
    cfg = preset_hops()
    cfg.train.steps = 200
    return cfg
