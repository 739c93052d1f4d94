"""Inference: build a condition from plain inputs, sample images from it, or re-sample part of an
existing image's tokens (also reached as `VQModel.transform` and `Transformer.transform`).

`vqgan` is the VQModel whose codes the transformer models (usually `transformer.first_stage_model`);
images are (B, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from taming_dist.models.transformer import Condition, Transformer
from taming_dist.models.vqgan import VQModel


@torch.no_grad()
def get_condition(transformer: Transformer, labels=None, *, image: Optional[torch.Tensor] = None,
                  context: Optional[torch.Tensor] = None, prompts=None, text_encoder=None,
                  class_names: Optional[Sequence[str]] = None) -> Condition:
    """Plain inputs -> the condition `sample`, `generate_image` and `transform` take, for the
    transformer's condition kind (pass only the input that kind uses):

    - class: `labels`, an int, a class name or a sequence/tensor of them -> labels (B,) long. Names are
      the built-in dataset's (taming_dist/data/synthetic.py) unless `class_names` lists the classes.
    - tokens: `image` (B, C, H, W), or one (C, H, W), float in [-1, 1] or uint8 -> its codes (B, Lc)
      under the cond-stage VQModel.
    - context: `context` (B, L, context_dim), or one (L, context_dim) -> that tensor on the model.
    - text: `prompts` (a caption or a list of them; also taken as the first argument) and
      `text_encoder` (the encoder's folder, or a loaded `taming_dist.text.TextEncoder`) -> a
      `TextContext` of their features and lengths.
    - none: nothing -> None.
    """
    cond = transformer.condition
    if cond.wants == "prompts" and prompts is None and labels is not None:
        labels, prompts = None, labels  # get_condition(t, ["a red circle ..."], text_encoder=DIR)
    given = {k: v for k, v in (("labels", labels), ("image", image), ("context", context), ("prompts", prompts))
             if v is not None}
    wrong = [k for k in given if k != cond.wants]
    if wrong or (cond.wants is not None and cond.wants not in given):
        raise ValueError(f"this transformer's condition kind is {transformer.config.condition.kind!r}: pass "
                         f"{cond.expects()}" + (f", not {', '.join(wrong)}=" if wrong else ""))
    if text_encoder is not None:
        if cond.wants != "prompts":
            raise ValueError("text_encoder= is for text-conditioned models (condition.kind=text)")
        given["text_encoder"] = text_encoder
    return cond.from_user(transformer, given, class_names)


@torch.no_grad()
def generate_image(vqgan: VQModel, transformer: Transformer, condition: Condition, **sample_kwargs) -> torch.Tensor:
    """Sample codes with `transformer.sample(condition, **sample_kwargs)` and decode them."""
    codes = transformer.sample(condition, **sample_kwargs)  # (B, N)
    return vqgan.decode_code(codes, shape=transformer.latent_shape).clamp(-1, 1)


def transform(vqgan: VQModel, transformer: Transformer, image: torch.Tensor, condition: Condition,
              strength: float = 0.8, seed: Optional[int] = None, **sample_kwargs) -> torch.Tensor:
    """Keep the first round((1 - strength) * N) codes of `image` in raster order and re-sample the
    rest given them and `condition` with `vqgan` as the first stage: `Transformer.transform`."""
    return transformer.transform(image, condition, strength, vqgan=vqgan, seed=seed, **sample_kwargs)
