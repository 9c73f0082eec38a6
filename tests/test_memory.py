"""Memory: lean adaLN-zero, the measurement module, residency policies, the sequential schedule, the planner."""

import json

import pytest
import torch
from conftest import assert_plan_matches

from diffusionblocks.blocks import split_layers
from diffusionblocks.cli import main
from diffusionblocks.config import apply_overrides, load_preset, parse_ints
from diffusionblocks.memory import AllocationPeak, SavedTensors, saved_activation_bytes
from diffusionblocks.methods import METHODS, Method
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.nn import AdaLNZero, GatedResidual, Mlp, ModulatedNorm, PreNormLayer, TransformerLayer
from diffusionblocks.plan import (
    Configuration,
    Spec,
    configurations,
    layer_activation_bytes,
    measure_all,
    measure_configuration,
    parse_bytes,
    plan,
)
from diffusionblocks.residency import Residency
from diffusionblocks.run import new_model
from diffusionblocks.run import place as _place
from diffusionblocks.tasks.classify import ClassifyTask, preset_tiny
from diffusionblocks.tasks.images import ImageShapes

DIGITS = ImageShapes((8, 8), 1, 10)


def tiny(*overrides, batch=8):
    cfg = preset_tiny()
    cfg.train.batch_size = batch
    return apply_overrides(cfg, list(overrides))


# -- the layer: conditioning that costs no activation memory ------------------------------------


def test_fused_functions_match_autograd_in_double():
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    h, shift, scale = rand(3, 5, 8), rand(3, 1, 8), rand(3, 1, 8)
    assert torch.autograd.gradcheck(lambda a, b, c: ModulatedNorm.apply(a, b, c, 1e-6), (h, shift, scale))
    gate, x, w, bias = rand(3, 1, 8), rand(3, 5, 6), rand(8, 6), rand(8)
    assert torch.autograd.gradcheck(GatedResidual.apply, (h, gate, x, w, bias))
    gate2, x2 = rand(3, 8), rand(3, 6)  # vectors (N, D): no token axis
    assert torch.autograd.gradcheck(GatedResidual.apply, (rand(3, 8), gate2, x2, w, bias))


def test_lean_layer_same_gradients_as_the_straightforward_one():
    torch.manual_seed(0)
    lean = TransformerLayer(16, 2, 16, 2.0)
    plain = TransformerLayer(16, 2, 16, 2.0, recompute_gate=False)
    for m in (lean, plain):
        for p in m.parameters():  # leave the zero init: gates must be non-zero to test the gate path
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(p.numel()))
    h, c = torch.randn(4, 6, 16), torch.randn(4, 16)
    grads = []
    for m in (lean, plain):
        out = m(h, c)
        grads.append(torch.autograd.grad(out.square().sum(), list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_adaln_layer_saves_what_a_plain_prenorm_layer_saves():
    torch.manual_seed(0)
    N, T, D = 8, 10, 32
    h, c = torch.randn(N, T, D, requires_grad=True), torch.randn(N, D, requires_grad=True)
    layer, prenorm = TransformerLayer(D, 4, D, 2.0), PreNormLayer(D, 4, 2.0)
    straightforward = TransformerLayer(D, 4, D, 2.0, recompute_gate=False)
    counts = {}
    for name, m in (("lean", layer), ("prenorm", prenorm), ("straightforward", straightforward)):
        counts[name], _ = saved_activation_bytes(lambda m=m: m(h, c).sum(), list(m.parameters()))
    unit = N * T * D * 4
    # per-token tensors are identical; adaLN adds per-sample vectors only (its inputs c, SiLU(c), modulation)
    per_sample = 4 * N * (D + 2 * (D + 3 * D))
    assert counts["lean"] - counts["prenorm"] == per_sample
    assert counts["straightforward"] - counts["lean"] == 2 * unit  # one branch output per sublayer
    assert counts["lean"] <= 1.10 * counts["prenorm"]


def test_branch_must_expose_features_and_out():
    with pytest.raises(TypeError, match="features"):
        AdaLNZero(torch.nn.Linear(4, 4), 4, 4)
    AdaLNZero(Mlp(4, 8), 4, 4)


# -- exact counts and the planner's formula --------------------------------------------------


def test_one_more_layer_costs_exactly_the_formula():
    """Saved bytes of a depth-3 stack minus a depth-2 one = layer_activation_bytes, to the byte."""
    measured = {}
    for depth in (2, 3):
        cfg = tiny(f"model.depth={depth}", "train.method=e2e")
        torch.manual_seed(0)
        model = new_model(cfg, DIGITS)
        x, y = torch.rand(8, 1, 8, 8), torch.randint(10, (8,))
        measured[depth], _ = saved_activation_bytes(lambda m=model, x=x, y=y: m.loss(x, y).mean(),
                                                    list(model.parameters()))
    assert measured[3] - measured[2] == layer_activation_bytes(Spec(tiny(), DIGITS))


def test_dblocks_step_saves_what_the_same_layers_save_end_to_end():
    """The physical limit: one block's step keeps (almost) only what its layers keep in e2e."""
    counts = {}
    for name, overrides in (("dblocks B=2", ("train.method=dblocks", "blocks.num_blocks=2")),
                            ("e2e, 2 layers", ("train.method=e2e", "model.depth=2")),
                            ("e2e prenorm, 2 layers", ("train.method=e2e", "model.depth=2", "model.layer=prenorm")),
                            ("e2e, 4 layers", ("train.method=e2e",))):
        counts[name] = measure_configuration(tiny(*overrides), DIGITS).activations
    assert counts["dblocks B=2"] <= 1.10 * counts["e2e, 2 layers"]
    assert counts["dblocks B=2"] <= 1.10 * counts["e2e prenorm, 2 layers"]
    assert counts["e2e, 4 layers"] / counts["dblocks B=2"] > 1.8  # B = 2: about half


def test_measured_step_parts_are_exact():
    cfg = tiny("train.method=e2e")
    m = measure_configuration(cfg, DIGITS)
    torch.manual_seed(0)
    model = new_model(cfg, DIGITS)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    assert m.params == m.grads == 4 * n_params
    assert m.optimizer == 2 * 4 * n_params + 4 * n_tensors  # AdamW moments + 4-byte step counters
    assert m.peak >= m.params + m.optimizer + max(m.activations, m.grads)


def test_allocation_peak_sees_allocations_and_frees():
    with AllocationPeak() as alloc:
        keep = torch.empty(2**20, dtype=torch.uint8)
        with alloc.measure():
            a = torch.empty(2**20, dtype=torch.uint8)
            del a
            b = torch.empty(3 * 2**20, dtype=torch.uint8)
            del keep  # allocated inside the profiled region: its size is known
            del b
    assert 3 * 2**20 <= alloc.peak < 3 * 2**20 + 2**16
    assert alloc.net <= -2**20 + 2**16


def test_saved_tensors_counts_each_storage_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    with SavedTensors([w]) as saved:
        y = (x @ w).sin()  # mm saves x and w; sin saves its input (x @ w)
        z = y * y  # saves y (twice, one storage)
    assert saved.bytes == x.numel() * 4 + 2 * 3 * 4 * 4 and saved.count == 3
    del z


def test_checkpointing_reduces_saved_bytes_in_both_methods():
    for method in ("e2e", "dblocks"):
        plain = measure_configuration(tiny(f"train.method={method}"), DIGITS).activations
        ckpt = measure_configuration(tiny(f"train.method={method}", "model.checkpoint=1"), DIGITS).activations
        assert ckpt < plain / 2, method


# -- residency ---------------------------------------------------------------------------------


def test_active_residency_keeps_idle_blocks_off_the_device(tmp_path):
    cfg = tiny("dblocks.residency=active", "blocks.num_blocks=2", "dblocks.block_choice=round-robin")
    torch.manual_seed(0)
    model = new_model(cfg, DIGITS)
    method = DBlocks(model, cfg, 10, offload_dir=tmp_path)
    res = method.residency
    _place(model, torch.device("cpu"), res, None)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(10, (8,))
    files = lambda: sorted(p.name for p in res.directory.iterdir())
    assert all(res.is_offloaded(p) for b in (0, 1) for p in method.block_params[b])
    assert not any(res.is_offloaded(p) for p in method.shared_params)
    method.step((x, y))  # block 0
    assert not any(res.is_offloaded(p) for p in method.block_params[0])
    assert all(res.is_offloaded(p) for p in method.block_params[1])
    method.step((x, y))  # block 1: block 0 and its fresh AdamW moments go to disk
    state0 = [v for p in method.block_params[0] for k, v in method.opts[0].opt.state[p].items() if k != "step"]
    assert state0 and all(res.is_offloaded(t) for t in state0)
    assert not any(res.is_offloaded(p) for p in method.block_params[1])
    assert any(name.startswith("block0.") for name in files())
    offloaded_params = sum(p.numel() * 4 for p in method.block_params[0])
    assert res.offloaded_bytes() >= 3 * offloaded_params  # weights + two moments
    res.close()
    assert not res.directory.exists()


@pytest.mark.parametrize("choice", ["random", "sequential"])
def test_active_residency_trains_exactly_like_all(tmp_path, choice):
    pytest.importorskip("sklearn")
    from diffusionblocks import io
    from diffusionblocks.train import train

    weights = {}
    for policy in ("all", "active"):
        cfg = tiny(f"dblocks.residency={policy}", f"dblocks.block_choice={choice}", "train.steps=8",
                   "train.ema=0.9", "data.test_limit=40", "train.eval_limit=40", batch=16)
        run = tmp_path / policy
        train(cfg, run, progress=False)
        weights[policy] = io.load_safetensors(run / "ema.safetensors")[0]
        assert not list(run.glob(".offload-*"))  # the offload files are gone
    assert weights["all"].keys() == weights["active"].keys()
    for k in weights["all"]:
        assert torch.equal(weights["all"][k], weights["active"][k]), k


def test_sequential_loads_each_block_once_and_freezes_the_shared_parts_after_block_0():
    cfg = tiny("dblocks.residency=active", "blocks.num_blocks=2", "dblocks.block_choice=sequential")
    torch.manual_seed(0)
    model = new_model(cfg, DIGITS)
    method = DBlocks(model, cfg, 6)
    _place(model, torch.device("cpu"), method.residency, None)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(10, (8,))
    blocks, shared_after = [], []
    for _ in range(6):
        blocks.append(method.step((x, y))["block"])
        shared_after.append([p.detach().clone() for p in method.shared_params])
    assert blocks == [0, 0, 0, 1, 1, 1]
    assert method.residency.swaps == 2  # each block loaded once
    assert not all(torch.equal(a, b) for a, b in zip(shared_after[0], shared_after[2]))  # trained with block 0
    for later in shared_after[3:]:
        assert all(torch.equal(a, b) for a, b in zip(shared_after[2], later))  # frozen afterwards
    method.residency.close()


def test_residency_rejects_unknown_policy():
    with pytest.raises(ValueError, match="residency"):
        Residency("some", "cpu", [], [])


def test_measure_step_counts_only_resident_bytes_under_active():
    all_ = measure_configuration(tiny("blocks.num_blocks=4", "model.depth=4"), DIGITS)
    active = measure_configuration(tiny("blocks.num_blocks=4", "model.depth=4", "dblocks.residency=active"),
                                   DIGITS)
    assert active.params < all_.params and active.optimizer < all_.optimizer
    assert active.grads == all_.grads and active.activations == all_.activations
    assert active.offloaded > 0 and all_.offloaded == 0


# -- the planner ---------------------------------------------------------------------------------


def test_planner_is_exact_on_params_grads_optimizer_and_close_on_activations():
    spec = Spec(tiny(), DIGITS)
    result = measure_all(spec, configurations(4, (2, 4)), progress=False)
    assert len(result["rows"]) == 2 + 2 * 3
    assert_plan_matches(result, exact=False)


@pytest.mark.parametrize("conditional", ["true", "false"])
def test_planner_predicts_image_generation(conditional):
    """The DiT under EDM: parameters, gradients and optimizer state exact, saved activations to the byte (the
    patch embedding's input, DiT's final layer, EDM's scalings and the loss included), end to end and per block."""
    cfg = apply_overrides(load_preset("gen-tiny"), ["train.batch_size=4", f"gen.conditional={conditional}"])
    result = measure_all(Spec.of(cfg), configurations(cfg.model.depth, (2,)), progress=False)
    assert result["task"] == "imagegen" and result["model"]["tokens"] == 16
    assert_plan_matches(result)


def test_planner_reports_fit_and_the_orders_that_must_hold():
    spec = Spec(apply_overrides(preset_tiny(), ["model.depth=12"]), DIGITS)
    rows = {r["name"]: r for r in plan(spec, configurations(12, (2, 3, 6)), device_memory=parse_bytes("3MB"))["rows"]}
    assert rows["dblocks B=6 active"]["total"] < rows["dblocks B=3 active"]["total"] < rows["e2e"]["total"]
    assert rows["dblocks B=3 active"]["params"] < rows["dblocks B=3 all"]["params"] == rows["dblocks B=6 all"]["params"]
    assert rows["e2e+ckpt1"]["activations"] < rows["e2e"]["activations"]
    assert {r["fits"] for r in rows.values()} == {True, False}
    assert all(r["fits"] == (r["total"] <= 3e6) for r in rows.values())


def test_planner_dtype_and_optimizer():
    cfg = tiny()
    fp32 = plan(Spec(cfg, DIGITS), [Configuration("e2e")])["rows"][0]
    bf16 = plan(Spec(cfg, DIGITS, dtype="bf16", optimizer="sgd", device="cuda"), [Configuration("e2e")])["rows"][0]
    assert bf16["params"] * 2 == fp32["params"] and bf16["optimizer"] == 0


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("24g", 24 * 2**30),
                                            ("512MiB", 512 * 2**20), ("1.5TB", 1.5e12), ("1000", 1000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == int(expected)


@pytest.mark.parametrize("text", ["24 parsecs", "GB", "", "-3GB", "0", "0.5B", "0.4"])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(ValueError, match="memory size|cannot read"):
        parse_bytes(text)


def test_impossible_plans_are_clear_errors():
    with pytest.raises(ValueError, match="dtype"):
        Spec(tiny(), DIGITS, dtype="float8")
    with pytest.raises(ValueError, match="optimizer"):
        Spec(tiny(), DIGITS, optimizer="lion")
    with pytest.raises(ValueError, match="model.width"):
        Spec(tiny("model.width=-4"), DIGITS)
    with pytest.raises(ValueError, match="channels"):
        ClassifyTask().plan_shapes(tiny(), image_size=(8, 8), channels=0, classes=10)
    with pytest.raises(ValueError, match="B=5"):
        configurations(4, (2, 5))


def test_plan_cli(capsys):
    assert main(["plan", "--preset", "tiny", "--data", "digits", "--blocks", "2,4", "--device-memory", "3MB",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["rows"]][:3] == ["e2e", "e2e+ckpt1", "dblocks B=2 all"]
    assert out["device_memory"] == 3 * 10**6 and all("fits" in r for r in out["rows"])
    assert main(["plan", "--preset", "tiny", "--data", "digits", "--blocks", "2"]) == 0
    assert "dblocks B=2 active" in capsys.readouterr().out
    for bad in (["--width", "-8"], ["--dtype", "int3"], ["--device-memory", "lots"], ["--blocks", "2,x"],
                ["--data", "mine.npz"], ["--image-size", "28x"]):
        assert main(["plan", "--preset", "tiny", "--data", "digits", *bad]) == 2, bad
        assert "error" in capsys.readouterr().err


def test_a_method_without_a_plan_is_named_in_one_line_and_skipped(monkeypatch, capsys):
    """A method declares how a step of it is planned (Method.plan); one that declares nothing gets no row, and `plan`
    and `memory` say so in one line."""
    unplanned = type("Unplanned", (Method,), {"name": "unplanned", "model_form": "end-to-end"})
    monkeypatch.setitem(METHODS, "unplanned", unplanned)
    assert main(["plan", "--preset", "tiny", "--data", "digits", "--blocks", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "unplanned" in line]
    assert len(lines) == 1 and lines[0].startswith("not planned: ") and "Method.plan" in lines[0]
    assert "unplanned" not in {c.method for c in configurations(4, (2,))}
    with pytest.raises(ValueError, match="cannot plan train.method=unplanned"):
        plan(Spec(tiny(), DIGITS), [Configuration("unplanned")])


def test_plan_says_the_split_it_assumes_for_an_uneven_b(capsys):
    assert main(["plan", "--preset", "tiny", "--data", "digits", "--blocks", "2,3"]) == 0
    out = capsys.readouterr().out
    # 4 layers in 3 blocks: the planner's split, and the setting that trains it (training refuses an uneven B
    # without one); an even B needs no such line
    assert "B=3 splits the 4 layers 2+1+1" in out and "blocks.allocation=2,1,1" in out and "B=2 splits" not in out
    split_layers(4, 3, parse_ints("2,1,1", "blocks.allocation", ""))
    assert main(["plan", "--preset", "tiny", "--data", "digits", "--blocks", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["split"] for r in rows if r["method"] == "dblocks"] == [[2, 1, 1]] * 3 and rows[0]["split"] == [4]


def test_memory_cli_writes_json_and_plot(tmp_path, capsys):
    assert main(["memory", "--preset", "tiny", "--data", "digits", "--blocks", "2", "--batch-size", "4",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dblocks B=2 active" in out and "|" in out
    result = json.loads((tmp_path / "memory.json").read_text())
    assert all("measured" in r for r in result["rows"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "memory.png").stat().st_size > 1000


@pytest.mark.parametrize("policy", ["all", "active"])
def test_the_ema_averages_follow_their_parameters_onto_the_device(tmp_path, monkeypatch, policy):
    """Shared (stem/head) averages are sent to the device under both policies, blocks' averages go with their
    blocks, and the residency manager keeps working on the EMA's own dict. A CPU has one device, so the test
    records which tensors went through .to(device)."""
    from diffusionblocks.methods import EMA

    cfg = tiny(f"dblocks.residency={policy}", "blocks.num_blocks=2")
    torch.manual_seed(0)
    model = new_model(cfg, DIGITS)
    ema = EMA(model, 0.9)
    method = DBlocks(model, cfg, 10, offload_dir=tmp_path, ema=ema)
    moved, original = set(), torch.Tensor.to

    def to(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        moved.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    _place(model, torch.device("cpu"), method.residency, ema)
    monkeypatch.undo()
    shared = {n for n, p in model.named_parameters() if any(p is q for q in method.shared_params)}
    assert shared and all(id(ema.shadow[n]) in moved for n in shared)
    assert method.residency.extra[0][0] is ema.shadow
    block_names = method.residency.extra_names()
    assert block_names and not block_names & shared
    if policy == "active":
        assert all(method.residency.is_offloaded(ema.shadow[n]) for n in block_names)
    method.residency.close()
