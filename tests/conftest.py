"""What the tests share: a vector denoiser built from the library's own layers; a small text corpus; random weights."""

import gc
import os
import random

import pytest
import torch

from diffusionblocks.config import construct
from diffusionblocks.models import VectorHead, VectorStem
from diffusionblocks.nn import ResidualMLP

# One intra-op thread unless the environment says otherwise: the tests' networks are so small that a second thread
# gains little, and pytest-xdist already runs a worker per core. `python3 -m pytest` then runs as
# `OMP_NUM_THREADS=1 python3 -m pytest` does; tests about threads set their own (tests/test_logs.py).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """What every test module starts with (the imports, pytest's own objects) moved out of the garbage collector's
    sight: a full collection (the memory measurement runs one before each step it measures) then scans only what
    the module's tests create, not the hundreds of thousands of objects torch, transformers and the rest hold."""
    gc.collect()
    gc.freeze()
    yield


def vector_parts(num_layers=6, dz=4, dim=16, dx=3):
    torch.manual_seed(0)
    layers = [ResidualMLP(dim, hidden=2 * dim) for _ in range(num_layers)]
    return layers, VectorStem(dz, dim, dx), VectorHead(dim, dz)


def signal_on_step(monkeypatch, method_cls, call: int, signum: int):
    """Make `method_cls.step` send `signum` to this process on its `call`-th call (a real signal in the middle of a
    run); returns the original step."""
    original, calls = method_cls.step, []

    def step(self, batch, block=None):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(self, batch, block)

    monkeypatch.setattr(method_cls, "step", step)
    return original


def language_model(cls, cfg, vocab_size: int, **kwargs):
    """A language model of class `cls` built from the config sections it names, over `vocab_size` symbols."""
    return construct(cls, cfg, vocab_size=vocab_size, seq_len=cfg.data.seq_len, **kwargs)


def randomized(model, std=0.2):
    """Every weight drawn at random: a fresh adaLN-zero layer is the identity, which would hide attention."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def assert_plan_matches(result: dict, exact: bool = True):
    """Every row of plan.measure_all's result: parameters, gradients and optimizer state as predicted, to the byte;
    saved activations to the byte (`exact`; with checkpointing, whose recomputation's bookkeeping is not modelled,
    and otherwise when not `exact`, within 2%)."""
    for row in result["rows"]:
        m = row["measured"]
        assert (row["params"], row["grads"], row["optimizer"]) == (m["params"], m["grads"], m["optimizer"]), row["name"]
        if exact and not row["checkpoint"]:
            assert row["activations"] == m["activations"], row["name"]
        else:
            assert abs(row["activations"] / m["activations"] - 1) < 0.02, row["name"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small .txt file (about 23,000 characters of made-up sentences) and a token cache of the tests' own."""
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "of", "a", "fair", "land", "spoke", "to", "their", "people", "with",
             "grace", "wit", "while", "fool", "sang", "songs", "love", "war", "bread"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".!?,")
             for _ in range(600)]
    path = root / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    before = os.environ.get("DIFFUSIONBLOCKS_CACHE")
    os.environ["DIFFUSIONBLOCKS_CACHE"] = str(root / "cache")
    yield path
    if before is None:
        del os.environ["DIFFUSIONBLOCKS_CACHE"]
    else:
        os.environ["DIFFUSIONBLOCKS_CACHE"] = before
