"""VQModel: the VQGAN tokenizer (Esser et al. 2021), taming's `VQModel`/`GumbelVQ` without the
training glue. Keys match original checkpoints (docs/taming-compat.md; layouts in tests/data/layouts/)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from taming_dist.config.schema import VQModelConfig
from taming_dist.models.blocks import AttnBlock, Decoder, Encoder, ResnetBlock
from taming_dist.models.collectives import ONE_PROCESS, Collectives
from taming_dist.models.quantize import quantizer_class
from taming_dist.weights.folder import load_pretrained


class VQModel(nn.Module):
    """x (B, 3, R, R) in [-1, 1] -> encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

    quant_conv maps z_channels to the quantizer's input width (`input_channels`): embed_dim, or for
    the gumbel kind z_channels, since the original GumbelVQ feeds quant_conv's output to
    `quantize.proj`, which it builds with z_channels inputs (the original's z_channels -> embed_dim
    only ran because its configs have embed_dim == z_channels).

    `collectives` (models/collectives.py; one process by default) is what the quantizer's training
    forward needs from the data-parallel group, given here and nowhere else.
    """

    def __init__(self, config: VQModelConfig, collectives: Collectives = ONE_PROCESS):
        super().__init__()
        config.validate()
        dd, q = config.ddconfig, config.quantizer
        if dd.double_z:
            raise ValueError("ddconfig.double_z=true doubles the encoder output for a KL autoencoder; "
                             "a VQModel needs double_z=false")
        self.config = config
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        quantizer = quantizer_class(q)
        self.quant_conv = nn.Conv2d(dd.z_channels, quantizer.input_channels(q, dd.z_channels), kernel_size=1)
        self.quantize = quantizer.from_config(q, dd.z_channels, collectives)
        self.post_quant_conv = nn.Conv2d(q.embed_dim, dd.z_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def grad_checkpointing(self) -> bool:
        return self.encoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = bool(value)

    def parallel_blocks(self) -> list[nn.Module]:
        """The repeated blocks engines treat one by one: activation checkpointing runs each through
        `torch.utils.checkpoint`, compile and FSDP2's `fully_shard` take each before the root."""
        return [b for part in (self.encoder, self.decoder) for b in part.modules() if isinstance(b, (ResnetBlock, AttnBlock))]

    def encode(self, x: torch.Tensor):
        """x (B, C, R, R) -> (quant (B, embed_dim, R/f, R/f), codebook loss, info)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor, shape: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """indices (B, h, w), or (B, h*w) with `shape=(h, w)` (a square grid when omitted) -> images."""
        if indices.dim() == 2:
            n = indices.shape[1]
            if shape is None:
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"{n} codes per image do not form a square grid; pass shape=(h, w)")
                shape = (side, side)
            if shape[0] * shape[1] != n:
                raise ValueError(f"shape {tuple(shape)} does not hold the {n} codes per image")
            indices = indices.reshape(indices.shape[0], *shape)
        elif indices.dim() != 3:
            raise ValueError(f"indices must be (B, h, w) or (B, h*w), got shape {tuple(indices.shape)}")
        return self.decode(self.quantize.get_codebook_entry(indices.long()))

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, R, R) -> codes (B, R/f, R/f) long."""
        return self.encode(x)[2]["indices"]

    def transform(self, image: torch.Tensor, condition, strength: float = 0.8, *, transformer=None,
                  **kwargs) -> torch.Tensor:
        """Re-sample part of `image`'s tokens with `transformer`, a Transformer over this model's codes,
        through this model: see `Transformer.transform` (seed, sampling options)."""
        if transformer is None:
            raise ValueError("VQModel.transform needs transformer=, the Transformer that models this VQModel's "
                             "codes (or call transformer.transform(image, condition), which uses its own first stage)")
        return transformer.transform(image, condition, strength, vqgan=self, **kwargs)

    def forward(self, x: torch.Tensor):
        quant, qloss, info = self.encode(x)
        return self.decode(quant), qloss, info

    @classmethod
    def from_pretrained(cls, folder) -> "VQModel":
        """Load a model folder (config.json + model.safetensors from training, `export` or
        `import-taming`), in eval mode; a pipeline export's `vqgan/` sub-folder is found too."""
        return load_pretrained(cls, folder, "vqgan")

    def get_last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight is measured on (Esser et al. 2021, eq. 7)."""
        return self.decoder.conv_out.weight
