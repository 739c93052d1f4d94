"""Our Transformer's GPT -> transformers' `GPT2LMHeadModel`, and a pipeline folder that diffusers and
transformers alone turn into images.

minGPT as Net2NetTransformer uses it is GPT-2's architecture with other names: learned positions
(`pos_emb` (1, T, C) -> `wpe` (T, C)), pre-LayerNorm blocks with eps 1e-5, exact GELU
(`activation_function="gelu"`, not GPT-2's tanh approximation `gelu_new`), attention scaled by
head_dim^-0.5, and a head without bias that is not tied to the token embedding. GPT-2 keeps its
projections in `Conv1D` layers whose weight is (in, out), the transpose of a Linear's, and q, k, v
in one `c_attn`.

The condition is the prompt. Our GPT reads `cat(cond_tokens, image_tokens)` in one vocabulary: the
SOS token (kind none), the class label itself (kind class; the null class for guidance is token
n_classes) or the cond stage's codes (kind tokens), followed by the image codes. So a GPT-2 prompt
of those tokens, greedy or sampled `generate` with `max_new_tokens` = the image's token count, gives
the image codes in raster order. Tokens past the first stage's codebook (labels in a larger
vocabulary) are never sampled by us (`vocab_limit`): the generation config lists them as
`suppress_tokens`, which transformers applies as -inf after guidance, as we do.

Guidance: transformers' `guidance_scale` with `negative_prompt_ids` (the null class) runs its
`UnbatchedClassifierFreeGuidanceLogitsProcessor`, which mixes log-softmaxed scores,
`lsm(u) + s (lsm(c) - lsm(u))`, where we mix raw logits, `u + s (c - u)`: the two differ by one
constant per row, so their softmax (the sampled distribution) and argmax are the same.

Refused: cross-attention (kinds context and text: their context projection, key padding mask and
learned null context have no GPT-2 counterpart) and `n_unmasked` > 1 (a bidirectional prefix GPT-2's causal mask cannot express).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from taming_dist.config import TransformerModelConfig


def refuse(cfg: TransformerModelConfig, what: str = "export --format transformers") -> None:
    from taming_dist.models.conditions import make_condition

    g = make_condition(cfg).gpt_config()
    if g.cross_attention:
        raise ValueError(f"{what}: condition.kind={cfg.condition.kind} conditions through cross-attention on a "
                         "context sequence (gpt.cross_attention=true); the GPT-2 export holds self-attention GPTs "
                         "(condition kinds none, class, tokens), and text conditioning's context projection and "
                         "learned null context have no GPT-2 counterpart. Export it in the taming_dist format "
                         "(Transformer.from_pretrained) instead")
    if g.n_unmasked > 1:
        raise ValueError(f"{what}: gpt.n_unmasked={g.n_unmasked} lets the first {g.n_unmasked} positions attend "
                         "to each other both ways; GPT-2's attention is causal only")


def gpt2_config(cfg: TransformerModelConfig) -> dict:
    """The `transformers.GPT2Config(**config)` arguments of our GPT."""
    refuse(cfg)
    g = cfg.gpt
    return {"vocab_size": g.vocab_size, "n_positions": g.block_size, "n_embd": g.n_embd, "n_layer": g.n_layer,
            "n_head": g.n_head, "n_inner": 4 * g.n_embd, "activation_function": "gelu",
            "resid_pdrop": g.resid_pdrop, "embd_pdrop": g.embd_pdrop, "attn_pdrop": g.attn_pdrop,
            "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": False,
            # no text tokens: the stream ends when max_new_tokens image codes are out
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def to_gpt2(cfg: TransformerModelConfig, state_dict: dict) -> tuple[dict, dict]:
    """(GPT2Config arguments, GPT2LMHeadModel state dict) from our Transformer's state dict (its
    `transformer.*` keys) or a bare GPT's."""
    config = gpt2_config(cfg)
    pre = "transformer." if any(k.startswith("transformer.") for k in state_dict) else ""
    g = {k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre) and not k.endswith(".attn.mask")}
    out = {"transformer.wte.weight": g["tok_emb.weight"], "transformer.wpe.weight": g["pos_emb"][0],
           "transformer.ln_f.weight": g["ln_f.weight"], "transformer.ln_f.bias": g["ln_f.bias"],
           "lm_head.weight": g["head.weight"]}
    for i in range(cfg.gpt.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"{h}{theirs}.weight"], out[f"{h}{theirs}.bias"] = g[f"{b}{ours}.weight"], g[f"{b}{ours}.bias"]
        # Conv1D weights are (in, out): the transpose of our Linear (out, in) weights
        qkv = [g[f"{b}attn.{n}.weight"] for n in ("query", "key", "value")]
        out[f"{h}attn.c_attn.weight"] = torch.cat(qkv, 0).t()
        out[f"{h}attn.c_attn.bias"] = torch.cat([g[f"{b}attn.{n}.bias"] for n in ("query", "key", "value")])
        out[f"{h}attn.c_proj.weight"], out[f"{h}attn.c_proj.bias"] = g[f"{b}attn.proj.weight"].t(), g[f"{b}attn.proj.bias"]
        out[f"{h}mlp.c_fc.weight"], out[f"{h}mlp.c_fc.bias"] = g[f"{b}mlp.0.weight"].t(), g[f"{b}mlp.0.bias"]
        out[f"{h}mlp.c_proj.weight"], out[f"{h}mlp.c_proj.bias"] = g[f"{b}mlp.2.weight"].t(), g[f"{b}mlp.2.bias"]
    return config, {k: v.contiguous() for k, v in out.items()}


def condition_info(cfg: TransformerModelConfig) -> dict:
    """How a prompt is made for this model: written to `taming_condition.json` beside the weights."""
    from taming_dist.models.conditions import make_condition

    side = cfg.first_stage.ddconfig.resolution // cfg.first_stage.downsample_factor
    return {"kind": cfg.condition.kind, "image_tokens": side * side, "latent_shape": [side, side],
            "codebook_size": cfg.first_stage.quantizer.n_embed, **make_condition(cfg).prompt_record()}


def save_transformers(folder, cfg: TransformerModelConfig, state_dict: dict, dtype: torch.dtype | None = None) -> None:
    """A GPT2LMHeadModel folder written by transformers' own `save_pretrained` after a strict load,
    with a generation config (image-token count, suppressed non-code tokens) and `taming_condition.json`."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    config, sd = to_gpt2(cfg, state_dict)
    with torch.device("meta"):  # no random init of weights that are replaced at once
        model = GPT2LMHeadModel(GPT2Config(**config))
    model.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    info = condition_info(cfg)
    vocab, codes = cfg.gpt.vocab_size, cfg.first_stage.quantizer.n_embed
    model.generation_config = GenerationConfig(
        max_new_tokens=info["image_tokens"], do_sample=False,
        suppress_tokens=list(range(codes, vocab)) or None, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "taming_condition.json").write_text(json.dumps(info, indent=2))


README = """# A taming-transformers image model for diffusers + transformers

Exported by `taming-dist export --format hf-pipeline`. `vqgan/` is a diffusers `VQModel` (the image
tokenizer: {res}x{res} px <-> a {side}x{side} grid of codes from {codes}), `transformer/` a transformers
`GPT2LMHeadModel` over those codes{cond_text}. The GPT's prompt is {prompt_text}; it generates the
{n} codes in raster order, which the VQModel decodes. Greedy decoding, as below, is deterministic;
for samples use `do_sample=True, top_k=100` (the original's default){cfg_text}. Run it in this folder.

```python
import torch
from diffusers import VQModel
from transformers import GPT2LMHeadModel

folder = "{folder}"
vqgan = VQModel.from_pretrained(f"{{folder}}/vqgan").eval()
gpt = GPT2LMHeadModel.from_pretrained(f"{{folder}}/transformer").eval()
prompt = torch.tensor([[{prompt_ids}]])  # {prompt_comment}
with torch.no_grad():
    out = gpt.generate(prompt, max_new_tokens={n}, do_sample=False{gen_extra})
    codes = out[:, prompt.shape[1]:]  # (1, {n}) image codes
    latents = vqgan.quantize.get_codebook_entry(codes.flatten(), (1, {side}, {side}, {dim}))
    image = vqgan.decode(latents, force_not_quantize=True).sample.clamp(-1, 1)  # (1, 3, {res}, {res})
torch.save(image, "image.pt")
```
"""


def pipeline_readme(cfg: TransformerModelConfig, folder: str = ".", label: int = 0,
                    guidance: float | None = None) -> str:
    """The README.md of a pipeline folder: a code block that makes one image with diffusers and
    transformers alone (greedy, so the result is ours exactly)."""
    from taming_dist.models.conditions import make_condition

    info, condition = condition_info(cfg), make_condition(cfg)
    side, n = info["latent_shape"][0], info["image_tokens"]
    res = cfg.first_stage.ddconfig.resolution
    tokens = condition.prompt_tokens(label)
    if tokens is None:
        raise ValueError(f"the pipeline README shows models whose prompt is a fixed list of tokens; this one is "
                         f"{condition.summary()} (condition.kind={cfg.condition.kind}): its prompt is "
                         f"{condition.prompt_words()}")
    prompt_ids = ", ".join(map(str, tokens))
    comment = prompt_text = condition.prompt_words()
    cond_text = f" ({condition.summary()})"
    gen_extra, cfg_text = "", ""
    null = condition.null_prompt()
    if null is not None:
        cfg_text = (f"; classifier-free guidance is transformers' own `guidance_scale` with the null condition "
                    f"{null} as `negative_prompt_ids`")
        if guidance is not None:
            gen_extra = f", guidance_scale={guidance}, negative_prompt_ids=torch.tensor([{null}])"
    return README.format(res=res, side=side, codes=f"{cfg.first_stage.quantizer.n_embed} codes",
                         cond_text=cond_text, prompt_text=prompt_text, n=n, cfg_text=cfg_text, folder=folder,
                         prompt_ids=prompt_ids, prompt_comment=comment, gen_extra=gen_extra,
                         dim=cfg.first_stage.quantizer.embed_dim)


def save_pipeline(folder, cfg: TransformerModelConfig, state_dict: dict, dtype: torch.dtype | None = None) -> list[str]:
    """`vqgan/` (diffusers), `transformer/` (transformers) and README.md; a tokens-conditioned model's
    cond stage goes to `cond_vqgan/` (diffusers). Returns the sub-folders written."""
    from taming_dist.interop.diffusers import refuse as refuse_diffusers
    from taming_dist.interop.diffusers import save_diffusers
    from taming_dist.models.conditions import make_condition

    refuse(cfg, "export --format hf-pipeline")
    refuse_diffusers(cfg.first_stage, "export --format hf-pipeline (first stage)")
    folder = Path(folder)
    folder.mkdir(parents=True)
    first = {k.split(".", 1)[1]: v for k, v in state_dict.items() if k.startswith("first_stage_model.")}
    save_diffusers(folder / "vqgan", cfg.first_stage, first, dtype)
    save_transformers(folder / "transformer", cfg, state_dict, dtype)
    names = ["vqgan", "transformer"]
    if cfg.condition.cond_vqgan is not None:  # a tokens-conditioned model: its cond stage too
        cond = {k.split(".", 1)[1]: v for k, v in state_dict.items() if k.startswith("cond_stage_model.")}
        save_diffusers(folder / "cond_vqgan", cfg.condition.cond_vqgan, cond, dtype)
        names.append("cond_vqgan")
        readme = ("# Token-conditioned taming-transformers model\n\nEncode the condition image with "
                  "`cond_vqgan/` (diffusers VQModel: `quantize(encode(x).latents)[2][2]`), use its codes as the "
                  "prompt of `transformer/` (GPT2LMHeadModel.generate), and decode the generated codes with "
                  "`vqgan/`. See taming_condition.json.\n")
    else:
        # guided when the model learned a null class: guidance through transformers' own processor
        readme = pipeline_readme(cfg, guidance=3.0 if make_condition(cfg).null_prompt() is not None else None)
    (folder / "README.md").write_text(readme)
    return names
