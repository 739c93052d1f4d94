"""Filtering, seeded sampling, the cached vs uncached loop, guidance."""
import pytest
import torch

from taming_dist.config.schema import GPTConfig
from taming_dist.models.gpt import GPT
from taming_dist.models.sampling import generate, guided_logits, sample_next, top_k_filter, top_p_filter


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, block_size=20, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    gpt = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # sharper, position-dependent distributions than the 0.02 init gives
        gpt.head.weight.normal_(std=1.0)
        gpt.pos_emb.normal_(std=0.5)
    return gpt


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(logits, 10), logits)
    with pytest.raises(ValueError, match="top_k 0"):
        top_k_filter(logits, 0)


@pytest.mark.parametrize("p,kept", [(0.4, 1), (0.75, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_minimal_nucleus(p, kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    out = top_p_filter(probs.log()[None], p)[0]
    keep = torch.isfinite(out)
    assert int(keep.sum()) == kept
    order = probs.argsort(descending=True)
    assert keep[order[:kept]].all()  # the most likely ones
    assert torch.equal(out[keep], probs.log()[keep])


def test_top_k_one_is_greedy():
    logits = torch.randn(6, 32)
    for seed in range(3):
        assert torch.equal(sample_next(logits, gen(seed), top_k=1), logits.argmax(-1))


def test_sample_next_seeded_and_temperature():
    logits = torch.randn(4, 32)
    a, b = sample_next(logits, gen(3)), sample_next(logits, gen(3))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (4,)
    draws = torch.stack([sample_next(logits, gen(s)) for s in range(20)])
    assert len(set(draws[:, 0].tolist())) > 1  # actually random across seeds
    cold = torch.stack([sample_next(logits, gen(s), temperature=1e-4) for s in range(5)])
    assert (cold == logits.argmax(-1)).all()
    with pytest.raises(ValueError, match="temperature 0"):
        sample_next(logits, gen(0), temperature=0)


def test_guided_logits():
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guided_logits(cond, uncond, 3.0), torch.tensor([4.0, -2.0]))
    assert torch.equal(guided_logits(cond, uncond, 0.0), uncond)


def test_generate_reproducible_and_cache_equals_uncached():
    gpt = tiny()
    prefix = torch.randint(0, 32, (3, 2))
    kw = dict(top_k=20, temperature=1.0)
    a = generate(gpt, prefix, 15, generator=gen(0), **kw)
    assert a.shape == (3, 15) and a.dtype == torch.long
    assert torch.equal(a, generate(gpt, prefix, 15, generator=gen(0), **kw))
    assert torch.equal(a, generate(gpt, prefix, 15, generator=gen(0), use_cache=False, **kw))
    assert not torch.equal(a, generate(gpt, prefix, 15, generator=gen(1), **kw))


def test_top_k_one_generate_is_greedy_decoding():
    gpt = tiny()
    seq = torch.randint(0, 32, (2, 1))
    out = generate(gpt, seq, 6, generator=gen(0), top_k=1)
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, gpt(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, 1:])


def test_guidance_cached_equals_uncached_with_context():
    gpt = tiny(cross_attention=True, context_dim=4)
    prefix, null = torch.full((2, 1), 3), torch.full((2, 1), 5)
    ctx = torch.randn(2, 3, 4)
    kw = dict(context=ctx, null_prefix=null, cfg_scale=2.5, top_p=0.9)
    a = generate(gpt, prefix, 10, generator=gen(0), **kw)
    assert torch.equal(a, generate(gpt, prefix, 10, generator=gen(0), use_cache=False, **kw))
    # scale 0 samples the null condition alone (prefix `null`, zero context)
    zero = generate(gpt, prefix, 10, generator=gen(0), context=ctx, null_prefix=null, cfg_scale=0.0)
    assert torch.equal(zero, generate(gpt, null, 10, generator=gen(0), context=torch.zeros_like(ctx)))


def test_generate_length_checks():
    gpt = tiny()
    with pytest.raises(ValueError, match="block_size >= 21"):
        generate(gpt, torch.zeros(1, 2, dtype=torch.long), 20)
    generate(gpt, torch.zeros(1, 2, dtype=torch.long), 19)  # the last token is never fed back
    with pytest.raises(ValueError, match="null_prefix"):
        generate(gpt, torch.zeros(1, 1, dtype=torch.long), 3, cfg_scale=2.0)
