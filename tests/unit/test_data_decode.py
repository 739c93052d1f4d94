"""One decode loop and one corrupt-sample count (data/decode.py) behind the training stream,
extract-codes and eval-recon: the same shard with corrupt samples gives the same skipped samples
and the same counts in all three, and past the max corrupt fraction of a shard all three stop with
an error naming the shard, the count and the setting."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from taming_dist.config import DataConfig
from taming_dist.data.codes import extract_codes
from taming_dist.data.decode import CorruptCount, CorruptDataError, DecodeSpec, read_shard
from taming_dist.data.shards import read_manifest, tar_samples, write_manifest, write_tar
from taming_dist.data.stream import build_stream
from taming_dist.data.transforms import find_image_field, load_image, to_float
from taming_dist.eval.recon import evaluate_reconstruction

SIZE = 16
SHARD = "shard-000000.tar"


def _png(i: int) -> bytes:
    arr = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_shard(folder, n, truncated=(), no_cls=(), no_image=()) -> str:
    """One shard of n random PNGs, keys 000000...; `truncated`: image bytes cut in half; `no_cls`,
    `no_image`: samples written without that field."""
    samples = []
    for i in range(n):
        s = {"__key__": f"{i:06d}"}
        if i not in no_image:
            data = _png(i)
            s["png"] = data[:len(data) // 2] if i in truncated else data
        if i not in no_cls:
            s["cls"] = str(i % 3)
        samples.append(s)
    os.makedirs(folder, exist_ok=True)
    write_tar(os.path.join(folder, SHARD), samples)
    write_manifest(str(folder), [{"name": SHARD, "count": n}], ["a", "b", "c"], [0, 0, 0])
    return str(folder)


def _cut_last_member(path):
    """Truncate the tar inside its last member: a shard-level read error."""
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + max(1, last.size // 2))


class StandInVQ(torch.nn.Module):
    """Codes = mean brightness of 4x4 patches in 64 levels; forward is the identity. Enough of a
    VQModel for extract-codes and eval-recon, and it records the images eval-recon gives it."""

    def __init__(self):
        super().__init__()
        self.quantize = torch.nn.Module()
        self.quantize.n_e = 64
        self.seen = []

    def encode_to_indices(self, x):
        m = F.avg_pool2d(x.mean(1, keepdim=True), 4)[:, 0]
        return ((m + 1) / 2 * 63).round().long()

    def forward(self, x):
        self.seen.append(x.clone())
        return x, torch.zeros(()), {"indices": self.encode_to_indices(x)}


def through_training(folder, **kw):
    cfg = DataConfig(kind="shards", path=folder, size=SIZE, mode="epoch", shuffle_buffer=0, hflip=False,
                     random_crop=False, num_workers=0, **{"max_corrupt_fraction": 0.5, **kw})
    stream = build_stream(cfg, batch_size=8, seed=0)  # 8: the corrupt samples cost no planned batch (no padding)
    it = iter(stream)
    batches = [next(it) for _ in range(stream.steps_per_epoch)]
    s = stream.stats()
    assert s["padded_batches"] == 0
    keys = [k for b in batches for k in b["key"]]
    return keys, torch.cat([b["image"] for b in batches]), (s["corrupt"], s["shard_errors"])


def through_extract_codes(folder, out):
    extract_codes(StandInVQ(), folder, out, batch_size=4, size=SIZE, n_embed=64)
    m = read_manifest(out)
    keys = [s["__key__"] for name in [sh["name"] for sh in m["shards"]]
            for s in tar_samples([{"url": os.path.join(out, name)}], lambda e: False)]
    return keys, (m["corrupt"], m["shard_errors"])


def through_eval_recon(folder, **kw):
    model = StandInVQ()
    report, _ = evaluate_reconstruction(model, folder, size=SIZE, batch_size=4, num_examples=0, **kw)
    images = torch.cat(model.seen) if model.seen else torch.zeros(0, 3, SIZE, SIZE)
    assert report["samples"] == images.shape[0]
    assert report["skipped_samples"] == report["corrupt_samples"] + report["shard_errors"]
    return images, (report["corrupt_samples"], report["shard_errors"])


def center_crops(folder, keys):
    raw = {s["__key__"]: s for s in tar_samples([{"url": os.path.join(folder, SHARD)}], lambda e: True)}
    return to_float(torch.from_numpy(np.stack([load_image(raw[k]["png"], SIZE) for k in keys])))


def test_training_extract_codes_and_eval_recon_skip_the_same_samples(tmp_path):
    n, truncated, no_cls, no_image = 16, {2}, {5}, {9}
    folder = image_shard(tmp_path / "img", n, truncated=truncated, no_cls=no_cls, no_image=no_image)
    _cut_last_member(os.path.join(folder, SHARD))  # sample 15 loses its label, and the tar its end
    bad = truncated | no_cls | no_image | {n - 1}
    good = [f"{i:06d}" for i in range(n) if i not in bad]
    # The corrupt samples are in the shard as samples (not lost at the tar level): the skips below
    # are the decode loop's doing.
    raw_keys = [s["__key__"] for s in tar_samples([{"url": os.path.join(folder, SHARD)}], lambda e: True)]
    assert raw_keys == [f"{i:06d}" for i in range(n)]

    train_keys, train_images, train_count = through_training(folder)
    code_keys, code_count = through_extract_codes(folder, str(tmp_path / "codes"))
    eval_images, eval_count = through_eval_recon(folder)

    assert train_keys == good and code_keys == good
    assert torch.equal(train_images, center_crops(folder, good))
    assert torch.equal(eval_images, center_crops(folder, good))  # eval-recon reports no keys: its images
    assert train_count == code_count == eval_count == (len(bad), 1)


def test_a_clean_shard_skips_nothing_in_all_three(tmp_path):
    """Negative control: the same shard without the damage loses nothing and counts nothing, so
    the skips above come from the corrupt samples."""
    n = 16
    folder = image_shard(tmp_path / "img", n)
    every = [f"{i:06d}" for i in range(n)]
    train_keys, _, train_count = through_training(folder)
    code_keys, code_count = through_extract_codes(folder, str(tmp_path / "codes"))
    eval_images, eval_count = through_eval_recon(folder)
    assert train_keys == code_keys == every
    assert torch.equal(eval_images, center_crops(folder, every))
    assert train_count == code_count == eval_count == (0, 0)


def test_the_old_eval_rule_would_be_caught(tmp_path):
    """Negative control for the comparison: eval-recon's former loop did not need a label, so it
    kept a sample without `cls` that training skips. That rule, applied to the same shard, gives
    other images than the training stream: the image comparison above is not vacuous."""
    n = 8
    folder = image_shard(tmp_path / "img", n, no_cls={3})
    train_keys, train_images, _ = through_training(folder)
    old_rule = [s["__key__"] for s in tar_samples([{"url": os.path.join(folder, SHARD)}], lambda e: True)
                if find_image_field(s) is not None]
    assert "000003" in old_rule and "000003" not in train_keys
    assert not torch.equal(center_crops(folder, old_rule)[:len(train_keys)], train_images)
    assert torch.equal(through_eval_recon(folder)[0], train_images)


def _rewrite_codes(path, damage):
    """Rewrite a code shard, changing sample i's fields with damage[i](sample)."""
    samples = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
               for s in tar_samples([{"url": path}], lambda e: False)]
    for i, fn in damage.items():
        fn(samples[i])
    write_tar(path, samples)


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_bad_code_arrays_are_skipped_and_counted(tmp_path):
    """Code shards: bytes that are no array, a float array, an array of the wrong length and a
    missing label are skipped and counted by the training stream (data.kind=codes) and by the
    shared loop over the shard, alike."""
    n = 15
    folder = image_shard(tmp_path / "img", n)
    out = str(tmp_path / "codes")
    extract_codes(StandInVQ(), folder, out, batch_size=4, size=SIZE, n_embed=64)
    name = read_manifest(out)["shards"][0]["name"]
    damage = {
        1: lambda s: s.update({"codes.npy": s["codes.npy"][:20]}),  # a cut array
        4: lambda s: s.update({"codes.npy": _npy(np.zeros((4, 4), np.float32))}),
        6: lambda s: s.update({"codes.npy": _npy(np.zeros((3, 4), np.int16))}),  # manifest: 4 x 4
        8: lambda s: s.pop("cls"),
    }
    _rewrite_codes(os.path.join(out, name), damage)
    good = [f"{i:06d}" for i in range(n) if i not in damage]

    cfg = DataConfig(kind="codes", path=out, mode="epoch", shuffle_buffer=0, hflip=False, num_workers=0,
                     max_corrupt_fraction=0.5)
    stream = build_stream(cfg, batch_size=8, seed=0)  # 2 planned batches: 8 + 3 good samples
    it = iter(stream)
    batches = [next(it) for _ in range(stream.steps_per_epoch)]
    assert stream.stats()["padded_batches"] == 0
    assert [k for b in batches for k in b["key"]] == good
    assert (stream.stats()["corrupt"], stream.stats()["shard_errors"]) == (len(damage), 0)

    count = CorruptCount(0.5)
    decoded = list(read_shard(os.path.join(out, name), DecodeSpec(kind="codes", code_len=16), count))
    assert [s["__key__"] for s, _, _ in decoded] == good
    assert torch.equal(torch.from_numpy(np.stack([d for _, _, d in decoded])).long(),
                       torch.cat([b["codes"] for b in batches]))
    assert (count.seen, count.corrupt, count.shard_errors) == (n, len(damage), 0)


@pytest.mark.parametrize("bad", [1, 2])
def test_the_same_limit_stops_all_three(tmp_path, bad):
    """100 samples, 1% allowed. Two corrupt samples early in the shard (before the 100-sample
    minimum) stop all three readers with the shard, the count and the setting named; one does not
    (the control that the error comes from the count)."""
    folder = image_shard(tmp_path / "img", 100, truncated=set(range(10, 10 + 10 * bad, 10)))
    runs = {
        "training": lambda: through_training(folder, max_corrupt_fraction=0.01),
        "extract-codes": lambda: through_extract_codes(folder, str(tmp_path / "codes")),
        "eval-recon": lambda: through_eval_recon(folder, max_corrupt_fraction=0.01),
    }
    setting = {"training": "data.max_corrupt_fraction=0.01", "extract-codes": "data.max_corrupt_fraction=0.01",
               "eval-recon": "eval-recon --max-corrupt-fraction=0.01"}
    for name, run in runs.items():
        if bad == 1:
            run()
            continue
        with pytest.raises(CorruptDataError) as e:
            run()
        msg = str(e.value)
        assert "2 of 100 samples" in msg and setting[name] in msg and SHARD in msg, (name, msg)
