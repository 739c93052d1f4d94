"""Load checkpoint files without running code from them.

safetensors files are plain tensors. Everything else goes through `torch.load(weights_only=True)`,
whose unpickler only builds tensors and plain containers. PyTorch-Lightning checkpoints (the
original taming releases) also pickle metadata classes (Lightning's AttributeDict, omegaconf
configs, callback states); those names — and only those namespaces — are mapped to inert stand-ins
that record their state, so the file loads without Lightning installed. Any other global (os.system,
builtins.eval, subprocess, ...) is refused: the file is not loaded and nothing in it runs.
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

# Namespaces whose pickled classes are metadata in Lightning checkpoints, never needed for weights.
METADATA_NAMESPACES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "argparse.Namespace",
                       "pathlib.")
# torch's messages: "Unsupported global: GLOBAL a.b.C ..." or "unsupported GLOBAL posix.system whose module ..."
_UNSUPPORTED = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")
_stand_ins: dict[str, type] = {}


class StandIn(dict):
    """Inert stand-in for a metadata class: a dict of whatever state the pickle held."""

    qualified_name = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()
        if args:
            self["args"] = args
        self.update(kwargs)

    def __setstate__(self, state):
        self["state"] = state

    def __repr__(self):
        return f"<stand-in for {self.qualified_name}: {dict.__repr__(self)}>"


def _stand_in(name: str) -> type:
    if name not in _stand_ins:
        module, _, qual = name.rpartition(".")
        cls = type(qual, (StandIn,), {"qualified_name": name})
        cls.__module__ = module
        _stand_ins[name] = cls
    return _stand_ins[name]


class _RestrictedPickle:
    """A `pickle_module` for torch.load whose Unpickler resolves only torch's weights-only
    allow-list plus stand-ins for metadata namespaces (the "Restricting Globals" recipe of the
    pickle docs): REDUCE/BUILD can only reach those, so nothing else in the file can run."""

    class Unpickler(pickle.Unpickler):
        stand_ins: list[str] = []

        def find_class(self, module, name):
            from torch._weights_only_unpickler import _get_allowed_globals

            full = f"{module}.{name}"
            allowed = _get_allowed_globals()
            if full in allowed:
                return allowed[full]
            if full.startswith(METADATA_NAMESPACES):
                type(self).stand_ins.append(full)
                return _stand_in(full)
            raise ValueError(full)


def safe_load(path: str | Path, map_location="cpu"):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal goes through the restricted unpickler below
        if not _UNSUPPORTED.search(str(e)) and "SETITEM" not in str(e) and "BUILD" not in str(e):
            raise ValueError(f"{path} could not be loaded with weights_only=True: {str(e)[-300:]}") from None
    _RestrictedPickle.Unpickler.stand_ins = []
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False, pickle_module=_RestrictedPickle)
    except ValueError as e:
        raise ValueError(
            f"{path} contains pickled code ({e}) that weights_only loading refuses; it was not executed. "
            "If you trust the file, convert it to safetensors in a trusted environment first"
        ) from None
    names = sorted(set(_RestrictedPickle.Unpickler.stand_ins))
    warnings.warn(f"{path}: metadata classes read as inert stand-ins (not needed for weights): {', '.join(names)}",
                  stacklevel=2)
    return obj
