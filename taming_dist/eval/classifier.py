"""Sample quality without downloaded weights: a small classifier of the built-in data's classes.

FID needs InceptionV3 weights, which cannot be downloaded everywhere. For models trained on the
built-in data (taming_dist/data/synthetic.py) this module trains a small CNN on its training split
instead (seconds on CPU, once: cached in the cache folder, `$TAMING_DIST_CACHE`) and scores a
sample set with it:
- class accuracy: the fraction of class-conditional samples it assigns to the class they were drawn
  for (labels from the samples' `arr_1` / `.cls`);
- a Frechet distance (the FID formula, Heusel et al. 2017) between its penultimate features of
  the samples and of the held-out split: `fd`. A finite set of real images has a distance of its
  own, so the same distance for as many training-split images is given beside it (`fd_real`).
Numbers are comparable only between reports of the same classifier (`classifier.version`).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from taming_dist.atomic import atomic_path
from taming_dist.data import synthetic
from taming_dist.data.synthetic import CLASS_NAMES, SPLIT_SEEDS, cache_root, generate
from taming_dist.eval.metrics import FeatureStats, fid_from_stats

VERSION = "v5"  # v4: trained on data v4; v5: and on imperfect copies (`augment`). Bump when the network or
# its training change (a new cache file); the data's version is in the file's name too (`classifier_path`)
SIZE = 32  # the classifier's input side; samples of other sizes are resized to it
SAMPLES = 4096  # images per split it is trained on / compared with
TRAIN_STEPS = 800
BATCH = 64


class SmallClassifier(nn.Module):
    """Four 3x3 convolutions (16, 32, 64, 64 channels; the first three halve the side) with
    BatchNorm and ReLU -> global average pool -> the 64-d features -> linear logits. About 1M
    multiply-adds per 32 px image, so it trains in seconds on a CPU. Input (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self, n_classes: int = len(CLASS_NAMES), width: int = 16):
        super().__init__()
        layers, c_in = [], 3
        for c, stride in ((width, 2), (2 * width, 2), (4 * width, 2), (4 * width, 1)):
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes)
        self.feature_dim = c_in

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x).mean((2, 3))  # (B, 64)
        return features, self.head(features)


def to_input(images: np.ndarray, device="cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, 32, 32) float in [-1, 1] (antialiased resize when H != 32)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def _outputs(model: SmallClassifier, images: np.ndarray, device, batch_size: int = 512):
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f, lg = model(to_input(images[i:i + batch_size], device))
        feats.append(f)
        logits.append(lg)
    return torch.cat(feats), torch.cat(logits)


def _stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    s = FeatureStats(features.shape[1], device=features.device)
    s.update(features)
    mu, sigma, _ = s.compute()
    return mu, sigma


def train_classifier(steps: int = TRAIN_STEPS, samples: int = SAMPLES, seed: int = 0, device="cpu") -> dict:
    """Train on the built-in training split; -> the cache entry: weights, held-out accuracy, and
    the held-out split's feature statistics (the reference of `fd`)."""
    train_x, train_y = generate(samples, SIZE, len(CLASS_NAMES), seed=SPLIT_SEEDS["train"])
    held_x, held_y = generate(samples, SIZE, len(CLASS_NAMES), seed=SPLIT_SEEDS["heldout"])
    threads = torch.get_num_threads()
    # One thread: these convolutions are too small to split, and on shared cores more threads
    # were measured 10x slower (0.37 s against 0.036 s a step of 64 on 2 busy cores).
    torch.set_num_threads(1)
    try:
        model = _fit(train_x, train_y, steps, seed, device)
    finally:
        torch.set_num_threads(threads)
    feats, logits = _outputs(model, held_x, device)
    mu, sigma = _stats(feats)
    acc = float((logits.argmax(1).cpu().numpy() == held_y).mean())
    return {"version": VERSION, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "heldout_accuracy": acc, "ref_mu": torch.from_numpy(mu), "ref_sigma": torch.from_numpy(sigma)}


def augment(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Imperfect copies of images (B, 3, 32, 32) in [-1, 1], as a tokenizer's decoder and a sampled
    token grid draw them: outlines bent by a smooth random warp (a displacement field of 4 x 4 random
    vectors, bicubically upsampled, up to about 1.5 px at strength 1), a shift of up to 1.5 px, edges
    softened by blending towards a 3 x 3 box blur, and pixel noise. Each image gets its own draw of
    every part from torch's global generator; strength 0 returns the images unchanged."""
    b = x.shape[0]
    px = 2.0 / x.shape[-1]  # one pixel in grid_sample's [-1, 1] coordinates
    field = F.interpolate(torch.randn(b, 2, 4, 4, device=x.device), size=x.shape[-2:], mode="bicubic",
                          align_corners=False)
    amp = torch.rand(b, 1, 1, 1, device=x.device) * 1.5 * px * strength
    shift = (torch.rand(b, 2, 1, 1, device=x.device) * 2 - 1) * 1.5 * px * strength
    eye = torch.eye(2, 3, device=x.device).expand(b, 2, 3)
    grid = F.affine_grid(eye, list(x.shape), align_corners=False)
    grid = grid + (field * amp + shift).permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    t = torch.rand(b, 1, 1, 1, device=x.device) * strength
    x = x + t * (blur - x)
    return (x + torch.randn_like(x) * 0.04 * strength).clamp(-1, 1)


def _fit(train_x: np.ndarray, train_y: np.ndarray, steps: int, seed: int, device) -> SmallClassifier:
    samples = len(train_x)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallClassifier().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        x_all, y_all = to_input(train_x, device), torch.from_numpy(train_y).to(device)
        model.train()
        for _ in range(steps):
            i = torch.randint(0, samples, (BATCH,), device=device)
            x = x_all[i]
            flip = torch.rand(BATCH, device=device) < 0.5  # training and sampling use hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            # three in four images imperfect: samples are scored by what they show, not by how
            # crisply (a lumpy disk is still a circle; without this 13 of 16 were called crosses)
            x = torch.where(torch.rand(BATCH, 1, 1, 1, device=device) < 0.75, augment(x), x)
            loss = F.cross_entropy(model(x)[1], y_all[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def classifier_path(cache_dir: Optional[str] = None) -> str:
    """The cache file of this classifier version trained on this version of the built-in data: a
    change of either trains a new one rather than reading one of other images' classes."""
    return os.path.join(cache_dir or cache_root(), f"classifier-{VERSION}-data{synthetic.VERSION}-{SIZE}px.pt")


def load_classifier(cache_dir: Optional[str] = None, device="cpu") -> tuple[SmallClassifier, dict]:
    """The cached classifier (trained and written on first use) and its cache entry."""
    path = classifier_path(cache_dir)
    if not os.path.exists(path):
        entry = train_classifier()
        with atomic_path(path) as tmp:  # a concurrent reader sees no file or the whole file
            torch.save(entry, tmp)
    entry = torch.load(path, weights_only=True)
    model = SmallClassifier()
    model.load_state_dict(entry["state_dict"])
    return model.to(device).eval(), {**entry, "path": path}


def read_samples(path: str, batch_size: int = 256, size: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """uint8 images (N, H, W, 3) and labels (N,) or None of a samples .npz (`arr_0`, `arr_1`) or an
    image shard folder (`.cls`; -1 or missing = unlabelled)."""
    from taming_dist.eval.generate import iter_sample_images

    images = np.concatenate(list(iter_sample_images(path, batch_size, size)))
    return images, _labels(path, len(images))


def _labels(path: str, n: int) -> Optional[np.ndarray]:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            labels = data["arr_1"] if "arr_1" in data else None
    else:
        labels = np.array([int(s.get("cls", b"-1")) for s in _shard_samples(path)])
    if labels is None or (labels < 0).any():
        return None
    if len(labels) != n:
        raise ValueError(f"{path} has {n} images but {len(labels)} labels")
    return labels.astype(np.int64)


def _shard_samples(path: str) -> Iterator[dict]:
    from taming_dist.data.shards import resolve_shards, tar_samples

    def handler(exn: Exception) -> bool:
        raise exn  # the same samples as iter_sample_images, or an error

    urls, _ = resolve_shards(path)
    yield from tar_samples([{"url": u} for u in urls], handler)


def score_images(model: SmallClassifier, entry: dict, images: np.ndarray, labels: Optional[np.ndarray],
                 device="cpu") -> dict:
    """Class accuracy (when labelled), `fd` to the held-out split, and `fd_real`: the same distance
    for as many images of the training split (what real images of this count score)."""
    if len(images) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 samples, got {len(images)}")
    ref_mu, ref_sigma = entry["ref_mu"].numpy(), entry["ref_sigma"].numpy()
    feats, logits = _outputs(model, images, device)
    mu, sigma = _stats(feats)
    real, _ = generate(len(images), SIZE, len(CLASS_NAMES), seed=SPLIT_SEEDS["train"])
    real_mu, real_sigma = _stats(_outputs(model, real, device)[0])
    out = {"samples": len(images), "fd": fid_from_stats(mu, sigma, ref_mu, ref_sigma),
           "fd_real": fid_from_stats(real_mu, real_sigma, ref_mu, ref_sigma)}
    if labels is not None:
        if labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"labels go up to {labels.max()}, but the built-in data has {len(CLASS_NAMES)} classes: "
                             "these samples are not of a model trained on it")
        pred = logits.argmax(1).cpu().numpy()
        out["class_accuracy"] = float((pred == labels).mean())
        out["per_class_accuracy"] = {CLASS_NAMES[c]: float((pred[labels == c] == c).mean())
                                     for c in np.unique(labels)}
    out["classifier"] = {"version": VERSION, "path": entry["path"], "heldout_accuracy": entry["heldout_accuracy"]}
    return out


def score_samples(path: str, *, batch_size: int = 256, size: Optional[int] = None, device="cpu",
                  cache_dir: Optional[str] = None) -> dict:
    """Score the samples at `path` (a .npz or an image shard folder) with the cached classifier."""
    model, entry = load_classifier(cache_dir, device)
    images, labels = read_samples(path, batch_size, size)
    out = score_images(model, entry, images, labels, device)
    if labels is None:
        out["notes"] = ["no labels with the samples (an unconditional model?): class accuracy left out"]
    return out
