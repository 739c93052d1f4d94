"""Training run or model folder -> inference folders: ours, the original taming layout, diffusers,
transformers, a diffusers + transformers pipeline, or ONNX graphs of the tokenizer.

Ours: `config.json` (the model's config only) + `model.safetensors`; a transformer export is a
pipeline folder with `vqgan/` (its first stage) and `transformer/` (the whole conditional model).
`format="taming"`: `model.ckpt` holding `{"state_dict": ...}` with the original key names (the GPT's
causal `attn.mask` buffers put back, training-only quantizer state folded and dropped) and the
original-style `model.yaml` beside it. The other formats are written by `taming_dist.interop`.

Every export is written into a hidden temporary folder beside OUT and renamed into place when
complete (principle 6), so a failed export leaves no half folder and a previous OUT stays whole.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import yaml

from taming_dist.atomic import atomic_path
from taming_dist.checkpoint.convert import consolidate, resolve_checkpoint
from taming_dist.config import RunConfig, load_config
from taming_dist.models.quantize import inference_state

FORMATS = ("taming_dist", "taming", "diffusers", "transformers", "hf-pipeline", "onnx")

def _run_config(ckpt: Path) -> RunConfig:
    for cand in (ckpt.parent.parent / "config.yaml", ckpt / "config.yaml"):
        if cand.exists():
            return load_config(str(cand))
    raise FileNotFoundError(f"no config.yaml found for {ckpt}: expected it in the run folder {ckpt.parent.parent}")


@contextlib.contextmanager
def staged(out: Path):
    """Yield a temporary path beside `out` (not yet created) to write the export into; on success
    rename it to `out` (a previous `out` is moved aside first and removed last), on any error remove it."""
    with atomic_path(out) as tmp:  # synced before the rename, like every file taming_dist publishes
        yield tmp


def _from_run(src, ema: bool, dtype) -> tuple[RunConfig, dict, dict]:
    """-> (run config, model state dict, discriminator state dict) of a run's checkpoint."""
    from taming_dist.weights.folder import read_weights

    ckpt = resolve_checkpoint(src)
    cfg = _run_config(ckpt)
    units = consolidate(ckpt, ema=ema, dtype=dtype)
    if cfg.stage == "vqgan":
        from taming_dist.models.quantize import fold_code_offset

        return cfg, fold_code_offset(units["generator"]), units.get("discriminator", {})
    sd = {f"transformer.{k}": v for k, v in units["transformer"].items()}
    if cfg.first_stage_ckpt:
        sd.update({f"first_stage_model.{k}": v for k, v in read_weights(cfg.first_stage_ckpt).items()})
    if cfg.transformer.condition.cond_ckpt:  # only a kind whose condition builds a module takes one
        sd.update({f"cond_stage_model.{k}": v for k, v in read_weights(cfg.transformer.condition.cond_ckpt).items()})
    return cfg, sd, {}


def _from_model_folder(folder: Path) -> tuple[RunConfig, dict, dict]:
    from taming_dist.weights.folder import load_model_folder

    model_type, mcfg, sd = load_model_folder(folder)
    cfg = RunConfig(stage=model_type, **({"vqgan": mcfg} if model_type == "vqgan" else {"transformer": mcfg}))
    return cfg, sd, {}


def _is_model_folder(src) -> bool:
    p = Path(src)
    return (p / "config.json").exists() and (p / "model.safetensors").exists()


def export_run(src: str | Path, out: str | Path, *, ema: bool = True, dtype: torch.dtype | None = None,
               fmt: str = "taming_dist") -> list[Path]:
    """Export a run (its latest or the given checkpoint) or a model folder. Returns the folders written."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    if _is_model_folder(src):
        cfg, sd, disc = _from_model_folder(Path(src))
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    else:
        cfg, sd, disc = _from_run(src, ema, dtype)
    if fmt == "taming":
        refuse_original_layout(cfg, "export --format taming")
    out = Path(out)
    vq_cfg, vq_sd = _tokenizer(cfg, sd)
    if fmt in ("transformers", "hf-pipeline") and cfg.stage != "transformer":
        raise ValueError(f"export --format {fmt} writes a transformer's GPT; {src} holds a VQGAN (export it with "
                         "--format diffusers or onnx)")
    with staged(out) as tmp:
        if fmt == "taming":
            if cfg.stage == "vqgan":
                disc = {f"loss.{k}": v for k, v in disc.items()}
                write_taming(tmp, "vqgan", cfg, {**sd, **disc}, with_loss=bool(disc))
            else:
                write_taming(tmp, "transformer", cfg, sd)
            names = [""]
        elif fmt == "taming_dist":
            names = _write_ours(tmp, cfg, sd, dtype)
        elif fmt == "diffusers":
            from taming_dist.interop.diffusers import save_diffusers

            save_diffusers(tmp, vq_cfg, vq_sd, dtype)
            names = [""]
        elif fmt == "onnx":
            from taming_dist.interop.onnx import save_onnx

            save_onnx(tmp, vq_cfg, vq_sd)
            names = [""]
        else:
            from taming_dist.interop.transformers import save_pipeline, save_transformers

            if fmt == "transformers":
                save_transformers(tmp, cfg.transformer, sd, dtype)
                names = [""]
            else:
                names = save_pipeline(tmp, cfg.transformer, sd, dtype)
    return [out / n if n else out for n in names]


def _tokenizer(cfg: RunConfig, sd: dict) -> tuple:
    """(VQModelConfig, state dict) of the run's image tokenizer: the VQGAN, or a transformer's first stage."""
    if cfg.stage == "vqgan":
        return cfg.vqgan, sd
    first = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    return cfg.transformer.first_stage, first


def _write_ours(tmp: Path, cfg: RunConfig, sd: dict, dtype) -> list[str]:
    from taming_dist.weights.folder import save_model_folder

    if cfg.stage == "vqgan":
        save_model_folder(tmp, "vqgan", cfg.vqgan, sd, dtype=dtype)
        return [""]
    tmp.mkdir(parents=True)
    _, first = _tokenizer(cfg, sd)
    save_model_folder(tmp / "vqgan", "vqgan", cfg.transformer.first_stage, first, dtype=dtype)
    save_model_folder(tmp / "transformer", "transformer", cfg.transformer, sd, dtype=dtype)
    return ["vqgan", "transformer"]


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


def original_yaml(kind: str, cfg: RunConfig, with_loss: bool = True) -> dict:
    if kind == "vqgan":
        target = "taming.models.vqgan.GumbelVQ" if cfg.vqgan.quantizer.kind == "gumbel" else "taming.models.vqgan.VQModel"
        return {"model": {"base_learning_rate": cfg.train.optim.lr, "target": target,
                          "params": _original_vq_params(cfg.vqgan, cfg.loss if with_loss else None)}}
    from taming_dist.models.conditions import make_condition

    t = cfg.transformer
    cond_key, cond_stage = make_condition(t).original_cond_stage(_original_vq_params)
    g = t.gpt
    return {"model": {"base_learning_rate": cfg.train.optim.lr, "target": "taming.models.cond_transformer.Net2NetTransformer",
                      "params": {"pkeep": t.pkeep, "cond_stage_key": cond_key,
                                 "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {
                                     "vocab_size": g.vocab_size, "block_size": g.block_size, "n_layer": g.n_layer,
                                     "n_head": g.n_head, "n_embd": g.n_embd, "embd_pdrop": g.embd_pdrop,
                                     "resid_pdrop": g.resid_pdrop, "attn_pdrop": g.attn_pdrop,
                                     "n_unmasked": g.n_unmasked}},
                                 "first_stage_config": {"target": "taming.models.vqgan.VQModel",
                                                        "params": _original_vq_params(t.first_stage)},
                                 "cond_stage_config": cond_stage}}}


def write_taming(out: Path, kind: str, cfg: RunConfig, sd: dict, with_loss: bool = True) -> Path:
    """The original Lightning layout: `model.ckpt` ({"state_dict": ...}) and `model.yaml`. Every VQModel
    in it (the VQGAN, or a transformer's first and cond stages) goes through `inference_state`, so the
    original classes load it strictly (Lightning's `load_from_checkpoint`); `with_loss=False` writes
    a DummyLoss lossconfig (no `loss.*` weights to go with VQLPIPSWithDiscriminator)."""
    for prefix in ("quantize.", "first_stage_model.quantize.", "cond_stage_model.quantize."):
        sd = inference_state(sd, prefix)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if kind == "transformer":
        block = cfg.transformer.gpt.block_size
        mask = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
        for i in range(cfg.transformer.gpt.n_layer):
            sd[f"transformer.blocks.{i}.attn.mask"] = mask.clone()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.ckpt") as tmp:
        torch.save({"state_dict": sd, "global_step": 0}, tmp)
    (out / "model.yaml").write_text(yaml.safe_dump(original_yaml(kind, cfg, with_loss), sort_keys=False))
    return out
