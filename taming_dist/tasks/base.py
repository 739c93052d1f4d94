"""The task protocol: what differs between the VQGAN stage and the transformer stage.

The loop owns steps, accumulation, cadence, checkpoints and logging; a task owns its modules
(handed to the engine as units), one optimizer step over a list of micro-batches, and images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from taming_dist.engines.base import Unit


class Task(Protocol):
    units: dict[str, Unit]

    def train_step(self, micro_batches: list[dict], step: int, sync: "StepSync | None" = None) -> dict:
        """Forward/backward over the micro-batches and one optimizer step per unit, with one fused
        all-reduce and one host read per step (reduce_step), none per micro-batch. Returns the
        step's metrics: global means as 0-dim device tensors (the loop converts them on logging
        steps) and host values; `skipped` = 1.0 when a non-finite loss or gradient on any rank
        skipped the step (on every rank)."""

    def save_images(self, batch: dict, step: int, folder: Path) -> list[Path]:
        """Write image grids (reconstructions or samples); every rank calls it (collectives)."""

    def export(self, folder: Path, ema: bool = True) -> None:
        """Write the trained model as an inference folder (config.json + model.safetensors)."""

    def work_per_sample(self) -> tuple[str, int]:
        """(unit name for the rate, amount per sample): ("images", 1) or ("tokens", N)."""

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (forward + backward of every unit), for MFU."""


def nonfinite(*tensors: torch.Tensor) -> torch.Tensor:
    """1.0 if any element of the tensors is inf or nan, else 0.0: a device tensor, no host read."""
    return torch.stack([(~torch.isfinite(t.detach().float())).any() for t in tensors]).any().float()


def add_stats(stats: dict, logs: dict, n: int) -> None:
    """Add logs / n to stats, keeping tensors on the device (no host read per micro-batch)."""
    for k, v in logs.items():
        v = v.detach().float() if torch.is_tensor(v) else float(v)
        stats[k] = stats.get(k, 0.0) + v / n


@dataclass
class StepSync:
    """What the loop shares across ranks in the step's one fused all-reduce (tasks' reduce_step):
    `send` this rank's values before the step (e.g. its stop flag, rank 0's clock), `received` their
    sums over the ranks after it."""

    send: dict[str, float] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)


def reduce_step(engine, flags: dict[str, torch.Tensor], stats: dict, sync: StepSync | None,
                sums: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The step's one collective and its one host read (torchtitan keeps losses as tensors and
    reduces on logging steps; nanoGPT marks its one `.item()` as the sync point).

    One all-reduce (sum) of a float64 vector: the units' non-finite flags (losses seen on this rank,
    a non-finite gradient norm), the loop's `sync.send` values, then the step's statistics. The flags
    and the loop's values are read back to the host (every rank reads the same sums, so all skip
    together); `flags` is updated in place with the sums as floats. The statistics are returned as
    their mean over ranks, 0-dim device tensors: converted to numbers only when the loop logs.
    Statistics that are Python floats (known on the host, the same on every rank) pass through.
    `sums` (tensors of any shape, e.g. a quantizer's code counts) ride along and come back summed
    over ranks under their own keys."""
    dev = engine.device
    head_keys = list(flags) + [f"sync:{k}" for k in (sync.send if sync else {})]
    head = [flags[k].double().reshape(()) for k in flags] + \
        [torch.tensor(float(v), dtype=torch.float64, device=dev) for v in (sync.send if sync else {}).values()]
    tkeys = [k for k, v in stats.items() if torch.is_tensor(v)]
    sums = sums or {}
    vec = torch.cat([torch.stack(head + [stats[k].double().reshape(()) for k in tkeys])]
                    + [sums[k].detach().double().reshape(-1) for k in sums])
    engine.all_reduce(vec, "sum")
    host = vec[:len(head)].tolist()  # the step's one host read
    for k, v in zip(head_keys, host):
        if k.startswith("sync:"):
            sync.received[k[5:]] = v
        else:
            flags[k] = v
    means = (vec[len(head):len(head) + len(tkeys)] / engine.world_size).float()
    out = {**{k: v for k, v in stats.items() if not torch.is_tensor(v)}, **dict(zip(tkeys, means.unbind()))}
    at = len(head) + len(tkeys)
    for k, t in sums.items():
        out[k] = vec[at:at + t.numel()].reshape(t.shape).to(t.dtype)
        at += t.numel()
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
