"""Atomic training checkpoints: one DCP save of Stateful parts, a manifest, a `latest` pointer.

Layout of one checkpoint (`checkpoints/step_000500/`), format version 2:
  state/          one torch.distributed.checkpoint save of {unit name: UnitState, "run": RunState}:
                  each unit's model, optimizer, LR schedule, loss scaler and EMA (torchtitan's
                  pattern), and the run's step, counters and each rank's RNG and data position
  deepspeed/      DeepSpeed only: its native model + optimizer files, one tag per unit (the
                  DCP state then holds the rest of each unit)
  manifest.json   format version, step, engine, ZeRO stage, world size, units; written last
It is written as `step_000500.tmp/` and renamed when every rank has finished; `latest` (a text
file naming the folder) is replaced last, so a crash or kill -9 at any point leaves the previous
checkpoint as `latest`. Whether a checkpoint can be resumed here is the engine's call
(`Engine.check_resumable`).
"""
from __future__ import annotations

import io
import json
import warnings
from contextlib import contextmanager
import os
import re
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from taming_dist.engines.base import Engine, Unit

FORMAT = "taming_dist-checkpoint"
VERSION = 2


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


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=True)


def rank_key(rank: int) -> str:
    return f"rank{rank:05d}"


class UnitState:
    """Stateful (torch.distributed.checkpoint.stateful) view of one unit: the engine decides what
    it holds (DTensor shards, full tensors, ZeRO-3 EMA partitions)."""

    def __init__(self, engine: Engine, unit: Unit):
        self.engine, self.unit = engine, unit

    def state_dict(self) -> dict:
        return self.engine.unit_state_dict(self.unit)

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_unit_state_dict(self.unit, state)


class RunState:
    """Stateful run state: step and counters (the same on every rank) and this rank's RNG and data
    position under a key of its own, so DCP keeps every rank's copy. Loaded at another world size,
    it reads rank 0's data position and leaves the RNG as it is (the streams cannot map 1:1)."""

    def __init__(self, rank: int, read_rank: int | None = None):
        self.rank, self.read_rank = rank, rank if read_rank is None else read_rank
        self.step, self.counters, self.rank_state = 0, b"", b""

    def state_dict(self) -> dict:
        return {"step": self.step, "counters": self.counters, rank_key(self.read_rank): self.rank_state}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.counters = state["step"], state["counters"]
        self.rank_state = state[rank_key(self.read_rank)]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict:
    """The manifest of a checkpoint folder; a clear error for folders of the older format."""
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.exists():
        if (path / "meta.pt").exists():
            raise ValueError(
                f"{path} is a taming_dist checkpoint of format version 1 (meta.pt + rank_*.pt files), written "
                f"before checkpoint format version {VERSION}; it cannot be resumed by this version. Its weights "
                f"are still readable: `taming-dist convert {path} OUT.safetensors`, then start a run from them "
                "with `init_from=OUT.safetensors`"
            )
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no manifest.json)")
    meta = json.loads(manifest.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{manifest}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                         f"version of taming_dist reads {FORMAT!r} version {VERSION}")
    return meta


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
        if not (path / "manifest.json").exists() and not (path / "meta.pt").exists():
            raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint (no manifest.json)")
        return path

    def save(self, step: int, units: dict[str, Unit], counters: dict, rank_state: dict) -> Path:
        """`counters`: small values shared by all ranks (e.g. skipped steps); `rank_state`: this
        rank's own (e.g. its data position); RNG states are added here."""
        import torch.distributed.checkpoint as dcp

        eng = self.engine
        final = self.folder / f"step_{step:06d}"
        tmp = self.folder / f"step_{step:06d}.tmp"
        if eng.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over by a crash during an earlier save
                shutil.rmtree(tmp)
            tmp.mkdir()
        eng.barrier()
        eng.save_native(str(tmp), units)
        run = RunState(eng.env.rank)
        run.step, run.counters = step, _to_bytes(counters)
        run.rank_state = _to_bytes({"rng": rng_state(), **rank_state})
        state = {name: UnitState(eng, u) for name, u in units.items()}
        state["run"] = run
        with single_process_dcp_quiet():
            dcp.save(state, checkpoint_id=str(tmp / "state"))
        if eng.is_main:
            manifest = {"format": FORMAT, "version": VERSION, "step": step, "engine": eng.kind,
                        "zero_stage": getattr(eng.cfg, "zero_stage", None) if eng.kind == "deepspeed" else None,
                        "world_size": eng.world_size, "units": list(units)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
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
        """Keep the `keep_last` newest checkpoints by step number (names are zero-padded to 6 digits
        only, so from step 1,000,000 on a sort by name would put the newest first and delete it),
        and never the one `latest` names."""
        done = sorted((int(m.group(1)), p) for p in self.folder.glob("step_*")
                      if p.is_dir() and (m := re.fullmatch(r"step_(\d+)", p.name)))
        pointer = self.folder / "latest"
        latest = pointer.read_text().strip() if pointer.exists() else None
        for _, old in done[: max(0, len(done) - self.keep_last)]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, units: dict[str, Unit]) -> tuple[int, dict, dict]:
        """Restore units, and RNG when the world size is unchanged; returns (step, counters, this
        rank's extra state)."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        manifest = read_manifest(path)
        eng = self.engine
        eng.check_resumable(manifest, str(path))
        if sorted(manifest["units"]) != sorted(units):
            raise ValueError(f"{path} holds units {manifest['units']} but this run has {list(units)}: "
                             "it is a checkpoint of the other stage")
        same_world = manifest["world_size"] == eng.world_size
        eng.load_native(str(path), units)
        run = RunState(eng.env.rank, read_rank=eng.env.rank if same_world else 0)
        state = {name: UnitState(eng, u) for name, u in units.items()}
        state["run"] = run
        with single_process_dcp_quiet():
            dcp.load(state, checkpoint_id=str(path / "state"))
        extra = _from_bytes(run.rank_state)
        rng = extra.pop("rng")
        if same_world:
            set_rng_state(rng)
        return run.step, _from_bytes(run.counters), extra


@contextmanager
def single_process_dcp_quiet():
    """A one-process run (engine.kind=single, no process group) saves and loads DCP without
    torch.distributed, which is what we intend; DCP says so in a UserWarning each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r".*assuming the intent is to (save|load) in a single process")
        yield
