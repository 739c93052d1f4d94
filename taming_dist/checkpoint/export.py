"""Training run or checkpoint -> inference folders (ours) or the original taming layout.

Ours: `config.json` (the model's config only) + `model.safetensors`; a transformer export is a
pipeline folder with `vqgan/` (its first stage) and `transformer/` (the whole conditional model).
`format="taming"`: `model.ckpt` holding `{"state_dict": ...}` with the original key names (the GPT's
causal `attn.mask` buffers put back) and the original-style `model.yaml` beside it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from taming_dist.checkpoint.convert import consolidate, resolve_checkpoint
from taming_dist.config import RunConfig, load_config


def _run_config(ckpt: Path) -> RunConfig:
    for cand in (ckpt.parent.parent / "config.yaml", ckpt / "config.yaml"):
        if cand.exists():
            return load_config(str(cand))
    raise FileNotFoundError(f"no config.yaml found for {ckpt}: expected it in the run folder {ckpt.parent.parent}")


def export_run(src: str | Path, out: str | Path, *, ema: bool = True, dtype: torch.dtype | None = None,
               fmt: str = "taming_dist") -> list[Path]:
    """Export the latest (or the given) checkpoint of a run. Returns the folders written."""
    from taming_dist.weights.folder import save_model_folder
    from taming_dist.weights.folder import read_weights

    ckpt = resolve_checkpoint(src)
    cfg = _run_config(ckpt)
    if fmt == "taming":
        refuse_original_layout(cfg, "export --format taming")
    units = consolidate(ckpt, ema=ema, dtype=dtype)
    out = Path(out)
    if cfg.stage == "vqgan":
        from taming_dist.models.quantize import fold_code_offset

        sd = fold_code_offset(units["generator"])  # the original code reads embedding.weight only
        if fmt == "taming":
            disc = {f"loss.{k}": v for k, v in units["discriminator"].items()}
            return [write_taming(out, "vqgan", cfg, {**sd, **disc})]
        save_model_folder(out, "vqgan", cfg.vqgan, sd, dtype=dtype)
        return [out]
    sd = {f"transformer.{k}": v for k, v in units["transformer"].items()}
    if cfg.first_stage_ckpt:
        sd.update({f"first_stage_model.{k}": v for k, v in read_weights(cfg.first_stage_ckpt).items()})
    if cfg.transformer.condition.kind == "tokens" and cfg.transformer.condition.cond_ckpt:
        sd.update({f"cond_stage_model.{k}": v for k, v in read_weights(cfg.transformer.condition.cond_ckpt).items()})
    if fmt == "taming":
        return [write_taming(out, "transformer", cfg, sd)]
    first = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_model_folder(out / "vqgan", "vqgan", cfg.transformer.first_stage, first, dtype=dtype)
    save_model_folder(out / "transformer", "transformer", cfg.transformer, sd, dtype=dtype)
    return [out / "vqgan", out / "transformer"]


# quantizer kinds that the original taming-transformers code has no class for
NOT_IN_ORIGINAL = {"fsq": "finite scalar quantization (FSQ)", "lfq": "lookup-free quantization (LFQ)"}


def refuse_original_layout(cfg, what: str) -> None:
    """A ValueError when a VQModel of `cfg` (a RunConfig, VQModelConfig or TransformerModelConfig) uses
    a quantizer the original has no such class for: its layout cannot hold that model."""
    if hasattr(cfg, "stage"):
        stages = {"vqgan": cfg.vqgan} if cfg.stage == "vqgan" else {"transformer.first_stage": cfg.transformer.first_stage}
        cond = cfg.transformer.condition.cond_vqgan if cfg.stage != "vqgan" else None
    elif hasattr(cfg, "first_stage"):
        stages, cond = {"first_stage": cfg.first_stage}, cfg.condition.cond_vqgan
    else:
        stages, cond = {"vqgan": cfg}, None
    if cond is not None:
        stages["condition.cond_vqgan"] = cond
    for where, vq in stages.items():
        kind = vq.quantizer.kind
        if kind in NOT_IN_ORIGINAL:
            raise ValueError(f"{what}: {where}.quantizer.kind={kind} is {NOT_IN_ORIGINAL[kind]}, and the original "
                             "taming-transformers has no such quantizer (only VectorQuantizer2 and GumbelQuantize); "
                             "use the taming_dist format (export without --format taming, from_pretrained)")


def _original_vq_params(vq, loss=None) -> dict:
    q = vq.quantizer
    params = {"embed_dim": q.embed_dim, "n_embed": q.n_embed, "ddconfig": dataclasses.asdict(vq.ddconfig)}
    if q.kind == "gumbel":
        params.update({"kl_weight": q.kl_weight, "temperature_scheduler_config": None})
    if loss is not None:
        params["lossconfig"] = {
            "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {"disc_conditional": False, "disc_in_channels": loss.discriminator.input_nc,
                       "disc_ndf": loss.discriminator.ndf, "disc_start": loss.disc_start,
                       "disc_weight": loss.disc_weight, "disc_factor": loss.disc_factor,
                       "codebook_weight": loss.codebook_weight, "pixelloss_weight": loss.pixel_weight,
                       "perceptual_weight": loss.perceptual_weight, "disc_num_layers": loss.discriminator.n_layers,
                       "use_actnorm": loss.discriminator.norm == "actnorm", "disc_loss": loss.disc_loss},
        }
    else:
        params["lossconfig"] = {"target": "taming.modules.losses.DummyLoss"}
    return params


def original_yaml(kind: str, cfg: RunConfig) -> dict:
    if kind == "vqgan":
        target = "taming.models.vqgan.GumbelVQ" if cfg.vqgan.quantizer.kind == "gumbel" else "taming.models.vqgan.VQModel"
        return {"model": {"base_learning_rate": cfg.train.optim.lr, "target": target,
                          "params": _original_vq_params(cfg.vqgan, cfg.loss)}}
    t = cfg.transformer
    cond = {"none": {"target": "taming.modules.util.SOSProvider", "params": {"sos_token": t.condition.sos_token}},
            "class": {"target": "taming.modules.util.Labelator", "params": {"n_classes": t.condition.n_classes}},
            "tokens": {"target": "taming.models.vqgan.VQModel",
                       "params": _original_vq_params(t.condition.cond_vqgan) if t.condition.cond_vqgan else {}},
            "context": {"target": "taming_dist.context", "params": {"context_len": t.condition.context_len}}}
    g = t.gpt
    return {"model": {"base_learning_rate": cfg.train.optim.lr, "target": "taming.models.cond_transformer.Net2NetTransformer",
                      "params": {"pkeep": t.pkeep, "cond_stage_key": "class_label" if t.condition.kind == "class" else "image",
                                 "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {
                                     "vocab_size": g.vocab_size, "block_size": g.block_size, "n_layer": g.n_layer,
                                     "n_head": g.n_head, "n_embd": g.n_embd, "embd_pdrop": g.embd_pdrop,
                                     "resid_pdrop": g.resid_pdrop, "attn_pdrop": g.attn_pdrop,
                                     "n_unmasked": g.n_unmasked}},
                                 "first_stage_config": {"target": "taming.models.vqgan.VQModel",
                                                        "params": _original_vq_params(t.first_stage)},
                                 "cond_stage_config": cond[t.condition.kind]}}}


def write_taming(out: Path, kind: str, cfg: RunConfig, sd: dict) -> Path:
    """The original Lightning layout: `model.ckpt` ({"state_dict": ...}) and `model.yaml`."""
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if kind == "transformer":
        block = cfg.transformer.gpt.block_size
        mask = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
        for i in range(cfg.transformer.gpt.n_layer):
            sd[f"transformer.blocks.{i}.attn.mask"] = mask.clone()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.ckpt.tmp"
    torch.save({"state_dict": sd, "global_step": 0}, tmp)
    tmp.replace(out / "model.ckpt")
    (out / "model.yaml").write_text(yaml.safe_dump(original_yaml(kind, cfg), sort_keys=False))
    return out
