"""`export --format diffusers` and `import-diffusers`, checked against diffusers' own VQModel: a strict
load, the same code indices (synthetic images, photographs, near-tie latents), the same decode, the
refusals, and ours -> diffusers -> ours bit for bit."""
import json

import pytest
import torch
from safetensors.torch import load_file

from taming_dist.cli import main
from taming_dist.models.vqgan import VQModel
from tests.unit.interop_util import (
    near_tie_codebook,
    photo_folder,
    photographs,
    save_vqgan,
    synthetic_images,
    trained_vqgan,
    vq_config,
)

diffusers = pytest.importorskip("diffusers")


def diffusers_codes(dmodel, x: torch.Tensor) -> torch.Tensor:
    """diffusers' own path: encode -> latents, quantize -> flat indices."""
    h = dmodel.encode(x).latents
    return dmodel.quantize(h)[2][2].view(x.shape[0], h.shape[2], h.shape[3])


def diffusers_decode(dmodel, codes: torch.Tensor) -> torch.Tensor:
    B, H, W = codes.shape
    latents = dmodel.quantize.get_codebook_entry(codes.flatten(), (B, H, W, dmodel.config.vq_embed_dim))
    return dmodel.decode(latents, force_not_quantize=True).sample


@pytest.fixture(scope="module", params=["vq", "ema"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"diffusers-{request.param}")
    model = trained_vqgan(vq_config(request.param))
    save_vqgan(tmp / "ours", model)
    assert main(["export", str(tmp / "ours"), str(tmp / "hf"), "--format", "diffusers"]) == 0
    dmodel, info = diffusers.VQModel.from_pretrained(str(tmp / "hf"), output_loading_info=True)
    return model, dmodel.eval(), info, tmp


def test_loads_strictly_without_training_buffers(exported):
    model, dmodel, info, tmp = exported
    assert all(not v for v in info.values()), info  # missing, unexpected, mismatched, error_msgs
    sd = load_file(tmp / "hf" / "diffusion_pytorch_model.safetensors")
    assert not any(k.endswith(("code_offset", "code_usage", "kmeans_done", "ema_cluster_size")) for k in sd)
    # the k-means / restart offset is in the codebook, which is ours as the lookup uses it
    assert torch.equal(dmodel.quantize.embedding.weight, model.quantize.codebook().detach())
    config = json.loads((tmp / "hf" / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["down_block_types"][-1] == "AttnDownEncoderBlock2D"


def test_same_codes_and_decode_on_synthetic_images(exported):
    model, dmodel, _, _ = exported
    x = synthetic_images(12)
    with torch.no_grad():
        ours, theirs = model.encode_to_indices(x), diffusers_codes(dmodel, x)
        assert torch.equal(ours, theirs)
        torch.testing.assert_close(diffusers_decode(dmodel, ours), model.decode_code(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(photo_folder() is None, reason="real photographs come from scikit-image's data folder "
                                                     "(pip install scikit-image)")
def test_same_codes_and_decode_on_photographs(exported):
    model, dmodel, _, _ = exported
    x = photographs(32, crops=4)  # 24 crops of 6 photographs
    with torch.no_grad():
        ours, theirs = model.encode_to_indices(x), diffusers_codes(dmodel, x)
        assert torch.equal(ours, theirs)
        torch.testing.assert_close(diffusers_decode(dmodel, ours), model.decode_code(ours), rtol=1e-5, atol=1e-5)


def test_same_codes_on_near_ties(tmp_path):
    """Latents placed between two codes whose squared distances differ by 1e-2 .. 1e-5 of |z|^2: both
    libraries pick the nearer one. (Below ~1e-6 of |z|^2 the gap is inside float32 rounding of the
    distance, where ours (|z|^2 + |e|^2 - 2 z.e) and diffusers' (torch.cdist) may each pick either.)"""
    x = synthetic_images(2)  # 2 x 8 x 8 = 128 latents -> needs 256 codes
    model = trained_vqgan(vq_config("vq", n_embed=256))
    nearer, gaps = near_tie_codebook(model, x, [1e-2, 1e-3, 1e-4, 1e-5])
    save_vqgan(tmp_path / "ours", model)
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"), "--format", "diffusers"]) == 0
    dmodel = diffusers.VQModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ours, theirs = model.encode_to_indices(x), diffusers_codes(dmodel, x)
    assert torch.equal(ours, nearer)
    assert torch.equal(theirs, nearer)


@pytest.mark.parametrize("kind,override", [("gumbel", {}), ("l2", {}), ("fsq", {}), ("lfq", {})])
def test_refuses_quantizers_diffusers_cannot_hold(tmp_path, kind, override, capsys):
    from taming_dist.config import QuantizerConfig

    cfg = vq_config("vq", training_buffers=False)
    cfg.quantizer = {"gumbel": QuantizerConfig(kind="gumbel", n_embed=128, embed_dim=16),
                     "l2": QuantizerConfig(kind="l2", n_embed=128, embed_dim=16),
                     "fsq": QuantizerConfig(kind="fsq", levels=[8, 4, 4], n_embed=128, embed_dim=3),
                     "lfq": QuantizerConfig(kind="lfq", codebook_dim=7, n_embed=128, embed_dim=7)}[kind]
    save_vqgan(tmp_path / "ours", VQModel(cfg))
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert f"quantizer.kind={kind}" in err and "--format onnx" in err
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ours"]


def test_refuses_a_first_level_wider_than_ch(tmp_path, capsys):
    save_vqgan(tmp_path / "ours", VQModel(vq_config("vq", training_buffers=False, ch_mult=[2, 2, 2])))
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"), "--format", "diffusers"]) == 2
    assert "ch_mult[0]=2" in capsys.readouterr().err


def test_round_trip_ours_diffusers_ours_is_bit_exact(exported, tmp_path):
    model, _, _, tmp = exported
    assert main(["import-diffusers", str(tmp / "hf"), str(tmp_path / "back")]) == 0
    back = VQModel.from_pretrained(tmp_path / "back")
    meta = json.loads((tmp_path / "back" / "config.json").read_text())
    assert meta["imported_from"] == "diffusers"
    want = {k: v for k, v in model.state_dict().items()
            if k.split(".")[-1] not in ("code_offset", "code_usage", "kmeans_done", "ema_cluster_size", "ema_embed_sum")}
    want["quantize.embedding.weight"] = model.quantize.codebook().detach()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    x = synthetic_images(4)
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])


def test_a_diffusers_made_vqmodel_imports_and_computes_the_same(tmp_path):
    """A VQModel built by diffusers itself (its own init, 2 levels, attention in the last) -> our
    folder -> the same reconstruction; and it starts a training run through init_from."""
    torch.manual_seed(0)
    dmodel = diffusers.VQModel(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                               up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                               block_out_channels=[32, 64], layers_per_block=1, latent_channels=8,
                               num_vq_embeddings=64, vq_embed_dim=4, sample_size=16).eval()
    dmodel.save_pretrained(str(tmp_path / "hf"))
    assert main(["import-diffusers", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = VQModel.from_pretrained(tmp_path / "ours")
    assert ours.config.ddconfig.attn_resolutions == [8] and ours.config.ddconfig.ch_mult == [1, 2]
    x = synthetic_images(3, 16)
    with torch.no_grad():
        assert torch.equal(ours.encode_to_indices(x), diffusers_codes(dmodel, x))
        torch.testing.assert_close(ours(x)[0], dmodel(x).sample, rtol=1e-5, atol=1e-5)


def test_refuses_blocks_that_do_not_fit(tmp_path, capsys):
    dmodel = diffusers.VQModel(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                               up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
                               block_out_channels=[32, 64], layers_per_block=1, latent_channels=8,
                               num_vq_embeddings=64, sample_size=16)
    dmodel.save_pretrained(str(tmp_path / "hf"))
    assert main(["import-diffusers", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    assert "attention levels" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


@pytest.mark.slow
def test_an_imported_diffusers_vqmodel_trains_with_init_from(tmp_path):
    """A diffusers-made VQModel shaped like vqgan-tiny -> import-diffusers -> `train vqgan-tiny
    init_from=OUT` (the single engine, in-process): training starts from its weights. (init_from
    itself is engine-independent and tested into FSDP2 and ZeRO-3 in tests/e2e/test_convert_export.py.)"""
    torch.manual_seed(0)
    dmodel = diffusers.VQModel(down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                               up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                               block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=32,
                               num_vq_embeddings=128, vq_embed_dim=32, sample_size=32)
    dmodel.save_pretrained(str(tmp_path / "hf"))
    assert main(["import-diffusers", str(tmp_path / "hf"), str(tmp_path / "init")]) == 0
    assert main(["train", "vqgan-tiny", f"out_dir={tmp_path}", "name=r", f"init_from={tmp_path / 'init'}",
                 "train.steps=1", "train.global_batch_size=2", "train.image_every=0", "train.ckpt_every=1",
                 "data.synthetic_samples=16", "logging.wandb_mode=disabled", "logging.progress=false"]) == 0
    start = load_file(tmp_path / "init" / "model.safetensors")
    trained = load_file(tmp_path / "r" / "model" / "model.safetensors")
    fresh = VQModel(vq_config("vq", training_buffers=False, attn_resolutions=[8])).state_dict()
    key = "encoder.conv_in.weight"
    step = (trained[key] - start[key]).abs().max()
    assert 0 < step < 1e-2 < (trained[key] - fresh[key]).abs().max()
