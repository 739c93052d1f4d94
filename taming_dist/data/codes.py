"""Stage-2 token shards: image shards encoded once by a trained VQGAN (as LlamaGen pre-extracts
codes), so transformer training reads small integer arrays instead of decoding and encoding images.

An output folder holds
  codes-r{rank}-{i:06d}.tar  per input shard i: `<key>.codes.npy` ((h, w) int16, or int32 when
                             n_embed > 32767), optionally `<key>.codes_flip.npy` (codes of the
                             horizontally flipped image) and `<key>.cls`; keys are the image keys.
                             With a text encoder (issue 23) also `<key>.txt` (the caption) and
                             `<key>.txt_emb.npy` ((length, width): its features, only the true
                             length stored; fp16, fp32, or bf16 as uint16 bits)
  done/<input shard>.json    written after its tar: a restarted extraction skips those shards
  manifest.json              by rank 0 once every input shard is done (same fields as image shards,
                             plus code_shape, n_embed, dtype, flip; with a text encoder `text`: encoder, width,
                             dtype, max_length, truncated captions, captions per second)

Input shard i goes to rank i % world_size. Read it back with data.kind=codes (see stream.py).
"""
from __future__ import annotations

import glob
import io
import json
import os
import time
from collections import Counter
from typing import Callable, Optional

import numpy as np
import torch

from taming_dist.progress import progress

from .decode import CorruptCount, DecodeSpec, read_shard
from .shards import TEXT_FIELD, caption_status, read_manifest, write_json_atomic, write_manifest, write_tar
from .transforms import hflip_images, to_float

FORMAT = "taming_dist.codes"
CODES_NAME = "codes-r{rank}-{index:06d}.tar"
DONE_DIR = "done"


def code_dtype(n_embed: int) -> np.dtype:
    """int16 holds codebooks up to 32767 entries (half of int32's disk and memory)."""
    return np.dtype(np.int16) if n_embed <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _source_folder(source) -> tuple[str, Optional[int], float]:
    """(shard folder, image size or None, max corrupt fraction) for a DataConfig or a folder path."""
    if isinstance(source, str):
        return source, None, 0.01
    if source.kind == "codes":
        raise ValueError("extract_codes reads image shards; data.kind=codes is already codes")
    if source.kind == "synthetic":
        from .synthetic import ensure_synthetic

        return ensure_synthetic(source), source.size, source.max_corrupt_fraction
    return source.path, source.size, source.max_corrupt_fraction


def text_to_numpy(features: torch.Tensor, dtype: str) -> np.ndarray:
    """Features -> the array stored: fp16/fp32 as such, bf16 as its uint16 bits (numpy has no bf16)."""
    if dtype == "bf16":
        return features.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return features.to({"fp16": torch.float16, "fp32": torch.float32}[dtype]).cpu().numpy()


def text_from_numpy(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """The stored array -> float32 features (the inverse of `text_to_numpy`)."""
    if dtype == "bf16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()


def _read_shard(url: str, size: int, max_fraction: float, captions: bool = False):
    """(key, uint8 (3, size, size), label, caption or None) of every readable sample of one shard,
    in tar order, center-cropped, and the shard's CorruptCount (data/decode.py: the same decode loop
    and count as training streams). With `captions`, a sample without a readable caption (`txt`) is
    an error naming the fix."""
    count = CorruptCount(max_fraction, source=url)

    def samples():
        for sample, label, image in read_shard(url, DecodeSpec(size=size), count):
            caption = None
            if captions:
                status = caption_status(sample)
                if status != "present":
                    raise ValueError(f"{url} sample {sample['__key__']}: caption {status}; text features need a "
                                     f"caption (txt) for every image: check with `taming-dist shard --verify "
                                     f"{os.path.dirname(url)}` and re-shard with captions (NAME.txt beside each "
                                     f"image or --captions FILE)")
                caption = sample["txt"].decode("utf-8").strip()
            yield sample["__key__"], image, label, caption

    return samples(), count


@torch.no_grad()
def _encode_shard(vqgan, url: str, *, size: int, batch_size: int, flip: bool, device, dtype: np.dtype,
                  max_fraction: float, text=None, text_settings: Optional[dict] = None):
    """Encode one input shard; returns (samples for write_tar, code shape, label Counter, error
    Counter: `corrupt` samples, `shard_errors`, `truncated` captions, `text_seconds`)."""
    stream, count = _read_shard(url, size, max_fraction, captions=text is not None)
    errors = Counter()
    out, labels, shape = [], Counter(), None

    def flush(batch):
        nonlocal shape
        x = to_float(torch.from_numpy(np.stack([b[1] for b in batch]))).to(device)
        codes = vqgan.encode_to_indices(x).cpu().numpy().astype(dtype)  # (B, h, w)
        codes_flip = vqgan.encode_to_indices(hflip_images(x)).cpu().numpy().astype(dtype) if flip else None
        shape = list(codes.shape[1:])
        if text is not None:
            t0 = time.perf_counter()
            feats, lengths, truncated = text.encode([b[3] for b in batch], text_settings["max_length"])
            feats = text_to_numpy(feats, text_settings["dtype"])
            lengths = lengths.tolist()
            errors["text_seconds"] += time.perf_counter() - t0
            errors["truncated"] += truncated
        for j, (key, _, label, caption) in enumerate(batch):
            sample = {"__key__": key, "codes.npy": _npy(codes[j]), "cls": str(label)}
            if flip:
                sample["codes_flip.npy"] = _npy(codes_flip[j])
            if text is not None:
                sample["txt"] = caption
                sample[TEXT_FIELD] = _npy(np.ascontiguousarray(feats[j, :lengths[j]]))
            out.append(sample)
            labels[label] += 1

    batch = []
    for item in stream:
        batch.append(item)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    errors.update(corrupt=count.corrupt, shard_errors=count.shard_errors)
    return out, shape, labels, errors


def _done_path(out: str, input_name: str) -> str:
    return os.path.join(out, DONE_DIR, input_name + ".json")


def extract_codes(vqgan, source, out: str, *, rank: int = 0, world_size: int = 1, batch_size: int = 32,
                  flip: bool = False, device="cpu", size: Optional[int] = None, n_embed: Optional[int] = None,
                  barrier: Callable[[], None] = lambda: None, text_encoder=None, max_text_tokens: int = 120,
                  text_dtype: str = "fp16") -> dict:
    """Encode the image shards of `source` (a DataConfig, or a shard folder with `size` given) into
    code shards in `out`; this rank does input shards i with i % world_size == rank.

    `vqgan` needs `encode_to_indices(x: (B, 3, S, S) in [-1, 1]) -> (B, h, w) long`. `n_embed` (the
    codebook size, for the dtype) defaults to `vqgan.quantize.n_e`. `barrier` is called after this
    rank's shards (pass the process group's barrier under torchrun); rank 0 then writes the manifest.

    `text_encoder` (a `taming_dist.text.TextEncoder`) also encodes each sample's caption into at
    most `max_text_tokens` vectors stored in `text_dtype` (fp16, bf16, fp32) next to its codes.
    Returns {"written": [...], "skipped": [...], "manifest": dict or None (ranks other than 0)}.
    """
    folder, cfg_size, max_fraction = _source_folder(source)
    size = size or cfg_size
    if size is None:
        raise ValueError("extract_codes from a shard folder needs size= (the image side the VQGAN was trained on)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if n_embed is None:
        n_embed = int(vqgan.quantize.n_e)
    dtype = code_dtype(n_embed)
    source_manifest = read_manifest(folder)
    inputs = [s["name"] for s in source_manifest["shards"]]
    settings = {"size": size, "flip": flip, "n_embed": n_embed, "dtype": dtype.name}
    text_settings = None
    if text_encoder is not None:
        if text_dtype not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"text dtype {text_dtype!r} is not one of fp16, bf16, fp32")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens {max_text_tokens} must be >= 1")
        text_settings = text_encoder.record(max_text_tokens, text_dtype)
        settings["text"] = text_settings
    os.makedirs(os.path.join(out, DONE_DIR), exist_ok=True)

    was_training = vqgan.training
    vqgan.eval()
    written, skipped = [], []
    mine = range(rank, len(inputs), world_size)
    counts = [source_manifest["shards"][i]["count"] for i in mine]
    done_before = sum(c for i, c in zip(mine, counts) if os.path.exists(_done_path(out, inputs[i])))
    bar = progress(total=source_manifest["total"], local_total=sum(counts), initial=done_before, desc="extract-codes",
                   unit="images", enabled=rank == 0)
    try:
        for i, n_images in zip(mine, counts):
            done = _done_path(out, inputs[i])
            if os.path.exists(done):
                with open(done) as f:
                    marker = json.load(f)
                if marker["settings"] != settings:
                    raise ValueError(f"{out} holds codes of {inputs[i]} extracted with {marker['settings']}, this run "
                                     f"asks for {settings}; use a new output folder")
                skipped.append(inputs[i])
                continue
            # A crash between the tar and its marker (maybe under another world size) leaves a tar
            # without a marker: remove it so the folder holds one output per input shard.
            for stale in glob.glob(os.path.join(out, CODES_NAME.format(rank="*", index=i))):
                os.unlink(stale)
            samples, shape, labels, errors = _encode_shard(
                vqgan, os.path.join(folder, inputs[i]), size=size, batch_size=batch_size, flip=flip,
                device=device, dtype=dtype, max_fraction=max_fraction, text=text_encoder, text_settings=text_settings)
            name = CODES_NAME.format(rank=rank, index=i)
            count, _ = write_tar(os.path.join(out, name), samples)
            write_json_atomic(done, {"input": inputs[i], "output": name, "count": count, "code_shape": shape,
                                     "labels": {str(k): v for k, v in labels.items()}, "settings": settings,
                                     "corrupt": errors["corrupt"], "shard_errors": errors["shard_errors"],
                                     "truncated": errors["truncated"], "text_seconds": errors["text_seconds"]})
            written.append(name)
            bar.update(n_images)
    finally:
        bar.close()
        vqgan.train(was_training)
    barrier()
    manifest = _write_codes_manifest(out, folder, inputs, source_manifest, settings) if rank == 0 else None
    barrier()
    return {"written": written, "skipped": skipped, "manifest": manifest}


def _write_codes_manifest(out: str, folder: str, inputs: list[str], source_manifest: dict, settings: dict) -> dict:
    missing = [n for n in inputs if not os.path.exists(_done_path(out, n))]
    if missing:
        raise ValueError(f"{len(missing)} of {len(inputs)} input shards have no codes in {out} (e.g. {missing[0]}); "
                         f"a rank did not finish: run the extraction again, finished shards are skipped")
    markers = []
    for n in inputs:
        with open(_done_path(out, n)) as f:
            markers.append(json.load(f))
    shapes = {tuple(m["code_shape"]) for m in markers if m["code_shape"]}
    if len(shapes) > 1:
        raise ValueError(f"code shards in {out} have different code shapes {sorted(shapes)}; use a new output folder")
    labels = Counter()
    for m in markers:
        labels.update({int(k): v for k, v in m["labels"].items()})
    class_names = source_manifest.get("class_names", [])
    text = settings.get("text")
    if text is not None:
        seconds = sum(m.get("text_seconds", 0.0) for m in markers)
        count = sum(m["count"] for m in markers)
        text = {**text, "truncated": sum(m.get("truncated", 0) for m in markers),
                "captions_per_s": round(count / seconds, 1) if seconds > 0 else None}
    return write_manifest(
        out, [{"name": m["output"], "count": m["count"]} for m in markers if m["count"]], class_names,
        [labels.get(i, 0) for i in range(len(class_names))], format=FORMAT, source=os.path.abspath(folder),
        code_shape=list(shapes.pop()) if shapes else [], image_size=settings["size"], n_embed=settings["n_embed"],
        dtype=settings["dtype"], flip=settings["flip"],
        corrupt=sum(m["corrupt"] for m in markers), shard_errors=sum(m["shard_errors"] for m in markers),
        **({"text": text} if text is not None else {}),
    )
