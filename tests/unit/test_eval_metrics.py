"""Evaluation metrics against answers known in closed form or computed by hand."""
import math

import numpy as np
import pytest
import torch

from taming_dist.eval.generate import batch_seed, rank_batches
from taming_dist.eval.metrics import (CodebookUsage, FeatureStats, MeanMetric, fid_from_stats, gaussian_window,
                                      inception_score, psnr, ssim)


def _images(seed=0, b=4, size=32):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- PSNR / SSIM / LPIPS -------------------------------------------------------------------------


def test_identical_images_psnr_inf_ssim_one():
    x = _images()
    assert torch.isinf(psnr(x, x.clone())).all()
    assert torch.allclose(ssim(x, x.clone()), torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_identical_images_lpips_zero():
    from taming_dist.config.schema import VQLossConfig
    from taming_dist.losses.lpips import build_lpips

    lp = build_lpips(VQLossConfig(lpips_backbone="random")).eval()
    x = _images() * 2 - 1
    with torch.no_grad():
        same, other = lp(x, x.clone()), lp(x, _images(seed=1) * 2 - 1)
    assert float(same.abs().max()) < 1e-6
    assert float(other.min()) > 0


@pytest.mark.parametrize("sigma", [0.01, 0.03])
def test_gaussian_noise_gives_the_analytic_psnr(sigma):
    # Images in [0.25, 0.75] so that noise of std <= 0.03 is (practically) never clipped: MSE = sigma^2,
    # PSNR = -20 log10(sigma). 49152 values per image: the MSE estimate is within ~1%, 0.05 dB.
    g = torch.Generator().manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(4, 3, 128, 128, generator=g)
    y = x + sigma * torch.randn(x.shape, generator=g)
    assert torch.allclose(psnr(x, y), torch.full((4,), -20 * math.log10(sigma), dtype=torch.float64), atol=0.1)
    # The data range enters as 20 log10(range): on [0, 255] the same noise scaled is the same PSNR.
    assert torch.allclose(psnr(x * 255, y * 255, data_range=255.0), psnr(x, y))


def test_ssim_of_constant_images_is_the_luminance_term():
    # Constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 1)^2.
    a, b = 0.3, 0.6
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    expected = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-6)


def _ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 eq. 13 window by window with the 11x11 gaussian (sigma 1.5), one channel."""
    g = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_hand_computed_windowed_ssim():
    x = _images(seed=2, b=1, size=14)
    y = (x + 0.2 * _images(seed=3, b=1, size=14)).clamp(0, 1)
    per_channel = [_ssim_by_hand(x[0, c].double().numpy(), y[0, c].double().numpy()) for c in range(3)]
    assert ssim(x, y).item() == pytest.approx(float(np.mean(per_channel)), rel=1e-9)
    assert 0 < ssim(x, y).item() < 1


def test_ssim_window_and_errors():
    g = gaussian_window()
    assert g.shape == (11,) and g.sum().item() == pytest.approx(1.0) and g.argmax().item() == 5
    with pytest.raises(ValueError, match="window does not fit 8x8"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8))


# -- FID / IS --------------------------------------------------------------------------------------


def _cov(d, seed):
    a = np.random.default_rng(seed).standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def test_fid_of_identical_statistics_is_zero():
    mu, sigma = np.arange(6.0), _cov(6, 0)
    assert fid_from_stats(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fid_known_one_dimensional_and_diagonal_cases():
    # 1-D: (mu1 - mu2)^2 + s1 + s2 - 2 sqrt(s1 s2) = 1 + 4 + 1 - 4 = 2.
    assert fid_from_stats([0.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(2.0)
    # Diagonal: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    expected = 9.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_fid_matches_scipy_sqrtm_on_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _cov(8, 1), _cov(8, 2)
    mu1, mu2 = np.zeros(8), np.full(8, 0.5)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = 8 * 0.25 + np.trace(s1 + s2 - 2 * covmean)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="do not match"):
        fid_from_stats(mu1, s1, np.zeros(4), np.eye(4))


def test_inception_score_known_answers():
    assert inception_score(np.full((20, 10), 0.1), splits=2) == pytest.approx((1.0, 0.0))
    # Confident and evenly spread over K classes: IS = K.
    onehot = np.eye(5)[np.arange(50) % 5]
    assert inception_score(onehot)[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((3, 10), 0.1), splits=4)


# -- accumulators over ranks -------------------------------------------------------------------------


def _peer_sum(peer_states):
    """A stand-in all-reduce for rank 0 of two: adds the peer's state of the same shape."""
    def fn(t):
        return t + peer_states[tuple(t.shape)].to(t.dtype)
    return fn


def test_codebook_usage_agrees_between_one_and_two_ranks():
    idx = torch.randint(0, 40, (10, 4, 4), generator=torch.Generator().manual_seed(0))  # codes 40..63 unused
    whole = CodebookUsage(64)
    whole.update(idx)
    r0, r1 = CodebookUsage(64), CodebookUsage(64)
    r1.update(idx[6:])
    r0.all_reduce_fn = _peer_sum({(64,): r1.counts})
    r0.update(idx[:6])
    one, two = whole.compute(), r0.compute()
    assert one == two
    assert one["codes_used"] == len(idx.unique()) <= 40 and one["usage"] == one["codes_used"] / 64
    assert one["tokens"] == 160
    # compute() leaves the rank's own counts alone (it can be called again).
    assert r0.counts.sum().item() == 96 and r0.compute() == two


def test_codebook_perplexity_known_answers():
    uniform = CodebookUsage(8)
    uniform.update(torch.arange(8).repeat(3))
    assert uniform.compute()["perplexity"] == pytest.approx(8.0) and uniform.compute()["usage"] == 1.0
    single = CodebookUsage(8)
    single.update(torch.full((5,), 3))
    assert single.compute()["perplexity"] == pytest.approx(1.0) and single.compute()["codes_used"] == 1
    with pytest.raises(ValueError, match="outside the codebook"):
        single.update(torch.tensor([8]))


def test_mean_and_feature_stats_agree_between_one_and_two_ranks():
    values = torch.randn(10, dtype=torch.float64)
    r1 = MeanMetric()
    r1.update(values[7:])
    r0 = MeanMetric(_peer_sum({(2,): r1.state}))
    r0.update(values[:7])
    assert r0.compute() == (pytest.approx(values.mean().item()), 10)

    feats = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    s1 = FeatureStats(5)
    s1.update(feats[8:])
    s0 = FeatureStats(5, _peer_sum({(1,): s1.n, (5,): s1.sum, (5, 5): s1.outer}))
    s0.update(feats[:8])
    mu, sigma, n = s0.compute()
    assert n == 12
    np.testing.assert_allclose(mu, feats.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


# -- sampling plan ---------------------------------------------------------------------------------


def test_sample_plan_covers_every_index_once_at_any_world_size():
    def plans(world):
        return [b for r in range(world) for b in rank_batches(37, 8, r, world)]

    for world in (1, 2, 3):
        batches = plans(world)
        indices = sorted(i for _, start, count in batches for i in range(start, start + count))
        assert indices == list(range(37))
        assert sorted(batches) == plans(1)  # the same batches (and so seeds) whatever the world size
    seeds = {batch_seed(0, k) for k in range(5)} | {batch_seed(1, k) for k in range(5)}
    assert len(seeds) == 10 and all(0 <= s < 2 ** 63 for s in seeds)


# -- Inception -------------------------------------------------------------------------------------


def test_inception_missing_file_names_the_expected_weights(tmp_path):
    from taming_dist.eval.inception import InceptionFeatures

    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures.from_file(str(tmp_path / "nope.pth"))
    msg = str(e.value)
    assert "nope.pth" in msg and "inception_v3_google-0cc3c7bd.pth" in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "--inception-weights" in msg


def test_tf_pooling_blocks_differ_from_torchvision_only_at_the_border():
    from torchvision.models.inception import InceptionA, InceptionE

    from taming_dist.eval.inception import TFInceptionA, TFInceptionE2

    torch.manual_seed(0)
    x = torch.rand(1, 192, 9, 9) + 0.5  # positive, so padding zeros change averages and maxima
    tv, tf = InceptionA(192, pool_features=32).eval(), TFInceptionA(192, pool_features=32).eval()
    tf.load_state_dict(tv.state_dict())
    with torch.no_grad():
        a, b = tv(x), tf(x)
    assert torch.equal(a[:, :-32], b[:, :-32])  # the conv branches are torchvision's
    assert torch.allclose(a[:, -32:, 1:-1, 1:-1], b[:, -32:, 1:-1, 1:-1], atol=1e-6)
    assert not torch.allclose(a[:, -32:, 0], b[:, -32:, 0])
    e_tv, e_tf = InceptionE(64).eval(), TFInceptionE2(64).eval()
    e_tf.load_state_dict(e_tv.state_dict())
    with torch.no_grad():
        assert not torch.allclose(e_tv(x[:, :64])[:, -192:, 1:-1, 1:-1], e_tf(x[:, :64])[:, -192:, 1:-1, 1:-1])


def random_inception() -> torch.nn.Module:
    """torchvision's InceptionV3 with random weights whose batch norms are calibrated on one random
    batch: with default statistics the pool3 features shrink to ~1e-8 and every FID is ~0."""
    from torchvision.models.inception import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train().momentum = 1.0  # running statistics := this batch's
    with torch.no_grad():
        net(torch.rand(2, 3, 128, 128) * 2 - 1)  # small: the scale is what matters
    return net.eval()


def test_inception_features_from_random_weight_files(tmp_path):
    from taming_dist.eval.inception import FEATURE_DIM, InceptionFeatures

    tv = random_inception()
    path = tmp_path / "inception_v3_google-test.pth"
    torch.save(tv.state_dict(), path)
    ext = InceptionFeatures.from_file(str(path))
    assert not ext.tf_graph
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    feats, logits = ext(x)
    assert feats.shape == (2, FEATURE_DIM) and logits.shape == (2, 1000) and torch.isfinite(feats).all()
    assert feats.std(0).mean() > 1e-3  # features of a usable scale (see random_inception)
    # The same network as torchvision's own forward on the bilinearly resized input.
    with torch.no_grad():
        ref = tv(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
    assert torch.allclose(logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())

    # pytorch-fid's layout: 1008 classes, no AuxLogits -> the TF-graph blocks, loaded strictly.
    fid_sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("AuxLogits.")}
    fid_sd["fc.weight"], fid_sd["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    ext_tf = InceptionFeatures(fid_sd)
    assert ext_tf.tf_graph
    feats_tf, logits_tf = ext_tf(x)
    assert logits_tf.shape == (2, 1008) and not torch.allclose(feats_tf, feats)
    with pytest.raises(ValueError, match="classes"):
        InceptionFeatures({**fid_sd, "fc.weight": torch.zeros(10, 2048)})
