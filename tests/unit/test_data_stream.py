"""Training streams: batches, determinism, resampled epoch lengths, the epoch-mode split check,
exact resume, and corrupt-input handling. Ranks are simulated in one process (rank=0/1,
world_size=2); num_workers=2 runs real DataLoader worker processes."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from taming_dist.config import DataConfig
from taming_dist.data.shards import write_manifest, write_tar
from taming_dist.data.stream import CorruptDataError, build_stream, epoch_layout
from taming_dist.data.synthetic import CLASS_NAMES, generate


def make_shards(folder, counts, size=16, bad=(), no_cls=()):
    """Shards of synthetic PNGs with `counts` samples each; keys 000000... in order. `bad`: keys
    whose image bytes are garbage; `no_cls`: keys written without a label."""
    os.makedirs(folder, exist_ok=True)
    images, labels = generate(sum(counts), size, 12)
    shards, i = [], 0
    for s, n in enumerate(counts):
        samples = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            key = f"{i:06d}"
            sample = {"__key__": key, "png": b"\x89PNG garbage" if key in bad else buf.getvalue()}
            if key not in no_cls:
                sample["cls"] = str(labels[i])
            samples.append(sample)
            i += 1
        name = f"shard-{s:06d}.tar"
        write_tar(os.path.join(folder, name), samples)
        shards.append({"name": name, "count": n})
    write_manifest(str(folder), shards, list(CLASS_NAMES), np.bincount(labels, minlength=12).tolist())
    return str(folder)


def cfg_for(folder, **kw):
    base = dict(kind="shards", path=folder, size=16, shuffle_buffer=8, num_workers=0)
    return DataConfig(**{**base, **kw})


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def same(a, b):
    return [x["key"] for x in a] == [x["key"] for x in b] and all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) for x, y in zip(a, b))


def test_synthetic_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("TAMING_DIST_CACHE", str(tmp_path))
    cfg = DataConfig(kind="synthetic", size=16, synthetic_samples=96, synthetic_classes=6, shuffle_buffer=16)
    stream = build_stream(cfg, batch_size=8, seed=0)
    assert stream.steps_per_epoch == 12 and stream.class_names == list(CLASS_NAMES[:6])
    batch = take(stream, 1)[0]
    x, y = batch["image"], batch["label"]
    assert x.dtype == torch.float32 and x.shape == (8, 3, 16, 16)
    assert -1.0 <= x.min() < 0 < x.max() <= 1.0
    assert y.dtype == torch.int64 and y.shape == (8,) and 0 <= y.min() and y.max() < 6
    assert len(batch["key"]) == 8 and "_meta" not in batch


def test_deterministic_run_to_run_with_workers(tmp_path):
    folder = make_shards(tmp_path / "d", [10] * 4)
    cfg = cfg_for(folder, num_workers=2, random_crop=True, hflip=True, size=12)
    a = take(build_stream(cfg, batch_size=3, seed=1, epoch_steps=4), 6)
    b = take(build_stream(cfg, batch_size=3, seed=1, epoch_steps=4), 6)
    assert same(a, b)
    assert not same(a, take(build_stream(cfg, batch_size=3, seed=2, epoch_steps=4), 6))
    other_rank = take(build_stream(cfg, batch_size=3, seed=1, rank=1, world_size=2, epoch_steps=4), 6)
    assert [x["key"] for x in a] != [x["key"] for x in other_rank]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [2, 3])
def test_resampled_epoch_length_is_per_rank(tmp_path, workers):
    """5 batches per epoch on each rank whatever the worker count (webdataset's with_epoch alone would
    count per worker)."""
    folder = make_shards(tmp_path / "d", [6] * 4)
    for rank in (0, 1):
        stream = build_stream(cfg_for(folder, num_workers=workers), batch_size=2, rank=rank, world_size=2,
                              seed=0, epoch_steps=5)
        assert stream.steps_per_epoch == 5
        seen = []
        for i, _ in zip(range(11), stream):
            seen.append((stream.epoch, stream.batches_in_epoch))
        assert seen[:5] == [(0, k) for k in range(1, 6)]
        assert seen[5:10] == [(1, k) for k in range(1, 6)]
        assert seen[10] == (2, 1)


def test_epoch_mode_refuses_uneven_splits(tmp_path):
    with pytest.raises(ValueError) as e:
        epoch_layout([10] * 5, batch_size=2, world_size=2, workers=1)
    msg = str(e.value)
    assert "5 shards do not split evenly over 2 ranks x 1 workers" in msg
    assert "wait forever in the next collective" in msg
    assert "taming-dist shard" in msg and "--max-count" in msg and "data.mode=resampled" in msg
    with pytest.raises(ValueError, match=r"different numbers of samples \[8, 7\]"):
        epoch_layout([4, 4, 4, 3], batch_size=2, world_size=2, workers=1)
    # Equal samples per rank, but rank 0's workers hold 3 + 1 samples (2 + 1 batches of 2) and rank
    # 1's hold 2 + 2 (1 + 1 batches): the batch counts still differ.
    with pytest.raises(ValueError, match=r"batches \[3, 2\]"):
        epoch_layout([3, 2, 1, 2], batch_size=2, world_size=2, workers=2)
    assert epoch_layout([4] * 8, batch_size=3, world_size=2, workers=2) == \
        [[[0, 4], [2, 6]], [[1, 5], [3, 7]]]
    folder = make_shards(tmp_path / "d", [4] * 6)
    with pytest.raises(ValueError, match="6 shards do not split evenly over 2 ranks x 2 workers"):
        build_stream(cfg_for(folder, mode="epoch", num_workers=2), batch_size=2, rank=0, world_size=2)


def test_epoch_mode_visits_every_sample_once_per_epoch(tmp_path):
    folder = make_shards(tmp_path / "d", [5, 4, 5, 4])
    stream = build_stream(cfg_for(folder, mode="epoch"), batch_size=4, seed=0)
    assert stream.steps_per_epoch == 5  # (5 + 4 + 5 + 4) / 4, last batch partial
    batches = take(stream, 10)
    epoch0 = [k for b in batches[:5] for k in b["key"]]
    epoch1 = [k for b in batches[5:] for k in b["key"]]
    assert sorted(epoch0) == sorted(epoch1) == [f"{i:06d}" for i in range(18)]
    assert epoch0 != epoch1  # reshuffled per epoch
    assert [len(b["key"]) for b in batches[:5]] == [4, 4, 4, 4, 2]


@pytest.mark.parametrize("mode,workers", [("resampled", 0), ("resampled", 2), ("epoch", 2)])
def test_resume_continues_exactly(tmp_path, mode, workers):
    # Epoch mode with 2 workers of unequal length (20 and 16 samples): 7 + 6 batches of 3, so the
    # round-robin passes over the exhausted worker at the end of each epoch.
    folder = make_shards(tmp_path / "d", [5, 4, 5, 4, 5, 4, 5, 4])
    cfg = cfg_for(folder, mode=mode, num_workers=workers, random_crop=True, hflip=True, size=12)
    steps = None if mode == "epoch" else 5

    def stream():
        return build_stream(cfg, batch_size=3, seed=3, epoch_steps=steps)

    total = 17
    unbroken = take(stream(), total)
    breaks = [1, 4, 12, 13] if mode == "epoch" else [3, 5, 7]
    for k in breaks:
        first = stream()
        head = take(first, k)
        state = first.state_dict()
        resumed = stream()
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.batches_in_epoch) == (first.epoch, first.batches_in_epoch)
        tail = take(resumed, total - k)
        assert same(head + tail, unbroken), f"resume after {k} batches differs"


def test_state_dict_of_another_rank_replays_the_position(tmp_path):
    folder = make_shards(tmp_path / "d", [6] * 4)
    cfg = cfg_for(folder, num_workers=2)
    r0 = build_stream(cfg, batch_size=2, rank=0, world_size=2, seed=0, epoch_steps=6)
    take(r0, 3)
    r1 = build_stream(cfg, batch_size=2, rank=1, world_size=2, seed=0, epoch_steps=6)
    unbroken = take(r1, 5)
    r1b = build_stream(cfg, batch_size=2, rank=1, world_size=2, seed=0, epoch_steps=6)
    r1b.load_state_dict(r0.state_dict())
    assert same(take(r1b, 2), unbroken[3:])


def _truncate_in_last_image(path):
    with tarfile.open(path) as tf:
        last = [m for m in tf.getmembers() if m.name.endswith(".png")][-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)


def test_corrupt_samples_are_skipped_and_counted_across_workers(tmp_path):
    bad, no_cls = {"000003", "000025"}, {"000012"}
    folder = make_shards(tmp_path / "d", [10] * 4, bad=bad, no_cls=no_cls)
    _truncate_in_last_image(os.path.join(folder, "shard-000003.tar"))  # cuts sample 000039 in half
    stream = build_stream(cfg_for(folder, mode="epoch", num_workers=2, max_corrupt_fraction=0.5),
                          batch_size=4, seed=0)
    keys = [k for b in take(stream, stream.steps_per_epoch) for k in b["key"]]
    expected = {f"{i:06d}" for i in range(40)} - bad - no_cls - {"000039"}
    assert sorted(keys) == sorted(expected)
    s = stream.stats()
    assert (s["corrupt"], s["shard_errors"], s["samples"]) == (4, 1, 40)
    assert stream.corrupt_count == 5
    assert stream.state_dict()["stats"]["corrupt"] == 4


def test_too_many_corrupt_samples_halt(tmp_path):
    bad = {f"{i:06d}" for i in range(0, 200, 3)}
    folder = make_shards(tmp_path / "d", [50] * 4, bad=bad)
    for workers in (0, 2):
        stream = build_stream(cfg_for(folder, mode="epoch", num_workers=workers), batch_size=4, seed=0)
        with pytest.raises(CorruptDataError, match="more than data.max_corrupt_fraction=0.01"):
            take(stream, stream.steps_per_epoch)
    # One bad sample at the very start does not halt a 1% tolerance: the fraction is judged after
    # CORRUPT_CHECK_MIN_SAMPLES samples.
    folder = make_shards(tmp_path / "one", [150], bad={"000000"})
    stream = build_stream(cfg_for(folder, mode="epoch", shuffle_buffer=0), batch_size=10, seed=0)
    assert sum(len(b["key"]) for b in take(stream, stream.steps_per_epoch)) == 149
    assert stream.corrupt_count == 1


def test_missing_shards_are_counted_and_all_missing_halts(tmp_path):
    folder = make_shards(tmp_path / "d", [20, 20])
    os.unlink(os.path.join(folder, "shard-000001.tar"))
    stream = build_stream(cfg_for(folder, max_corrupt_fraction=0.5), batch_size=4, seed=0, epoch_steps=20)
    take(stream, 20)
    assert stream.stats()["shard_errors"] > 0
    os.unlink(os.path.join(folder, "shard-000000.tar"))
    stream = build_stream(cfg_for(folder, max_corrupt_fraction=0.5), batch_size=4, seed=0, epoch_steps=20)
    with pytest.raises(CorruptDataError, match="FileNotFoundError"):
        take(stream, 1)  # rather than waiting forever for a sample


def test_epoch_mode_pads_a_rank_that_lost_a_batch(tmp_path):
    """5 samples, batch 4: 2 planned steps. One corrupt sample leaves 4, one batch: the stream repeats
    a batch so this rank still takes the 2 steps the other ranks take."""
    folder = make_shards(tmp_path / "d", [5], bad={"000002"})
    stream = build_stream(cfg_for(folder, mode="epoch", max_corrupt_fraction=0.5), batch_size=4, seed=0)
    assert stream.steps_per_epoch == 2
    batches = take(stream, 3)
    assert batches[1]["key"] == batches[0]["key"] and len(batches[0]["key"]) == 4
    assert stream.stats()["padded_batches"] == 1 and stream.epoch == 1
    resumed = build_stream(cfg_for(folder, mode="epoch", max_corrupt_fraction=0.5), batch_size=4, seed=0)
    resumed.load_state_dict({**stream.state_dict(), "epoch": 0, "batches_in_epoch": 1,
                             "positions": [5], "worker_batches": [1], "next_worker": 0})
    assert take(resumed, 1)[0]["key"] == batches[0]["key"]  # the padding after a resume at the shortfall
