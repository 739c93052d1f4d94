"""The real-photograph presets and tools/photo_shards.py, without scikit-image: made-up photographs
stand in for its files. Each preset (vq with k-means + restarts, FSQ, LFQ; 64 and 128 px) trains two
steps on shards the tool writes, with the codebook switches it sets doing what they say."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("photo_shards", REPO / "tools" / "photo_shards.py")
photo_shards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(photo_shards)

PRESETS = ["vqgan-photo-64", "vqgan-photo-64-fsq", "vqgan-photo-64-lfq", "vqgan-photo-128"]


def fake_photographs(n: int = 3) -> dict:
    """Smooth colour fields with a seeded texture, of different shapes (as the real ones are)."""
    out = {}
    for i in range(n):
        h, w = 150 + 40 * i, 220 + 30 * i
        yy, xx = np.mgrid[0:h, 0:w] / 50.0
        rng = np.random.default_rng(i)
        img = np.stack([np.sin(xx * (1 + c) + i) * np.cos(yy * (2 - c * 0.5)) for c in range(3)], -1)
        img = (img * 100 + 128 + rng.normal(0, 10, (h, w, 3))).clip(0, 255)
        out[f"photo{i}"] = img.astype(np.uint8)
    return out


def test_split_keeps_held_out_pixels_out_of_training():
    img = np.arange(200 * 400 * 3, dtype=np.int64).reshape(200, 400, 3)
    parts = photo_shards.regions(img)
    assert parts["train"].shape == (200, 300, 3) and parts["heldout"].shape == (200, 100, 3)
    assert not np.intersect1d(parts["train"].ravel(), parts["heldout"].ravel()).size
    rng = np.random.default_rng(0)
    for _ in range(20):  # crops are squares of the output side, even from a region narrower than 2x it
        assert photo_shards.crop(parts["heldout"].astype(np.uint8), 64, rng).shape == (64, 64, 3)


def test_photo_shards_writes_both_splits_deterministically(tmp_path, monkeypatch):
    monkeypatch.setattr(photo_shards, "load_photographs", fake_photographs)
    assert photo_shards.main(["--out", str(tmp_path / "a"), "--size", "32", "--train", "48", "--heldout", "12"]) == 0
    assert photo_shards.main(["--out", str(tmp_path / "b"), "--size", "32", "--train", "48", "--heldout", "12"]) == 0
    for split, count in (("train", 48), ("heldout", 12)):
        ma = json.loads((tmp_path / "a" / split / "manifest.json").read_text())
        mb = json.loads((tmp_path / "b" / split / "manifest.json").read_text())
        assert ma["total"] == count and ma["class_names"] == ["photo0", "photo1", "photo2"]
        assert ma["class_counts"] == [count // 3] * 3 and ma["shards"] == mb["shards"]
    with pytest.raises(SystemExit):  # an existing folder is never written into
        photo_shards.main(["--out", str(tmp_path / "a")])


def test_photo_shards_says_how_to_get_the_photographs(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install scikit-image"):
        photo_shards.load_photographs()


@pytest.mark.parametrize("preset", PRESETS)
def test_photo_preset_trains_with_its_codebook_switches(preset, tmp_path, monkeypatch):
    from taming_dist.config import load_config
    from taming_dist.models.vqgan import VQModel
    from taming_dist.train.loop import train

    cfg = load_config(preset)
    size = cfg.data.size
    monkeypatch.setattr(photo_shards, "load_photographs", fake_photographs)
    photo_shards.main(["--out", str(tmp_path / "data"), "--size", str(size), "--train", "12", "--heldout", "3"])
    cfg = load_config(preset, [f"out_dir={tmp_path}", f"data.path={tmp_path / 'data' / 'train'}", "train.steps=2",
                               "train.global_batch_size=2", "train.ckpt_every=2", "train.image_every=0",
                               "loss.lpips_backbone=random", "loss.disc_start=1", "logging.wandb_mode=disabled",
                               "logging.progress=false"])
    q = cfg.vqgan.quantizer
    assert (q.kind == "vq") == q.kmeans_init == (q.dead_code_threshold > 0)
    assert cfg.vqgan.ddconfig.resolution // cfg.vqgan.downsample_factor == 16  # a 16 x 16 token grid
    last = train(cfg, resume="none")
    assert np.isfinite(last["nll"]) and (tmp_path / cfg.name / "checkpoints" / "step_000002").is_dir()
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / cfg.name / "model" / "model.safetensors"))
    if q.kind == "vq":  # the k-means pass ran at step 1 (its flag) and moved the codebook: taming's init is
        # uniform in +-1/n_embed and two Adam steps of lr 2e-4 move a row by at most 4e-4; k-means centres
        # of encoder outputs lie far outside that (the model folder holds the offset folded in)
        bound = 1 / q.n_embed + 2 * cfg.train.optim.lr
        assert float(state["quantize.kmeans_done"]) == 1.0 and state["quantize.embedding.weight"].abs().max() > 10 * bound
    else:
        assert not any(k.startswith("quantize.") and "kmeans" in k for k in state)
