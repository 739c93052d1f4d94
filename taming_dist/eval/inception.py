"""InceptionV3 features for FID and Inception Score, with weights from a local file only.

Two weight files are understood, told apart by their classifier:
- torchvision's `inception_v3_google-0cc3c7bd.pth` (1000 classes, with AuxLogits), the network as
  torchvision builds it;
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (1008 classes, no AuxLogits), the weights of
  the TensorFlow graph FID was defined with. That graph pools differently in four places (below),
  so the blocks are patched as pytorch-fid does; with this file the FID matches the published
  numbers, with torchvision's it is typically somewhat lower and not comparable to papers.
Both expect input in [-1, 1], which is the convention of images here, at 299x299 (bilinear resize).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import InceptionA, InceptionC, InceptionE, inception_v3

TORCHVISION_FILE = "inception_v3_google-0cc3c7bd.pth"
TORCHVISION_URL = f"https://download.pytorch.org/models/{TORCHVISION_FILE}"
FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_FILE}"
FEATURE_DIM = 2048
SIZE = 299


class _TFPool:
    """The TensorFlow FID graph's pooling branch: average pooling that ignores the zero padding
    (count_include_pad=False) and, in the last block, max pooling (pytorch-fid's FIDInception*).

    torchvision's `_forward` is reused and only its pool branch recomputed, so the rest of each
    block stays torchvision's code; the discarded branch is one 1x1 convolution per block."""

    @staticmethod
    def tf_pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(self.tf_pool(x))
        return outputs


class TFInceptionA(_TFPool, InceptionA):
    pass


class TFInceptionC(_TFPool, InceptionC):
    pass


class TFInceptionE1(_TFPool, InceptionE):
    pass


class TFInceptionE2(_TFPool, InceptionE):
    @staticmethod
    def tf_pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _patch_tf_blocks(net: nn.Module) -> None:
    net.Mixed_5b = TFInceptionA(192, pool_features=32)
    net.Mixed_5c = TFInceptionA(256, pool_features=64)
    net.Mixed_5d = TFInceptionA(288, pool_features=64)
    net.Mixed_6b = TFInceptionC(768, channels_7x7=128)
    net.Mixed_6c = TFInceptionC(768, channels_7x7=160)
    net.Mixed_6d = TFInceptionC(768, channels_7x7=160)
    net.Mixed_6e = TFInceptionC(768, channels_7x7=192)
    net.Mixed_7b = TFInceptionE1(1280)
    net.Mixed_7c = TFInceptionE2(2048)


def _missing_message(path: str) -> str:
    return (f"Inception weights {path!r} not found. FID/IS need a local copy of torchvision's {TORCHVISION_FILE} "
            f"({TORCHVISION_URL}) or, for FID comparable to published numbers, pytorch-fid's {FID_FILE} "
            f"({FID_URL}); download one on a machine with network access and pass its path "
            f"(--inception-weights PATH)")


def load_inception_state(path: str) -> dict:
    """The state dict of a weight file (.pth loaded with weights_only=True, or .safetensors)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(_missing_message(path))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "fc.weight" not in sd:
        raise ValueError(f"{path} is not an InceptionV3 state dict (no fc.weight); expected {TORCHVISION_FILE} "
                         f"or {FID_FILE}")
    return sd


class InceptionFeatures(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> (pool3 features (B, 2048), logits (B, 1000 or 1008))."""

    _LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
               "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
               "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    def __init__(self, state_dict: dict):
        super().__init__()
        classes = int(state_dict["fc.weight"].shape[0])
        if classes not in (1000, 1008):
            raise ValueError(f"the Inception weights have {classes} classes; expected 1000 ({TORCHVISION_FILE}) "
                             f"or 1008 ({FID_FILE})")
        self.tf_graph = classes == 1008
        has_aux = any(k.startswith("AuxLogits.") for k in state_dict)
        net = inception_v3(weights=None, aux_logits=has_aux, init_weights=False, num_classes=classes)
        if self.tf_graph:
            _patch_tf_blocks(net)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
        # Only the pool3 features and the classifier are used.
        net.AuxLogits = None
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str) -> "InceptionFeatures":
        return cls(load_inception_state(path))

    def train(self, mode: bool = True) -> "InceptionFeatures":
        # Always eval: batch norm must use its running statistics.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        for name in self._LAYERS:
            x = getattr(self.net, name)(x)
        features = torch.flatten(x, 1)  # (B, 2048)
        return features, self.net.fc(features)
