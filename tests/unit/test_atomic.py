"""taming_dist.atomic: the one atomic writer (temporary name, fsync, rename, fsync of the folder)."""
import os

import pytest

from taming_dist import atomic
from taming_dist.atomic import atomic_path, publish, write_atomic


@pytest.fixture
def fsyncs(monkeypatch):
    """The paths fsync'd, in order."""
    seen = []
    real_open = os.open
    names = {}

    def fake_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        names[fd] = os.path.abspath(path)
        return fd

    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "open", fake_open)
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (seen.append(names.get(fd)), real_fsync(fd))[1])
    return seen


def test_write_atomic_syncs_the_file_then_the_folder_and_leaves_no_temporary(tmp_path, fsyncs):
    target = tmp_path / "latest"
    write_atomic(target, "step_000002")
    write_atomic(target, b"step_000004")  # replaces
    assert target.read_text() == "step_000004"
    assert sorted(os.listdir(tmp_path)) == ["latest"]
    # per write: the temporary file's data, then the folder that holds the rename
    assert [os.path.basename(p).startswith(".latest.tmp-") for p in fsyncs[0::2]] == [True, True]
    assert fsyncs[1::2] == [str(tmp_path)] * 2


def test_an_error_while_writing_keeps_the_old_content(tmp_path):
    target = tmp_path / "stats.npz"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["stats.npz"]


def test_a_folder_is_published_whole_and_replaces_the_previous_one(tmp_path, fsyncs):
    target = tmp_path / "model"
    for version in ("1", "2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(version)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_bytes(b"x" * 10)
    assert (target / "config.json").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["model"]
    assert [p for p in fsyncs if p.endswith("/sub/w.bin")]  # every file inside is synced


def test_keep_existing_lets_the_first_finished_copy_win(tmp_path):
    target = tmp_path / "cache-entry"
    for version in ("first", "second"):
        tmp = tmp_path / f".{version}"
        tmp.mkdir()
        (tmp / "manifest.json").write_text(version)
        publish(tmp, target, keep_existing=True)
    assert (target / "manifest.json").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["cache-entry"]
