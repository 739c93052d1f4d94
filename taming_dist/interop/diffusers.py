"""Our VQModel <-> diffusers' `VQModel` (the class latent-diffusion's and aMUSEd's pipelines load).

diffusers rebuilt taming's convolutional net from blocks: a level of our encoder (`down.<i>`: ResnetBlocks,
an AttnBlock after each when the level's resolution is in `attn_resolutions`, a Downsample) is a
`DownEncoderBlock2D` / `AttnDownEncoderBlock2D` (`down_blocks.<i>`), the decoder's level `up.<i>` is
`up_blocks.<n-1-i>` (diffusers stores them in the order they run), `mid.block_1/attn_1/block_2` are
`mid_block.resnets.0/attentions.0/resnets.1`, `nin_shortcut` is `conv_shortcut`, and the attention's
1x1 convolutions q, k, v, proj_out are the Linear layers to_q, to_k, to_v, to_out.0 (the same
weights without the two unit dimensions), as diffusers' own `scripts/convert_vq_diffusion_to_diffusers.py`
maps them. The numbers are the same net: GroupNorm(32, eps 1e-6), swish, right/bottom zero padding
before the stride-2 conv, nearest upsampling, single-head attention scaled by C^-0.5.

What does not fit is refused by name: diffusers' quantizer is the nearest-code lookup only (vq and ema
kinds), its conv_in writes block_out_channels[0] channels (ch_mult[0] must be 1), one attention pattern
serves both encoder and decoder in ours, and its encoder always has the mid-block attention.

Nearest code: ours takes argmin of |z|^2 + |e|^2 - 2 z.e (the original's formula); diffusers takes
argmin of `torch.cdist(z, e)`, which for more than 25 rows is sqrt(max(|z|^2 + |e|^2 - 2 z.e, 1e-30))
computed as one matmul of augmented matrices. Both are the same distance rounded differently, so the
index can differ only where two codes are equidistant to within float32 rounding of |z|^2 (about
1e-7 of it); see tests/unit/test_export_diffusers.py for the measured margin.
"""
from __future__ import annotations

import re

import torch

from taming_dist.config import EncoderDecoderConfig, QuantizerConfig, VQModelConfig

_WHY_NOT = {
    "gumbel": "its codes are chosen by a learned projection (argmax of quantize.proj), not by distance",
    "l2": "its lookup runs in a projected, l2-normalised space (quantize.in_proj / out_proj)",
    "fsq": "its codebook is an implicit grid of rounded, bounded channels (finite scalar quantization)",
    "lfq": "its codebook is the implicit set of sign patterns (lookup-free quantization)",
}


def refuse(cfg: VQModelConfig, what: str = "export --format diffusers") -> None:
    """A ValueError naming what of `cfg` diffusers' VQModel cannot hold, and what to use instead."""
    kind, dd = cfg.quantizer.kind, cfg.ddconfig
    if kind in _WHY_NOT:
        raise ValueError(f"{what}: quantizer.kind={kind} cannot be a diffusers VQModel: {_WHY_NOT[kind]}, and "
                         "diffusers' VectorQuantizer is a nearest-code lookup only (kinds vq and ema). Use "
                         "--format onnx (any quantizer) or the taming_dist format (VQModel.from_pretrained)")
    if dd.ch_mult[0] != 1:
        raise ValueError(f"{what}: ddconfig.ch_mult[0]={dd.ch_mult[0]}: diffusers' conv_in writes "
                         "block_out_channels[0] channels straight into the first level, so ch_mult must start with 1")
    if dd.double_z:
        raise ValueError(f"{what}: ddconfig.double_z=true is a KL autoencoder's encoder, not a VQModel's")


def _attn_levels(dd: EncoderDecoderConfig) -> list[bool]:
    """Per level i (resolution R / 2**i): whether its blocks are followed by attention."""
    return [dd.resolution // 2**i in dd.attn_resolutions for i in range(len(dd.ch_mult))]


def diffusers_config(cfg: VQModelConfig) -> dict:
    """The `diffusers.VQModel(**config)` arguments of our config."""
    refuse(cfg)
    dd, q = cfg.ddconfig, cfg.quantizer
    attn = _attn_levels(dd)
    return {
        "in_channels": dd.in_channels, "out_channels": dd.out_ch,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [dd.ch * m for m in dd.ch_mult], "layers_per_block": dd.num_res_blocks,
        "act_fn": "silu", "latent_channels": dd.z_channels, "sample_size": dd.resolution,
        "num_vq_embeddings": q.n_embed, "norm_num_groups": 32, "vq_embed_dim": q.embed_dim,
        # diffusers' VQ pipelines read no scaling factor from a VQModel; 1.0 leaves latents as they are
        "scaling_factor": 1.0, "norm_type": "group", "mid_block_add_attention": True,
        "lookup_from_codebook": False, "force_upcast": False,
    }


_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RES = {"nin_shortcut": "conv_shortcut"}


def _block(name: str) -> str:
    """`block.<j>.rest` / `attn.<j>.<part>.rest` inside a level or the mid block -> diffusers' names."""
    m = re.fullmatch(r"block\.(\d+)\.(\w+)\.(\w+)", name)
    if m:
        return f"resnets.{m[1]}.{_RES.get(m[2], m[2])}.{m[3]}"
    m = re.fullmatch(r"attn\.(\d+)\.(\w+)\.(\w+)", name)
    if m:
        return f"attentions.{m[1]}.{_ATTN[m[2]]}.{m[3]}"
    raise KeyError(name)


def _mid(name: str) -> str:
    m = re.fullmatch(r"(block_1|attn_1|block_2)\.(.+)", name)
    if m is None:
        raise KeyError(name)
    part = {"block_1": "block.0", "attn_1": "attn.0", "block_2": "block.1"}[m[1]]
    return _block(f"{part}.{m[2]}")


def diffusers_key(key: str, n_levels: int) -> str:
    """One of our VQModel keys -> the diffusers VQModel key holding the same tensor."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv", "quantize"):
        return key
    if part not in ("encoder", "decoder"):
        raise KeyError(key)
    if rest.startswith("mid."):
        return f"{part}.mid_block.{_mid(rest[4:])}"
    if rest.startswith(("norm_out.", "conv_out.", "conv_in.")):
        return f"{part}.{rest.replace('norm_out.', 'conv_norm_out.')}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(.+)", rest)
    if m is None:
        raise KeyError(key)
    level, inner = int(m[2]), m[3]
    if m[1] == "down":
        head = f"encoder.down_blocks.{level}"
        sampler = re.fullmatch(r"downsample\.conv\.(\w+)", inner)
        return f"{head}.downsamplers.0.conv.{sampler[1]}" if sampler else f"{head}.{_block(inner)}"
    head = f"decoder.up_blocks.{n_levels - 1 - level}"
    sampler = re.fullmatch(r"upsample\.conv\.(\w+)", inner)
    return f"{head}.upsamplers.0.conv.{sampler[1]}" if sampler else f"{head}.{_block(inner)}"


def _is_attn_conv(key: str) -> bool:
    return re.search(r"(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", key) is not None


def to_diffusers(cfg: VQModelConfig, state_dict: dict) -> tuple[dict, dict]:
    """(diffusers config, diffusers state dict) of our VQModel's config and state dict. The k-means /
    restart offset is folded into the codebook; training-only quantizer buffers are dropped."""
    from taming_dist.models.quantize import inference_state

    config = diffusers_config(cfg)
    n = len(cfg.ddconfig.ch_mult)
    return config, {diffusers_key(k, n): v[:, :, 0, 0] if _is_attn_conv(k) else v
                    for k, v in inference_state(state_dict).items()}


def from_diffusers(config: dict, state_dict: dict) -> tuple[VQModelConfig, dict]:
    """A diffusers VQModel's (config, state dict) -> (our VQModelConfig, our state dict), refusing
    what our VQModel cannot hold."""
    where = "import-diffusers"
    need = {"act_fn": "silu", "norm_num_groups": 32, "norm_type": "group", "mid_block_add_attention": True}
    for key, want in need.items():
        if config.get(key, want) != want:
            raise ValueError(f"{where}: {key}={config[key]!r}, but the taming VQGAN has {want!r}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    kinds = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
    ukinds = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
    bad = [b for b in down if b not in kinds] + [b for b in up if b not in ukinds]
    if bad:
        raise ValueError(f"{where}: block types {bad} have no taming equivalent (encoder levels are "
                         f"{' / '.join(kinds)}, decoder levels {' / '.join(ukinds)})")
    attn = [kinds[b] for b in down]
    if len(up) != len(down) or [ukinds[b] for b in reversed(up)] != attn:
        raise ValueError(f"{where}: the decoder's attention levels {up} are not the encoder's {down} reversed; the "
                         "taming VQGAN places attention by resolution, the same in both")
    size = config.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{where}: sample_size {size} is not square")
        size = size[0]
    chans = list(config["block_out_channels"])
    ch = chans[0]
    if any(c % ch for c in chans):
        raise ValueError(f"{where}: block_out_channels {chans} are not multiples of the first ({ch})")
    if size % 2 ** (len(chans) - 1):
        raise ValueError(f"{where}: sample_size {size} is not divisible by the downsampling factor {2 ** (len(chans) - 1)}")
    dd = EncoderDecoderConfig(double_z=False, z_channels=config["latent_channels"], resolution=size,
                              in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3), ch=ch,
                              ch_mult=[c // ch for c in chans], num_res_blocks=config["layers_per_block"],
                              attn_resolutions=[size // 2**i for i, a in enumerate(attn) if a], dropout=0.0)
    embed_dim = config.get("vq_embed_dim") or config["latent_channels"]
    cfg = VQModelConfig(ddconfig=dd, quantizer=QuantizerConfig(kind="vq", n_embed=config["num_vq_embeddings"],
                                                               embed_dim=embed_dim))
    cfg.validate()
    from taming_dist.models.vqgan import VQModel

    with torch.device("meta"):
        ours = VQModel(cfg).state_dict()
    n = len(chans)
    out, missing = {}, []
    for k, ref in ours.items():
        dk = diffusers_key(k, n)
        if dk not in state_dict:
            missing.append(dk)
            continue
        v = state_dict[dk]
        out[k] = v.reshape(ref.shape) if _is_attn_conv(k) else v
    extra = sorted(set(state_dict) - {diffusers_key(k, n) for k in ours})
    wrong = [f"{k} {tuple(out[k].shape)} != {tuple(r.shape)}" for k, r in ours.items() if k in out and out[k].shape != r.shape]
    if missing or extra or wrong:
        raise ValueError(f"{where}: the weights do not fit the config: missing {missing[:6]}, unexpected "
                         f"{extra[:6]}, shape mismatches {wrong[:6]}")
    return cfg, out


def save_diffusers(folder, cfg: VQModelConfig, state_dict: dict, dtype: torch.dtype | None = None) -> None:
    """Write `folder` (config.json + diffusion_pytorch_model.safetensors) through diffusers' own
    `save_pretrained`, after a strict load into its VQModel: a key that diffusers would not read is
    an error here, not a silently random weight there."""
    from diffusers import VQModel as DiffusersVQModel

    config, sd = to_diffusers(cfg, state_dict)
    with torch.device("meta"):  # no random init of weights that are replaced at once
        model = DiffusersVQModel(**config)
    model.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder), safe_serialization=True)


def load_diffusers(folder) -> tuple[VQModelConfig, dict]:
    """A diffusers VQModel folder -> (our config, our state dict), through diffusers' own loader (so
    its config defaults apply)."""
    from diffusers import VQModel as DiffusersVQModel

    model = DiffusersVQModel.from_pretrained(str(folder))
    return from_diffusers(dict(model.config), {k: v.detach() for k, v in model.state_dict().items()})
