"""eval-recon, eval-gen and sampling at scale through the CLI, on tiny random models.

Known answers: the report's PSNR equals one computed here from the model; 1 and 2 ranks give the
same codebook counts and PSNR; samples are the same at any world size and never repeat; the FID of
a sample set against its own statistics is 0.
"""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from taming_dist.cli import main
from taming_dist.weights.folder import save_model_folder
from taming_dist.config import load_config
from taming_dist.data.shards import MANIFEST, SHARD_NAME, write_manifest, write_tar
from taming_dist.data.synthetic import generate
from taming_dist.eval.generate import iter_sample_images
from taming_dist.eval.metrics import psnr
from taming_dist.eval.recon import rank_shards
from taming_dist.models.transformer import Transformer
from taming_dist.models.vqgan import VQModel
from tests.distributed.util import run
from tests.unit.test_eval_metrics import random_inception

N_SHARDS, PER_SHARD = 4, 6


@pytest.fixture(scope="module")
def vqgan_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("vqgan-tiny").vqgan
    return save_model_folder(tmp_path_factory.mktemp("vq") / "model", "vqgan", cfg, VQModel(cfg).state_dict())


@pytest.fixture(scope="module")
def transformer_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("transformer-tiny", ["transformer.gpt.n_layer=1", "transformer.gpt.n_embd=64"]).transformer
    return save_model_folder(tmp_path_factory.mktemp("tr") / "model", "transformer", cfg, Transformer(cfg).state_dict())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards x 6 synthetic 32 px images."""
    folder = tmp_path_factory.mktemp("shards")
    images, labels = generate(N_SHARDS * PER_SHARD, 32, 4)
    entries = []
    for s in range(N_SHARDS):
        samples = []
        for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            samples.append({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(int(labels[i]))})
        count, nbytes = write_tar(str(folder / SHARD_NAME.format(s)), samples)
        entries.append({"name": SHARD_NAME.format(s), "count": count, "bytes": nbytes})
    write_manifest(str(folder), entries, ["a", "b", "c", "d"], np.bincount(labels, minlength=4).tolist())
    return folder, images


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """InceptionV3 with random weights in torchvision's layout (half precision: half the file)."""
    net = random_inception()
    path = tmp_path_factory.mktemp("inception") / "inception_v3_google-random.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, path)
    return path


def _recon(vqgan_folder, shards_folder, out, *extra):
    assert main(["eval-recon", str(vqgan_folder), str(shards_folder), "--out", str(out), "--batch-size", "5",
                 "--lpips-backbone", "random", *extra]) == 0
    return json.loads(out.read_text())


def test_eval_recon_report(tmp_path, vqgan_folder, shards):
    folder, images = shards
    report = _recon(vqgan_folder, folder, tmp_path / "r.json")
    n = N_SHARDS * PER_SHARD
    assert report["samples"] == n and report["skipped_samples"] == 0 and report["world_size"] == 1
    # PSNR by hand: the model's reconstructions of the shard images, rounded to 8 bits.
    model = VQModel(load_config("vqgan-tiny").vqgan)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(vqgan_folder / "model.safetensors")))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec, _, info = model.eval()(x)
    rec01 = rec.clamp(-1, 1).add(1).mul(127.5).round() / 255
    assert report["psnr"] == pytest.approx(psnr((x + 1) / 2, rec01).mean().item(), rel=1e-6)
    assert -1 < report["ssim"] < 1 and report["lpips"] > 0
    cb = report["codebook"]
    assert cb["tokens"] == n * 64 and sum(cb["counts"]) == n * 64 and cb["codebook_size"] == 128
    assert cb["codes_used"] == len(info["indices"].unique()) and cb["usage"] == cb["codes_used"] / 128
    assert 1 <= cb["perplexity"] <= cb["codes_used"]
    assert "rfid" not in report and any("rFID left out" in note for note in report["notes"])
    with Image.open(tmp_path / "r_examples.png") as grid:
        assert grid.size == (5 * 34 + 2, 2 * 34 + 2)  # 5 pairs (the first batch), 32 px tiles, 2 px padding


def test_rank_shards_split_and_max_samples(shards):
    folder, _ = shards
    one = rank_shards(str(folder), 0, 1, max_samples=14)
    assert [(off, take) for _, off, take in one] == [(0, 6), (6, 6), (12, 2)]
    two = [rank_shards(str(folder), r, 2, max_samples=14) for r in range(2)]
    assert sorted(p for r in two for p in r) == sorted(one)  # the same first 14 samples over 2 ranks
    assert [p[0].endswith(SHARD_NAME.format(1)) for p in two[1]] == [True]


def test_eval_recon_errors(tmp_path, vqgan_folder, transformer_folder, shards, capsys):
    folder, _ = shards
    args = [str(vqgan_folder), str(folder), "--out", str(tmp_path / "r.json")]
    assert main(["eval-recon", *args, "--inception-weights", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert "inception_v3_google-0cc3c7bd.pth" in err and "missing.pth" in err
    assert main(["eval-recon", *args, "--lpips-vgg", str(tmp_path / "vgg.pth")]) == 2
    assert "vgg16-397923af.pth" in capsys.readouterr().err
    assert main(["eval-recon", str(transformer_folder), str(folder), "--lpips-backbone", "random"]) == 2
    assert "VQGAN" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
@pytest.mark.one_process  # one process at a time: runs in the parallel batch (tests/conftest.py)
def test_eval_recon_rfid_with_local_inception(tmp_path, vqgan_folder, shards, inception_file):
    folder, _ = shards
    report = _recon(vqgan_folder, folder, tmp_path / "r.json", "--inception-weights", str(inception_file),
                    "--max-samples", "8")
    assert report["samples"] == 8 and np.isfinite(report["rfid"]) and report["rfid"] > 0
    assert any("torchvision's Inception" in note for note in report["notes"])


@pytest.mark.slow
def test_eval_recon_two_ranks_match_one(tmp_path, vqgan_folder, shards):
    folder, _ = shards
    one = _recon(vqgan_folder, folder, tmp_path / "one.json")
    run(["-m", "taming_dist", "eval-recon", str(vqgan_folder), str(folder), "--out", str(tmp_path / "two.json"),
         "--batch-size", "5", "--lpips-backbone", "random"], nproc=2)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["samples"] == one["samples"] == N_SHARDS * PER_SHARD
    assert two["codebook"] == one["codebook"]
    for key in ("psnr", "ssim", "lpips"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def _sample(model, out_dir, *extra):
    assert main(["sample", str(model), "--num-samples", "10", "--batch-size", "4", "--out-dir", str(out_dir),
                 "--seed", "3", *extra]) == 0


def _distinct(arr: np.ndarray) -> int:
    return len({a.tobytes() for a in arr})


def test_sample_at_scale_npz_and_shards(tmp_path, transformer_folder):
    _sample(transformer_folder, tmp_path / "npz", "--format", "npz", "--cfg-scale", "1.5", "--top-k", "50")
    with np.load(tmp_path / "npz" / "samples.npz") as data:
        arr, labels = data["arr_0"], data["arr_1"]
    assert arr.shape == (10, 32, 32, 3) and arr.dtype == np.uint8 and _distinct(arr) == 10
    assert labels.tolist() == [i % 12 for i in range(10)]
    assert (tmp_path / "npz" / "grid.png").exists()
    assert not list((tmp_path / "npz").glob(".part-*"))

    _sample(transformer_folder, tmp_path / "sh", "--format", "shards", "--shard-size", "3", "--classes", "2,5",
            "--cfg-scale", "1.5", "--top-k", "50")
    manifest = json.loads((tmp_path / "sh" / MANIFEST).read_text())
    assert manifest["total"] == 10 and [s["count"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert manifest["class_counts"][2] == 5 and manifest["class_counts"][5] == 5
    assert manifest["sampling"]["cfg_scale"] == 1.5 and manifest["sampling"]["seed"] == 3
    shard_imgs = np.concatenate(list(iter_sample_images(str(tmp_path / "sh"), batch_size=4)))
    assert shard_imgs.shape == (10, 32, 32, 3) and _distinct(shard_imgs) == 10
    assert not np.array_equal(shard_imgs, arr)  # other labels, other images

    assert main(["sample", str(transformer_folder), "--out-dir", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_sample_at_scale_two_ranks(tmp_path, transformer_folder):
    _sample(transformer_folder, tmp_path / "one", "--format", "npz")
    run(["-m", "taming_dist", "sample", str(transformer_folder), "--num-samples", "10", "--batch-size", "4",
         "--out-dir", str(tmp_path / "two"), "--seed", "3", "--format", "npz"], nproc=2)
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        one, two = a["arr_0"], b["arr_0"]
        assert np.array_equal(a["arr_1"], b["arr_1"])
    assert two.shape == (10, 32, 32, 3) and two.dtype == np.uint8 and _distinct(two) == 10
    assert np.array_equal(one, two)  # the same samples at any world size
    run(["-m", "taming_dist", "sample", str(transformer_folder), "--num-samples", "10", "--batch-size", "4",
         "--out-dir", str(tmp_path / "sh"), "--seed", "3", "--format", "shards"], nproc=2)
    names = sorted(s["name"] for s in json.loads((tmp_path / "sh" / MANIFEST).read_text())["shards"])
    assert names == ["shard-r0-000000.tar", "shard-r1-000000.tar"]
    imgs = np.concatenate(list(iter_sample_images(str(tmp_path / "sh"), batch_size=4)))
    assert _distinct(imgs) == 10 and {a.tobytes() for a in imgs} == {a.tobytes() for a in one}


@pytest.mark.slow
@pytest.mark.one_process
def test_eval_gen_fid_of_a_set_against_itself_is_zero(tmp_path, transformer_folder, inception_file, shards, capsys):
    _sample(transformer_folder, tmp_path / "s", "--format", "shards")
    _sample(transformer_folder, tmp_path / "s", "--format", "npz")
    stats = tmp_path / "ref.npz"
    w = ["--inception-weights", str(inception_file), "--batch-size", "5"]
    assert main(["eval-gen", str(tmp_path / "s"), "--save-stats", str(stats), *w]) == 0
    with np.load(stats) as data:
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048) and int(data["n"]) == 10
    capsys.readouterr()
    assert main(["eval-gen", str(tmp_path / "s" / "samples.npz"), "--ref-stats", str(stats), "--is-splits", "2",
                 "--out", str(tmp_path / "gen.json"), *w]) == 0
    result = json.loads((tmp_path / "gen.json").read_text())
    assert result["samples"] == 10 and result["inception"] == "torchvision" and result["is_splits"] == 2
    assert abs(result["fid"]) < 1e-6 * max(1.0, float(np.trace(np.load(stats)["sigma"])))
    assert result["inception_score"] >= 1.0
    # Against other images (the synthetic shards) the distance is far from 0.
    other = tmp_path / "other.npz"
    assert main(["eval-gen", str(shards[0]), "--save-stats", str(other), *w]) == 0
    assert main(["eval-gen", str(tmp_path / "s" / "samples.npz"), "--ref-stats", str(other), "--out",
                 str(tmp_path / "gen2.json"), *w]) == 0
    assert json.loads((tmp_path / "gen2.json").read_text())["fid"] > 1.0
    assert main(["eval-gen", str(tmp_path / "s" / "samples.npz"), "--ref-stats", str(tmp_path / "no.npz"), *w]) == 2
    assert "--save-stats" in capsys.readouterr().err
