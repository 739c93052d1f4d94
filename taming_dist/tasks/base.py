"""The task protocol: what differs between the VQGAN stage and the transformer stage.

The loop owns steps, accumulation, cadence, checkpoints and logging; a task owns its modules
(handed to the engine as units), one optimizer step over a list of micro-batches, and images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from taming_dist.engines.base import Unit


class Task(Protocol):
    units: dict[str, Unit]

    def train_step(self, micro_batches: list[dict], step: int) -> dict:
        """Forward/backward over the micro-batches and one optimizer step per unit.
        Returns float metrics; `skipped` = 1.0 when a non-finite loss or gradient skipped the step."""

    def save_images(self, batch: dict, step: int, folder: Path) -> list[Path]:
        """Write image grids (reconstructions or samples); every rank calls it (collectives)."""

    def export(self, folder: Path, ema: bool = True) -> None:
        """Write the trained model as an inference folder (config.json + model.safetensors)."""

    def work_per_sample(self) -> tuple[str, int]:
        """(unit name for the rate, amount per sample): ("images", 1) or ("tokens", N)."""

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (forward + backward of every unit), for MFU."""


def all_finite(engine, *tensors: torch.Tensor) -> bool:
    """True when every tensor is finite on every rank (all ranks agree, so all skip together)."""
    bad = torch.zeros((), device=engine.device)
    for t in tensors:
        bad += (~torch.isfinite(t.detach().float())).any().float()
    return float(engine.all_reduce(bad, "sum")) == 0.0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
