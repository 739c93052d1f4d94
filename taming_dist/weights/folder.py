"""Model folders: `config.json` (format, model type, the model's config) + `model.safetensors`.

Written by training (runs/<name>/model), `export` and `import-taming`; read with no training code,
no DeepSpeed and no process group. A leaf module: it imports nothing of this package but the config,
so the models' `from_pretrained`, the tasks and the checkpoint tools all read folders through it.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import torch

from taming_dist.atomic import atomic_path
from taming_dist.config import TransformerModelConfig, VQModelConfig, from_dict

FORMAT = "taming_dist"
_CONFIGS = {"vqgan": VQModelConfig, "transformer": TransformerModelConfig}
_RESERVED = ("format", "model_type", "config")


def safetensors_state(state_dict: dict, dtype: torch.dtype | None = None) -> dict:
    """CPU, contiguous tensors; those sharing storage with another entry are cloned, since
    safetensors refuses shared memory (tied weights are saved once per key)."""
    owners = Counter(v.untyped_storage().data_ptr() for v in state_dict.values() if v.numel())
    out = {}
    for k, v in state_dict.items():
        t = v.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        shared = v.numel() and owners[v.untyped_storage().data_ptr()] > 1
        out[k] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    return out


def save_model_folder(folder, model_type: str, cfg, state_dict: dict, extra_meta: dict | None = None,
                      dtype: torch.dtype | None = None, extra_tensors: dict[str, dict] | None = None) -> Path:
    """Write `folder` atomically (taming_dist.atomic: a temporary folder beside it, synced, renamed
    into place; a previous folder is moved aside first and removed last). `dtype` casts floating tensors;
    `extra_meta` adds keys to config.json; `extra_tensors` maps a file name (e.g. `loss.safetensors`)
    to more tensors saved beside the model."""
    from safetensors.torch import save_file

    if model_type not in _CONFIGS:
        raise ValueError(f"model_type {model_type!r} is not one of {', '.join(_CONFIGS)}")
    if not isinstance(cfg, _CONFIGS[model_type]):
        raise ValueError(f"a {model_type} folder needs a {_CONFIGS[model_type].__name__}, got {type(cfg).__name__}")
    clash = [k for k in (extra_meta or {}) if k in _RESERVED]
    if clash:
        raise ValueError(f"extra_meta may not set {clash}: config.json owns {', '.join(_RESERVED)}")
    for name in extra_tensors or {}:
        if name == "model.safetensors" or not name.endswith(".safetensors") or "/" in name:
            raise ValueError(f"extra_tensors file name {name!r} must be a plain `*.safetensors` name other than "
                             "model.safetensors")
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(safetensors_state(state_dict, dtype), str(tmp / "model.safetensors"))
        for name, tensors in (extra_tensors or {}).items():
            save_file(safetensors_state(tensors, dtype), str(tmp / name))
        meta = {"format": FORMAT, "model_type": model_type, "config": dataclasses.asdict(cfg), **(extra_meta or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
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
                         f"model_type={meta.get('model_type')!r}; expected format {FORMAT!r}, model_type one of "
                         f"{', '.join(_CONFIGS)})")
    cfg = from_dict(_CONFIGS[meta["model_type"]], meta["config"], str(cfg_file))
    cfg.validate()
    return meta["model_type"], cfg, load_file(str(weights))


def load_pretrained(cls, folder, model_type: str):
    """`cls.from_pretrained`: the `model_type` model in `folder` (or in its pipeline sub-folder of
    that name), built as `cls(config)` with strict keys, in eval mode. The class is passed in, so
    this module never imports the models."""
    folder = Path(folder)
    if not (folder / "config.json").exists() and (folder / model_type / "config.json").exists():
        folder = folder / model_type
    found, cfg, sd = load_model_folder(folder)
    if found != model_type:
        raise ValueError(f"{folder} holds a {found} model, not a {model_type} model ({cls.__name__})")
    model = cls(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def read_weights(path: str) -> dict:
    """Weights from a model folder (config.json + model.safetensors), a run folder (its `model/`)
    or a single file (.safetensors, or a torch file loaded with weights_only=True)."""
    from taming_dist.weights.safe_load import safe_load

    p = Path(path)
    if p.is_dir():
        folder = resolve_model_folder(path)
        _, _, sd = load_model_folder(folder)
        if (folder / "loss.safetensors").exists():  # discriminator + LPIPS kept by import-taming --keep-loss
            sd.update({f"loss.{k}": v for k, v in safe_load(str(folder / "loss.safetensors")).items()})
        return sd
    if not p.exists():
        raise FileNotFoundError(f"init_from: {p} does not exist")
    obj = safe_load(str(p))
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def resolve_model_folder(path: str) -> Path:
    """A model folder itself, or a run folder's exported `model/`."""
    p = Path(path)
    if (p / "model" / "config.json").exists():
        return p / "model"
    if (p / "config.json").exists():
        return p
    raise FileNotFoundError(f"{path} holds no model: expected config.json + model.safetensors (a model folder "
                            "from training, `export` or `import-taming`) or a run folder with model/")
