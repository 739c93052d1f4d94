"""Webdataset tar shards: image folder -> shards, the manifest, and a full verification pass.

A shard folder holds
  shard-000000.tar, ...  each sample: `<key>.<ext>` (the image bytes under their original extension,
                         re-encoded only when `resize` is asked), `<key>.cls` (class index as text,
                         -1 when the source has no labels), `<key>.json` ({"source", "width", "height"}),
                         and `<key>.txt` (the caption, UTF-8) when the source has captions
  manifest.json          shard names, per-shard sample counts, total, class names and counts. It is
                         written last and atomically, so its presence means the folder is complete.

Training streams read the manifest to split shards evenly over ranks and workers (see stream.py).
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Optional

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from taming_dist.atomic import atomic_path, write_atomic
from taming_dist.progress import progress

from .transforms import IMAGE_EXTS, find_image_field

MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
FORMAT = "taming_dist.shards"
DEFAULT_MAX_SIZE = 1_000_000_000
# Estimated tar overhead per sample: three members (image, cls, json), each a 512-byte header plus
# padding to 512 bytes, plus the json payload.
_SAMPLE_OVERHEAD = 3 * 1024


@dataclass(frozen=True)
class SourceImage:
    path: str  # absolute path
    rel: str  # name relative to the source folder, '/'-separated
    label: int  # class index, -1 when unlabeled
    nbytes: int
    caption: Optional[str] = None  # from --captions FILE; else NAME.txt beside the image is read


CAPTION_EXT = "txt"
TEXT_FIELD = "txt_emb.npy"  # a caption's text-encoder features in code shards (data/codes.py)


# ----------------------------------------------------------------------------------------------
# Small atomic writers shared by the shard, synthetic and code writers


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temporary name in the same folder, then rename: readers never see a partial file."""
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def write_tar(path: str, samples: Iterable[dict]) -> tuple[int, int]:
    """Write samples (dicts of `__key__` and `ext -> bytes|str`) as a tar with fixed headers (mtime 0,
    so the same samples give the same bytes), atomically. Returns (sample count, file size).

    The mtime is the integer 0: a float mtime makes tarfile add a PAX header to every member, which
    doubles the header parsing that dominates reading small images."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})
            count += 1
    return count, os.path.getsize(path)


def write_manifest(out: str, shards: list[dict], class_names: list[str], class_counts: list[int],
                   **extra) -> dict:
    """Write `manifest.json` (atomically) from per-shard entries {"name", "count", ...}."""
    manifest = {
        "format": FORMAT,
        "version": 1,
        "shards": shards,
        "total": sum(s["count"] for s in shards),
        "class_names": list(class_names),
        "class_counts": list(class_counts),
        **extra,
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: not a finished shard folder (the manifest is written last; "
            f"make one with `taming-dist shard SRC {folder}`)"
        )
    with open(path) as f:
        return json.load(f)


def resolve_shards(path: str) -> tuple[list[str], Optional[dict]]:
    """Shard paths and the manifest (None for a brace pattern) of `path`: a shard folder, its
    manifest.json, or a brace pattern such as `/data/shard-{000000..000099}.tar`."""
    if os.path.isdir(path) or path.endswith(MANIFEST):
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        manifest = read_manifest(folder)
        return [os.path.join(folder, s["name"]) for s in manifest["shards"]], manifest
    urls = list(braceexpand.braceexpand(path))
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {path!r} do not exist, e.g. {missing[0]}")
    return urls, None


def tar_samples(src: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's tarfile_to_samples ({"url"} dicts -> samples), except that each shard's file is
    closed as soon as it is read (webdataset leaves that to the garbage collector). `handler` gets
    tar-level errors (missing or truncated shards) and returns True to go on."""
    def members():
        for source in src:
            url = source["url"]
            try:
                stream = gopen(url)
            except Exception as exn:  # a missing or unreadable shard is the handler's call
                exn.args = exn.args + (url,)
                if handler(exn):
                    continue
                return
            # A truncated tar raises once for the cut member and again for the missing next header:
            # report the first error of a shard only, the rest of the shard is lost either way.
            failed = []

            def first_error(exn: Exception) -> bool:
                failed.append(exn)
                return handler(exn) if len(failed) == 1 else True

            try:
                yield from tar_file_expander([{"url": url, "stream": stream}], handler=first_error)
            finally:
                stream.close()

    return group_by_keys(members(), handler=handler)


# ----------------------------------------------------------------------------------------------
# Listing the source folder


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name


def _read_labels(path: str) -> dict[str, str]:
    """A labels file: a JSON mapping name -> label, or lines `name<TAB or space>label`."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".json") or text.lstrip().startswith("{"):
        mapping = json.loads(text)
        if not isinstance(mapping, dict):
            raise ValueError(f"labels file {path}: JSON must be a mapping name -> label")
        return {str(k): str(v) for k, v in mapping.items()}
    labels = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError(f"labels file {path}:{lineno}: expected `name<TAB or space>label`, got {line!r}")
        labels[parts[0]] = parts[1]
    return labels


def read_captions(path: str) -> dict[str, str]:
    """A captions file -> {image path: caption}: JSON Lines of objects with the image under "path"
    (or "file_name", "image") and the caption under "caption" (or "text"), or CSV rows `path,caption`
    (a header row `path,caption` is skipped)."""
    import csv

    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file {path} does not exist")
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if path.endswith((".jsonl", ".json")) or text.lstrip().startswith("{"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = next(row[k] for k in ("path", "file_name", "image") if k in row)
                value = next(row[k] for k in ("caption", "text") if k in row)
            except (json.JSONDecodeError, StopIteration, TypeError) as e:
                raise ValueError(f"captions file {path}:{lineno}: expected a JSON object with \"path\" and "
                                 f"\"caption\", got {line[:80]!r}") from e
            out[str(key)] = str(value)
        return out
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or (lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "caption"]):
            continue
        if len(row) < 2:
            raise ValueError(f"captions file {path}:{lineno}: expected `path,caption`, got {row!r}")
        out[row[0].strip()] = ",".join(row[1:])
    return out


def _with_captions(items: list[SourceImage], captions: dict[str, str]) -> list[SourceImage]:
    """Attach captions looked up by relative path, file name, or name without extension."""
    out = []
    for it in items:
        name = it.rel.rsplit("/", 1)[-1]
        keys = (it.rel, name, it.rel.rsplit(".", 1)[0], name.rsplit(".", 1)[0])
        out.append(replace(it, caption=next((captions[k] for k in keys if k in captions), None)))
    return out


def _label_indices(values: list[str]) -> tuple[dict[str, int], list[str]]:
    """Label strings -> indices. All-integer labels are used as given; names are indexed in sorted order."""
    try:
        ints = {v: int(v) for v in values}
    except ValueError:
        names = sorted(set(values))
        return {n: i for i, n in enumerate(names)}, names
    if any(i < 0 for i in ints.values()):
        raise ValueError(f"labels must be >= 0, got {min(ints.values())}")
    return ints, [str(i) for i in range(max(ints.values()) + 1)]


def list_source(src: str, labels_file: Optional[str] = None) -> tuple[list[SourceImage], list[str]]:
    """The images of `src` with labels, sorted by name, and the class names.

    Class sub-folders (ImageNet layout) give class index = position of the folder in sorted order;
    a flat folder takes labels from `labels_file` (or none: label -1, no class names).
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source folder {src} does not exist")
    entries = sorted(e for e in os.listdir(src) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(src, e))]
    top_images = [e for e in entries if os.path.isfile(os.path.join(src, e)) and _is_image(e)]

    def file(rel: str, label: int) -> SourceImage:
        p = os.path.join(src, rel)
        return SourceImage(os.path.abspath(p), rel.replace(os.sep, "/"), label, os.path.getsize(p))

    class_dirs = []
    for d in subdirs:
        files = sorted(
            os.path.relpath(os.path.join(root, n), src)
            for root, _, names in os.walk(os.path.join(src, d)) for n in names if _is_image(n)
        )
        if files:
            class_dirs.append((d, files))
    if class_dirs:
        if top_images:
            raise ValueError(
                f"{src} holds both class sub-folders ({class_dirs[0][0]}, ...) and images at the top "
                f"({top_images[0]}, ...); move the top-level images into a class folder or shard them separately"
            )
        if labels_file:
            raise ValueError(f"{src} has class sub-folders, which give the labels; drop --labels {labels_file}")
        names = [d for d, _ in class_dirs]
        items = [file(rel, ci) for ci, (_, files) in enumerate(class_dirs) for rel in files]
        return items, names
    if not top_images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found in {src} or its sub-folders")
    if not labels_file:
        return [file(n, -1) for n in top_images], []
    labels = _read_labels(labels_file)
    found, missing = [], []
    for n in top_images:
        stem = n.rsplit(".", 1)[0]
        value = labels.get(n, labels.get(stem))
        (missing if value is None else found).append((n, value))
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(top_images)} images in {src} have no label in {labels_file} "
            f"(looked up by file name and by name without extension), e.g. {missing[0][0]}"
        )
    index, names = _label_indices([v for _, v in found])
    return [file(n, index[v]) for n, v in found], names


def plan_shards(sizes: list[int], max_count: int, max_size: int) -> list[list[int]]:
    """Split samples (in order) into shards of at most `max_count` samples and about `max_size` bytes
    (a single larger sample still gets a shard). Depends only on the inputs, not on the worker count."""
    if max_count < 1 or max_size < 1:
        raise ValueError(f"max_count ({max_count}) and max_size ({max_size}) must be >= 1")
    shards, cur, cur_size = [], [], 0
    for i, n in enumerate(sizes):
        est = n + _SAMPLE_OVERHEAD
        if cur and (len(cur) >= max_count or cur_size + est > max_size):
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(i)
        cur_size += est
    if cur:
        shards.append(cur)
    return shards


# ----------------------------------------------------------------------------------------------
# Writing


def _imap(fn: Callable, jobs: list, workers: int) -> Iterator:
    """fn over jobs, in order, as results come: in `workers` processes (one whole-shard job at a
    time each) or in this one when there is nothing to share.

    The workers come from a fork server, not from fork(): a fork of a process that runs other threads
    (a trainer's watchdog, a data loader, a test runner's leftovers) can copy a lock that one of them
    held and hang in the child. The server imports this module once; each worker is forked from it."""
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        with ctx.Pool(min(workers, len(jobs))) as pool:
            yield from pool.imap(fn, jobs)
    else:
        yield from map(fn, jobs)


_REENCODE = {"jpg": ("JPEG", {"quality": 95}), "jpeg": ("JPEG", {"quality": 95}), "png": ("PNG", {}),
             "webp": ("WEBP", {"quality": 95})}


def _encode_sample(item: SourceImage, key: str, resize: Optional[int]) -> dict:
    with open(item.path, "rb") as f:
        data = f.read()
    ext = item.rel.rsplit(".", 1)[-1].lower()
    img = Image.open(io.BytesIO(data))  # reads the header only
    w, h = img.size
    if resize and min(w, h) > resize:
        # Downscale only: the training crop needs the shorter side >= its size, and upscaling would
        # only make the shard bigger.
        scale = resize / min(w, h)
        w, h = max(resize, round(w * scale)), max(resize, round(h * scale))
        fmt, opts = _REENCODE.get(ext, ("PNG", {}))
        ext = ext if ext in _REENCODE else "png"
        img = img.convert("RGB") if fmt == "JPEG" or img.mode not in ("RGB", "RGBA", "L") else img
        buf = io.BytesIO()
        img.resize((w, h), Image.BICUBIC, reducing_gap=3.0).save(buf, format=fmt, **opts)
        data = buf.getvalue()
    meta = {"source": item.rel, "width": w, "height": h}
    sample = {"__key__": key, ext: data, "cls": str(item.label), "json": json.dumps(meta, sort_keys=True)}
    if item.caption is not None:
        sample[CAPTION_EXT] = item.caption.encode("utf-8")
    else:
        beside = item.path.rsplit(".", 1)[0] + ".txt"
        if os.path.isfile(beside):
            with open(beside, "rb") as f:  # stored as read: verify reports bytes that are not UTF-8
                sample[CAPTION_EXT] = f.read().strip()
    return sample


def _write_shard_job(job: tuple[str, list[tuple[str, SourceImage]], Optional[int]]) -> dict:
    """Write one whole shard (runs in a pool worker). Unreadable source images are left out and reported."""
    path, members, resize = job
    skipped, labels, captioned = [], Counter(), [0]

    def samples():
        for key, item in members:
            try:
                sample = _encode_sample(item, key, resize)
            except Exception as e:  # any decoder error means "cannot shard this file": report it
                skipped.append({"source": item.rel, "reason": f"{type(e).__name__}: {e}"})
                continue
            labels[item.label] += 1
            captioned[0] += CAPTION_EXT in sample
            yield sample

    count, nbytes = write_tar(path, samples())
    return {"name": os.path.basename(path), "count": count, "bytes": nbytes,
            "labels": dict(labels), "skipped": skipped, "captioned": captioned[0]}


def write_shards(src: str, out: str, *, max_count: int = 1000, max_size: int = DEFAULT_MAX_SIZE,
                 resize: Optional[int] = None, labels_file: Optional[str] = None, workers: int = 1,
                 seed: Optional[int] = 0, captions_file: Optional[str] = None) -> dict:
    """Write the images of `src` as webdataset shards into `out`; returns the manifest.

    The sample order is the sorted file list shuffled with `seed` (None keeps sorted order): sorted
    ImageNet would put one class per shard, and a shuffle buffer cannot mix that back. Keys are the
    positions in that order. `workers` processes each write whole shards; the output is the same
    for any worker count. Captions come from `captions_file` (see `read_captions`), else from
    NAME.txt beside each image; the manifest counts the samples with and without one.
    """
    if os.path.isdir(out) and any(n.endswith(".tar") or n == MANIFEST for n in os.listdir(out)):
        raise ValueError(f"{out} already holds shards or a manifest; write into an empty folder")
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be a positive side length, got {resize}")
    items, class_names = list_source(src, labels_file)
    if captions_file:
        items = _with_captions(items, read_captions(captions_file))
    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    items = [items[i] for i in order]
    width = max(8, len(str(len(items))))
    plan = plan_shards([it.nbytes for it in items], max_count, max_size)
    os.makedirs(out, exist_ok=True)
    jobs = [(os.path.join(out, SHARD_NAME.format(s)), [(f"{i:0{width}d}", items[i]) for i in idx], resize)
            for s, idx in enumerate(plan)]
    results = []
    with progress(total=len(items), desc="shard", unit="images") as bar:
        for job, result in zip(jobs, _imap(_write_shard_job, jobs, workers)):
            results.append(result)
            bar.update(len(job[1]))

    shards, skipped, labels, captioned = [], [], Counter(), 0
    for r in results:
        captioned += r["captioned"]
        skipped += r["skipped"]
        labels.update(r["labels"])
        if r["count"]:
            shards.append({"name": r["name"], "count": r["count"], "bytes": r["bytes"]})
        else:  # every image of this shard was unreadable: leave no empty shard behind
            os.unlink(os.path.join(out, r["name"]))
    if not shards:
        raise ValueError(f"none of the {len(items)} images in {src} could be read; first error: {skipped[0]}")
    class_counts = [labels.get(i, 0) for i in range(len(class_names))]
    total = sum(s["count"] for s in shards)
    return write_manifest(out, shards, class_names, class_counts, source=os.path.abspath(src), resize=resize,
                          skipped=skipped, unlabeled=labels.get(-1, 0),
                          captions={"present": captioned, "missing": total - captioned} if captioned else None)


# ----------------------------------------------------------------------------------------------
# Verifying


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bad_samples: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason)
    shard_errors: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason)
    # captions (`txt`): present, missing (in a folder where some samples have one), empty, undecodable
    captions: dict = field(default_factory=lambda: {"present": 0, "missing": 0, "empty": 0, "undecodable": 0})

    @property
    def caption_problems(self) -> int:
        c = self.captions
        return (c["missing"] if c["present"] else 0) + c["empty"] + c["undecodable"]

    @property
    def ok(self) -> bool:
        return not self.bad_samples and not self.shard_errors and not self.caption_problems

    def summary(self, limit: int = 20) -> str:
        lines = [f"{self.shards} shards, {self.samples} samples, {len(self.bad_samples)} unreadable samples, "
                 f"{len(self.shard_errors)} shard errors"]
        c = self.captions
        if c["present"] or c["empty"] or c["undecodable"]:
            lines.append(f"captions: {c['present']} present, {c['missing']} missing, {c['empty']} empty, "
                         f"{c['undecodable']} not UTF-8")
        lines += [f"  shard error  {s}: {r}" for s, r in self.shard_errors[:limit]]
        lines += [f"  bad sample   {s} {k}: {r}" for s, k, r in self.bad_samples[:limit]]
        hidden = max(0, len(self.shard_errors) - limit) + max(0, len(self.bad_samples) - limit)
        if hidden:
            lines.append(f"  ... and {hidden} more")
        return "\n".join(lines)


def check_sample(sample: dict) -> None:
    """Raise ValueError (or a decoder error) unless the sample has a label and an image that fully
    decodes, or (code shards) an integer array."""
    if "cls" not in sample:
        raise ValueError("missing field cls")
    int(sample["cls"])
    if "codes.npy" in sample:
        arr = np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"codes.npy has dtype {arr.dtype}, expected integers")
        return
    ext = find_image_field(sample)
    if ext is None:
        raise ValueError(f"no image field (one of {', '.join(IMAGE_EXTS)}) and no codes.npy")
    with Image.open(io.BytesIO(sample[ext])) as img:
        img.convert("RGB")
    if "json" in sample:
        json.loads(sample["json"])


def caption_status(sample: dict) -> str:
    """present, missing, empty or undecodable: the sample's caption (`txt`)."""
    raw = sample.get(CAPTION_EXT)
    if raw is None:
        return "missing"
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        return "undecodable"
    return "present" if text.strip() else "empty"


def _verify_one(url: str) -> tuple[int, list, list, Counter]:
    name = os.path.basename(url)
    captions: Counter = Counter()
    errors: list[tuple[str, str]] = []

    def handler(exn: Exception) -> bool:
        errors.append((name, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"))
        return True

    count, bad = 0, []
    for sample in tar_samples([{"url": url}], handler):
        count += 1
        captions[caption_status(sample)] += 1
        try:
            check_sample(sample)
        except Exception as e:  # every decoder failure is a finding to report, not a crash
            bad.append((name, sample["__key__"], f"{type(e).__name__}: {e}"))
    return count, bad, errors, captions


def verify_shards(out: str, *, workers: int = 1) -> VerifyReport:
    """Re-read every shard of `out`, decode every image, and compare with the manifest.

    Reports unreadable samples (bad bytes, missing fields) and shard-level errors (truncated or
    missing tars, counts that differ from the manifest, shards on disk the manifest does not list).
    """
    report = VerifyReport()
    try:
        urls, manifest = resolve_shards(out)
    except FileNotFoundError as e:
        report.shard_errors.append((out, str(e)))
        return report
    if manifest is None:
        expected = {}
    else:
        expected = {s["name"]: s["count"] for s in manifest["shards"]}
        on_disk = {n for n in os.listdir(out) if n.endswith(".tar") and not n.startswith(".")}
        for extra in sorted(on_disk - set(expected)):
            report.shard_errors.append((extra, "on disk but not listed in the manifest"))
    present = [u for u in urls if os.path.exists(u)]
    for u in urls:
        if u not in present:
            report.shard_errors.append((os.path.basename(u), "listed but missing"))
    with progress(_imap(_verify_one, present, workers), total=len(present), desc="verify", unit="shards") as bar:
        results = list(bar)
    for url, (count, bad, errors, captions) in zip(present, results):
        name = os.path.basename(url)
        for k, v in captions.items():
            report.captions[k] += v
        report.shards += 1
        report.samples += count
        report.bad_samples += bad
        report.shard_errors += errors
        if name in expected and expected[name] != count:
            report.shard_errors.append((name, f"holds {count} samples, the manifest says {expected[name]}"))
    return report
