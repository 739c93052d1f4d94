"""Model folders: `config.json` (the model's config only) + `model.safetensors`.

Written by training (runs/<name>/model), `export` and `import-taming`; read with no training code,
no DeepSpeed and no process group.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from taming_dist.config import TransformerModelConfig, VQModelConfig, from_dict

FORMAT = "taming_dist"
_CONFIGS = {"vqgan": VQModelConfig, "transformer": TransformerModelConfig}


def save_model_folder(folder, model_type: str, cfg, state_dict: dict, extra_meta: dict | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write atomically: into `<folder>.tmp`, then renamed over `folder`."""
    from safetensors.torch import save_file

    if model_type not in _CONFIGS:
        raise ValueError(f"model_type {model_type!r} is not one of {', '.join(_CONFIGS)}")
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()  # clone: safetensors refuses shared storage
    save_file(tensors, str(tmp / "model.safetensors"))
    meta = {"format": FORMAT, "model_type": model_type, "config": dataclasses.asdict(cfg), **(extra_meta or {})}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_model_folder(folder) -> tuple[str, object, dict]:
    """-> (model_type, config dataclass, state dict)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{folder} is not a model folder: {f.name} is missing")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT or meta.get("model_type") not in _CONFIGS:
        raise ValueError(f"{cfg_file} is not a taming_dist model config (format={meta.get('format')!r}, "
                         f"model_type={meta.get('model_type')!r})")
    cfg = from_dict(_CONFIGS[meta["model_type"]], meta["config"], str(cfg_file))
    cfg.validate()
    return meta["model_type"], cfg, load_file(str(weights))


def build_model_from_folder(folder):
    """A VQModel or Transformer with the folder's weights (strict)."""
    model_type, cfg, sd = load_model_folder(folder)
    if model_type == "vqgan":
        from taming_dist.models.vqgan import VQModel

        model = VQModel(cfg)
    else:
        from taming_dist.models.transformer import Transformer

        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True)
    return model


def load_pretrained(cls, folder, subfolder: str):
    """`cls.from_pretrained`: the model in `folder` (or its pipeline `subfolder`), checked to be a `cls`."""
    folder = Path(folder)
    if not (folder / "config.json").exists() and (folder / subfolder / "config.json").exists():
        folder = folder / subfolder
    model = build_model_from_folder(folder)
    if not isinstance(model, cls):
        raise ValueError(f"{folder} holds a {type(model).__name__}, not a {cls.__name__}")
    return model.eval()
