"""Atomic training checkpoints: a folder of stateful parts, a `latest` pointer, keep-last-k.

Layout of one checkpoint (`checkpoints/step_000500/`):
  <engine files>     DCP folder `dcp/` (torch engines) or one DeepSpeed tag per unit
  meta.pt            step, world size, engine, LR schedulers, grad scalers, counters (rank 0)
  rank_00000.pt ...  per rank: RNG states (torch, cuda, numpy, python) and the data position
It is written as `step_000500.tmp/` and renamed when every rank has finished; `latest` (a text
file naming the folder) is replaced last, so a crash or kill -9 at any point leaves the previous
checkpoint as `latest`.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from taming_dist.engines.base import Engine, Unit


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, folder: Path, engine: Engine, keep_last: int = 3):
        self.folder = Path(folder)
        self.engine = engine
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.exists():
            return None
        path = self.folder / pointer.read_text().strip()
        if not (path / "meta.pt").exists():
            raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint (no meta.pt)")
        return path

    def save(self, step: int, units: dict[str, Unit], meta: dict, rank_state: dict) -> Path:
        eng = self.engine
        final = self.folder / f"step_{step:06d}"
        tmp = self.folder / f"step_{step:06d}.tmp"
        if eng.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over by a crash during an earlier save
                shutil.rmtree(tmp)
            tmp.mkdir()
        eng.barrier()
        eng.save(str(tmp), units)
        torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank_{eng.env.rank:05d}.pt")
        if eng.is_main:
            meta = {
                **meta,
                "step": step,
                "world_size": eng.world_size,
                "engine": eng.kind,
                "schedulers": {n: u.scheduler.state_dict() for n, u in units.items()},
                "scalers": {n: u.scaler.state_dict() for n, u in units.items() if u.scaler is not None},
            }
            torch.save(meta, tmp / "meta.pt")
        eng.barrier()
        if eng.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text_atomic(self.folder / "latest", final.name)
            self._prune()
        eng.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, units: dict[str, Unit]) -> tuple[dict, dict]:
        """Restore units and RNG; returns (meta, this rank's extra state)."""
        path = Path(path)
        meta = torch.load(path / "meta.pt", weights_only=True)
        eng = self.engine
        if meta["engine"] == "deepspeed" or eng.kind == "deepspeed":
            if meta["engine"] != eng.kind:
                raise ValueError(
                    f"{path} was written by engine {meta['engine']!r} but this run uses {eng.kind!r}; convert it "
                    "with `taming-dist convert` and start from it with `init_from:` instead of resuming"
                )
            if meta["world_size"] != eng.world_size:
                raise ValueError(
                    f"{path} is a DeepSpeed checkpoint from {meta['world_size']} ranks and this run has "
                    f"{eng.world_size}; DeepSpeed cannot reshard its own format. Convert it first: `python -m "
                    f"deepspeed.checkpoint.ds_to_universal --input_folder {path}/<unit> --output_folder "
                    f"{path}/<unit>_universal --inject_missing_state`, or resume on {meta['world_size']} ranks"
                )
        eng.load(str(path), units)
        for n, u in units.items():
            u.scheduler.load_state_dict(meta["schedulers"][n])
            if u.scaler is not None and n in meta.get("scalers", {}):
                u.scaler.load_state_dict(meta["scalers"][n])
        rank_file = path / f"rank_{eng.env.rank:05d}.pt"
        if meta["world_size"] != eng.world_size:
            # Another world size: weights and optimizer were resharded by DCP; RNG streams cannot
            # map one-to-one. The data stream continues at rank 0's epoch and batch count (the
            # stream layout changed, so these are not exactly the samples the old ranks would see).
            first = torch.load(path / "rank_00000.pt", weights_only=True)
            return meta, {"data": first["data"]} if "data" in first else {}
        extra = torch.load(rank_file, weights_only=True)
        set_rng_state(extra.pop("rng"))
        return meta, extra
