"""Evaluation: image metrics and accumulators (metrics.py), the Inception network for FID/IS
(inception.py), VQGAN reconstruction quality over a shard set (recon.py), and sampling at scale
with FID/IS of the samples (generate.py)."""
from taming_dist.eval.metrics import (CodebookUsage, FeatureStats, MeanMetric, fid_from_stats, inception_score, psnr,
                                      ssim)

__all__ = ["CodebookUsage", "FeatureStats", "MeanMetric", "fid_from_stats", "inception_score", "psnr", "ssim"]
