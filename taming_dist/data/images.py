"""Image tensors in [-1, 1] -> PNG files (sample grids for logs and the synthetic dataset)."""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8."""
    x = images.detach().to("cpu", torch.float32).clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: Union[torch.Tensor, Sequence[torch.Tensor]], nrow: int, padding: int = 2) -> np.ndarray:
    """Tile (B, 3, H, W) images in [-1, 1] into one (rows*H, nrow*W, 3) uint8 array, `nrow` per row,
    with a white `padding` between tiles."""
    if not isinstance(images, torch.Tensor):
        images = torch.stack(list(images))
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"save_grid expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    rows = -(-b // nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def save_grid(images: Union[torch.Tensor, Sequence[torch.Tensor]], path: str, nrow: int, padding: int = 2) -> str:
    """Write `images` ((B, 3, H, W) in [-1, 1]) as a PNG grid with `nrow` images per row."""
    grid = make_grid(images, nrow, padding)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
