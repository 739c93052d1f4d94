"""The Stateful parts of a training checkpoint (torch.distributed.checkpoint.stateful.Stateful).

A checkpoint is one dict of these, saved and loaded by one DCP call (torchtitan's pattern):

    {unit name: UnitState, ..., "train": TrainState, "rng": PerRank(RNGState), "data": PerRank(stream)}

Every state is tensors and plain values (ints, floats, strings, lists of them), so DCP stores each
entry under its own key (`train.step`, `rank00001.rng.torch`, ...) where it can be listed, read
alone and resharded; nothing is a pickled blob of our own.

Per-rank state (each rank's RNG and data position) sits under a key of its own rank (`PerRank`):
DCP treats a plain value or a plain tensor as the same on every rank and writes it once, so a
shared key would keep one rank's copy only. At another world size the rules of format 2 hold:
every rank reads rank 0's data position (the stream continues the epoch after the same number of
batches, `DataStream.load_state_dict`), and the RNG is left as the run seeded it (the streams of
N ranks cannot map onto M).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from taming_dist.engines.base import Engine, Unit


def rank_key(rank: int) -> str:
    return f"rank{rank:05d}"


class UnitState:
    """One unit: its model, optimizer, LR schedule, loss scaler and EMA, as its engine lays them out
    (DTensor shards, full tensors, ZeRO-3 EMA partitions; `Engine.unit_state_dict`)."""

    def __init__(self, engine: Engine, unit: Unit):
        self.engine, self.unit = engine, unit

    def state_dict(self) -> dict:
        return self.engine.unit_state_dict(self.unit)

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_unit_state_dict(self.unit, state)


@dataclass
class TrainState:
    """The loop's position: steps done and non-finite steps skipped so far (the same on every rank)."""

    step: int = 0
    skipped_total: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_total = int(state["step"]), int(state["skipped_total"])


class RNGState:
    """This process's torch (and CUDA), numpy and Python RNG states as tensors and plain values.
    The CUDA state is optional: a checkpoint written on a machine without CUDA has none, and a run
    on GPUs resumes from it with its CUDA generator as seeded (PerRank leaves out what is absent)."""

    optional = ("cuda",)

    @staticmethod
    def has_cuda() -> bool:
        return torch.cuda.is_available()

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, py_state, gauss_next = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss_next": gauss_next},
        }
        if self.has_cuda():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
        if "cuda" in state and self.has_cuda():
            torch.cuda.set_rng_state(state["cuda"])


class PerRank:
    """`inner`'s state under this rank's key. `on_resize` says what a rank reads from a checkpoint
    of another world size: "rank0" (rank 0's state: the data position) or "skip" (nothing, the
    state stays as it is: the RNG). The manager calls `resume_from(world_size)` before loading."""

    def __init__(self, inner, rank: int, on_resize: str):
        if on_resize not in ("rank0", "skip"):
            raise ValueError(f"on_resize {on_resize!r} is not one of rank0, skip")
        self.inner, self.rank, self.on_resize = inner, rank, on_resize
        self.read_rank: int | None = rank
        self.absent: set[str] = set()  # the inner's optional keys the checkpoint being loaded lacks

    def expect(self, name: str, saved: set[str]) -> None:
        """Before a load: note which of the inner's optional keys the checkpoint lacks (`saved`: its
        flattened keys, `name`: this part's key in the state dict), so that the load asks for
        nothing the checkpoint does not hold (DCP fails on any key it cannot find)."""
        self.absent = set()
        if self.read_rank is None:  # nothing is read for this rank
            return
        prefix = f"{name}.{rank_key(self.read_rank)}."
        self.absent = {k for k in getattr(self.inner, "optional", ())
                       if not any(s == prefix + k or s.startswith(prefix + k + ".") for s in saved)}

    def resume_from(self, saved_world_size: int, world_size: int) -> None:
        if saved_world_size == world_size:
            self.read_rank = self.rank
        else:
            self.read_rank = 0 if self.on_resize == "rank0" else None

    @property
    def skipped(self) -> bool:
        """True when the checkpoint being loaded has nothing for this rank to read."""
        return self.read_rank is None

    def state_dict(self) -> dict:
        rank = self.rank if self.read_rank is None else self.read_rank
        inner = self.inner.state_dict()
        return {rank_key(rank): {k: v for k, v in inner.items() if k not in self.absent}}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state[rank_key(self.read_rank)])


def training_state(engine: Engine, units: dict[str, Unit], train: TrainState, data=None) -> dict:
    """The dict a checkpoint saves and loads: every unit, the train state, this rank's RNG and,
    when given, this rank's data stream (anything with state_dict / load_state_dict)."""
    reserved = {"train", "rng", "data"} & set(units)
    if reserved:
        raise ValueError(f"unit names {sorted(reserved)} clash with checkpoint entries train, rng, data; rename the unit")
    state: dict = {name: UnitState(engine, u) for name, u in units.items()}
    state["train"] = train
    state["rng"] = PerRank(RNGState(), engine.env.rank, on_resize="skip")
    if data is not None:
        state["data"] = PerRank(data, engine.env.rank, on_resize="rank0")
    return state
