"""Real photographs as train / held-out shard folders, for quality measurements without a download.

  .venv/bin/pip install scikit-image          # ships the photographs in its wheel (skimage/data)
  .venv/bin/python tools/photo_shards.py --out data/photos-64 --size 64
  .venv/bin/python tools/bench_quality.py --data data/photos-64/train --heldout data/photos-64/heldout \
      --size 64 --preset vqgan-photo-64

The photographs are the ones scikit-image ships (astronaut, cat, coffee, rocket, motorcycle, Hubble
deep field, histology, retina in colour; cameraman, coins, moon, brick, grass, gravel in grey, as
RGB). Each photograph is split by columns: the left 75% gives the training crops, the right 25% the
held-out crops, so no held-out pixel was ever seen in training. A crop is a random square window
of 0.75x to 2x the output side (clipped to the region), resized to `--size` px (bicubic) and
flipped left-right half the time; crops are drawn evenly over the photographs. The class of a crop
is its photograph. Deterministic for a given --seed. Writes OUT/train and OUT/heldout with the
project's shard writer (manifest included), so `data.kind: shards` reads them as any shard folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from PIL import Image

# Files inside the scikit-image wheel's skimage/data folder (read directly, never downloaded).
COLOUR = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "ihc.png", "retina.jpg")
GREY = ("camera.png", "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png")
PHOTOS = COLOUR + GREY
HELDOUT_FRACTION = 0.25  # the right quarter of every photograph


def load_photographs() -> dict[str, np.ndarray]:
    """name -> uint8 (H, W, 3), from scikit-image's bundled data (no download)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tools/photo_shards.py reads the photographs scikit-image ships; install it with "
                         "`.venv/bin/pip install scikit-image` (it is not a dependency of taming_dist)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    out = {}
    for file in PHOTOS:
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: this scikit-image wheel does not ship {file}")
        with Image.open(path) as im:
            out[os.path.splitext(file)[0]] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return out


def regions(img: np.ndarray) -> dict[str, np.ndarray]:
    """The training (left) and held-out (right) column ranges of one photograph."""
    cut = int(round(img.shape[1] * (1 - HELDOUT_FRACTION)))
    return {"train": img[:, :cut], "heldout": img[:, cut:]}


def crop(region: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = region.shape[:2]
    side = int(min(rng.uniform(0.75, 2.0) * size, h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out = Image.fromarray(region[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
    out = np.asarray(out)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def write_split(photos: dict[str, np.ndarray], split: str, count: int, size: int, out: str, seed: int) -> dict:
    from taming_dist.data.shards import write_shards

    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    names = sorted(photos)
    parts = {name: regions(photos[name])[split] for name in names}
    with tempfile.TemporaryDirectory(prefix=f"photo-{split}-") as tmp:
        for name in names:
            os.makedirs(os.path.join(tmp, name))
        for i in range(count):
            name = names[i % len(names)]
            Image.fromarray(crop(parts[name], size, rng)).save(os.path.join(tmp, name, f"{i:06d}.png"))
        return write_shards(tmp, os.path.join(out, split), max_count=max(64, count // 16), seed=seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for train/ and heldout/ (must not exist yet)")
    p.add_argument("--size", type=int, default=64, help="crop side in pixels")
    p.add_argument("--train", type=int, default=4096, help="training crops")
    p.add_argument("--heldout", type=int, default=512, help="held-out crops")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        p.error(f"{args.out} exists; pick a new folder (or remove it) so old shards are never mixed in")
    photos = load_photographs()
    for split, count in (("train", args.train), ("heldout", args.heldout)):
        manifest = write_split(photos, split, count, args.size, args.out, args.seed)
        print(f"{split}: {manifest['total']} crops of {args.size} px from {len(photos)} photographs, "
              f"{len(manifest['shards'])} shards -> {os.path.join(args.out, split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
