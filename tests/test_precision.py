"""train.precision (bf16 / fp16 autocast, fp16 loss scalers per optimizer) and train.compile on the tiny preset."""

import os
import signal

import pytest
import torch
from conftest import signal_on_step

from diffusionblocks import io
from diffusionblocks.config import apply_overrides
from diffusionblocks.memory import saved_activation_bytes
from diffusionblocks.methods.base import Optimizer, autocast, compile_layers, compile_step, update
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.methods.e2e import EndToEnd
from diffusionblocks.plan import Configuration, Spec, predict
from diffusionblocks.run import new_model, validate
from diffusionblocks.tasks.classify import preset_tiny
from diffusionblocks.tasks.images import ImageShapes
from diffusionblocks.train import train

DIGITS = ImageShapes((8, 8), 1, 10)
SMALL_EVAL = ("train.eval_limit=40", "data.test_limit=40")  # these tests read the loss and weights, not accuracy


def tiny(method, *overrides):
    cfg = preset_tiny()
    cfg.train.method = method
    return apply_overrides(cfg, list(overrides))


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(10, (n,), generator=g)


def losses(run_dir):
    return [r["loss"] for r in io.read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("bad", ["train.precision=fp8", "train.precision=float16", "train.compile=maybe"])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match=bad.split("=")[0]):
        validate(tiny("e2e", bad))


@pytest.mark.parametrize("method", ["e2e", "dblocks"])
def test_bf16_run_trains_and_its_loss_falls(tmp_path, method):
    pytest.importorskip("sklearn")
    cfg = tiny(method, "train.precision=bf16", "train.steps=30", "train.log_every=5", "train.lr=1e-2",
               "train.batch_size=32", *SMALL_EVAL)
    results = train(cfg, tmp_path / method, progress=False)
    curve = losses(tmp_path / method)
    assert results["skipped_steps"] == 0 and curve[-1] < 0.9 * curve[0]
    weights, _ = io.load_safetensors(tmp_path / method / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # autocast leaves the weights float32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_resume_is_exact(tmp_path, monkeypatch, precision):
    """Cut mid-run and resumed: the same weights as an uncut run (fp16: the scalers are saved with the optimizers)."""
    pytest.importorskip("sklearn")
    cfg = tiny("dblocks", f"train.precision={precision}", "train.steps=6", "train.ckpt_every=1000", *SMALL_EVAL)
    train(cfg, tmp_path / "full", progress=False)
    original = signal_on_step(monkeypatch, DBlocks, 7, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(DBlocks, "step", original)
    state = io.load_torch(tmp_path / "cut" / "state.pt")
    assert all(("scaler" in o) == (precision == "fp16") for o in state["method"]["opts"].values())
    train(None, tmp_path / "cut", resume=True, progress=False)
    a, _ = io.load_safetensors(tmp_path / "full" / "model.safetensors")
    b, _ = io.load_safetensors(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_scalers_are_per_block():
    cfg = tiny("dblocks", "train.precision=fp16", "blocks.num_blocks=2")
    torch.manual_seed(0)
    model = new_model(cfg, DIGITS)
    method = DBlocks(model, cfg, 20)
    scalers = method.scalers
    assert scalers[0] is not scalers[1] and scalers[0] is method.opts[0].scaler
    before = {b: s.state_dict() for b, s in scalers.items()}
    with autocast("fp16", "cpu"):
        for _ in range(3):
            assert not method.step(batch(), 0).get("skipped")
    assert scalers[0].state_dict()["_growth_tracker"] == 3  # block 0 stepped three times
    assert scalers[1].state_dict() == before[1]  # block 1's scaler never saw them
    state = method.state_dict()
    fresh = DBlocks(new_model(cfg, DIGITS), cfg, 20)
    fresh.load_state_dict(state)
    assert fresh.scalers[0].state_dict() == scalers[0].state_dict()


def test_fp16_overflow_is_a_skipped_step_and_backs_the_scale_off():
    cfg = tiny("e2e", "train.precision=fp16")
    lin = torch.nn.Linear(4, 4)
    opt = Optimizer(list(lin.parameters()), cfg, 10)
    opt.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # any gradient overflows
    before = [p.detach().clone() for p in lin.parameters()]
    with autocast("fp16", "cpu"):
        out = update(lin(torch.randn(3, 4)).float().square().mean(), list(lin.parameters()), [opt], 1.0)
    assert out["skipped"] and opt.scaler.get_scale() == 2.0**126 and opt.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))


def test_bf16_planner_dtype_and_measured_saved_bytes():
    """plan of a bf16 config counts activations at 2 bytes and weights, gradients, optimizer at 4. Autocast does not
    save everything in bf16: the residual stream, norms' statistics and the loss stay float32, and each matmul saves
    a bf16 copy of its weight; the planner's model (all activations in bf16) is a lower bound, within 2x below."""
    for method in ("e2e", "dblocks"):
        cfg = tiny(method, "train.precision=bf16", "train.batch_size=64")
        spec = Spec(cfg, DIGITS)
        assert (spec.dtype, spec.weight_dtype) == ("bfloat16", "float32")
        row = predict(spec, Configuration(method, 3 if method == "dblocks" else 1))
        fp32 = predict(Spec(cfg, DIGITS, dtype="float32"), Configuration(method, 3 if method == "dblocks" else 1))
        assert (row["params"], row["optimizer"]) == (fp32["params"], fp32["optimizer"])
        torch.manual_seed(0)
        model = new_model(cfg, DIGITS)
        m = (EndToEnd if method == "e2e" else DBlocks)(model, cfg, 10)
        x, y = batch(64)
        with autocast("bf16", "cpu"):
            measured, _ = saved_activation_bytes(lambda m=m, b=(x, y): m.probe_loss(b),
                                                 list(model.parameters()))
        assert row["activations"] <= measured < min(2 * row["activations"], fp32["activations"]), (method, measured)


@pytest.mark.skipif(not os.environ.get("DIFFUSIONBLOCKS_COMPILE_TESTS"),
                    reason="torch.compile's cold start takes 20-60 s on a CPU: set DIFFUSIONBLOCKS_COMPILE_TESTS=1")
@pytest.mark.parametrize("method", ["e2e", "dblocks"])
def test_compile_matches_eager_in_fp32(method):
    """train.compile: a compiled step trains the same weights as an eager one, to float tolerance (one tiny model)."""
    cfg = tiny(method, "model.depth=2")
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = new_model(cfg, DIGITS)
        if compiled:
            compile_step(model)
        m = (EndToEnd if method == "e2e" else DBlocks)(model, cfg, 10)
        out = [m.step(batch(seed=i), i % m.num_blocks)["loss"] for i in range(4)]
        runs.append((out, [p.detach().clone() for p in model.parameters()]))
    (eager, w_eager), (comp, w_comp) = runs
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(w_comp, w_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_step_compiles_each_blocks_network_or_the_end_to_end_loss():
    """What train.compile compiles (lazily: nothing runs here), the weights' names unchanged."""
    for method, what in (("dblocks", "the network of each block (1 stack)"), ("e2e", "the loss")):
        model = new_model(tiny(method), DIGITS)
        names = list(model.state_dict())
        assert compile_step(model) == what
        assert list(model.state_dict()) == names
        compiled = model.stack._fast if method == "dblocks" else model.loss
        assert hasattr(compiled, "_torchdynamo_orig_callable")  # a torch.compile wrapper


def test_compile_needs_a_list_of_layers():
    with pytest.raises(ValueError, match="train.compile"):
        compile_layers(torch.nn.Linear(2, 2))
