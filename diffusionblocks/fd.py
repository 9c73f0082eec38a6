"""Sample quality: a Frechet distance in the feature space of a reference classifier, "FD (classifier
features)". It is the FID recipe (Heusel et al. 2017) with a small ViT classifier trained on the same
dataset instead of Inception-v3, so it runs offline on any dataset, but its values are NOT comparable to
published FID numbers, only between models evaluated with the same reference classifier.

The classifier is trained once per dataset (the e2e ViT of the classification task, chosen by
tasks/imagegen.reference_config) and cached by train.reference_model in $DIFFUSIONBLOCKS_CACHE (default
~/.cache/diffusionblocks)/fd-<dataset>/. For conditional models the same classifier also reports how often
a generated image is classified as the class it was generated for. This module holds the math and the
optional TorchScript extractor; it imports nothing of the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


@torch.no_grad()
def features(classifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (N, C, H, W) -> (features (N, D) float64, predicted classes (N,))."""
    feats, preds = [], []
    vit = classifier.vit
    for i in range(0, images.shape[0], batch_size):
        f = vit.features(images[i:i + batch_size].float())
        feats.append(f.double())
        preds.append(vit.head(f).argmax(-1))
    return torch.cat(feats), torch.cat(preds)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between two sets of features."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("a Frechet distance needs at least 2 samples per set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root @ cov_b @ root).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


class ScriptedFeatures:
    """Features from a user's TorchScript file (the optional Inception path): the module maps float images
    (N, 3, size, size) with values in [0, 255] to features (N, D). With an Inception-v3 pool3 extractor
    (2048 features, size 299) the Frechet distance is the standard FID recipe; the tool never downloads it."""

    def __init__(self, path: str | os.PathLike, size: int = 299):
        path = Path(path)
        if not path.exists():
            raise ValueError(f"feature extractor {path} not found (a TorchScript file, e.g. an Inception-v3 "
                             f"pool3 extractor saved with torch.jit.save)")
        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise ValueError(f"{path} is not a TorchScript file torch.jit.load can read: {e}") from None
        self.path, self.size = path, size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = (images[i:i + batch_size].float().clamp(-1, 1) + 1) * 127.5  # [-1, 1] -> [0, 255]
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            out.append(self.module(x).flatten(1).double())
        return torch.cat(out)
