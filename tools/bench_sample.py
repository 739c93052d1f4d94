"""Sampled tokens per second: without the KV cache, with it (eager), and with the compiled
fixed-shape decode step (`generate(..., compile=True)`).

Builds a randomly initialised GPT (block_size = tokens + 1: one SOS token, then the image tokens),
samples `--tokens` tokens for `--batch` sequences each way from the same seed, checks that all paths
give the same tokens, prints a table and, with --json, writes the figures. Without the cache every
step re-runs the whole prefix, so its cost grows with the square of the sequence length. The compiled
path's first call (compile included) is timed apart; the table shows its steady state. On a machine
other jobs share, pass --threads 1: OpenMP threads on every busy core wait for each other at every op
(2 threads on a loaded 2-core VM ran 30x slower than 1).

    python tools/bench_sample.py [--tokens 256] [--batch 4] [--layers 2] [--width 128] [--threads 1]
                                 [--paths cached,compiled] [--json out.json]

Text-conditioned row (issue 23): `--text-tokens 120 --text-width 2048` adds cross-attention over a
caption's features (random true lengths, a learned projection when the width differs) and the path
`recontext`: the KV cache for the image tokens, but the context's keys and values recomputed at
every step, i.e. what the cached paths save by computing them once per sample.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from taming_dist.config.schema import GPTConfig
from taming_dist.models.gpt import GPT
from taming_dist.models.sampling import generate, sample_next

PATHS = {"uncached": dict(use_cache=False), "cached": dict(), "compiled": dict(compile=True), "recontext": None}


def recontext(gpt: GPT, prefix: torch.Tensor, n: int, generator, gpt_kwargs: dict, top_k: int) -> torch.Tensor:
    """Cached decoding that recomputes the context's keys and values at every step (the baseline
    of the text row): the same tokens as `generate`, at the cost of L x context work per step."""
    cache = gpt.make_cache(prefix.shape[1] + n - 1)
    logits = gpt(prefix, cache=cache, **gpt_kwargs)[:, -1]
    out = []
    for i in range(n):
        tok = sample_next(logits, generator, top_k=top_k)
        out.append(tok)
        if i < n - 1:
            for layer in cache.layers:
                layer.cross = None
            logits = gpt(tok[:, None], cache=cache, **gpt_kwargs)[:, -1]
    return torch.stack(out, dim=1)


def time_paths(gpt: GPT, prefix: torch.Tensor, tokens: int, paths: list[str], repeats: int,
               gpt_kwargs: dict = None) -> dict:
    """Per path: best seconds over `repeats` and the sampled tokens. One warm-up run each (full length
    when compiling, so the timed runs reuse its graph; its seconds are `first_call_s`); the timed runs
    alternate between paths so that load from other processes hits them alike."""
    gpt_kwargs = gpt_kwargs or {}

    def run(name: str, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        if name == "recontext":
            return recontext(gpt, prefix, n, gen, gpt_kwargs, top_k=100)
        return generate(gpt, prefix, n, top_k=100, generator=gen, gpt_kwargs=gpt_kwargs, **PATHS[name])

    results = {}
    for name in paths:
        t0 = time.perf_counter()
        run(name, tokens if name == "compiled" else min(tokens, 8))
        results[name] = {"seconds": float("inf"), "first_call_s": time.perf_counter() - t0}
    for _ in range(repeats):
        for name in paths:
            t0 = time.perf_counter()
            out = run(name, tokens)
            sec = time.perf_counter() - t0
            r = results[name]
            r["seconds"], r["tokens"] = min(r["seconds"], sec), out
    for r in results.values():
        r["tokens_per_s"] = tokens * prefix.shape[0] / r["seconds"]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256, help="tokens sampled per sequence")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=0, help="text row: caption features of at most this many tokens")
    p.add_argument("--text-width", type=int, default=2048, help="text row: the encoder's width (T5-XL: 2048)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (the best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--paths", default="uncached,cached,compiled",
                   help=f"comma-separated subset of {','.join(PATHS)} (recontext: text row only)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    paths = args.paths.split(",")
    if "cached" not in paths or not set(paths) <= set(PATHS):
        p.error(f"--paths must name 'cached' (the reference) and only {', '.join(PATHS)}")
    if "recontext" in paths and not args.text_tokens:
        p.error("the recontext path needs a context: pass --text-tokens N")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text = args.text_tokens > 0
    gpt = GPT(GPTConfig(vocab_size=args.vocab, block_size=args.tokens + 1, n_layer=args.layers,
                        n_head=args.heads, n_embd=args.width, cross_attention=text,
                        context_dim=args.text_width if text else 0,
                        context_proj=text and args.text_width != args.width)).eval()
    prefix = torch.zeros(args.batch, 1, dtype=torch.long)  # the SOS token
    gpt_kwargs = {}
    if text:
        g = torch.Generator().manual_seed(1)
        gpt_kwargs = {"context": torch.randn(args.batch, args.text_tokens, args.text_width, generator=g),
                      "context_len": torch.randint(1, args.text_tokens + 1, (args.batch,), generator=g)}
    print(f"GPT {args.layers} layers x {args.width} wide, vocab {args.vocab}, {gpt.num_params() / 1e6:.2f} M params; "
          f"{args.tokens} tokens x batch {args.batch}, {torch.get_num_threads()} threads"
          + (f"; text: {args.text_tokens} tokens x {args.text_width} wide" if text else ""))
    with torch.inference_mode():
        results = time_paths(gpt, prefix, args.tokens, paths, args.repeats, gpt_kwargs)
    ref = results["cached"]
    print(f"{'path':<10} {'seconds':>8} {'tokens/s':>10} {'vs cached':>10} {'same tokens':>12} {'first call s':>13}")
    for name, r in results.items():
        r["vs_cached"] = ref["seconds"] / r["seconds"]
        r["same_tokens"] = torch.equal(r["tokens"], ref["tokens"])
        print(f"{name:<10} {r['seconds']:>8.3f} {r['tokens_per_s']:>10.1f} {r['vs_cached']:>9.2f}x "
              f"{'yes' if r['same_tokens'] else 'NO':>12} {r['first_call_s']:>13.2f}")
    for r in results.values():
        del r["tokens"]
    if args.json:
        setup = {k: getattr(args, k) for k in ("tokens", "batch", "layers", "width", "heads", "vocab", "repeats",
                                               "text_tokens", "text_width")}
        with open(args.json, "w") as f:
            json.dump({**setup, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "paths": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
