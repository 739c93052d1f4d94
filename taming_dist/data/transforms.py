"""Per-sample image decoding and augmentation, shared by training streams and code extraction.

The pipeline follows taming's ImagePaths: scale the shorter side to `size` (albumentations'
SmallestMaxSize), then a random or center `size` x `size` crop, then an optional horizontal flip.
Workers hand back uint8 arrays; the float conversion happens once per batch in the main process
(`to_float`), which keeps the tensors crossing the worker queue 4x smaller.
"""
from __future__ import annotations

import io
import random
from typing import Optional

import numpy as np
import torch
from PIL import Image

# Extensions webdataset samples may hold an image under (the shard writer keeps the original one).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


def find_image_field(sample: dict) -> Optional[str]:
    """The sample's image field name, or None when it has no image."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def decode_rgb(data: bytes, min_side: int) -> Image.Image:
    """Decode image bytes to RGB. Raises on bytes PIL cannot decode.

    `draft` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while it decodes as long as both sides
    stay >= `min_side`: several times faster for ImageNet-sized files at 256 px.
    """
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        w, h = img.size
        scale = min_side / min(w, h)
        img.draft("RGB", (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))))
    img.load()
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side equals `size` (up or down), keeping the aspect ratio."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, Image.BICUBIC, reducing_gap=3.0)


def crop_square(img: Image.Image, size: int, rng: Optional[random.Random]) -> Image.Image:
    """A `size` x `size` crop: uniformly placed when `rng` is given, else centered."""
    w, h = img.size
    if rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    if (left, top, w, h) == (0, 0, size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def load_image(data: bytes, size: int, *, rng: Optional[random.Random] = None,
               random_crop: bool = False, hflip: bool = False) -> np.ndarray:
    """Image bytes -> uint8 array (3, size, size).

    `rng` drives the random crop and the flip (each with probability 1/2 when `hflip`); with no
    `rng` the crop is centered and there is no flip (evaluation and code extraction).
    """
    img = crop_square(resize_shorter(decode_rgb(data, size), size), size, rng if random_crop else None)
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    if hflip and rng is not None and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] (taming's ImagePaths: x / 127.5 - 1)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def hflip_images(images: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of (B, C, H, W)."""
    return images.flip(-1)
