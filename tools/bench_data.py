"""Decoded + augmented images per second through the training stream, per DataLoader worker.

Makes its own shards in a temporary folder: 256 px training crops from 400x320 JPEGs (ImageNet-like
files) and 32 px crops from 32 px PNGs (the built-in synthetic dataset), then times
`build_stream` (random crop, flip, uint8 -> float) for a few seconds per setting and prints a table.

    python tools/bench_data.py [--seconds 3] [--workers 0 2] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from taming_dist.config import DataConfig
from taming_dist.data.shards import write_shards
from taming_dist.data.stream import build_stream
from taming_dist.data.synthetic import CLASS_NAMES, generate


def make_source(folder: str, n: int, size: int, file_size: tuple[int, int], fmt: str) -> None:
    """`n` synthetic images in class folders, scaled to `file_size` (w, h) with mild noise so JPEG
    files are about as large as photographs of that size."""
    images, labels = generate(n, size, len(CLASS_NAMES))
    rng = np.random.default_rng(0)
    for i, (img, label) in enumerate(zip(images, labels)):
        d = os.path.join(folder, CLASS_NAMES[label])
        os.makedirs(d, exist_ok=True)
        pil = Image.fromarray(img)
        if pil.size != file_size:
            pil = pil.resize(file_size, Image.BICUBIC)
            noisy = np.asarray(pil, np.int16) + rng.integers(-12, 13, (file_size[1], file_size[0], 3))
            pil = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        pil.save(os.path.join(d, f"{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"), format=fmt,
                 **({"quality": 90} if fmt == "JPEG" else {}))


def measure(shards: str, size: int, workers: int, batch_size: int, seconds: float) -> float:
    cfg = DataConfig(kind="shards", path=shards, size=size, random_crop=True, hflip=True, num_workers=workers,
                     shuffle_buffer=256)
    stream = build_stream(cfg, batch_size=batch_size, seed=0, epoch_steps=10**9)
    it = iter(stream)
    for _ in range(max(2, workers * 2)):  # start-up: worker processes, shuffle buffers filling
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    settings = [(256, "400x320 JPEG q90", 192, (400, 320), "JPEG"), (32, "32x32 PNG", 2048, (32, 32), "PNG")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, label, n, file_size, fmt in settings:
            src, out = os.path.join(tmp, f"src{size}"), os.path.join(tmp, f"shards{size}")
            make_source(src, n, min(size, 256), file_size, fmt)
            write_shards(src, out, max_count=max(16, n // 8))
            for w in args.workers:
                rate = measure(out, size, w, args.batch_size, args.seconds)
                rows.append((size, label, w, rate, rate / max(1, w)))
    print(f"{'crop':>5}  {'source files':<18} {'workers':>7}  {'images/s':>9}  {'per worker':>10}")
    for size, label, w, rate, per in rows:
        print(f"{size:>5}  {label:<18} {w:>7}  {rate:>9.0f}  {per:>10.0f}")
    print(f"({os.cpu_count()} CPUs; workers=0 decodes in the main process)")


if __name__ == "__main__":
    main()
