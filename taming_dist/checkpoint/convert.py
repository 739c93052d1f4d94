"""Training checkpoint (any engine, any world size) -> one consolidated state dict per unit.

Runs on a CPU machine with no process group. Torch engines' DCP state is read tensor by tensor:
only the model (and EMA) entries are allocated and loaded, never the optimizer state (about twice
the model for Adam). Where each engine keeps its weights is the engine's knowledge
(`engines.consolidate`, by the kind that wrote it); this module reads the tensors it names.
"""
from __future__ import annotations

from pathlib import Path

import torch

from taming_dist.checkpoint.manager import read_manifest, single_process_dcp_quiet
from taming_dist.engines import consolidate as consolidate_kind, consolidate_v1
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


def _consolidate_dcp(ckpt: Path, manifest: dict, ema: bool) -> dict[str, dict]:
    """Format versions 2 and 3 (the same unit keys for weights and EMA): the engine that wrote the
    checkpoint knows where its weights are (engines: consolidate)."""
    return consolidate_kind(manifest["engine"], ckpt, manifest, ema, read_dcp_tensors)


def _consolidate_v1(ckpt: Path, ema: bool) -> dict[str, dict]:
    """Format version 1 (meta.pt, `dcp/` or DeepSpeed tags, ema_rank*.pt): weights stay readable."""
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    return consolidate_v1(meta["engine"], ckpt, meta, ema)


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
