"""Autoregressive sampling: temperature, top-k and nucleus (top-p) filtering, classifier-free
guidance, and the decoding loop with a KV cache (one new token per step), optionally through a
compiled fixed-shape step, or without one (the full prefix re-run every step: the reference the
cached path is tested against, and the benchmark's baseline)."""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from taming_dist.models.gpt import GPT, KVCache


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


def _decode_step(gpt: GPT, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    # One query over a masked cache is two small matmuls and a softmax, which the math backend
    # leaves to inductor to fuse (as gpt-fast's decode step does) rather than an opaque kernel call.
    with sdpa_kernel(SDPBackend.MATH):
        return gpt.decode_step(idx, pos, cache)


_COMPILED: dict[str, Callable] = {}


def _compiled_step(device_type: str) -> Callable:
    """`_decode_step` compiled, one wrapper per device type: CUDA graphs on GPU ("reduce-overhead":
    a step is dozens of tiny kernels whose launches cost more than their work), inductor's default
    on CPU. dynamo keeps a graph per model configuration and shape, which another model of the same
    configuration reuses (weights are graph inputs); dynamic=False, as shapes never change in a loop
    and CUDA graphs need static ones."""
    if device_type not in _COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[device_type]


class _StaticDecoder:
    """The KV cache a compiled step runs on, kept across `generate` calls: CUDA graphs replay on fixed
    addresses, and a cache mutated in place is captured only as a static input. Each call copies its
    eager prefill into these buffers."""

    def __init__(self, cache: KVCache):
        self.cache = KVCache(len(cache.layers), cache.max_len)
        # Zeros, not the prefill's empty tail: a masked key's weight is exactly 0, but 0 * NaN is not.
        for dst, src in zip(self.cache.layers, cache.layers):
            dst.k, dst.v = torch.zeros_like(src.k), torch.zeros_like(src.v)
            if src.cross is not None:  # keys, values and the padding mask of the context
                dst.cross = tuple(torch.zeros_like(t) for t in src.cross)
        self.pos = torch.zeros(1, dtype=torch.long, device=src.k.device)
        for t in self._tensors(self.cache) + [self.pos]:
            torch._dynamo.mark_static_address(t)
        self.load(cache)

    @staticmethod
    def _tensors(cache: KVCache) -> list[torch.Tensor]:
        return [t for layer in cache.layers for t in (layer.k, layer.v) + (layer.cross or ())]

    def load(self, cache: KVCache) -> None:
        """Copy the prefilled positions; what a previous call left after them stays masked."""
        n = cache.length
        for dst, src in zip(self.cache.layers, cache.layers):
            dst.k[:, :, :n].copy_(src.k[:, :, :n])
            dst.v[:, :, :n].copy_(src.v[:, :, :n])
            if src.cross is not None:
                for d, t in zip(dst.cross, src.cross):
                    d.copy_(t)

    def __call__(self, gpt: GPT, idx: torch.Tensor, pos: int) -> torch.Tensor:
        self.pos.fill_(pos)
        return _compiled_step(idx.device.type)(gpt, idx, self.pos, self.cache)


# Per GPT, weakly keyed (a decoder holds no reference to its model): decoders by cache shape.
_DECODERS: "weakref.WeakKeyDictionary[GPT, dict]" = weakref.WeakKeyDictionary()


def _decoder(gpt: GPT, cache: KVCache) -> _StaticDecoder:
    """The static decoder for a prefilled cache's shapes, its buffers loaded from `cache`."""
    first = cache.layers[0]
    # Buffers made under inference_mode cannot be written outside it, hence the flag in the key.
    key = (tuple(first.k.shape), first.k.dtype, first.k.device,
           None if first.cross is None else tuple(first.cross[0].shape), torch.is_inference_mode_enabled())
    decoders = _DECODERS.setdefault(gpt, {})
    if key not in decoders:
        decoders[key] = _StaticDecoder(cache)
    else:
        decoders[key].load(cache)
    return decoders[key]


@torch.no_grad()
def generate(gpt: GPT, prefix: torch.Tensor, num_steps: int, *, context: Optional[torch.Tensor] = None,
             null_prefix: Optional[torch.Tensor] = None, null_context: Optional[torch.Tensor] = None,
             gpt_kwargs: Optional[dict] = None, null_kwargs: Optional[dict] = None,
             cfg_scale: Optional[float] = None, use_cache: bool = True, generator: Optional[torch.Generator] = None,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             compile: bool = False, vocab_limit: Optional[int] = None) -> torch.Tensor:
    """Sample `num_steps` tokens after `prefix` (B, P) -> (B, num_steps) long.

    `vocab_limit` N restricts the sampled tokens to [0, N): the logits of the rest are set to -inf
    after guidance and before temperature, top-k / top-p (a GPT whose vocabulary is larger than the first
    stage's codebook must never emit a code the decoder does not have).

    `gpt_kwargs` are the GPT's keyword inputs of the condition (context, context_len; `context=`
    is short for {"context": ...}), read once on the prefill: the context's keys and values are
    then cached with the self-attention ones and no decoding step recomputes them.

    With `cfg_scale` other than None/1.0, the null-conditioned prefix (and `null_kwargs`, by default
    an all-zero context, or `null_context`) run in the same batch of 2B and the logits are guided;
    scale 1.0 is exactly conditional sampling, so that path skips the null half rather than
    reproduce it up to rounding.

    `compile=True` runs each new token through `GPT.decode_step` compiled (see `_compiled_step`;
    the prefill stays eager, and sampling itself stays eager so the generator draws as without it).
    The first call per model and shape compiles; later ones reuse the graph and the cache buffers.
    """
    B, P = prefix.shape
    if num_steps <= 0:
        raise ValueError(f"num_steps {num_steps} must be positive")
    block = gpt.config.block_size
    if P + num_steps - 1 > block:
        raise ValueError(f"a prefix of {P} tokens plus {num_steps} sampled tokens needs block_size >= "
                         f"{P + num_steps - 1}, the model has {block}")
    if compile and not use_cache:
        raise ValueError("compile=True compiles the KV-cached decode step; it needs use_cache=True")
    if compile and gpt.training:
        raise ValueError("compile=True samples in eval mode only (compiled dropout draws differ from "
                         "eager); call gpt.eval() first")
    vocab = gpt.config.vocab_size
    if vocab_limit is not None and not 1 <= vocab_limit <= vocab:
        raise ValueError(f"vocab_limit {vocab_limit} must lie in [1, {vocab}] (the GPT's vocabulary)")
    # the token ids past the limit, masked in every pick (None: nothing to mask)
    past = None if vocab_limit in (None, vocab) else torch.arange(vocab_limit, vocab, device=prefix.device)
    guided = cfg_scale is not None and cfg_scale != 1.0
    if guided:
        if null_prefix is None or null_prefix.shape != prefix.shape:
            raise ValueError("classifier-free guidance needs a null_prefix shaped like the prefix "
                             f"{tuple(prefix.shape)}, got {None if null_prefix is None else tuple(null_prefix.shape)}")
        prefix = torch.cat([prefix, null_prefix])  # (2B, P)
    kwargs = dict(gpt_kwargs or {})
    if context is not None:
        if "context" in kwargs:
            raise ValueError("pass the context either as context= or in gpt_kwargs, not both")
        kwargs["context"] = context
    if guided and kwargs:
        if null_kwargs is None:
            null_kwargs = {**kwargs, "context": torch.zeros_like(kwargs["context"]) if null_context is None
                           else null_context}
        if set(null_kwargs) - set(kwargs):
            # e.g. context_drop: rows of the conditional half keep their context
            kwargs = {**kwargs, "context_drop": torch.zeros_like(null_kwargs["context_drop"])}
        kwargs = {k: torch.cat([v, null_kwargs[k]]) for k, v in kwargs.items()}  # (2B, ...)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B or 2B, V) -> (B,)
        if guided:
            logits = guided_logits(logits[:B].float(), logits[B:].float(), cfg_scale)
        if past is not None:  # after guidance: -inf - -inf would be nan there
            logits = logits.float().index_fill(-1, past, float("-inf"))
        return sample_next(logits, generator, temperature, top_k, top_p)

    def widen(tok: torch.Tensor) -> torch.Tensor:  # (B,) -> (B or 2B, 1): both halves get the same token
        tok = tok[:, None]
        return torch.cat([tok, tok]) if guided else tok

    out = []
    if use_cache:
        cache = gpt.make_cache(P + num_steps - 1)
        logits = gpt(prefix, cache=cache, **kwargs)[:, -1]  # (B or 2B, V)
        decoder = _decoder(gpt, cache) if compile else None

        def step(tok: torch.Tensor, pos: int) -> torch.Tensor:  # (B or 2B, 1) at `pos` -> (B or 2B, V)
            return gpt(tok, cache=cache)[:, -1] if decoder is None else decoder(gpt, tok, pos)

        with contextlib.ExitStack() as stack:
            for i in range(num_steps):
                tok = pick(logits)
                out.append(tok)
                if i < num_steps - 1:
                    logits = step(widen(tok), P + i)
                if compile and i == 0:
                    # The first step checked dynamo's guards (hundreds, over every module: ~0.4 ms on
                    # CPU, as long as a small model's whole step); the later ones pass the same model,
                    # buffers and shapes, so they run only the guards that tell cached graphs apart.
                    stack.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
    else:
        seq = prefix
        for step in range(num_steps):
            tok = pick(gpt(seq, **kwargs)[:, -1])
            out.append(tok)
            if step < num_steps - 1:
                seq = torch.cat([seq, widen(tok)], dim=1)
    return torch.stack(out, dim=1)  # (B, num_steps)
