"""Difference target propagation (Lee, Zhang, Fischer & Bengio 2015, "Difference Target Propagation",
ECML-PKDD; Sec. 2-3 and Algorithm 1) for the residual blocks of the end-to-end ViT.

The ViT's layers are cut into B blocks, h_b = f_b(h_(b-1)) with h_(-1) the patch embedding and CLS token.
Each block but the first has a learned approximate inverse g_b: h_b -> h_(b-1). One step:

    top target (Sec. 2.2):        h_hat_(B-1) = h_(B-1) - step * dL/dh_(B-1)      L: the head's per-sample CE
    difference correction (Sec. 3): h_hat_(b-1) = h_(b-1) + g_b(h_hat_b) - g_b(h_b)
    block b (layer-local loss):   || f_b(h_(b-1)) - h_hat_b ||^2,  h_(b-1) and h_hat_b constants
    inverse g_b (noise-injected): || g_b(f_b(h_(b-1) + eps)) - (h_(b-1) + eps) ||^2,  eps ~ N(0, sigma^2),
                                  f_b's output a constant
    head (final norm + linear):   the CE on h_(B-1), a constant

The correction makes h_hat_(b-1) = h_(b-1) whenever h_hat_b = h_b, however imperfect g_b is (Sec. 3): an
inverse's error cancels in the difference instead of becoming the lower block's target. The rules match the
authors' release (donghyunlee/dtp, conti_dtp.py): the top target on the last hidden layer, the output layer
trained by the loss itself, the first layer trained on its target from the input, squared-error losses.
Here the squared errors are means over the elements and the top step uses the per-sample loss, so neither
depends on the batch size.

No gradient crosses a block boundary: every block reads a detached input and is trained towards a constant
target, so the step's graphs are disjoint and each is an `update` of its own (every block, every inverse and
the head has its own AdamW). Block 0's graph starts at the image: the patch embedding and CLS token train
with block 0's loss. A step updates all `model.depth` layers once: the budget is `train.steps` steps, as end
to end.

DTP saves no memory: the top target exists only after the whole forward pass, so every block's activations
are kept until then (recomputing a block instead would trade its memory for a second forward, as activation
checkpointing does). Its activation bytes per step (probe_loss) are end-to-end training's plus the inverses'
graphs and the squared errors' inputs (1.35x end to end on the tiny preset). The noise-corrupted forward pass
f_b(h_(b-1) + eps) builds no graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import split_layers
from ..config import BackboneConfig, BlocksConfig, RunConfig, section, setting
from ..models import CutViT, vit_layers
from ..nn import TransformerLayer
from .base import Method, Optimizer, stream_seed, update


@section("dtp")
@dataclass
class DTPConfig:
    """Difference target propagation (train.method=dtp). The top step was chosen on validation: benchmarks/README.md,
    baselines."""

    inverse_noise: float = setting(0.1, "std of the noise that trains each approximate inverse", range="[0, inf)")
    target_step: float = setting(0.3, "the step size of the top target (h_top - step * dLoss/dh_top)",
                                 range="(0, inf)")


class DTPClassifier(CutViT):
    """The end-to-end ViT (models.ViTClassifier: CLS + patches, adaLN-zero layers with a zero conditioning
    vector, final LayerNorm + linear head on the CLS token) cut into blocks, plus the inverses g_1..g_(B-1).

    Built in ViTClassifier's order, the forward network starts from the same weights as the end-to-end model of
    the same seed. An inverse is one adaLN-zero transformer layer (zero conditioning): attention lets it undo the
    block's mixing of tokens (the CE reaches the CLS token only, and a per-token inverse would hand the lower
    blocks targets that differ from their outputs at the CLS token alone), and its zero-initialised gates make
    it the identity at first, the exact inverse of a fresh block (a fresh adaLN-zero block is the identity too).
    """

    def __init__(self, model: BackboneConfig, blocks: BlocksConfig, image_size, channels: int, num_classes: int):
        super().__init__()
        m, layers = model, vit_layers(model)
        self.build_stem(image_size, channels, m.patch, m.width)
        self.build_blocks(layers, split_layers(m.depth, blocks.num_blocks, blocks.layers_per_block()), m.checkpoint)
        self.norm = nn.LayerNorm(m.width)
        self.head = nn.Linear(m.width, num_classes)
        # inverses[b - 1] is g_b; no dropout: a target is a deterministic function of the forward pass
        self.inverses = nn.ModuleList(TransformerLayer(m.width, m.heads, m.width, m.mlp_ratio, 0.0,
                                                       m.gate_recompute) for _ in self.allocation[1:])

    inference_options = ()  # a plain forward pass: no sampler to set

    def inverse(self, b: int, h: torch.Tensor) -> torch.Tensor:
        """g_b (b >= 1): h_b -> an estimate of h_(b-1)."""
        return self.inverses[b - 1](h, h.new_zeros(h.shape[0], self.width))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head on the CLS token of the top state: (N, 1+T, D) or the token itself (N, D) -> (N, V)."""
        return self.head(self.norm(h[:, 0].contiguous() if h.ndim == 3 else h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in range(self.num_blocks):
            h = self.block(b, h)
        return self.logits(h)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, **_) -> list[torch.Tensor]:
        return [self(x).argmax(-1)]

    def block_parameters(self, b: int) -> list[nn.Parameter]:
        """What block b's local loss trains: its layers, and for block 0 the patch embedding and CLS token."""
        return self.stem_parameters(b) + list(self.blocks[b].parameters())

    def inverse_parameters(self, b: int) -> list[nn.Parameter]:
        return list(self.inverses[b - 1].parameters()) if b > 0 else []

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.norm.parameters(), *self.head.parameters()]


def targets(model: DTPClassifier, outputs: list[torch.Tensor], top_target: torch.Tensor) -> list[torch.Tensor]:
    """Every block's target from the top one, downwards by the difference correction (Sec. 3):
    h_hat_(b-1) = h_(b-1) + g_b(h_hat_b) - g_b(h_b). `outputs` are h_0..h_(B-1)."""
    hats = [top_target]
    with torch.no_grad():
        for b in range(len(outputs) - 1, 0, -1):
            # the difference first: it is exactly 0 where h_hat_b = h_b
            hats.insert(0, outputs[b - 1] + (model.inverse(b, hats[0]) - model.inverse(b, outputs[b])))
    return hats


class DTP(Method):
    """One forward pass, targets down from the loss, then every block, inverse and the head on its own loss."""

    name = "dtp"
    title = "DTP"
    model_form = "blocks with learned inverses"
    classifier = DTPClassifier

    def __init__(self, model: DTPClassifier, cfg: RunConfig, total_steps: int, **_):
        self.model, self.cfg, self.total = model, cfg, total_steps
        B = model.num_blocks
        self.block_params = [model.block_parameters(b) for b in range(B)]
        self.inverse_params = [model.inverse_parameters(b) for b in range(B)]  # [] for block 0
        self.head_params = model.head_parameters()
        self.block_opts = [Optimizer(p, cfg, total_steps) for p in self.block_params]
        self.inverse_opts = [Optimizer(p, cfg, total_steps) if p else None for p in self.inverse_params]
        self.head_opt = Optimizer(self.head_params, cfg, total_steps)
        self.noise = torch.Generator().manual_seed(stream_seed(cfg.train.seed) + 2)  # the inverses' eps

    def stream_seeds(self) -> dict[int, int]:
        return {0: stream_seed(self.cfg.train.seed)}

    def next_block(self) -> int:
        return 0  # one unit: a step trains every block

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """The step's losses, each on its own graph: "ce" (N,), "blocks" [B] and "inverses" [B] (0 for block 0)
        scalars; all computed with the weights as they are (targets before any update, Algorithm 1)."""
        model, B, c = self.model, self.model.num_blocks, self.cfg.dtp
        outputs, h = [], model.embed(x)  # block 0's graph starts at the image
        for b in range(B):  # each block on a detached input: its graph is its own, kept for its local loss
            outputs.append(model.block(b, h))
            h = outputs[-1].detach()
        top = h[:, 0].detach().requires_grad_()  # the head reads the CLS token of h_(B-1)
        ce = F.cross_entropy(model.logits(top), y, reduction="none")  # (N,)
        # the per-sample loss's gradient (Sec. 2.2: the target is a small step down the loss from h_(B-1))
        (grad,) = torch.autograd.grad(ce.sum(), top, retain_graph=True)
        top_target = h.clone()
        top_target[:, 0] -= c.target_step * grad  # the other tokens do not reach the loss
        hats = targets(model, [o.detach() for o in outputs], top_target)
        blocks = [F.mse_loss(outputs[b], hats[b]) for b in range(B)]
        inverses = [torch.zeros((), device=x.device)]
        for b in range(1, B):  # each inverse reconstructs a noise-corrupted input of its block
            inp = outputs[b - 1].detach()
            noisy = inp + c.inverse_noise * torch.randn(inp.shape, generator=self.noise,
                                                            dtype=inp.dtype).to(inp.device)
            with torch.no_grad():
                f = model.block(b, noisy)
            inverses.append(F.mse_loss(model.inverse(b, f), noisy))
        return {"ce": ce, "blocks": blocks, "inverses": inverses}

    def probe_loss(self, batch):
        """The whole step's graph: every block's activations at once (what a step keeps), the inverses' and CE's."""
        out = self.losses(*batch)
        return out["ce"].mean() + sum(out["blocks"]) + sum(out["inverses"])

    def step(self, batch, block: int = 0) -> dict:
        out = self.losses(*batch)
        clip, B = self.cfg.train.clip, self.model.num_blocks
        # disjoint graphs (detached inputs, constant targets): one update each, in any order
        head = update(out["ce"].mean(), self.head_params, [self.head_opt], clip)
        blocks = [update(out["blocks"][b], self.block_params[b], [self.block_opts[b]], clip) for b in range(B)]
        inverses = [update(out["inverses"][b], self.inverse_params[b], [self.inverse_opts[b]], clip)
                    for b in range(1, B)]
        done = [(u, p) for u, p in zip([head, *blocks, *inverses],
                                      [self.head_params, *self.block_params, *self.inverse_params[1:]])
                if not u.get("skipped")]
        losses = {"block_losses": [u["loss"] for u in blocks], "inverse_losses": [u["loss"] for u in inverses]}
        if not done:
            return {"skipped": True, "loss": head["loss"], "layers": 0, **losses}
        return {"loss": head["loss"], "lr": head.get("lr", blocks[0].get("lr")),
                "grad_norm": sum(u["grad_norm"] ** 2 for u, _ in done) ** 0.5,  # of the whole step's gradient
                "layers": sum(n for n, u in zip(self.model.allocation, blocks) if not u.get("skipped")),
                "trained": {id(p) for _, params in done for p in params}, **losses}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.opt for o in (self.head_opt, *self.block_opts, *self.inverse_opts) if o is not None]

    def state_dict(self):
        return {"head": self.head_opt.state_dict(), "blocks": [o.state_dict() for o in self.block_opts],
                "inverses": [o.state_dict() if o is not None else None for o in self.inverse_opts],
                "noise": self.noise.get_state()}

    def load_state_dict(self, state):
        self.head_opt.load_state_dict(state["head"])
        for o, s in zip(self.block_opts, state["blocks"]):
            o.load_state_dict(s)
        for o, s in zip(self.inverse_opts, state["inverses"]):
            if o is not None:
                o.load_state_dict(s)
        self.noise.set_state(state["noise"])


METHOD = DTP
