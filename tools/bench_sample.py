"""Sampled tokens per second with and without the KV cache.

Builds a randomly initialised GPT (block_size = tokens + 1: one SOS token, then the image tokens),
samples `--tokens` tokens for `--batch` sequences both ways from the same seed, checks that the two
paths give the same tokens, and prints a table. Without the cache every step re-runs the whole
prefix, so its cost grows with the square of the sequence length.

    python tools/bench_sample.py [--tokens 256] [--batch 4] [--layers 2] [--width 128] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from taming_dist.config.schema import GPTConfig
from taming_dist.models.gpt import GPT
from taming_dist.models.sampling import generate


def time_sampling(gpt: GPT, prefix: torch.Tensor, tokens: int, use_cache: bool, repeats: int) -> tuple[float, torch.Tensor]:
    """(best seconds over `repeats`, the sampled tokens) after one short warm-up run."""
    generate(gpt, prefix, min(tokens, 8), use_cache=use_cache, generator=torch.Generator().manual_seed(0))
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(gpt, prefix, tokens, use_cache=use_cache, top_k=100,
                       generator=torch.Generator().manual_seed(0))
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256, help="tokens sampled per sequence")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per path (the best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=args.vocab, block_size=args.tokens + 1, n_layer=args.layers,
                        n_head=args.heads, n_embd=args.width)).eval()
    prefix = torch.zeros(args.batch, 1, dtype=torch.long)  # the SOS token
    print(f"GPT {args.layers} layers x {args.width} wide, vocab {args.vocab}, {gpt.num_params() / 1e6:.2f} M params; "
          f"{args.tokens} tokens x batch {args.batch}, {torch.get_num_threads()} threads")
    results = {}
    with torch.inference_mode():
        for name, use_cache in (("uncached", False), ("cached", True)):
            results[name] = time_sampling(gpt, prefix, args.tokens, use_cache, args.repeats)
    same = torch.equal(results["uncached"][1], results["cached"][1])
    n = args.tokens * args.batch
    print(f"{'path':<10} {'seconds':>8} {'tokens/s':>10}")
    for name, (sec, _) in results.items():
        print(f"{name:<10} {sec:>8.3f} {n / sec:>10.1f}")
    print(f"speed-up   {results['uncached'][0] / results['cached'][0]:.2f}x   (same tokens: {'yes' if same else 'NO'})")


if __name__ == "__main__":
    main()
