"""LPIPS (Zhang et al. 2018) from the `lpips` package, built with no network access.

`lpips.LPIPS(net="vgg")` would download the VGG16 ImageNet backbone (docs/platform-notes.md),
so it is built empty (on the meta device) and given the package's bundled linear layers
(lpips/weights/v0.1/vgg.pth) and a backbone read from a local file (or a random one, for tests).
The module's keys (`scaling_layer.*`, `net.sliceK.N.*`, `lin0..lin4.model.1.weight`) are the
original taming LPIPS keys; the package adds the aliases `lins.<i>.*` of `lin<i>.*` (the same
modules).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from taming_dist.config import VQLossConfig

VGG16_FILE = "vgg16-397923af.pth"
# torchvision's vgg16().features index N -> the lpips slice K holding it (`net.sliceK.N.*`)
_SLICE_OF = {n: k for k, rng in enumerate([range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)], 1)
             for n in rng}
_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # features indices holding weights
_N_BACKBONE = 2 * len(_VGG16_CONVS)
# Where LPIPS weights sit in files of the taming layout: an LPIPS state dict, our `loss.safetensors`
# (import-taming --keep-loss), or an original VQGAN checkpoint's state_dict.
_LPIPS_PREFIXES = ("", "perceptual_loss.", "loss.perceptual_loss.")


def lpips_keys() -> list[str]:
    """The keys of the original taming LPIPS (the package's `lins.<i>` aliases excluded)."""
    net = [f"net.slice{_SLICE_OF[n]}.{n}.{kind}" for n in _VGG16_CONVS for kind in ("weight", "bias")]
    return ["scaling_layer.shift", "scaling_layer.scale", *net, *(f"lin{i}.model.1.weight" for i in range(5))]


def vgg16_candidates(cfg: VQLossConfig) -> list[Path]:
    if cfg.lpips_vgg_path:
        return [Path(cfg.lpips_vgg_path)]
    return [Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE]


def map_vgg16_features(state: dict) -> dict:
    """torchvision `features.N.{weight,bias}` -> lpips `net.sliceK.N.{weight,bias}`."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) != 3 or parts[0] != "features" or not parts[1].isdigit():
            continue
        idx = int(parts[1])
        if idx in _SLICE_OF:
            out[f"net.slice{_SLICE_OF[idx]}.{idx}.{parts[2]}"] = v
    return out


def lpips_weights_from(obj, path) -> dict:
    """The LPIPS tensors in a loaded file: a torchvision VGG16 state dict (backbone only), or the
    taming layout (backbone and `lin<i>` layers) at any of `_LPIPS_PREFIXES`, also inside a
    Lightning checkpoint's `state_dict`."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    mapped = map_vgg16_features(state)
    if not mapped:
        for prefix in _LPIPS_PREFIXES:
            if f"{prefix}net.slice1.0.weight" in state:
                mapped = {k[len(prefix):]: v for k, v in state.items()
                          if k.startswith(prefix) and k[len(prefix):].startswith(("net.slice", "lin"))}
                break
    n = sum(k.startswith("net.slice") for k in mapped)
    if n != _N_BACKBONE:
        raise ValueError(f"{path} holds no VGG16 backbone: found {n} of its {_N_BACKBONE} conv tensors (expected "
                         f"torchvision's `features.N.*` keys as in {VGG16_FILE}, or taming's `net.sliceK.N.*`)")
    return mapped


def _package_linear_layers() -> dict:
    """The lpips package's bundled linear layers (`lin<i>.model.1.weight`, lpips/weights/v0.1/vgg.pth)."""
    import lpips

    from taming_dist.weights.safe_load import safe_load

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    # copied into new tensors: under the FakeTensorMode of FLOP counting (perf.py) torch.load gives
    # meta tensors, which must not become parameters; a new tensor is a fake one there
    layers = safe_load(path)
    return {k: torch.empty(v.shape).copy_(v) for k, v in layers.items()}


def _random_backbone(model: nn.Module) -> dict:
    """A VGG16 backbone initialised as torchvision initialises one (Kaiming normal, fan-out, zero
    biases), for `loss.lpips_backbone=random`: keys `net.sliceK.N.*` of `model`'s convolutions."""
    out = {}
    for name, m in model.net.named_modules():
        if isinstance(m, nn.Conv2d):
            out[f"net.{name}.weight"] = nn.init.kaiming_normal_(torch.empty(m.weight.shape), mode="fan_out",
                                                                nonlinearity="relu")
            out[f"net.{name}.bias"] = torch.zeros(m.bias.shape)
    return out


def build_lpips(cfg: VQLossConfig) -> nn.Module:
    """A frozen `lpips.LPIPS(net="vgg")` in eval mode: call it on images in [-1, 1]; it returns the
    per-image distance (B, 1, 1, 1)."""
    import lpips

    from taming_dist.weights.safe_load import safe_load

    weights, path = None, None
    if cfg.lpips_backbone != "random":  # read (and check) the file before building
        candidates = vgg16_candidates(cfg)
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise FileNotFoundError(
                f"LPIPS needs the VGG16 ImageNet weights and there is no network to download them; looked for "
                f"{', '.join(map(str, candidates))}. Copy torchvision's {VGG16_FILE} there (or point "
                "loss.lpips_vgg_path at it, or at an original taming VQGAN checkpoint / the loss.safetensors of "
                "`import-taming --keep-loss`, which hold the same backbone), or set loss.lpips_backbone=random "
                "for tests (useless for training quality)"
            )
        weights = lpips_weights_from(safe_load(path), path)
    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `vgg16(pretrained=False)`; only that call is muted.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        # Built on the meta device, every tensor assigned below: lpips constructs torchvision's whole
        # VGG16 and keeps only its convolutions, and initialising the 124M-parameter classifier it
        # drops took 2.7 s on each rank of every run with LPIPS (2-core CPU machine).
        with torch.device("meta"):
            model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    state = {**_package_linear_layers(), **(weights or _random_backbone(model))}
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise ValueError(f"{path}: keys that VGG16-LPIPS does not have: {unexpected[:5]}")
    # the scaling layer's two constants are plain CPU tensors (lpips makes them with torch.Tensor)
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")})
    state.update({f"lins.{i}.model.1.weight": state[f"lin{i}.model.1.weight"] for i in range(5)})  # aliases
    try:
        model.load_state_dict(state, strict=True, assign=True)  # strict: no tensor is left on meta
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: the LPIPS weights do not fit VGG16-LPIPS: {e}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
