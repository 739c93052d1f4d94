"""Filtering, seeded sampling, the cached vs uncached loop, guidance, the fixed-shape (compiled) step."""
import time

import pytest
import torch

from taming_dist.config import load_config
from taming_dist.config.schema import GPTConfig
from taming_dist.models import sampling
from taming_dist.models.gpt import GPT
from taming_dist.models.sampling import generate, guided_logits, sample_next, top_k_filter, top_p_filter
from taming_dist.models.transformer import Transformer


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



@pytest.mark.parametrize("kw", [{}, dict(cfg_scale=2.0), dict(top_p=0.95, temperature=1.5)])
def test_vocab_limit_never_samples_past_the_codebook(kw):
    """A GPT whose vocabulary (32) is larger than the codebook (10): with vocab_limit, no sampled
    token is >= 10, also under guidance (masked after it, so no nan) and top-p; without it, the
    same draws do emit such tokens (the check is not vacuous)."""
    gpt = tiny()
    with torch.no_grad():  # make the tokens past the codebook the likeliest ones
        gpt.head.weight[10:] += 3.0 * gpt.head.weight[10:].sign()
    prefix = torch.randint(0, 10, (8, 1))
    null = torch.full((8, 1), 11) if "cfg_scale" in kw else None
    free = generate(gpt, prefix, 15, generator=gen(0), null_prefix=null, **kw)
    assert (free >= 10).any()
    limited = generate(gpt, prefix, 15, generator=gen(0), null_prefix=null, vocab_limit=10, **kw)
    assert limited.max() < 10 and limited.min() >= 0
    assert torch.equal(limited, generate(gpt, prefix, 15, generator=gen(0), null_prefix=null, vocab_limit=10,
                                         use_cache=False, **kw))
    with pytest.raises(ValueError, match="vocab_limit 33"):
        generate(gpt, prefix, 2, vocab_limit=33)


def test_transformer_samples_only_codes_of_its_first_stage():
    """transformer-tiny with gpt.vocab_size 512 over a 128-code first stage: sample() keeps to the
    codebook even when the GPT favours the tokens past it."""
    cfg = load_config("transformer-tiny", ["transformer.gpt.vocab_size=512", "transformer.gpt.n_layer=1"]).transformer
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.transformer.head.weight[128:] += 1.0
    codes = model.sample([0, 1, 2, 3], top_k=None, generator=gen(0))
    assert codes.shape == (4, 64) and codes.max() < 128

# (model options, sampling options) the fixed-shape step must decode exactly as the cached loop does
CASES = {
    "plain": ({}, {}),
    "top_k_top_p": ({}, dict(top_k=5, top_p=0.8)),
    "temperature": ({}, dict(temperature=0.7, top_k=20)),
    "cfg": ({}, dict(cfg_scale=2.5, top_p=0.9)),
    "n_unmasked": (dict(n_unmasked=2), dict(top_k=10)),
    "cross_cfg": (dict(cross_attention=True, context_dim=4), dict(cfg_scale=2.0, top_k=10)),
}


def attentive(**model_kw) -> GPT:
    """tiny() with attention weights large enough that every attended key moves the tokens (at the
    0.02 init, a wrong mask or a missing key would change the logits too little to change a sample)."""
    gpt = tiny(**model_kw)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "attn" in name and name.endswith("weight"):
                p.normal_(std=0.5)
    return gpt


def case_inputs(model_kw: dict, sample_kw: dict, seed: int):
    torch.manual_seed(seed)
    kw = dict(sample_kw)
    if "cfg_scale" in kw:
        kw["null_prefix"] = torch.full((3, 2), 5)
    if model_kw.get("cross_attention"):
        kw["context"] = torch.randn(3, 4, 4)
    return torch.randint(0, 32, (3, 2)), kw  # prefix of 2: covers the n_unmasked block


def assert_compiled_like_cached(gpt: GPT, sample_kw: dict, model_kw: dict) -> None:
    """Two calls (new prefix and seed; the second reuses the decoder's buffers, whose tail the
    first left filled): compile=True gives the cached loop's tokens."""
    sizes = []
    for seed in (0, 1):
        prefix, kw = case_inputs(model_kw, sample_kw, seed)
        want = generate(gpt, prefix, 16, generator=gen(seed), **kw)
        assert torch.equal(generate(gpt, prefix, 16, generator=gen(seed), compile=True, **kw), want)
        sizes.append(len(sampling._DECODERS[gpt]))
    assert sizes[0] == sizes[1]  # one set of static buffers per shape, reused


@pytest.fixture
def eager_step(monkeypatch):
    """compile=True with torch.compile left out: the fixed-shape step and its static buffers, eager."""
    monkeypatch.setattr(sampling, "_compiled_step", lambda device_type: sampling._decode_step)


@pytest.mark.parametrize("case", list(CASES))
def test_fixed_shape_step_eager_equals_cached(case, eager_step):
    model_kw, sample_kw = CASES[case]
    assert_compiled_like_cached(attentive(**model_kw), sample_kw, model_kw)


def test_compile_option_checks(eager_step):
    gpt = tiny()
    prefix = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(gpt, prefix, 3, compile=True, use_cache=False)
    with pytest.raises(ValueError, match="eval mode"):
        generate(gpt.train(), prefix, 3, compile=True)
    assert generate(gpt.eval(), prefix, 1, compile=True).shape == (1, 1)  # no step to decode


def test_transformer_sample_compile(eager_step):
    cfg = load_config("transformer-tiny").transformer
    cfg.gpt.n_layer, cfg.gpt.n_embd, cfg.gpt.n_head = 1, 16, 2
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    a = model.sample([1, 2], top_k=50, generator=gen(0))
    assert torch.equal(a, model.sample([1, 2], top_k=50, generator=gen(0), compile=True))


@pytest.mark.slow
def test_compiled_step_equals_cached():
    """torch.compile'd step (inductor on CPU): token-identical to the eager cached loop, compiled
    once per model and batch shape; a repeated call must not recompile."""
    t0 = time.perf_counter()
    models = {}
    for case, (model_kw, sample_kw) in CASES.items():
        key = tuple(sorted(model_kw.items()))
        gpt = models.setdefault(key, attentive(**model_kw))  # cases of one model share its graphs
        assert_compiled_like_cached(gpt, sample_kw, model_kw)
        with torch.compiler.set_stance("fail_on_recompile"):
            prefix, kw = case_inputs(model_kw, sample_kw, 2)
            generate(gpt, prefix, 16, generator=gen(2), compile=True, **kw)
    print(f"compiled {len(models)} models in {time.perf_counter() - t0:.0f} s")
