"""Checkpoint format 3: Stateful parts whose entries DCP can see, asynchronous saves, and the
format-2 checkpoint kept as test data (tests/data/ckpt_v2). One process, small modules (fast)."""
import json
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from taming_dist.checkpoint.manager import CheckpointManager, single_process_dcp_quiet
from taming_dist.checkpoint.state import TrainState, training_state
from tests.unit.test_engine_single import FakeStream, _engine, _train, _unit

V2 = Path(__file__).resolve().parents[1] / "data" / "ckpt_v2"


def _plain_values(state_folder: Path) -> dict:
    """Every non-tensor item of a DCP save, loaded."""
    meta = dcp.FileSystemReader(str(state_folder)).read_metadata().state_dict_metadata
    values = {k: 0 for k, m in meta.items() if isinstance(m, BytesStorageMetadata)}
    with single_process_dcp_quiet():
        dcp.load(values, checkpoint_id=str(state_folder), no_dist=True)
    return values


def _saved(tmp_path, **kw):
    e = _engine()
    u = _unit(e, ema=0.9)
    _train(e, u, 1)
    data = FakeStream()
    data.position["batches"] = 7
    mgr = CheckpointManager(tmp_path / "ck", e, **kw)
    state = training_state(e, {"m": u}, TrainState(step=1, skipped_total=2), data=data)
    return e, u, mgr, state


def test_every_part_is_a_visible_entry_and_none_is_a_pickled_blob(tmp_path):
    _, _, mgr, state = _saved(tmp_path)
    path = mgr.save(1, state)
    meta = dcp.FileSystemReader(str(path / "state")).read_metadata().state_dict_metadata
    tensors = {k for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}
    assert {"m.model.0.weight", "m.ema.0.weight", "rng.rank00000.torch", "rng.rank00000.python.state",
            "rng.rank00000.numpy.keys"} <= tensors
    plain = _plain_values(path / "state")
    assert plain["train.step"] == 1 and plain["train.skipped_total"] == 2 and plain["data.rank00000.batches"] == 7
    assert plain["m.schedule.scheduler.last_epoch"] == 1
    assert not [k for k, v in plain.items() if isinstance(v, (bytes, bytearray))]
    # negative control: format 2 kept the run state and schedules as torch.save'd bytes
    blobs = [k for k, v in _plain_values(V2 / "step_000002" / "state").items() if isinstance(v, bytes)]
    assert "run.counters" in blobs and "transformer.schedule" in blobs


def test_version_2_checkpoint_still_converts():
    from taming_dist.checkpoint.convert import consolidate

    want = json.loads((V2 / "expected_rank0.json").read_text())
    for ema, sums in ((False, want["weight_sums"]), (True, want["ema_sums"])):
        got = consolidate(V2 / "step_000002", ema=ema)["transformer"]
        assert {f"transformer.{k}" for k in got} == set(sums)
        for k, v in got.items():
            assert float(v.double().sum()) == pytest.approx(sums[f"transformer.{k}"], rel=1e-9, abs=1e-12), k


def test_after_a_resharded_load_each_rank_saves_under_its_own_key_again(tmp_path):
    """A checkpoint of 2 ranks read by a rank 1 of another world size: it takes rank 0's data position
    and skips the RNG, and its next save writes its own position under its own key, not rank 0's."""
    e, u, mgr, state = _saved(tmp_path)
    path = mgr.save(1, state)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "world_size": 2}))
    data = FakeStream()
    again = training_state(e, {"m": u}, TrainState(), data=data)
    again["data"].rank = again["rng"].rank = 1  # as rank 1 of the new run would be
    rng_before = torch.get_rng_state()
    mgr.load(path, again)
    assert data.position["batches"] == 7 and torch.equal(torch.get_rng_state(), rng_before)
    assert list(again["data"].state_dict()) == list(again["rng"].state_dict()) == ["rank00001"]


def test_unknown_format_version_is_refused_naming_it(tmp_path):
    e, u, mgr, state = _saved(tmp_path)
    path = mgr.save(1, state)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 4}))
    with pytest.raises(ValueError, match="version 4; this version of taming_dist reads .* versions 2, 3"):
        mgr.load(path, state)


def test_unit_names_may_not_clash_with_the_other_entries():
    e = _engine()
    with pytest.raises(ValueError, match=r"unit names \['data'\] clash"):
        training_state(e, {"data": _unit(e)}, TrainState())


class BlockedWrites:
    """FileSystemWriter.write_data held until `release`, recording the thread each write ran in."""

    def __init__(self, monkeypatch):
        self.go, self.started, self.threads = threading.Event(), threading.Event(), []
        real = FileSystemWriter.write_data

        def write_data(writer, plan, planner):
            self.threads.append(threading.current_thread())
            self.started.set()
            assert self.go.wait(60), "write never released"
            return real(writer, plan, planner)

        monkeypatch.setattr(FileSystemWriter, "write_data", write_data)

    def release(self):
        self.go.set()


def test_async_save_writes_in_the_background_and_publishes_after(tmp_path, monkeypatch):
    writes = BlockedWrites(monkeypatch)
    e, u, mgr, state = _saved(tmp_path, async_save=True)
    saved = {n: p.detach().clone() for n, p in u.raw.named_parameters()}
    final = mgr.save(1, state)  # returns with the write still held
    assert writes.started.wait(30) and writes.threads[0] is not threading.main_thread()
    assert not final.exists() and not (tmp_path / "ck" / "latest").exists()  # nothing published yet
    _train(e, u, 2)  # training goes on and changes the weights in place: the staged copy must not see it
    writes.release()
    mgr.wait()
    assert (tmp_path / "ck" / "latest").read_text() == "step_000001" and (final / "manifest.json").exists()
    e2 = _engine()
    u2 = _unit(e2, ema=0.9)
    progress = TrainState()
    mgr.load(final, training_state(e2, {"m": u2}, progress, data=FakeStream()))
    assert (progress.step, progress.skipped_total) == (1, 2)
    for n, p in u2.raw.named_parameters():
        assert torch.equal(p, saved[n]), n


def test_sync_save_writes_on_the_calling_thread(tmp_path, monkeypatch):
    """Negative control of the test above: the same probe sees the write on the main thread."""
    writes = BlockedWrites(monkeypatch)
    writes.release()
    _, _, mgr, state = _saved(tmp_path)
    mgr.save(1, state)
    assert writes.threads == [threading.main_thread()]


def test_next_async_save_waits_for_the_previous(tmp_path, monkeypatch):
    writes = BlockedWrites(monkeypatch)
    _, _, mgr, state = _saved(tmp_path, async_save=True)
    mgr.save(1, state)
    assert writes.started.wait(30)
    second = threading.Thread(target=mgr.save, args=(2, state))
    second.start()
    second.join(1.0)
    assert second.is_alive() and len(writes.threads) == 1  # still waiting for save 1
    writes.release()
    second.join(60)
    mgr.wait()
    assert len(writes.threads) == 2 and (tmp_path / "ck" / "latest").read_text() == "step_000002"
    assert (tmp_path / "ck" / "step_000001" / "manifest.json").exists()


def test_async_checkpoint_is_refused_for_deepspeed_at_validation():
    from taming_dist.config import load_config

    load_config("vqgan-tiny", ["engine.kind=fsdp", "train.async_checkpoint=true"])  # accepted
    with pytest.raises(ValueError, match="train.async_checkpoint=true is not supported with engine.kind=deepspeed"):
        load_config("vqgan-tiny", ["engine.kind=deepspeed", "train.async_checkpoint=true"])
