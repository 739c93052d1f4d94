"""The built-in synthetic dataset: deterministic, all classes, distinct classes, cached once under races."""
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

from taming_dist.config import DataConfig
from taming_dist.data.shards import read_manifest, verify_shards
from taming_dist.data.synthetic import CLASS_NAMES, ensure_synthetic, generate


def test_generate_is_deterministic_and_balanced():
    x1, y1 = generate(120, 32, 12)
    x2, y2 = generate(120, 32, 12)
    assert x1.shape == (120, 32, 32, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.bincount(y1, minlength=12).tolist() == [10] * 12
    x3, _ = generate(120, 32, 12, seed=1)
    assert not np.array_equal(x1, x3)
    _, y5 = generate(50, 16, 5)
    assert set(y5.tolist()) == set(range(5))


def test_classes_are_distinguishable():
    """A nearest-centroid classifier on translation-invariant features (per-channel FFT magnitude,
    colour-agnostic) separates the classes far above chance (1/12): each class has its own look."""
    x, y = generate(960, 32, 12)
    g = x.astype(np.float32)
    g -= g.mean((1, 2), keepdims=True)
    f = np.abs(np.fft.fft2(g, axes=(1, 2))).sum(-1).reshape(len(x), -1)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-6
    train, test = slice(0, 480), slice(480, None)
    centroids = np.stack([f[train][y[train] == c].mean(0) for c in range(12)])
    accuracy = ((f[test] @ centroids.T).argmax(1) == y[test]).mean()
    assert accuracy > 0.75


def test_ensure_synthetic_writes_shards_once(tmp_path):
    cfg = DataConfig(size=32, synthetic_samples=240, synthetic_classes=12)
    folder = ensure_synthetic(cfg, cache_dir=str(tmp_path))
    assert os.path.basename(folder) == "synthetic-32-240-12-v5"
    m = read_manifest(folder)
    assert m["total"] == 240 and m["class_names"] == list(CLASS_NAMES) and m["class_counts"] == [20] * 12
    assert verify_shards(folder).ok
    with Image.open(os.path.join(folder, "examples.png")) as grid:
        assert grid.size == (8 * 34 + 2, 12 * 34 + 2)  # 8 examples per class row, 2 px padding
    stamp = os.path.getmtime(os.path.join(folder, "manifest.json"))
    assert ensure_synthetic(cfg, cache_dir=str(tmp_path)) == folder
    assert os.path.getmtime(os.path.join(folder, "manifest.json")) == stamp


def test_env_cache_dir_and_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("TAMING_DIST_CACHE", str(tmp_path / "envcache"))
    folder = ensure_synthetic(DataConfig(size=16, synthetic_samples=24, synthetic_classes=3))
    assert folder.startswith(str(tmp_path / "envcache"))
    with pytest.raises(ValueError, match="synthetic_classes 13"):
        ensure_synthetic(DataConfig(synthetic_classes=13))


def _call(cache_dir):
    return ensure_synthetic(DataConfig(size=16, synthetic_samples=600, synthetic_classes=12), cache_dir=cache_dir)


def test_concurrent_first_use(tmp_path):
    """Three processes generate at once: all get the same complete folder and no temp folder remains."""
    # spawn, not fork: the pytest process runs threads, and nothing in the suite forks it (README, "Tests")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        folders = pool.map(_call, [str(tmp_path)] * 3)
    assert len(set(folders)) == 1
    assert read_manifest(folders[0])["total"] == 600
    assert sorted(os.listdir(tmp_path)) == ["synthetic-16-600-12-v5"]


def test_losing_the_race_uses_the_winners_folder(tmp_path, monkeypatch):
    import taming_dist.data.synthetic as syn

    cfg = DataConfig(size=16, synthetic_samples=24, synthetic_classes=4)
    real_write = syn._write

    def write_while_another_process_finishes_first(folder, *args):
        real_write(folder, *args)
        monkeypatch.setattr(syn, "_write", real_write)
        winner = syn.ensure_synthetic(cfg, cache_dir=str(tmp_path))
        with open(os.path.join(winner, "winner"), "w") as f:
            f.write("x")

    monkeypatch.setattr(syn, "_write", write_while_another_process_finishes_first)
    folder = syn.ensure_synthetic(cfg, cache_dir=str(tmp_path))
    assert os.path.exists(os.path.join(folder, "winner"))
    assert os.listdir(tmp_path) == ["synthetic-16-24-4-v5"]


def test_captions_name_the_class_and_the_palette_colours_of_every_image(tmp_path):
    """Issue 23: each image has a caption made from its own parameters, on both splits; the
    colours it names are the ones its pixels show."""
    from taming_dist.data.shards import tar_samples
    from taming_dist.data.synthetic import PALETTE, captions, parse_caption, pixel_colours

    for seed in (0, 1):
        x, y = generate(48, 32, 12, seed=seed)
        texts = captions(48, 12, seed=seed)
        assert len(set(texts)) > 30  # captions vary with the image
        for image, label, text in zip(x, y, texts):
            parsed = parse_caption(text)
            assert parsed is not None and parsed[0] == label, text
            assert parsed[1] != parsed[2] and set(parsed[1:]) == set(pixel_colours(image)), text
    assert captions(12, 12, seed=0) != captions(12, 12, seed=1)
    # the classes whose pixels show which colour is the shape's: the background has more pixels
    from taming_dist.data.synthetic import ROLES_SHOWN, colours_match

    x, y = generate(240, 32, 12, seed=1)
    for image, label, text in zip(x, y, captions(240, 12, seed=1)):
        _, fg, bg = parse_caption(text)
        assert colours_match(image, int(label), fg, bg), text
        assert colours_match(image, int(label), bg, fg) is (int(label) not in ROLES_SHOWN), text
    assert parse_caption("a red circle on a red-ish background") is None
    assert len(PALETTE) == 10
    folder = ensure_synthetic(DataConfig(size=16, synthetic_samples=24, synthetic_classes=12, split="heldout"),
                              cache_dir=str(tmp_path))
    names = [s["name"] for s in read_manifest(folder)["shards"]]
    texts = {s["__key__"]: s["txt"].decode() for s in tar_samples([{"url": os.path.join(folder, n)} for n in names],
                                                                   lambda e: False)}
    assert [texts[k] for k in sorted(texts)] == captions(24, 12, seed=1)


def test_unseen_combinations_are_left_out_of_the_train_split_only():
    """Issue 25: the demo prompts shape-colour combinations the train split never draws; the
    held-out split draws them."""
    from taming_dist.data.synthetic import _RGB, COLOUR_NAMES, MIN_COLOUR_DISTANCE, UNSEEN, caption, captions

    unseen = {caption(CLASS_NAMES.index(s), COLOUR_NAMES.index(f), COLOUR_NAMES.index(b)) for s, f, b in UNSEEN}
    for _, f, b in UNSEEN:  # drawable at all: the two colours are far enough apart
        assert np.linalg.norm(_RGB[COLOUR_NAMES.index(f)] - _RGB[COLOUR_NAMES.index(b)]) >= MIN_COLOUR_DISTANCE
    train, heldout = captions(4096, 12, seed=0), captions(4096, 12, seed=1)
    assert not unseen & set(train)
    assert len(unseen & set(heldout)) >= len(UNSEEN) // 2  # about 4 images of each in 4096


def test_objects_sit_near_the_centre_at_most_of_their_largest_size():
    """Data v5: a circle, square, triangle or cross is centred within 0.05 of the middle and drawn at
    80% of its largest size or more; its foreground (pixels nearer the caption's shape colour than
    the background's) has its centroid near the middle and covers a narrow band of the image."""
    from taming_dist.data.synthetic import _RGB, OBJECTS, captions, parse_caption

    images, labels = generate(960, 32, 12, seed=1)
    texts = captions(960, 12, seed=1)
    c = (np.arange(32) + 0.5) / 32
    u, v = np.meshgrid(c, c)
    for name in OBJECTS:
        k = CLASS_NAMES.index(name)
        areas = []
        for i in np.flatnonzero(labels == k):
            _, fg, bg = parse_caption(texts[i])
            px = images[i].astype(np.float32) / 255
            mask = np.linalg.norm(px - _RGB[fg], axis=-1) < np.linalg.norm(px - _RGB[bg], axis=-1)
            assert abs(u[mask].mean() - 0.5) < 0.07 and abs(v[mask].mean() - 0.5) < 0.07, (name, i)
            areas.append(mask.mean())
        # (0.8)^2 of the largest area at least: v4 drew sizes from about 60% of the largest
        assert min(areas) > 0.55 * max(areas), (name, min(areas), max(areas))
