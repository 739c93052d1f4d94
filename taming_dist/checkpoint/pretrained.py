"""Build a model from a model folder (the folder format itself lives in taming_dist/weights/folder.py)."""
from __future__ import annotations

from taming_dist.weights.folder import load_model_folder, save_model_folder  # noqa: F401 (re-exported for callers)


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
