"""Image-quality and codebook metrics, and accumulators that sum over data-parallel ranks.

PSNR and SSIM take images in [0, data_range] and return one value per image. The accumulators
keep float64 sums and counts; `compute()` sums them over ranks with the `all_reduce_fn` they were
given at construction (in place or returning the sum, as `Collectives.reduce` in
models/collectives.py; a no-op by default), so this module never imports torch.distributed and a
test can stand in for two ranks.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

Collective = Callable[[torch.Tensor], Optional[torch.Tensor]]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def reduce_sum(t: torch.Tensor, fn: Collective) -> torch.Tensor:
    """The sum over ranks of a copy of `t` (an accumulator itself stays this rank's)."""
    buf = t.clone()
    out = fn(buf)
    return buf if out is None else out


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two image batches (B, C, H, W) of the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


# ----------------------------------------------------------------------------------------------
# Per-image metrics


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (B,) float64 in dB: 10 log10(range^2 / MSE); inf where
    the images are identical."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-D gaussian (size,) float64; its outer product is MATLAB's
    fspecial('gaussian', size, sigma), the window of Wang et al.'s reference SSIM code."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image (B,) float64, channels averaged.

    Local statistics under an 11x11 gaussian window (sigma 1.5) over the 'valid' region, as in the
    authors' reference implementation; C1 = (k1 L)^2, C2 = (k2 L)^2 with L = data_range, so images
    must be given on their true range (1 for [0, 1]): on [-1, 1] with L=1 the constants are wrong.
    """
    _check_pair(x, y)
    b, c, h, w = x.shape
    if min(h, w) < window_size:
        raise ValueError(f"SSIM's {window_size}x{window_size} window does not fit {h}x{w} images; "
                         f"evaluate at a larger size")
    g = gaussian_window(window_size, sigma).to(x.device)
    gh = g.view(1, 1, 1, -1).expand(c, 1, 1, window_size)  # (C, 1, 1, k): depthwise, along W
    gv = g.view(1, 1, -1, 1).expand(c, 1, window_size, 1)  # (C, 1, k, 1): along H

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return smap.mean(dim=(2, 3)).mean(dim=1)


# ----------------------------------------------------------------------------------------------
# Distribution metrics


def _psd_floor(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below round-off set to 0: a covariance of fewer
    samples than dimensions has many zero eigenvalues that eigh returns as +-1e-12-sized noise, and
    summing the square roots of thousands of them would add a visible error to the trace."""
    tol = max(float(np.abs(w).max(initial=0.0)), 1e-300) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2): no complex round-off to discard, as
    scipy's sqrtm leaves, and exact for the rank-deficient covariances of small sample sets.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                         f"{s2.shape} (were they computed with the same feature extractor?)")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(_psd_floor(w))) @ v.T
    inner = root1 @ ((s2 + s2.T) / 2) @ root1
    tr_covmean = np.sqrt(_psd_floor(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(probs, splits: int = 1) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) from class probabilities (N, K): exp(E_x KL(p(y|x) || p(y))),
    computed on `splits` equal chunks (the original uses 10); returns (mean, std) over the chunks."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < splits or splits < 1:
        raise ValueError(f"inception_score needs probabilities (N, K) with N >= splits >= 1, got shape {p.shape} "
                         f"and splits={splits}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        # 0 log 0 = 0: the floor keeps the log finite where a sample gives a class no mass (then
        # p(y) may be 0 too), and the term is multiplied by that 0.
        tiny = np.finfo(np.float64).tiny
        kl = part * (np.log(np.maximum(part, tiny)) - np.log(np.maximum(py, tiny)))
        scores.append(math.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# Accumulators


class MeanMetric:
    """Mean of per-sample values over every rank."""

    def __init__(self, all_reduce_fn: Collective = _identity):
        self.all_reduce_fn = all_reduce_fn
        self.state = torch.zeros(2, dtype=torch.float64)  # [sum, count]

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().reshape(-1).cpu()
        self.state += torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64)])

    def compute(self) -> tuple[float, int]:
        """(mean, number of values) over all ranks; the mean is nan when there are none."""
        total, count = reduce_sum(self.state, self.all_reduce_fn).tolist()
        return (total / count if count else float("nan")), int(count)


class CodebookUsage:
    """Per-code counts of the indices seen: the fraction of the codebook used and the perplexity
    (exp of the entropy of the code frequencies; the original's `perplexity`, but over the whole
    set instead of one batch, so it reaches n_codes only when every code is used equally often)."""

    def __init__(self, n_codes: int, all_reduce_fn: Collective = _identity):
        if n_codes < 1:
            raise ValueError(f"a codebook needs n_codes >= 1, got {n_codes}")
        self.n_codes = n_codes
        self.all_reduce_fn = all_reduce_fn
        self.counts = torch.zeros(n_codes, dtype=torch.float64)

    def update(self, indices: torch.Tensor) -> None:
        idx = indices.detach().reshape(-1).long().cpu()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.n_codes):
            raise ValueError(f"code indices span [{int(idx.min())}, {int(idx.max())}], outside the codebook of "
                             f"{self.n_codes} codes")
        self.counts += torch.bincount(idx, minlength=self.n_codes).double()

    def compute(self) -> dict:
        counts = reduce_sum(self.counts, self.all_reduce_fn)
        total = counts.sum()
        p = counts / total.clamp_min(1.0)
        nz = p[p > 0]
        used = int((counts > 0).sum())
        return {"codebook_size": self.n_codes, "codes_used": used, "usage": used / self.n_codes,
                "perplexity": float(torch.exp(-(nz * nz.log()).sum())), "tokens": int(total),
                "counts": counts.long().tolist()}


class FeatureStats:
    """Mean and covariance of feature vectors (the Gaussian FID compares) from sums kept in
    float64: sum x and sum x x^T add up over batches and ranks, so no features are gathered."""

    def __init__(self, dim: int, all_reduce_fn: Collective = _identity, device=None):
        self.dim = dim
        self.all_reduce_fn = all_reduce_fn
        self.n = torch.zeros(1, dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().reshape(-1, self.dim).to(self.sum.device, torch.float64)  # (B, D)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def compute(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(mu (D,), sigma (D, D), n) over all ranks; sigma is the unbiased covariance (as numpy's
        np.cov, which pytorch-fid uses)."""
        n = int(reduce_sum(self.n, self.all_reduce_fn).item())
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {n}; evaluate more images")
        s = reduce_sum(self.sum, self.all_reduce_fn).cpu().numpy()
        outer = reduce_sum(self.outer, self.all_reduce_fn).cpu().numpy()
        mu = s / n
        sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, sigma, n
