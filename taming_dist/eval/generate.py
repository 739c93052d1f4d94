"""Sampling at scale (N samples split over ranks) and FID / Inception Score of a sample set.

Sample i belongs to global batch k = i // batch_size, and batch k is drawn by rank k % world_size
with a generator seeded from (seed, k). Every batch has its own seed, so no two ranks repeat a
draw, and the samples depend on (seed, batch size) only: 1 rank or 64 give the same N images.

Outputs, in `out_dir`:
- format `shards`: each rank writes webdataset shards `shard-r{rank}-{j}.tar` (`<i>.png`,
  `<i>.cls`, `<i>.json`), rank 0 then a `manifest.json`, so the folder is a shard set like any other;
- format `npz`: each rank writes its rows to a part file, rank 0 streams them in sample order into
  `samples.npz` with `arr_0` uint8 (N, H, W, 3) (and `arr_1` int64 labels for class models), the
  layout FID tools (guided-diffusion's evaluator, torch-fidelity) read;
- `grid.png`: rank 0's first samples.
`out_dir` must be one folder that every rank sees (a shared file system on several nodes).
"""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from taming_dist.atomic import atomic_path
from taming_dist.data.images import save_grid, to_uint8
from taming_dist.data.shards import resolve_shards, tar_samples, write_manifest, write_tar
from taming_dist.data.transforms import decode_rgb, find_image_field, load_image
from taming_dist.eval.metrics import FeatureStats, fid_from_stats, inception_score
from taming_dist.models.pipeline import generate_image
from taming_dist.progress import progress

SHARD_NAME = "shard-r{rank}-{index:06d}.tar"
PART_NAME = ".part-r{rank}.npy"
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
GRID_SAMPLES = 64


def batch_seed(seed: int, batch: int) -> int:
    """A 63-bit generator seed per (seed, global batch index) (numpy's SeedSequence mixes them, so
    nearby seeds do not give overlapping streams)."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(global batch index, first sample index, samples) of every batch this rank draws."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    n_batches = math.ceil(num_samples / batch_size)
    return [(k, k * batch_size, min(batch_size, num_samples - k * batch_size))
            for k in range(rank, n_batches, world_size)]


def sample_labels(model, classes: Optional[list[int]], start: int, count: int) -> Optional[torch.Tensor]:
    """Labels of samples start .. start+count-1 (classes cycled by global index; every class of
    the model when `classes` is None), or None for an unconditional model."""
    return model.condition.labels_at_scale(classes, start, count)


@torch.no_grad()
def draw_batches(model, plan: list[tuple[int, int, int]], *, seed: int, classes: Optional[list[int]] = None,
                 device="cpu", **sample_kwargs) -> Iterator[tuple[int, np.ndarray, Optional[np.ndarray]]]:
    """Per planned batch: (first sample index, uint8 images (B, H, W, 3), labels (B,) or None)."""
    device = torch.device(device)
    for k, start, count in plan:
        labels = sample_labels(model, classes, start, count)
        gen = torch.Generator(device=device).manual_seed(batch_seed(seed, k))
        condition = labels.to(device) if labels is not None else None
        images = generate_image(model.first_stage_model, model, condition, batch_size=count, generator=gen,
                                **sample_kwargs)
        yield start, to_uint8(images), (labels.numpy() if labels is not None else None)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def shard_layout(num_samples: int, batch_size: int, rank: int, world_size: int, shard_size: int) -> list[tuple[str, int]]:
    """(shard name, samples) of the shards `rank` writes: its samples in order, `shard_size` a shard."""
    n = sum(c for _, _, c in rank_batches(num_samples, batch_size, rank, world_size))
    return [(SHARD_NAME.format(rank=rank, index=j), min(shard_size, n - j * shard_size))
            for j in range(math.ceil(n / shard_size))]


def sample_to_folder(model, out_dir: str, *, num_samples: int, batch_size: int, seed: int, fmt: str,
                     rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None,
                     classes: Optional[list[int]] = None, shard_size: int = 1000, device="cpu",
                     settings: Optional[dict] = None, **sample_kwargs) -> dict:
    """Draw this rank's share of `num_samples` samples and write them (see the module docstring).
    Every rank must call this; `barrier` waits for all of them (the process group's, under
    torchrun). Returns {"written": samples by this rank, "output": the npz or the folder}."""
    if fmt not in ("shards", "npz"):
        raise ValueError(f"format {fmt!r} is not one of shards, npz")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    plan = rank_batches(num_samples, batch_size, rank, world_size)
    mine = sum(c for _, _, c in plan)
    side = model.config.first_stage.ddconfig.resolution
    grid: list[np.ndarray] = []
    part = None
    if fmt == "npz":
        part = np.lib.format.open_memmap(os.path.join(out_dir, PART_NAME.format(rank=rank)), mode="w+",
                                         dtype=np.uint8, shape=(mine, side, side, 3))
    pending: list[dict] = []
    written = 0  # shards written by this rank; shard_layout gives the same chunks
    row = 0
    bar = progress(total=num_samples, local_total=mine, desc="sample", unit="samples", enabled=rank == 0)
    for start, images, labels in draw_batches(model, plan, seed=seed, classes=classes, device=device, **sample_kwargs):
        if len(grid) < GRID_SAMPLES:
            grid.extend(images[:GRID_SAMPLES - len(grid)])
        if part is not None:
            part[row:row + len(images)] = images
        else:
            for j, img in enumerate(images):
                pending.append({"__key__": f"{start + j:08d}", "png": _png(img),
                                "cls": str(int(labels[j]) if labels is not None else -1),
                                "json": json.dumps({"index": start + j, "seed": seed}, sort_keys=True)})
            # Full shards go out as they fill; the last, shorter one after the loop.
            while len(pending) >= shard_size or (pending and row + len(images) == mine):
                write_tar(os.path.join(out_dir, SHARD_NAME.format(rank=rank, index=written)), pending[:shard_size])
                pending, written = pending[shard_size:], written + 1
        row += len(images)
        bar.update(len(images))
    bar.close()
    if part is not None:
        part.flush()
        del part
    if rank == 0 and grid:
        save_grid(torch.from_numpy(np.stack(grid)).permute(0, 3, 1, 2).float().div(127.5).sub(1),
                  os.path.join(out_dir, GRID_NAME), nrow=min(8, len(grid)))
    barrier()
    output = out_dir
    if rank == 0:
        if fmt == "npz":
            output = _merge_npz(model, out_dir, num_samples, batch_size, world_size, side, classes)
        else:
            _write_shard_manifest(model, out_dir, num_samples, batch_size, world_size, shard_size, classes,
                                  dict(settings or {}, seed=seed, num_samples=num_samples, batch_size=batch_size))
    barrier()
    return {"written": mine, "output": output}


def _all_labels(model, classes, num_samples: int) -> Optional[np.ndarray]:
    labels = sample_labels(model, classes, 0, num_samples)
    return None if labels is None else labels.numpy()


def _merge_npz(model, out_dir: str, num_samples: int, batch_size: int, world_size: int, side: int,
               classes) -> str:
    """Stream every rank's part into samples.npz in sample order (no copy of the whole set in
    memory), then remove the parts."""
    parts = []
    for r in range(world_size):
        path = os.path.join(out_dir, PART_NAME.format(rank=r))
        if not os.path.exists(path):
            raise FileNotFoundError(f"rank {r}'s samples {path} are missing: the output folder must be shared by "
                                    f"every rank (a shared file system when ranks run on several nodes)")
        parts.append(np.load(path, mmap_mode="r"))
    out = os.path.join(out_dir, NPZ_NAME)
    rows = [0] * world_size
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_samples, side, side, 3)}
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for k in range(math.ceil(num_samples / batch_size)):
                r = k % world_size
                count = min(batch_size, num_samples - k * batch_size)
                f.write(np.ascontiguousarray(parts[r][rows[r]:rows[r] + count]).tobytes())
                rows[r] += count
        labels = _all_labels(model, classes, num_samples)
        if labels is not None:
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels)
    del parts
    for r in range(world_size):
        os.remove(os.path.join(out_dir, PART_NAME.format(rank=r)))
    return out


def _write_shard_manifest(model, out_dir: str, num_samples: int, batch_size: int, world_size: int,
                          shard_size: int, classes, settings: dict) -> None:
    shards = []
    for r in range(world_size):
        for name, count in shard_layout(num_samples, batch_size, r, world_size, shard_size):
            path = os.path.join(out_dir, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"rank {r}'s shard {path} is missing: the output folder must be shared by "
                                        f"every rank (a shared file system when ranks run on several nodes)")
            shards.append({"name": name, "count": count, "bytes": os.path.getsize(path)})
    labels = _all_labels(model, classes, num_samples)
    n_classes = model.config.condition.n_classes if labels is not None else 0
    counts = np.bincount(labels, minlength=n_classes).tolist() if labels is not None else []
    write_manifest(out_dir, shards, [str(c) for c in range(n_classes)], counts, source="taming-dist sample",
                   image_size=model.config.first_stage.ddconfig.resolution, sampling=settings)


# ----------------------------------------------------------------------------------------------
# FID / IS of a sample set


def iter_sample_images(path: str, batch_size: int, size: Optional[int] = None) -> Iterator[np.ndarray]:
    """uint8 batches (B, H, W, 3) of a samples .npz (`arr_0`, NHWC) or of an image shard folder.
    `size` center-crops shard images to size x size (needed when their sizes differ)."""
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"samples file {path} does not exist")
        with np.load(path, allow_pickle=False, mmap_mode="r") as data:
            if "arr_0" not in data:
                raise ValueError(f"{path} holds {list(data.keys())}, expected arr_0 (uint8 N x H x W x 3)")
            arr = data["arr_0"]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"{path}: arr_0 is {arr.dtype} {arr.shape}, expected uint8 (N, H, W, 3)")
        for i in range(0, len(arr), batch_size):
            yield np.asarray(arr[i:i + batch_size])
        return
    urls, _ = resolve_shards(path)  # a clear error when it is not a finished shard folder
    def handler(exn: Exception) -> bool:
        raise exn  # a metric over a partly read set would be silently wrong

    buf: list[np.ndarray] = []
    for sample in tar_samples([{"url": u} for u in urls], handler):
        ext = find_image_field(sample)
        if ext is None:
            raise ValueError(f"sample {sample['__key__']} in {path} has no image")
        if size is not None:
            img = load_image(sample[ext], size).transpose(1, 2, 0)
        else:
            img = np.asarray(decode_rgb(sample[ext], 1))
            if buf and img.shape != buf[0].shape:
                raise ValueError(f"images in {path} have different sizes ({img.shape[:2]} and {buf[0].shape[:2]}); "
                                 f"pass a size to center-crop them (--size)")
        buf.append(img)
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def count_sample_images(path: str) -> Optional[int]:
    """The number of images `iter_sample_images` yields, from the npz's array header (the array is
    not read) or the manifest; None when unknown (a brace pattern, or a file that
    `iter_sample_images` will refuse with the reason)."""
    if not path.endswith(".npz"):
        manifest = resolve_shards(path)[1]
        return manifest["total"] if manifest else None
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            return header(f)[0][0]
    except (OSError, KeyError, ValueError, IndexError, zipfile.BadZipFile):
        return None


@torch.no_grad()
def inception_outputs(inception, path: str, *, batch_size: int = 50, size: Optional[int] = None,
                      device="cpu") -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(mu, sigma, n, class probabilities (n, K) float32) of a sample set's Inception outputs."""
    stats = FeatureStats(2048, device=device)
    probs = []
    bar = progress(total=count_sample_images(path), desc="eval-gen", unit="images")
    for batch in iter_sample_images(path, batch_size, size):
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        features, logits = inception(x)
        stats.update(features)
        probs.append(logits.double().softmax(-1).float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    mu, sigma, n = stats.compute()
    return mu, sigma, n, np.concatenate(probs)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics: an .npz with `mu` (D,) and `sigma` (D, D), as pytorch-fid writes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} do not exist; compute them from reference images "
                                f"with `taming-dist eval-gen REF_SHARDS --save-stats {path} --inception-weights W`")
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} holds {list(data.keys())}; reference statistics need arrays mu and sigma")
        return data["mu"], data["sigma"]


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add `.npz` to a name
        np.savez(f, mu=mu, sigma=sigma, n=np.int64(n))


def evaluate_samples(inception, path: str, ref_stats: str, *, batch_size: int = 50, size: Optional[int] = None,
                     is_splits: int = 10, device="cpu") -> dict:
    """FID against the reference statistics and Inception Score of the samples at `path`."""
    ref_mu, ref_sigma = load_stats(ref_stats)
    mu, sigma, n, probs = inception_outputs(inception, path, batch_size=batch_size, size=size, device=device)
    splits = min(is_splits, n)
    is_mean, is_std = inception_score(probs, splits)
    return {"samples": n, "fid": fid_from_stats(mu, sigma, ref_mu, ref_sigma), "inception_score": is_mean,
            "inception_score_std": is_std, "is_splits": splits}
