"""The built-in default dataset: a dozen classes of shapes, textures and colour patterns, with captions.

Deterministic (seeded numpy), generated on first use and written as PNG shards with a manifest
into a cache folder, so training and tests need no download. Each class has one visual idea
(a disk, stripes, rings, ...) with random position, scale and phase, drawn in two colours of a
named palette, so a tiny transformer's samples can be checked by eye against `examples.png`.
Every image has a caption made from its own parameters, "a red circle on a blue background"
(stored as `txt` in the shards; issue 23), for text-conditioned models.

Two splits (`data.split`): `train` and `heldout`, the same classes drawn from other seeds, for
measuring reconstructions and samples on images no model trained on.
"""
from __future__ import annotations

import io
import json
import os
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from taming_dist.atomic import atomic_path

from .images import save_grid
from .shards import MANIFEST, SHARD_NAME, write_manifest, write_tar

VERSION = "v5"  # v2: colours from the named palette, captions; v3: UNSEEN combinations left out of train;
# v4: coarser patterns and softer edges (EDGE_PX); v5: the objects nearer the centre, sizes less spread (OBJECTS)
SEED = 0
SPLIT_SEEDS = {"train": SEED, "heldout": 1}

# Render functions take (u, v, rng, S): pixel-centre coordinates in [0, 1] of shape (S, S), and return
# the foreground coverage alpha in [0, 1] (S, S); colours are mixed in afterwards.
_Renderer = Callable[[np.ndarray, np.ndarray, np.random.Generator, int], np.ndarray]


# Every pattern is coarse enough for the demo's tokenizer (issue 25): f4 codes of a 32 px image cover
# 4 x 4 px, and at data v3's scales (stripes and rings of a 3.5 to 9 px period, dots of a 2 px radius)
# even the mean colour of each 4 x 4 patch, bilinearly upsampled, kept only 20.2 dB, 11.7 dB on rings.
# From v4 every period is at least a quarter of the side (8 px at 32 px) and edges are anti-aliased
# over 1.5 px: that bound is 22.5 dB, rings 15.4 dB, and the classes stay the same twelve ideas.
EDGE_PX = 1.5


def _coverage(sd: np.ndarray, size: int) -> np.ndarray:
    """Signed distance (negative inside, in image units) -> anti-aliased coverage over EDGE_PX pixels."""
    return np.clip(0.5 - sd * size / EDGE_PX, 0.0, 1.0)


def _wave(phase: np.ndarray, sharpness: float = 1.6) -> np.ndarray:
    """A soft square wave in [0, 1] from an angle: stripes with smoothed edges."""
    return np.clip(0.5 + sharpness * np.sin(phase), 0.0, 1.0)


# The objects (circle, square, triangle, cross) from v5: centres within 0.05 of the middle (v4: up to
# 0.15) and sizes from 80% of the largest up (v4: from about 60%), so a tiny transformer's 8 x 8 codes
# learn the shape rather than where it sits (issue 25). The demo's samples of their prompt's shape, the
# same training, sampling seeds 0 / 1 / 2: 84.4 / 82.9 / 84.0% against v4's 74.4 / 71.9 / 69.2%.
OBJECTS = ("circle", "square", "triangle", "cross")


def _circle(u, v, rng, s):
    cx, cy = rng.uniform(0.45, 0.55, 2)
    r = rng.uniform(0.26, 0.32)
    return _coverage(np.hypot(u - cx, v - cy) - r, s)


def _square(u, v, rng, s):
    cx, cy = rng.uniform(0.45, 0.55, 2)
    h = rng.uniform(0.22, 0.28)
    return _coverage(np.maximum(abs(u - cx), abs(v - cy)) - h, s)


def _triangle(u, v, rng, s):
    # Upward triangle: intersection of three half-planes (max of signed edge distances).
    cx, cy = rng.uniform(0.46, 0.54, 2)
    r = rng.uniform(0.33, 0.38)  # circumradius
    angles = np.pi / 2 + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    xs, ys = cx + r * np.cos(angles), cy - r * np.sin(angles)  # image v grows downwards
    sd = np.full(u.shape, -np.inf)
    for i in range(3):
        x0, y0, x1, y1 = xs[i], ys[i], xs[(i + 1) % 3], ys[(i + 1) % 3]
        nx, ny = y1 - y0, -(x1 - x0)
        norm = np.hypot(nx, ny)
        # Orient the normal outwards (away from the centroid).
        if (cx - x0) * nx + (cy - y0) * ny > 0:
            nx, ny = -nx, -ny
        sd = np.maximum(sd, ((u - x0) * nx + (v - y0) * ny) / norm)
    return _coverage(sd, s)


def _hstripes(u, v, rng, s):
    period = rng.uniform(0.3, 0.4)
    return _wave(2 * np.pi * (v / period + rng.uniform()))


def _vstripes(u, v, rng, s):
    period = rng.uniform(0.3, 0.4)
    return _wave(2 * np.pi * (u / period + rng.uniform()))


def _checkerboard(u, v, rng, s):
    # 2 or 3 cells a side; the sign of a product of sines, with the edges softened like _wave's
    cells = rng.integers(2, 4)
    ox, oy = rng.uniform(0, 1 / cells, 2)
    return np.clip(0.5 + 3.0 * np.sin(np.pi * (u + ox) * cells) * np.sin(np.pi * (v + oy) * cells), 0.0, 1.0)


def _gradient(u, v, rng, s):
    # A diagonal linear ramp from the background to the foreground colour.
    angle = rng.choice([np.pi / 4, 3 * np.pi / 4, 5 * np.pi / 4, 7 * np.pi / 4]) + rng.uniform(-0.2, 0.2)
    t = (u - 0.5) * np.cos(angle) + (v - 0.5) * np.sin(angle)
    return np.clip(t / 1.2 + 0.5, 0.0, 1.0)


def _rings(u, v, rng, s):
    # the background colour at the centre, then rings of the foreground from half a period out
    cx, cy = rng.uniform(0.4, 0.6, 2)
    period = rng.uniform(0.26, 0.32)
    return _wave(2 * np.pi * np.hypot(u - cx, v - cy) / period - np.pi / 2)


def _dots(u, v, rng, s):
    spacing = rng.uniform(0.42, 0.5)
    radius = spacing * rng.uniform(0.26, 0.32)
    ox, oy = rng.uniform(0, spacing, 2)
    du = (u + ox) % spacing - spacing / 2
    dv = (v + oy) % spacing - spacing / 2
    return _coverage(np.hypot(du, dv) - radius, s)


def _cross(u, v, rng, s):
    cx, cy = rng.uniform(0.46, 0.54, 2)
    arm, half = rng.uniform(0.33, 0.4), rng.uniform(0.09, 0.12)
    du, dv = abs(u - cx), abs(v - cy)
    sd = np.minimum(np.maximum(du - arm, dv - half), np.maximum(du - half, dv - arm))
    return _coverage(sd, s)


def _blobs(u, v, rng, s):
    # Smooth random field: bicubic upsampling of a 3x3 grid of noise, thresholded at its median.
    field = rng.standard_normal((3, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(field, mode="F").resize((s, s), Image.BICUBIC))
    return np.clip((img - np.median(img)) * 3.0 + 0.5, 0.0, 1.0)


def _framed(u, v, rng, s):
    # A solid fill (the background colour) inside a border of the foreground colour.
    width = rng.uniform(0.13, 0.2)
    edge = np.minimum(np.minimum(u, 1 - u), np.minimum(v, 1 - v))
    return _coverage(width - edge, s)


CLASSES: tuple[tuple[str, _Renderer], ...] = (
    ("circle", _circle),
    ("square", _square),
    ("triangle", _triangle),
    ("horizontal_stripes", _hstripes),
    ("vertical_stripes", _vstripes),
    ("checkerboard", _checkerboard),
    ("diagonal_gradient", _gradient),
    ("concentric_rings", _rings),
    ("dots", _dots),
    ("cross", _cross),
    ("noise_blobs", _blobs),
    ("framed_solid", _framed),
)
CLASS_NAMES = tuple(name for name, _ in CLASSES)


# A named palette (issue 25: colours from the whole RGB cube cost a small codebook its codes, and
# cannot be named in a caption). Any two differ by at least 0.5 in RGB, so both stay visible.
PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (0.85, 0.1, 0.1)),
    ("orange", (1.0, 0.55, 0.0)),
    ("yellow", (1.0, 0.9, 0.1)),
    ("green", (0.1, 0.65, 0.2)),
    ("cyan", (0.1, 0.85, 0.9)),
    ("blue", (0.1, 0.25, 0.85)),
    ("purple", (0.5, 0.15, 0.65)),
    ("pink", (1.0, 0.55, 0.75)),
    ("white", (0.97, 0.97, 0.97)),
    ("black", (0.05, 0.05, 0.05)),
)
COLOUR_NAMES = tuple(name for name, _ in PALETTE)
_RGB = np.array([rgb for _, rgb in PALETTE], dtype=np.float32)
MIN_COLOUR_DISTANCE = 0.5

# The caption of each class, from its foreground and background colour names.
PHRASES = {
    "circle": "a {fg} circle", "square": "a {fg} square", "triangle": "a {fg} triangle",
    "horizontal_stripes": "{fg} horizontal stripes", "vertical_stripes": "{fg} vertical stripes",
    "checkerboard": "a {fg} checkerboard", "diagonal_gradient": "a {fg} diagonal gradient",
    "concentric_rings": "{fg} concentric rings", "dots": "{fg} dots", "cross": "a {fg} cross",
    "noise_blobs": "{fg} blobs", "framed_solid": "a {fg} frame",
}


# (shape, foreground, background) combinations the train split never draws (issue 25): the demo
# prompts them to show a text-conditioned model composing a shape and two colours it has only seen
# apart. The held-out split draws them as often as any other combination.
UNSEEN = (("triangle", "yellow", "purple"), ("circle", "orange", "blue"), ("square", "pink", "green"),
          ("cross", "white", "red"), ("dots", "cyan", "black"), ("concentric_rings", "green", "white"))
_UNSEEN_IDX = {(CLASS_NAMES.index(s), COLOUR_NAMES.index(f), COLOUR_NAMES.index(b)) for s, f, b in UNSEEN}


def colour_pair(seed: int, i: int, label: int) -> tuple[int, int]:
    """Palette indices (foreground, background) of image i of class `label`: their own stream, so
    the captions need no rendering. The train split (seed SPLIT_SEEDS["train"]) draws again where
    it meets an UNSEEN combination."""
    rng = np.random.default_rng([seed, 3, i])
    while True:
        fg, bg = rng.integers(0, len(PALETTE), 2)
        if np.linalg.norm(_RGB[fg] - _RGB[bg]) < MIN_COLOUR_DISTANCE:
            continue
        if seed == SPLIT_SEEDS["train"] and (label, fg, bg) in _UNSEEN_IDX:
            continue
        return int(fg), int(bg)


def caption(label: int, fg: int, bg: int) -> str:
    """"a red circle on a blue background" for class `label` in palette colours fg on bg."""
    return PHRASES[CLASS_NAMES[label]].format(fg=COLOUR_NAMES[fg]) + f" on a {COLOUR_NAMES[bg]} background"


def render(label: int, size: int, rng: np.random.Generator, colours: tuple[int, int]) -> np.ndarray:
    """One image of class `label` in palette colours (fg, bg) as uint8 (size, size, 3)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(c, c)  # u: x (column), v: y (row)
    alpha = CLASSES[label][1](u, v, rng, size).astype(np.float32)[..., None]
    fg, bg = _RGB[colours[0]], _RGB[colours[1]]
    img = alpha * fg + (1 - alpha) * bg
    return (img * 255 + 0.5).astype(np.uint8)


def _check(n: int, size: int, classes: int) -> None:
    if not 1 <= classes <= len(CLASSES):
        raise ValueError(f"data.synthetic_classes {classes} must be between 1 and {len(CLASSES)}")
    if not 16 <= size <= 256:
        raise ValueError(f"synthetic images are drawn at 16 to 256 px, data.size is {size}")
    if n < 1:
        raise ValueError(f"data.synthetic_samples must be >= 1, got {n}")


def _labels(n: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 1]).permutation(np.arange(n) % classes).astype(np.int64)


def generate(n: int, size: int, classes: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, size, size, 3) uint8 and their labels (n,), classes balanced and shuffled.
    Image i depends only on (seed, i), so any prefix or subset is reproducible on its own."""
    _check(n, size, classes)
    labels = _labels(n, classes, seed)
    images = np.stack([render(int(y), size, np.random.default_rng([seed, 2, i]), colour_pair(seed, i, int(y)))
                       for i, y in enumerate(labels)])
    return images, labels


def captions(n: int, classes: int, seed: int = SEED) -> list[str]:
    """The captions of `generate(n, size, classes, seed)`'s images (any size), without rendering them."""
    _check(n, 16, classes)
    labels = _labels(n, classes, seed)
    return [caption(int(y), *colour_pair(seed, i, int(y))) for i, y in enumerate(labels)]


def parse_caption(text: str) -> Optional[tuple[int, int, int]]:
    """(class, foreground, background) indices of a caption of this dataset's form, or None."""
    for label, name in enumerate(CLASS_NAMES):
        for fg, colour in enumerate(COLOUR_NAMES):
            head = PHRASES[name].format(fg=colour) + " on a "
            if text.startswith(head) and text.endswith(" background"):
                bg = text[len(head):-len(" background")]
                if bg in COLOUR_NAMES:
                    return label, fg, COLOUR_NAMES.index(bg)
    return None


def pixel_colours(image: np.ndarray) -> tuple[int, int]:
    """The two palette colours an image (H, W, 3) uint8 is drawn in, from its pixels alone: the
    pair whose mixes (the segment between them in RGB) lie nearest to the pixels, among the pairs
    that each hold at least 2% of the pixels at their own end (anti-aliased edges and gradients are
    such mixes). Ordered by pixel count, most first."""
    px = image.reshape(-1, 3).astype(np.float32) / 255.0
    best, best_err = None, np.inf
    for a in range(len(PALETTE)):
        for b in range(a + 1, len(PALETTE)):
            d = _RGB[b] - _RGB[a]
            t = np.clip((px - _RGB[a]) @ d / float(d @ d), 0.0, 1.0)  # position along the segment
            err = float(np.linalg.norm(px - (_RGB[a] + t[:, None] * d), axis=1).mean())
            if err < best_err and (t < 0.25).mean() >= 0.02 and (t > 0.75).mean() >= 0.02:
                best, best_err, share_a = (a, b), err, float((t < 0.5).mean())
    if best is None:  # one colour only: the nearest palette colour twice
        c = int(np.linalg.norm(px.mean(0) - _RGB, axis=1).argmin())
        return c, c
    return best if share_a >= 0.5 else (best[1], best[0])


# The classes whose shape never covers half the image (a disk, a square, a triangle, dots and a cross
# inside the frame): the colour with more pixels is the background, so the pixels tell the two
# colours' roles apart (on 1200 held-out images, 100 of each: every one). In the patterns (stripes,
# checkerboard, gradient, rings, blobs, frame) both colours take about half, and the pixels show
# the pair only.
ROLES_SHOWN = frozenset(CLASS_NAMES.index(n) for n in ("circle", "square", "triangle", "dots", "cross"))


def colours_match(image: np.ndarray, label: int, fg: int, bg: int) -> bool:
    """Whether an image (H, W, 3) uint8 shows the colours `fg` on `bg` of a caption of class `label`:
    in their roles where the class shows them (ROLES_SHOWN: a purple circle on cyan is not "a cyan
    circle on a purple background"), as a pair otherwise."""
    shown = pixel_colours(image)
    return shown == (bg, fg) if label in ROLES_SHOWN else set(shown) == {fg, bg}


def _shard_count(n: int) -> int:
    """32 shards for the default 4096 samples: divisible by every ranks x workers product up to 32
    (epoch mode needs that) and enough shards for resampled streams to mix."""
    return max(1, min(32, n // 64))


def cache_root() -> str:
    return os.environ.get("TAMING_DIST_CACHE") or os.path.join(os.getcwd(), ".cache", "taming_dist")


def _write(folder: str, images: np.ndarray, labels: np.ndarray, texts: list[str], classes: int, seed: int) -> None:
    n = len(images)
    nshards = _shard_count(n)
    bounds = np.linspace(0, n, nshards + 1).astype(int)
    shards = []
    for s in range(nshards):
        def samples(lo=bounds[s], hi=bounds[s + 1]):
            for i in range(lo, hi):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG", compress_level=1)
                meta = {"source": f"synthetic/{CLASS_NAMES[labels[i]]}/{i}", "width": images.shape[2],
                        "height": images.shape[1]}
                yield {"__key__": f"{i:08d}", "png": buf.getvalue(), "cls": str(int(labels[i])), "txt": texts[i],
                       "json": json.dumps(meta, sort_keys=True)}

        name = SHARD_NAME.format(s)
        count, nbytes = write_tar(os.path.join(folder, name), samples())
        shards.append({"name": name, "count": count, "bytes": nbytes})
    # One row of examples per class (as many as the rarest class has, up to 8).
    per_row = min(8, int(np.bincount(labels, minlength=classes).min()))
    grid = [images[i] for c in range(classes) for i in np.flatnonzero(labels == c)[:per_row]]
    grid_t = torch.from_numpy(np.stack(grid)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    save_grid(grid_t, os.path.join(folder, "examples.png"), nrow=per_row)
    write_manifest(folder, shards, list(CLASS_NAMES[:classes]), np.bincount(labels, minlength=classes).tolist(),
                   source=f"synthetic-{VERSION}", seed=seed, image_size=int(images.shape[1]), captions=n,
                   palette=list(COLOUR_NAMES))


def ensure_synthetic(cfg, cache_dir: Optional[str] = None) -> str:
    """The folder of the synthetic dataset for `cfg` (a DataConfig: size, synthetic_samples,
    synthetic_classes, split), generated on first use. The held-out split has as many samples.

    Several processes (ranks) may call this at once: each writes into its own temporary folder and
    renames it into place; a process that loses the race discards its copy and uses the winner's.
    """
    size, n, classes, split = cfg.size, cfg.synthetic_samples, cfg.synthetic_classes, cfg.split
    if n < classes:
        raise ValueError(f"data.synthetic_samples {n} must be at least data.synthetic_classes {classes} "
                         f"(one example per class)")
    if split not in SPLIT_SEEDS:
        raise ValueError(f"data.split {split!r} is not one of {', '.join(SPLIT_SEEDS)}")
    root = cache_dir or cache_root()
    prefix = "synthetic" if split == "train" else f"synthetic-{split}"  # the train split keeps its folder name
    folder = os.path.join(root, f"{prefix}-{size}-{n}-{classes}-{VERSION}")
    if os.path.exists(os.path.join(folder, MANIFEST)):
        return folder
    images, labels = generate(n, size, classes, seed=SPLIT_SEEDS[split])
    texts = captions(n, classes, seed=SPLIT_SEEDS[split])
    # Another process may publish its finished copy first; then that copy is kept (keep_existing).
    with atomic_path(folder, keep_existing=True) as tmp:
        tmp.mkdir()
        _write(str(tmp), images, labels, texts, classes, SPLIT_SEEDS[split])
    return folder
