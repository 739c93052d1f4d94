"""The quantizer kinds and their factory. Every quantizer maps z (B, C, h, w) to `(z_q, loss, info)`;
info holds `indices` (B, h, w), `perplexity`, `usage` (fraction of codes hit), `window_usage`
(fraction hit by the last `usage_window` training tokens of all ranks), and what a kind adds
(`restarted` with dead-code restarts, LFQ's two entropy terms). Distances, softmaxes and losses
run in fp32 even under autocast: in bf16 nearby codes tie and the argmin flips.

  models/quantizer_base.py  `Quantizer`: what every kind has (collectives, code counts and usage,
                            the interface the VQModel, the task and the exports call)
  models/codebook.py        explicit codebooks: `CodebookQuantizer` (k-means init, row fetches,
                            `code_offset` writes) under vq (VectorQuantizer, taming's
                            VectorQuantizer2, + dead-code restarts), ema and l2 (ViT-VQGAN /
                            LlamaGen); GumbelQuantize (taming's, on the small base)
  models/implicit.py        implicit codebooks: fsq (Mentzer et al. 2023), lfq (MAGVIT-v2)

What the quantizers need from the process group is a `Collectives` (models/collectives.py) given
to the constructor (`build_quantizer(cfg, z_channels, collectives)`, `VQModel(cfg, collectives=)`),
never imported and never assigned later. It is called only in training mode, where every rank runs
the same forward; an eval-mode forward on one rank alone (image logging, code extraction) never
enters a collective, and its statistics are then those of the local batch.

The kind and the options it allows are checked in one place, `QuantizerConfig.validate`; the
factory maps each kind to its class (`QUANTIZERS`), whose `from_config` reads its options.
"""
from __future__ import annotations

import torch

from taming_dist.config.schema import QuantizerConfig
from taming_dist.models.codebook import (
    CodebookQuantizer, EMAVectorQuantizer, GumbelQuantize, L2Quantizer, VectorQuantizer, _nearest_l2,
)
from taming_dist.models.collectives import ONE_PROCESS, Collectives
from taming_dist.models.implicit import FiniteScalarQuantizer, LookupFreeQuantizer, entropy_groups
from taming_dist.models.quantizer_base import Quantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer, "ema": EMAVectorQuantizer, "gumbel": GumbelQuantize, "l2": L2Quantizer,
    "fsq": FiniteScalarQuantizer, "lfq": LookupFreeQuantizer,
}


def quantizer_class(cfg: QuantizerConfig) -> type[Quantizer]:
    """The class of `cfg.kind` (the config validated)."""
    cfg.validate()
    return QUANTIZERS[cfg.kind]


def build_quantizer(cfg: QuantizerConfig, z_channels: int, collectives: Collectives = ONE_PROCESS) -> Quantizer:
    """The quantizer for `cfg.kind`, with `collectives` (one process by default). `z_channels` is
    the input width of the Gumbel `proj` (the original builds it from the encoder's z_channels,
    see VQModel)."""
    return quantizer_class(cfg).from_config(cfg, z_channels, collectives)


def fold_code_offset(state_dict: dict, prefix: str = "quantize.") -> dict:
    """A copy of a VQModel state dict with `code_offset` folded into `embedding.weight` (and left
    at zero): the same codebook for readers that ignore the offset (the original taming code)."""
    key = f"{prefix}code_offset"
    if key not in state_dict:
        return dict(state_dict)
    out = dict(state_dict)
    out[f"{prefix}embedding.weight"] = state_dict[f"{prefix}embedding.weight"] + state_dict[key]
    out[key] = torch.zeros_like(state_dict[key])
    return out


# Quantizer state only training reads (k-means / dead-code restart bookkeeping, the EMA kind's
# statistics): the original VectorQuantizer2, diffusers' VectorQuantizer and an ONNX graph have none of it.
TRAINING_ONLY = ("code_offset", "code_usage", "kmeans_done", "ema_cluster_size", "ema_embed_sum")


def inference_state(state_dict: dict, prefix: str = "quantize.") -> dict:
    """A copy of a VQModel state dict (its quantizer under `prefix`) as inference reads it:
    `code_offset` folded into `embedding.weight` (`fold_code_offset`), then every training-only
    quantizer buffer dropped."""
    sd = fold_code_offset(state_dict, prefix)
    return {k: v for k, v in sd.items() if not (k.startswith(prefix) and k[len(prefix):] in TRAINING_ONLY)}


__all__ = ["Quantizer", "CodebookQuantizer", "VectorQuantizer", "EMAVectorQuantizer", "GumbelQuantize", "L2Quantizer",
           "FiniteScalarQuantizer", "LookupFreeQuantizer", "Collectives", "ONE_PROCESS", "QUANTIZERS",
           "entropy_groups", "quantizer_class", "build_quantizer", "fold_code_offset", "inference_state",
           "_nearest_l2"]
