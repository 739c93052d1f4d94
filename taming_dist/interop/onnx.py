"""The image tokenizer as two ONNX graphs for ONNX Runtime (no PyTorch at inference):
`encode.onnx` image (B, C, R, R) float32 in [-1, 1] -> codes (B, R/f, R/f) int64, and
`decode.onnx` codes (B, R/f, R/f) int64 -> image (B, C, R, R) float32; the batch is dynamic.

Each graph is a small module around our VQModel that keeps only the inference path (the quantizer's
forward also counts code usage for logging, which ONNX has no op for): encoder, quant_conv and the
kind's own index rule; the codebook lookup, post_quant_conv and decoder. Every quantizer kind is
exported, as the index rule is each kind's own code.

Exporter: torch.onnx.export's default in torch 2.14, the torch.export-based one (`dynamo=True`,
through onnxscript), with the batch declared as a `torch.export.Dim`. The TorchScript exporter
(`dynamo=False`) also writes graphs that ONNX Runtime runs to the same codes, and is faster on tiny
nets but not on a full-size one (vqgan-f16-16384 on 2 CPU cores: 60 s for its two graphs, against
46 s for the whole dynamo export, checks included; tools/bench_export.py); torch marks it deprecated
and to be removed, and its trace only warns (not fails) where a tensor turns
into a Python value. Opset 18, the dynamo exporter's own: asking it for 17 fails to down-convert
the encoder's asymmetric `Pad`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from taming_dist.config import VQModelConfig

OPSET = 18


class Encode(nn.Module):
    """image (B, C, R, R) -> codes (B, h, w) int64, the quantizer's eval-mode choice."""

    def __init__(self, vqgan):
        super().__init__()
        self.vqgan = vqgan

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from taming_dist.models import quantize as Q

        m, q = self.vqgan, self.vqgan.quantize
        z = m.quant_conv(m.encoder(image))  # (B, D, h, w)
        B, _, H, W = z.shape
        if isinstance(q, Q.GumbelQuantize):
            return q.proj(z).argmax(1)
        if isinstance(q, Q.L2Quantizer):
            h = F.normalize(q.in_proj(z).permute(0, 2, 3, 1).reshape(B * H * W, -1), dim=1)
            idx = q._assign(h, q.codebook())
        else:
            zf = z.permute(0, 2, 3, 1).reshape(B * H * W, -1)  # (BHW, D)
            if isinstance(q, Q.FiniteScalarQuantizer):
                idx = q.codes_to_indices(q.quantize(zf))
            elif isinstance(q, Q.LookupFreeQuantizer):
                idx = ((zf > 0).long() * q.bit_weights).sum(1)
            else:  # vq, ema
                idx = Q._nearest_l2(zf, q.codebook())
        return idx.reshape(B, H, W)


class Decode(nn.Module):
    """codes (B, h, w) int64 -> image (B, C, R, R)."""

    def __init__(self, vqgan):
        super().__init__()
        self.vqgan = vqgan

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(self.vqgan.quantize.get_codebook_entry(codes))


def build(cfg: VQModelConfig, state_dict: dict):
    """Our VQModel in eval mode with `state_dict` (the k-means offset folded; training buffers, if
    the config keeps them, at their folded values)."""
    from taming_dist.models.quantize import fold_code_offset
    from taming_dist.models.vqgan import VQModel

    model = VQModel(cfg)
    model.load_state_dict(fold_code_offset(state_dict), strict=True)
    return model.eval().float()


def save_onnx(folder, cfg: VQModelConfig, state_dict: dict) -> None:
    """Write `encode.onnx`, `decode.onnx` and `tokenizer.json` (shapes, value range) into `folder`,
    each graph checked by `onnx.checker`."""
    import onnx

    model = build(cfg, state_dict)
    dd = cfg.ddconfig
    side = dd.resolution // cfg.downsample_factor
    folder = Path(folder)
    folder.mkdir(parents=True)
    # batch 2 in the example inputs: torch.export specialises a size-1 dimension
    image = torch.zeros(2, dd.in_channels, dd.resolution, dd.resolution)
    codes = torch.zeros(2, side, side, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        for name, module, arg, inp, outp in (("encode", Encode(model), image, "image", "codes"),
                                             ("decode", Decode(model), codes, "codes", "image")):
            path = folder / f"{name}.onnx"
            torch.onnx.export(module.eval(), (arg,), str(path), input_names=[inp], output_names=[outp],
                              dynamic_shapes={"image" if name == "encode" else "codes": {0: batch}},
                              opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
            onnx.checker.check_model(str(path), full_check=True)
    meta = {"format": "taming_dist-onnx", "image": [dd.in_channels, dd.resolution, dd.resolution],
            "image_range": [-1.0, 1.0], "codes": [side, side], "codebook_size": cfg.quantizer.n_embed,
            "quantizer": cfg.quantizer.kind, "opset": OPSET,
            "graphs": {"encode.onnx": "image (B, C, R, R) float32 -> codes (B, h, w) int64",
                       "decode.onnx": "codes (B, h, w) int64 -> image (B, C, R, R) float32"}}
    (folder / "tokenizer.json").write_text(json.dumps(meta, indent=2))
