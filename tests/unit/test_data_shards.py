"""Shard writer (layout, manifest, determinism over worker counts), labels, resize, and verify."""
import argparse
import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from taming_dist.commands import shard as shard_cmd
from taming_dist.data.shards import read_manifest, tar_samples, verify_shards, write_shards, write_tar


def _image(path, w, h, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _class_folder(root):
    """3 classes (folder names out of sorted order on purpose), PNG and JPEG, 11 images."""
    spec = {"zebra": 3, "ant": 5, "moth": 3}
    for ci, (name, n) in enumerate(spec.items()):
        os.makedirs(root / name / "sub", exist_ok=True)
        for i in range(n):
            ext = "png" if i % 2 else "JPEG"
            where = root / name / ("sub" if i == 0 else "") / f"img{i}.{ext}"
            _image(where, 16 + i, 12 + ci, seed=ci * 100 + i)
    return spec


def _read(folder):
    urls = [str(folder / s["name"]) for s in read_manifest(str(folder))["shards"]]
    return list(tar_samples([{"url": u} for u in urls], wds.reraise_exception))


def test_class_folders_layout_and_manifest(tmp_path):
    spec = _class_folder(tmp_path / "src")
    m = write_shards(str(tmp_path / "src"), str(tmp_path / "out"), max_count=4, workers=1)
    names = sorted(spec)
    assert m["class_names"] == names
    assert m["class_counts"] == [spec[n] for n in names]
    assert m["total"] == 11 and [s["count"] for s in m["shards"]] == [4, 4, 3]
    assert [s["name"] for s in m["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = _read(tmp_path / "out")
    assert len(samples) == 11 and len({s["__key__"] for s in samples}) == 11
    for s in samples:
        meta = json.loads(s["json"])
        cls_name = meta["source"].split("/")[0]
        assert int(s["cls"]) == names.index(cls_name)
        ext = meta["source"].rsplit(".", 1)[1].lower()
        original = (tmp_path / "src" / meta["source"]).read_bytes()
        assert s[ext] == original  # no resize: the original bytes, under their extension
        assert Image.open(io.BytesIO(original)).size == (meta["width"], meta["height"])
    # Shuffled order: the first shard does not hold a single class.
    first = {json.loads(s["json"])["source"].split("/")[0] for s in samples[:4]}
    assert len(first) > 1


def test_output_identical_for_one_and_two_workers(tmp_path):
    _class_folder(tmp_path / "src")
    m1 = write_shards(str(tmp_path / "src"), str(tmp_path / "w1"), max_count=3, workers=1, resize=12)
    m2 = write_shards(str(tmp_path / "src"), str(tmp_path / "w2"), max_count=3, workers=2, resize=12)
    assert m1 == m2 and len(m1["shards"]) == 4
    for s in m1["shards"]:
        assert (tmp_path / "w1" / s["name"]).read_bytes() == (tmp_path / "w2" / s["name"]).read_bytes()
    m3 = write_shards(str(tmp_path / "src"), str(tmp_path / "w3"), max_count=3, workers=1, resize=12, seed=1)
    assert m3["shards"] != m1["shards"] or (tmp_path / "w3" / "shard-000000.tar").read_bytes() != \
        (tmp_path / "w1" / "shard-000000.tar").read_bytes()


def _parent_pid(_):
    return os.getppid()


def test_workers_are_forked_from_a_fork_server_not_from_the_caller():
    # A fork of the caller (a test runner or trainer with other threads) can copy a held lock and hang.
    from taming_dist.data.shards import _imap

    parents = list(_imap(_parent_pid, [0, 1, 2], workers=2))
    assert len(parents) == 3 and os.getpid() not in parents, parents
    assert list(_imap(_parent_pid, [0, 1, 2], workers=1)) == [os.getppid()] * 3  # one worker: in-process


def test_max_size_splits_shards(tmp_path):
    _class_folder(tmp_path / "src")
    m = write_shards(str(tmp_path / "src"), str(tmp_path / "out"), max_count=1000, max_size=8000)
    assert len(m["shards"]) > 2 and m["total"] == 11


def test_resize_downscales_only(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    _image(src / "a" / "big.png", 40, 20, 0)
    _image(src / "a" / "small.png", 8, 6, 1)
    write_shards(str(src), str(tmp_path / "out"), resize=10)
    by_source = {json.loads(s["json"])["source"]: s for s in _read(tmp_path / "out")}
    big = by_source["a/big.png"]
    assert Image.open(io.BytesIO(big["png"])).size == (20, 10) == (json.loads(big["json"])["width"], 10)
    assert by_source["a/small.png"]["png"] == (src / "a" / "small.png").read_bytes()


@pytest.mark.parametrize("fmt", ["tsv", "space", "json"])
def test_flat_folder_with_labels(tmp_path, fmt):
    src = tmp_path / "src"
    src.mkdir()
    labels = {"x1.png": "dog", "x2.png": "cat", "x3.png": "dog", "x4.png": "bird"}
    for i, n in enumerate(labels):
        _image(src / n, 10, 10, i)
    lab = tmp_path / ("labels.json" if fmt == "json" else "labels.txt")
    if fmt == "json":
        lab.write_text(json.dumps({n.split(".")[0]: v for n, v in labels.items()}))  # by name without extension
    else:
        sep = "\t" if fmt == "tsv" else " "
        lab.write_text("".join(f"{n}{sep}{v}\n" for n, v in labels.items()))
    m = write_shards(str(src), str(tmp_path / "out"), labels_file=str(lab))
    assert m["class_names"] == ["bird", "cat", "dog"] and m["class_counts"] == [1, 1, 2]
    for s in _read(tmp_path / "out"):
        assert m["class_names"][int(s["cls"])] == labels[json.loads(s["json"])["source"]]


def test_flat_folder_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.png", 8, 8, 0)
    _image(src / "b.png", 8, 8, 1)
    (tmp_path / "l.txt").write_text("a.png 3\n")
    with pytest.raises(ValueError, match="1 of 2 images .* have no label .* b.png"):
        write_shards(str(src), str(tmp_path / "out"), labels_file=str(tmp_path / "l.txt"))
    m = write_shards(str(src), str(tmp_path / "unlabeled"))
    assert m["class_names"] == [] and m["unlabeled"] == 2
    assert {s["cls"] for s in _read(tmp_path / "unlabeled")} == {b"-1"}
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(str(src), str(tmp_path / "unlabeled"))


def _corrupt_one_sample(path, key):
    samples = list(tar_samples([{"url": str(path)}], wds.reraise_exception))
    out = []
    for s in samples:
        s = {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
        if s["__key__"] == key:
            ext = next(k for k in s if k in ("png", "jpeg", "jpg"))
            s[ext] = s[ext][:40] + b"\x00" * 50  # valid header start, garbage data
        out.append(s)
    write_tar(str(path), out)


def _truncate_in_last_image(path):
    with tarfile.open(path) as tf:
        last = [m for m in tf.getmembers() if not m.name.endswith((".cls", ".json"))][-1]
    data = path.read_bytes()
    path.write_bytes(data[: last.offset_data + last.size // 2])


def _args(*argv):
    parser = argparse.ArgumentParser()
    shard_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_verify_finds_bad_sample_and_truncated_tar(tmp_path, capsys):
    _class_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert shard_cmd.run(_args(str(tmp_path / "src"), str(out), "--max-count", "4", "--workers", "2")) == 0
    report = verify_shards(str(out))
    assert report.ok and report.samples == 11 and report.shards == 3
    assert shard_cmd.run(_args("--verify", str(out))) == 0

    bad_key = _read(out)[1]["__key__"]
    _corrupt_one_sample(out / "shard-000000.tar", bad_key)
    _truncate_in_last_image(out / "shard-000002.tar")

    report = verify_shards(str(out), workers=2)
    assert not report.ok
    assert [(s, k) for s, k, _ in report.bad_samples if s == "shard-000000.tar"] == [("shard-000000.tar", bad_key)]
    errors = dict(report.shard_errors)
    assert "shard-000002.tar" in errors
    # The sample cut in half lost its image: reported too.
    assert any(s == "shard-000002.tar" and "no image field" in r for s, _, r in report.bad_samples)
    capsys.readouterr()
    assert shard_cmd.run(_args("--verify", str(out))) == 1
    printed = capsys.readouterr().out
    assert bad_key in printed and "shard-000002.tar" in printed


def test_verify_without_manifest_reports(tmp_path):
    (tmp_path / "empty").mkdir()
    report = verify_shards(str(tmp_path / "empty"))
    assert not report.ok and "manifest" in report.shard_errors[0][1]


def _flat(folder, n):
    folder.mkdir(parents=True)
    for i in range(n):
        _image(folder / f"img{i}.png", 16, 16, seed=i)


def test_captions_beside_images_or_from_a_file_and_their_verification(tmp_path, capsys):
    """Issue 23: captions from NAME.txt beside each image or a JSONL/CSV file, stored as `txt`;
    `--verify` counts missing, empty and undecodable ones."""
    from taming_dist.cli import main

    src = tmp_path / "src"
    _flat(src, 5)
    for i in range(4):
        (src / f"img{i}.txt").write_text(f"a red circle number {i}\n")
    m = write_shards(str(src), str(tmp_path / "beside"), max_count=2)
    assert m["captions"] == {"present": 4, "missing": 1}
    got = {json.loads(s["json"])["source"]: s.get("txt") for s in _read(tmp_path / "beside")}
    assert got["img2.png"] == b"a red circle number 2" and got["img4.png"] is None
    report = verify_shards(str(tmp_path / "beside"))
    assert report.captions == {"present": 4, "missing": 1, "empty": 0, "undecodable": 0} and not report.ok
    assert "captions: 4 present, 1 missing, 0 empty, 0 not UTF-8" in report.summary()

    (src / "img0.txt").write_bytes(b"\xff\xfe bad")
    (src / "img1.txt").write_text("   ")
    write_shards(str(src), str(tmp_path / "bad"), max_count=2)
    report = verify_shards(str(tmp_path / "bad"))
    assert report.captions == {"present": 2, "missing": 1, "empty": 1, "undecodable": 1}
    assert main(["shard", "--verify", str(tmp_path / "bad")]) == 1

    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(json.dumps({"path": f"img{i}.png", "caption": f"jsonl {i}"}) + "\n" for i in range(5)))
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("path,caption\n" + "".join(f"img{i}.png,\"csv, {i}\"\n" for i in range(5)))
    for name, f, first in (("j", jsonl, b"jsonl 0"), ("c", csv_file, b"csv, 0")):
        assert main(["shard", str(src), str(tmp_path / name), "--captions", str(f)]) == 0
        got = {json.loads(s["json"])["source"]: s["txt"] for s in _read(tmp_path / name)}
        assert len(got) == 5 and got["img0.png"] == first
        assert verify_shards(str(tmp_path / name)).ok
    _flat(tmp_path / "plain", 2)
    (tmp_path / "none.jsonl").write_text(json.dumps({"path": "other.png", "caption": "x"}) + "\n")
    assert main(["shard", str(tmp_path / "plain"), str(tmp_path / "n"), "--captions", str(tmp_path / "none.jsonl")]) == 2
    assert "no image of" in capsys.readouterr().err
