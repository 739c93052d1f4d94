"""The VQGAN loss terms against hand computations and the original formulas; LPIPS built offline."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from taming_dist.config import VQLossConfig
from taming_dist.losses.lpips import VGG16_FILE, build_lpips, lpips_keys
from taming_dist.losses.vqgan import VQGANLoss

# torchvision's VGG16 `features`: conv output widths, "M" = max-pool (a layer without weights)
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def fake_vgg16_features(seed: int = 0) -> dict:
    """Random tensors with the keys and shapes of torchvision's vgg16-397923af.pth `features.*`."""
    g = torch.Generator().manual_seed(seed)
    out, idx, cin = {}, 0, 3
    for v in VGG16_CFG:
        if v == "M":
            idx += 1
            continue
        out[f"features.{idx}.weight"] = torch.randn(v, cin, 3, 3, generator=g) * 0.05
        out[f"features.{idx}.bias"] = torch.randn(v, generator=g) * 0.05
        idx, cin = idx + 2, v  # conv, ReLU
    return out


def _loss(**kw) -> VQGANLoss:
    return VQGANLoss(VQLossConfig(lpips_backbone="random", **{"perceptual_weight": 0.0, **kw}))


@pytest.fixture(scope="module")
def lpips_loss() -> VQGANLoss:
    torch.manual_seed(0)  # the random backbone
    return _loss(perceptual_weight=0.7, pixel_weight=2.0)


def test_reconstruction_is_weighted_l1_plus_weighted_lpips(lpips_loss):
    torch.manual_seed(1)
    x, r = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    nll, logs = lpips_loss.reconstruction_loss(x, r)
    p = lpips_loss.perceptual_loss(x, r)
    assert p.shape == (2, 1, 1, 1) and float(p.min()) > 0
    expected = (2.0 * (x - r).abs() + 0.7 * p).mean()
    torch.testing.assert_close(nll, expected)
    assert float(logs["lpips"]) == pytest.approx(float(p.mean()), rel=1e-5)
    assert float(logs["l1"]) == pytest.approx(float((x - r).abs().mean()), rel=1e-6)
    assert float(lpips_loss.reconstruction_loss(x, x)[0]) == pytest.approx(0.0, abs=1e-6)
    lpips_loss.train()
    assert not lpips_loss.perceptual_loss.training  # frozen, whatever the caller's mode
    assert not any(q.requires_grad for q in lpips_loss.perceptual_loss.parameters())


def test_no_lpips_when_its_weight_is_zero():
    loss = _loss(pixel_weight=0.5)
    assert loss.perceptual_loss is None
    nll, logs = loss.reconstruction_loss(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8))
    assert float(nll) == 0.5 and "lpips" not in logs


def test_l2_pixel_loss_is_the_squared_error_and_its_gradient_is_linear():
    torch.manual_seed(2)
    x, r = torch.rand(2, 3, 8, 8) * 2 - 1, (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_()
    l1, l2 = _loss(pixel_weight=2.0), _loss(pixel_weight=2.0, pixel_loss="l2")
    nll1, logs1 = l1.reconstruction_loss(x, r)
    nll2, logs2 = l2.reconstruction_loss(x, r)
    torch.testing.assert_close(nll1, 2.0 * (x - r).abs().mean())
    torch.testing.assert_close(nll2, 2.0 * (x - r).square().mean())
    for logs in (logs1, logs2):  # both errors are logged whichever one trains
        assert float(logs["l1"]) == pytest.approx(float((x - r).abs().mean()), rel=1e-6)
        assert float(logs["mse"]) == pytest.approx(float((x - r).square().mean()), rel=1e-6)
    # the switch is on: l2's gradient is proportional to the error, l1's is its sign
    (g2,) = torch.autograd.grad(nll2, r)
    (g1,) = torch.autograd.grad(nll1, r)
    n = r.numel()
    torch.testing.assert_close(g2, 2.0 * 2 * (r - x).detach() / n)
    torch.testing.assert_close(g1, 2.0 * torch.sign(r - x).detach() / n)
    with pytest.raises(ValueError, match="pixel_loss 'l3' is not one of l1"):
        _loss(pixel_loss="l3")


def test_generator_adversarial_terms():
    fake = torch.tensor([-0.5, 1.0, 2.5])
    assert float(_loss(disc_loss="hinge").generator_adv_loss(fake)) == pytest.approx(-1.0)
    assert float(_loss(disc_loss="vanilla").generator_adv_loss(fake)) == pytest.approx(-1.0)
    ns = float(_loss(disc_loss="non_saturating").generator_adv_loss(fake))
    assert ns == pytest.approx(sum(torch.log1p(torch.exp(-fake)).tolist()) / 3)


def test_discriminator_terms():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-0.5, 1.0])
    d, logs = _loss(disc_loss="hinge").discriminator_loss(real, fake, step=0)
    # relu(1 - real) = [0.5, 0], relu(1 + fake) = [0.5, 2]
    assert float(d) == pytest.approx(0.5 * (0.25 + 1.25))
    assert float(logs["logits_real"]) == 1.25 and float(logs["logits_fake"]) == 0.25
    logistic = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    for kind in ("vanilla", "non_saturating"):
        d, _ = _loss(disc_loss=kind).discriminator_loss(real, fake, step=0)
        assert float(d) == pytest.approx(float(logistic))


def _objective(loss, nll_value, q, g_value, step, d_weight=None):
    """generator_objective on a reconstruction whose nll and GAN term are chosen by hand: rec is a
    (1,1,1,1) tensor, x = rec - nll_value / pixel_weight, the discriminator returns -g_value."""
    rec = torch.zeros(1, 1, 1, 1)
    x = rec - nll_value / loss.cfg.pixel_weight
    return loss.generator_objective(x, rec, q, step, disc_fn=lambda r: r * 0 - g_value + 0 * r)


def test_generator_objective_sums_the_terms():
    loss = _loss(codebook_weight=0.5, disc_factor=0.8, adaptive_weight=False, disc_weight=0.25)
    obj = _objective(loss, 1.5, torch.tensor([2.0, 4.0]), 3.0, step=0)
    assert float(obj.loss) == pytest.approx(1.5 + 0.25 * 0.8 * 3.0 + 0.5 * 3.0)
    assert {k: round(float(v), 6) for k, v in obj.logs.items() if k not in ("l1", "mse")} == {
        "loss": round(float(obj.loss), 6), "nll": 1.5, "quant_loss": 3.0, "g_loss": 3.0, "d_weight": 0.25,
        "disc_factor": 0.8}
    assert all(not v.requires_grad for v in obj.logs.values())


def test_disc_start_gates_the_gan_terms():
    loss = _loss(disc_start=10, disc_factor=1.0, codebook_weight=1.0, adaptive_weight=False, disc_weight=0.5)
    assert loss.disc_factor(9) == 0.0 and loss.disc_factor(10) == 1.0 and loss.disc_factor(11) == 1.0
    q = torch.tensor(2.0)
    assert float(_objective(loss, 1.0, q, 3.0, step=9).loss) == pytest.approx(3.0)
    assert float(_objective(loss, 1.0, q, 3.0, step=10).loss) == pytest.approx(4.5)
    assert float(loss.discriminator_loss(torch.zeros(2), torch.zeros(2), step=9)[0]) == 0.0
    assert float(loss.discriminator_loss(torch.zeros(2), torch.zeros(2), step=10)[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("adaptive", [True, False])
def test_surrogate_gradient_equals_autograd_of_the_true_generator_loss(adaptive):
    """The single backward of `surrogate(xrec)` (what every engine trains with) gives each generator
    parameter the gradient of nll + d_weight * disc_factor * g_loss + codebook_weight * qloss computed
    directly by autograd, with d_weight from autograd w.r.t. the decoder's last weight (taming's
    calculate_adaptive_weight)."""
    from taming_dist.config import DiscriminatorConfig, load_config
    from taming_dist.models.discriminator import NLayerDiscriminator
    from taming_dist.models.vqgan import VQModel

    cfg = load_config("vqgan-tiny", ["vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,1]",
                                     "vqgan.ddconfig.resolution=16", "vqgan.ddconfig.attn_resolutions=[8]"])
    torch.manual_seed(0)
    model = VQModel(cfg.vqgan).double()  # double: the comparison is of formulas, not of rounding
    disc = NLayerDiscriminator(DiscriminatorConfig(n_layers=2, norm="none")).double()
    loss = _loss(perceptual_weight=0.0, pixel_weight=1.3, codebook_weight=0.7, disc_factor=0.6,
                 disc_weight=0.9, adaptive_weight=adaptive).double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64) * 2 - 1
    captured = {}
    model.decoder.conv_out.register_forward_hook(lambda m, i, o: captured.update(h=i[0]))
    params = [p for p in model.parameters() if p.requires_grad]

    # the true loss, by autograd
    xrec, qloss, _ = model(x)
    nll = loss.cfg.pixel_weight * (x - xrec).abs().mean()
    g = -disc(xrec).mean()
    last = model.get_last_layer()
    if adaptive:
        gn = torch.autograd.grad(nll, last, retain_graph=True)[0]
        gg = torch.autograd.grad(g, last, retain_graph=True)[0]
        d_weight = torch.clamp(gn.norm() / (gg.norm() + 1e-4), 0.0, 1e4).detach() * 0.9
    else:
        d_weight = 0.9
    true = nll + d_weight * 0.6 * g + 0.7 * qloss.mean()
    want = torch.autograd.grad(true, params, allow_unused=True)

    # the objective's single backward
    xrec, qloss, _ = model(x)
    h = captured["h"].detach()
    lastgrad = lambda go: torch.nn.grad.conv2d_weight(h, last.shape, go, stride=1, padding=1)  # noqa: E731
    for p in disc.parameters():
        p.requires_grad_(False)
    obj = loss.generator_objective(x, xrec, qloss, step=0, disc_fn=disc, last_layer_grad=lastgrad)
    got = torch.autograd.grad(obj.surrogate(xrec), params, allow_unused=True)
    assert float(obj.loss) == pytest.approx(float(true), rel=1e-9)
    assert float(obj.logs["d_weight"]) == pytest.approx(float(d_weight), rel=1e-9)
    scale = max(float(w.abs().max()) for w in want if w is not None)
    for p, w, g_ in zip(params, want, got):
        if w is None:
            assert g_ is None or float(g_.abs().max()) == 0.0
            continue
        # atol: biases that GroupNorm cancels have analytically zero gradients (float64 noise ~1e-17)
        torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-12 * scale)


def test_adaptive_weight_equals_the_original_autograd_formula():
    """taming's calculate_adaptive_weight, computed the single-process way: autograd.grad of both
    losses w.r.t. the decoder's last conv weight."""
    torch.manual_seed(0)
    decoder_tail = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    last = decoder_tail[2].weight
    disc = nn.Conv2d(3, 1, 4, stride=2)
    h, x = torch.randn(2, 8, 8, 8), torch.rand(2, 3, 8, 8) * 2 - 1
    xrec = decoder_tail(h)
    nll = (x - xrec).abs().mean()
    g_loss = -disc(xrec).mean()
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    original = torch.clamp(torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4), 0.0, 1e4).detach() * 0.8
    w = VQGANLoss.adaptive_weight(nll_grad, g_grad, 0.8)
    assert not w.requires_grad and 0 < float(w) < 0.8 * 1e4
    torch.testing.assert_close(w, original)
    # no GAN gradient: sqrt(10) / 1e-4 is clamped to 1e4
    assert float(VQGANLoss.adaptive_weight(torch.ones(10), torch.zeros(10), 0.5)) == pytest.approx(0.5e4)


def test_reductions_are_fp32_under_bf16_autocast(lpips_loss):
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, logs = lpips_loss.reconstruction_loss(x, (x * 0.9).bfloat16())
        g = lpips_loss.generator_adv_loss(torch.randn(4).bfloat16())
        d, dlogs = lpips_loss.discriminator_loss(torch.randn(4).bfloat16(), torch.randn(4).bfloat16(), step=0)
        obj = lpips_loss.generator_objective(x, (x * 0.9).bfloat16(), torch.tensor(0.1).bfloat16(), step=0,
                                             disc_fn=lambda r: -r.mean(), last_layer_grad=lambda go: go)
    total, glogs = obj.loss, obj.logs
    for t in (nll, logs["lpips"], g, d, dlogs["logits_real"], total, glogs["quant_loss"], obj.grad_rec):
        assert t.dtype == torch.float32
    assert float(nll) == pytest.approx(float(lpips_loss.reconstruction_loss(x, (x * 0.9).bfloat16().float())[0]),
                                       rel=0.05)


def test_lpips_loads_the_backbone_from_a_local_torchvision_file(tmp_path):
    fake = fake_vgg16_features()
    path = tmp_path / VGG16_FILE
    torch.save(fake, path)
    model = build_lpips(VQLossConfig(lpips_vgg_path=str(path)))
    torch.testing.assert_close(model.net.slice1[0].weight, fake["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(getattr(model.net.slice3, "14").bias, fake["features.14.bias"], rtol=0, atol=0)
    torch.testing.assert_close(getattr(model.net.slice5, "28").weight, fake["features.28.weight"], rtol=0, atol=0)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # the linear layers are the package's bundled v0.1 weights (non-negative), not a random init
    assert all(float(getattr(model, f"lin{i}").model[1].weight.min()) >= 0 for i in range(5))
    assert set(lpips_keys()) <= set(model.state_dict())


def test_lpips_finds_the_backbone_under_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / VGG16_FILE
    with pytest.raises(FileNotFoundError) as e:
        build_lpips(VQLossConfig())
    msg = str(e.value)
    assert str(expected) in msg and "loss.lpips_vgg_path" in msg and "loss.lpips_backbone=random" in msg
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere.pth")):
        build_lpips(VQLossConfig(lpips_vgg_path=str(tmp_path / "elsewhere.pth")))


def test_lpips_refuses_a_file_without_a_vgg16_backbone(tmp_path):
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"holds no VGG16 backbone: found 1 of its 26"):
        build_lpips(VQLossConfig(lpips_vgg_path=str(tmp_path / "partial.pth")))
