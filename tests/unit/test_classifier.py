"""Sample quality without downloaded weights: the built-in classifier, its cache, `eval-gen` without
Inception weights, and the built-in data's held-out split it is measured against.

The classifier here trains on a small budget (600 images, 120 steps, a few seconds); the cached one
`eval-gen` and the demo use trains on 4096 images for 800 steps, three in four of them imperfect
copies (`classifier.augment`), in about 10 s (99.6% held-out accuracy)."""
import json

import numpy as np
import pytest
import torch

from taming_dist.cli import main
from taming_dist.config import DataConfig
from taming_dist.data.shards import read_manifest
from taming_dist.data.images import to_uint8
from taming_dist.data.synthetic import ensure_synthetic, generate
from taming_dist.eval import classifier

OTHER_SEED = 2  # images of the built-in classes in neither split


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    entry = classifier.train_classifier(steps=120, samples=600)
    torch.save(entry, classifier.classifier_path(str(folder)))
    return str(folder)


def test_scores_separate_right_classes_and_real_images(cache):
    model, entry = classifier.load_classifier(cache)
    images, labels = generate(240, 32, 12, seed=OTHER_SEED)
    right = classifier.score_images(model, entry, images, labels)
    wrong = classifier.score_images(model, entry, images, (labels + 1) % 12)  # every label off by one
    assert right["class_accuracy"] > 0.6 > 0.2 > wrong["class_accuracy"]
    assert set(right["per_class_accuracy"]) == set(classifier.CLASS_NAMES)
    # real images sit near the held-out statistics, as far as as many training images do; pixel
    # noise and one class alone are far away
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    one_class = images[labels == 3]
    assert right["fd"] < 2 * right["fd_real"] + 1.0
    assert classifier.score_images(model, entry, noise, None)["fd"] > 10 * right["fd"]
    assert classifier.score_images(model, entry, one_class, None)["fd"] > 3 * right["fd"]
    assert "class_accuracy" not in classifier.score_images(model, entry, images, None)


def test_augment_bends_outlines_within_bounds_and_strength_zero_is_the_identity():
    images, _ = generate(32, 32, 12, seed=OTHER_SEED)
    x = classifier.to_input(images)
    torch.manual_seed(0)
    assert torch.allclose(classifier.augment(x, 0.0), x, atol=1e-5)
    bent = classifier.augment(x, 1.0)
    assert bent.shape == x.shape and bent.min() >= -1 and bent.max() <= 1
    diff = (bent - x).abs().mean((1, 2, 3))
    # every image changed, none beyond recognition: the mean change stays a fraction of the range
    assert (diff > 0.01).all() and diff.mean() < 0.25


def test_training_draws_imperfect_copies(monkeypatch):
    """The switch is on: every training step passes its batch through `augment` (and keeps the
    imperfect copy for three images in four)."""
    calls = []
    real = classifier.augment
    monkeypatch.setattr(classifier, "augment", lambda x: calls.append(x.shape[0]) or real(x))
    classifier.train_classifier(steps=3, samples=48)
    assert calls == [classifier.BATCH] * 3


def test_imperfect_copies_are_still_their_class(cache):
    """Scored like samples are: bent, shifted and softened copies of images in neither split keep
    their class, and the labels off by one still fail."""
    model, entry = classifier.load_classifier(cache)
    images, labels = generate(240, 32, 12, seed=OTHER_SEED)
    torch.manual_seed(1)
    with torch.no_grad():
        bent = classifier.augment(classifier.to_input(images), 1.0)
    bent = to_uint8(bent)
    assert classifier.score_images(model, entry, bent, labels)["class_accuracy"] > 0.6
    assert classifier.score_images(model, entry, bent, (labels + 1) % 12)["class_accuracy"] < 0.2


def test_other_sizes_are_resized_and_wrong_labels_refused(cache):
    model, entry = classifier.load_classifier(cache)
    images, labels = generate(96, 64, 12, seed=OTHER_SEED)
    assert classifier.score_images(model, entry, images, labels)["class_accuracy"] > 0.5
    with pytest.raises(ValueError, match="not of a model trained on it"):
        classifier.score_images(model, entry, images, labels + 12)


def test_the_classifier_is_trained_once_then_read_from_the_cache(cache, tmp_path, monkeypatch):
    entry = torch.load(classifier.classifier_path(cache), weights_only=True)
    calls = []
    monkeypatch.setattr(classifier, "train_classifier", lambda: calls.append(1) or entry)
    a, info = classifier.load_classifier(str(tmp_path))
    b, _ = classifier.load_classifier(str(tmp_path))
    assert calls == [1] and info["path"] == classifier.classifier_path(str(tmp_path))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_the_cache_file_names_the_data_version(tmp_path, monkeypatch):
    """A new version of the built-in data trains a new classifier instead of reading the old one."""
    from taming_dist.data import synthetic

    before = classifier.classifier_path(str(tmp_path))
    assert f"data{synthetic.VERSION}" in before and classifier.VERSION in before
    monkeypatch.setattr(synthetic, "VERSION", "v999")
    assert classifier.classifier_path(str(tmp_path)) != before


def test_eval_gen_without_inception_weights_scores_with_the_classifier(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TAMING_DIST_CACHE", cache)
    images, labels = generate(48, 32, 12, seed=OTHER_SEED)
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=images, arr_1=labels)
    assert main(["eval-gen", str(npz), "--out", str(tmp_path / "gen.json")]) == 0
    report = json.loads((tmp_path / "gen.json").read_text())
    assert report["scorer"] == "builtin-classifier" and report["samples"] == 48
    assert report["class_accuracy"] > 0.5 and report["fd"] > 0 and report["classifier"]["path"].startswith(cache)
    # a shard folder: labels from the samples' .cls
    shards = ensure_synthetic(DataConfig(size=32, synthetic_samples=48, synthetic_classes=12, split="heldout"),
                              cache_dir=str(tmp_path))
    capsys.readouterr()
    assert main(["eval-gen", shards]) == 0
    out = capsys.readouterr().out
    from_shards = json.loads(out[out.index("{"):])
    assert from_shards["samples"] == 48 and from_shards["class_accuracy"] > 0.5
    assert main(["eval-gen", str(npz), "--ref-stats", str(tmp_path / "x.npz")]) == 2
    assert "Inception statistics" in capsys.readouterr().err


def test_heldout_split_has_the_classes_but_other_images(tmp_path):
    cfg = dict(size=16, synthetic_samples=24, synthetic_classes=12)
    train = ensure_synthetic(DataConfig(**cfg), cache_dir=str(tmp_path))
    held = ensure_synthetic(DataConfig(**cfg, split="heldout"), cache_dir=str(tmp_path))
    assert train != held
    mt, mh = read_manifest(train), read_manifest(held)
    assert mt["class_names"] == mh["class_names"] and mt["class_counts"] == mh["class_counts"]
    assert (mt["seed"], mh["seed"]) == (0, 1)
    a, _ = generate(24, 16, 12, seed=0)
    b, _ = generate(24, 16, 12, seed=1)
    assert not any(np.array_equal(x, y) for x in a for y in b)
    with pytest.raises(ValueError, match="data.split"):
        DataConfig(split="val").validate()
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(kind="shards", path="x", split="heldout").validate()
