"""Image output: [-1, 1] float arrays → uint8, grids, PNG files written atomically (Pillow)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np

from .fileio import atomic_write_bytes


def to_uint8(x: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """[B,C,H,W] float in value_range → [B,H,W,C] uint8 (round half up after clipping)."""
    lo, hi = value_range
    y = (np.asarray(x, dtype=np.float32) - lo) / (hi - lo)
    y = np.clip(np.floor(y * 255.0 + 0.5), 0, 255).astype(np.uint8)
    return np.transpose(y, (0, 2, 3, 1))


def to_unit(x: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """[B,C,H,W] float in value_range → [B,H,W,C] float32 in [0, 1] (diffusers' ``output_type="np"``:
    ``(x / 2 + 0.5).clamp(0, 1)`` for [-1, 1])."""
    lo, hi = value_range
    y = np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return np.ascontiguousarray(np.transpose(y, (0, 2, 3, 1)))


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """[B,H,W,C] uint8 → one [H',W',C] uint8 grid image."""
    b, h, w, c = images.shape
    ncol = ncol or max(1, int(math.ceil(math.sqrt(b))))
    nrow = int(math.ceil(b / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """[H,W,C] uint8 (C in 1, 3) → PNG bytes, optionally upscaled by an integer factor (nearest)."""
    from PIL import Image

    img = image[..., 0] if image.shape[-1] == 1 else image
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray, scale: int = 1) -> None:
    atomic_write_bytes(Path(path), png_bytes(image, scale))


def grid_scale(image_size: int, target: int = 64) -> int:
    """Integer upscale so that small images (16×16 digits) are visible in a grid."""
    return max(1, target // max(1, image_size))
