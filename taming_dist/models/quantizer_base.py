"""What every quantizer has (models/quantize.py lists the kinds): its collectives, the code counts
and usage statistics, and the interface the VQModel, the task and the exports call
(`forward`, `get_codebook_entry`, `codebook`, `take_step_counts`, `finish_step`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from taming_dist.config.schema import QuantizerConfig
from taming_dist.models.collectives import ONE_PROCESS, Collectives


def fp32(device: torch.device):
    """Distances, softmaxes and losses run in fp32 even under autocast (in bf16 nearby codes tie)."""
    return torch.autocast(device_type=device.type, enabled=False)


_NEVER = -(2**62)  # "last hit" of a code never hit


class Quantizer(nn.Module):
    """z (B, C, h, w) -> (z_q, loss, info); info holds `indices` (B, h, w), `perplexity`, `usage`
    (fraction of codes hit) and `window_usage` (fraction hit by the last `usage_window` training
    tokens of all ranks). `collectives` (models/collectives.py) is the process group as the
    quantizer needs it, given at construction and used only in training forwards."""

    def __init__(self, n_embed: int, embed_dim: int, usage_window: int = 65536,
                 collectives: Collectives = ONE_PROCESS):
        super().__init__()
        self.n_e, self.e_dim = n_embed, embed_dim  # the original's attribute names
        self.collectives = collectives
        # Usage over the last `usage_window` training tokens of all ranks (LlamaGen logs the codes
        # among its last 65536 tokens): per code, the token count at the end of the step that last
        # hit it. Not saved: a resumed run counts afresh (a logged statistic, not state).
        self.usage_window = usage_window
        self.register_buffer("last_hit", torch.full((n_embed,), _NEVER, dtype=torch.long), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self._step_counts: torch.Tensor | None = None
        self._deferred = False

    # -- building from the config (models/quantize.py's registry) ------------------------------
    @classmethod
    def from_config(cls, cfg: QuantizerConfig, z_channels: int, collectives: Collectives) -> "Quantizer":
        raise NotImplementedError

    @staticmethod
    def input_channels(cfg: QuantizerConfig, z_channels: int) -> int:
        """The width quant_conv maps the encoder output to, the quantizer's input."""
        return cfg.embed_dim

    # -- the interface ---------------------------------------------------------------------------
    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) -> the decoder-side latent (B, embed_dim, h, w)."""
        raise NotImplementedError

    def codebook(self) -> torch.Tensor:
        """The codes as the lookup uses them (K, D)."""
        raise NotImplementedError

    # -- code counts and usage -------------------------------------------------------------------
    # Training counts feed the logged usage statistics and the usage window; dead-code restarts
    # also need them inside the forward. Without restarts they are only summed here over the step's
    # micro-batches (`take_step_counts`) and reduced once per step by the training step's fused
    # all-reduce, which hands the global counts back to `finish_step`: no collective per forward.
    def _global_counts_now(self) -> bool:
        return False

    def _counts(self, idx: torch.Tensor) -> torch.Tensor:
        """Codes hit per code, (K,) fp32; in training summed over ranks (the global batch) when the
        forward needs them, else this rank's, kept for the step (see above)."""
        counts = torch.bincount(idx.reshape(-1), minlength=self.n_e).float()
        self._deferred = self.training and not self._global_counts_now()
        if self._deferred:
            pending = self._step_counts
            self._step_counts = counts if pending is None else pending + counts
            return counts
        return self.collectives.sum(counts) if self.training else counts

    def take_step_counts(self) -> torch.Tensor | None:
        """This rank's code counts summed over the step's training forwards (None if none were
        kept back), reset for the next step."""
        counts, self._step_counts = self._step_counts, None
        return counts

    def finish_step(self, counts: torch.Tensor) -> dict:
        """The step's global code counts (take_step_counts summed over ranks) -> its usage logs,
        and the usage window moved on by them (the same on every rank)."""
        return self._stats(counts, update_window=True)

    def _stats(self, counts: torch.Tensor, update_window: bool) -> dict:
        # The original's perplexity: exp of the entropy of the mean one-hot assignment.
        p = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        if update_window:
            # counts are the global batch's here, so every rank keeps the same window
            self.tokens_seen += counts.sum().long()
            self.last_hit.copy_(torch.where(counts > 0, self.tokens_seen, self.last_hit))
        recent = (self.last_hit > self.tokens_seen - self.usage_window).float().mean()
        return {"perplexity": perplexity, "usage": (counts > 0).float().mean(), "window_usage": recent}

    def _info(self, idx: torch.Tensor, counts: torch.Tensor) -> dict:
        # Kept back for the step: this forward's own statistics, and the window moves in finish_step.
        deferred, self._deferred = self._deferred, False
        return {"indices": idx, **self._stats(counts, update_window=self.training and not deferred)}
