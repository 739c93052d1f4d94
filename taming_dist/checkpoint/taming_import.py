"""Import original Taming-Transformers checkpoints (PyTorch Lightning `.ckpt`), no Lightning needed.

Supports VQModel, GumbelVQ and Net2NetTransformer. The original hyper-parameters come from an
original-style YAML given explicitly (`model: {target, params: {ddconfig, n_embed, embed_dim,
lossconfig, ...}}`, the file released beside each checkpoint) or one of our presets, else from the
checkpoint's own `hyper_parameters`. Every original parameter is either mapped onto our config,
known to be irrelevant to the weights, or refused by name (the original's `**ignore_kwargs`
swallowed typos; an unknown option here could change the architecture).

Keys are matched strictly against our model built on the meta device, then loaded with
`assign=True` (no second copy of the weights): anything missing or of another shape is an error
naming it; unexpected keys are reported; the GPT's stored `attn.mask` buffers are dropped (rebuilt
from block_size); `loss.*` is kept for fine-tuning (discriminator, LPIPS) or dropped and reported.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from taming_dist.checkpoint.export import refuse_original_layout
from taming_dist.weights.safe_load import safe_load
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

# Every constructor parameter of the original classes: mapped onto our config below, or training
# glue that does not change the weights or the model's function (checkpoint paths, data keys,
# logging, the Gumbel temperature schedule). Anything else is refused.
_VQ_PARAMS = {"ddconfig", "n_embed", "embed_dim", "kl_weight", "remap", "lossconfig", "ckpt_path", "ignore_keys",
              "image_key", "colorize_nlabels", "monitor", "sane_index_shape", "temperature_scheduler_config"}
_DD_ASSUMED = {"resamp_with_conv": True, "give_pre_end": False}  # original ddconfig options our nets fix
_NET2NET_PARAMS = {"transformer_config", "first_stage_config", "cond_stage_config", "permuter_config", "pkeep",
                   "sos_token", "unconditional", "downsample_cond_size", "ckpt_path", "ignore_keys",
                   "first_stage_key", "cond_stage_key"}
_LOSS_PARAMS = {"disc_start", "codebook_weight", "pixelloss_weight", "disc_num_layers", "disc_in_channels",
                "disc_factor", "disc_weight", "perceptual_weight", "use_actnorm", "disc_conditional", "disc_ndf",
                "disc_loss"}


@dataclass
class ImportResult:
    model_type: str  # vqgan | transformer
    cfg: Any  # VQModelConfig | TransformerModelConfig
    model_state_dict: dict
    loss_state_dict: dict = field(default_factory=dict)  # `discriminator.*`, `perceptual_loss.*`
    report: dict = field(default_factory=dict)
    loss_cfg: VQLossConfig | None = None  # the original lossconfig, when the loss was kept

    def summary(self) -> str:
        r = self.report
        lines = [f"{r['kind']} -> {self.model_type}: {r['loaded']} tensors loaded strictly "
                 f"(hyper-parameters from {r['hparams_source']})"]
        for reason, keys in r["dropped"].items():
            lines.append(f"dropped {len(keys)} {reason}: {_sample(keys)}")
        if r["unexpected"]:
            lines.append(f"unexpected, not loaded ({len(r['unexpected'])}): {_sample(r['unexpected'])}")
        if self.loss_state_dict:
            lines.append(f"loss weights kept: {r['loss_kept']} tensors (discriminator, LPIPS) -> loss.safetensors")
        lines += [f"note: {n}" for n in r["notes"]]
        return "\n".join(lines)


def _sample(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys) - n} more)" if len(keys) > n else "")


def detect_kind(sd: dict) -> str:
    if any(k.startswith("transformer.") for k in sd) and any(k.startswith("first_stage_model.") for k in sd):
        return "net2net"
    if "quantize.proj.weight" in sd:
        return "gumbel"
    if "encoder.conv_in.weight" in sd:
        return "vqgan"
    raise ValueError("not a taming checkpoint: found neither encoder.conv_in.weight (VQModel/GumbelVQ) nor "
                     "transformer.* with first_stage_model.* (Net2NetTransformer)")


def _check_known(params: dict, known: set, where: str) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{where}: unsupported original parameter(s) {unknown}; they would change the model and "
                         "taming_dist has no equivalent")


def _require(params: dict, keys: tuple, where: str) -> None:
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"{where}: the original parameters lack {missing} (is --kind right for this checkpoint?)")


def _vq_config(params: dict, gumbel: bool, where: str) -> VQModelConfig:
    _check_known(params, _VQ_PARAMS, where)
    _require(params, ("ddconfig", "n_embed", "embed_dim"), where)
    if params.get("remap") is not None:
        raise ValueError(f"{where}: remap={params['remap']!r} renumbers the codes through a file; "
                         "taming_dist's quantizers use the codebook's own indices")
    dd = dict(params["ddconfig"])
    for key, assumed in _DD_ASSUMED.items():
        if dd.pop(key, assumed) != assumed:
            raise ValueError(f"{where}: ddconfig.{key} must be {assumed} (the architecture taming_dist implements)")
    q = {"kind": "gumbel" if gumbel else "vq", "n_embed": params["n_embed"], "embed_dim": params["embed_dim"]}
    if gumbel:
        q["kl_weight"] = params.get("kl_weight", 1e-8)  # GumbelVQ's default
    return VQModelConfig(ddconfig=from_dict(EncoderDecoderConfig, dd, f"{where} ddconfig"),
                         quantizer=from_dict(QuantizerConfig, q, f"{where} quantizer"))


def _stage_config(stage, where: str) -> VQModelConfig:
    """A first/cond stage given as {target, params}: VQModel (or a subclass) or GumbelVQ."""
    target = stage.get("target", "") if isinstance(stage, dict) else str(stage)
    if not target.endswith(("VQModel", "GumbelVQ", "VQSegmentationModel", "VQNoDiscModel")):
        raise ValueError(f"{where}: unsupported stage target {target!r} (VQModel or GumbelVQ can be imported)")
    return _vq_config(stage.get("params") or {}, target.endswith("GumbelVQ"), f"{where} ({target})")


def _loss_config(params: dict, where: str) -> VQLossConfig | None:
    """The original VQLPIPSWithDiscriminator settings; None for DummyLoss or no lossconfig."""
    lc = params.get("lossconfig") or {}
    if not str(lc.get("target", "")).endswith("VQLPIPSWithDiscriminator"):
        return None
    lp = lc.get("params") or {}
    _check_known(lp, _LOSS_PARAMS, f"{where} lossconfig")
    if lp.get("disc_conditional"):
        raise ValueError(f"{where}: lossconfig.disc_conditional=true (a discriminator that also sees the "
                         "condition) has no taming_dist equivalent; import without keep_loss")
    disc = DiscriminatorConfig(input_nc=lp.get("disc_in_channels", 3), ndf=lp.get("disc_ndf", 64),
                               n_layers=lp.get("disc_num_layers", 3),
                               norm="actnorm" if lp.get("use_actnorm") else "batch")
    return VQLossConfig(disc_start=lp["disc_start"], codebook_weight=lp.get("codebook_weight", 1.0),
                        pixel_weight=lp.get("pixelloss_weight", 1.0),
                        perceptual_weight=lp.get("perceptual_weight", 1.0), disc_weight=lp.get("disc_weight", 1.0),
                        disc_factor=lp.get("disc_factor", 1.0), disc_loss=lp.get("disc_loss", "hinge"),
                        discriminator=disc)


def _net2net_config(params: dict, where: str, notes: list[str]) -> TransformerModelConfig:
    _check_known(params, _NET2NET_PARAMS, where)
    _require(params, ("transformer_config", "first_stage_config"), where)
    permuter = (params.get("permuter_config") or {}).get("target", "taming.modules.transformer.permuter.Identity")
    if not permuter.endswith(".Identity"):
        raise ValueError(f"{where}: permuter {permuter!r} reorders the tokens; only the Identity permuter "
                         "(raster order) can be imported")
    gpt = from_dict(GPTConfig, params["transformer_config"].get("params") or {}, f"{where} transformer_config")
    first = _stage_config(params["first_stage_config"], f"{where} first_stage_config")
    cond_cfg = params.get("cond_stage_config", "__is_unconditional__")
    target = cond_cfg if isinstance(cond_cfg, str) else cond_cfg.get("target", "")
    cparams = {} if isinstance(cond_cfg, str) else (cond_cfg.get("params") or {})
    if target == "__is_unconditional__" or params.get("unconditional"):
        # Net2NetTransformer builds SOSProvider(its own sos_token) in this case
        cond = ConditionConfig(kind="none", sos_token=params.get("sos_token", 0))
    elif target.endswith("SOSProvider"):
        cond = ConditionConfig(kind="none", sos_token=cparams.get("sos_token", 0))
    elif target.endswith(("Labelator", "ClassProvider")):
        cond = ConditionConfig(kind="class", n_classes=cparams.get("n_classes", 1000))
    elif target == "__is_first_stage__":
        cond = ConditionConfig(kind="tokens", cond_vqgan=dataclasses.replace(first))
    else:
        cond = ConditionConfig(kind="tokens", cond_vqgan=_stage_config(cond_cfg, f"{where} cond_stage_config"))
    if params.get("downsample_cond_size", -1) != -1 and cond.cond_vqgan is not None:  # an image condition
        notes.append(f"the original resized conditioning images to {params['downsample_cond_size']} px before "
                     "encoding them (downsample_cond_size); do the same when preparing cond_image")
    return TransformerModelConfig(gpt=gpt, condition=cond, first_stage=first, pkeep=params.get("pkeep", 1.0))


def _params_of(tree, where: str) -> dict:
    """`params` of an original config: a full YAML ({model: {target, params}}), {target, params},
    or the constructor arguments themselves (what Lightning's save_hyperparameters stores)."""
    if not isinstance(tree, dict):
        raise ValueError(f"{where}: expected a mapping of the original model's parameters, got {type(tree).__name__}")
    if isinstance(tree.get("model"), dict):
        tree = tree["model"]
    params = tree.get("params", tree)
    if not isinstance(params, dict) or not ({"ddconfig", "transformer_config"} & set(params)):
        raise ValueError(f"{where} holds no original model parameters (expected model.params with ddconfig, or "
                         "transformer_config for a Net2NetTransformer)")
    return params


def _build_meta(model_type: str, cfg):
    """Our model on the meta device: its keys and shapes without memory for the weights."""
    with torch.device("meta"):
        if model_type == "vqgan":
            from taming_dist.models.vqgan import VQModel

            return VQModel(cfg)
        from taming_dist.models.transformer import Transformer

        return Transformer(cfg)


def _match(expected: dict, given: dict, what: str, fix: str) -> None:
    missing = [k for k in expected if k not in given]
    wrong = [f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}" for k in expected
             if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        raise ValueError(f"{what}: missing {len(missing)} key(s) {missing[:8]}; {len(wrong)} shape "
                         f"mismatch(es) {wrong[:6]}. {fix}")


def _loss_weights(loss_sd: dict, loss_cfg: VQLossConfig | None, path) -> dict:
    """`discriminator.*` checked against the lossconfig's PatchGAN and `perceptual_loss.*` with the
    lpips package's `lins.<i>` aliases added, so both load strictly into our modules."""
    from taming_dist.losses.lpips import lpips_keys
    from taming_dist.models.discriminator import NLayerDiscriminator

    if not loss_sd:
        raise ValueError(f"{path} holds no loss.discriminator.* / loss.perceptual_loss.* weights to keep; "
                         "import it without keep_loss")
    if loss_cfg is None:
        raise ValueError(f"{path}: keep_loss needs the original lossconfig (VQLPIPSWithDiscriminator) to check the "
                         "discriminator against; pass --config with the original YAML")
    with torch.device("meta"):
        disc = {f"discriminator.{k}": v for k, v in NLayerDiscriminator(loss_cfg.discriminator).state_dict().items()}
    out = {k: v for k, v in loss_sd.items() if k.startswith("discriminator.")}
    fix = "Check the lossconfig's disc_num_layers, disc_ndf, disc_in_channels and use_actnorm"
    _match(disc, out, f"{path} loss.discriminator", fix)
    extra = sorted(set(out) - set(disc))
    if extra:
        raise ValueError(f"{path} loss.discriminator: keys the configured PatchGAN does not have {extra[:8]}. {fix}")
    lp = {k[len("perceptual_loss."):]: v for k, v in loss_sd.items() if k.startswith("perceptual_loss.")}
    if lp:
        missing = [k for k in lpips_keys() if k not in lp]
        if missing:
            raise ValueError(f"{path} loss.perceptual_loss: missing {missing[:8]} of the VGG16 LPIPS keys")
        out.update({f"perceptual_loss.{k}": lp[k] for k in lpips_keys()})
        out.update({f"perceptual_loss.lins.{i}.model.1.weight": lp[f"lin{i}.model.1.weight"] for i in range(5)})
    return out


def import_taming_checkpoint(path, *, kind: str = "auto", keep_loss: bool = False, config: str | None = None,
                             preset: str | None = None) -> ImportResult:
    """Read an original checkpoint (Lightning `.ckpt` or a bare state dict) into our model's layout.
    `config`: the original YAML; `preset`: one of our presets; both take precedence over the
    checkpoint's own `hyper_parameters`."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if config and preset:
        raise ValueError("give either config (the original YAML) or preset, not both")
    ckpt = safe_load(path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path} holds no state dict of tensors (expected a Lightning checkpoint or a state dict)")
    kind = detect_kind(sd) if kind == "auto" else kind
    model_type = "transformer" if kind == "net2net" else "vqgan"
    notes: list[str] = []
    loss_cfg = None
    hparams = ckpt.get("hyper_parameters") if "state_dict" in ckpt else None
    if preset:
        run = load_config(preset)
        cfg, source = (run.transformer if kind == "net2net" else run.vqgan), f"preset {preset}"
        loss_cfg = None if kind == "net2net" else run.loss
    elif config or hparams:
        source = str(config) if config else "the checkpoint's hyper_parameters"
        tree = yaml.safe_load(Path(config).read_text()) if config else hparams
        params = _params_of(tree, source)
        if kind == "net2net":
            cfg = _net2net_config(params, source, notes)
        else:
            cfg = _vq_config(params, kind == "gumbel", source)
            loss_cfg = _loss_config(params, source) if keep_loss else None
    else:
        raise ValueError(f"{path} carries no hyper-parameters: pass --config with the original YAML released beside "
                         "the checkpoint (configs/*-project.yaml or model.yaml), or --preset NAME")
    refuse_original_layout(cfg, f"import-taming {path} with {source}")
    cfg.validate()

    model = _build_meta(model_type, cfg)
    expected = model.state_dict()
    model_sd, loss_sd, unexpected = {}, {}, []
    dropped: dict[str, list[str]] = {}
    for k, v in sd.items():
        if k in expected:
            model_sd[k] = v
        elif model_type == "transformer" and k.startswith("transformer.") and k.endswith(".attn.mask"):
            dropped.setdefault("GPT attn.mask buffers (rebuilt from block_size)", []).append(k)
        elif model_type == "vqgan" and keep_loss and k.startswith(("loss.discriminator.", "loss.perceptual_loss.")):
            loss_sd[k[len("loss."):]] = v
        elif k.startswith(("loss.", "first_stage_model.loss.", "cond_stage_model.loss.")):
            dropped.setdefault("loss weights (discriminator, LPIPS; keep them with keep_loss)"
                               if model_type == "vqgan" else "loss weights of the frozen stages", []).append(k)
        else:
            unexpected.append(k)
    _match(expected, model_sd, f"{path} does not match the {kind} config from {source}",
           "Check the config (ddconfig, n_embed, embed_dim, GPT sizes, cond stage) or --kind")
    model.load_state_dict(model_sd, strict=True, assign=True)  # runs our load hooks; keeps the tensors
    model_sd = dict(model.state_dict())
    if keep_loss and model_type == "vqgan":
        loss_sd = _loss_weights(loss_sd, loss_cfg, path)
    report = {"kind": kind, "hparams_source": source, "loaded": len(model_sd), "dropped": dropped,
              "unexpected": unexpected, "loss_kept": len(loss_sd), "notes": notes}
    return ImportResult(model_type, cfg, model_sd, loss_sd, report, loss_cfg if loss_sd else None)


def save_import(result: ImportResult, out) -> Path:
    """A model folder (config.json + model.safetensors), with the kept loss weights in
    `loss.safetensors` inside it (read by `init_from`) and the original loss settings in
    config.json's `loss_config`."""
    from taming_dist.weights.folder import save_model_folder

    meta = {"imported_from": "taming-transformers", "import_report": result.report}
    if result.loss_cfg is not None:
        meta["loss_config"] = dataclasses.asdict(result.loss_cfg)
    extra = {"loss.safetensors": result.loss_state_dict} if result.loss_state_dict else None
    return save_model_folder(out, result.model_type, result.cfg, result.model_state_dict, extra_meta=meta,
                             extra_tensors=extra)
