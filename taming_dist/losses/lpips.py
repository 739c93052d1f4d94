"""LPIPS (Zhang et al. 2018) from the `lpips` package, built with no network access.

The package's linear layers ship inside it (lpips/weights/v0.1/vgg.pth); the VGG16 backbone is
read from a local torchvision weights file, because `lpips.LPIPS(net="vgg")` would otherwise
download it (shared/notes/platform-facts.md). The module's keys (`scaling_layer.*`,
`net.sliceK.N.*`, `lin0..lin4.model.1.weight`) are the original taming LPIPS keys.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from taming_dist.config import VQLossConfig

VGG16_FILE = "vgg16-397923af.pth"
# torchvision vgg16().features index -> lpips slice holding it
_SLICES = [(1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30))]


def vgg16_candidates(cfg: VQLossConfig) -> list[Path]:
    if cfg.lpips_vgg_path:
        return [Path(cfg.lpips_vgg_path)]
    return [Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE]


def map_vgg16_features(state: dict) -> dict:
    """torchvision `features.N.{weight,bias}` -> lpips `net.sliceK.N.{weight,bias}`."""
    out = {}
    for k, v in state.items():
        if not k.startswith("features."):
            continue
        _, idx, kind = k.split(".")
        for s, rng in _SLICES:
            if int(idx) in rng:
                out[f"net.slice{s}.{idx}.{kind}"] = v
    return out


def build_lpips(cfg: VQLossConfig) -> nn.Module:
    import lpips

    from taming_dist.checkpoint.safe_load import safe_load

    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `vgg16(pretrained=False)`; only that call is muted.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if cfg.lpips_backbone != "random":
        path = next((p for p in vgg16_candidates(cfg) if p.exists()), None)
        if path is None:
            tried = ", ".join(str(p) for p in vgg16_candidates(cfg))
            raise FileNotFoundError(
                f"LPIPS needs the VGG16 ImageNet weights ({VGG16_FILE}) and there is no network to download them; "
                f"looked for: {tried}. Copy torchvision's {VGG16_FILE} there (or set loss.lpips_vgg_path), "
                "or use loss.lpips_backbone=random for tests (useless for training quality)"
            )
        mapped = map_vgg16_features(safe_load(str(path)))
        if len(mapped) != 26:
            raise ValueError(f"{path} is not a torchvision VGG16 state dict: found {len(mapped)} of its 26 "
                             "`features.*` conv tensors")
        missing = model.load_state_dict(mapped, strict=False).unexpected_keys
        if missing:
            raise ValueError(f"unexpected VGG16 keys in {path}: {missing[:5]}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips_state_dict(model: nn.Module) -> dict:
    """The original taming key layout: the package's `lins.<i>` aliases of `lin<i>` dropped."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("lins.")}


__all__ = ["build_lpips", "lpips_state_dict", "map_vgg16_features", "VGG16_FILE"]
