"""Reconstruction quality of a VQGAN over a shard set, each rank reading its own shards.

Shard i goes to rank i % world_size and every sample is evaluated exactly once. Ranks exchange
nothing until the end, where sums and counts are all-reduced, so they need not hold equal numbers
of samples (unlike training streams, whose per-step collectives need equal batch counts).

Images are center-cropped to the model's resolution. Reconstructions are clamped and rounded to 8
bits, as a saved image would be, so PSNR/SSIM agree with tools that read PNGs; both are computed on
the [0, 1] range.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from taming_dist.data.decode import CorruptCount, DecodeSpec, read_shard
from taming_dist.data.shards import read_manifest
from taming_dist.data.transforms import to_float
from taming_dist.eval.metrics import (CodebookUsage, Collective, FeatureStats, MeanMetric, fid_from_stats, psnr,
                                      reduce_sum, ssim)
from taming_dist.progress import progress

DEFAULT_MAX_CORRUPT_FRACTION = 0.01  # data.max_corrupt_fraction's default


def all_reduce_sum(device: torch.device) -> Collective:
    """Sum a tensor over the default process group (a no-op without one). NCCL reduces only
    device tensors, so the tensor travels to `device` and back."""
    import torch.distributed as dist

    def fn(t: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return t
        buf = t.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    return fn


def rank_shards(folder: str, rank: int, world_size: int, max_samples: Optional[int] = None) -> list[tuple[str, int, int]]:
    """(shard path, global index of its first sample, samples to take) for this rank's shards.

    Global indices follow the manifest's shard order, so `max_samples` keeps the same first N
    samples at any world size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    manifest = read_manifest(folder)
    plan, offset = [], 0
    for i, shard in enumerate(manifest["shards"]):
        take = shard["count"] if max_samples is None else max(0, min(shard["count"], max_samples - offset))
        if i % world_size == rank and take:
            plan.append((os.path.join(folder, shard["name"]), offset, take))
        offset += shard["count"]
    return plan


def _count(plan: list[tuple[str, int, int]]) -> int:
    return sum(take for _, _, take in plan)


def read_images(plan: list[tuple[str, int, int]], size: int, counts: list[CorruptCount],
                max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION) -> Iterator[np.ndarray]:
    """uint8 (3, size, size) center crops of the planned samples, read by the decode loop of training
    streams (data/decode.py): unreadable samples and shard-level errors are skipped and counted, one
    CorruptCount per shard appended to `counts`; too many in a shard raise CorruptDataError."""
    for url, _, take in plan:
        count = CorruptCount(max_corrupt_fraction, source=url, setting="eval-recon --max-corrupt-fraction")
        counts.append(count)
        for _, _, image in read_shard(url, DecodeSpec(size=size), count, take=take):
            yield image


def batches(images: Iterator[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    buf = []
    for img in images:
        buf.append(img)
        if len(buf) == batch_size:
            yield torch.from_numpy(np.stack(buf))
            buf = []
    if buf:
        yield torch.from_numpy(np.stack(buf))


@torch.no_grad()
def evaluate_reconstruction(model, folder: str, *, size: int, batch_size: int = 32, device="cpu", rank: int = 0,
                            world_size: int = 1, all_reduce_fn: Collective = lambda t: t,
                            lpips: Optional[Callable] = None, inception=None, max_samples: Optional[int] = None,
                            num_examples: int = 8, max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION,
                            ) -> tuple[dict, Optional[torch.Tensor]]:
    """Evaluate `model` (forward(x) -> (xrec, qloss, info["indices"]), `quantize.n_e` codes) on this
    rank's share of the shard folder. Every rank must call this (the final sums are collectives).

    `lpips(x, y)` takes images in [-1, 1] and returns per-image distances; `inception` maps images
    in [-1, 1] to (features (B, 2048), logits) and enables rFID. Returns (metrics dict, example
    images (2k, 3, S, S) in [-1, 1]: k originals then their k reconstructions, on rank 0, else None).
    Corrupt samples are skipped and counted as in training (`max_corrupt_fraction` per shard); the
    report's `skipped_samples` is corrupt samples plus shard-level errors, over all ranks.
    """
    start = time.time()
    model.eval()
    plan = rank_shards(folder, rank, world_size, max_samples)
    counts: list[CorruptCount] = []
    psnr_m, ssim_m = MeanMetric(all_reduce_fn), MeanMetric(all_reduce_fn)
    lpips_m = MeanMetric(all_reduce_fn) if lpips is not None else None
    usage = CodebookUsage(int(model.quantize.n_e), all_reduce_fn)
    real = FeatureStats(2048, all_reduce_fn, device) if inception is not None else None
    fake = FeatureStats(2048, all_reduce_fn, device) if inception is not None else None
    examples = None
    bar = progress(total=_count(rank_shards(folder, 0, 1, max_samples)), local_total=_count(plan), desc="eval-recon",
                   unit="images", enabled=rank == 0)
    for images in batches(read_images(plan, size, counts, max_corrupt_fraction), batch_size):
        x = to_float(images).to(device)  # (B, 3, S, S) in [-1, 1]
        xrec, _, info = model(x)
        rec8 = xrec.float().clamp(-1, 1).add(1).mul(127.5).round()  # 8-bit levels, as saved
        rec01, x01 = rec8 / 255.0, images.to(device, torch.float32) / 255.0
        rec = rec01 * 2 - 1
        psnr_m.update(psnr(x01, rec01))
        ssim_m.update(ssim(x01, rec01))
        usage.update(info["indices"])
        if lpips_m is not None:
            lpips_m.update(lpips(x, rec).reshape(x.shape[0], -1).mean(1))
        if inception is not None:
            real.update(inception(x)[0])
            fake.update(inception(rec)[0])
        if rank == 0 and examples is None and num_examples > 0:
            k = min(num_examples, x.shape[0])
            examples = torch.cat([x[:k], rec[:k]]).cpu()
        bar.update(x.shape[0])
    bar.close()
    # The same sequence of collectives on every rank, whatever its share of the data.
    psnr_mean, n = psnr_m.compute()
    report = {"samples": n, "psnr": psnr_mean, "ssim": ssim_m.compute()[0]}
    if lpips_m is not None:
        report["lpips"] = lpips_m.compute()[0]
    report["codebook"] = usage.compute()
    if inception is not None:
        mu1, s1, _ = real.compute()
        mu2, s2, _ = fake.compute()
        report["rfid"] = fid_from_stats(mu1, s1, mu2, s2)
    corrupt = torch.tensor([float(sum(c.corrupt for c in counts)), float(sum(c.shard_errors for c in counts))],
                           dtype=torch.float64)
    report["corrupt_samples"], report["shard_errors"] = (int(v) for v in reduce_sum(corrupt, all_reduce_fn).tolist())
    report["skipped_samples"] = report["corrupt_samples"] + report["shard_errors"]
    report["seconds"] = round(time.time() - start, 3)
    return report, examples
