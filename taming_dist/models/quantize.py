"""Codebook quantizers: VectorQuantizer (taming's VectorQuantizer2), an EMA codebook, GumbelQuantize,
a factorised l2-normalised lookup (ViT-VQGAN, Yu et al. 2021; LlamaGen), and two implicit codebooks
that the original has not: finite scalar quantization (FSQ, Mentzer et al. 2023) and lookup-free
quantization (LFQ, MAGVIT-v2, Yu et al. 2023).

Every quantizer maps z (B, C, h, w) to `(z_q, loss, info)`; info holds `indices` (B, h, w),
`perplexity`, `usage` (fraction of codes hit), `window_usage` (fraction hit by the last
`usage_window` training tokens of all ranks) and, with dead-code restarts, `restarted` (codes
restarted in this forward). Distances, softmaxes and losses run in fp32 even
under autocast: in bf16 nearby codes tie and the argmin flips.

What the quantizers need from the process group is passed in, never imported (as in
vector-quantize-pytorch): `reduce_fn` sums a tensor across data-parallel ranks (in place, or
returning the sum), `broadcast_fn` copies rank 0's tensor to every rank (in place, or returning it).
Both default to no-ops. They are called only in training mode, where every rank runs the same
forward; an eval-mode forward on one rank alone (image logging, code extraction) never enters a
collective, and its statistics are then those of the local batch. `dp_rank` / `dp_size` (0 / 1 by
default) say where this rank's rows sit in the global batch (rank r holds rows r*N .. r*N+N-1; the
loop gives every rank the same micro-batch size), so a row of the global batch can be fetched by
index with one sum-reduce (`_global_rows`), and one process on the whole batch makes the same choice.

Data-dependent codebook writes (k-means initialisation, dead-code restarts) never touch the codebook
parameter: under FSDP2 it is a shard, under DeepSpeed a copy of fp32 master weights, and a write in
forward would be lost. Kinds vq and l2 instead keep a replicated buffer `code_offset` and use
`embedding.weight + code_offset` as the codebook: the same trainable parameter gets the same
gradient, and AdamW (no weight decay on embeddings) moves it the same way as a written parameter,
so the training is that of a rewritten codebook on every engine. `fold_code_offset` folds it into
the weight for readers that know only `embedding.weight` (the original taming code).
"""
from __future__ import annotations

import math
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


_NEVER = -(2**62)  # "last hit" of a code never hit


class _Quantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int, kmeans_iters: int = 0, usage_window: int = 65536):
        super().__init__()
        self.n_e, self.e_dim = n_embed, embed_dim  # the original's attribute names
        self.reduce_fn: Collective = _identity
        self.broadcast_fn: Collective = _identity
        self.dp_rank, self.dp_size = 0, 1
        # k-means initialisation at the first training forward (0 = off); `kmeans_done` is saved in
        # checkpoints, so a resumed run does not redo it.
        self.kmeans_iters = kmeans_iters
        if kmeans_iters > 0:
            self.register_buffer("kmeans_done", torch.zeros(()))
        self._kmeans_seen_done = False
        # Usage over the last `usage_window` training tokens of all ranks (LlamaGen logs the codes
        # among its last 65536 tokens): per code, the token count at the end of the step that last
        # hit it. Not saved: a resumed run counts afresh (a logged statistic, not state).
        self.usage_window = usage_window
        self.register_buffer("last_hit", torch.full((n_embed,), _NEVER, dtype=torch.long), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=False)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        out = self.reduce_fn(t)
        return t if out is None else out

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        out = self.broadcast_fn(t)
        return t if out is None else out

    # Training counts feed the logged usage statistics and the usage window; dead-code restarts
    # also need them inside the forward. Without restarts they are only summed here over the step's
    # micro-batches (`take_step_counts`) and reduced once per step by the training step's fused
    # all-reduce, which hands the global counts back to `finish_step`: no collective per forward.
    def _global_counts_now(self) -> bool:
        return getattr(self, "dead_code_threshold", 0.0) > 0

    def _counts(self, idx: torch.Tensor) -> torch.Tensor:
        """Codes hit per code, (K,) fp32; in training summed over ranks (the global batch) when the
        forward needs them, else this rank's, kept for the step (see above)."""
        counts = torch.bincount(idx.reshape(-1), minlength=self.n_e).float()
        self._deferred = self.training and not self._global_counts_now()
        if self._deferred:
            pending = getattr(self, "_step_counts", None)
            self._step_counts = counts if pending is None else pending + counts
            return counts
        return self._reduce(counts) if self.training else counts

    def take_step_counts(self) -> torch.Tensor | None:
        """This rank's code counts summed over the step's training forwards (None if none were
        kept back), reset for the next step."""
        counts, self._step_counts = getattr(self, "_step_counts", None), None
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
        deferred, self._deferred = getattr(self, "_deferred", False), False
        return {"indices": idx, **self._stats(counts, update_window=self.training and not deferred)}

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) -> the decoder-side latent (B, embed_dim, h, w)."""
        raise NotImplementedError

    def codebook(self) -> torch.Tensor:
        """The codes as the lookup uses them (K, D), code_offset included."""
        raise NotImplementedError

    # -- data-dependent codebook writes (k-means, restarts) ------------------------------------
    def _global_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (n,) of the global batch of vectors, whose local part is x (N, D), on every
        rank: each rank fills the rows it holds and one sum-reduce of (n, D) assembles them."""
        local = rows - self.dp_rank * x.shape[0]
        mine = (local >= 0) & (local < x.shape[0])
        out = x.new_zeros(rows.shape[0], x.shape[1])
        out[mine] = x[local[mine]]
        return self._reduce(out)

    def _global_size(self, x: torch.Tensor, total: torch.Tensor) -> int:
        """The global batch's row count `total` (a reduced count), checked against the layout
        `_global_rows` assumes (the same N on every rank)."""
        n = int(total)
        if n != x.shape[0] * self.dp_size:
            raise ValueError(f"the global batch has {n} vectors but this rank holds {x.shape[0]} of "
                             f"{self.dp_size} ranks; codebook writes need the same micro-batch size on every rank")
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
        n = self._global_size(x, self._reduce(torch.tensor(float(x.shape[0]), device=x.device)))
        if n >= self.n_e:
            start = torch.randperm(n, device=x.device)[: self.n_e]
        else:
            start = torch.randint(0, n, (self.n_e,), device=x.device)
        centres = self._normalize_centres(self._global_rows(x, self._broadcast(start)))
        ones = torch.ones_like(x[:, :1])
        for _ in range(self.kmeans_iters):
            stats = x.new_zeros(self.n_e, 1 + x.shape[1]).index_add_(0, self._assign(x, centres), torch.cat([ones, x], 1))
            stats = self._reduce(stats)
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

    Optional k-means initialisation (`kmeans_iters` > 0; as in vector-quantize-pytorch's
    `kmeans_init`): at the first training forward the codebook becomes the k-means centres of that
    global batch's encoder outputs.

    Optional dead-code restart (`dead_code_threshold` > 0, as in Dhariwal et al. 2020, Jukebox):
    an EMA (decay `usage_decay`) of each code's usage relative to a uniform assignment (1.0 = an
    average code) is kept; in every training forward each code below the threshold is replaced by
    a random encoder output of the current global batch. The dead set comes from the reduced counts
    and is the same everywhere; the rows to copy are drawn on rank 0 (torch's RNG) and broadcast,
    then fetched from whichever rank holds them. Both write through `code_offset` (kind vq) or the
    codebook buffers (kind ema), so they work on every engine, sharded ones included.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True,
                 dead_code_threshold: float = 0.0, usage_decay: float = 0.99, kmeans_iters: int = 0,
                 usage_window: int = 65536):
        super().__init__(n_embed, embed_dim, kmeans_iters, usage_window)
        self.beta, self.legacy = beta, legacy
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        self.embedding = self._make_codebook(n_embed, embed_dim)
        if dead_code_threshold > 0:
            self.register_buffer("code_usage", torch.ones(n_embed))
        if self.learned_codebook and (dead_code_threshold > 0 or kmeans_iters > 0):
            self.register_buffer("code_offset", torch.zeros(n_embed, embed_dim))

    learned_codebook = True  # the codebook is a parameter (written through code_offset)

    @staticmethod
    def _make_codebook(n_embed: int, embed_dim: int) -> nn.Module:
        embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # the original's init
        return embedding

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
        with _fp32(z.device):
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
        pick = self._broadcast(torch.randint(0, n, (dead.numel(),), device=zf.device))
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
    vector instead of drifting. Counts and sums are summed across ranks (one `reduce_fn` call)
    before the update, so every rank applies the global-batch update. Laplace smoothing keeps
    rarely used codes from dividing by ~0: N_i <- (N_i + eps) / (N + K eps) * N.
    """

    learned_codebook = False  # buffers: written directly

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, dead_code_threshold: float = 0.0, kmeans_iters: int = 0, usage_window: int = 65536):
        super().__init__(n_embed, embed_dim, beta, legacy=False, dead_code_threshold=dead_code_threshold,
                         usage_decay=decay, kmeans_iters=kmeans_iters, usage_window=usage_window)
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

    def _set_codes(self, rows: torch.Tensor, new: torch.Tensor, counts: torch.Tensor) -> None:
        size = counts.sum() / self.n_e  # (re)started as an average code
        self.embedding.weight[rows] = new
        self.ema_cluster_size[rows] = size
        self.ema_embed_sum[rows] = new * size


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
                 temperature: float = 1.0, straight_through: bool = True, usage_window: int = 65536):
        super().__init__(n_embed, embed_dim, usage_window=usage_window)
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

    def codebook(self) -> torch.Tensor:
        return self.embed.weight


class L2Quantizer(_Quantizer):
    """kind l2: factorised, l2-normalised codes (ViT-VQGAN, Yu et al. 2021; LlamaGen). z is
    projected to `codebook_dim` by `in_proj`, z and the codebook are l2-normalised, the nearest
    code by cosine is taken, and `out_proj` maps it back to embed_dim. Looking up in a small
    normalised space keeps far more codes in use. The loss is vq's with beta on the commitment
    term (no released checkpoint carries the legacy placement for this kind). k-means
    initialisation here is spherical (centres renormalised each iteration) in the lookup space."""

    def __init__(self, n_embed: int, embed_dim: int, codebook_dim: int = 8, beta: float = 0.25,
                 kmeans_iters: int = 0, usage_window: int = 65536):
        super().__init__(n_embed, embed_dim, kmeans_iters, usage_window)
        self.beta, self.codebook_dim = beta, codebook_dim
        self.in_proj = nn.Conv2d(embed_dim, codebook_dim, kernel_size=1)
        self.embedding = nn.Embedding(n_embed, codebook_dim)
        with torch.no_grad():
            nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))
        self.out_proj = nn.Conv2d(codebook_dim, embed_dim, kernel_size=1)
        if kmeans_iters > 0:
            self.register_buffer("code_offset", torch.zeros(n_embed, codebook_dim))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self._offset_weight(), dim=1)

    def _assign(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return (x @ centres.t()).argmax(dim=1)  # max cosine = min l2 on the unit sphere

    def _normalize_centres(self, centres: torch.Tensor) -> torch.Tensor:
        return F.normalize(centres, dim=1)

    def forward(self, z: torch.Tensor):
        h = self.in_proj(z)
        B, _, H, W = h.shape
        with _fp32(z.device):
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


class FiniteScalarQuantizer(_Quantizer):
    """kind fsq: finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
    Made Simple"). Channel i of z is bounded by a shifted tanh so that rounding gives exactly
    `levels[i]` integers, rounded with a straight-through gradient and rescaled to [-1, 1]. The
    codebook is implicit: the prod(levels) points of that grid, so there is nothing to learn, no
    codebook loss (the loss is 0) and no code to collapse. embed_dim is len(levels): quant_conv and
    post_quant_conv are the projections in and out. Index = sum_i digit_i * basis_i with digit_i in
    [0, levels[i]) and basis = cumprod([1] + levels[:-1]) (channel 0 least significant), as the
    paper's reference code (its appendix A.1)."""

    def __init__(self, levels: list[int], usage_window: int = 65536):
        super().__init__(math.prod(levels), len(levels), usage_window=usage_window)
        basis = [1]
        for level in levels[:-1]:
            basis.append(basis[-1] * level)
        # integer buffers: an engine that casts the module to bf16 (DeepSpeed) leaves them exact
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).float()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) fp32 -> values whose rounding takes levels[i] integers in channel i:
        -(L-1)/2 .. (L-1)/2 for odd L, -L/2 .. L/2 - 1 for even L (the half offset). The shift by
        tan(offset / half_l) is the paper's (bound(0) ~ 0); eps keeps the ends from rounding up."""
        levels = self.levels.float()
        half_l = (levels - 1) * (1 - 1e-3) / 2
        offset = torch.where(self.levels % 2 == 1, 0.0, 0.5)
        shift = torch.tan(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) fp32 -> codes in [-1, 1] (..., D), straight-through rounding."""
        b = self.bound(z)
        return (b + (torch.round(b) - b).detach()) / self._half_width()

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., D) on the grid -> indices (...) long."""
        hw = self._half_width()
        digits = torch.round(codes.float() * hw + hw).long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) long -> codes (..., D) fp32 in [-1, 1]."""
        digits = (indices.long().unsqueeze(-1) // self.basis) % self.levels
        hw = self._half_width()
        return (digits.float() - hw) / hw

    def forward(self, z: torch.Tensor):
        B, C, H, W = z.shape
        with _fp32(z.device):
            zf = rearrange(z.float(), "b c h w -> (b h w) c")
            zq = self.quantize(zf)
            idx = self.codes_to_indices(zq.detach())
            counts = self._counts(idx)
            loss = zf.new_zeros(())
        z_q = rearrange(zq, "(b h w) c -> b c h w", b=B, h=H, w=W).to(z.dtype)
        return z_q, loss, self._info(idx.view(B, H, W), counts)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        return rearrange(self.indices_to_codes(indices), "b h w c -> b c h w")

    def codebook(self) -> torch.Tensor:
        return self.indices_to_codes(torch.arange(self.n_e, device=self.levels.device))


def entropy_groups(bits: int, group_bits: int) -> list[int]:
    """Split `bits` into the fewest groups of at most `group_bits`, sizes differing by at most one
    (18 bits at most 10 per group -> [9, 9])."""
    n = -(-bits // group_bits)
    return [bits // n + (1 if i < bits % n else 0) for i in range(n)]


def _signs(bits: int, device) -> torch.Tensor:
    """Every code of `bits` bits as +-1 vectors (2**bits, bits); bit j of code k is (k >> j) & 1."""
    k = torch.arange(2**bits, device=device)
    return ((k.unsqueeze(1) >> torch.arange(bits, device=device)) & 1).float() * 2 - 1


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last dimension. The clamp keeps the gradient finite
    where a probability underflowed to 0 (low temperatures)."""
    return -(p * torch.log(p.clamp_min(1e-10))).sum(-1)


class LookupFreeQuantizer(_Quantizer):
    """kind lfq: lookup-free quantization (MAGVIT-v2, Yu et al. 2023, "Language Model Beats
    Diffusion -- Tokenizer is Key to Visual Generation", sec. 3.1). Each of the `codebook_dim`
    channels is quantized to its sign (+-1, straight-through gradient): the codebook is the implicit
    set of 2**codebook_dim corners, index = sum_j [z_j > 0] 2**j. embed_dim is codebook_dim
    (quant_conv / post_quant_conv project in and out).

    loss = beta * mean((z - sg(q))^2) + entropy_weight * (H_sample - diversity_gamma * H_codebook)
    (the paper's eq. 5 plus the commitment term): H_sample, the mean entropy of each vector's soft
    assignment softmax(2 <z, c> / temperature) over the codes c (-|z - c|^2 up to terms softmax
    cancels), is minimised so that assignments are confident; H_codebook, the entropy of the mean
    assignment over the GLOBAL batch (one `reduce_fn` call), is maximised so that all codes are
    used. Both run in fp32, in groups of at most `group_bits` bits (`entropy_groups`): a group of g
    bits has 2**g codes, so 18 bits cost 2 x 512 probabilities per vector instead of 262144. The
    assignment distribution factorises over bits, so H_sample is exact in groups; H_codebook is
    the sum of the groups' entropies, the entropy of the product of their marginals (equal to the
    whole-codebook entropy when the groups are used independently, an upper bound otherwise).

    Data parallelism: H_codebook is a function of the whole global batch, so the gradient one rank
    gets from its own rows is 1/dp_size of that rank's share of it in one process, and engines
    AVERAGE gradients over ranks. The gradient of that term is therefore scaled by dp_size (its
    value is left alone), which makes every engine's update the one-process update on the global
    batch (tests/distributed/test_engine_equivalence.py)."""

    def __init__(self, codebook_dim: int, beta: float = 0.25, entropy_weight: float = 0.1,
                 diversity_gamma: float = 1.0, temperature: float = 0.01, group_bits: int = 10,
                 usage_window: int = 65536):
        super().__init__(2**codebook_dim, codebook_dim, usage_window=usage_window)
        self.codebook_dim, self.beta = codebook_dim, beta
        self.entropy_weight, self.diversity_gamma, self.temperature = entropy_weight, diversity_gamma, temperature
        self.groups = entropy_groups(codebook_dim, group_bits)
        self.register_buffer("bit_weights", 2 ** torch.arange(codebook_dim), persistent=False)  # long

    def entropies(self, zf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """zf (N, D) fp32 -> (H_sample, H_codebook), in nats, summed over the bit groups. In training
        H_codebook is that of the global batch (reduced), its gradient scaled by dp_size (see the
        class docstring)."""
        per_sample = zf.new_zeros(())
        sums, start = [], 0
        for g in self.groups:
            logits = 2 * zf[:, start:start + g] @ _signs(g, zf.device).t() / self.temperature  # (N, 2**g)
            start += g
            logp = F.log_softmax(logits, dim=1)
            p = logp.exp()
            per_sample = per_sample - (p * logp).sum(1).mean()
            sums.append(p.sum(0))
        local = torch.cat(sums)  # (sum_g 2**g,) this rank's summed assignments
        if self.training:
            stats = self._reduce(torch.cat([local.detach(), local.new_tensor([zf.shape[0]])]))
            # the global sum's value; the gradient flows through this rank's rows only
            mean = (local + (stats[:-1] - local).detach()) / stats[-1]
        else:
            mean = local / zf.shape[0]
        codebook = sum(_entropy(m) for m in mean.split([2**g for g in self.groups]))
        if self.training and self.dp_size > 1:
            codebook = codebook.detach() + self.dp_size * (codebook - codebook.detach())
        return per_sample, codebook

    def forward(self, z: torch.Tensor):
        B, C, H, W = z.shape
        with _fp32(z.device):
            zf = rearrange(z.float(), "b c h w -> (b h w) c")
            bits = zf > 0
            q = torch.where(bits, 1.0, -1.0)
            idx = (bits.long() * self.bit_weights).sum(1)
            commit = torch.mean((zf - q) ** 2)
            per_sample, codebook = self.entropies(zf)
            loss = self.beta * commit + self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
            zq = zf + (q - zf).detach()  # straight-through
            counts = self._counts(idx)
        z_q = rearrange(zq, "(b h w) c -> b c h w", b=B, h=H, w=W).to(z.dtype)
        info = self._info(idx.view(B, H, W), counts)
        info.update({"per_sample_entropy": per_sample.detach(), "codebook_entropy": codebook.detach()})
        return z_q, loss, info

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) long -> +-1 codes (..., D) fp32."""
        return ((indices.long().unsqueeze(-1) // self.bit_weights) % 2).float() * 2 - 1

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        return rearrange(self.indices_to_codes(indices), "b h w c -> b c h w")

    def codebook(self) -> torch.Tensor:
        return self.indices_to_codes(torch.arange(self.n_e, device=self.bit_weights.device))


def build_quantizer(cfg: QuantizerConfig, z_channels: int) -> _Quantizer:
    """The quantizer for `cfg.kind`. `z_channels` is the input width of the Gumbel `proj` (the
    original builds it from the encoder's z_channels, see VQModel)."""
    cfg.validate()
    if cfg.dead_code_threshold > 0 and cfg.kind not in ("vq", "ema"):
        raise ValueError(
            f"quantizer.dead_code_threshold={cfg.dead_code_threshold} is only supported by kinds vq and ema, "
            f"not {cfg.kind!r}; set it to 0"
        )
    if cfg.kmeans_init and cfg.kind in ("fsq", "lfq"):
        raise ValueError(f"quantizer.kmeans_init is supported by kinds vq, ema and l2, not {cfg.kind} (its codebook is "
                         "a fixed implicit grid with nothing to initialise); set it to false")
    if cfg.kmeans_init and cfg.kind == "gumbel":
        raise ValueError("quantizer.kmeans_init is supported by kinds vq, ema and l2, not gumbel (its codes are "
                         "chosen by a learned projection, not by distance); set it to false")
    iters = cfg.kmeans_iters if cfg.kmeans_init else 0
    window = cfg.usage_window
    if cfg.kind == "vq":
        return VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy, cfg.dead_code_threshold, cfg.ema_decay,
                               iters, window)
    if cfg.kind == "ema":
        return EMAVectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.ema_decay, cfg.ema_eps,
                                  cfg.dead_code_threshold, iters, window)
    if cfg.kind == "gumbel":
        return GumbelQuantize(z_channels, cfg.embed_dim, cfg.n_embed, cfg.kl_weight, cfg.gumbel_tau,
                              cfg.gumbel_straight_through, window)
    if cfg.kind == "fsq":
        return FiniteScalarQuantizer(list(cfg.levels), window)
    if cfg.kind == "lfq":
        return LookupFreeQuantizer(cfg.codebook_dim, cfg.beta, cfg.entropy_weight, cfg.diversity_gamma,
                                   cfg.entropy_temperature, cfg.entropy_group_bits, window)
    return L2Quantizer(cfg.n_embed, cfg.embed_dim, cfg.codebook_dim, cfg.beta, iters, window)


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


__all__ = ["VectorQuantizer", "EMAVectorQuantizer", "GumbelQuantize", "L2Quantizer", "FiniteScalarQuantizer",
           "LookupFreeQuantizer", "entropy_groups", "build_quantizer", "fold_code_offset", "inference_state"]
