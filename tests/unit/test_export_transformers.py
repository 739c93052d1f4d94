"""`export --format transformers`: our GPT as transformers' GPT2LMHeadModel, checked by transformers
itself (logits, greedy generate, classifier-free guidance through its own guidance_scale), for
none-, class- and tokens-conditioned models; and `export --format taming` of a transformer loading
strictly in the original layout although its stages kept training-only quantizer state."""
import dataclasses
import json

import pytest
import torch

from taming_dist.cli import main
from taming_dist.models.transformer import Transformer
from taming_dist.weights.folder import save_model_folder
from tests.unit.interop_util import gpt_config, synthetic_images, trained_transformer

transformers = pytest.importorskip("transformers")

CODES = 128  # the first stage's codebook; vocab 140 leaves 12 class tokens that are never codes


def condition_of(model: Transformer, kind: str, batch: int = 2):
    """(our sample() condition, the GPT-2 prompt (B, Lc)) for each kind."""
    if kind == "none":
        return None, torch.full((1, 1), model.config.condition.sos_token)
    if kind == "class":
        labels = torch.tensor([3, 11])[:batch]
        return labels, labels[:, None]
    gray = synthetic_images(batch, 16).mean(1, keepdim=True)  # (B, 1, 16, 16) depth-like maps
    codes = model.encode_to_c({"cond_image": gray})
    return codes, codes


@pytest.fixture(scope="module", params=["none", "class", "tokens"])
def exported(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"gpt2-{kind}")
    model = trained_transformer(gpt_config(kind))
    save_model_folder(tmp / "ours", "transformer", model.config, model.state_dict())
    assert main(["export", str(tmp / "ours"), str(tmp / "hf"), "--format", "transformers"]) == 0
    gpt2, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp / "hf"), output_loading_info=True)
    return kind, model, gpt2.eval(), info, tmp


def test_is_a_plain_gpt2_loaded_strictly(exported):
    kind, model, gpt2, info, tmp = exported
    assert all(not v for v in info.values()), info
    c, g = gpt2.config, model.config.gpt
    assert c.activation_function == "gelu" and c.tie_word_embeddings is False
    assert c.n_positions == g.block_size and c.vocab_size == g.vocab_size and c.n_embd == g.n_embd
    assert gpt2.lm_head.bias is None
    assert gpt2.lm_head.weight.data_ptr() != gpt2.transformer.wte.weight.data_ptr()
    meta = json.loads((tmp / "hf" / "taming_condition.json").read_text())
    assert meta["kind"] == kind and meta["image_tokens"] == 64


def test_logits_equal_ours(exported):
    kind, model, gpt2, _, _ = exported
    cond, prompt = condition_of(model, kind)
    codes = torch.randint(0, CODES, (prompt.shape[0], 63), generator=torch.Generator().manual_seed(1))
    idx = torch.cat([prompt, codes], 1)
    with torch.no_grad():
        torch.testing.assert_close(gpt2(idx).logits, model(idx), rtol=1e-5, atol=1e-5)


def test_greedy_generate_gives_our_greedy_tokens(exported):
    kind, model, gpt2, _, _ = exported
    cond, prompt = condition_of(model, kind)
    with torch.no_grad():
        ours = model.sample(cond, top_k=1)  # top-1 sampling is greedy
        out = gpt2.generate(prompt, do_sample=False)  # max_new_tokens and suppressed tokens from the folder
    assert torch.equal(out[:, prompt.shape[1]:], ours)


@pytest.mark.parametrize("exported", ["class"], indirect=True)  # the kind with a null condition
def test_guidance_through_transformers_gives_our_guided_logits(exported):
    kind, model, gpt2, _, _ = exported
    scale, null = 3.0, model.config.condition.n_classes
    labels, prompt = condition_of(model, kind)
    neg = torch.full_like(prompt, null)
    with torch.no_grad():
        out = gpt2.generate(prompt, do_sample=False, guidance_scale=scale, negative_prompt_ids=neg,
                            output_scores=True, return_dict_in_generate=True)
        seq = out.sequences
        assert len(out.scores) == 64
        for t, theirs in enumerate(out.scores):
            c = model(seq[:, :1 + t])[:, -1]
            u = model(torch.cat([neg, seq[:, 1:1 + t]], 1))[:, -1]
            ours = u + scale * (c - u)
            ours[:, CODES:] = float("-inf")
            assert torch.equal(torch.isinf(theirs), torch.isinf(ours))
            # transformers mixes log-softmaxed scores, we mix logits: the same up to one constant per row
            torch.testing.assert_close(theirs.log_softmax(-1)[:, :CODES], ours.log_softmax(-1)[:, :CODES],
                                       rtol=1e-5, atol=1e-5)
        assert torch.equal(seq[:, 1:], model.sample(labels, top_k=1, cfg_scale=scale))


def test_refuses_cross_attention_and_bidirectional_prefix(tmp_path, capsys):
    from taming_dist.config import ConditionConfig

    cfg = gpt_config("class")
    ctx = dataclasses.replace(cfg, condition=ConditionConfig(kind="context", context_len=4, class_dropout=0.1),
                              gpt=dataclasses.replace(cfg.gpt, cross_attention=True, context_dim=8))
    save_model_folder(tmp_path / "ctx", "transformer", ctx, Transformer(ctx).state_dict())
    assert main(["export", str(tmp_path / "ctx"), str(tmp_path / "a"), "--format", "transformers"]) == 2
    assert "cross-attention" in capsys.readouterr().err
    bi = dataclasses.replace(cfg, gpt=dataclasses.replace(cfg.gpt, n_unmasked=4))
    save_model_folder(tmp_path / "bi", "transformer", bi, Transformer(bi).state_dict())
    assert main(["export", str(tmp_path / "bi"), str(tmp_path / "b"), "--format", "transformers"]) == 2
    assert "n_unmasked=4" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bi", "ctx"]


def test_taming_format_of_a_transformer_loads_strictly_in_the_original_layout(tmp_path):
    """Issue 24, part 0: first and cond stages trained with k-means init and dead-code restarts carry
    code_offset (non-zero here), code_usage and kmeans_done; the original VectorQuantizer2 has none
    of them. The export folds the offset into the codebook and drops the rest, so the checkpoint
    has exactly the original Net2NetTransformer's keys (what `load_state_dict(strict=True)` checks)."""
    model = trained_transformer(gpt_config("tokens"))
    q = model.first_stage_model.quantize
    assert q.code_offset.abs().min() > 0 and hasattr(q, "code_usage") and hasattr(q, "kmeans_done")
    save_model_folder(tmp_path / "ours", "transformer", model.config, model.state_dict())
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "orig"), "--format", "taming"]) == 0
    sd = torch.load(tmp_path / "orig" / "model.ckpt", weights_only=True)["state_dict"]
    # the original's module tree: our modules without the training-only buffers, plus minGPT's masks
    plain = model.config
    for vq in (plain.first_stage, plain.condition.cond_vqgan):
        vq.quantizer.kmeans_init, vq.quantizer.dead_code_threshold = False, 0.0
    original = Transformer(plain)
    want = set(original.state_dict()) | {f"transformer.blocks.{i}.attn.mask" for i in range(plain.gpt.n_layer)}
    assert set(sd) == want
    original.load_state_dict(sd, strict=True)
    for stage in ("first_stage_model", "cond_stage_model"):
        ours = getattr(model, stage)
        assert torch.equal(getattr(original, stage).quantize.embedding.weight, ours.quantize.codebook().detach())
    x = synthetic_images(2)
    with torch.no_grad():
        assert torch.equal(original.encode_to_z(x), model.encode_to_z(x))
