"""`export --format onnx`: the tokenizer as encode.onnx / decode.onnx, run by ONNX Runtime on CPU with a
dynamic batch against ours; and the staging every export goes through (a failed export leaves no
folder behind, a previous export stays whole)."""
import json

import numpy as np
import pytest
import torch

from taming_dist.cli import main
from taming_dist.config import QuantizerConfig
from taming_dist.models.vqgan import VQModel
from tests.unit.interop_util import (
    near_tie_codebook,
    photo_folder,
    photographs,
    save_vqgan,
    synthetic_images,
    trained_vqgan,
    vq_config,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def sessions(folder):
    opts = {"providers": ["CPUExecutionProvider"]}
    return (ort.InferenceSession(str(folder / "encode.onnx"), **opts),
            ort.InferenceSession(str(folder / "decode.onnx"), **opts))


def check_against_ours(model, folder, x):
    enc, dec = sessions(folder)
    with torch.no_grad():
        ours = model.encode_to_indices(x)
        image = model.decode_code(ours)
    codes = enc.run(None, {"image": x.numpy()})[0]
    assert codes.dtype == np.int64 and codes.shape == tuple(ours.shape)
    assert np.array_equal(codes, ours.numpy())
    decoded = dec.run(None, {"codes": codes})[0]
    np.testing.assert_allclose(decoded, image.numpy(), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_vq_tokenizer_runs_in_onnx_runtime_with_any_batch(tmp_path):
    """Two dynamo exports (~40 s on 2 cores). Batches 1, 5 and 12 through graphs traced at 2; photographs
    too when scikit-image's data folder is there; near-tie latents with gaps down to 1e-4 of |z|^2.
    (ONNX Runtime's kernels round differently from torch's: its latents differ by up to ~1e-4 of their
    largest value here, so at a gap of 1e-5 about 5% of such ties flip, measured.)"""
    model = trained_vqgan(vq_config("vq", n_embed=256))
    save_vqgan(tmp_path / "ours", model)
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    for name in ("encode.onnx", "decode.onnx"):
        onnx.checker.check_model(str(tmp_path / "onnx" / name), full_check=True)
        graph = onnx.load(str(tmp_path / "onnx" / name)).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch
    meta = json.loads((tmp_path / "onnx" / "tokenizer.json").read_text())
    assert meta["codes"] == [8, 8] and meta["codebook_size"] == 256
    x = synthetic_images(12)
    for batch in (1, 5, 12):
        check_against_ours(model, tmp_path / "onnx", x[:batch])
    if photo_folder() is not None:
        check_against_ours(model, tmp_path / "onnx", photographs(32, crops=2))
    x = synthetic_images(2)
    nearer, _ = near_tie_codebook(model, x, [1e-2, 1e-3, 1e-4])
    save_vqgan(tmp_path / "tie", model)
    assert main(["export", str(tmp_path / "tie"), str(tmp_path / "tie-onnx"), "--format", "onnx"]) == 0
    codes = sessions(tmp_path / "tie-onnx")[0].run(None, {"image": x.numpy()})[0]
    assert np.array_equal(codes, nearer.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gumbel", "l2", "fsq", "lfq"])
def test_other_quantizers_export_too(tmp_path, kind):
    """What differs from the test above is the quantizer: the net around it is the smallest (two
    levels, no attention), which halves the graphs to trace."""
    cfg = vq_config("vq", training_buffers=False, ch_mult=[1, 2], attn_resolutions=[])
    cfg.quantizer = {"gumbel": QuantizerConfig(kind="gumbel", n_embed=128, embed_dim=16),
                     "l2": QuantizerConfig(kind="l2", n_embed=128, embed_dim=16),
                     "fsq": QuantizerConfig(kind="fsq", levels=[8, 4, 4], n_embed=128, embed_dim=3),
                     "lfq": QuantizerConfig(kind="lfq", codebook_dim=7, n_embed=128, embed_dim=7)}[kind]
    model = trained_vqgan(cfg)
    save_vqgan(tmp_path / "ours", model)
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    check_against_ours(model, tmp_path / "onnx", synthetic_images(4))


def test_a_failed_export_leaves_no_folder_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """The decode graph fails after encode.onnx is written: nothing of the new export is left, and an
    earlier export at the same place is untouched."""
    import taming_dist.interop.onnx as onnx_export

    model = VQModel(vq_config("vq", training_buffers=False))
    save_vqgan(tmp_path / "ours", model)
    real = torch.onnx.export
    written = []

    def export_then_fail(module, args, path, **kwargs):
        if isinstance(module, onnx_export.Decode):
            raise RuntimeError("disk full (simulated)")
        with open(path, "wb") as f:  # stands in for the real graph: only the staging is tested here
            f.write(b"partial")
        written.append(path)

    monkeypatch.setattr(torch.onnx, "export", export_then_fail)
    monkeypatch.setattr(onnx.checker, "check_model", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["export", str(tmp_path / "ours"), str(tmp_path / "out"), "--format", "onnx"])
    assert written and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]
    # over an existing export (here our own format), a failure leaves the old folder as it was
    monkeypatch.setattr(torch.onnx, "export", real)
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(torch.onnx, "export", export_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["export", str(tmp_path / "ours"), str(tmp_path / "out"), "--format", "onnx"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]
