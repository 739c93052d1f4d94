"""Autoregressive sampling: temperature, top-k and nucleus (top-p) filtering, classifier-free
guidance, and the decoding loop with a KV cache (one new token per step) or without one (the full
prefix re-run every step: the reference the cached path is tested against, and the benchmark's
baseline)."""
from __future__ import annotations

from typing import Optional

import torch

from taming_dist.models.gpt import GPT


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept), set the rest to -inf."""
    if k <= 0:
        raise ValueError(f"top_k {k} must be a positive integer (or None for no top-k filtering)")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability adds up to at least p, set the rest to -inf."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p {p} must lie in (0, 1] (or be None for no nucleus filtering)")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already hold mass p; the first never is.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on logits: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def sample_next(logits: torch.Tensor, generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """logits (B, V) -> one sampled token per row (B,) long; reproducible with a seeded generator."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0; use top_k=1 for greedy decoding")
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(gpt: GPT, prefix: torch.Tensor, num_steps: int, *, context: Optional[torch.Tensor] = None,
             null_prefix: Optional[torch.Tensor] = None, null_context: Optional[torch.Tensor] = None,
             cfg_scale: Optional[float] = None, use_cache: bool = True, generator: Optional[torch.Generator] = None,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Sample `num_steps` tokens after `prefix` (B, P) -> (B, num_steps) long.

    With `cfg_scale` other than None/1.0, the null-conditioned prefix (and context) run in the same
    batch of 2B and the logits are guided; scale 1.0 is exactly conditional sampling, so that path
    skips the null half rather than reproduce it up to rounding.
    """
    B, P = prefix.shape
    if num_steps <= 0:
        raise ValueError(f"num_steps {num_steps} must be positive")
    block = gpt.config.block_size
    if P + num_steps - 1 > block:
        raise ValueError(f"a prefix of {P} tokens plus {num_steps} sampled tokens needs block_size >= "
                         f"{P + num_steps - 1}, the model has {block}")
    guided = cfg_scale is not None and cfg_scale != 1.0
    if guided:
        if null_prefix is None or null_prefix.shape != prefix.shape:
            raise ValueError("classifier-free guidance needs a null_prefix shaped like the prefix "
                             f"{tuple(prefix.shape)}, got {None if null_prefix is None else tuple(null_prefix.shape)}")
        prefix = torch.cat([prefix, null_prefix])  # (2B, P)
        if context is not None:
            context = torch.cat([context, torch.zeros_like(context) if null_context is None else null_context])

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B or 2B, V) -> (B,)
        if guided:
            logits = guided_logits(logits[:B].float(), logits[B:].float(), cfg_scale)
        return sample_next(logits, generator, temperature, top_k, top_p)

    def widen(tok: torch.Tensor) -> torch.Tensor:  # (B,) -> (B or 2B, 1): both halves get the same token
        tok = tok[:, None]
        return torch.cat([tok, tok]) if guided else tok

    out = []
    if use_cache:
        cache = gpt.make_cache(P + num_steps - 1)
        logits = gpt(prefix, context=context, cache=cache)[:, -1]  # (B or 2B, V)
        for step in range(num_steps):
            tok = pick(logits)
            out.append(tok)
            if step < num_steps - 1:
                logits = gpt(widen(tok), cache=cache)[:, -1]
    else:
        seq = prefix
        for step in range(num_steps):
            tok = pick(gpt(seq, context=context)[:, -1])
            out.append(tok)
            if step < num_steps - 1:
                seq = torch.cat([seq, widen(tok)], dim=1)
    return torch.stack(out, dim=1)  # (B, num_steps)
