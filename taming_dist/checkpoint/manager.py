"""Atomic training checkpoints: one DCP save of Stateful parts, a manifest, a `latest` pointer.

Layout of one checkpoint (`checkpoints/step_000500/`), format version 3:
  state/          one torch.distributed.checkpoint save of the dict of Stateful parts that
                  `checkpoint.state.training_state` builds: each unit (model, optimizer, LR schedule,
                  loss scaler, EMA), the train state (step, counters), each rank's RNG and data
                  position; tensors and plain values only, each under a key DCP lists
  deepspeed/      DeepSpeed only: its native model + optimizer files, one tag per unit (the
                  DCP state then holds the rest of each unit)
  manifest.json   format version, step, engine, ZeRO stage, world size, units; written last
It is written as `step_000500.tmp/` and published (fsync, rename, fsync of the folder:
`taming_dist.atomic.publish`) when every rank has finished; `latest` (a text file naming the folder)
is replaced last, so a crash or kill -9 at any point leaves the previous checkpoint as `latest`.
Whether a checkpoint can be resumed here is the engine's call (`Engine.check_resumable`).

With `async_save` (train.async_checkpoint) the DCP state is staged to host memory on the training
thread and written by DCP's background thread (`dcp.async_save`, over a gloo process group of its
own so its collectives never interleave with training's); the manifest, the rename and `latest`
follow on rank 0 once DCP's write finished on every rank (DCP's coordinator collects every rank's
write results before it completes). The next save, and `close`, wait for the previous one.

Version 2 (the run state as torch.save'd bytes: `run.counters`, `run.rank<R>`, `<unit>.schedule`)
is still resumed (`_load_v2`); version 1 is refused with the way to keep its weights.
"""
from __future__ import annotations

import io
import json
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from taming_dist.atomic import publish, write_atomic
from taming_dist.checkpoint.state import PerRank, TrainState, UnitState, rank_key
from taming_dist.engines.base import Engine, Unit

FORMAT = "taming_dist-checkpoint"
VERSION = 3
READS = (2, 3)  # format versions this code resumes
_SINGLE_PROCESS_WARNING = r".*assuming the intent is to (save|load) in a single process"


def read_manifest(path: Path) -> dict:
    """The manifest of a checkpoint folder; a clear error for folders of a format not read here."""
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.exists():
        if (path / "meta.pt").exists():
            raise ValueError(
                f"{path} is a taming_dist checkpoint of format version 1 (meta.pt + rank_*.pt files), written "
                f"before checkpoint format version 2; this version reads versions {READS} only. Its weights "
                f"are still readable: `taming-dist convert {path} OUT.safetensors`, then start a run from them "
                "with `init_from=OUT.safetensors`"
            )
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no manifest.json)")
    meta = json.loads(manifest.read_text())
    if meta.get("format") != FORMAT or meta.get("version") not in READS:
        raise ValueError(f"{manifest}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                         f"version of taming_dist reads {FORMAT!r} versions {', '.join(map(str, READS))}")
    return meta


def _units(state: dict) -> dict[str, Unit]:
    return {name: s.unit for name, s in state.items() if isinstance(s, UnitState)}


class CheckpointManager:
    def __init__(self, folder: Path, engine: Engine, keep_last: int = 3, async_save: bool = False):
        self.folder = Path(folder)
        self.engine = engine
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: Future | None = None
        self._group = None
        self._stager = None  # DCP's staging buffers, kept from one asynchronous save to the next
        self.last_write_s = 0.0  # seconds from the last save's call until it was complete on this rank
        if async_save:
            if not engine.supports_async_checkpoint:
                raise ValueError(f"train.async_checkpoint=true is not supported with engine.kind={engine.kind} (its "
                                 "model and optimizer files are written by the engine's own synchronous save); set "
                                 "train.async_checkpoint=false")
            if engine.env.is_distributed:
                import torch.distributed as dist

                # Collective on every rank, once: DCP's background collectives get a group of their own.
                self._group = dist.new_group(backend="gloo")
            self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-finish")
            if not engine.env.is_distributed:
                # DCP's background thread saves with no_dist=True and says so (UserWarning) outside
                # any `with` of ours; only that message, as single_process_dcp_quiet does in the
                # synchronous path.
                warnings.filterwarnings("ignore", category=UserWarning, message=_SINGLE_PROCESS_WARNING)

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.exists():
            return None
        path = self.folder / pointer.read_text().strip()
        if not (path / "manifest.json").exists() and not (path / "meta.pt").exists():
            raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint (no manifest.json)")
        return path

    def save(self, step: int, state: dict) -> Path:
        """Save `state` (checkpoint.state.training_state) as checkpoint `step`. Synchronous: returns
        when the checkpoint is complete and `latest` names it. Asynchronous: returns once the state
        is staged in host memory; `wait` (or the next save) returns when it is complete."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        t0 = time.perf_counter()
        eng = self.engine
        units = _units(state)
        final = self.folder / f"step_{step:06d}"
        tmp = self.folder / f"step_{step:06d}.tmp"
        if eng.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over by a crash during an earlier save
                shutil.rmtree(tmp)
            tmp.mkdir()
        eng.barrier()
        eng.save_native(str(tmp), units)
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "engine": eng.kind, **eng.manifest_fields(),
                    "world_size": eng.world_size, "units": list(units)}
        if self.async_save:
            with single_process_dcp_quiet():
                written = dcp.async_save(state, checkpoint_id=str(tmp / "state"), process_group=self._group,
                                         no_dist=not eng.env.is_distributed, async_stager=self._staging())
            self._pending = self._finisher.submit(self._finish_after, written, tmp, final, manifest, t0)
            return final
        with single_process_dcp_quiet():
            dcp.save(state, checkpoint_id=str(tmp / "state"))
        eng.barrier()
        if eng.is_main:
            self._publish(tmp, final, manifest)
        eng.barrier()
        self.last_write_s = time.perf_counter() - t0
        return final

    def _staging(self):
        """One DCP stager for all saves: it keeps a host copy of every tensor (pinned on CUDA) and
        refills it on the next save instead of allocating the checkpoint's size again; reusing it is
        safe because a save first waits for the previous write (which reads the copy)."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                        use_shared_memory=False, use_async_staging=False,
                                                        use_non_blocking_copy=False))
        return self._stager

    def _finish_after(self, written: Future, tmp: Path, final: Path, manifest: dict, t0: float) -> None:
        written.result()  # on rank 0: every rank's part is written, and DCP's .metadata
        if self.engine.is_main:
            self._publish(tmp, final, manifest)
        self.last_write_s = time.perf_counter() - t0

    def _publish(self, tmp: Path, final: Path, manifest: dict) -> None:
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        publish(tmp, final)  # fsyncs the folder's files (the manifest too), renames, fsyncs the parent
        write_atomic(self.folder / "latest", final.name)
        self._prune()

    def wait(self) -> None:
        """Block until the pending asynchronous save (if any) is complete on this rank; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the pending save on every rank (collective): then the checkpoint is published.
        Frees the staging buffers (a later save allocates them again)."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        self.engine.barrier()

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

    def load(self, path: Path, state: dict) -> dict:
        """Restore every part of `state` (checkpoint.state.training_state) from checkpoint `path`,
        at any world size the engine accepts (per-rank parts follow `PerRank.resume_from`).
        Returns the manifest."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        manifest = read_manifest(path)
        eng = self.engine
        eng.check_resumable(manifest, str(path))
        units = _units(state)
        if sorted(manifest["units"]) != sorted(units):
            raise ValueError(f"{path} holds units {manifest['units']} but this run has {list(units)}: "
                             "it is a checkpoint of the other stage")
        per_rank = [part for part in state.values() if isinstance(part, PerRank)]
        for part in per_rank:
            part.resume_from(manifest["world_size"], eng.world_size)
        try:
            eng.load_native(str(path), units)
            if manifest["version"] == 2:
                _load_v2(path, state, eng, same_world=manifest["world_size"] == eng.world_size)
            else:
                wanted = {k: v for k, v in state.items() if not (isinstance(v, PerRank) and v.skipped)}
                saved = set(dcp.FileSystemReader(str(path / "state")).read_metadata().state_dict_metadata)
                for name, part in wanted.items():
                    if isinstance(part, PerRank):
                        part.expect(name, saved)
                with single_process_dcp_quiet():
                    dcp.load(wanted, checkpoint_id=str(path / "state"))
        finally:
            for part in per_rank:  # the next save writes each rank's own state under its own key
                part.resume_from(eng.world_size, eng.world_size)
                part.absent = set()
        return manifest


class _V2UnitState(UnitState):
    """A unit of format 2: the LR schedule and scaler were one torch.save'd bytes item."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "schedule": b""}  # DCP replaces the placeholder with the stored bytes

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({**state, "schedule": _from_bytes(state["schedule"])})


def _from_bytes(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=True)


def _load_v2(path: Path, state: dict, eng: Engine, same_world: bool) -> None:
    """Format 2: units as in format 3 but for the schedule; `run` = {step, counters (bytes),
    rank<R> (bytes of {"rng", "data"})}. Mapped onto the format-3 parts, with the same rules."""
    import torch.distributed.checkpoint as dcp

    read = eng.env.rank if same_world else 0  # each rank's own blob, or rank 0's (only its data position is used)
    run = {"step": 0, "counters": b"", rank_key(read): b""}
    old = {name: _V2UnitState(s.engine, s.unit) for name, s in state.items() if isinstance(s, UnitState)}
    with single_process_dcp_quiet():
        dcp.load({**old, "run": run}, checkpoint_id=str(path / "state"))
    counters, extra = _from_bytes(run["counters"]), _from_bytes(run[rank_key(read)])
    train = state.get("train")
    if isinstance(train, TrainState):
        train.load_state_dict({"step": run["step"], "skipped_total": counters.get("skipped_total", 0)})
    data, rng = state.get("data"), state.get("rng")
    if isinstance(data, PerRank) and not data.skipped and "data" in extra:
        data.inner.load_state_dict(extra["data"])
    if isinstance(rng, PerRank) and not rng.skipped:
        _set_v2_rng(extra["rng"])


def _set_v2_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def single_process_dcp_quiet():
    """A one-process run (engine.kind=single, no process group) saves and loads DCP without
    torch.distributed, which is what we intend; DCP says so in a UserWarning each time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=_SINGLE_PROCESS_WARNING)
        yield
