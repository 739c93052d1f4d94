"""Import original Taming-Transformers checkpoints (PyTorch Lightning `.ckpt`), no Lightning needed.

Supports VQModel, GumbelVQ and Net2NetTransformer. Hyper-parameters come, in this order, from an
original-style YAML (`model: {target, params: {ddconfig, n_embed, embed_dim, lossconfig, ...}}`,
the file released beside each checkpoint), from the checkpoint's `hyper_parameters`, or from one
of our presets. Keys are matched strictly against a model built on the meta device (no memory for
the weights): anything missing or of another shape is an error naming it; unexpected keys are
reported; the original's `attn.mask` buffers are dropped (rebuilt from block_size) and `loss.*`
is either kept for fine-tuning (discriminator, LPIPS) or dropped and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from taming_dist.checkpoint.safe_load import safe_load
from taming_dist.config import (
    ConditionConfig,
    DiscriminatorConfig,
    EncoderDecoderConfig,
    GPTConfig,
    QuantizerConfig,
    TransformerModelConfig,
    VQLossConfig,
    VQModelConfig,
    from_dict,
    load_config,
)

KINDS = ("auto", "vqgan", "gumbel", "net2net")


@dataclass
class ImportResult:
    model_type: str  # vqgan | transformer
    cfg: Any
    model_state_dict: dict
    loss_state_dict: dict = field(default_factory=dict)
    loss_cfg: VQLossConfig | None = None
    report: dict = field(default_factory=dict)

    def summary(self) -> str:
        r = self.report
        lines = [f"{self.model_type}: {r['loaded']} tensors loaded strictly"]
        for key in ("dropped", "unexpected"):
            if r[key]:
                lines.append(f"{key} ({len(r[key])}): {', '.join(r[key][:8])}{' ...' if len(r[key]) > 8 else ''}")
        if self.loss_state_dict:
            lines.append(f"loss weights kept: {len(self.loss_state_dict)} tensors (discriminator, LPIPS)")
        return "\n".join(lines)


def _plain(obj):
    """Lightning / omegaconf stand-ins and AttributeDicts -> plain dicts and lists."""
    if isinstance(obj, dict):
        inner = obj.get("state") if set(obj) == {"state"} else obj
        if isinstance(inner, dict) and set(inner) >= {"_content"}:  # omegaconf's pickled layout
            inner = inner["_content"]
        return {k: _plain(v) for k, v in inner.items()} if isinstance(inner, dict) else _plain(inner)
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def detect_kind(sd: dict) -> str:
    if any(k.startswith("transformer.") for k in sd) and any(k.startswith("first_stage_model.") for k in sd):
        return "net2net"
    if "quantize.proj.weight" in sd:
        return "gumbel"
    if "encoder.conv_in.weight" in sd:
        return "vqgan"
    raise ValueError("not a taming checkpoint: found neither encoder.conv_in.weight (VQModel/GumbelVQ) nor "
                     "transformer.* with first_stage_model.* (Net2NetTransformer)")


def _vq_config(params: dict, gumbel: bool) -> VQModelConfig:
    dd = {k: v for k, v in params["ddconfig"].items() if k in EncoderDecoderConfig.__dataclass_fields__}
    q = {"kind": "gumbel" if gumbel else "vq", "n_embed": params["n_embed"], "embed_dim": params["embed_dim"]}
    if gumbel and "kl_weight" in params:
        q["kl_weight"] = params["kl_weight"]
    if "beta" in params:
        q["beta"] = params["beta"]
    return VQModelConfig(ddconfig=from_dict(EncoderDecoderConfig, dd, "original ddconfig"),
                         quantizer=from_dict(QuantizerConfig, q, "original quantizer params"))


def _loss_config(params: dict) -> VQLossConfig:
    lp = (params.get("lossconfig") or {}).get("params") or {}
    disc = DiscriminatorConfig(input_nc=lp.get("disc_in_channels", 3), ndf=lp.get("disc_ndf", 64),
                               n_layers=lp.get("disc_num_layers", 3),
                               norm="actnorm" if lp.get("use_actnorm") else "batch")
    return VQLossConfig(disc_start=lp.get("disc_start", 0), codebook_weight=lp.get("codebook_weight", 1.0),
                        pixel_weight=lp.get("pixelloss_weight", 1.0), perceptual_weight=lp.get("perceptual_weight", 1.0),
                        disc_weight=lp.get("disc_weight", 1.0), disc_factor=lp.get("disc_factor", 1.0),
                        disc_loss=lp.get("disc_loss", "hinge"), discriminator=disc)


def _net2net_config(params: dict) -> TransformerModelConfig:
    g = {k: v for k, v in params["transformer_config"]["params"].items() if k in GPTConfig.__dataclass_fields__}
    first = _vq_config(params["first_stage_config"]["params"], gumbel=False)
    cond_cfg = params.get("cond_stage_config", "__is_unconditional__")
    target = cond_cfg if isinstance(cond_cfg, str) else cond_cfg.get("target", "")
    cparams = {} if isinstance(cond_cfg, str) else (cond_cfg.get("params") or {})
    if target.endswith("SOSProvider") or target == "__is_unconditional__":
        cond = ConditionConfig(kind="none", sos_token=cparams.get("sos_token", 0))
    elif target.endswith(("Labelator", "ClassProvider")):
        cond = ConditionConfig(kind="class", n_classes=cparams.get("n_classes", 1000))
    elif target == "__is_first_stage__":
        cond = ConditionConfig(kind="tokens", cond_vqgan=first)
    elif target.endswith(("VQModel", "GumbelVQ")):
        cond = ConditionConfig(kind="tokens", cond_vqgan=_vq_config(cparams, target.endswith("GumbelVQ")))
    else:
        raise ValueError(f"unsupported cond_stage_config target {target!r}: SOSProvider, Labelator/ClassProvider "
                         "and VQModel conditioning can be imported")
    return TransformerModelConfig(gpt=from_dict(GPTConfig, g, "original transformer_config"), condition=cond,
                                  first_stage=first, pkeep=params.get("pkeep", 1.0))


def _original_params(ckpt: dict, config: str | None) -> dict | None:
    if config:
        tree = yaml.safe_load(Path(config).read_text())
        if not isinstance(tree, dict) or "model" not in tree or "params" not in tree["model"]:
            raise ValueError(f"{config} is not an original taming config: expected model: {{target, params}}")
        return tree["model"]["params"]
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if hp:
        hp = _plain(hp)
        return hp.get("params", hp) if isinstance(hp, dict) else None
    return None


def import_taming_checkpoint(path, *, kind: str = "auto", keep_loss: bool = False, config: str | None = None,
                             preset: str | None = None) -> ImportResult:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    ckpt = safe_load(path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path} holds no state dict of tensors (expected a Lightning checkpoint or a state dict)")
    kind = detect_kind(sd) if kind == "auto" else kind
    params = _original_params(ckpt, config)
    loss_cfg = None
    if params is not None:
        cfg = _net2net_config(params) if kind == "net2net" else _vq_config(params, kind == "gumbel")
        loss_cfg = _loss_config(params) if kind != "net2net" else None
    elif preset:
        run = load_config(preset)
        cfg, loss_cfg = (run.transformer, None) if kind == "net2net" else (run.vqgan, run.loss)
    else:
        raise ValueError(f"{path} carries no hyper-parameters: pass --config with the original YAML released beside "
                         "the checkpoint (configs/model.yaml), or --preset NAME")
    cfg.validate()
    model_type = "transformer" if kind == "net2net" else "vqgan"
    expected = _expected_shapes(model_type, cfg)
    model_sd, loss_sd, dropped, unexpected = {}, {}, [], []
    for k, v in sd.items():
        if k in expected:
            model_sd[k] = v
        elif k.endswith(".attn.mask") and k.startswith("transformer."):
            dropped.append(k)
        elif k.startswith("loss.") and keep_loss and model_type == "vqgan":
            loss_sd[k[len("loss."):]] = v
        elif k.startswith("loss."):
            dropped.append(k)
        elif k.startswith(("first_stage_model.loss.", "cond_stage_model.loss.")):
            dropped.append(k)
        else:
            unexpected.append(k)
    missing = [k for k in expected if k not in model_sd]
    wrong = [f"{k} {tuple(model_sd[k].shape)} != {tuple(expected[k])}" for k in model_sd
             if tuple(model_sd[k].shape) != tuple(expected[k])]
    if missing or wrong:
        raise ValueError(
            f"{path} does not match the {kind} config: missing {len(missing)} keys {missing[:6]}; "
            f"shape mismatches {wrong[:6]}. Check --config/--preset (ddconfig, n_embed, embed_dim, GPT sizes)"
        )
    if keep_loss and loss_sd:
        loss_sd = {k: v for k, v in loss_sd.items() if not k.startswith("perceptual_loss.lins.")}
    report = {"kind": kind, "loaded": len(model_sd), "dropped": dropped, "unexpected": unexpected, "missing": []}
    return ImportResult(model_type, cfg, model_sd, loss_sd, loss_cfg, report)


def _expected_shapes(model_type: str, cfg) -> dict[str, torch.Size]:
    """Keys and shapes of our model for this config, built on the meta device (no memory)."""
    with torch.device("meta"):
        if model_type == "vqgan":
            from taming_dist.models.vqgan import VQModel

            model = VQModel(cfg)
        else:
            from taming_dist.models.transformer import Transformer

            model = Transformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def save_import(result: ImportResult, out) -> Path:
    """A model folder (config.json + model.safetensors) and, with kept loss weights,
    `loss.safetensors` (+ `loss.json` with the original loss settings) beside it."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from taming_dist.checkpoint.pretrained import save_model_folder

    out = Path(out)
    save_model_folder(out, result.model_type, result.cfg, result.model_state_dict,
                      extra_meta={"imported_from": "taming-transformers", "import_report": result.report})
    if result.loss_state_dict:
        save_file({k: v.contiguous().clone() for k, v in result.loss_state_dict.items()}, str(out / "loss.safetensors"))
        if result.loss_cfg is not None:
            (out / "loss.json").write_text(json.dumps(dataclasses.asdict(result.loss_cfg), indent=2))
    return out
