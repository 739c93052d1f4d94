"""The one atomic writer for every file and folder taming_dist publishes (checkpoints, `latest`,
model folders, shards and manifests, reports, statistics, caches).

Write to a temporary name beside the target, fsync what was written, rename it onto the target,
fsync the parent folder: a reader (or a run resumed after a crash or kill -9) sees the old
content or the complete new one, never a part, and the rename itself survives a power loss (POSIX
makes the rename durable only once the folder holding it is synced). The temporary name carries the
process id and a serial number, so concurrent writers of one target never write into each other's file.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from pathlib import Path
from typing import Iterator


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a folder and everything in it (files first, then the folders)."""
    path = Path(path)
    if path.is_dir():
        for root, _, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(Path(root) / name, os.O_RDONLY)
            _fsync(Path(root), os.O_RDONLY)
    else:
        _fsync(path, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: str | os.PathLike, path: str | os.PathLike, *, keep_existing: bool = False) -> bool:
    """Rename a finished `tmp` (file or folder, already written) onto `path` durably: fsync `tmp`,
    rename, fsync the parent. A folder already at `path` is moved aside and removed after the
    rename; with `keep_existing`, a `path` that exists (e.g. another process's finished copy of the
    same cache entry) wins and `tmp` is removed. Returns whether `tmp` was published."""
    tmp, path = Path(tmp), Path(path)
    fsync_path(tmp)
    if keep_existing:
        try:
            os.rename(tmp, path)  # fails on an existing non-empty folder; replaces a file, see below
        except OSError:
            if not path.exists():
                raise
            _remove(tmp)
            return False
    elif tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
    _fsync(path.parent, os.O_RDONLY)
    return True


_serial = itertools.count()


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside `path` (hidden; this process's id and a serial number, so
    neither two processes nor two writers in one process share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_serial)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (not yet created) to write a file or a folder into; on
    success it is published onto `path` (see `publish`), on any error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    publish(tmp, path, keep_existing=keep_existing)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write `data` (text or bytes) to `path` atomically and durably."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
    return Path(path)
