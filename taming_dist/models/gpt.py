"""minGPT as used by taming's Net2NetTransformer (Karpathy's minGPT, CompVis fork), with a KV cache
and optional cross-attention. Parameter names match original checkpoints
(tests/data/layouts/net2net_drin.txt, `transformer.*`), except that the causal mask is rebuilt
from `block_size` instead of stored: a stored `attn.mask` buffer is accepted and dropped on load.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from taming_dist.config.schema import GPTConfig


class LayerCache:
    """One block's keys/values for incremental decoding: self-attention buffers (B, nh, max_len, hs),
    allocated on the first write in the dtype the layer computes in (so autocast and bf16 parameters
    need no special case), and the cross-attention keys/values of the context with its key padding
    mask (B, 1, 1, L) bool, computed once per sample (on the prefill) and read by every step."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.cross: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def write(self, start: Union[int, torch.Tensor], k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions start..start+T-1; return all keys/values so far.

        A tensor `start` (1,) (one token, `GPT.decode_step`) is written with index_copy_ and the whole
        buffers come back, so no shape depends on the position; the caller masks the unwritten tail.
        """
        B, nh, T, hs = k.shape
        if self.k is None:
            # Zeros, not empty: decode_step attends over the unwritten tail with weight exactly 0,
            # and 0 * NaN (stale memory) is NaN.
            self.k = k.new_zeros(B, nh, self.max_len, hs)  # (B, nh, max_len, hs)
            self.v = v.new_zeros(B, nh, self.max_len, hs)
        elif self.k.shape[0] != B:
            raise ValueError(f"the KV cache was filled with batch size {self.k.shape[0]}, got {B}; "
                             "make a new cache for a new batch")
        if isinstance(start, torch.Tensor):
            self.k.index_copy_(2, start, k)
            self.v.index_copy_(2, start, v)
            return self.k, self.v  # (B, nh, max_len, hs)
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k[:, :, :start + T], self.v[:, :, :start + T]  # (B, nh, start+T, hs)


class KVCache:
    """Keys/values of every block for the tokens fed so far; `length` is the next position."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.layers = [LayerCache(max_len) for _ in range(n_layer)]


def attention_mask(start: int, T: int, n_unmasked: int, device) -> tuple[Optional[torch.Tensor], bool]:
    """(boolean mask (T, start+T) or None, is_causal) for queries at positions start..start+T-1.

    minGPT's mask is lower-triangular with the top-left n_unmasked x n_unmasked block set to 1: the
    first n_unmasked positions (e.g. conditioning tokens) see each other bidirectionally.
    """
    if T == 1 and start >= n_unmasked:
        return None, False  # one new query at the end sees every cached key
    if start == 0 and n_unmasked == 0:
        return None, True
    i = torch.arange(start, start + T, device=device)[:, None]
    j = torch.arange(start + T, device=device)[None, :]
    allowed = j <= i
    if n_unmasked > 0:
        allowed = allowed | ((i < n_unmasked) & (j < n_unmasked))
    return allowed, False


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Original checkpoints store the causal mask as a buffer `attn.mask` (1, 1, block, block);
        # it carries nothing `block_size`/`n_unmasked` do not, so drop it and load strictly.
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                kv: Optional[LayerCache] = None, start: Union[int, torch.Tensor] = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if kv is not None:
            k, v = kv.write(start, k, v)  # (B, nh, start+T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


def context_mask(context: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Key padding mask (B, 1, 1, L) bool of a context (B, L, C): True for the first lengths[b] keys
    (all keys when `lengths` is None)."""
    B, L = context.shape[:2]
    if lengths is None:
        return torch.ones(B, 1, 1, L, dtype=torch.bool, device=context.device)
    return (torch.arange(L, device=context.device)[None] < lengths.to(context.device)[:, None])[:, None, None]


class CrossAttention(nn.Module):
    """Queries from the token stream, keys/values from a conditioning sequence (B, L, width), the
    keys past each row's length masked out (a masked key's weight is exactly 0, so the padding's
    contents never reach the output)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        width = cfg.n_embd if cfg.context_proj else cfg.context_dim
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.key = nn.Linear(width, cfg.n_embd)
        self.value = nn.Linear(width, cfg.n_embd)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, C = t.shape
        return t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, L, hs)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor], kv: Optional[LayerCache] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        if kv is not None and kv.cross is not None:
            k, v, mask = kv.cross
        else:
            if context is None:
                raise ValueError("cross-attention needs `context` (B, L, context_dim) on the first call")
            k, v = self._heads(self.key(context)), self._heads(self.value(context))  # (B, nh, L, hs)
            if kv is not None:
                kv.cross = (k, v, context_mask(context, None) if mask is None else mask)
        q = self._heads(self.query(x))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)) [+ cross_attn(ln_cross(x), context)] + mlp(ln2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        if cfg.cross_attention:
            self.ln_cross = nn.LayerNorm(cfg.n_embd)
            self.cross_attn = CrossAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.resid_pdrop),
        )

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = True,
                context: Optional[torch.Tensor] = None, kv: Optional[LayerCache] = None,
                start: Union[int, torch.Tensor] = 0, context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask, is_causal, kv, start)
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.ln_cross(x), context, kv, context_mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """idx (B, T) token ids -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        if not 0 <= cfg.n_unmasked <= cfg.block_size:
            raise ValueError(f"gpt.n_unmasked {cfg.n_unmasked} must lie in [0, block_size {cfg.block_size}]")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.context_proj:  # a text encoder's width (e.g. T5-XL's 2048) -> n_embd, as LlamaGen's cls_embedding
            self.context_proj = nn.Linear(cfg.context_dim, cfg.n_embd)
        if cfg.null_context:  # the null condition of guidance dropout: one learned token, the rest masked
            self.null_context = nn.Parameter(torch.zeros(1, 1, cfg.n_embd if cfg.context_proj else cfg.context_dim))
        # Engines flip this switch (rather than wrapping blocks) so state_dict keys never change.
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        if cfg.null_context:
            nn.init.normal_(self.null_context, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # minGPT's init; pos_emb stays at zero as in the original.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def parallel_blocks(self) -> list[nn.Module]:
        """The transformer blocks, which engines checkpoint, compile and shard one by one."""
        return list(self.blocks)

    def make_cache(self, max_len: Optional[int] = None) -> KVCache:
        """An empty cache for up to `max_len` positions (block_size by default)."""
        max_len = self.config.block_size if max_len is None else max_len
        if not 0 < max_len <= self.config.block_size:
            raise ValueError(f"cache length {max_len} must lie in [1, block_size {self.config.block_size}]")
        return KVCache(self.config.n_layer, max_len)

    def prepare_context(self, context: torch.Tensor, context_len: Optional[torch.Tensor] = None,
                        context_drop: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, L, context_dim), true lengths (B,) or None (all L), rows to replace by the
        null context (B,) bool or None -> (what cross-attention reads (B, L, width), mask (B, 1, 1, L))."""
        if self.config.context_proj:
            context = self.context_proj(context)  # (B, L, n_embd)
        if context_drop is not None:
            if not self.config.null_context:
                raise ValueError("context_drop needs a GPT with a learned null context (gpt.null_context)")
            B, L = context.shape[:2]
            null = torch.cat([self.null_context.to(context.dtype).expand(B, 1, -1),
                              context.new_zeros(B, L - 1, context.shape[-1])], dim=1)  # (B, L, width)
            context = torch.where(context_drop[:, None, None], null, context)
            full = torch.full((B,), L, dtype=torch.long, device=context.device)
            lengths = full if context_len is None else context_len
            context_len = torch.where(context_drop, torch.ones_like(lengths), lengths)
        return context, context_mask(context, context_len)

    def forward(self, idx: torch.Tensor, context: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, context_len: Optional[torch.Tensor] = None,
                context_drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With `cache`, `idx` holds only the new tokens: positions continue from `cache.length`,
        and the cross-attention context is read once, on the cache's first call. `context_len`
        (B,) masks each row's keys past its length; `context_drop` (B,) bool replaces a row's
        context by the learned null context (see `prepare_context`)."""
        cfg = self.config
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else cfg.block_size
        if start + T > limit:
            raise ValueError(f"{start} cached + {T} new tokens exceed the "
                             f"{'cache length' if cache is not None else 'block_size'} {limit}")
        if context is not None and not cfg.cross_attention:
            raise ValueError("a context was given but gpt.cross_attention is false")
        if cache is not None and 0 < cfg.n_unmasked and start < cfg.n_unmasked and (start > 0 or T < cfg.n_unmasked):
            raise ValueError(f"with n_unmasked={cfg.n_unmasked} the first cached call must feed at least the "
                             f"{cfg.n_unmasked} bidirectional positions at once (got {T} tokens at position {start})")
        if (context_len is not None or context_drop is not None) and context is None:
            raise ValueError("context_len / context_drop were given without a context")
        mask = None
        if context is not None:
            context, mask = self.prepare_context(context, context_len, context_drop)
        attn_mask, is_causal = attention_mask(start, T, cfg.n_unmasked, idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start:start + T])  # (B, T, C)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if use_ckpt:
                x = checkpoint(block, x, attn_mask, is_causal, context, None, 0, mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, is_causal, context, cache.layers[i] if cache is not None else None, start,
                          mask)
        if cache is not None:
            cache.length = start + T
        return self.head(self.ln_f(x))  # (B, T, vocab_size)

    def decode_step(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row, idx (B, 1), at position `pos` ((1,) long) -> logits (B, vocab_size).

        Unlike `forward` with a cache, every call has the same shapes whatever the position (the new
        keys/values go in with index_copy_, attention runs over the whole cache with keys after `pos`
        masked), so torch.compile traces it once and CUDA graphs can replay it. The cache must hold
        positions 0..pos-1, the n_unmasked bidirectional ones included (a `forward` prefill does);
        `cache.length` is the caller's to keep, which knows `pos` without reading the device.
        """
        mask = (torch.arange(cache.max_len, device=idx.device) <= pos)[None]  # (1, max_len): keys 0..pos
        x = self.drop(self.tok_emb(idx) + self.pos_emb[0].index_select(0, pos))  # (B, 1, C)
        for block, layer in zip(self.blocks, cache.layers):
            x = block(x, mask, False, None, layer, pos)
        return self.head(self.ln_f(x))[:, -1]  # (B, vocab_size)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; `non_embedding` leaves out the lookup tables (tok_emb, pos_emb), which
        cost no FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None, context_len: int = 0) -> int:
        """Training FLOPs (forward + backward) per token, as in PaLM appendix B / nanoGPT's
        estimate_mfu: 6N for the matmuls plus 12 * n_layer * n_embd * T for attention scores and
        weighted sums (and the same over the context for cross-attention)."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        attn = 12 * cfg.n_layer * cfg.n_embd * (T + (context_len if cfg.cross_attention else 0))
        return 6 * self.num_params(non_embedding=True) + attn
