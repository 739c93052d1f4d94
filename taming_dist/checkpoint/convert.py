"""Training checkpoint (any engine, any world size) -> one consolidated state dict per unit.

Runs on a CPU machine with no process group: torch engines' DCP folders are read with
`dcp_to_torch_save`; DeepSpeed folders with DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`
(fp32 master weights). EMA weights are reassembled from the per-rank files where ZeRO-3 split them.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def read_meta(ckpt: Path) -> dict:
    meta_file = Path(ckpt) / "meta.pt"
    if not meta_file.exists():
        raise FileNotFoundError(f"{ckpt} is not a taming_dist checkpoint folder (no meta.pt); "
                                "pass a folder such as runs/NAME/checkpoints/step_000500")
    return torch.load(meta_file, weights_only=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run's `checkpoints/` folder or a run folder -> the checkpoint folder."""
    p = Path(path)
    if (p / "meta.pt").exists():
        return p
    for cand in (p / "checkpoints" / "latest", p / "latest"):
        if cand.exists():
            return cand.parent / cand.read_text().strip()
    return p


def _dcp_units(ckpt: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(ckpt / "dcp", out)
        return torch.load(out, weights_only=True)


def _deepspeed_ema(folder: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("ema_rank*.pt"))
    if not files:
        return {}
    parts = [torch.load(f, weights_only=True) for f in files]
    ema = {}
    for name, first in parts[0].items():
        shape = shapes[name]
        numel = torch.Size(shape).numel()
        if first.numel() == numel:
            ema[name] = first.view(shape)
        else:  # ZeRO-3: each rank holds a flat, padded partition
            ema[name] = torch.cat([p[name].flatten() for p in parts])[:numel].view(shape)
    return ema


def consolidate(path: str | Path, *, ema: bool = False, dtype: torch.dtype | None = None) -> dict[str, dict]:
    """{unit name: full state dict} for a checkpoint; with `ema`, EMA weights replace the
    parameters they track (when the run kept an EMA)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    units = list(meta["schedulers"])
    result: dict[str, dict] = {}
    if meta["engine"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        for name in units:
            sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=name))
            if ema:
                sd.update(_deepspeed_ema(ckpt / name, {k: v.shape for k, v in sd.items()}))
            result[name] = sd
    else:
        state = _dcp_units(ckpt)
        for name in units:
            sd = dict(state[name]["model"])
            if ema and state[name].get("ema"):
                sd.update(state[name]["ema"])
            result[name] = sd
    if dtype is not None:
        result = {u: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                  for u, sd in result.items()}
    return result
