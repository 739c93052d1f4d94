"""Tiny text encoders built from a config, with a word-level tokenizer trained on given captions
by the `tokenizers` library and saved with `save_pretrained`: a folder that `TextEncoder.load`
reads exactly as a downloaded model. For tests and the demo (random weights still tell the words
of a caption apart; nothing is downloaded)."""
from __future__ import annotations

import os
from typing import Iterable

import torch

SPECIALS = {"t5": ["<pad>", "</s>", "<unk>"], "clip": ["<|endoftext|>", "<|startoftext|>", "<unk>"]}


def _tokenizer(captions: Iterable[str], kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[kind]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(captions), trainers.WordLevelTrainer(special_tokens=specials))
    ids = {s: tok.token_to_id(s) for s in specials}
    if kind == "t5":  # "... </s>", as T5's tokenizer ends every text
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", ids["<|startoftext|>"]), ("<|endoftext|>", ids["<|endoftext|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<unk>")


def build_tiny_encoder(out: str, captions: Iterable[str], kind: str = "t5", width: int = 32, layers: int = 2,
                       heads: int = 2, seed: int = 0, with_vision: bool = False, neighbour_bias: float = 6.0) -> str:
    """Write a tiny T5 encoder (kind t5) or CLIP text model (kind clip; `with_vision` writes a whole
    CLIPModel, for CLIP scores) with its tokenizer into `out`; returns `out`.

    A T5's only sense of order is its relative attention bias, which random weights leave near 0
    (std 0.09): every word then attends about evenly to all the others, and a word's feature is the
    same wherever it stands. In "a cyan circle on a purple background" the two colours cannot then be
    told apart as the shape's and the background's, and a model trained on such features draws a
    purple circle on cyan as often as the prompt (issue 25: 34% of object samples had the colours in
    their roles). `neighbour_bias` adds this much to the logit of attending to the next word (head 0)
    and to the previous word (head 1), as a trained encoder's context would, so a colour's feature
    carries the word after it (the shape's name or "background"). 0 leaves the random bias."""
    import transformers

    if kind not in SPECIALS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(SPECIALS)}")
    tokenizer = _tokenizer(captions, kind)
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if kind == "t5":
        cfg = transformers.T5Config(vocab_size=vocab, d_model=width, d_kv=width // heads, d_ff=2 * width,
                                    num_layers=layers, num_heads=heads, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
        model = transformers.T5EncoderModel(cfg)
        if neighbour_bias:
            _bias_neighbours(model, cfg, neighbour_bias)
    else:
        text = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                    num_attention_heads=heads, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        if with_vision:
            vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, image_size=32, patch_size=8)
            model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                   projection_dim=width))
        else:
            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _bias_neighbours(model, cfg, bias: float) -> None:
    """Head 0 of every layer (T5 shares layer 0's relative bias with the rest) prefers the next word,
    head 1 (with 2 or more heads) the previous one."""
    from transformers.models.t5.modeling_t5 import T5Attention

    buckets = T5Attention._relative_position_bucket(torch.tensor([1, -1]), bidirectional=True,
                                                    num_buckets=cfg.relative_attention_num_buckets,
                                                    max_distance=cfg.relative_attention_max_distance)
    table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    with torch.no_grad():
        for head, bucket in enumerate(buckets.tolist()[:cfg.num_heads]):
            table[bucket, head] += bias
