"""GPT: original key layout, mask-free loading, numerical parity with minGPT's explicit-mask attention,
causality, KV cache, cross-attention, activation checkpointing."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from taming_dist.config.schema import GPTConfig
from taming_dist.models.gpt import GPT

LAYOUT = Path(__file__).resolve().parents[1] / "data" / "layouts" / "net2net_drin.txt"
_LINE = re.compile(r"^(\S+)\s+\[([\d,\s]*)\]\s*$")


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def minigpt_reference(gpt: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The original minGPT forward with its stored-style mask (tril + unmasked top-left block) and
    explicit softmax attention, run on `gpt`'s weights."""
    cfg = gpt.config
    B, T = idx.shape
    mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
    mask[: cfg.n_unmasked, : cfg.n_unmasked] = 1
    x = gpt.tok_emb(idx) + gpt.pos_emb[:, :T]
    for blk in gpt.blocks:
        a, h = blk.attn, blk.ln1(x)
        hs = cfg.n_embd // cfg.n_head
        k, q, v = (m(h).view(B, T, cfg.n_head, hs).transpose(1, 2) for m in (a.key, a.query, a.value))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = att.masked_fill(mask[:T, :T] == 0, float("-inf")).softmax(dim=-1)
        x = x + a.proj((att @ v).transpose(1, 2).reshape(B, T, cfg.n_embd))
        x = x + blk.mlp(blk.ln2(x))
    return gpt.head(gpt.ln_f(x))


def test_keys_and_shapes_match_net2net_layout():
    want = {}
    for line in LAYOUT.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m and m.group(1).startswith("transformer."):
            want[m.group(1)[len("transformer."):]] = tuple(int(d) for d in m.group(2).split(",") if d.strip())
    masks = [k for k in want if k.endswith(".attn.mask")]
    assert len(masks) == 24 and len(want) > 400
    with torch.device("meta"):
        gpt = GPT(GPTConfig(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024))
    got = {k: tuple(v.shape) for k, v in gpt.state_dict().items()}
    assert got == {k: v for k, v in want.items() if k not in masks}
    assert gpt.num_params() == sum(math.prod(s) for k, s in want.items() if k not in masks)


def test_state_dict_with_stored_masks_loads_strict():
    src, dst = tiny(), tiny(n_layer=2)
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    sd = src.state_dict()
    for i in range(src.config.n_layer):
        sd[f"blocks.{i}.attn.mask"] = torch.tril(torch.ones(1, 1, 24, 24))
    dst.load_state_dict(sd, strict=True)
    assert "blocks.0.attn.mask" in sd, "loading must not mutate the caller's dict"
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    sd["blocks.0.attn.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="bogus"):
        dst.load_state_dict(sd, strict=True)


def test_init_like_mingpt():
    gpt = tiny(n_embd=64, n_head=4)
    assert torch.count_nonzero(gpt.pos_emb) == 0
    assert abs(gpt.head.weight.std().item() - 0.02) < 0.003
    assert torch.count_nonzero(gpt.blocks[0].attn.key.bias) == 0
    assert torch.equal(gpt.ln_f.weight, torch.ones(64)) and torch.count_nonzero(gpt.ln_f.bias) == 0


@pytest.mark.parametrize("n_unmasked", [0, 3])
def test_matches_mingpt_reference(n_unmasked):
    gpt = tiny(n_unmasked=n_unmasked)
    with torch.no_grad():
        gpt.pos_emb.normal_(std=0.5)  # non-zero so positions matter
    idx = torch.randint(0, 40, (3, 10))
    with torch.no_grad():
        assert torch.allclose(gpt(idx), minigpt_reference(gpt, idx), atol=1e-5)


def test_causality():
    gpt = tiny()
    idx = torch.randint(0, 40, (2, 12))
    t = 6
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 40
    with torch.no_grad():
        a, b = gpt(idx), gpt(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_n_unmasked_positions_see_each_other():
    gpt = tiny(n_unmasked=3)
    idx = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        base = gpt(idx)
        inside, outside = idx.clone(), idx.clone()
        inside[0, 2] = (inside[0, 2] + 1) % 40
        outside[0, 3] = (outside[0, 3] + 1) % 40
        a, b = gpt(inside), gpt(outside)
    assert not torch.allclose(a[0, 0], base[0, 0])  # position 0 sees position 2
    assert torch.equal(b[0, :3], base[0, :3])  # but not position 3


def _chunks(gpt, idx, sizes, context=None):
    cache = gpt.make_cache(idx.shape[1])
    out, pos = [], 0
    for n in sizes:
        out.append(gpt(idx[:, pos:pos + n], context=context if pos == 0 else None, cache=cache))
        pos += n
    assert cache.length == idx.shape[1]
    return torch.cat(out, dim=1)


def _model_and_inputs(cross: bool, n_unmasked: int, length: int):
    """A tiny GPT (with cross-attention and an unmasked prefix when asked, non-trivial position
    embeddings), token ids (2, length) and the context (or None)."""
    gpt = tiny(cross_attention=cross, context_dim=8 if cross else 0, n_unmasked=n_unmasked)
    with torch.no_grad():
        gpt.pos_emb.normal_(std=0.5)
    idx = torch.randint(0, 40, (2, length))
    return gpt, idx, torch.randn(2, 5, 8) if cross else None


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("n_unmasked", [0, 4])
def test_kv_cache_matches_full_forward(cross, n_unmasked):
    gpt, idx, context = _model_and_inputs(cross, n_unmasked, 14)
    with torch.no_grad():
        full = gpt(idx, context=context)
        for sizes in ([4, 1, 1, 1, 7], [14], [5, 3, 1, 5]):
            assert torch.allclose(_chunks(gpt, idx, sizes, context), full, atol=1e-5), sizes


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("n_unmasked", [0, 4])
def test_decode_step_matches_cached_forward(cross, n_unmasked):
    gpt, idx, context = _model_and_inputs(cross, n_unmasked, 12)
    with torch.no_grad():
        ref = _chunks(gpt, idx, [5] + [1] * 7, context)[:, 4:]  # logits after each fed token from 4 on
        cache = gpt.make_cache(12)
        out = [gpt(idx[:, :5], context=context, cache=cache)[:, -1]]
        stale = cache.layers[0].k.clone()
        for pos in range(5, 12):
            out.append(gpt.decode_step(idx[:, pos:pos + 1], torch.tensor([pos]), cache))
    assert torch.allclose(torch.stack(out, dim=1), ref, atol=1e-5)
    assert cache.length == 5  # decode_step leaves the position to its caller
    assert torch.equal(cache.layers[0].k[:, :, :5], stale[:, :, :5])  # writes land at `pos` only


def test_kv_cache_limits():
    gpt = tiny(n_unmasked=4)
    cache = gpt.make_cache(6)
    with pytest.raises(ValueError, match="bidirectional"):
        gpt(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    gpt(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceed the cache length 6"):
        gpt(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size 24"):
        gpt(torch.zeros(1, 25, dtype=torch.long))


def test_cross_attention_uses_context():
    gpt = tiny(cross_attention=True, context_dim=8)
    assert "blocks.0.cross_attn.key.weight" in gpt.state_dict() and "blocks.1.ln_cross.weight" in gpt.state_dict()
    assert gpt.blocks[0].cross_attn.key.weight.shape == (16, 8)
    idx = torch.randint(0, 40, (2, 6))
    ctx = torch.randn(2, 5, 8)
    with torch.no_grad():
        a, b = gpt(idx, context=ctx), gpt(idx, context=ctx + 1.0)
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="context"):
        gpt(idx)
    with pytest.raises(ValueError, match="cross_attention is false"):
        tiny()(idx, context=ctx)


def test_grad_checkpointing_same_loss_and_grads():
    gpt = tiny(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1, cross_attention=True, context_dim=8).train()
    idx, tgt = torch.randint(0, 40, (2, 10)), torch.randint(0, 40, (2, 10))
    ctx = torch.randn(2, 3, 8)

    def run():
        gpt.zero_grad()
        torch.manual_seed(1)  # same dropout masks; checkpointing replays the RNG state
        loss = F.cross_entropy(gpt(idx, context=ctx).flatten(0, 1), tgt.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in gpt.named_parameters()}

    loss0, g0 = run()
    gpt.grad_checkpointing = True
    loss1, g1 = run()
    assert torch.equal(loss0, loss1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n


def test_flops_per_token():
    gpt = tiny()
    cfg = gpt.config
    n = gpt.num_params(non_embedding=True)
    assert n == gpt.num_params() - 40 * 16 - 24 * 16
    assert gpt.flops_per_token() == 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert gpt.flops_per_token(seq_len=10) == 6 * n + 12 * 2 * 16 * 10
