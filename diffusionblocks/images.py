"""Writing images without an imaging library: a PNG encoder (zlib from the standard library) and grids."""

from __future__ import annotations

import os
import struct
import sys
import zlib

import torch

from .io import atomic_write_bytes


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> uint8 in 0..255, clamped."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one uint8 image (C, rows * (H + pad) + pad, nrow * (W + pad) + pad)."""
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = min(nrow or int(n**0.5 + 0.999), n) or 1  # never wider than the images it shows
    rows = (n + nrow - 1) // nrow
    out = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return out


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W) with C = 1 (grey) or 3 (RGB) -> a PNG file's bytes."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected uint8 (1 or 3, H, W), got {image.dtype} {tuple(image.shape)}")
    c, h, w = image.shape
    rows = image.permute(1, 2, 0).reshape(h, w * c).numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def save_png(image: torch.Tensor, path: str | os.PathLike):
    atomic_write_bytes(path, png_bytes(image))


def read_png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt
