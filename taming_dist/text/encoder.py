"""A frozen text encoder from a local folder: T5EncoderModel, CLIPTextModel, or any model whose
output has `last_hidden_state`, with the tokenizer saved in the same folder (`save_pretrained`).

Nothing is downloaded (`local_files_only`): a missing folder or file is an error that says what
the folder must hold.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

EXPECTED_FILES = ("config.json, the weights (model.safetensors or pytorch_model.bin) and the tokenizer: "
                  "tokenizer.json (with tokenizer_config.json), or spiece.model for T5, or vocab.json + "
                  "merges.txt for CLIP; `save_pretrained(DIR)` of the model and of its tokenizer writes them")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_folder(folder: str) -> None:
    """Raise a ValueError naming what is missing unless `folder` holds a model and its tokenizer."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"text encoder folder {folder} does not exist; nothing is downloaded: it must hold "
                                f"{EXPECTED_FILES}")
    names = set(os.listdir(folder))
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not names & set(_WEIGHT_FILES):
        missing.append("the weights (model.safetensors or pytorch_model.bin)")
    if not names & set(_TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json, spiece.model or vocab.json + merges.txt)")
    if missing:
        raise ValueError(f"text encoder folder {folder} has no {', no '.join(missing)}; it must hold {EXPECTED_FILES}")


def _model_class(model_type: str):
    import transformers

    # The encoder half of an encoder-decoder (T5's decoder is not needed for features), the text
    # tower of a CLIP; anything else through AutoModel.
    if model_type in ("t5", "mt5", "umt5"):
        return transformers.T5EncoderModel if model_type == "t5" else transformers.AutoModel
    if model_type in ("clip", "clip_text_model"):
        return transformers.CLIPTextModel
    return transformers.AutoModel


class TextEncoder:
    """captions -> features (B, L, width) padded to L, true lengths (B,), and how many were cut."""

    def __init__(self, model, tokenizer, name: str, device="cpu"):
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, torch.device(device)
        cfg = model.config
        self.width = int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @classmethod
    def load(cls, folder: str, device="cpu", dtype: Optional[torch.dtype] = None) -> "TextEncoder":
        """The encoder and tokenizer of a local folder, frozen, in eval mode, on `device` in `dtype`
        (default: bf16 on a GPU, fp32 on the CPU)."""
        import transformers

        folder = str(folder)
        check_folder(folder)
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model = _model_class(config.model_type).from_pretrained(folder, local_files_only=True, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model.eval().requires_grad_(False).to(device)
        return cls(model, tokenizer, os.path.basename(os.path.abspath(folder)), device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Encode captions into at most `max_length` vectors each -> (features (B, max_length, width)
        with zeros past each length, lengths (B,) long >= 1, the number of captions truncated)."""
        if max_length < 1:
            raise ValueError(f"max_length {max_length} must be >= 1")
        texts = [str(t) for t in texts]
        full = self.tokenizer(texts, padding=False, truncation=False)["input_ids"]
        truncated = sum(len(ids) > max_length for ids in full)
        # Padded to the batch's longest caption, not to max_length: the keys past a caption's length
        # are masked, so its vectors do not depend on the padding, and short captions (most of them)
        # cost their own length (7x faster for 16 of 120 tokens); zeros fill up to max_length after.
        tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, l, width)
        lengths = mask.sum(1).clamp(min=1)
        out = out * mask[..., None].to(out.dtype)  # padding stored as zeros (it is masked anyway)
        out = torch.nn.functional.pad(out, (0, 0, 0, max_length - out.shape[1]))  # (B, max_length, width)
        return out, lengths.long(), truncated

    def record(self, max_length: int, dtype: str) -> dict:
        """What a features manifest records about this encoder."""
        return {"encoder": self.name, "width": self.width, "dtype": dtype, "max_length": max_length,
                "model_type": self.model.config.model_type}
