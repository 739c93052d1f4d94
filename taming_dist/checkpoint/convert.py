"""Training checkpoint (any engine, any world size) -> one consolidated state dict per unit.

Runs on a CPU machine with no process group. Torch engines' DCP state is read tensor by tensor:
only the model (and EMA) entries are allocated and loaded, never the optimizer state (about twice
the model for Adam). DeepSpeed's model comes from its own fp32 consolidation
(`get_fp32_state_dict_from_zero_checkpoint`); its EMA from the DCP state, where ZeRO-3 keeps one
partition per rank (reassembled by the engine's `unflatten_zero3`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from taming_dist.checkpoint.manager import read_manifest, single_process_dcp_quiet
from taming_dist.engines.deepspeed import ema_rank_key, unflatten_zero3
from taming_dist.progress import progress


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run's `checkpoints/` folder or a run folder -> the checkpoint folder."""
    p = Path(path)
    if (p / "manifest.json").exists() or (p / "meta.pt").exists():
        return p
    for cand in (p / "checkpoints" / "latest", p / "latest"):
        if cand.exists():
            return cand.parent / cand.read_text().strip()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    raise FileNotFoundError(f"{p} is not a taming_dist checkpoint folder (no manifest.json); pass a folder such "
                            "as runs/NAME/checkpoints/step_000500, a checkpoints/ folder or a run folder")


# Tensors are loaded in groups of about this many bytes, so that progress shows between groups.
LOAD_GROUP_BYTES = 1 << 30


def read_dcp_tensors(folder: Path, prefixes: list[str], desc: str = "convert") -> dict[str, torch.Tensor]:
    """The tensors of a DCP save whose flattened key starts with one of `prefixes`, loaded in this
    process alone; nothing else of the checkpoint is read into memory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata) and k.startswith(tuple(prefixes))}
    pending = list(reversed(state))
    with progress(total=sum(t.nbytes for t in state.values()), desc=desc, unit="B", unit_scale=True) as bar:
        while pending:
            group, size = {}, 0
            while pending and (not group or size + state[pending[-1]].nbytes <= LOAD_GROUP_BYTES):
                key = pending.pop()
                group[key] = state[key]
                size += state[key].nbytes
            with single_process_dcp_quiet():
                dcp.load(group, storage_reader=reader, no_dist=True)  # into the tensors of `state`, in place
            bar.update(size)
    return state


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _consolidate_dcp(ckpt: Path, manifest: dict, ema: bool) -> dict[str, dict]:
    """Format versions 2 and 3 (the same unit keys for weights and EMA)."""
    result: dict[str, dict] = {}
    for name in manifest["units"]:
        if manifest["engine"] == "deepspeed":
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag=name))
            if ema and manifest.get("zero_stage") == 3:
                keys = [f"{name}.{ema_rank_key(r)}." for r in range(manifest["world_size"])]
                parts = read_dcp_tensors(ckpt / "state", keys, f"convert {name} EMA")
                per_rank = [_strip(parts, k) for k in keys]
                sd.update({k: unflatten_zero3([p[k] for p in per_rank], sd[k].shape) for k in per_rank[0]})
            elif ema:
                ema_state = read_dcp_tensors(ckpt / "state", [f"{name}.ema."], f"convert {name} EMA")
                sd.update(_strip(ema_state, f"{name}.ema."))
        else:
            prefixes = [f"{name}.model."] + ([f"{name}.ema."] if ema else [])
            state = read_dcp_tensors(ckpt / "state", prefixes, f"convert {name}")
            sd = _strip(state, f"{name}.model.")
            sd.update(_strip(state, f"{name}.ema."))
        result[name] = sd
    return result


def _consolidate_v1(ckpt: Path, ema: bool) -> dict[str, dict]:
    """Format version 1 (meta.pt, `dcp/` or DeepSpeed tags, ema_rank*.pt): weights stay readable."""
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    result: dict[str, dict] = {}
    if meta["engine"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        for name in meta["schedulers"]:
            sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=name))
            files = sorted((ckpt / name).glob("ema_rank*.pt"))
            if ema and files:
                parts = [torch.load(f, weights_only=True) for f in files]
                for k in parts[0]:
                    sd[k] = unflatten_zero3([p[k] for p in parts], sd[k].shape)
            result[name] = sd
        return result
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(ckpt / "dcp", Path(tmp) / "full.pt")
        state = torch.load(Path(tmp) / "full.pt", weights_only=True)
    for name in meta["schedulers"]:
        sd = dict(state[name]["model"])
        if ema and state[name].get("ema"):
            sd.update(state[name]["ema"])
        result[name] = sd
    return result


def consolidate(path: str | Path, *, ema: bool = False, dtype: torch.dtype | None = None) -> dict[str, dict]:
    """{unit name: full state dict} for a checkpoint; with `ema`, EMA weights replace the
    parameters they track (when the run kept an EMA)."""
    ckpt = resolve_checkpoint(path)
    if (ckpt / "manifest.json").exists():
        result = _consolidate_dcp(ckpt, read_manifest(ckpt), ema)
    else:
        result = _consolidate_v1(ckpt, ema)
    if dtype is not None:
        result = {u: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                  for u, sd in result.items()}
    return result
