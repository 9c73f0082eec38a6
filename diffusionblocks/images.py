"""Writing images without an imaging library: a PNG encoder (zlib from the standard library) and grids; sample
sheets scaled up to a readable size, labelled with matplotlib when it is installed."""

from __future__ import annotations

import math
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


def upscale(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(C, H, W) -> (C, factor * H, factor * W): every pixel a factor x factor square (nearest neighbour)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"expected an integer scale factor >= 1, got {factor!r}")
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


READABLE_PX = 64  # a sample sheet shows each image at least this many pixels a side


def readable_factor(height: int, width: int, min_px: int = READABLE_PX) -> int:
    """The smallest integer scale that shows an image of height x width at least min_px pixels a side."""
    return max(1, math.ceil(min_px / min(height, width)))


def save_sheet(path: str | os.PathLike, panels: dict[str, torch.Tensor], nrow: int,
               col_labels: list[str] | None = None, row_labels: list[str] | None = None, title: str = "",
               min_px: int = READABLE_PX) -> bool:
    """Grids of uint8 images (N, C, H, W) side by side, one per named panel, each image scaled up (nearest
    neighbour) to at least min_px pixels a side. With matplotlib: the panels' names above them, col_labels above
    each grid's columns, row_labels left of the first grid's rows, and `title`; without it the plain PNG writer,
    no text. Returns True when labelled."""
    pad = 2  # between images, in source pixels
    grids = [grid(images, nrow=nrow, pad=pad) for images in panels.values()]
    if len({g.shape for g in grids}) != 1:
        raise ValueError(f"the panels' grids differ in shape: {[tuple(g.shape) for g in grids]}")
    _, _, h, w = next(iter(panels.values())).shape
    f = readable_factor(h, w, min_px)
    big = [upscale(g, f) for g in grids]
    c, gh, gw = big[0].shape
    plt = _pyplot_quiet()
    if plt is None:
        gap = 4 * pad * f
        sheet = torch.full((c, gh, len(big) * (gw + gap) - gap), 255, dtype=torch.uint8)  # white between panels
        for i, g in enumerate(big):
            sheet[..., i * (gw + gap):i * (gw + gap) + gw] = g
        save_png(sheet, path)
        return False
    dpi, left, right, top, bottom, gap = 100, 70 if row_labels else 15, 15, 75 if title else 50, 15, 40  # pixels
    width, height = left + len(big) * gw + (len(big) - 1) * gap + right, top + gh + bottom
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    centre = lambda k, size: f * (pad + k * (size + pad) + size / 2)  # k-th image's middle, in sheet pixels
    for i, (name, g) in enumerate(zip(panels, big)):
        # the axes exactly the grid's size in pixels, so each source pixel is an f x f square on screen
        ax = fig.add_axes(((left + i * (gw + gap)) / width, bottom / height, gw / width, gh / height))
        shown = g[0].numpy() if c == 1 else g.permute(1, 2, 0).numpy()
        ax.imshow(shown, cmap="gray" if c == 1 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(name, fontsize=11, pad=22 if col_labels else 6)
        ax.xaxis.tick_top()
        cols = min(nrow, len(panels[name]))
        ax.set_xticks([centre(k, w) for k in range(cols)] if col_labels else [],
                      col_labels[:cols] if col_labels else [], fontsize=8)
        rows = math.ceil(len(panels[name]) / cols)
        show_rows = bool(row_labels) and i == 0
        ax.set_yticks([centre(r, h) for r in range(rows)] if show_rows else [],
                      row_labels[:rows] if show_rows else [], fontsize=8)
        ax.tick_params(length=0)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 12 / height, va="top")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


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


def _pyplot_quiet():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is missing (the caller falls back)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None (with a message) when matplotlib is missing."""
    plt = _pyplot_quiet()
    if plt is None:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return plt
