import pytest
import torch
from conftest import vector_parts
from torch import nn

from diffusionblocks.blocks import BlockStack, StackModel, split_layers
from diffusionblocks.config import apply_overrides
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.noise import LogNormalLevels, Partition
from diffusionblocks.precond import mse_loss
from diffusionblocks.tasks.classify import preset_tiny


def make_stack(num_blocks=3, num_layers=6, shared=True, allocation=None, gamma=0.05):
    layers, stem, head = vector_parts(num_layers)
    part = Partition.create(LogNormalLevels(), num_blocks, gamma=gamma)
    return BlockStack(layers, stem, head, part, allocation=allocation, shared_stem_head=shared), layers


def randomize(module, scale=0.1, seed=0):
    """Move every parameter off its init (adaLN-zero gates start at 0, which hides gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_even_split_keeps_every_layer_once_in_order():
    stack, layers = make_stack(3, 6)
    held = [layer for b in range(3) for layer in stack.blocks[b].layers]
    assert len(held) == 6 and all(a is b for a, b in zip(held, layers))
    assert [list(stack.layer_range(b)) for b in range(3)] == [[0, 1], [2, 3], [4, 5]]


def test_explicit_uneven_allocation():
    stack, layers = make_stack(3, 7, allocation=[3, 2, 2])
    assert [len(stack.blocks[b].layers) for b in range(3)] == [3, 2, 2]
    assert stack.blocks[1].layers[0] is layers[3]
    assert list(stack.layer_range(2)) == [5, 6]


@pytest.mark.parametrize(
    "num_layers, num_blocks, allocation, match",
    [
        (7, 3, None, "do not split evenly"),  # would drop a layer, as the reference code did
        (6, 3, [2, 2, 1], "sums to 5"),
        (6, 3, [3, 2, 2], "sums to 7"),  # would duplicate a layer
        (6, 3, [4, 2], "one per block"),
        (6, 3, [3, 3, 0], "integers >= 1"),
        (6, 0, None, "num_blocks"),
        (2, 3, None, "more than the 2 layers"),
    ],
)
def test_bad_allocations_are_rejected(num_layers, num_blocks, allocation, match):
    with pytest.raises(ValueError, match=match):
        split_layers(num_layers, num_blocks, allocation)


def test_more_blocks_than_layers_is_rejected_by_the_stack():
    layers, stem, head = vector_parts(2)
    with pytest.raises(ValueError, match="more than the 2 layers"):
        BlockStack(layers, stem, head, Partition.create(LogNormalLevels(), 3))


def test_fresh_layers_are_identities():
    stack, _ = make_stack(2, 4)
    z_in, c_noise, cond = torch.randn(5, 4), torch.randn(5), torch.randn(5, 3)
    h, c = stack.stem(z_in, c_noise, cond)
    for b in range(2):
        assert torch.equal(stack.net(b, z_in, c_noise, cond), stack.head(h, c))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("block", [0, 1, 2])
def test_gradient_isolation(shared, block):
    stack, _ = make_stack(3, 6, shared=shared)
    randomize(stack)
    gen = torch.Generator().manual_seed(block)
    y, cond = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
    z, sigma = stack.noisy_input(block, y, gen)
    lo, hi = stack.partition.training_interval(block)
    assert bool(((sigma.double() >= lo * (1 - 1e-6)) & (sigma.double() <= hi * (1 + 1e-6))).all())
    # drawn in the block's widened interval: owned by the block itself or, in the overlap, by a neighbour
    assert bool(((stack.partition.route(sigma.double()) - block).abs() <= 1).all())
    loss = mse_loss(stack.denoise(block, z, sigma, cond), y, stack.precond.weight(sigma)).mean()
    loss.backward()
    trained = {id(p) for p in stack.block_parameters(block) + stack.shared_parameters()}
    for name, p in stack.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, f"{name} (not block {block}) got a gradient"
    shared_names = {n for n, _ in stack.named_parameters() if n.startswith(("stem.", "head."))}
    assert bool(shared_names) == shared


@pytest.mark.parametrize("shared", [True, False])
def test_block_output_ignores_other_blocks_weights(shared):
    stack, _ = make_stack(3, 6, shared=shared)
    randomize(stack)
    z, cond = torch.randn(6, 4), torch.randn(6, 3)
    sigma = torch.full((6,), 0.3)
    before = stack.denoise(1, z, sigma, cond)
    with torch.no_grad():
        for b in (0, 2):
            for p in stack.blocks[b].parameters():
                p.add_(1.0)
    assert torch.equal(stack.denoise(1, z, sigma, cond), before)
    with torch.no_grad():  # and it does change when its own weights change (the check can fail)
        for p in stack.blocks[1].parameters():
            p.add_(0.1)
    assert not torch.allclose(stack.denoise(1, z, sigma, cond), before)


def test_calling_the_stack_routes_each_sample_to_its_block():
    stack, _ = make_stack(3, 6)
    randomize(stack)
    part = stack.partition
    sigma = torch.tensor([60.0, 0.3, 0.01, 2.0, 0.1, 0.35])
    z, cond = torch.randn(6, 4), torch.randn(6, 3)
    owners = part.route(sigma)
    assert owners.tolist() == [0, 1, 2, 0, 2, 1]
    out = stack(z, sigma, cond)
    for i in range(6):
        alone = stack.denoise(int(owners[i]), z[i:i + 1], sigma[i:i + 1], cond[i:i + 1])
        assert torch.allclose(out[i:i + 1], alone, atol=1e-6)
    # a scalar level is broadcast to the batch; the result equals the owning block's
    assert torch.allclose(stack(z, torch.tensor(0.3), cond), stack.denoise(1, z, torch.full((6,), 0.3), cond))
    with pytest.raises(ValueError, match="outside"):
        stack(z, torch.full((6,), 100.0), cond)


def test_shared_and_replicated_stem_head_parameters():
    shared, _ = make_stack(3, 6, shared=True)
    repl, _ = make_stack(3, 6, shared=False)
    n_stem_head = sum(p.numel() for p in shared.shared_parameters())
    n_layers = sum(p.numel() for b in range(3) for p in shared.block_parameters(b))
    assert sum(p.numel() for p in shared.parameters()) == n_layers + n_stem_head
    assert sum(p.numel() for p in repl.parameters()) == n_layers + 3 * n_stem_head
    assert list(repl.shared_parameters()) == []
    assert repl.blocks[0].stem is not repl.blocks[1].stem
    # one block's state is self-contained under its own prefix, ready for per-block checkpoints
    assert all(k.startswith("blocks.") for k in repl.state_dict())
    assert any(k.startswith("stem.") for k in shared.state_dict())


# -- the BlockModel contract: each parameter is one block's own or shared ----------------------------------


class ReadoutModel(StackModel, nn.Module):
    """A model on the stack: a readout after it, and a scale of its own that every block trains."""

    def __init__(self, shared: bool):
        super().__init__()
        self.stack, _ = make_stack(3, 6, shared=shared)
        self.partition = self.stack.partition
        self.scale = nn.Parameter(torch.ones(4))
        self.add_readout(lambda: nn.Linear(4, 5))

    def extra_shared(self):
        return [self.scale]

    def block_loss(self, block, y, cond, generator=None):
        z, sigma = self.stack.noisy_input(block, y, generator)
        return self.readout_of(block)(self.scale * self.stack.denoise(block, z, sigma, cond)).square().mean(1)


def owners(model) -> dict[str, list]:
    """Each parameter's name -> the blocks whose own it is, and "shared" where every block trains it."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {n: [] for n in names.values()}
    for b in range(model.num_blocks):
        for p in model.block_parameters(b):
            found[names[id(p)]].append(b)
    for p in model.shared_parameters():
        found[names[id(p)]].append("shared")
    return found


@pytest.mark.parametrize("shared", [True, False])
def test_the_stack_owns_each_parameter_once(shared):
    stack, _ = make_stack(3, 6, shared=shared)
    found = owners(stack)
    assert all(len(o) == 1 for o in found.values()), found
    stem_head = {n for n in found if n.startswith(("stem.", "head."))}
    assert {n for n, o in found.items() if o == ["shared"]} == stem_head and bool(stem_head) == shared
    for b in range(3):  # block b owns what lies under its prefix: its layers, and a replicated stem/head
        assert {n for n, o in found.items() if o == [b]} == {n for n in found if n.startswith(f"blocks.{b}.")}
        assert [p for m in stack.block_modules(b) for p in m.parameters()] == stack.block_parameters(b)
    assert stack.num_layers == 6 and [stack.block_layers(b) for b in range(3)] == [2, 2, 2]


@pytest.mark.parametrize("shared", [True, False])
def test_a_model_on_the_stack_shares_its_readout_or_gives_each_block_one(shared):
    model = ReadoutModel(shared)
    found = owners(model)
    assert all(len(o) == 1 for o in found.values()), found
    assert found["scale"] == ["shared"]
    readouts = {n: o for n, o in found.items() if n.startswith("readout")}
    if shared:  # one readout, as the stem/head
        assert readouts == {"readout.weight": ["shared"], "readout.bias": ["shared"]}
        assert model.readout_of(0) is model.readout_of(2) is model.readout
    else:  # block b's own, under the names saved runs hold
        assert readouts == {f"readouts.{b}.{k}": [b] for b in range(3) for k in ("weight", "bias")}
        assert model.readout_of(1) is model.readouts[1] and model.readouts[1] in model.block_modules(1)
    # DiffusionBlocks trains it: a step updates the block's own parameters and the shared ones, nothing else
    cfg = apply_overrides(preset_tiny(), ["blocks.num_blocks=3", "dblocks.block_choice=round-robin"])
    randomize(model)
    method = DBlocks(model, cfg, 6)
    y, cond = torch.randn(8, 4), torch.randn(8, 3)
    for b in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert method.step((y, cond))["block"] == b
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {n for n, o in found.items() if o in ([b], ["shared"])}
