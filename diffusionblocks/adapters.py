"""Adapters: the layers people already have, made into the layer contract of a BlockStack, layer(h, c) -> h.

h is the state (N, T, D) (Residual also takes vectors (N, D)) and c (N, Dc) the conditioning vector that carries the
noise level (blocks.py). Each adapter is a module of its own, so a BlockStack cuts, owns and trains it like any layer:

    Residual(f, dim)            h + f(h) for a function or module f(h) -> update; with `dim`, adaLN-zero
                                conditioned on c, and the identity when fresh (as the package's own layers)
    TorchEncoderLayer(layer)    nn.TransformerEncoderLayer, batch_first or not; causal=True for autoregression
    HFLayer(layer, kind)        a Hugging Face transformers encoder layer (BertLayer, RobertaLayer) or decoder layer
                                (GPT2Block; LlamaDecoderLayer with rotary=); transformers itself is never imported

The two attention adapters condition by adding a zero-initialised projection of c to h before the layer: the wrapped
layer's own norms and residuals stay as they are, and a fresh adapter computes exactly what the layer did (a
pretrained layer starts as it was).
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from .nn import ModulatedNorm


def _zero_projection(cond_dim: int, out: int) -> nn.Sequential:
    """c -> SiLU -> linear, zero-initialised: the adaLN-zero modulation's form (nn.AdaLNZero)."""
    proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, out))
    nn.init.zeros_(proj[1].weight)
    nn.init.zeros_(proj[1].bias)
    return proj


def _shifted(h: torch.Tensor, c, proj: nn.Module, who: str) -> torch.Tensor:
    """h (N, T, D) plus proj(c) (N, D) on every token."""
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{who} takes c, a tensor (N, Dc); got {type(c).__name__} (an attention mask from the stem "
                        f"is not supported: the adapter builds its own)")
    if h.ndim != 3:
        raise ValueError(f"{who} needs a sequence state h (N, T, D), got shape {tuple(h.shape)}")
    return h + proj(c)[:, None]


class Residual(nn.Module):
    """h + f(h) for f(h) -> update, a function or module; with `dim`, adaLN-zero conditioned on c (cond_dim wide,
    default dim): h + gate(c) * f(LN(h) * (1 + scale(c)) + shift(c)), the identity when fresh."""

    def __init__(self, fn, dim: int | None = None, cond_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"Residual wraps a function or module f(h) -> update, got {type(fn).__name__}")
        self.fn, self.eps = fn, eps
        self.modulation = _zero_projection(cond_dim or dim, 3 * dim) if dim else None

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.modulation is None:  # unconditioned: the noise level reaches it through the stem only
            return h + self.fn(h)
        shift, scale, gate = (m.view(h.shape[0], *[1] * (h.ndim - 2), -1)  # (N, 1, ..., D) over h's middle dims
                              for m in self.modulation(c).chunk(3, dim=-1))
        return torch.addcmul(h, gate, self.fn(ModulatedNorm.apply(h, shift, scale, self.eps)))


class TorchEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer as layer(h, c) -> h with h (N, T, D) whatever its batch_first; causal=True lets a
    token attend to itself and earlier tokens only. c enters as a zero-initialised shift of h (module docstring)."""

    def __init__(self, layer: nn.TransformerEncoderLayer, cond_dim: int | None = None, causal: bool = False):
        super().__init__()
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"TorchEncoderLayer wraps an nn.TransformerEncoderLayer, got {type(layer).__name__}")
        dim = layer.self_attn.embed_dim
        self.layer, self.causal, self.batch_first = layer, causal, layer.self_attn.batch_first
        self.cond = _zero_projection(cond_dim or dim, dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = _shifted(h, c, self.cond, "TorchEncoderLayer")
        T = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, x.device, x.dtype) if self.causal else None
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = self.layer(x, src_mask=mask, is_causal=self.causal)
        return out if self.batch_first else out.transpose(0, 1)


_KINDS = ("encoder", "decoder")


class HFLayer(nn.Module):
    """A Hugging Face transformers layer as layer(h, c) -> h, h (N, T, D). kind="encoder" (BertLayer, RobertaLayer)
    attends everywhere; kind="decoder" (GPT2Block, LlamaDecoderLayer, or an encoder layer made causal) gets a causal
    mask. A layer that takes rotary `position_embeddings` (Llama, Mistral, Qwen2) needs `rotary`, the model's rotary
    module (model.model.rotary_emb, or LlamaRotaryEmbedding(config)); a layer that needs any other input (ALiBi, a
    position bias) is refused. `dim` is the hidden size, read from the layer's config when not given. c enters as a
    zero-initialised shift of h (module docstring). Works with transformers 4.x (layers return tuples) and 5.x."""

    def __init__(self, layer: nn.Module, kind: str = "encoder", *, dim: int | None = None,
                 cond_dim: int | None = None, rotary: nn.Module | None = None):
        super().__init__()
        name = type(layer).__name__
        if kind not in _KINDS:
            raise ValueError(f"HFLayer kind must be one of {_KINDS}, got {kind!r}")
        params = inspect.signature(layer.forward).parameters
        plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                 inspect.Parameter.KEYWORD_ONLY)
        needs = [n for n, p in list(params.items())[1:] if p.kind in plain and p.default is p.empty]
        if needs:
            raise ValueError(f"{name} also needs {needs}, which HFLayer does not build; wrap it yourself as a module "
                             f"whose forward(h, c) returns the new h")
        if kind == "encoder" and any(getattr(m, "is_causal", False) is True for m in layer.modules()):
            raise ValueError(f"{name}'s attention is causal: use HFLayer(layer, kind='decoder')")
        if "position_embeddings" in params and rotary is None:
            raise ValueError(f"{name} takes rotary position_embeddings (cos, sin): pass rotary=, the model's rotary "
                             f"module (model.model.rotary_emb, or e.g. LlamaRotaryEmbedding(config))")
        dim = dim or _hidden_size(layer)
        if dim is None:
            raise ValueError(f"cannot read {name}'s hidden size from a config or a norm: pass dim=")
        self.layer, self.kind = layer, kind
        self.positions = "position_ids" in params  # v4 Llama builds its rotary angles from position_ids
        # a copy of its own (buffers only): every block then holds all it runs
        self.rotary = copy.deepcopy(rotary) if "position_embeddings" in params else None
        self.cond = _zero_projection(cond_dim or dim, dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = _shifted(h, c, self.cond, "HFLayer")
        N, T, _ = x.shape
        kwargs = {}
        if self.kind == "decoder":  # HF's additive mask form, (1, 1, T, T): eager and sdpa attention both read it
            later = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            kwargs["attention_mask"] = x.new_zeros(1, 1, T, T).masked_fill(later, torch.finfo(x.dtype).min)
        if self.positions or self.rotary is not None:
            ids = torch.arange(T, device=x.device)[None].expand(N, T)
            if self.positions:
                kwargs["position_ids"] = ids
            if self.rotary is not None:
                kwargs["position_embeddings"] = self.rotary(x, ids)
        out = self.layer(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # 4.x layers return a tuple, 5.x layers a tensor


def _hidden_size(layer: nn.Module) -> int | None:
    """config.hidden_size of the layer or a submodule, else the width of its first norm."""
    for m in layer.modules():
        size = getattr(getattr(m, "config", None), "hidden_size", None)
        if isinstance(size, int):
            return size
    for m in layer.modules():
        weight = getattr(m, "weight", None)
        if type(m).__name__.endswith("Norm") and isinstance(weight, torch.Tensor) and weight.ndim == 1:
            return weight.numel()
    return None
