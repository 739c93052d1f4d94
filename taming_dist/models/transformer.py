"""Transformer: taming's Net2NetTransformer without the training glue. A GPT models
`cat(cond_tokens, image_tokens)`, where the image tokens are the codes of a frozen VQModel.

Attribute names (`first_stage_model`, `cond_stage_model`, `transformer`) match the original so a
full state_dict keeps its key prefixes (tests/data/layouts/net2net_drin.txt).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from taming_dist.config.schema import TransformerModelConfig
from taming_dist.models.conditions import Condition, TextContext, frozen, make_condition
from taming_dist.models.gpt import GPT
from taming_dist.models.sampling import generate
from taming_dist.models.vqgan import VQModel
from taming_dist.weights.folder import load_pretrained

__all__ = ["Condition", "TextContext", "Transformer"]


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        # What the model is conditioned on (models/conditions.py): every kind-specific step below
        # goes through this object.
        self.condition = make_condition(cfg)
        self.first_stage_model = frozen(VQModel(cfg.first_stage))
        side = cfg.first_stage.ddconfig.resolution // cfg.first_stage.downsample_factor
        self.latent_shape = (side, side)
        self.num_image_tokens = side * side
        self.cond_len = self.condition.build(self)
        self._check(cfg)
        self.transformer = GPT(self.condition.gpt_config())

    def _check(self, cfg: TransformerModelConfig) -> None:
        if not 0.0 <= cfg.pkeep <= 1.0:
            raise ValueError(f"transformer.pkeep {cfg.pkeep} must lie in [0, 1]")
        need = self.cond_len + self.num_image_tokens - 1
        if cfg.gpt.block_size < need:
            raise ValueError(f"gpt.block_size {cfg.gpt.block_size} is shorter than {self.cond_len} condition + "
                             f"{self.num_image_tokens} image tokens - 1 = {need}")

    def train(self, mode: bool = True) -> "Transformer":
        # The frozen stages stay in eval mode whatever the caller asks (the original replaces their
        # `train` with a no-op); only the GPT follows `mode`.
        super().train(mode)
        self.first_stage_model.eval()
        for module in self.condition.frozen_modules(self):
            module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.tok_emb.weight.device

    # -- tokens -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_to_z(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) -> image codes (B, N) long, in raster order."""
        return self.first_stage_model.encode_to_indices(x).reshape(x.shape[0], -1).long()

    @torch.no_grad()
    def encode_to_c(self, batch: dict) -> Optional[torch.Tensor]:
        """The conditioning tokens (B, Lc) long of a batch; None for an empty batch dict."""
        return self.condition.tokens(self, batch)

    @torch.no_grad()
    def make_training_inputs(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        """Batch -> {idx (B, Lc+N-1) input tokens, targets (B, N) image codes, c_len, context, and
        gpt_kwargs: the GPT's keyword inputs (context, its lengths, the rows dropped for guidance)}.

        `batch["codes"]` (pre-extracted codes) skips the first stage. Token corruption (`pkeep`) and
        condition dropout apply in training mode only, i.e. when the GPT is training (engines switch
        the GPT unit, not this wrapper).
        """
        z = batch["codes"].long() if "codes" in batch else self.encode_to_z(batch["image"])
        z = z.reshape(z.shape[0], -1)  # (B, N)
        c = self.encode_to_c(batch)  # (B, Lc)
        inputs = self.condition.gpt_inputs(batch)
        inp = z
        if self.transformer.training:
            if self.config.pkeep < 1.0:
                # Net2NetTransformer.forward: keep each input token with probability pkeep, else
                # a random code; the targets stay the true codes.
                keep = torch.bernoulli(torch.full(z.shape, self.config.pkeep, device=z.device), generator=generator).bool()
                rand = torch.randint(0, self.config.first_stage.quantizer.n_embed, z.shape, generator=generator,
                                     device=z.device)
                inp = torch.where(keep, z, rand)
            if self.config.condition.class_dropout > 0:
                # Replace each sample's condition by the null one with probability class_dropout, so
                # the model also learns p(z) for classifier-free guidance.
                drop = torch.rand(c.shape[0], generator=generator, device=c.device) < self.config.condition.class_dropout
                c, inputs = self.condition.drop(c, inputs, drop)
        idx = torch.cat([c, inp], dim=1)[:, :-1]  # (B, Lc + N - 1)
        return {"idx": idx, "targets": z, "c_len": c.shape[1], "context": inputs.get("context"),
                "gpt_kwargs": inputs}

    def forward(self, idx: torch.Tensor, context: Optional[torch.Tensor] = None, cache=None,
                **gpt_kwargs) -> torch.Tensor:
        return self.transformer(idx, context=context, cache=cache, **gpt_kwargs)

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, condition: Condition, num_steps: Optional[int] = None, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, cfg_scale: Optional[float] = None,
               batch_size: Optional[int] = None, generator: Optional[torch.Generator] = None,
               use_cache: bool = True, prefix: Optional[torch.Tensor] = None, compile: bool = False) -> torch.Tensor:
        """Sample image codes (B, P + num_steps) after the condition and the known image tokens
        `prefix` (B, P); num_steps defaults to completing the first stage's token grid. `compile`
        decodes through a compiled fixed-shape step (see `taming_dist.models.sampling.generate`)."""
        c, null, inputs, null_inputs = self.condition.prefix(self, condition, batch_size)
        if prefix is not None:
            if prefix.dim() != 2:
                raise ValueError(f"prefix must be image tokens (B, P), got shape {tuple(prefix.shape)}")
            prefix = prefix.to(self.device).long()
            if c.shape[0] != prefix.shape[0]:
                if c.shape[0] == 1 and self.condition.expand_for_prefix():
                    c = c.expand(prefix.shape[0], -1)
                else:
                    raise ValueError(f"prefix has {prefix.shape[0]} rows, the condition {c.shape[0]}")
        else:
            prefix = c.new_empty(c.shape[0], 0)
        if num_steps is None:
            num_steps = self.num_image_tokens - prefix.shape[1]
        guided = cfg_scale is not None and cfg_scale != 1.0
        if guided and null is None:
            raise ValueError(
                f"cfg_scale {cfg_scale} needs a null condition: condition.kind class, context or text trained "
                f"with condition.class_dropout > 0 (this model: kind={self.config.condition.kind!r}, "
                f"class_dropout={self.config.condition.class_dropout})")
        full = torch.cat([c, prefix], dim=1)
        null_full = torch.cat([null, prefix], dim=1) if guided else None
        new = generate(self.transformer, full, num_steps, gpt_kwargs=inputs, null_prefix=null_full,
                       null_kwargs=null_inputs, cfg_scale=cfg_scale, use_cache=use_cache, generator=generator,
                       temperature=temperature, top_k=top_k, top_p=top_p, compile=compile,
                       vocab_limit=self.first_stage_model.config.quantizer.n_embed)
        return torch.cat([prefix, new], dim=1)  # (B, P + num_steps)

    @torch.no_grad()
    def transform(self, image: torch.Tensor, condition: Condition, strength: float = 0.8, *,
                  vqgan: VQModel | None = None, seed: int | None = None, **sample_kwargs) -> torch.Tensor:
        """Keep the first round((1 - strength) * N) codes of `image` in raster order and re-sample the
        rest given them and `condition` (the top rows of the image are kept, the rest re-imagined),
        through `vqgan` (default: this model's own first stage).

        strength 0 returns the reconstruction `vqgan.decode_code(codes)`; strength 1 is a fresh sample
        that does not depend on the image. `seed` makes the result reproducible (or pass `generator`).
        """
        vqgan = self.first_stage_model if vqgan is None else vqgan
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength {strength} must lie in [0, 1] (0 keeps the image, 1 re-samples every token)")
        if seed is not None:
            if "generator" in sample_kwargs:
                raise ValueError("pass either seed or generator, not both")
            sample_kwargs["generator"] = torch.Generator(device=image.device).manual_seed(seed)
        grid = vqgan.encode_to_indices(image)  # (B, h, w)
        if tuple(grid.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"the image encodes to a {tuple(grid.shape[1:])} token grid, the transformer models "
                             f"{tuple(self.latent_shape)}; resize the image to the first stage's resolution")
        codes = grid.flatten(1)  # (B, N)
        n = codes.shape[1]
        keep = round((1.0 - strength) * n)
        if keep < n:
            codes = self.sample(condition, prefix=codes[:, :keep], num_steps=n - keep, **sample_kwargs)
        return vqgan.decode_code(codes, shape=self.latent_shape).clamp(-1, 1)

    @classmethod
    def from_pretrained(cls, folder) -> "Transformer":
        """Load a model folder (config.json + model.safetensors from training, `export` or
        `import-taming`), in eval mode; a pipeline export's `transformer/` sub-folder is found too."""
        return load_pretrained(cls, folder, "transformer")

    @torch.no_grad()
    def decode_to_img(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) in raster order -> images (B, 3, R, R) from the first stage's decoder."""
        return self.first_stage_model.decode_code(codes, shape=self.latent_shape)
