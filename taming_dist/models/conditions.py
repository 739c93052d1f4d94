"""Conditions as objects: one class per `condition.kind`, behind one interface (issue 23, part 1).

A condition says what the GPT reads besides the image tokens: the conditioning tokens in front of
them (an SOS token, a class token, the codes of a second VQModel) and the keyword inputs of the GPT
(a context sequence for cross-attention, with its true lengths and the rows dropped for
classifier-free guidance). Each class answers, for its kind:

- `check()`: the configuration errors of this kind, `gpt_config()`: the GPT it needs;
- `build(model)`: modules it adds to the Transformer (the frozen cond-stage VQModel), -> cond_len;
- training inputs from a batch (`tokens`, `gpt_inputs`) and the condition dropout (`drop`);
- sampling: the prefix tokens, the null condition for guidance and the GPT inputs (`prefix`);
- user input -> condition (`from_user`: class names or ints, images, context tensors, prompts);
- the condition of a training batch for sample grids (`from_batch`), an example for `plan`;
- what an export folder records (`record`).

Only `make_condition` reads the kind string; a test (tests/unit/test_layering.py) forbids
dispatching on it anywhere else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from numbers import Integral
from typing import Optional, Sequence, Union

import torch

from taming_dist.config.schema import GPTConfig, TransformerModelConfig


@dataclass
class TextContext:
    """Encoded captions: features (B, L, D) padded to L, their true lengths (B,) long, and the prompts
    they came from (when known)."""

    features: torch.Tensor
    lengths: torch.Tensor
    prompts: Optional[list[str]] = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def to(self, device, dtype=None) -> "TextContext":
        return TextContext(self.features.to(device, dtype), self.lengths.to(device), self.prompts)

    def take(self, count: int) -> "TextContext":
        return TextContext(self.features[:count], self.lengths[:count],
                           None if self.prompts is None else self.prompts[:count])


Condition = Union[None, int, list, torch.Tensor, TextContext]


def frozen(model):
    """`model` in eval mode with gradients off (the frozen first and cond stages)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _rows(batch_size: Optional[int], rows: int) -> int:
    if batch_size is not None and batch_size != rows:
        raise ValueError(f"batch_size {batch_size} does not match the {rows} conditions given; "
                         "pass one condition per sample (or a single label with batch_size)")
    return rows


class Conditioning:
    """The interface, and the behaviour of the SOS-token kinds (none, and the base of context/text)."""

    kind = ""
    # the user-input keyword of get_condition this kind takes (None: nothing)
    wants: Optional[str] = None
    takes_cond_ckpt = False  # condition.cond_ckpt holds weights of a module this kind builds

    def __init__(self, cfg: TransformerModelConfig):
        self.cfg, self.cond = cfg, cfg.condition

    # -- configuration --------------------------------------------------------------------------
    @property
    def has_null(self) -> bool:
        """Whether a null condition is trained (classifier-free guidance is possible)."""
        return False

    def check(self) -> None:
        cond, gpt = self.cond, self.cfg.gpt
        if not 0.0 <= cond.class_dropout < 1.0:
            raise ValueError(f"condition.class_dropout {cond.class_dropout} must lie in [0, 1)")
        if cond.class_dropout > 0 and not self.supports_null():
            raise ValueError(f"condition.class_dropout > 0 needs a null condition: kind class, context or text, "
                             f"not {cond.kind!r}")
        if not 0 <= cond.sos_token < gpt.vocab_size:
            raise ValueError(f"condition.sos_token {cond.sos_token} is outside the vocabulary [0, {gpt.vocab_size})")

    def supports_null(self) -> bool:
        return False

    def check_features(self, text: Optional[dict], where: str) -> None:
        """At start-up, before any step: whether a codes folder's text features (its manifest's
        `text` record, None when it has none) suit this model. Only text models need them."""

    def gpt_config(self) -> GPTConfig:
        return self.cfg.gpt

    def build(self, model) -> int:
        """Add this kind's modules to the Transformer; -> the number of conditioning tokens."""
        return 1

    def frozen_modules(self, model) -> list:
        return []

    # -- training -------------------------------------------------------------------------------
    def _reference(self, batch: dict) -> Optional[torch.Tensor]:
        return next((batch[k] for k in ("codes", "image", "context", "label") if k in batch), None)

    def tokens(self, model, batch: dict) -> Optional[torch.Tensor]:
        """The conditioning tokens (B, Lc) long of a batch; None for an empty batch dict."""
        ref = self._reference(batch)
        if ref is None:
            return None
        return torch.full((ref.shape[0], 1), self.cond.sos_token, dtype=torch.long, device=ref.device)

    def gpt_inputs(self, batch: dict) -> dict:
        """The GPT's keyword inputs (context, context_len) of a batch."""
        return {}

    def drop(self, c: torch.Tensor, inputs: dict, drop: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Replace the condition of the rows in `drop` (B,) bool by the null one."""
        return c, inputs

    # -- sampling -------------------------------------------------------------------------------
    def prefix(self, model, condition: Condition, batch_size: Optional[int]):
        """condition -> (cond tokens (B, Lc), null tokens or None, GPT inputs, null GPT inputs or None)."""
        if condition is not None:
            raise ValueError("an unconditional model (condition.kind=none) takes condition=None")
        sos = torch.full((batch_size or 1, 1), self.cond.sos_token, dtype=torch.long, device=model.device)
        return sos, None, {}, None

    def expand_for_prefix(self) -> bool:
        """Whether one condition may serve every row of a longer image prefix (unconditional only)."""
        return False

    def from_user(self, model, given: dict, class_names: Optional[Sequence[str]] = None) -> Condition:
        """get_condition's plain inputs -> the condition `sample` takes; `given` holds those passed."""
        return None

    def expects(self) -> str:
        return "nothing (an unconditional model; choose the number of samples with batch_size=)"

    def from_batch(self, batch: dict, count: int) -> Condition:
        """The condition of a training batch's first `count` samples (for sample grids)."""
        return None

    def example_inputs(self, batch_size: int) -> dict:
        """Random GPT keyword inputs of the right shapes (for `plan`'s dry runs)."""
        return {}

    def labels_at_scale(self, classes: Optional[list[int]], start: int, count: int) -> Optional[torch.Tensor]:
        """Labels of samples start .. start+count-1 when sampling at scale (`sample --num-samples`):
        classes cycled by global index (every class when `classes` is None); None without labels."""
        if classes:
            raise ValueError(f"classes were given but the model is not class-conditional "
                             f"(condition.kind={self.kind})")
        if self.wants is not None:
            raise ValueError(f"sampling at scale (--num-samples) draws unconditional and class-conditional samples; "
                             f"this model is conditioned on {self.kind!r}: " + (
                                 "sample it from prompts with `sample --prompts FILE --text-encoder DIR` or "
                                 "`eval-gen MODEL --prompts FILE --text-encoder DIR` (every rank its share)"
                                 if self.wants == "prompts" else "call Transformer.sample with your conditions"))
        return None

    def record(self) -> dict:
        """What an export folder records about the condition besides the config."""
        return {"kind": self.kind}

    # -- exports (checkpoint/export.py, interop/) ------------------------------------------------
    def prompt_tokens(self, label: int = 0) -> Optional[list[int]]:
        """The GPT tokens that make one sample's condition, as a plain token prompt (a GPT-2 export's
        `generate` prompt); None when the condition is not a fixed token list (an image's codes, a
        cross-attention context)."""
        return [self.cond.sos_token]

    def null_prompt(self) -> Optional[list[int]]:
        """The token prompt of the null condition (classifier-free guidance's negative prompt)."""
        return None

    def summary(self) -> str:
        """What the model is conditioned on, in a few words (export READMEs)."""
        return "unconditional"

    def prompt_words(self) -> str:
        """What one sample's token prompt is, in words."""
        return f"the start token {self.cond.sos_token}"

    def prompt_record(self) -> dict:
        """How a token prompt is made for this model (an export's `taming_condition.json`)."""
        return {"prompt": [self.cond.sos_token]}

    def original_cond_stage(self, vq_params) -> tuple[str, dict]:
        """(cond_stage_key, cond_stage_config) of the original Net2NetTransformer's YAML;
        `vq_params(VQModelConfig)` gives an original VQModel's params."""
        return "image", {"target": "taming.modules.util.SOSProvider", "params": {"sos_token": self.cond.sos_token}}


class NoCondition(Conditioning):
    kind = "none"

    def expand_for_prefix(self) -> bool:
        return True


class ClassCondition(Conditioning):
    """The label as a token of the shared vocabulary (as in the original cin models); the null class
    for classifier-free guidance is one more token, index n_classes."""

    kind = "class"
    wants = "labels"

    @property
    def has_null(self) -> bool:
        return self.cond.class_dropout > 0

    def supports_null(self) -> bool:
        return True

    def check(self) -> None:
        cond, gpt = self.cond, self.cfg.gpt
        if cond.n_classes <= 0:
            raise ValueError("condition.kind=class needs condition.n_classes > 0")
        if not 0.0 <= cond.class_dropout < 1.0:
            raise ValueError(f"condition.class_dropout {cond.class_dropout} must lie in [0, 1)")
        need = cond.n_classes + (1 if cond.class_dropout > 0 else 0)
        if gpt.vocab_size < need:
            raise ValueError(
                f"gpt.vocab_size {gpt.vocab_size} cannot hold {cond.n_classes} class tokens"
                + (" plus the null class (index n_classes) used by class_dropout" if cond.class_dropout > 0 else "")
                + f"; set gpt.vocab_size >= {need}")

    def tokens(self, model, batch: dict) -> torch.Tensor:
        return batch["label"].reshape(-1, 1).long()

    def drop(self, c, inputs, drop):
        return torch.where(drop[:, None], torch.full_like(c, self.cond.n_classes), c), inputs

    def prefix(self, model, condition, batch_size):
        if condition is None:
            raise ValueError("a class-conditional model needs labels as the condition (int, list or tensor)")
        labels = torch.as_tensor(condition, dtype=torch.long, device=model.device).reshape(-1)
        if labels.numel() == 1 and batch_size:
            labels = labels.expand(batch_size)
        _rows(batch_size, labels.shape[0])
        n = self.cond.n_classes
        if (labels < 0).any() or (labels >= n).any():
            raise ValueError(f"labels {labels.tolist()} must lie in [0, n_classes {n})")
        null = torch.full_like(labels, n)[:, None] if self.has_null else None
        return labels[:, None], null, {}, ({} if null is not None else None)

    def from_user(self, model, given, class_names=None):
        labels = given["labels"]
        items = labels.reshape(-1).tolist() if isinstance(labels, torch.Tensor) else labels
        items = [items] if isinstance(items, (str, Integral)) else list(items)
        if not items:
            raise ValueError("labels is empty: pass one label per sample")
        n = self.cond.n_classes
        return torch.tensor([_label(x, class_names, n) for x in items], dtype=torch.long, device=model.device)

    def expects(self) -> str:
        return f"labels= (ints in [0, {self.cond.n_classes}) or class names, one per sample)"

    def from_batch(self, batch, count):
        return batch["label"][:count]

    def labels_at_scale(self, classes, start, count):
        classes = classes or list(range(self.cond.n_classes))
        return torch.tensor([classes[i % len(classes)] for i in range(start, start + count)], dtype=torch.long)

    def prompt_tokens(self, label=0):
        if not 0 <= label < self.cond.n_classes:
            raise ValueError(f"label {label} must lie in [0, n_classes {self.cond.n_classes})")
        return [label]

    def null_prompt(self):
        return [self.cond.n_classes] if self.has_null else None

    def summary(self):
        return f"conditioned on {self.cond.n_classes} classes"

    def prompt_words(self):
        return f"a class label in [0, {self.cond.n_classes}) (one token)"

    def prompt_record(self):
        return {"n_classes": self.cond.n_classes, "prompt": "[label]",
                **({"null_prompt": self.null_prompt()} if self.has_null else {})}

    def original_cond_stage(self, vq_params):
        return "class_label", {"target": "taming.modules.util.Labelator", "params": {"n_classes": self.cond.n_classes}}


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


class TokensCondition(Conditioning):
    """The codes of a second, frozen VQModel (depth, segmentation, a low-resolution image)."""

    kind = "tokens"
    wants = "image"
    takes_cond_ckpt = True

    def check(self) -> None:
        cond, gpt = self.cond, self.cfg.gpt
        if cond.cond_vqgan is None:
            raise ValueError("condition.kind=tokens needs condition.cond_vqgan (the conditioning VQModel)")
        super().check()
        if cond.cond_vqgan.quantizer.n_embed > gpt.vocab_size:
            raise ValueError(f"the conditioning VQModel's n_embed {cond.cond_vqgan.quantizer.n_embed} exceeds "
                             f"gpt.vocab_size {gpt.vocab_size} (condition and image tokens share the vocabulary)")

    def build(self, model) -> int:
        from taming_dist.models.vqgan import VQModel  # vqgan is heavier than this module needs elsewhere

        vq = self.cond.cond_vqgan
        model.cond_stage_model = frozen(VQModel(vq))
        side = vq.ddconfig.resolution // vq.downsample_factor
        return side * side

    def frozen_modules(self, model) -> list:
        return [model.cond_stage_model]

    def tokens(self, model, batch):
        x = batch["cond_image"]
        return model.cond_stage_model.encode_to_indices(x).reshape(x.shape[0], -1).long()

    def prefix(self, model, condition, batch_size):
        if condition is None:
            raise ValueError("a token-conditional model needs cond tokens (B, Lc) long or a cond image (B, C, H, W)")
        condition = condition.to(model.device)
        if condition.dim() == 4:
            condition = self.tokens(model, {"cond_image": condition})
        _rows(batch_size, condition.shape[0])
        return condition.long(), None, {}, None

    def from_user(self, model, given, class_names=None):
        image = torch.as_tensor(given["image"])
        image = image[None] if image.dim() == 3 else image
        if not image.is_floating_point():
            image = image.float() / 127.5 - 1  # uint8 pixels, scaled as taming's ImagePaths does
        d = self.cond.cond_vqgan.ddconfig
        if image.dim() != 4 or tuple(image.shape[1:]) != (d.in_channels, d.resolution, d.resolution):
            raise ValueError(f"the cond-stage VQModel takes images (B, {d.in_channels}, {d.resolution}, "
                             f"{d.resolution}), got shape {tuple(image.shape)}")
        return self.tokens(model, {"cond_image": image.to(model.device)})

    def expects(self) -> str:
        d = self.cond.cond_vqgan.ddconfig
        return f"image= (B, {d.in_channels}, {d.resolution}, {d.resolution}) in [-1, 1] for the cond-stage VQModel"

    def from_batch(self, batch, count):
        return batch["cond_image"][:count]

    def prompt_tokens(self, label=0):
        return None

    def summary(self):
        return "conditioned on the codes of a second VQModel"

    def prompt_words(self):
        return "the codes of the cond stage's VQModel"

    def prompt_record(self):
        return {"prompt": "codes of the cond stage (cond_vqgan/)",
                "cond_resolution": self.cond.cond_vqgan.ddconfig.resolution}

    def original_cond_stage(self, vq_params):
        return "image", {"target": "taming.models.vqgan.VQModel", "params": vq_params(self.cond.cond_vqgan)}


class ContextCondition(Conditioning):
    """A sequence (B, L, context_dim) read through cross-attention after an SOS token; its null
    condition is an all-zero context."""

    kind = "context"
    wants = "context"

    @property
    def has_null(self) -> bool:
        return self.cond.class_dropout > 0

    def supports_null(self) -> bool:
        return True

    def check(self) -> None:
        super().check()
        if not self.cfg.gpt.cross_attention:
            raise ValueError(f"condition.kind={self.kind} needs gpt.cross_attention=true (and gpt.context_dim)")

    def gpt_inputs(self, batch):
        return {"context": batch["context"]}

    def drop(self, c, inputs, drop):
        ctx = inputs["context"]
        return c, {**inputs, "context": torch.where(drop[:, None, None], torch.zeros_like(ctx), ctx)}

    def _context(self, model, condition, batch_size) -> dict:
        if not isinstance(condition, torch.Tensor) or condition.dim() != 3:
            raise ValueError("condition.kind=context needs a context tensor (B, L, context_dim)")
        _rows(batch_size, condition.shape[0])
        return {"context": condition.to(model.device)}

    def prefix(self, model, condition, batch_size):
        inputs = self._context(model, condition, batch_size)
        rows = inputs["context"].shape[0]
        sos = torch.full((rows, 1), self.cond.sos_token, dtype=torch.long, device=model.device)
        if not self.has_null:
            return sos, None, inputs, None
        return sos, sos, inputs, self.null_inputs(inputs)

    def null_inputs(self, inputs: dict) -> dict:
        """The GPT inputs of the null condition for the rows of `inputs`."""
        return {"context": torch.zeros_like(inputs["context"])}

    def from_user(self, model, given, class_names=None):
        context = torch.as_tensor(given["context"])
        context = context[None] if context.dim() == 2 else context
        width = self.cfg.gpt.context_dim
        if context.dim() != 3 or context.shape[-1] != width:
            raise ValueError(f"context must be (B, L, {width}) (gpt.context_dim {width}), got shape "
                             f"{tuple(context.shape)}")
        return context.to(model.device, model.transformer.tok_emb.weight.dtype)

    def expects(self) -> str:
        return f"context= (B, L, {self.cfg.gpt.context_dim})"

    def from_batch(self, batch, count):
        return batch["context"][:count]

    def example_inputs(self, batch_size):
        return {"context": torch.randn(batch_size, self.cond.context_len, self.cfg.gpt.context_dim)}

    def prompt_tokens(self, label=0):
        return None

    def summary(self):
        return f"conditioned through cross-attention on a context sequence ({self.kind})"

    def prompt_words(self):
        return "a context sequence read through cross-attention (no token prompt)"

    def prompt_record(self):
        raise ValueError(f"condition.kind={self.kind} has no token prompt: the GPT reads its condition through "
                         "cross-attention")

    def original_cond_stage(self, vq_params):
        raise ValueError(f"condition.kind={self.kind}: the original Net2NetTransformer has no cross-attention GPT, "
                         "so its layout cannot hold this model; export it in the taming_dist format "
                         "(`taming-dist export` without --format, Transformer.from_pretrained)")


class TextCondition(ContextCondition):
    """A caption's features from a frozen text encoder (precomputed next to the codes by
    `extract-codes --text-encoder`), padded to condition.context_len with their true lengths: the
    GPT attends to them with a key padding mask, through a learned projection when the encoder's
    width differs from n_embd, and learns a null context token for guidance dropout (LlamaGen's
    `uncond_embedding`, here one token with the rest masked)."""

    kind = "text"
    wants = "prompts"

    def check(self) -> None:
        super().check()
        if self.cond.context_len <= 0:
            raise ValueError("condition.kind=text needs condition.context_len > 0 (the most text tokens per "
                             "caption, e.g. 120 as LlamaGen's T5 features)")

    def check_features(self, text, where):
        fix = (f"extract them with `taming-dist extract-codes RUN DATA OUT --text-encoder DIR "
               f"--max-text-tokens {self.cond.context_len}` and train on OUT")
        if text is None:
            raise ValueError(f"condition.kind=text needs text features, and the codes folder {where} has none "
                             f"(its manifest.json records no `text`): {fix}")
        width, gpt = text.get("width"), self.cfg.gpt
        if width != gpt.context_dim:
            raise ValueError(f"the text features of {where} are {width} wide ({text.get('encoder')}), the model's "
                             f"gpt.context_dim is {gpt.context_dim}: set transformer.gpt.context_dim={width}, or "
                             f"extract the features with the encoder the model is configured for")
        if text.get("max_length", 0) > self.cond.context_len:
            raise ValueError(f"the text features of {where} hold up to {text['max_length']} tokens per caption, "
                             f"condition.context_len is {self.cond.context_len}: set "
                             f"transformer.condition.context_len={text['max_length']} (sampling encodes prompts "
                             f"to that length), or re-extract with --max-text-tokens {self.cond.context_len}")
        recorded = os.path.basename(os.path.normpath(self.cond.text_encoder)) if self.cond.text_encoder else ""
        if recorded and text.get("encoder") and recorded != text["encoder"]:
            raise ValueError(f"the text features of {where} come from encoder {text['encoder']!r}, the model's "
                             f"condition.text_encoder is {self.cond.text_encoder!r}: prompts at sampling time go "
                             f"through that encoder, so both must be the same. Set "
                             f"transformer.condition.text_encoder to the folder the features came from, or "
                             f"re-extract them with {self.cond.text_encoder}")

    def gpt_config(self) -> GPTConfig:
        gpt = self.cfg.gpt
        # The null token only where dropout trains it (a parameter no step reaches would also stall
        # DDP's gradient reduction).
        return replace(gpt, context_proj=gpt.context_dim != gpt.n_embd, null_context=self.has_null)

    def gpt_inputs(self, batch):
        if "context" not in batch:
            raise ValueError("condition.kind=text needs text features in the batch: extract them next to the codes "
                             "with `taming-dist extract-codes RUN DATA OUT --text-encoder DIR` and train on OUT "
                             "(data.kind=codes)")
        ctx, lengths = batch["context"], batch["context_len"]
        if ctx.shape[-1] != self.cfg.gpt.context_dim:
            raise ValueError(f"the text features are {ctx.shape[-1]} wide, the model's gpt.context_dim is "
                             f"{self.cfg.gpt.context_dim}: set gpt.context_dim={ctx.shape[-1]} or extract the "
                             "features with the encoder the model was configured for")
        return {"context": ctx, "context_len": lengths}

    def drop(self, c, inputs, drop):
        return c, {**inputs, "context_drop": drop}

    def null_inputs(self, inputs):
        rows = inputs["context"].shape[0]
        return {**inputs, "context_drop": torch.ones(rows, dtype=torch.bool, device=inputs["context"].device)}

    def _context(self, model, condition, batch_size):
        if not isinstance(condition, TextContext):
            raise ValueError("condition.kind=text samples from prompts: pass get_condition(transformer, "
                             "['a red circle on a blue background'], text_encoder=DIR)")
        _rows(batch_size, len(condition))
        condition = condition.to(model.device, model.transformer.tok_emb.weight.dtype)
        return {"context": condition.features, "context_len": condition.lengths}

    def from_user(self, model, given, class_names=None):
        prompts = given["prompts"]
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass one prompt per sample")
        encoder = given.get("text_encoder")
        if encoder is None:
            raise ValueError("condition.kind=text needs text_encoder= (the encoder folder the features were "
                             f"extracted with{': ' + self.cond.text_encoder if self.cond.text_encoder else ''})")
        from taming_dist.text.encoder import TextEncoder  # transformers is an extra: only text models need it

        if not isinstance(encoder, TextEncoder):
            encoder = TextEncoder.load(encoder, device=model.device)
        if encoder.width != self.cfg.gpt.context_dim:
            raise ValueError(f"text encoder {encoder.name} is {encoder.width} wide, the model's gpt.context_dim is "
                             f"{self.cfg.gpt.context_dim}: use the encoder the model was trained on"
                             + (f" ({self.cond.text_encoder})" if self.cond.text_encoder else ""))
        features, lengths, _ = encoder.encode(prompts, self.cond.context_len)
        return TextContext(features, lengths, prompts).to(model.device, model.transformer.tok_emb.weight.dtype)

    def expects(self) -> str:
        return "prompts (a list of captions) and text_encoder=DIR (the encoder the features came from)"

    def from_batch(self, batch, count):
        return TextContext(batch["context"][:count], batch["context_len"][:count])

    def example_inputs(self, batch_size):
        L = self.cond.context_len
        return {"context": torch.randn(batch_size, L, self.cfg.gpt.context_dim),
                "context_len": torch.full((batch_size,), L, dtype=torch.long)}

    def record(self) -> dict:
        return {"kind": self.kind, "text_encoder": self.cond.text_encoder, "context_len": self.cond.context_len,
                "context_dim": self.cfg.gpt.context_dim}


KINDS = {c.kind: c for c in (NoCondition, ClassCondition, TokensCondition, ContextCondition, TextCondition)}


def make_condition(cfg: TransformerModelConfig) -> Conditioning:
    """The condition object of a transformer config: the one place that reads condition.kind."""
    if cfg.condition.kind not in KINDS:
        raise ValueError(f"condition.kind {cfg.condition.kind!r} is not one of {', '.join(KINDS)}")
    condition = KINDS[cfg.condition.kind](cfg)
    condition.check()
    if cfg.condition.cond_ckpt and not condition.takes_cond_ckpt:
        raise ValueError(f"condition.cond_ckpt is for condition.kind=tokens (the conditioning VQModel's weights), "
                         f"this model's kind is {cfg.condition.kind!r}; remove it")
    return condition
