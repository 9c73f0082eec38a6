"""The adapters (Residual, TorchEncoderLayer, HFLayer) in a BlockStack: they run, keep shapes, train a block alone and
lower its loss; a layer that does not fit layer(h, c) -> h is refused, naming what to wrap it in. The Hugging Face
layers are built from tiny configs, offline (nothing is downloaded); those tests skip without transformers."""

import inspect
import re
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn

from diffusionblocks.adapters import HFLayer, Residual, TorchEncoderLayer
from diffusionblocks.blocks import BlockStack, StackModel
from diffusionblocks.config import apply_overrides
from diffusionblocks.methods.dblocks import DBlocks
from diffusionblocks.models import VectorHead, VectorStem
from diffusionblocks.nn import NoiseEmbedding
from diffusionblocks.noise import LogNormalLevels, Partition
from diffusionblocks.precond import mse_loss
from diffusionblocks.tasks.classify import preset_tiny

D, T, DZ = 32, 6, 2  # width, tokens, token size of the tiny sequence task


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def hf(name: str):
    """A module of transformers (skips the test without it)."""
    pytest.importorskip("transformers")
    return pytest.importorskip(f"transformers.{name}")


def hf_layers(kind: str, n: int, impl: str = "eager") -> list[nn.Module]:
    """n tiny Hugging Face layers of one family, wrapped."""
    if kind in ("bert", "roberta"):
        m = hf(f"models.{kind}.modeling_{kind}")
        config = getattr(m, f"{kind.capitalize()}Config")(hidden_size=D, num_attention_heads=2, intermediate_size=64,
                                                          num_hidden_layers=n, attn_implementation=impl)
        return [HFLayer(getattr(m, f"{kind.capitalize()}Layer")(config)) for _ in range(n)]
    if kind == "gpt2":
        m = hf("models.gpt2.modeling_gpt2")
        config = m.GPT2Config(n_embd=D, n_head=2, n_layer=n, attn_implementation=impl)
        return [HFLayer(m.GPT2Block(config, layer_idx=i), "decoder") for i in range(n)]
    m = hf("models.llama.modeling_llama")
    config = m.LlamaConfig(hidden_size=D, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                           num_hidden_layers=n, vocab_size=16, attn_implementation=impl)
    # later versions take the rotary angles from the model; 4.40 computes them in the layer
    takes = "position_embeddings" in inspect.signature(m.LlamaDecoderLayer.forward).parameters
    rotary = m.LlamaRotaryEmbedding(config) if takes else None
    return [HFLayer(m.LlamaDecoderLayer(config, i), "decoder", rotary=rotary) for i in range(n)]


def make_layers(kind: str, n: int = 4) -> list[nn.Module]:
    torch.manual_seed(0)
    if kind == "residual":  # adaLN-zero conditioned
        return [Residual(nn.Sequential(nn.Linear(D, 64), nn.GELU(), nn.Linear(64, D)), dim=D) for _ in range(n)]
    if kind == "residual-plain":
        return [Residual(nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.Tanh())) for _ in range(n)]
    if kind.startswith("torch"):
        batch_first, causal = kind != "torch-seq-first", kind == "torch-causal"
        return [TorchEncoderLayer(nn.TransformerEncoderLayer(D, 2, 64, dropout=0.0, batch_first=batch_first),
                                  causal=causal) for _ in range(n)]
    return hf_layers(kind, n)


KINDS = ["residual", "residual-plain", "torch", "torch-seq-first", "torch-causal", "bert", "roberta", "gpt2", "llama"]


class TokenStem(nn.Module):
    """(z_in (N, T, DZ), c_noise (N,), None) -> h (N, T, D) with learned positions, c (N, D)."""

    def __init__(self):
        super().__init__()
        self.embed, self.noise = nn.Linear(DZ, D), NoiseEmbedding(D, freq_dim=16)
        self.pos = nn.Parameter(0.1 * torch.randn(1, T, D))

    def forward(self, z_in, c_noise, cond=None):
        return self.embed(z_in) + self.pos, self.noise(c_noise)


class Denoiser(StackModel, nn.Module):
    """The BlockModel contract over a stack, for DBlocks: block b's loss on noise of its own levels."""

    def __init__(self, stack):
        super().__init__()
        self.stack, self.partition = stack, stack.partition

    def block_loss(self, block, y, generator=None):
        z, sigma = self.stack.noisy_input(block, y, generator)
        return mse_loss(self.stack.denoise(block, z, sigma), y, self.stack.precond.weight(sigma))


def make_stack(kind: str, num_blocks: int = 2) -> BlockStack:
    layers = make_layers(kind)
    torch.manual_seed(1)
    return BlockStack(layers, TokenStem(), VectorHead(D, DZ), Partition.create(LogNormalLevels(), num_blocks))


def curves(n: int, seed: int) -> torch.Tensor:
    """n points running around the unit circle, T steps each from a random phase: (n, T, 2)."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * torch.pi * torch.rand(n, 1, generator=g) + 0.6 * torch.arange(T)
    return torch.stack([angle.cos(), angle.sin()], dim=-1)


def randomize(module, scale=0.1):
    """Every parameter off its init (a zero-initialised projection or gate would hide gradients)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", KINDS)
def test_an_adapted_stack_runs_keeps_shapes_and_trains_one_block_at_a_time(kind):
    stack = make_stack(kind)
    randomize(stack)
    y = curves(8, 0)
    z = y + 0.5 * torch.randn_like(y)
    for sigma in (torch.full((8,), 20.0), torch.full((8,), 0.05), torch.tensor([20.0, 0.05] * 4)):
        assert stack(z, sigma).shape == y.shape  # routed to the owning block(s)
    for block in range(2):
        stack.zero_grad(set_to_none=True)
        z, sigma = stack.noisy_input(block, y, torch.Generator().manual_seed(block))
        mse_loss(stack.denoise(block, z, sigma), y, stack.precond.weight(sigma)).mean().backward()
        trained = {id(p) for p in stack.block_parameters(block) + stack.shared_parameters()}
        for name, p in stack.named_parameters():
            if kind == "residual-plain" and name.startswith("stem.noise."):  # unconditioned: c reaches no layer
                assert p.grad is None
            elif id(p) in trained:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
            else:
                assert p.grad is None, f"{name} (not block {block}) got a gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_diffusionblocks_steps_lower_the_loss(kind):
    model = Denoiser(make_stack(kind))
    cfg = apply_overrides(preset_tiny(), ["blocks.num_blocks=2", "dblocks.block_choice=round-robin", "train.lr=3e-3",
                                          "train.batch_size=32"])
    method = DBlocks(model, cfg, 40)
    y_eval = curves(256, 1)

    def held_out():  # the same noise each time, every block
        model.eval()
        with torch.no_grad():
            loss = sum(float(model.block_loss(b, y_eval, torch.Generator().manual_seed(b)).mean()) for b in range(2))
        model.train()
        return loss

    before = held_out()
    for step in range(40):
        method.step((curves(32, 100 + step),))
    assert held_out() < 0.8 * before


def test_a_fresh_adapter_computes_what_its_layer_does():
    h, c = torch.randn(3, T, D), torch.randn(3, D)
    plain = nn.Sequential(nn.Linear(D, D), nn.Tanh())
    assert torch.equal(Residual(plain, dim=D)(h, c), h)  # adaLN-zero: the identity
    assert torch.allclose(Residual(plain)(h, c), h + plain(h))
    assert torch.equal(Residual(plain, dim=D)(h[:, 0], c), h[:, 0])  # vectors (N, D) too
    layer = nn.TransformerEncoderLayer(D, 2, 64, dropout=0.0, batch_first=True)
    assert torch.allclose(TorchEncoderLayer(layer)(h, c), layer(h), atol=1e-6)
    # batch_first=False: the same weights give the same (N, T, D) result
    seq_first = nn.TransformerEncoderLayer(D, 2, 64, dropout=0.0, batch_first=False)
    seq_first.load_state_dict(layer.state_dict())
    assert torch.allclose(TorchEncoderLayer(seq_first)(h, c), layer(h), atol=1e-6)


@pytest.mark.parametrize("kind", ["torch-causal", "gpt2", "llama", "torch", "bert"])
def test_decoders_attend_to_earlier_tokens_only_and_encoders_everywhere(kind):
    layer = make_layers(kind, 1)[0].eval()
    randomize(layer)
    h, c = torch.randn(2, T, D), torch.randn(2, D)
    later = h.clone()
    later[:, -1] += 1.0
    same = torch.allclose(layer(h, c)[:, :-1], layer(later, c)[:, :-1], atol=1e-6)
    assert same == (kind in ("torch-causal", "gpt2", "llama"))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_layers_compute_what_their_model_computes(impl):
    tf = pytest.importorskip("transformers")
    if impl == "sdpa" and Version(tf.__version__) < Version("4.48"):
        pytest.skip("BERT and GPT-2 take sdpa from transformers 4.48 on")
    h, c = torch.randn(2, T, D), torch.randn(2, D)
    bert = tf.BertModel(tf.BertConfig(hidden_size=D, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1,
                                      attn_implementation=impl)).eval()
    assert torch.allclose(HFLayer(bert.encoder.layer[0]).eval()(h, c), bert.encoder(h).last_hidden_state, atol=1e-5)
    gpt2 = tf.GPT2Model(tf.GPT2Config(n_embd=D, n_head=2, n_layer=1, attn_implementation=impl)).eval()
    ours = gpt2.ln_f(HFLayer(gpt2.h[0], "decoder").eval()(h + gpt2.wpe(torch.arange(T)), c))
    assert torch.allclose(ours, gpt2(inputs_embeds=h).last_hidden_state, atol=1e-5)
    llama = tf.LlamaModel(tf.LlamaConfig(hidden_size=D, num_attention_heads=2, num_key_value_heads=1, vocab_size=16,
                                         intermediate_size=64, num_hidden_layers=1, attn_implementation=impl)).eval()
    ours = llama.norm(HFLayer(llama.layers[0], "decoder", rotary=getattr(llama, "rotary_emb", None)).eval()(h, c))
    assert torch.allclose(ours, llama(inputs_embeds=h).last_hidden_state, atol=1e-5)


def test_hf_layers_that_need_more_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        HFLayer(make_layers("bert", 1)[0].layer, kind="seq2seq")
    with pytest.raises(ValueError, match="GPT2Block's attention is causal: use HFLayer\\(layer, kind='decoder'\\)"):
        HFLayer(make_layers("gpt2", 1)[0].layer)
    llama = make_layers("llama", 1)[0].layer
    if "position_embeddings" in inspect.signature(llama.forward).parameters:  # not in 4.40
        with pytest.raises(ValueError, match="pass rotary="):
            HFLayer(llama, "decoder")
    bloom = hf("models.bloom.modeling_bloom")
    bloom = bloom.BloomBlock(bloom.BloomConfig(hidden_size=D, n_head=2))
    with pytest.raises(ValueError, match="BloomBlock also needs \\['alibi', 'attention_mask'\\]"):
        HFLayer(bloom, "decoder")


def test_adapters_refuse_what_they_cannot_take():
    with pytest.raises(TypeError, match="nn.TransformerEncoderLayer"):
        TorchEncoderLayer(nn.Linear(D, D))
    with pytest.raises(TypeError, match="function or module"):
        Residual(3)
    layer = TorchEncoderLayer(nn.TransformerEncoderLayer(D, 2, 64, batch_first=True))
    with pytest.raises(ValueError, match="needs a sequence state"):
        layer(torch.randn(4, D), torch.randn(4, D))
    with pytest.raises(TypeError, match="a tensor \\(N, Dc\\)"):
        layer(torch.randn(4, T, D), (torch.randn(4, D), None))


# -- the layer check: a layer that does not fit is named, with what to wrap it in ----------------------------------


def vector_stack(layer, position=1):
    torch.manual_seed(0)
    layers = [Residual(nn.Linear(16, 16), dim=16) for _ in range(3)]
    layers[position] = layer
    return BlockStack(layers, VectorStem(4, 16), VectorHead(16, 4), Partition.create(LogNormalLevels(), 3))


@pytest.mark.parametrize("layer, match", [
    (nn.TransformerEncoderLayer(16, 2), r"layer 1 \(TransformerEncoderLayer\) does not take \(h, c\).*"
                                        r"TorchEncoderLayer\(layer\)"),
    (nn.TransformerDecoderLayer(16, 2), r"TransformerDecoderLayer\) does not take.*TorchEncoderLayer\(layer, causal"),
    (nn.Linear(16, 16), r"layer 1 \(Linear\) cannot be called as layer\(h, c\).*Residual\(f, dim\)"),
    (torch.tanh, r"layer 1 \(builtin_function_or_method\) is not an nn.Module.*Residual\(f, dim\)"),
])
def test_a_layer_that_does_not_fit_is_refused_when_the_stack_is_built(layer, match):
    with pytest.raises(ValueError, match=match):
        vector_stack(layer)


@pytest.mark.parametrize("kind, adapter", [("bert", "kind='encoder'"), ("gpt2", "kind='decoder'"),
                                           ("llama", "kind='decoder'")])
def test_a_hugging_face_layer_is_refused_naming_hf_layer(kind, adapter):
    layer = make_layers(kind, 1)[0].layer
    with pytest.raises(ValueError, match=f"does not take \\(h, c\\).*HFLayer\\(layer, {adapter}\\)"):
        BlockStack([layer, layer], TokenStem(), VectorHead(D, DZ), Partition.create(LogNormalLevels(), 2))


class TakesAMask(nn.Module):
    """Binds (h, c) but reads c as something else: fails inside."""

    def forward(self, h, mask=None):
        return h.masked_fill(mask, 0.0)


class Shrinks(nn.Module):
    def forward(self, h, c):
        return h[:, :8]


@pytest.mark.parametrize("layer, match", [
    (TakesAMask(), r"layer 2 \(TakesAMask\) failed when called as layer\(h, c\) with h a tensor \(5, 16\) and c a "
                   r"tensor \(5, 16\) \(RuntimeError: .*\): every layer is a module"),
    (Shrinks(), r"layer 2 \(Shrinks\) returned a tensor \(5, 8\) for h \(5, 16\)"),
])
def test_a_layer_that_does_not_fit_is_named_on_its_blocks_first_call(layer, match):
    stack = vector_stack(layer, position=2)
    z, sigma = torch.randn(5, 4), torch.full((5,), 0.01)
    assert stack.denoise(0, z, torch.full((5,), 30.0)).shape == z.shape  # the other blocks run
    with pytest.raises(ValueError, match=match) as error:
        stack.denoise(2, z, sigma)
    assert isinstance(layer, Shrinks) or isinstance(error.value.__cause__, RuntimeError)  # the layer's own error


class FailsWithGrad(nn.Module):
    """Fits, but fails when autograd records (as running out of memory would); the probe runs without."""

    def forward(self, h, c):
        if torch.is_grad_enabled():
            raise RuntimeError("out of memory (simulated)")
        return h


def test_an_error_of_a_layer_that_fits_is_not_rewritten():
    stack = vector_stack(FailsWithGrad(), position=0)
    with pytest.raises(RuntimeError, match="simulated") as error:
        stack.denoise(0, torch.randn(5, 4), torch.full((5,), 30.0))
    assert not isinstance(error.value, ValueError)




class StemOfStateOnly(VectorStem):
    def forward(self, z_in, c_noise, cond=None):
        return super().forward(z_in, c_noise, cond)[0]  # h without c


class HeadOfOtherWidth(VectorHead):
    def forward(self, h, c):
        return super().forward(h, c)[:, :2]


@pytest.mark.parametrize("stem, head, match", [
    (StemOfStateOnly(4, 16), VectorHead(16, 4), r"the stem \(StemOfStateOnly\) returned a tensor \(5, 16\): the stem "
                                                r"is called as stem\(z_in, c_noise, cond\) and returns \(h, c\)"),
    (VectorStem(4, 16), HeadOfOtherWidth(16, 4), r"the head \(HeadOfOtherWidth\) returned a tensor \(5, 2\) for a "
                                                 r"noisy input \(5, 4\): under EDM .* shaped like the noisy input z"),
])
def test_a_stem_or_head_off_the_contract_is_named_on_the_first_call(stem, head, match):
    stack = BlockStack([Residual(nn.Linear(16, 16), dim=16) for _ in range(2)], stem, head,
                       Partition.create(LogNormalLevels(), 2))
    with pytest.raises(ValueError, match=match):
        stack.denoise(0, torch.randn(5, 4), torch.full((5,), 30.0))


def test_readme_snippet(capsys):
    pytest.importorskip("transformers")
    namespace: dict = {}
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"Your own layers as block layers.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), namespace)
    assert all(p.grad is not None for p in namespace["stack"].parameters())  # every block ran and backpropagated
    assert "layer 0 (TransformerEncoderLayer) does not take (h, c)" in capsys.readouterr().out


def test_an_adapter_built_for_other_widths_is_named_with_that_hint():
    stack = vector_stack(Residual(nn.Linear(16, 16), dim=16, cond_dim=8), position=0)
    with pytest.raises(ValueError, match=r"layer 0 \(Residual\) failed.*built for the widths of the stem's h and c"):
        stack.denoise(0, torch.randn(5, 4), torch.full((5,), 30.0))
