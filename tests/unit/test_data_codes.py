"""Stage-2 code shards: extraction round trip, flipped codes, per-rank shares, resumability, and
reading them back with data.kind=codes."""
import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taming_dist.config import DataConfig
from taming_dist.data.codes import code_dtype, extract_codes
from taming_dist.data.shards import read_manifest, resolve_shards, tar_samples, verify_shards
from taming_dist.data.stream import build_stream
from taming_dist.data.transforms import find_image_field, load_image, to_float
from tests.unit.test_data_stream import make_shards, take


class StandInVQ(torch.nn.Module):
    """Codes = mean brightness of 4x4 patches quantised to n_embed levels: a deterministic encoder
    with the VQModel's interface, so these tests do not depend on the model code."""

    def __init__(self, n_embed=64):
        super().__init__()
        self.n_embed = n_embed

    def encode_to_indices(self, x):  # (B, 3, S, S) -> (B, S/4, S/4)
        m = F.avg_pool2d(x.mean(1, keepdim=True), 4)[:, 0]
        return ((m + 1) / 2 * (self.n_embed - 1)).round().long()

    def decode_code(self, idx):  # (B, h, w) -> (B, 3, 4h, 4w)
        v = idx.float() / (self.n_embed - 1) * 2 - 1
        return F.interpolate(v[:, None], scale_factor=4, mode="nearest").expand(-1, 3, -1, -1)


def _images_by_key(folder, size):
    urls, _ = resolve_shards(folder)
    out = {}
    for s in tar_samples([{"url": u} for u in urls], lambda e: False):
        out[s["__key__"]] = (to_float(torch.from_numpy(load_image(s[find_image_field(s)], size))[None]), int(s["cls"]))
    return out


def _codes_by_key(folder):
    urls, _ = resolve_shards(folder)
    out = {}
    for s in tar_samples([{"url": u} for u in urls], lambda e: False):
        load = lambda f: np.load(io.BytesIO(s[f]))  # noqa: E731
        out[s["__key__"]] = (load("codes.npy"), load("codes_flip.npy") if "codes_flip.npy" in s else None,
                             int(s["cls"]))
    return out


def test_code_dtype():
    assert code_dtype(1024) == np.int16 and code_dtype(32767) == np.int16 and code_dtype(32768) == np.int32


def test_round_trip_flip_and_ranks(tmp_path):
    images = make_shards(tmp_path / "img", [5, 4, 5, 4])
    out = str(tmp_path / "codes")
    vq = StandInVQ()
    # Two ranks, run one after the other (barrier = no-op): rank 1 first, so rank 0 finds all done.
    r1 = extract_codes(vq, images, out, rank=1, world_size=2, batch_size=3, flip=True, size=16, n_embed=64)
    assert r1["written"] == ["codes-r1-000001.tar", "codes-r1-000003.tar"] and r1["manifest"] is None
    r0 = extract_codes(vq, images, out, rank=0, world_size=2, batch_size=3, flip=True, size=16, n_embed=64)
    m = r0["manifest"]
    assert m == read_manifest(out)
    assert m["total"] == 18 and m["code_shape"] == [4, 4] and m["dtype"] == "int16" and m["flip"] is True
    assert sum(m["class_counts"]) == 18 and [s["count"] for s in m["shards"]] == [5, 4, 5, 4]
    assert verify_shards(out).ok

    expected = _images_by_key(images, 16)
    codes = _codes_by_key(out)
    assert sorted(codes) == sorted(expected)
    for key, (x, label) in expected.items():
        c, cf, cls = codes[key]
        assert c.dtype == np.int16 and cls == label
        assert torch.equal(torch.from_numpy(c).long(), vq.encode_to_indices(x)[0])
        assert torch.equal(torch.from_numpy(cf).long(), vq.encode_to_indices(x.flip(-1))[0])
        assert torch.equal(vq.decode_code(torch.from_numpy(c).long()[None]),
                           vq.decode_code(vq.encode_to_indices(x)))


def test_extraction_resumes(tmp_path):
    images = make_shards(tmp_path / "img", [4, 4, 4])
    out = str(tmp_path / "codes")
    vq = StandInVQ()
    first = extract_codes(vq, images, out, batch_size=4, size=16, n_embed=64)
    assert len(first["written"]) == 3 and first["skipped"] == []
    again = extract_codes(vq, images, out, batch_size=4, size=16, n_embed=64)
    assert again["written"] == [] and len(again["skipped"]) == 3
    # An interrupted run: shard 1's marker never got written; a rerun (on 2 ranks now) redoes
    # exactly that shard and leaves one output per input shard.
    os.unlink(os.path.join(out, "done", "shard-000001.tar.json"))
    first_tar = tmp_path / "codes" / "codes-r0-000000.tar"
    before = first_tar.read_bytes()
    r1 = extract_codes(vq, images, out, rank=1, world_size=2, batch_size=4, size=16, n_embed=64)
    assert r1["written"] == ["codes-r1-000001.tar"]
    r0 = extract_codes(vq, images, out, rank=0, world_size=2, batch_size=4, size=16, n_embed=64)
    assert r0["written"] == [] and len(r0["skipped"]) == 2
    assert not os.path.exists(os.path.join(out, "codes-r0-000001.tar"))
    assert first_tar.read_bytes() == before
    assert [s["name"] for s in r0["manifest"]["shards"]] == ["codes-r0-000000.tar", "codes-r1-000001.tar",
                                                            "codes-r0-000002.tar"]
    assert verify_shards(out).ok
    with pytest.raises(ValueError, match="extracted with"):
        extract_codes(vq, images, out, batch_size=4, size=16, n_embed=64, flip=True)


def test_codes_stream(tmp_path):
    images = make_shards(tmp_path / "img", [6, 6])
    out = str(tmp_path / "codes")
    vq = StandInVQ()
    extract_codes(vq, images, out, batch_size=4, size=16, flip=True, n_embed=64)
    codes = _codes_by_key(out)
    cfg = DataConfig(kind="codes", path=out, mode="epoch", shuffle_buffer=4, hflip=True)
    stream = build_stream(cfg, batch_size=4, seed=0)
    batches = take(stream, stream.steps_per_epoch)
    picked = []
    for b in batches:
        assert b["codes"].dtype == torch.int64 and b["codes"].shape[1] == 16 and "image" not in b
        for key, row, label in zip(b["key"], b["codes"], b["label"]):
            c, cf, cls = codes[key]
            assert int(label) == cls
            if torch.equal(row, torch.from_numpy(c).long().flatten()):
                picked.append("plain")
            else:
                assert torch.equal(row, torch.from_numpy(cf).long().flatten())
                picked.append("flip")
    assert len(picked) == 12 and {"plain", "flip"} <= set(picked)


def test_round_trip_with_the_tiny_vqgan(tmp_path):
    """With the real VQModel: extracted codes == encode_to_indices of the same (center-cropped)
    images, and decode_code(extracted codes) == the model's reconstruction."""
    from taming_dist.config import load_config
    from taming_dist.models.vqgan import VQModel

    torch.manual_seed(0)
    vq = VQModel(load_config("vqgan-tiny").vqgan).eval()
    images = make_shards(tmp_path / "img", [3, 3], size=32)
    out = str(tmp_path / "codes")
    m = extract_codes(vq, images, out, batch_size=4, size=32)["manifest"]
    assert m["n_embed"] == 128 and m["dtype"] == "int16" and m["code_shape"] == [8, 8]  # 32 px / f4
    codes = _codes_by_key(out)
    expected = _images_by_key(images, 32)
    keys = sorted(expected)
    x = torch.cat([expected[k][0] for k in keys])
    c = torch.stack([torch.from_numpy(codes[k][0]).long() for k in keys])
    with torch.no_grad():
        assert torch.equal(c, vq.encode_to_indices(x))
        torch.testing.assert_close(vq.decode_code(c), vq(x)[0], atol=1e-5, rtol=1e-5)
