"""Single-device model code: VQModel (the VQGAN tokenizer), Transformer (GPT over its codes), and
the inference helpers generate_image and get_condition (pipeline.py); TextContext, the condition of
a text-conditioned model (conditions.py).

Nothing here imports torch.distributed, deepspeed or the engines (tests/unit/test_layering.py).
Exports resolve lazily so that importing one submodule does not build the others.
"""
import importlib

_EXPORTS = {"VQModel": "vqgan", "Transformer": "transformer", "GPT": "gpt", "NLayerDiscriminator": "discriminator",
            "generate_image": "pipeline", "get_condition": "pipeline", "TextContext": "conditions"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"taming_dist.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'taming_dist.models' has no attribute {name!r}")


__all__ = list(_EXPORTS)
