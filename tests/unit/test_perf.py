"""FLOP accounting for MFU (taming_dist/perf.py): the fake-tensor count against real training steps."""
import pytest
import torch

from taming_dist.config import load_config
from taming_dist.engines import DistEnv, build_engine
from taming_dist.perf import (
    PARTS, PEAK_FLOPS, device_peak_flops, flop_counter, mfu, peak_flops_for_name, transformer_step_flops,
    vqgan_step_flops,
)
from tests.distributed.harness import make_cfg


def _tiny_vqgan(*extra):
    # 16 px, LPIPS (random backbone) and the GAN terms on from step 0: every part of the step runs.
    return make_cfg("vqgan", "single", 2, "fp32", False, 4, extra=extra)


def test_fake_count_equals_the_real_training_step():
    from taming_dist.train.loop import build_task

    cfg = _tiny_vqgan()
    torch.manual_seed(0)
    task = build_task(cfg, build_engine(cfg.engine, DistEnv(), torch.device("cpu")), 1)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with flop_counter() as real:
        task.train_step([{"image": x}], 0)
    counted = vqgan_step_flops(cfg, 4)
    assert real.get_total_flops() > 0
    assert counted["total"] == real.get_total_flops()
    assert sum(counted[p] for p in PARTS) == counted["total"]
    assert counted["generator_step"] + counted["discriminator_step"] == counted["total"]
    assert all(counted[p] > 0 for p in PARTS)


def test_parts_are_attributed_to_their_modules():
    from taming_dist.models.vqgan import VQModel

    cfg = _tiny_vqgan()
    model = VQModel(cfg.vqgan)
    x = torch.rand(4, 3, 16, 16)
    with flop_counter() as c:  # the encoder alone: forward, backward to its weights (not to x)
        z = model.encoder(x)
        z.backward(torch.ones_like(z))
    assert vqgan_step_flops(cfg, 4)["encoder"] == c.get_total_flops()


def test_count_is_linear_in_the_micro_batch_and_follows_the_loss_settings():
    cfg = _tiny_vqgan()
    one, three = vqgan_step_flops(cfg, 1), vqgan_step_flops(cfg, 3)
    assert three["total"] == 3 * one["total"] and three["per_image"] == one["per_image"]
    before_gan = vqgan_step_flops(cfg, 1, gan=False)
    assert before_gan["discriminator"] == 0 and before_gan["discriminator_step"] == 0
    assert before_gan["total"] < one["total"]
    assert vqgan_step_flops(_tiny_vqgan("loss.perceptual_weight=0.0"), 1)["lpips"] == 0


def test_big_config_is_counted_without_computing():
    # vqgan-f16-16384 at 256 px: on fake tensors, nothing is allocated
    out = vqgan_step_flops(load_config("vqgan-f16-16384"), 1)
    assert 1e12 < out["per_image"] < 1e13
    assert out["decoder"] > out["encoder"] > out["discriminator"] > 0


def test_transformer_flops_are_flops_per_token_times_the_tokens_fed():
    from taming_dist.models.transformer import Transformer

    cfg = load_config("transformer-tiny")
    model = Transformer(cfg.transformer)
    T = 1 + 64 - 1  # class token + 8x8 codes, minus the last (block_size is 80)
    assert transformer_step_flops(cfg) == model.transformer.flops_per_token(T) * T
    # and 6N + attention is the counted forward + backward of the GPT to within a few percent
    idx = torch.randint(0, 128, (2, T))
    with flop_counter() as c:
        model.transformer(idx).float().sum().backward()
    assert c.get_total_flops() / 2 == pytest.approx(transformer_step_flops(cfg), rel=0.05)


def test_peak_flops_by_device_name():
    assert device_peak_flops("cpu", torch.bfloat16) is None
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", "bf16") == PEAK_FLOPS["H100 SXM"]["bf16"] == 989.5e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.5e12
    assert peak_flops_for_name("NVIDIA H200", "tf32") == 494.5e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    for other in ("NVIDIA H100 PCIe", "NVIDIA H200 NVL", "Tesla V100-SXM2-32GB", "NVIDIA GeForce RTX 4090"):
        assert peak_flops_for_name(other, "bf16") is None, other


def test_mfu_arithmetic():
    # 4e14 FLOPs per step over 8 devices of 1e14 FLOP/s in 1 s: half the peak
    assert mfu(4e14, 1.0, 8, 1e14) == pytest.approx(0.5)
    assert mfu(4e14, 2.0, 8, 1e14) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="step_seconds > 0"):
        mfu(1.0, 0.0, 1, 1e12)
