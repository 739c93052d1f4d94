"""The transformer stage's loss: next-token cross-entropy over the image positions only."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def image_token_loss(logits: torch.Tensor, targets: torch.Tensor, c_len: int) -> tuple[torch.Tensor, dict]:
    """logits (B, c_len + N - 1, V) of `cat(c, z)[:, :-1]`, targets z (B, N) -> (mean CE, stats).

    The logit at position c_len - 1 + i predicts image token i; the conditioning tokens themselves
    are never targets (as in Net2NetTransformer). Computed in fp32 so bf16/fp16 logits do not lose
    precision in the log-softmax over a large codebook.
    """
    B, N = targets.shape
    if c_len < 1:
        raise ValueError(f"c_len {c_len} must be >= 1: the first image token is predicted from a conditioning token")
    image_logits = logits[:, c_len - 1:]  # (B, N, V)
    if image_logits.shape[:2] != (B, N):
        raise ValueError(f"logits {tuple(logits.shape)} do not hold {N} image positions after {c_len} "
                         f"conditioning tokens (expected length {c_len + N - 1})")
    flat = image_logits.float().reshape(B * N, -1)
    loss = F.cross_entropy(flat, targets.reshape(-1))
    with torch.no_grad():
        accuracy = (flat.argmax(dim=-1) == targets.reshape(-1)).float().mean()
    return loss, {"accuracy": accuracy}
