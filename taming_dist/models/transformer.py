"""Transformer: taming's Net2NetTransformer without the training glue. A GPT models
`cat(cond_tokens, image_tokens)`, where the image tokens are the codes of a frozen VQModel.

Attribute names (`first_stage_model`, `cond_stage_model`, `transformer`) match the original so a
full state_dict keeps its key prefixes (tests/data/layouts/net2net_drin.txt).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from taming_dist.config.schema import TransformerModelConfig
from taming_dist.models.gpt import GPT
from taming_dist.models.sampling import generate
from taming_dist.models.vqgan import VQModel
from taming_dist.weights.folder import load_pretrained

Condition = Union[None, int, list, torch.Tensor]


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        cond, gpt = cfg.condition, cfg.gpt
        self.first_stage_model = _frozen(VQModel(cfg.first_stage))
        side = cfg.first_stage.ddconfig.resolution // cfg.first_stage.downsample_factor
        self.latent_shape = (side, side)
        self.num_image_tokens = side * side
        if cond.kind == "tokens":
            self.cond_stage_model = _frozen(VQModel(cond.cond_vqgan))
            cside = cond.cond_vqgan.ddconfig.resolution // cond.cond_vqgan.downsample_factor
            self.cond_len = cside * cside
        else:
            self.cond_len = 1
        self._check(cfg)
        self.transformer = GPT(gpt)

    def _check(self, cfg: TransformerModelConfig) -> None:
        cond, gpt = cfg.condition, cfg.gpt
        if not 0.0 <= cfg.pkeep <= 1.0:
            raise ValueError(f"transformer.pkeep {cfg.pkeep} must lie in [0, 1]")
        if not 0.0 <= cond.class_dropout < 1.0:
            raise ValueError(f"condition.class_dropout {cond.class_dropout} must lie in [0, 1)")
        if cond.class_dropout > 0 and cond.kind not in ("class", "context"):
            raise ValueError(f"condition.class_dropout > 0 needs a null condition: kind class or context, not {cond.kind!r}")
        if cond.kind == "class":
            # Labels are tokens of the shared vocabulary (as in the original cin models); the null
            # class for classifier-free guidance is one more token, index n_classes.
            need = cond.n_classes + (1 if cond.class_dropout > 0 else 0)
            if gpt.vocab_size < need:
                raise ValueError(
                    f"gpt.vocab_size {gpt.vocab_size} cannot hold {cond.n_classes} class tokens"
                    + (" plus the null class (index n_classes) used by class_dropout" if cond.class_dropout > 0 else "")
                    + f"; set gpt.vocab_size >= {need}")
        elif cond.kind in ("none", "context") and not 0 <= cond.sos_token < gpt.vocab_size:
            raise ValueError(f"condition.sos_token {cond.sos_token} is outside the vocabulary [0, {gpt.vocab_size})")
        elif cond.kind == "tokens" and cond.cond_vqgan.quantizer.n_embed > gpt.vocab_size:
            raise ValueError(f"the conditioning VQModel's n_embed {cond.cond_vqgan.quantizer.n_embed} exceeds "
                             f"gpt.vocab_size {gpt.vocab_size} (condition and image tokens share the vocabulary)")
        if cond.kind == "context" and not gpt.cross_attention:
            raise ValueError("condition.kind=context needs gpt.cross_attention=true (and gpt.context_dim)")
        need = self.cond_len + self.num_image_tokens - 1
        if gpt.block_size < need:
            raise ValueError(f"gpt.block_size {gpt.block_size} is shorter than {self.cond_len} condition + "
                             f"{self.num_image_tokens} image tokens - 1 = {need}")

    def train(self, mode: bool = True) -> "Transformer":
        # The frozen stages stay in eval mode whatever the caller asks (the original replaces their
        # `train` with a no-op); only the GPT follows `mode`.
        super().train(mode)
        self.first_stage_model.eval()
        if hasattr(self, "cond_stage_model"):
            self.cond_stage_model.eval()
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
        kind = self.config.condition.kind
        if kind == "class":
            return batch["label"].reshape(-1, 1).long()
        if kind == "tokens":
            x = batch["cond_image"]
            return self.cond_stage_model.encode_to_indices(x).reshape(x.shape[0], -1).long()
        ref = next((batch[k] for k in ("codes", "image", "context", "label") if k in batch), None)
        if ref is None:
            return None
        return torch.full((ref.shape[0], 1), self.config.condition.sos_token, dtype=torch.long, device=ref.device)

    def _condition_dropout(self, c: torch.Tensor, context: Optional[torch.Tensor], generator):
        """Replace each sample's condition by the null one with probability class_dropout, so the
        model also learns p(z) for classifier-free guidance."""
        cond = self.config.condition
        drop = torch.rand(c.shape[0], generator=generator, device=c.device) < cond.class_dropout  # (B,)
        if cond.kind == "class":
            c = torch.where(drop[:, None], torch.full_like(c, cond.n_classes), c)
        elif cond.kind == "context":
            context = torch.where(drop[:, None, None], torch.zeros_like(context), context)
        return c, context

    @torch.no_grad()
    def make_training_inputs(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        """Batch -> {idx (B, Lc+N-1) input tokens, targets (B, N) image codes, c_len, context}.

        `batch["codes"]` (pre-extracted codes) skips the first stage. Token corruption (`pkeep`) and
        condition dropout apply in training mode only, i.e. when the GPT is training (engines switch
        the GPT unit, not this wrapper).
        """
        z = batch["codes"].long() if "codes" in batch else self.encode_to_z(batch["image"])
        z = z.reshape(z.shape[0], -1)  # (B, N)
        c = self.encode_to_c(batch)  # (B, Lc)
        context = batch["context"] if self.config.condition.kind == "context" else None
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
                c, context = self._condition_dropout(c, context, generator)
        idx = torch.cat([c, inp], dim=1)[:, :-1]  # (B, Lc + N - 1)
        return {"idx": idx, "targets": z, "c_len": c.shape[1], "context": context}

    def forward(self, idx: torch.Tensor, context: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        return self.transformer(idx, context=context, cache=cache)

    # -- sampling -----------------------------------------------------------------------------
    def _prefix(self, condition: Condition, batch_size: Optional[int]):
        """condition -> (cond tokens (B, Lc), null tokens or None, context or None)."""
        cond, dev = self.config.condition, self.device
        if cond.kind in ("none", "context"):
            if cond.kind == "none" and condition is not None:
                raise ValueError("an unconditional model (condition.kind=none) takes condition=None")
            context = None
            if cond.kind == "context":
                if not isinstance(condition, torch.Tensor) or condition.dim() != 3:
                    raise ValueError("condition.kind=context needs a context tensor (B, L, context_dim)")
                context = condition.to(dev)
                batch_size = self._batch(batch_size, context.shape[0])
            batch_size = batch_size or 1
            sos = torch.full((batch_size, 1), cond.sos_token, dtype=torch.long, device=dev)
            # The null condition of a context model is SOS with an all-zero context (see
            # _condition_dropout); an unconditional model has none.
            return sos, (sos if cond.kind == "context" and cond.class_dropout > 0 else None), context
        if cond.kind == "class":
            if condition is None:
                raise ValueError("a class-conditional model needs labels as the condition (int, list or tensor)")
            labels = torch.as_tensor(condition, dtype=torch.long, device=dev).reshape(-1)
            if labels.numel() == 1 and batch_size:
                labels = labels.expand(batch_size)
            self._batch(batch_size, labels.shape[0])
            if (labels < 0).any() or (labels >= cond.n_classes).any():
                raise ValueError(f"labels {labels.tolist()} must lie in [0, n_classes {cond.n_classes})")
            null = torch.full_like(labels, cond.n_classes)[:, None] if cond.class_dropout > 0 else None
            return labels[:, None], null, None
        if condition is None:
            raise ValueError("a token-conditional model needs cond tokens (B, Lc) long or a cond image (B, C, H, W)")
        condition = condition.to(dev)
        if condition.dim() == 4:
            condition = self.encode_to_c({"cond_image": condition})
        self._batch(batch_size, condition.shape[0])
        return condition.long(), None, None

    @staticmethod
    def _batch(batch_size: Optional[int], rows: int) -> int:
        if batch_size is not None and batch_size != rows:
            raise ValueError(f"batch_size {batch_size} does not match the {rows} conditions given; "
                             "pass one condition per sample (or a single label with batch_size)")
        return rows

    @torch.no_grad()
    def sample(self, condition: Condition, num_steps: Optional[int] = None, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, cfg_scale: Optional[float] = None,
               batch_size: Optional[int] = None, generator: Optional[torch.Generator] = None,
               use_cache: bool = True, prefix: Optional[torch.Tensor] = None, compile: bool = False) -> torch.Tensor:
        """Sample image codes (B, P + num_steps) after the condition and the known image tokens
        `prefix` (B, P); num_steps defaults to completing the first stage's token grid. `compile`
        decodes through a compiled fixed-shape step (see `taming_dist.models.sampling.generate`)."""
        c, null, context = self._prefix(condition, batch_size)
        if prefix is not None:
            if prefix.dim() != 2:
                raise ValueError(f"prefix must be image tokens (B, P), got shape {tuple(prefix.shape)}")
            prefix = prefix.to(self.device).long()
            if c.shape[0] != prefix.shape[0]:
                if c.shape[0] == 1 and self.config.condition.kind == "none":
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
                f"cfg_scale {cfg_scale} needs a null condition: condition.kind class or context trained with "
                f"condition.class_dropout > 0 (this model: kind={self.config.condition.kind!r}, "
                f"class_dropout={self.config.condition.class_dropout})")
        full = torch.cat([c, prefix], dim=1)
        null_full = torch.cat([null, prefix], dim=1) if guided else None
        new = generate(self.transformer, full, num_steps, context=context, null_prefix=null_full,
                       cfg_scale=cfg_scale, use_cache=use_cache, generator=generator, temperature=temperature,
                       top_k=top_k, top_p=top_p, compile=compile,
                       vocab_limit=self.first_stage_model.config.quantizer.n_embed)
        return torch.cat([prefix, new], dim=1)  # (B, P + num_steps)

    def transform(self, image: torch.Tensor, condition: Condition, strength: float = 0.8, **kwargs) -> torch.Tensor:
        """Re-sample part of `image`'s tokens through this model's own first stage: see
        `taming_dist.models.pipeline.transform` (seed, sampling options)."""
        from taming_dist.models.pipeline import transform  # pipeline imports this module

        return transform(self.first_stage_model, self, image, condition, strength, **kwargs)

    @classmethod
    def from_pretrained(cls, folder) -> "Transformer":
        """Load a model folder (config.json + model.safetensors from training, `export` or
        `import-taming`), in eval mode; a pipeline export's `transformer/` sub-folder is found too."""
        return load_pretrained(cls, folder, "transformer")

    @torch.no_grad()
    def decode_to_img(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) in raster order -> images (B, 3, R, R) from the first stage's decoder."""
        return self.first_stage_model.decode_code(codes, shape=self.latent_shape)
