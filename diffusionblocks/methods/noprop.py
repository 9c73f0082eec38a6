"""NoProp-DT (Li, Teh & Pascanu 2025, arXiv 2503.24322v1): T blocks, each trained alone to denoise a class label's
embedding u_y given the image, on a fixed discrete variance-preserving (VP) schedule.

The latents run from z_0 ~ N(0, I) to z_T, the closest to u_y: q(z_t | y) = N(sqrt(alpha_bar_t) u_y,
(1 - alpha_bar_t) I) (paper Eq. 6). Block t (the paper's layer t = 1..T; block b here is t = b + 1) predicts
u_hat_t(z_(t-1), x). Every block step minimises the paper's per-layer loss (Eq. 8, as its Algorithm 1 steps it):

    -log p_out(y | z_T) + KL(q(z_0 | y) || N(0, I)) + (T / 2) eta (SNR(t) - SNR(t-1)) ||u_hat_t(z_(t-1), x) - u_y||^2

with z_(t-1) and z_T drawn from q given y alone: no other block runs. Inference draws z_0 ~ N(0, I) and steps
z_t = a_t u_hat_t(z_(t-1), x) + b_t z_(t-1) + sqrt(c_t) eps_t (Eq. 3 and 7): the posterior q(z_t | z_(t-1), y) with
u_hat in place of u_y; the class is the argmax of p_out(y | z_T).

The blocks are DiffusionBlocks' classifier blocks (the same ViT layers, stem, head and BlockStack); what differs
is the objective and the sampler. The training loop is DBlocks' (methods/dblocks.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import BlockStack, StackModel
from ..config import BackboneConfig, BlocksConfig, RunConfig, section, setting
from ..models import LabelHead, LabelStem, vit_layers
from ..noise import LogNormalLevels, Partition
from ..precond import PlainPrecond
from .dblocks import DBlocks


@section("noprop")
@dataclass
class NoPropConfig:
    """NoProp-DT (train.method=noprop): the weight of its denoising terms and its class embedding."""

    eta: float = setting(0.1, "the weight eta of the denoising terms", range="[0, inf)")
    label_table: str = setting("learned", "the class embedding: learned jointly, or fixed",
                               choices=("learned", "fixed"))
    label_scale: str = setting("unit-variance", "the class embedding's initial rows: unit-variance (each coordinate "
                                                "N(0, 1), the VP noise's scale) or unit-norm (a one-hot label's "
                                                "length)", choices=("unit-variance", "unit-norm"))


def cosine_alpha_bar(num_blocks: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar_t for t = 0..T (T = num_blocks), float64 (T+1,), increasing from about 0 (z_0) to about 1 (z_T).

    NoProp-DT uses a fixed cosine schedule; this is Nichol & Dhariwal's (2021, Eq. 17) laid over the T + 1 latents.
    In the paper's direction (alpha_bar_t = prod_(s=t..T) alpha_s: noise at t = 0) z_t is DDPM's x_k for
    k = T + 1 - t, DDPM's clean x_0 being u_y: alpha_bar_t = f(k / (T+1)) / f(0), f(u) = cos^2(pi/2 (u + s) /
    (1 + s)). So z_T keeps some noise (alpha_bar_T < 1, a finite SNR(T)); f(1) = 0 would make z_0 pure noise, and
    DDPM's clip beta <= max_beta keeps alpha_bar_0 = (1 - max_beta) alpha_bar_1 > 0.
    """
    k = torch.arange(num_blocks + 1, 0, -1, dtype=torch.float64)  # DDPM's step of z_0, ..., z_T
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = f(k / (num_blocks + 1)) / f(torch.zeros((), dtype=torch.float64))
    alpha_bar[0] = alpha_bar[0].clamp(min=(1 - max_beta) * alpha_bar[1].item())
    return alpha_bar


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (paper, after Eq. 8)."""
    return alpha_bar / (1 - alpha_bar)


def step_coefficients(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_t, b_t, c_t) for t = 1..T, each (T,): q(z_t | z_(t-1), y) = N(a_t u_y + b_t z_(t-1), c_t I).

    The paper's coefficients (between its Eq. 6 and 7, derived in its App. A): with q(z_(t-1) | z_t) =
    N(sqrt(alpha_(t-1)) z_t, (1 - alpha_(t-1)) I), alpha_(t-1) = alpha_bar_(t-1) / alpha_bar_t,
        a_t = sqrt(alpha_bar_t) (1 - alpha_(t-1)) / (1 - alpha_bar_(t-1))
        b_t = sqrt(alpha_(t-1)) (1 - alpha_bar_t) / (1 - alpha_bar_(t-1))
        c_t = (1 - alpha_bar_t) (1 - alpha_(t-1)) / (1 - alpha_bar_(t-1))
    (DDPM's posterior q(x_(k-1) | x_k, x_0), Ho et al. 2020 Eq. 7, with the steps numbered the other way.)
    """
    ab_prev, ab = alpha_bar[:-1], alpha_bar[1:]  # alpha_bar_(t-1), alpha_bar_t for t = 1..T
    alpha_prev = ab_prev / ab  # alpha_(t-1)
    a = ab.sqrt() * (1 - alpha_prev) / (1 - ab_prev)
    b = alpha_prev.sqrt() * (1 - ab) / (1 - ab_prev)
    c = (1 - ab) * (1 - alpha_prev) / (1 - ab_prev)
    return a, b, c


class NoPropClassifier(StackModel, nn.Module):
    """T label denoisers u_hat_t(z_(t-1), x) on DiffusionBlocks' block stack, the class table u, and the output
    layer p_out(y | z_T) = softmax(W z_T + c)."""

    inference_options = ()  # the sampler has no settings: one step per block, as trained

    def __init__(self, model: BackboneConfig, blocks: BlocksConfig, noprop: NoPropConfig, image_size, channels: int,
                 num_classes: int):
        super().__init__()
        m, label_dim = model, model.label_dim or model.width
        self.eta = noprop.eta
        # u_y: unit variance per coordinate, the scale of the unit noise of the VP process, or (noprop.label_scale=
        # unit-norm) rows of length 1, a one-hot label's. The same draw in every run; "learned" trains it (a shared
        # parameter) through all three terms, as the paper does.
        table = torch.randn(num_classes, label_dim, generator=torch.Generator().manual_seed(1234))
        if noprop.label_scale == "unit-norm":
            table = table / table.norm(dim=-1, keepdim=True)
        if noprop.label_table == "learned":
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table)
        alpha_bar = cosine_alpha_bar(blocks.num_blocks)
        a, b, c = step_coefficients(alpha_bar)
        # z_t / sqrt(alpha_bar_t) = u_y + sigma_t eps: z_t's level on DiffusionBlocks' scale, sigma_t = SNR(t)^(-1/2).
        # Block b owns (sigma_(b+1), sigma_b] and starts at its upper edge, the level of its input z_b, as a
        # DiffusionBlocks block does (so the partition routes sigma_b to block b).
        sigma = snr(alpha_bar).rsqrt()
        self.partition = Partition(LogNormalLevels(sigma_min=sigma[-1].item(), sigma_max=sigma[0].item()),
                                   sigma.flip(0), gamma=0.0, kind="noprop")
        for name, value in (("alpha_bar", alpha_bar), ("snr", snr(alpha_bar)), ("a", a), ("b", b), ("c", c),
                            ("c_noise", sigma[:-1].log() / 4)):  # c_noise: EDM's ln(sigma) / 4 of each input
            self.register_buffer(name, value.float(), persistent=False)  # a function of the config: not saved
        layers = vit_layers(m)
        # The head reads the label token into class logits; u_hat = softmax(logits) @ u, a mixture of the class
        # embeddings (NoProp's blocks end in a softmax over the classes whose probabilities weight the embeddings).
        # No preconditioning: z has unit variance at every level (VP).
        self.stack = BlockStack(layers, LabelStem(image_size, channels, m.patch, m.width, label_dim, m.noise_scale),
                                LabelHead(m.width, num_classes, m.label_head), self.partition,
                                allocation=blocks.layers_per_block(), shared_stem_head=blocks.shared_stem_head,
                                precond=PlainPrecond(), checkpoint_every=m.checkpoint)
        self.readout = nn.Linear(label_dim, num_classes)  # p_out(y | z_T): shared by all blocks, whatever the stem/head

    def extra_shared(self) -> list[nn.Parameter]:
        return [self.table] if isinstance(self.table, nn.Parameter) else []  # a learned table

    # -- the model ------------------------------------------------------------------------------------

    def denoise(self, block: int, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """u_hat_t(z_(t-1), x) of block `block` (t = block + 1): z (N, Dy), images x -> (N, Dy).

        Conditioned on its input level through the noise-embedding path, as DiffusionBlocks' blocks are. Each
        block sees one level only, so for its own layers this is a learned constant (the paper's DT blocks take
        no t, and lose nothing by it); it lets the shared stem, and a shared adaLN head, tell the blocks apart."""
        c_noise = self.c_noise[block].expand(z.shape[0])
        logits = self.stack.net(block, z, c_noise, x)  # (N, V)
        return logits.softmax(-1) @ self.table.to(logits.dtype)

    def sample_q(self, t: int, u: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z_t ~ q(z_t | y) = N(sqrt(alpha_bar_t) u_y, (1 - alpha_bar_t) I) (paper Eq. 6); u (N, Dy)."""
        eps = torch.randn(u.shape, generator=generator, dtype=u.dtype,
                          device=generator.device if generator is not None else u.device).to(u.device)
        return self.alpha_bar[t].sqrt() * u + (1 - self.alpha_bar[t]).sqrt() * eps

    def block_loss(self, block: int, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """Per-sample loss (N,) of block t = block + 1 alone: the paper's Algorithm 1 step for layer t.

        The cross-entropy and KL terms train only shared parameters (the output layer, a learned table). They are
        added to every block's step, as Algorithm 1 does (each step updates theta_t, theta_out and W_Embed): with
        blocks drawn uniformly (dblocks.block_choice=random) a step is then an unbiased one-sample estimate of the
        whole bound, E_t over t ~ U{1..T}, and the shared parts train as often as DiffusionBlocks' shared stem/head."""
        T, t = self.num_blocks, block + 1
        u = self.table[y]  # u_y (N, Dy)
        u_hat = self.denoise(block, self.sample_q(t - 1, u, generator), x)
        weight = 0.5 * T * self.eta * (self.snr[t] - self.snr[t - 1])  # paper Eq. 8: (T/2) eta (SNR(t) - SNR(t-1))
        denoising = weight * (u_hat - u).square().sum(-1)
        ce = F.cross_entropy(self.readout(self.sample_q(T, u, generator)), y, reduction="none")  # z_T ~ q(z_T | y)
        # KL(N(sqrt(ab_0) u, (1 - ab_0) I) || N(0, I)) = (ab_0 |u|^2 - D ab_0 - D ln(1 - ab_0)) / 2 (closed form)
        ab0, D = self.alpha_bar[0], u.shape[-1]
        kl = 0.5 * (ab0 * u.square().sum(-1) - D * ab0 - D * torch.log1p(-ab0))
        return ce + kl + denoising

    @torch.no_grad()
    def predict(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Class predictions (N,) after every block: argmax of p_out(y | z_t) for t = 1..T; the last is the answer.

        z_0 ~ N(0, I), then z_t = a_t u_hat_t(z_(t-1), x) + b_t z_(t-1) + sqrt(c_t) eps_t (paper Eq. 3 with the
        posterior's mean and variance; all noise from `generator`)."""
        device = generator.device if generator is not None else "cpu"
        draw = lambda: torch.randn(x.shape[0], self.table.shape[1], generator=generator,  # noqa: E731
                                   device=device).to(x.device, x.dtype)
        z, preds = draw(), []
        for block in range(self.num_blocks):
            u_hat = self.denoise(block, z, x)
            z = self.a[block] * u_hat + self.b[block] * z + self.c[block].sqrt() * draw()
            preds.append(self.readout(z).argmax(-1))
        return preds


class NoPropDT(DBlocks):
    """DiffusionBlocks' trainer (one block per step, per-block optimizers, residency, resume) on NoProp-DT's loss."""

    name = "noprop"
    title = "NoProp-DT"
    model_form = "noprop"
    classifier = NoPropClassifier
    plan = None  # the planner has no formula for its classifier

    @classmethod
    def check_independent(cls, cfg: RunConfig, why: str) -> None:
        raise ValueError(f"{why} trains blocks apart, but NoProp-DT's output layer p(y | z_T) (and a learned label "
                         f"table) is trained by every block's step, so jobs holding different blocks could not be "
                         f"merged: train all blocks in one run")


METHOD = NoPropDT
