"""Training streams: webdataset shards -> batches for one rank, with an exact, resumable position.

Each rank builds its own `DataStream` from (cfg, batch_size, rank, world_size, seed); no process
group is needed. Per DataLoader worker the pipeline is

    shard urls -> tar samples (raw bytes) -> shuffle buffer -> skip k (resume) -> decode + augment -> batch

with everything random seeded by (seed, rank, worker, epoch) and, per sample, its position in the
worker's stream, so the batches are the same run to run (for the same seed, rank, world size and
num_workers) and after a resume.

Modes (data.mode):
- resampled (default): every worker draws shards with replacement; an epoch is a fixed number of
  batches per rank (`epoch_steps`), split over the workers (webdataset's with_epoch would count
  per worker, so W workers would give W times the batches).
- epoch: every sample exactly once per epoch over ranks x workers. Shard i always goes to rank
  i % world_size and, within the rank, to worker (i // world_size) % workers (webdataset's own
  node-then-worker split); only the order within a worker changes per epoch. A fixed assignment
  lets the even-split check run once from the manifest before training: ranks that get different
  numbers of batches leave the others waiting in a collective forever.

Position: batches carry (worker, raw position) in a `_meta` field that the main process strips; the
main process knows which worker produced each batch, so a resume re-creates the epoch's pipelines,
skips each worker to its raw position before decoding, and rotates the worker ids so the
DataLoader's round-robin continues with the worker that was next.
"""
from __future__ import annotations

import functools
import math
import multiprocessing
import random
import warnings
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import CorruptCount, CorruptDataError, DecodeSpec, check_corrupt_fraction, decode_samples
from .shards import resolve_shards, tar_samples
from .synthetic import ensure_synthetic
from .transforms import to_float

__all__ = ["CorruptDataError", "DataStream", "build_stream", "epoch_layout"]  # CorruptDataError: from decode.py


def _seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integers (numpy's SeedSequence; Python's hash() of str is
    randomised per process and could not be used)."""
    a, b = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return int(a) << 32 | int(b)


# ----------------------------------------------------------------------------------------------
# Layout checks


def epoch_layout(counts: list[int], *, batch_size: int, world_size: int, workers: int) -> list[list[list[int]]]:
    """Shard indices per [rank][worker] for data.mode=epoch, after checking that every rank gets the
    same number of samples and batches. `counts` are the per-shard sample counts from the manifest."""
    n, slots = len(counts), world_size * workers
    fix = (f"Reshard so the shard count is a multiple of {slots} with equal-sized shards "
           f"(`taming-dist shard SRC OUT --max-count K`), change data.num_workers, or use data.mode=resampled "
           f"(a fixed number of steps per epoch, the default)")
    why = ("ranks with fewer batches finish the epoch first and the others then wait forever in the next "
           "collective (gradient all-reduce)")
    if n % slots:
        raise ValueError(
            f"data.mode=epoch: {n} shards do not split evenly over {world_size} ranks x {workers} workers "
            f"({slots} readers); {why}. {fix}"
        )
    layout = [[[i for i in range(n) if i % world_size == r and (i // world_size) % workers == w]
               for w in range(workers)] for r in range(world_size)]
    samples = [sum(counts[i] for ws in rank for i in ws) for rank in layout]
    batches = [sum(math.ceil(sum(counts[i] for i in ws) / batch_size) for ws in rank) for rank in layout]
    if len(set(samples)) > 1 or len(set(batches)) > 1:
        raise ValueError(
            f"data.mode=epoch: the ranks would get different numbers of samples {samples} and batches "
            f"{batches} (batch size {batch_size}, {workers} workers per rank); {why}. {fix}"
        )
    return layout


def _worker_quota(steps: int, workers: int) -> list[int]:
    """Batches each worker yields so that the DataLoader's round-robin gives `steps` in all."""
    return [len(range(w, steps, workers)) for w in range(workers)]


def _round_robin(k: int, caps: list[int]) -> tuple[list[int], int]:
    """Batches taken from each worker after `k` batches of the DataLoader's in-order round-robin
    (an exhausted worker is passed over), and the worker whose turn is next."""
    done, w, last = [0] * len(caps), 0, -1
    while sum(done) < min(k, sum(caps)):
        if done[w] < caps[w]:
            done[w] += 1
            last = w
        w = (w + 1) % len(caps)
    return done, (last + 1) % len(caps)


# ----------------------------------------------------------------------------------------------
# Worker side


@dataclass
class _Plan:
    """Everything a DataLoader worker needs to produce its batches of one epoch (picklable)."""

    kind: str  # images | codes
    urls: list[str]
    mode: str
    worker_shards: Optional[list[list[int]]]  # epoch mode: shard indices per worker of this rank
    size: int
    random_crop: bool
    hflip: bool
    shuffle_buffer: int
    batch_size: int
    seed: int
    rank: int
    workers: int
    max_corrupt_fraction: float
    epoch: int = 0
    skip: tuple[int, ...] = ()  # raw samples each worker skips (resume)
    quota: Optional[tuple[int, ...]] = None  # resampled: batches each worker still yields
    rotation: int = 0  # DataLoader worker i plays worker (i + rotation) % workers
    text: Optional[dict] = None  # codes with text features: the manifest's `text` (max_length, width, dtype)
    code_len: Optional[int] = None  # codes: values per sample (the manifest's code_shape), checked per sample


class _Counter(CorruptCount):
    """A worker's corrupt count (data/decode.py) over its stream; `raw_end` is one past the last raw
    position decoded (positions after the resume skip are numbered consecutively)."""

    def __init__(self, plan: _Plan, worker: int):
        super().__init__(plan.max_corrupt_fraction, source=f"data worker {worker}'s shards")
        self.skip = plan.skip[worker]

    @property
    def raw_end(self) -> int:
        return self.skip + self.seen


def _positions(src, skip: int):
    """Number the raw samples (after the shuffle buffer, so a resume reproduces the order) and drop
    the first `skip` before anything is decoded."""
    for pos, sample in enumerate(src):
        if pos >= skip:
            sample["__pos__"] = pos
            yield sample


def _decode(src, plan: _Plan, counter: _Counter, base: int):
    spec = DecodeSpec(kind=plan.kind, size=plan.size, random_crop=plan.random_crop, hflip=plan.hflip,
                      text=plan.text, code_len=plan.code_len)

    def rng(sample: dict) -> random.Random:
        # Augmentation randomness from the sample's position: independent of what was skipped.
        return random.Random(base << 32 | sample["__pos__"])

    for sample, label, data in decode_samples(src, spec, counter, rng):
        yield {"key": sample.get("__key__", "?"), "data": data, "label": label, "pos": sample["__pos__"],
               "corrupt": counter.corrupt}


def _text_tensor(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored text features -> a tensor of the same width in bytes (bf16 is stored as uint16 bits)."""
    if dtype == "bf16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _batches(src, plan: _Plan, worker: int, counter: _Counter):
    quota = None if plan.quota is None else plan.quota[worker]
    if quota == 0:
        return
    field = "codes" if plan.kind == "codes" else "image"

    def stack(buf) -> dict:
        if plan.text is None:
            return {field: torch.from_numpy(np.stack([s["data"] for s in buf]))}
        return {field: torch.from_numpy(np.stack([s["data"][0] for s in buf])),
                "context": _text_tensor(np.stack([s["data"][1] for s in buf]), plan.text["dtype"]),
                "context_len": torch.tensor([s["data"][2] for s in buf], dtype=torch.int64)}

    def collate(buf, end: bool):
        # A batch goes out when the next good sample arrives (or the stream ends, `end`), so that
        # unreadable samples after its last one are already counted; its position is just past its
        # last sample, with the counts as of then, so a resume neither loses nor re-counts anything.
        last = buf[-1]
        raw_end, corrupt = (counter.raw_end, counter.corrupt) if end else (last["pos"] + 1, last["corrupt"])
        return {
            **stack(buf),
            "label": torch.tensor([s["label"] for s in buf], dtype=torch.int64),
            "key": [s["key"] for s in buf],
            "_meta": torch.tensor([worker, raw_end, raw_end - plan.skip[worker], corrupt, counter.shard_errors],
                                  dtype=torch.int64),
            "_error": counter.last_error,
        }

    buf, n = [], 0
    for sample in src:
        if len(buf) == plan.batch_size:
            yield collate(buf, end=False)
            buf, n = [], n + 1
            if quota is not None and n >= quota:
                return
        buf.append(sample)
    if buf:  # the stream ended (epoch mode): the last batch, partial if need be (exactly-once needs it)
        yield collate(buf, end=True)


def _worker_pipeline(plan: _Plan, worker: int) -> wds.DataPipeline:
    base = _seed(plan.seed, plan.rank, worker, plan.epoch)
    counter = _Counter(plan, worker)
    # The source is a generator function: DataPipeline would splice a plain list into its stages.
    if plan.mode == "epoch":
        urls = [plan.urls[i] for i in plan.worker_shards[worker]]
        random.Random(base).shuffle(urls)

        def source():
            for u in urls:
                yield {"url": u}
    else:
        shard_rng = random.Random(base)

        def source():
            while True:
                yield {"url": shard_rng.choice(plan.urls)}

    stages = [source, functools.partial(tar_samples, handler=counter)]
    if plan.shuffle_buffer > 1:
        stages.append(wds.shuffle(plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=random.Random(base + 1)))
    stages += [
        functools.partial(_positions, skip=plan.skip[worker]),
        functools.partial(_decode, plan=plan, counter=counter, base=base),
        functools.partial(_batches, plan=plan, worker=worker, counter=counter),
    ]
    return wds.DataPipeline(*stages)


class _EpochDataset(IterableDataset):
    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def __iter__(self):
        info = get_worker_info()
        physical = 0 if info is None else info.id
        return iter(_worker_pipeline(self.plan, (physical + self.plan.rotation) % self.plan.workers))


# ----------------------------------------------------------------------------------------------
# Main-process side


class DataStream:
    """Batches for one rank, epoch after epoch: iterate it (endlessly) for dicts
    {"image": float32 (B, 3, S, S) in [-1, 1] | "codes": int64 (B, N), "label": int64 (B,), "key": list[str]}.

    `iter()` always continues from the current position (`epoch`, `batches_in_epoch`), which
    `load_state_dict` sets. `steps_per_epoch` is the number of batches per epoch on this rank.
    """

    def __init__(self, plan: _Plan, *, num_workers: int, world_size: int, steps_per_epoch: int,
                 worker_batches: list[int], manifest: Optional[dict]):
        self._plan = plan
        self._caps = worker_batches  # planned batches per worker and epoch
        self.num_workers = num_workers
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch
        self.manifest = manifest
        self.class_names: list[str] = list((manifest or {}).get("class_names", []))
        self._pin = torch.cuda.is_available()
        self._totals = {"samples": 0, "corrupt": 0, "shard_errors": 0, "padded_batches": 0}
        self._live: dict[int, tuple[int, int, int]] = {}  # worker -> (seen, corrupt, shard errors) of the live loader
        self._last_batch: Optional[dict] = None
        self._last_error = ""
        self._start_epoch(0)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- position -------------------------------------------------------------------------------

    def _start_epoch(self, epoch: int) -> None:
        w = self._plan.workers
        self.epoch, self.batches_in_epoch = epoch, 0
        self._pos, self._done, self._next_worker = [0] * w, [0] * w, 0

    @property
    def _layout(self) -> dict:
        p = self._plan
        return {"kind": p.kind, "mode": p.mode, "world_size": self.world_size, "workers": p.workers,
                "batch_size": p.batch_size, "seed": p.seed, "rank": p.rank, "shards": len(p.urls),
                "steps_per_epoch": self.steps_per_epoch}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "positions": list(self._pos),
                "worker_batches": list(self._done), "next_worker": self._next_worker, "stats": self.stats(),
                "layout": self._layout}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by `state_dict`. Exact when saved by this rank with the same
        layout (ranks, workers, batch size, seed). Another rank's state (same layout) is replayed from
        its batch count through the round-robin order: exact as long as no sample was corrupt. A
        different layout continues the same epoch after the same number of batches, with a warning."""
        self._fold_live()
        stats = state.get("stats", {})
        self._totals = {k: int(stats.get(k, 0)) for k in self._totals}
        self._start_epoch(int(state["epoch"]))
        k = min(int(state["batches_in_epoch"]), self.steps_per_epoch)
        saved = dict(state.get("layout", {}))
        if saved == self._layout:
            self._pos, self._done = list(state["positions"]), list(state["worker_batches"])
            self._next_worker = int(state["next_worker"])
        else:
            if {**saved, "rank": self._plan.rank} != self._layout and self._plan.rank == 0:  # said once
                warnings.warn(f"data position saved with layout {saved} is resumed with {self._layout}: the epoch "
                              f"continues after {k} batches, but not with exactly the same samples")
            self._done, self._next_worker = _round_robin(k, self._caps)
            self._pos = [b * self._plan.batch_size for b in self._done]
        self.batches_in_epoch = k

    # -- statistics -----------------------------------------------------------------------------

    def _fold_live(self) -> None:
        for seen, corrupt, shard_errors in self._live.values():
            self._totals["samples"] += seen
            self._totals["corrupt"] += corrupt
            self._totals["shard_errors"] += shard_errors
        self._live = {}

    def stats(self) -> dict:
        """For the logs, summed over this rank's workers: samples (read, good or not), corrupt (samples
        skipped: bad bytes, missing fields), shard_errors (truncated or missing shards),
        corrupt_fraction, padded_batches (epoch mode, see `_epoch_batches`), epoch, batches_in_epoch."""
        live = [sum(v[i] for v in self._live.values()) for i in range(3)]
        samples = self._totals["samples"] + live[0]
        corrupt = self._totals["corrupt"] + live[1]
        shard_errors = self._totals["shard_errors"] + live[2]
        return {"samples": samples, "corrupt": corrupt, "shard_errors": shard_errors,
                "corrupt_fraction": (corrupt + shard_errors) / max(1, samples + shard_errors),
                "padded_batches": self._totals["padded_batches"], "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch}

    @property
    def corrupt_count(self) -> int:
        """Samples skipped as unreadable plus shard-level read errors, over all workers so far."""
        s = self.stats()
        return s["corrupt"] + s["shard_errors"]

    # -- iteration ------------------------------------------------------------------------------

    def _loader(self, plan: _Plan) -> DataLoader:
        # Workers come from a fork server, not fork(): a training process runs other threads (gloo,
        # the logger, tqdm), and a fork copies any lock one of them holds at that moment into a child
        # that then hangs on it (docs/platform-notes.md, "Processes"). The server imports this module
        # once; each epoch's workers fork from it.
        ctx = None
        if self.num_workers:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
        return DataLoader(_EpochDataset(plan), batch_size=None, num_workers=self.num_workers,
                          pin_memory=self._pin, persistent_workers=False, multiprocessing_context=ctx)

    def _epoch_plan(self, fresh: bool = False) -> _Plan:
        p = self._plan
        if fresh:
            return replace(p, epoch=self.epoch, skip=(0,) * p.workers, rotation=0,
                           quota=None if p.mode == "epoch" else tuple(self._caps))
        quota = None if p.mode == "epoch" else tuple(c - d for c, d in zip(self._caps, self._done))
        return replace(p, epoch=self.epoch, skip=tuple(self._pos), quota=quota, rotation=self._next_worker)

    @staticmethod
    def _convert(raw: dict) -> dict:
        """Strip the worker's bookkeeping; uint8 images -> float in [-1, 1], codes -> int64."""
        batch = {k: v for k, v in raw.items() if k not in ("_meta", "_error")}
        if "image" in batch:
            batch["image"] = to_float(batch["image"])
        if "codes" in batch:
            batch["codes"] = batch["codes"].to(torch.int64)
        if "context" in batch:  # text features, fp16 / bf16 / fp32 as stored
            batch["context"] = batch["context"].float()
        return batch

    def _receive(self, raw: dict) -> dict:
        worker, raw_end, seen, corrupt, shard_errors = raw["_meta"].tolist()
        self._last_error = raw["_error"] or self._last_error
        self._pos[worker] = raw_end
        self._done[worker] += 1
        self._next_worker = (worker + 1) % self._plan.workers
        self._live[worker] = (seen, corrupt, shard_errors)
        self.batches_in_epoch += 1
        s = self.stats()
        check_corrupt_fraction(s["corrupt"] + s["shard_errors"], s["samples"] + s["shard_errors"],
                               self._plan.max_corrupt_fraction, self._last_error, source=f"rank {self._plan.rank}")
        return self._convert(raw)

    def _epoch_batches(self) -> Iterator[dict]:
        self._fold_live()
        if self.batches_in_epoch < self.steps_per_epoch:
            for raw in self._loader(self._epoch_plan()):
                self._last_batch = self._receive(raw)
                yield self._last_batch
        # Epoch mode: corrupt samples can leave this rank a batch short of the plan, and a short rank
        # would hang the others' collectives; repeat a batch so every rank takes the planned steps.
        while self.batches_in_epoch < self.steps_per_epoch:
            if self._last_batch is None:  # resumed right at the shortfall: take the epoch's first batch
                self._last_batch = self._convert(next(iter(self._loader(self._epoch_plan(fresh=True)))))
            self.batches_in_epoch += 1
            self._totals["padded_batches"] += 1
            yield self._last_batch
        self._fold_live()
        self._start_epoch(self.epoch + 1)

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield from self._epoch_batches()


def build_stream(cfg, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch_steps: Optional[int] = None) -> DataStream:
    """The batches of `rank` out of `world_size` for a DataConfig.

    `epoch_steps`: batches per epoch per rank in data.mode=resampled (default: one pass over the
    data, total samples / (world_size x batch_size)); epoch mode derives it from the manifest.
    """
    cfg.validate()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    if seed < 0:
        raise ValueError(f"the data seed must be >= 0 (train.seed), got {seed}")
    folder = ensure_synthetic(cfg) if cfg.kind == "synthetic" else cfg.path
    urls, manifest = resolve_shards(folder)
    workers = max(1, cfg.num_workers)
    worker_shards = None
    if cfg.mode == "epoch":
        if manifest is None:
            raise ValueError(f"data.mode=epoch needs a shard folder with manifest.json (to check the split before "
                             f"training), got the pattern {folder!r}; use the folder, or data.mode=resampled")
        if epoch_steps is not None:
            raise ValueError("epoch_steps applies to data.mode=resampled; data.mode=epoch takes it from the manifest")
        counts = [s["count"] for s in manifest["shards"]]
        worker_shards = epoch_layout(counts, batch_size=batch_size, world_size=world_size, workers=workers)[rank]
        caps = [math.ceil(sum(counts[i] for i in ws) / batch_size) for ws in worker_shards]
    else:
        if epoch_steps is None:
            if manifest is None:
                raise ValueError(f"data.mode=resampled over the pattern {folder!r} has no manifest to size an "
                                 f"epoch from; pass epoch_steps")
            epoch_steps = max(1, manifest["total"] // (world_size * batch_size))
        if epoch_steps < 1:
            raise ValueError(f"epoch_steps must be >= 1, got {epoch_steps}")
        caps = _worker_quota(epoch_steps, workers)
    plan = _Plan(
        kind="codes" if cfg.kind == "codes" else "images", urls=urls, mode=cfg.mode, worker_shards=worker_shards,
        size=cfg.size, random_crop=cfg.random_crop, hflip=cfg.hflip, shuffle_buffer=cfg.shuffle_buffer,
        batch_size=batch_size, seed=seed, rank=rank, workers=workers,
        max_corrupt_fraction=cfg.max_corrupt_fraction, skip=(0,) * workers,
        text=(manifest or {}).get("text") if cfg.kind == "codes" else None,
        code_len=int(np.prod(manifest["code_shape"])) if cfg.kind == "codes" and (manifest or {}).get("code_shape")
        else None,
    )
    return DataStream(plan, num_workers=cfg.num_workers, world_size=world_size, steps_per_epoch=sum(caps),
                      worker_batches=caps, manifest=manifest)
