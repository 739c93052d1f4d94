"""Codebook quantizers: VectorQuantizer (taming's VectorQuantizer2), an EMA codebook, GumbelQuantize
and a factorised l2-normalised lookup (ViT-VQGAN, Yu et al. 2021; LlamaGen).

Every quantizer maps z (B, C, h, w) to `(z_q, loss, info)`; info holds `indices` (B, h, w),
`perplexity` and `usage` (fraction of codes hit). Distances, softmaxes and losses run in fp32 even
under autocast: in bf16 nearby codes tie and the argmin flips.

What the quantizers need from the process group is passed in, never imported (as in
vector-quantize-pytorch): `reduce_fn` sums a tensor across data-parallel ranks (in place, or
returning the sum), `broadcast_fn` copies rank 0's tensor to every rank (in place, or returning it).
Both default to no-ops. They are called only in training mode, where every rank runs the same
forward; an eval-mode forward on one rank alone (image logging, code extraction) never enters a
collective, and its statistics are then those of the local batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from taming_dist.config.schema import QuantizerConfig

Collective = Callable[[torch.Tensor], Optional[torch.Tensor]]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _fp32(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class _Quantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.n_e, self.e_dim = n_embed, embed_dim  # the original's attribute names
        self.reduce_fn: Collective = _identity
        self.broadcast_fn: Collective = _identity

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        out = self.reduce_fn(t)
        return t if out is None else out

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        out = self.broadcast_fn(t)
        return t if out is None else out

    def _counts(self, idx: torch.Tensor) -> torch.Tensor:
        """Codes hit per code, (K,) fp32; summed over ranks in training (the global batch)."""
        counts = torch.bincount(idx.reshape(-1), minlength=self.n_e).float()
        return self._reduce(counts) if self.training else counts

    def _info(self, idx: torch.Tensor, counts: torch.Tensor) -> dict:
        # The original's perplexity: exp of the entropy of the mean one-hot assignment.
        p = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        return {"indices": idx, "perplexity": perplexity, "usage": (counts > 0).float().mean()}

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) -> the decoder-side latent (B, embed_dim, h, w)."""
        raise NotImplementedError


def _vq_loss(zq: torch.Tensor, z: torch.Tensor, beta: float, legacy: bool) -> torch.Tensor:
    """Codebook + commitment loss. `legacy=True` is the original's placement of beta on the
    codebook term (a bug the released models were trained with); False puts it on commitment."""
    codebook = torch.mean((zq - z.detach()) ** 2)
    commit = torch.mean((zq.detach() - z) ** 2)
    return commit + beta * codebook if legacy else beta * commit + codebook


def _nearest_l2(zf: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k |z - e_k|^2 written as |z|^2 + |e|^2 - 2 z.e, as the original. zf (N, D), codebook (K, D)."""
    d = zf.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * zf @ codebook.t()  # (N, K)
    return d.argmin(dim=1)


class VectorQuantizer(_Quantizer):
    """taming's VectorQuantizer2 (kind vq): nearest code by squared L2 distance, straight-through
    gradient, codebook learned by the loss.

    Optional dead-code restart (`dead_code_threshold` > 0, as in Dhariwal et al. 2020, Jukebox):
    an EMA (decay `usage_decay`) of each code's usage relative to a uniform assignment (1.0 = an
    average code) is kept; after a training step every code below the threshold is replaced by a
    random encoder output of the current batch. The candidates are drawn on each rank from torch's
    RNG and passed through `broadcast_fn`, so every rank writes rank 0's choice; the dead set itself
    comes from the reduced counts and is the same everywhere. The restart writes into the module's
    own codebook, so it needs an engine whose optimizer steps those parameters (single, DDP).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True,
                 dead_code_threshold: float = 0.0, usage_decay: float = 0.99):
        super().__init__(n_embed, embed_dim)
        self.beta, self.legacy = beta, legacy
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        self.embedding = self._make_codebook(n_embed, embed_dim)
        if dead_code_threshold > 0:
            self.register_buffer("code_usage", torch.ones(n_embed))

    @staticmethod
    def _make_codebook(n_embed: int, embed_dim: int) -> nn.Module:
        embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # the original's init
        return embedding

    def _codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def _loss(self, zq: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        return _vq_loss(zq, zf, self.beta, self.legacy)

    def _update(self, idx: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        """Training-time state update; returns the (global) code counts."""
        return self._counts(idx)

    def forward(self, z: torch.Tensor):
        B, C, H, W = z.shape
        with _fp32(z.device):
            zf = rearrange(z.float(), "b c h w -> (b h w) c")
            codebook = self._codebook().float()
            idx = _nearest_l2(zf, codebook)
            zq = F.embedding(idx, codebook)
            loss = self._loss(zq, zf)
            zq = zf + (zq - zf).detach()  # straight-through
            if self.training:
                counts = self._update(idx, zf.detach())
                if self.dead_code_threshold > 0:
                    self._restart_dead_codes(counts, zf.detach())
            else:
                counts = self._counts(idx)
        z_q = rearrange(zq, "(b h w) c -> b c h w", b=B, h=H, w=W).to(z.dtype)
        return z_q, loss, self._info(idx.view(B, H, W), counts)

    @torch.no_grad()
    def _restart_dead_codes(self, counts: torch.Tensor, zf: torch.Tensor) -> None:
        rel = counts * (self.n_e / counts.sum().clamp_min(1.0))
        self.code_usage.mul_(self.usage_decay).add_(rel, alpha=1.0 - self.usage_decay)
        dead = (self.code_usage < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        pick = torch.randint(0, zf.shape[0], (dead.numel(),), device=zf.device)
        new = self._broadcast(zf[pick].clone())
        self._set_codes(dead, new, counts)
        self.code_usage[dead] = 1.0  # an average code: one EMA horizon to prove itself

    def _set_codes(self, dead: torch.Tensor, new: torch.Tensor, counts: torch.Tensor) -> None:
        w = self.embedding.weight
        w.data[dead] = new.to(w.dtype)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        return rearrange(F.embedding(indices, self._codebook()), "b h w c -> b c h w")


class _Codebook(nn.Module):
    """A non-trainable codebook stored as the buffer `weight`, so the EMA quantizer's keys read
    `embedding.weight` like the vq kind's."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(n_embed, embed_dim).uniform_(-1.0 / n_embed, 1.0 / n_embed))


class EMAVectorQuantizer(VectorQuantizer):
    """kind ema: the codebook follows an EMA of the mean of the vectors assigned to each code
    (van den Oord et al. 2017, appendix; Razavi et al. 2019). The loss is the commitment term only.

    Cluster sizes start at 1 and sums at the initial codebook, so a code never hit keeps its
    vector instead of drifting. Counts and sums are summed across ranks (one `reduce_fn` call)
    before the update, so every rank applies the global-batch update. Laplace smoothing keeps
    rarely used codes from dividing by ~0: N_i <- (N_i + eps) / (N + K eps) * N.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, dead_code_threshold: float = 0.0):
        super().__init__(n_embed, embed_dim, beta, legacy=False, dead_code_threshold=dead_code_threshold,
                         usage_decay=decay)
        self.decay, self.eps = decay, eps
        self.register_buffer("ema_cluster_size", torch.ones(n_embed))
        self.register_buffer("ema_embed_sum", self.embedding.weight.clone())

    @staticmethod
    def _make_codebook(n_embed: int, embed_dim: int) -> nn.Module:
        return _Codebook(n_embed, embed_dim)

    def _loss(self, zq: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        return self.beta * torch.mean((zq.detach() - zf) ** 2)

    @torch.no_grad()
    def _update(self, idx: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        stats = torch.zeros(self.n_e, 1 + self.e_dim, device=zf.device)  # [count | sum of vectors]
        stats.index_add_(0, idx, torch.cat([torch.ones_like(zf[:, :1]), zf], dim=1))
        stats = self._reduce(stats)
        counts, sums = stats[:, 0], stats[:, 1:]
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (n + self.n_e * self.eps) * n
        self.embedding.weight.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))
        return counts

    def _set_codes(self, dead: torch.Tensor, new: torch.Tensor, counts: torch.Tensor) -> None:
        size = counts.sum() / self.n_e  # restarted as an average code
        self.embedding.weight[dead] = new
        self.ema_cluster_size[dead] = size
        self.ema_embed_sum[dead] = new * size


class GumbelQuantize(_Quantizer):
    """taming's GumbelQuantize (Jang et al. 2016): `proj` gives n_embed logits per position,
    gumbel-softmax at temperature `temperature` picks a (soft or straight-through hard) one-hot,
    z_q = one_hot @ embed.weight; loss = kl_weight * KL(q || uniform).

    In training the one-hot is hard (straight-through) when `straight_through`, as the original's
    default, else soft. In eval it is the hard one-hot of argmax(logits): the original also added
    Gumbel noise in eval, which made encoding random; the noiseless mode is used instead so
    tokenising an image twice gives the same codes.
    """

    def __init__(self, num_hiddens: int, embed_dim: int, n_embed: int, kl_weight: float = 5e-4,
                 temperature: float = 1.0, straight_through: bool = True):
        super().__init__(n_embed, embed_dim)
        self.kl_weight, self.temperature, self.straight_through = kl_weight, temperature, straight_through
        self.proj = nn.Conv2d(num_hiddens, n_embed, kernel_size=1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: torch.Tensor):
        logits = self.proj(z)  # (B, K, h, w)
        with _fp32(z.device):
            logits = logits.float()
            if self.training:
                one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=self.straight_through)
            else:
                one_hot = F.one_hot(logits.argmax(1), self.n_e).permute(0, 3, 1, 2).float()
            z_q = torch.einsum("b n h w, n d -> b d h w", one_hot, self.embed.weight.float())
            qy = F.softmax(logits, dim=1)
            loss = self.kl_weight * torch.sum(qy * torch.log(qy * self.n_e + 1e-10), dim=1).mean()
            idx = one_hot.argmax(dim=1)
            counts = self._counts(idx)
        return z_q.to(z.dtype), loss, self._info(idx, counts)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        return rearrange(self.embed(indices), "b h w c -> b c h w")


class L2Quantizer(_Quantizer):
    """kind l2: factorised, l2-normalised codes (ViT-VQGAN, Yu et al. 2021; LlamaGen). z is
    projected to `codebook_dim` by `in_proj`, z and the codebook are l2-normalised, the nearest
    code by cosine is taken, and `out_proj` maps it back to embed_dim. Looking up in a small
    normalised space keeps far more codes in use. The loss is vq's with beta on the commitment
    term (no released checkpoint carries the legacy placement for this kind)."""

    def __init__(self, n_embed: int, embed_dim: int, codebook_dim: int = 8, beta: float = 0.25):
        super().__init__(n_embed, embed_dim)
        self.beta, self.codebook_dim = beta, codebook_dim
        self.in_proj = nn.Conv2d(embed_dim, codebook_dim, kernel_size=1)
        self.embedding = nn.Embedding(n_embed, codebook_dim)
        with torch.no_grad():
            nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))
        self.out_proj = nn.Conv2d(codebook_dim, embed_dim, kernel_size=1)

    def forward(self, z: torch.Tensor):
        h = self.in_proj(z)
        B, _, H, W = h.shape
        with _fp32(z.device):
            hf = F.normalize(rearrange(h.float(), "b c h w -> (b h w) c"), dim=1)
            codebook = F.normalize(self.embedding.weight.float(), dim=1)
            idx = (hf @ codebook.t()).argmax(dim=1)  # max cosine = min l2 on the unit sphere
            zq = F.embedding(idx, codebook)
            loss = _vq_loss(zq, hf, self.beta, legacy=False)
            zq = hf + (zq - hf).detach()
            counts = self._counts(idx)
        zq = rearrange(zq, "(b h w) c -> b c h w", b=B, h=H, w=W).to(h.dtype)
        return self.out_proj(zq), loss, self._info(idx.view(B, H, W), counts)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        codebook = F.normalize(self.embedding.weight, dim=1)
        return self.out_proj(rearrange(F.embedding(indices, codebook), "b h w c -> b c h w"))


def build_quantizer(cfg: QuantizerConfig, z_channels: int) -> _Quantizer:
    """The quantizer for `cfg.kind`. `z_channels` is the input width of the Gumbel `proj` (the
    original builds it from the encoder's z_channels, see VQModel)."""
    cfg.validate()
    if cfg.dead_code_threshold > 0 and cfg.kind not in ("vq", "ema"):
        raise ValueError(
            f"quantizer.dead_code_threshold={cfg.dead_code_threshold} is only supported by kinds vq and ema, "
            f"not {cfg.kind!r}; set it to 0"
        )
    if cfg.kind == "vq":
        return VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy, cfg.dead_code_threshold, cfg.ema_decay)
    if cfg.kind == "ema":
        return EMAVectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.ema_decay, cfg.ema_eps,
                                  cfg.dead_code_threshold)
    if cfg.kind == "gumbel":
        return GumbelQuantize(z_channels, cfg.embed_dim, cfg.n_embed, cfg.kl_weight, cfg.gumbel_tau,
                              cfg.gumbel_straight_through)
    return L2Quantizer(cfg.n_embed, cfg.embed_dim, cfg.codebook_dim, cfg.beta)


__all__ = ["VectorQuantizer", "EMAVectorQuantizer", "GumbelQuantize", "L2Quantizer", "build_quantizer"]
