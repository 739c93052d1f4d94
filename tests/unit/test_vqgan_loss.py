"""The VQGAN loss pieces against hand computations and the original formulas; LPIPS loading."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from taming_dist.config import VQLossConfig
from taming_dist.losses.lpips import VGG16_FILE, build_lpips, lpips_state_dict, map_vgg16_features
from taming_dist.losses.vqgan import VQGANLoss


def _loss(**kw):
    return VQGANLoss(VQLossConfig(lpips_backbone="random", **kw))


def test_reconstruction_is_l1_plus_weighted_lpips():
    torch.manual_seed(0)
    loss = _loss(perceptual_weight=0.7, pixel_weight=2.0)
    x, r = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    nll, logs = loss.reconstruction_loss(x, r)
    p = loss.perceptual_loss(x, r)
    expected = (2.0 * (x - r).abs() + 0.7 * p).mean()
    torch.testing.assert_close(nll, expected)
    assert float(logs["lpips"]) == pytest.approx(float(p.mean()), rel=1e-6)
    zero, _ = loss.reconstruction_loss(x, x)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)


def test_no_lpips_when_weight_zero():
    loss = _loss(perceptual_weight=0.0)
    assert loss.perceptual_loss is None
    x, r = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    assert float(loss.reconstruction_loss(x, r)[0]) == 1.0


def test_adaptive_weight_equals_original_autograd_formula():
    torch.manual_seed(0)
    last = nn.Conv2d(8, 3, 3, padding=1)
    h = torch.randn(2, 8, 8, 8)
    rec = last(h)
    x = torch.randn_like(rec)
    nll = (x - rec).abs().mean()
    g = -nn.Conv2d(3, 1, 3)(rec).mean()
    # the original: grads w.r.t. the last layer's weight, taken with autograd.grad
    gn = torch.autograd.grad(nll, last.weight, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last.weight, retain_graph=True)[0]
    original = torch.clamp(torch.norm(gn) / (torch.norm(gg) + 1e-4), 0.0, 1e4).detach() * 0.8
    assert float(VQGANLoss.adaptive_weight(gn, gg, 0.8)) == pytest.approx(float(original))
    # the task's route: grads w.r.t. the reconstruction mapped through conv2d_weight
    go_n = torch.autograd.grad(nll, rec, retain_graph=True)[0]
    go_g = torch.autograd.grad(g, rec)[0]
    wn = torch.nn.grad.conv2d_weight(h, last.weight.shape, go_n, padding=1)
    wg = torch.nn.grad.conv2d_weight(h, last.weight.shape, go_g, padding=1)
    torch.testing.assert_close(wn, gn)
    assert float(VQGANLoss.adaptive_weight(wn, wg, 0.8)) == pytest.approx(float(original), rel=1e-5)


def test_disc_start_gates_gan_terms():
    loss = _loss(disc_start=10, disc_factor=1.0, codebook_weight=0.5)
    assert loss.disc_factor(9) == 0.0 and loss.disc_factor(10) == 1.0
    nll, q, g = torch.tensor(1.0), torch.tensor([2.0, 4.0]), torch.tensor(3.0)
    total, _ = loss.generator_loss(nll, q, g, torch.tensor(0.5), step=9)
    assert float(total) == pytest.approx(1.0 + 0.5 * 3.0)
    total, _ = loss.generator_loss(nll, q, g, torch.tensor(0.5), step=10)
    assert float(total) == pytest.approx(1.0 + 0.5 * 3.0 + 0.5 * 3.0)
    d, _ = loss.discriminator_loss(torch.ones(2), -torch.ones(2), step=9)
    assert float(d) == 0.0


def test_discriminator_and_generator_losses():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-0.5, 1.0])
    hinge = _loss(disc_loss="hinge")
    d, logs = hinge.discriminator_loss(real, fake, 0)
    assert float(d) == pytest.approx(0.5 * ((0.5 + 0.0) / 2 + (0.5 + 2.0) / 2))
    assert float(hinge.generator_adv_loss(fake)) == pytest.approx(-0.25)
    vanilla = _loss(disc_loss="vanilla")
    d, _ = vanilla.discriminator_loss(real, fake, 0)
    assert float(d) == pytest.approx(float(0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())))
    ns = _loss(disc_loss="non_saturating")
    assert float(ns.generator_adv_loss(fake)) == pytest.approx(float(F.softplus(-fake).mean()))


def test_reductions_in_fp32_under_autocast():
    loss = _loss(perceptual_weight=0.0)
    x = torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, _ = loss.reconstruction_loss(x, (x + 0.001).bfloat16())
        g = loss.generator_adv_loss(torch.randn(4).bfloat16())
    assert nll.dtype == torch.float32 and g.dtype == torch.float32


def test_lpips_missing_vgg_file_names_it(tmp_path):
    cfg = VQLossConfig(lpips_vgg_path=str(tmp_path / "nope" / VGG16_FILE))
    with pytest.raises(FileNotFoundError) as e:
        build_lpips(cfg)
    assert str(tmp_path / "nope" / VGG16_FILE) in str(e.value) and "lpips_backbone=random" in str(e.value)


def test_lpips_loads_local_vgg16_weights(tmp_path):
    # A fake torchvision VGG16 file: `features.N.*` tensors of the right shapes (the classifier
    # is irrelevant to LPIPS and left out to keep the file small).
    torch.manual_seed(1)
    shapes = {k: v.shape for k, v in build_lpips(VQLossConfig(lpips_backbone="random")).state_dict().items()
              if k.startswith("net.slice")}
    fake = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": torch.randn(s) for k, s in shapes.items()}
    path = tmp_path / VGG16_FILE
    torch.save(fake, path)
    model = build_lpips(VQLossConfig(lpips_vgg_path=str(path)))
    torch.testing.assert_close(model.net.slice1[0].weight, fake["features.0.weight"])
    torch.testing.assert_close(getattr(model.net.slice5, "28").bias, fake["features.28.bias"])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert len(map_vgg16_features(fake)) == 26
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        build_lpips(VQLossConfig(lpips_vgg_path=str(tmp_path / "bad.pth")))
    keys = lpips_state_dict(model).keys()
    assert "lin0.model.1.weight" in keys and not any(k.startswith("lins.") for k in keys)
