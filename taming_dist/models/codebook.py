"""Quantizers with an explicit codebook: VectorQuantizer (kind vq, taming's VectorQuantizer2), the
EMA codebook (ema) and the factorised l2-normalised lookup (l2, ViT-VQGAN / LlamaGen) on the
codebook base `CodebookQuantizer` (nearest-code lookup, k-means initialisation, row fetches across
ranks, writes through `code_offset`); VectorQuantizer adds dead-code restarts. GumbelQuantize
(gumbel) has a codebook too, but a learned projection picks its code: it has none of the base's
data-dependent writes and sits on the small base `Quantizer` (models/quantizer_base.py).

Data-dependent codebook writes (k-means initialisation, dead-code restarts) never touch the codebook
parameter: under FSDP2 it is a shard, under DeepSpeed a copy of fp32 master weights, and a write in
forward would be lost. Kinds vq and l2 instead keep a replicated buffer `code_offset` and use
`embedding.weight + code_offset` as the codebook: the same trainable parameter gets the same
gradient, and AdamW (no weight decay on embeddings) moves it the same way as a written parameter,
so the training is that of a rewritten codebook on every engine. `fold_code_offset`
(models/quantize.py) folds it into the weight for readers that know only `embedding.weight` (the
original taming code). The rows written come from the global batch: `collectives.rank` /
`collectives.world_size` place this rank's rows in it, so a row is fetched by index with one
sum-reduce (`_global_rows`), and one process on the whole batch makes the same choice.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from taming_dist.config.schema import QuantizerConfig
from taming_dist.models.collectives import ONE_PROCESS, Collectives
from taming_dist.models.quantizer_base import Quantizer, fp32


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


class CodebookQuantizer(Quantizer):
    """The codebook base: nearest-code lookup in an explicit codebook, its k-means initialisation
    (`kmeans_iters` > 0; the buffer `kmeans_done` is saved, so a resumed run does not redo it),
    the global batch's rows fetched by index, and code writes through `code_offset`."""

    def __init__(self, n_embed: int, embed_dim: int, kmeans_iters: int = 0, usage_window: int = 65536,
                 collectives: Collectives = ONE_PROCESS):
        super().__init__(n_embed, embed_dim, usage_window, collectives)
        self.kmeans_iters = kmeans_iters
        if kmeans_iters > 0:
            self.register_buffer("kmeans_done", torch.zeros(()))
        self._kmeans_seen_done = False

    def _global_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (n,) of the global batch of vectors, whose local part is x (N, D), on every
        rank: each rank fills the rows it holds and one sum-reduce of (n, D) assembles them."""
        local = rows - self.collectives.rank * x.shape[0]
        mine = (local >= 0) & (local < x.shape[0])
        out = x.new_zeros(rows.shape[0], x.shape[1])
        out[mine] = x[local[mine]]
        return self.collectives.sum(out)

    def _global_size(self, x: torch.Tensor, total: torch.Tensor) -> int:
        """The global batch's row count `total` (a reduced count), checked against the layout
        `_global_rows` assumes (the same N on every rank)."""
        n, world = int(total), self.collectives.world_size
        if n != x.shape[0] * world:
            raise ValueError(f"the global batch has {n} vectors but this rank holds {x.shape[0]} of "
                             f"{world} ranks; codebook writes need the same micro-batch size on every rank")
        return n

    def _kmeans_pending(self) -> bool:
        if self.kmeans_iters == 0 or self._kmeans_seen_done:
            return False
        self._kmeans_seen_done = bool(self.kmeans_done)  # one host sync, until done
        return not self._kmeans_seen_done

    def _assign(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return _nearest_l2(x, centres)

    def _normalize_centres(self, centres: torch.Tensor) -> torch.Tensor:
        return centres

    @torch.no_grad()
    def _kmeans(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lloyd's k-means over the global batch, x (N, D) fp32 this rank's rows -> (centres (K, D),
        cluster sizes (K,)), the same on every rank. Start: K distinct rows of the global batch
        (with repetition when it has fewer than K), drawn on rank 0 and broadcast; each iteration
        assigns locally and sums [count | sum of vectors] over ranks (one reduce of K x (D + 1)),
        exactly the one-process computation. An empty cluster keeps its centre."""
        c = self.collectives
        n = self._global_size(x, c.sum(torch.tensor(float(x.shape[0]), device=x.device)))
        if n >= self.n_e:
            start = torch.randperm(n, device=x.device)[: self.n_e]
        else:
            start = torch.randint(0, n, (self.n_e,), device=x.device)
        centres = self._normalize_centres(self._global_rows(x, c.from_rank0(start)))
        ones = torch.ones_like(x[:, :1])
        for _ in range(self.kmeans_iters):
            stats = x.new_zeros(self.n_e, 1 + x.shape[1]).index_add_(0, self._assign(x, centres), torch.cat([ones, x], 1))
            stats = c.sum(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
            means = sums / counts.clamp_min(1.0).unsqueeze(1)
            centres = self._normalize_centres(torch.where(counts.unsqueeze(1) > 0, means, centres))
        return centres, counts

    @torch.no_grad()
    def _kmeans_init(self, x: torch.Tensor) -> None:
        centres, counts = self._kmeans(x)
        self._set_codes(torch.arange(self.n_e, device=x.device), centres, counts)
        self.kmeans_done.fill_(1.0)
        self._kmeans_seen_done = True

    def _set_codes(self, rows: torch.Tensor, new: torch.Tensor, counts: torch.Tensor) -> None:
        """Make codes `rows` equal `new` through code_offset (see the module docstring)."""
        w = self.embedding.weight.detach()[rows].to(self.code_offset.dtype)
        self.code_offset[rows] = new.to(w.dtype) - w

    def _offset_weight(self) -> torch.Tensor:
        w = self.embedding.weight
        return w + self.code_offset if hasattr(self, "code_offset") else w


class VectorQuantizer(CodebookQuantizer):
    """taming's VectorQuantizer2 (kind vq): nearest code by squared L2 distance, straight-through
    gradient, codebook learned by the loss.

    Optional k-means initialisation (`kmeans_iters` > 0; as in vector-quantize-pytorch's
    `kmeans_init`): at the first training forward the codebook becomes the k-means centres of that
    global batch's encoder outputs.

    Optional dead-code restart (`dead_code_threshold` > 0, as in Dhariwal et al. 2020, Jukebox):
    an EMA (decay `usage_decay`) of each code's usage relative to a uniform assignment (1.0 = an
    average code) is kept; in every training forward each code below the threshold is replaced by
    a random encoder output of the current global batch, and info gets `restarted` (the codes
    restarted). The dead set comes from the reduced counts and is the same everywhere; the rows to
    copy are drawn on rank 0 (torch's RNG) and broadcast, then fetched from whichever rank holds
    them. Both write through `code_offset` (kind vq) or the codebook buffers (kind ema), so they
    work on every engine, sharded ones included.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True,
                 dead_code_threshold: float = 0.0, usage_decay: float = 0.99, kmeans_iters: int = 0,
                 usage_window: int = 65536, collectives: Collectives = ONE_PROCESS):
        super().__init__(n_embed, embed_dim, kmeans_iters, usage_window, collectives)
        self.beta, self.legacy = beta, legacy
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        self.embedding = self._make_codebook(n_embed, embed_dim)
        if dead_code_threshold > 0:
            self.register_buffer("code_usage", torch.ones(n_embed))
        if self.learned_codebook and (dead_code_threshold > 0 or kmeans_iters > 0):
            self.register_buffer("code_offset", torch.zeros(n_embed, embed_dim))

    learned_codebook = True  # the codebook is a parameter (written through code_offset)

    @classmethod
    def from_config(cls, cfg: QuantizerConfig, z_channels: int, collectives: Collectives) -> "VectorQuantizer":
        return cls(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy, cfg.dead_code_threshold, cfg.ema_decay,
                   cfg.kmeans_iters if cfg.kmeans_init else 0, cfg.usage_window, collectives)

    @staticmethod
    def _make_codebook(n_embed: int, embed_dim: int) -> nn.Module:
        embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # the original's init
        return embedding

    def _global_counts_now(self) -> bool:
        return self.dead_code_threshold > 0  # restarts need the global counts in the forward

    def _codebook(self) -> torch.Tensor:
        return self._offset_weight()

    def codebook(self) -> torch.Tensor:
        return self._codebook()

    def _loss(self, zq: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        return _vq_loss(zq, zf, self.beta, self.legacy)

    def _update(self, idx: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        """Training-time state update; returns the (global) code counts."""
        return self._counts(idx)

    def forward(self, z: torch.Tensor):
        B, C, H, W = z.shape
        with fp32(z.device):
            zf = rearrange(z.float(), "b c h w -> (b h w) c")
            if self.training and self._kmeans_pending():
                self._kmeans_init(zf.detach())
            codebook = self._codebook().float()
            idx = _nearest_l2(zf, codebook)
            zq = F.embedding(idx, codebook)
            loss = self._loss(zq, zf)
            zq = zf + (zq - zf).detach()  # straight-through
            restarted = None
            if self.training:
                counts = self._update(idx, zf.detach())
                if self.dead_code_threshold > 0:
                    restarted = self._restart_dead_codes(counts, zf.detach())
            else:
                counts = self._counts(idx)
        z_q = rearrange(zq, "(b h w) c -> b c h w", b=B, h=H, w=W).to(z.dtype)
        info = self._info(idx.view(B, H, W), counts)
        if restarted is not None:
            info["restarted"] = restarted
        return z_q, loss, info

    @torch.no_grad()
    def _restart_dead_codes(self, counts: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        """-> the number of codes restarted (a 0-dim tensor)."""
        rel = counts * (self.n_e / counts.sum().clamp_min(1.0))
        self.code_usage.mul_(self.usage_decay).add_(rel, alpha=1.0 - self.usage_decay)
        dead = (self.code_usage < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return torch.zeros((), device=zf.device)
        n = self._global_size(zf, counts.sum())
        pick = self.collectives.from_rank0(torch.randint(0, n, (dead.numel(),), device=zf.device))
        self._set_codes(dead, self._global_rows(zf, pick), counts)
        self.code_usage[dead] = 1.0  # an average code: one EMA horizon to prove itself
        return torch.tensor(float(dead.numel()), device=zf.device)

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
    vector instead of drifting. Counts and sums are summed across ranks (one `collectives.reduce`
    call) before the update, so every rank applies the global-batch update. Laplace smoothing keeps
    rarely used codes from dividing by ~0: N_i <- (N_i + eps) / (N + K eps) * N.
    """

    learned_codebook = False  # buffers: written directly

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, dead_code_threshold: float = 0.0, kmeans_iters: int = 0, usage_window: int = 65536,
                 collectives: Collectives = ONE_PROCESS):
        super().__init__(n_embed, embed_dim, beta, legacy=False, dead_code_threshold=dead_code_threshold,
                         usage_decay=decay, kmeans_iters=kmeans_iters, usage_window=usage_window,
                         collectives=collectives)
        self.decay, self.eps = decay, eps
        self.register_buffer("ema_cluster_size", torch.ones(n_embed))
        self.register_buffer("ema_embed_sum", self.embedding.weight.clone())

    @classmethod
    def from_config(cls, cfg: QuantizerConfig, z_channels: int, collectives: Collectives) -> "EMAVectorQuantizer":
        return cls(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.ema_decay, cfg.ema_eps, cfg.dead_code_threshold,
                   cfg.kmeans_iters if cfg.kmeans_init else 0, cfg.usage_window, collectives)

    @staticmethod
    def _make_codebook(n_embed: int, embed_dim: int) -> nn.Module:
        return _Codebook(n_embed, embed_dim)

    def _loss(self, zq: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        return self.beta * torch.mean((zq.detach() - zf) ** 2)

    @torch.no_grad()
    def _update(self, idx: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        stats = torch.zeros(self.n_e, 1 + self.e_dim, device=zf.device)  # [count | sum of vectors]
        stats.index_add_(0, idx, torch.cat([torch.ones_like(zf[:, :1]), zf], dim=1))
        stats = self.collectives.sum(stats)
        counts, sums = stats[:, 0], stats[:, 1:]
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (n + self.n_e * self.eps) * n
        self.embedding.weight.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))
        return counts

    def _set_codes(self, rows: torch.Tensor, new: torch.Tensor, counts: torch.Tensor) -> None:
        size = counts.sum() / self.n_e  # (re)started as an average code
        self.embedding.weight[rows] = new
        self.ema_cluster_size[rows] = size
        self.ema_embed_sum[rows] = new * size


class L2Quantizer(CodebookQuantizer):
    """kind l2: factorised, l2-normalised codes (ViT-VQGAN, Yu et al. 2021; LlamaGen). z is
    projected to `codebook_dim` by `in_proj`, z and the codebook are l2-normalised, the nearest
    code by cosine is taken, and `out_proj` maps it back to embed_dim. Looking up in a small
    normalised space keeps far more codes in use. The loss is vq's with beta on the commitment
    term (no released checkpoint carries the legacy placement for this kind). k-means
    initialisation here is spherical (centres renormalised each iteration) in the lookup space."""

    def __init__(self, n_embed: int, embed_dim: int, codebook_dim: int = 8, beta: float = 0.25,
                 kmeans_iters: int = 0, usage_window: int = 65536, collectives: Collectives = ONE_PROCESS):
        super().__init__(n_embed, embed_dim, kmeans_iters, usage_window, collectives)
        self.beta, self.codebook_dim = beta, codebook_dim
        self.in_proj = nn.Conv2d(embed_dim, codebook_dim, kernel_size=1)
        self.embedding = nn.Embedding(n_embed, codebook_dim)
        with torch.no_grad():
            nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))
        self.out_proj = nn.Conv2d(codebook_dim, embed_dim, kernel_size=1)
        if kmeans_iters > 0:
            self.register_buffer("code_offset", torch.zeros(n_embed, codebook_dim))

    @classmethod
    def from_config(cls, cfg: QuantizerConfig, z_channels: int, collectives: Collectives) -> "L2Quantizer":
        return cls(cfg.n_embed, cfg.embed_dim, cfg.codebook_dim, cfg.beta, cfg.kmeans_iters if cfg.kmeans_init else 0,
                   cfg.usage_window, collectives)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self._offset_weight(), dim=1)

    def _assign(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return (x @ centres.t()).argmax(dim=1)  # max cosine = min l2 on the unit sphere

    def _normalize_centres(self, centres: torch.Tensor) -> torch.Tensor:
        return F.normalize(centres, dim=1)

    def forward(self, z: torch.Tensor):
        h = self.in_proj(z)
        B, _, H, W = h.shape
        with fp32(z.device):
            hf = F.normalize(rearrange(h.float(), "b c h w -> (b h w) c"), dim=1)
            if self.training and self._kmeans_pending():
                self._kmeans_init(hf.detach())
            codebook = F.normalize(self._offset_weight().float(), dim=1)
            idx = self._assign(hf, codebook)
            zq = F.embedding(idx, codebook)
            loss = _vq_loss(zq, hf, self.beta, legacy=False)
            zq = hf + (zq - hf).detach()
            counts = self._counts(idx)
        zq = rearrange(zq, "(b h w) c -> b c h w", b=B, h=H, w=W).to(h.dtype)
        return self.out_proj(zq), loss, self._info(idx.view(B, H, W), counts)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        codebook = self.codebook()
        return self.out_proj(rearrange(F.embedding(indices, codebook), "b h w c -> b c h w"))


class GumbelQuantize(Quantizer):
    """taming's GumbelQuantize (Jang et al. 2016): `proj` gives n_embed logits per position,
    gumbel-softmax at temperature `temperature` picks a (soft or straight-through hard) one-hot,
    z_q = one_hot @ embed.weight; loss = kl_weight * KL(q || uniform).

    In training the one-hot is hard (straight-through) when `straight_through`, as the original's
    default, else soft. In eval it is the hard one-hot of argmax(logits): the original also added
    Gumbel noise in eval, which made encoding random; the noiseless mode is used instead so
    tokenising an image twice gives the same codes.

    The original GumbelVQ feeds quant_conv's output to `proj`, which it builds with z_channels
    inputs; quant_conv therefore maps z_channels -> z_channels here (`input_channels`).
    """

    def __init__(self, num_hiddens: int, embed_dim: int, n_embed: int, kl_weight: float = 5e-4,
                 temperature: float = 1.0, straight_through: bool = True, usage_window: int = 65536,
                 collectives: Collectives = ONE_PROCESS):
        super().__init__(n_embed, embed_dim, usage_window, collectives)
        self.kl_weight, self.temperature, self.straight_through = kl_weight, temperature, straight_through
        self.proj = nn.Conv2d(num_hiddens, n_embed, kernel_size=1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    @classmethod
    def from_config(cls, cfg: QuantizerConfig, z_channels: int, collectives: Collectives) -> "GumbelQuantize":
        return cls(z_channels, cfg.embed_dim, cfg.n_embed, cfg.kl_weight, cfg.gumbel_tau, cfg.gumbel_straight_through,
                   cfg.usage_window, collectives)

    @staticmethod
    def input_channels(cfg: QuantizerConfig, z_channels: int) -> int:
        return z_channels

    def forward(self, z: torch.Tensor):
        logits = self.proj(z)  # (B, K, h, w)
        with fp32(z.device):
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

    def codebook(self) -> torch.Tensor:
        return self.embed.weight
