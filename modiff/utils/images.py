"""Image conversion and grids (PIL only: the library never imports matplotlib)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modiff.utils.runs import atomic_path

__all__ = ["to_uint8", "make_grid", "save_png"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding as torchvision's save_image does."""
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    scaled = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (H', W', C) uint8 mosaic, nrow images per row."""
    b, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write (H, W, C) uint8 with C in {1, 3} atomically (temporary name, then rename)."""
    array = image[..., 0] if image.shape[-1] == 1 else image
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
