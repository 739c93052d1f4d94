"""Inference: build a condition from plain inputs, sample images from it, or re-sample part of an
existing image's tokens (also reached as `VQModel.transform` and `Transformer.transform`).

`vqgan` is the VQModel whose codes the transformer models (usually `transformer.first_stage_model`);
images are (B, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence

import torch

from taming_dist.models.transformer import Condition, Transformer
from taming_dist.models.vqgan import VQModel


def _expects(transformer: Transformer) -> str:
    """What get_condition needs for this transformer's condition kind, as a hint for errors."""
    cond, gpt = transformer.config.condition, transformer.config.gpt
    if cond.kind == "class":
        return f"labels= (ints in [0, {cond.n_classes}) or class names, one per sample)"
    if cond.kind == "tokens":
        d = cond.cond_vqgan.ddconfig
        return f"image= (B, {d.in_channels}, {d.resolution}, {d.resolution}) in [-1, 1] for the cond-stage VQModel"
    if cond.kind == "context":
        return f"context= (B, L, {gpt.context_dim})"
    return "nothing (an unconditional model; choose the number of samples with batch_size=)"


def _label(x, names: Optional[Sequence[str]], n_classes: int) -> int:
    if isinstance(x, str):
        if names is None:
            # Imported here: only names need the data package (the built-in dataset's class names).
            from taming_dist.data.synthetic import CLASS_NAMES as names
        if x not in names:
            raise ValueError(f"unknown class name {x!r}; the classes are {', '.join(names[:n_classes])}")
        i = list(names).index(x)
    elif isinstance(x, Integral) and not isinstance(x, bool):
        i = int(x)
    else:
        raise ValueError(f"a label must be an int or a class name, got {x!r}")
    if not 0 <= i < n_classes:
        raise ValueError(f"label {x!r} (index {i}) is outside the model's n_classes {n_classes}")
    return i


@torch.no_grad()
def get_condition(transformer: Transformer, labels=None, *, image: Optional[torch.Tensor] = None,
                  context: Optional[torch.Tensor] = None, class_names: Optional[Sequence[str]] = None) -> Condition:
    """Plain inputs -> the condition `sample`, `generate_image` and `transform` take, for the
    transformer's condition kind (pass only the input that kind uses):

    - class: `labels`, an int, a class name or a sequence/tensor of them -> labels (B,) long. Names are
      the built-in dataset's (taming_dist/data/synthetic.py) unless `class_names` lists the classes.
    - tokens: `image` (B, C, H, W), or one (C, H, W), float in [-1, 1] or uint8 -> its codes (B, Lc)
      under the cond-stage VQModel.
    - context: `context` (B, L, context_dim), or one (L, context_dim) -> that tensor on the model.
    - none: nothing -> None.
    """
    kind, dev = transformer.config.condition.kind, transformer.device
    wanted = {"class": "labels", "tokens": "image", "context": "context", "none": None}[kind]
    given = [k for k, v in (("labels", labels), ("image", image), ("context", context)) if v is not None]
    wrong = [k for k in given if k != wanted]
    if wrong or (wanted is not None and wanted not in given):
        raise ValueError(f"this transformer's condition kind is {kind!r}: pass {_expects(transformer)}"
                         + (f", not {', '.join(wrong)}=" if wrong else ""))
    if kind == "class":
        items = labels.reshape(-1).tolist() if isinstance(labels, torch.Tensor) else labels
        items = [items] if isinstance(items, (str, Integral)) else list(items)
        if not items:
            raise ValueError("labels is empty: pass one label per sample")
        n = transformer.config.condition.n_classes
        return torch.tensor([_label(x, class_names, n) for x in items], dtype=torch.long, device=dev)
    if kind == "tokens":
        image = torch.as_tensor(image)
        image = image[None] if image.dim() == 3 else image
        if not image.is_floating_point():
            image = image.float() / 127.5 - 1  # uint8 pixels, scaled as taming's ImagePaths does
        d = transformer.config.condition.cond_vqgan.ddconfig
        if image.dim() != 4 or tuple(image.shape[1:]) != (d.in_channels, d.resolution, d.resolution):
            raise ValueError(f"the cond-stage VQModel takes images (B, {d.in_channels}, {d.resolution}, "
                             f"{d.resolution}), got shape {tuple(image.shape)}")
        return transformer.encode_to_c({"cond_image": image.to(dev)})
    if kind == "context":
        context = torch.as_tensor(context)
        context = context[None] if context.dim() == 2 else context
        width = transformer.config.gpt.context_dim
        if context.dim() != 3 or context.shape[-1] != width:
            raise ValueError(f"context must be (B, L, {width}) (gpt.context_dim {width}), got shape "
                             f"{tuple(context.shape)}")
        return context.to(dev, transformer.transformer.tok_emb.weight.dtype)
    return None


@torch.no_grad()
def generate_image(vqgan: VQModel, transformer: Transformer, condition: Condition, **sample_kwargs) -> torch.Tensor:
    """Sample codes with `transformer.sample(condition, **sample_kwargs)` and decode them."""
    codes = transformer.sample(condition, **sample_kwargs)  # (B, N)
    return vqgan.decode_code(codes, shape=transformer.latent_shape).clamp(-1, 1)


@torch.no_grad()
def transform(vqgan: VQModel, transformer: Transformer, image: torch.Tensor, condition: Condition,
              strength: float = 0.8, seed: Optional[int] = None, **sample_kwargs) -> torch.Tensor:
    """Keep the first round((1 - strength) * N) codes of `image` in raster order and re-sample the
    rest given them and `condition` (the top rows of the image are kept, the rest re-imagined).

    strength 0 returns the reconstruction `vqgan.decode_code(codes)`; strength 1 is a fresh sample
    that does not depend on the image. `seed` makes the result reproducible (or pass `generator`).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength} must lie in [0, 1] (0 keeps the image, 1 re-samples every token)")
    if seed is not None:
        if "generator" in sample_kwargs:
            raise ValueError("pass either seed or generator, not both")
        sample_kwargs["generator"] = torch.Generator(device=image.device).manual_seed(seed)
    grid = vqgan.encode_to_indices(image)  # (B, h, w)
    if tuple(grid.shape[1:]) != tuple(transformer.latent_shape):
        raise ValueError(f"the image encodes to a {tuple(grid.shape[1:])} token grid, the transformer models "
                         f"{tuple(transformer.latent_shape)}; resize the image to the first stage's resolution")
    codes = grid.flatten(1)  # (B, N)
    n = codes.shape[1]
    keep = round((1.0 - strength) * n)
    if keep < n:
        codes = transformer.sample(condition, prefix=codes[:, :keep], num_steps=n - keep, **sample_kwargs)
    return vqgan.decode_code(codes, shape=transformer.latent_shape).clamp(-1, 1)
