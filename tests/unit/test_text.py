"""Text-to-image (issue 23): text encoders from local folders, text features next to the codes,
the text condition (padding mask, projection, learned null context) and sampling from prompts.

The encoders are tiny T5 / CLIP models built from their configs with a tokenizer trained on the
built-in captions (taming_dist/text/tiny.py) and saved with save_pretrained: nothing is downloaded.
"""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from taming_dist.config import DataConfig, load_config
from taming_dist.data.codes import extract_codes
from taming_dist.data.shards import TEXT_FIELD, read_manifest, resolve_shards, tar_samples
from taming_dist.data.stream import build_stream
from taming_dist.data.synthetic import captions
from taming_dist.models.conditions import TextContext
from taming_dist.models.gpt import GPT
from taming_dist.models.pipeline import generate_image, get_condition
from taming_dist.models.transformer import Transformer
from taming_dist.text import TextEncoder
from taming_dist.text.encoder import check_folder
from taming_dist.text.tiny import build_tiny_encoder
from tests.unit.test_data_codes import StandInVQ

WIDTH = 24  # encoder width, != the GPT's n_embd (32): the projection is exercised


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    caps = captions(240, 12) + captions(240, 12, seed=1)
    return {k: build_tiny_encoder(str(root / k), caps, kind=k, width=WIDTH) for k in ("t5", "clip")}


def test_encoder_folders_load_as_downloaded_models_and_encode_with_lengths(encoders):
    for kind, folder in encoders.items():
        enc = TextEncoder.load(folder)
        assert enc.width == WIDTH and enc.name == kind and not enc.model.training
        texts = ["a red circle on a blue background", "dots on a black background " * 4]
        feats, lengths, truncated = enc.encode(texts, 10)
        assert feats.shape == (2, 10, WIDTH) and truncated == 1
        assert lengths[0] == (8 if kind == "t5" else 9) and lengths[1] == 10  # + </s> (T5), + BOS/EOS (CLIP)
        assert torch.count_nonzero(feats[0, lengths[0]:]) == 0  # padding stored as zeros
        # encoded at the batch's longest caption: the same vectors as padded to max_length
        tok = enc.tokenizer(texts, padding="max_length", truncation=True, max_length=10, return_tensors="pt")
        ref = enc.model(**tok).last_hidden_state * tok["attention_mask"][..., None]
        short, _, _ = enc.encode(texts[:1], 10)
        assert torch.allclose(short[0], ref[0], atol=1e-5) and torch.allclose(feats, ref, atol=1e-5)


def test_missing_encoder_folder_or_tokenizer_says_which_files_are_expected(tmp_path, encoders):
    with pytest.raises(FileNotFoundError, match="does not exist; nothing is downloaded.*config.json.*tokenizer"):
        check_folder(str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(encoders["t5"], name), partial / name)
    with pytest.raises(ValueError, match="has no a tokenizer .*tokenizer.json.*spiece.model"):
        TextEncoder.load(str(partial))


def _tiny_t2i(class_dropout=0.0, context_dim=WIDTH, context_len=12):
    cfg = load_config("transformer-tiny").transformer
    cfg.gpt.n_layer, cfg.gpt.n_embd, cfg.gpt.n_head = 2, 32, 2
    cfg.gpt.cross_attention, cfg.gpt.context_dim = True, context_dim
    cfg.condition.kind, cfg.condition.context_len, cfg.condition.class_dropout = "text", context_len, class_dropout
    cfg.condition.text_encoder = "t5"
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_extract_codes_with_text_features_on_two_ranks_and_read_back(tmp_path, encoders, monkeypatch):
    monkeypatch.setenv("TAMING_DIST_CACHE", str(tmp_path / "cache"))
    data = DataConfig(size=16, synthetic_samples=24, synthetic_classes=12)
    enc = TextEncoder.load(encoders["t5"])
    out = str(tmp_path / "codes")
    for rank in (1, 0):  # rank 0 writes the manifest after every rank's shards
        extract_codes(StandInVQ(), data, out, rank=rank, world_size=2, batch_size=5, n_embed=64, text_encoder=enc,
                      max_text_tokens=8, text_dtype="fp16")
    m = read_manifest(out)
    text = m["text"]
    assert {k: text[k] for k in ("encoder", "width", "dtype", "max_length")} == \
        {"encoder": "t5", "width": WIDTH, "dtype": "fp16", "max_length": 8}
    assert text["truncated"] == sum(len(c.split()) + 1 > 8 for c in captions(24, 12)) and text["captions_per_s"] > 0
    urls, _ = resolve_shards(out)
    samples = {s["__key__"]: s for s in tar_samples([{"url": u} for u in urls], lambda e: False)}
    key = sorted(samples)[3]
    caption = samples[key]["txt"].decode()
    assert caption == captions(24, 12)[int(key)]
    stored = np.load(io.BytesIO(samples[key][TEXT_FIELD]))
    ref, length, _ = enc.encode([caption], 8)
    assert stored.dtype == np.float16 and stored.shape == (int(length), WIDTH)
    assert np.allclose(stored, ref[0, :int(length)].numpy(), atol=2e-3)

    cfg = DataConfig(kind="codes", path=out, num_workers=0)
    batch = next(iter(build_stream(cfg, batch_size=6, seed=0)))
    assert batch["context"].shape == (6, 8, WIDTH) and batch["context"].dtype == torch.float32
    assert batch["context_len"].shape == (6,) and (batch["context_len"] >= 1).all()
    for ctx, n in zip(batch["context"], batch["context_len"]):
        assert torch.count_nonzero(ctx[n:]) == 0

    # a text model trains on these batches; a width that differs is an error naming the fix
    model = _tiny_t2i(context_dim=WIDTH, context_len=8)
    inputs = model.train().make_training_inputs(batch)
    assert model.transformer(inputs["idx"], **inputs["gpt_kwargs"]).shape[0] == 6
    with pytest.raises(ValueError, match="16 wide, the model's gpt.context_dim is 24"):
        model.make_training_inputs({**batch, "context": batch["context"][..., :16]})
    with pytest.raises(ValueError, match="extract-codes RUN DATA OUT --text-encoder DIR"):
        model.make_training_inputs({"codes": batch["codes"], "label": batch["label"]})

    # ... and at start-up, before any step, when the task is built on the codes folder
    from taming_dist.engines import DistEnv, build_engine
    from taming_dist.train.loop import build_task

    def task_on(path, *extra):
        cfg = load_config("transformer-text-tiny", [f"data.path={path}", f"transformer.gpt.context_dim={WIDTH}",
                                                     "transformer.condition.context_len=8", *extra])
        return build_task(cfg, build_engine(cfg.engine, DistEnv(), torch.device("cpu")), 1)

    assert task_on(out, "transformer.condition.text_encoder=/models/t5").model.condition.kind == "text"
    plain = str(tmp_path / "plain")
    extract_codes(StandInVQ(), data, plain, batch_size=5, n_embed=64)
    for path, extra, match in [
            (plain, [], r"codes folder .*plain has none \(its manifest.json records no `text`\): extract them "
                        r"with `taming-dist extract-codes RUN DATA OUT --text-encoder DIR --max-text-tokens 8`"),
            (out, ["transformer.gpt.context_dim=16"], "are 24 wide .*set transformer.gpt.context_dim=24"),
            (out, ["transformer.condition.context_len=4"], "up to 8 tokens .*condition.context_len=8"),
            (out, ["transformer.condition.text_encoder=clip"], "come from encoder 't5'.*text_encoder is 'clip'")]:
        with pytest.raises(ValueError, match=match):
            task_on(path, *extra)


def test_bf16_features_round_trip(tmp_path, encoders):
    from taming_dist.data.codes import text_from_numpy, text_to_numpy

    x = torch.randn(3, 5)
    arr = text_to_numpy(x, "bf16")
    assert arr.dtype == np.uint16 and torch.equal(text_from_numpy(arr, "bf16"), x.to(torch.bfloat16).float())


def test_cross_attention_ignores_the_padding_contents_and_learns_a_projection_and_null():
    model = _tiny_t2i(class_dropout=0.1)
    gpt = model.transformer
    assert gpt.context_proj.in_features == WIDTH and gpt.null_context.shape == (1, 1, 32)
    idx = torch.randint(0, 128, (3, 10))
    ctx = torch.randn(3, 12, WIDTH)
    lengths = torch.tensor([4, 12, 1])
    noisy = ctx.clone()
    for b, n in enumerate(lengths):
        noisy[b, n:] = torch.randn_like(noisy[b, n:]) * 100
    a = gpt(idx, context=ctx, context_len=lengths)
    assert torch.allclose(a, gpt(idx, context=noisy, context_len=lengths), atol=1e-6)
    assert not torch.allclose(a, gpt(idx, context=noisy))  # without the mask the padding is read
    # dropped rows read only the learned null token, whatever their context
    drop = torch.tensor([True, False, True])
    d1 = gpt(idx, context=ctx, context_len=lengths, context_drop=drop)
    d2 = gpt(idx, context=noisy * 3, context_len=lengths, context_drop=drop)
    assert torch.allclose(d1[drop], d2[drop], atol=1e-6) and not torch.allclose(d1[~drop], d2[~drop])
    # the null token gets a gradient when a row is dropped
    gpt.train()
    gpt(idx, context=ctx, context_len=lengths, context_drop=drop).sum().backward()
    assert gpt.null_context.grad.abs().sum() > 0 and gpt.context_proj.weight.grad.abs().sum() > 0


def test_context_keys_and_values_are_computed_once_per_sample_eager_and_compiled():
    model = _tiny_t2i(class_dropout=0.1)
    gpt = model.transformer
    cond = TextContext(torch.randn(2, 12, WIDTH), torch.tensor([5, 12]))
    calls = []
    hooks = [b.cross_attn.key.register_forward_hook(lambda m, i, o: calls.append(1)) for b in gpt.blocks]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    eager = model.sample(cond, generator=gen(), cfg_scale=2.0)
    assert eager.shape == (2, model.num_image_tokens)
    assert len(calls) == len(gpt.blocks)  # one prefill; none of the 63 decoding steps
    for h in hooks:
        h.remove()
    assert torch.equal(model.sample(cond, generator=gen(), cfg_scale=2.0, use_cache=False), eager)
    # compiled decoder: after the prefill the context projections are poisoned; a step that
    # recomputed them would sample from NaN logits (and raise)
    compiled = model.sample(cond, generator=gen(), cfg_scale=2.0, compile=True)
    assert torch.equal(compiled, eager)
    import taming_dist.models.sampling as sampling

    real = sampling._decoder

    def poisoned_after_prefill(g, cache):  # the static decoder is made right after the eager prefill
        for b in g.blocks:
            b.cross_attn.key.weight.data.fill_(float("nan"))
            b.cross_attn.value.weight.data.fill_(float("nan"))
        g.context_proj.weight.data.fill_(float("nan"))
        return real(g, cache)

    saved = {k: v.clone() for k, v in gpt.state_dict().items()}
    sampling._decoder = poisoned_after_prefill
    try:
        assert torch.equal(model.sample(cond, generator=gen(), cfg_scale=2.0, compile=True), eager)
    finally:
        sampling._decoder = real
        gpt.load_state_dict(saved)


def test_get_condition_from_prompts_and_generate_image(encoders):
    model = _tiny_t2i(class_dropout=0.1)
    prompts = ["a red circle on a blue background", "a yellow triangle on a purple background"]
    cond = get_condition(model, prompts, text_encoder=encoders["t5"])
    assert isinstance(cond, TextContext) and cond.features.shape == (2, 12, WIDTH) and cond.prompts == prompts
    assert cond.lengths.tolist() == [8, 8]
    images = generate_image(model.first_stage_model, model, cond, cfg_scale=3.0,
                            generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="pass prompts .*text_encoder=DIR"):
        get_condition(model, labels=None)
    with pytest.raises(ValueError, match="needs text_encoder="):
        get_condition(model, prompts)
    narrow = build_tiny_encoder(str(encoders["t5"]) + "-narrow", prompts, width=16)
    with pytest.raises(ValueError, match="16 wide, the model's gpt.context_dim is 24"):
        get_condition(model, prompts, text_encoder=narrow)
    with pytest.raises(ValueError, match="cfg_scale 2.0 needs a null condition"):
        _tiny_t2i(class_dropout=0.0).sample(cond, cfg_scale=2.0)


def test_condition_kinds_are_objects_and_checked():
    model = _tiny_t2i()
    assert model.condition.record() == {"kind": "text", "text_encoder": "t5", "context_len": 12, "context_dim": WIDTH}
    assert not hasattr(model.transformer, "null_context")  # no dropout: no untrained null
    cfg = load_config("transformer-tiny").transformer
    cfg.condition.kind = "text"
    with pytest.raises(ValueError, match="needs gpt.cross_attention=true"):
        Transformer(cfg)
    cfg.gpt.cross_attention, cfg.gpt.context_dim = True, 8
    with pytest.raises(ValueError, match="context_len > 0"):
        Transformer(cfg)
    cfg.condition.kind = "pictures"
    with pytest.raises(ValueError, match="not one of none, class, tokens, context, text"):
        cfg.validate()
    json.dumps(model.condition.record())
    assert GPT  # the GPT is built through the condition's gpt_config


def test_exports_ask_the_condition_and_refuse_cross_attention_with_the_reason():
    from taming_dist.checkpoint.export import _original_vq_params
    from taming_dist.interop.transformers import condition_info, pipeline_readme

    t2i = _tiny_t2i()
    with pytest.raises(ValueError, match="original Net2NetTransformer has no cross-attention GPT"):
        t2i.condition.original_cond_stage(_original_vq_params)
    with pytest.raises(ValueError, match="no token prompt"):
        condition_info(t2i.condition.cfg)
    cls = Transformer(load_config("transformer-tiny").transformer).condition  # class, dropout 0.1
    assert cls.original_cond_stage(_original_vq_params) == (
        "class_label", {"target": "taming.modules.util.Labelator", "params": {"n_classes": 12}})
    assert cls.prompt_tokens(5) == [5] and cls.null_prompt() == [12]
    with pytest.raises(ValueError, match=r"label 12 must lie in \[0, n_classes 12\)"):
        cls.prompt_tokens(12)
    info = condition_info(cls.cfg)
    assert info["prompt"] == "[label]" and info["null_prompt"] == [12] and info["image_tokens"] == 64
    readme = pipeline_readme(cls.cfg, label=3, guidance=2.0)
    assert "prompt = torch.tensor([[3]])" in readme and "negative_prompt_ids=torch.tensor([[12]])" in readme


def test_prompt_accuracy_scores_real_images_against_their_captions_and_not_against_others():
    from taming_dist.data.synthetic import generate
    from taming_dist.eval.prompts import prompt_hits

    images, _ = generate(48, 32, 12, seed=1)  # held-out split, with its own captions
    texts = captions(48, 12, seed=1)
    own = prompt_hits(images, texts)
    assert own["scored"] == 48 and own["colours"] == 48 and own["shape"] >= 0.8 * 48
    shuffled = prompt_hits(images, texts[1:] + texts[:1])
    assert shuffled["all"] <= 0.2 * 48
    # the colours swapped in the prompt: wrong where the pixels show the roles (a cyan disk on purple
    # is not "a purple circle on a cyan background"), still right for the patterns, where they do not
    from taming_dist.data.synthetic import ROLES_SHOWN, caption, parse_caption

    parsed = [parse_caption(t) for t in texts]
    swapped = [caption(label, bg, fg) for label, fg, bg in parsed]
    shown = sum(label in ROLES_SHOWN for label, _, _ in parsed)
    assert 0 < shown < 48
    assert prompt_hits(images, swapped)["colours"] == 48 - shown
    assert prompt_hits(images[:2], ["a photo of a cat", texts[1]])["unparsed"] == 1


def test_the_tiny_t5_tells_a_colour_of_the_shape_from_the_same_colour_of_the_background(tmp_path):
    """build_tiny_encoder's neighbour bias: without it (0) a word's feature is the same wherever it
    stands (cosine 0.9998 here), so the roles of a caption's two colours cannot be read."""
    texts = ["a cyan circle on a purple background", "a purple circle on a cyan background"]
    cosines = {}
    for bias in (0.0, 6.0):
        enc = TextEncoder.load(build_tiny_encoder(str(tmp_path / f"b{bias}"), texts, width=128, neighbour_bias=bias))
        features, _, _ = enc.encode(texts, 16)
        cosines[bias] = float(torch.nn.functional.cosine_similarity(features[0, 1], features[1, 5], dim=0))
    assert cosines[0.0] > 0.99 and cosines[6.0] < 0.8, cosines


def test_eval_gen_samples_a_prompts_file_and_reports_prompt_accuracy_and_clip_score(tmp_path, encoders, capsys):
    from taming_dist.cli import main
    from taming_dist.weights.folder import save_model_folder

    model = _tiny_t2i(class_dropout=0.1)
    save_model_folder(tmp_path / "model", "transformer", model.config, model.state_dict())
    clip = build_tiny_encoder(str(tmp_path / "clip"), captions(240, 12), kind="clip", width=WIDTH, with_vision=True)
    (tmp_path / "prompts.txt").write_text("a red circle on a blue background\n# a comment\nyellow dots on a black background\n")
    out = tmp_path / "gen.json"
    assert main(["eval-gen", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.txt"), "--text-encoder",
                 encoders["t5"], "--clip", clip, "--per-prompt", "2", "--cfg-scale", "2.0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["prompts"] == 2 and r["samples"] == 4
    assert 0 <= r["prompt_accuracy"] <= r["shape_accuracy"] <= 1 and 0 <= r["colour_accuracy"] <= 1
    assert 0 <= r["clip_score"] <= 100
    assert main(["eval-gen", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.txt")]) == 2
    assert "--text-encoder" in capsys.readouterr().err
