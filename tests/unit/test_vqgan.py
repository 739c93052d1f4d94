import pytest
import torch

import taming_dist.models.blocks as blocks
from taming_dist.config import load_config
from taming_dist.models.vqgan import VQModel


def tiny(*overrides: str) -> VQModel:
    torch.manual_seed(0)
    return VQModel(load_config("vqgan-tiny", list(overrides)).vqgan)


@pytest.mark.parametrize("kind", ["vq", "ema", "gumbel", "l2"])
def test_forward_shapes_and_decode_code(kind):
    model = tiny(f"vqgan.quantizer.kind={kind}")
    x = torch.randn(2, 3, 32, 32)
    xrec, qloss, info = model(x)
    assert xrec.shape == x.shape and qloss.dim() == 0
    assert info["indices"].shape == (2, 8, 8) and info["indices"].dtype == torch.long
    assert 1.0 <= info["perplexity"].item() <= 128 and 0 < info["usage"].item() <= 1
    model.eval()
    with torch.no_grad():
        quant, _, info = model.encode(x)
        want = model.decode(quant)
        idx = info["indices"]
        assert torch.equal(model.encode_to_indices(x), idx)
        assert torch.allclose(model.decode_code(idx), want, atol=1e-5)
        assert torch.allclose(model.decode_code(idx.flatten(1)), want, atol=1e-5)
        assert torch.allclose(model.decode_code(idx.flatten(1), shape=(8, 8)), want, atol=1e-5)


def test_downsample_factor():
    model = tiny()
    assert model.downsample_factor == 4
    assert model.encode_to_indices(torch.randn(1, 3, 32, 32)).shape == (1, 8, 8)
    assert model.encode_to_indices(torch.randn(1, 3, 48, 16)).shape == (1, 12, 4)  # any multiple of f


def test_decode_code_rejects_bad_shapes():
    model = tiny()
    with pytest.raises(ValueError, match="square"):
        model.decode_code(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model.decode_code(torch.zeros(1, 10, dtype=torch.long), shape=(3, 3))


def test_get_last_layer():
    model = tiny()
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_grad_checkpointing_same_outputs_and_grads(monkeypatch):
    model = tiny("vqgan.ddconfig.dropout=0.1")
    x = torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict())

    def run():
        torch.manual_seed(1)  # dropout masks: checkpoint must replay the same ones
        model.zero_grad()
        xrec, qloss, _ = model(x)
        (xrec.square().mean() + qloss).backward()
        return xrec.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_out, ref_grads = run()
    calls = []
    real = blocks.checkpoint
    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    model.grad_checkpointing = True
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing
    out, grads = run()
    n_blocks = sum(isinstance(m, (blocks.ResnetBlock, blocks.AttnBlock)) for m in model.modules())
    assert len(calls) == n_blocks and all(k == {"use_reentrant": False} for k in calls)
    assert list(model.state_dict()) == keys
    assert torch.allclose(out, ref_out, atol=1e-6)
    for n, g in ref_grads.items():
        assert torch.allclose(grads[n], g, atol=1e-6), n
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(x)
    assert not calls, "no checkpointing outside training"


def test_double_z_rejected():
    with pytest.raises(ValueError, match="double_z"):
        tiny("vqgan.ddconfig.double_z=true")


def test_attention_matches_original_formulation():
    """SDPA == the original's bmm softmax(q.k * C^-0.5) v."""
    torch.manual_seed(0)
    attn = blocks.AttnBlock(32)
    x = torch.randn(2, 32, 4, 5)
    h = attn.norm(x)
    q, k, v = attn.q(h), attn.k(h), attn.v(h)
    b, c, hh, ww = q.shape
    w_ = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
    w_ = torch.softmax(w_, dim=2)
    h_ = torch.bmm(v.reshape(b, c, -1), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    assert torch.allclose(attn(x), x + attn.proj_out(h_), atol=1e-5)


def test_downsample_pads_right_and_bottom():
    d = blocks.Downsample(1)
    with torch.no_grad():
        d.conv.weight.zero_()
        d.conv.weight[0, 0, 2, 2] = 1.0  # picks the bottom-right tap of each 3x3 window
        d.conv.bias.zero_()
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1
    # windows start at 0 and 2; bottom-right taps are (2,2), (2,4->pad), (4->pad, 2), (4, 4)
    assert d(x).flatten().tolist() == [11.0, 0.0, 0.0, 0.0]
