"""The one loop that decodes shard samples, and the one corrupt-sample count, for every reader:
training streams (stream.py), code extraction (codes.py) and held-out evaluation (eval/recon.py).

A sample needs a label (`cls`) and an image that decodes, or (code shards) an integer `codes.npy`
(of the manifest's code shape, when it gives one) and, with text, its features. A sample that
fails is skipped and counted as corrupt; a tar-level failure (a missing or truncated shard) is
counted as a shard error. Once a reader has seen CORRUPT_CHECK_MIN_SAMPLES samples, corrupt
samples plus shard errors above the max corrupt fraction of them raise `CorruptDataError`, naming
what was read (the shard, or a data worker's shards), the count and the setting to change.

Code extraction and evaluation count per shard (`read_shard`); a training worker counts over its
stream, whose shuffle buffer mixes samples of several shards.
"""
from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .shards import TEXT_FIELD, tar_samples
from .transforms import find_image_field, load_image

# The corrupt fraction is only judged after this many samples, so one bad sample early on does not
# halt a run with a 1% tolerance.
CORRUPT_CHECK_MIN_SAMPLES = 100
SETTING = "data.max_corrupt_fraction"


class CorruptDataError(RuntimeError):
    """Too large a fraction of the input could not be read."""


def check_corrupt_fraction(bad: int, seen: int, max_fraction: float, last_error: str, *,
                           setting: str = SETTING, source: str = "") -> None:
    """Raise CorruptDataError when `bad` of `seen` samples exceed `max_fraction` (after the minimum)."""
    if seen >= CORRUPT_CHECK_MIN_SAMPLES and bad > max_fraction * seen:
        of = f" of {source}" if source else ""
        raise CorruptDataError(
            f"{bad} of {seen} samples{of} ({bad / seen:.1%}) were unreadable (bad image bytes or codes, missing "
            f"fields or truncated shards), more than {setting}={max_fraction}; last error: {last_error}. "
            f"List them with `taming-dist shard --verify FOLDER`, re-shard the data, or raise {setting}"
        )


class CorruptCount:
    """Samples read (`seen`, good or not), skipped as corrupt, and tar-level `shard_errors` of one
    reader, with the rule above. Doubles as the webdataset handler for tar-level errors."""

    def __init__(self, max_fraction: float, *, source: str = "", setting: str = SETTING):
        self.max_fraction, self.source, self.setting = max_fraction, source, setting
        self.seen = 0
        self.corrupt = 0
        self.shard_errors = 0
        self.last_error = ""

    @property
    def bad(self) -> int:
        return self.corrupt + self.shard_errors

    def check(self) -> None:
        check_corrupt_fraction(self.bad, self.seen + self.shard_errors, self.max_fraction, self.last_error,
                               setting=self.setting, source=self.source)

    def __call__(self, exn: Exception) -> bool:
        """webdataset handler for tar-level errors (truncated or missing shards): count, then go on."""
        self.shard_errors += 1
        # webdataset and tar_samples append the shard's url to the arguments
        url = next((a for a in reversed(exn.args[1:]) if isinstance(a, str)), None)
        where = f"{url}: " if url else ""
        self.last_error = f"{where}{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        self.check()
        return True

    def sample_error(self, sample: dict, exn: Exception) -> None:
        self.corrupt += 1
        where = f"{sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"
        self.last_error = f"{where}: {type(exn).__name__}: {exn}"
        self.check()


@dataclass(frozen=True)
class DecodeSpec:
    """What a sample decodes to. images: uint8 (3, size, size), a random crop / flip only where an
    rng is given; codes: the flattened `codes.npy` (or, with `hflip`, `codes_flip.npy` half the
    time), with `text` (the manifest's: max_length, width) a tuple (codes, padded features, length)."""

    kind: str = "images"  # images | codes
    size: int = 0
    random_crop: bool = False
    hflip: bool = False
    text: Optional[dict] = None
    code_len: Optional[int] = None  # codes per sample (the manifest's code_shape), checked when given


def decode_sample(sample: dict, spec: DecodeSpec, rng: Optional[random.Random] = None):
    """(label, data) of one raw sample; raises on anything corrupt."""
    label = int(sample["cls"])
    if spec.kind == "codes":
        flip = spec.hflip and rng is not None and "codes_flip.npy" in sample and rng.random() < 0.5
        field = "codes_flip.npy" if flip else "codes.npy"
        data = np.load(io.BytesIO(sample[field]), allow_pickle=False).reshape(-1)
        if data.dtype.kind not in "iu":
            raise ValueError(f"{field} has dtype {data.dtype}, expected integers")
        if spec.code_len is not None and data.size != spec.code_len:
            raise ValueError(f"{field} holds {data.size} codes, the manifest's code_shape {spec.code_len}")
        if spec.text is not None:
            # Stored at its true length; padded here to one length for the whole run (fixed shapes
            # for compile and the same padding on every rank), masked by the model.
            feats = np.load(io.BytesIO(sample[TEXT_FIELD]), allow_pickle=False)
            text = np.zeros((spec.text["max_length"], spec.text["width"]), dtype=feats.dtype)
            text[:len(feats)] = feats
            data = (data, text, len(feats))
        return label, data
    ext = find_image_field(sample)
    if ext is None:
        raise KeyError("no image field")
    return label, load_image(sample[ext], spec.size, rng=rng, random_crop=spec.random_crop, hflip=spec.hflip)


def decode_samples(samples: Iterable[dict], spec: DecodeSpec, count: CorruptCount,
                   rng: Optional[Callable[[dict], random.Random]] = None) -> Iterator[tuple[dict, int, object]]:
    """(raw sample, label, data) of every sample that decodes, in order; the others are skipped and
    counted in `count`. `rng(sample)` gives the sample's augmentation randomness (none: center crops)."""
    for sample in samples:
        count.seen += 1
        try:
            label, data = decode_sample(sample, spec, None if rng is None else rng(sample))
        except Exception as e:  # any decode failure: skip the sample, count it
            count.sample_error(sample, e)
            continue
        yield sample, label, data


def read_shard(url: str, spec: DecodeSpec, count: CorruptCount,
               take: Optional[int] = None) -> Iterator[tuple[dict, int, object]]:
    """`decode_samples` of one shard in tar order (its first `take` raw samples, good or not, when
    given); tar-level errors are counted in `count` too, and the rule is applied once more at the
    end of the shard (corrupt samples early in a shard come before the minimum sample count). The
    shard's file is closed at the end."""
    samples = tar_samples([{"url": url}], count)
    try:
        yield from decode_samples(itertools.islice(samples, take), spec, count)
    finally:
        samples.close()
    count.check()
