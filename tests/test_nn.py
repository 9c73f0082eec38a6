import pytest
import torch

from diffusionblocks.nn import AdaLNZero, Attention, Mlp, NoiseEmbedding, TransformerLayer


def test_fresh_adaln_zero_layers_are_identities():
    h, c = torch.randn(2, 5, 16), torch.randn(2, 8)
    layer = TransformerLayer(16, heads=4, cond_dim=8)
    assert torch.equal(layer(h, c), h)
    vec = AdaLNZero(Mlp(16, 32), 16, 8)
    x = torch.randn(3, 16)
    assert torch.equal(vec(x, torch.randn(3, 8)), x)


def test_conditioning_changes_the_output_once_trained():
    layer = TransformerLayer(16, heads=4, cond_dim=8)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    h = torch.randn(2, 5, 16)
    c1, c2 = torch.randn(2, 8), torch.randn(2, 8)
    assert not torch.allclose(layer(h, c1), layer(h, c2))
    assert not torch.allclose(layer(h, c1), h)


def test_noise_embedding_distinguishes_levels():
    emb = NoiseEmbedding(32, freq_dim=64)
    c_noise = torch.log(torch.tensor([0.01, 0.5, 80.0])) / 4
    out = emb(c_noise)
    assert out.shape == (3, 32)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    with pytest.raises(ValueError, match="even"):
        NoiseEmbedding(8, freq_dim=7)


def test_noise_embedding_scale_is_a_setting():
    torch.manual_seed(0)
    paper, plain = NoiseEmbedding(32, freq_dim=64), NoiseEmbedding(32, freq_dim=64, scale=1.0)
    plain.load_state_dict(paper.state_dict())  # the same weights: only the scale differs
    c_noise = torch.log(torch.tensor([0.01, 0.5, 80.0])) / 4
    assert not torch.allclose(paper(c_noise), plain(c_noise))
    with pytest.raises(ValueError, match="scale"):
        NoiseEmbedding(8, scale=0.0)


def test_attention_mask_and_shape_errors():
    attn = Attention(8, heads=2)
    x = torch.randn(1, 4, 8)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    y = attn(x, causal)
    # with a causal mask the first position only sees itself: changing later tokens leaves it unchanged
    x2 = x.clone()
    x2[:, 1:] += 1.0
    assert torch.allclose(attn(x2, causal)[:, 0], y[:, 0], atol=1e-6)
    assert not torch.allclose(attn(x2)[:, 0], attn(x)[:, 0])
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, heads=3)
