"""`init_from`: start a run from weights elsewhere (a model folder, a consolidated state dict file,
or another run folder's exported model). Mismatched keys are listed, never silently dropped."""
from __future__ import annotations

import torch.nn as nn

from taming_dist.logging import print0
from taming_dist.weights.folder import read_weights


def load_init_weights(path: str, modules: dict[str, nn.Module], verbose: bool = True) -> None:
    """Load matching keys into each module. A key prefixed `<name>.` (e.g. `generator.` or the
    original's `loss.discriminator.`) goes to that module; plain keys go to the first module."""
    sd = read_weights(path)
    names = list(modules)
    for i, (name, module) in enumerate(modules.items()):
        prefixes = [f"{name}.", f"loss.{name}."] if i else [f"{name}.", ""]
        own = {}
        for k, v in sd.items():
            for pre in prefixes:
                if pre and k.startswith(pre):
                    own[k[len(pre):]] = v
                    break
                if not pre and not any(k.startswith(f"{m}.") or k.startswith(f"loss.{m}.") for m in names[1:]) \
                        and not k.startswith("loss."):
                    own[k] = v
                    break
        if not own and i:
            if verbose:
                print0(f"init_from {path}: no weights for {name}; it starts from its initialisation")
            continue
        result = module.load_state_dict(own, strict=False)
        if verbose and (result.missing_keys or result.unexpected_keys):
            print0(f"init_from {path} -> {name}: missing {sorted(result.missing_keys)}; "
                   f"unexpected {sorted(result.unexpected_keys)}")
        elif verbose:
            print0(f"init_from {path} -> {name}: all {len(own)} tensors loaded")


