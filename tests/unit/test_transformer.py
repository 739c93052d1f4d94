"""Transformer (Net2NetTransformer): key layout, training inputs, condition kinds, sampling, the
image-token loss and the inference pipeline, on tiny models."""
import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from taming_dist.config import load_config
from taming_dist.config.schema import GPTConfig
from taming_dist.losses.lm import image_token_loss
from taming_dist.models.pipeline import generate_image, transform
from taming_dist.models.sampling import generate
from taming_dist.models.transformer import Transformer

LAYOUT = Path(__file__).resolve().parents[1] / "data" / "layouts" / "net2net_drin.txt"
_LINE = re.compile(r"^(\S+)\s+\[([\d,\s]*)\]\s*$")
N = 64  # vqgan-tiny: 32 px, f4 -> 8x8 tokens


def config(kind="class", **cond):
    cfg = load_config("transformer-tiny").transformer
    cfg.gpt.n_layer, cfg.gpt.n_embd, cfg.gpt.n_head = 2, 32, 2
    cfg.condition.kind = kind
    cfg.condition.class_dropout = 0.0
    if kind == "tokens":
        cv = copy.deepcopy(cfg.first_stage)
        cv.ddconfig.in_channels = cv.ddconfig.out_ch = 1
        cv.ddconfig.resolution = 16  # -> 4x4 = 16 condition tokens
        cfg.condition.cond_vqgan = cv
    if kind == "context":
        cfg.gpt.cross_attention, cfg.gpt.context_dim = True, 8
    for k, v in cond.items():
        setattr(cfg if k == "pkeep" else cfg.condition, k, v)
    return cfg


def build(kind="class", **cond) -> Transformer:
    torch.manual_seed(0)
    return Transformer(config(kind, **cond))


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def codes_batch(b=4, n_classes=12):
    torch.manual_seed(1)
    return {"codes": torch.randint(0, 128, (b, N)), "label": torch.randint(0, n_classes, (b,))}


def test_full_state_dict_matches_net2net_drin_layout():
    want = {}
    for line in LAYOUT.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m and not m.group(1).endswith(".attn.mask"):
            want[m.group(1)] = tuple(int(d) for d in m.group(2).split(",") if d.strip())
    cfg = load_config("transformer-tiny").transformer
    cfg.first_stage = load_config("vqgan-f16-1024").vqgan
    cfg.gpt = GPTConfig(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024)
    cfg.condition.kind, cfg.condition.class_dropout = "tokens", 0.0
    cfg.condition.cond_vqgan = copy.deepcopy(cfg.first_stage)
    cfg.condition.cond_vqgan.ddconfig.in_channels = cfg.condition.cond_vqgan.ddconfig.out_ch = 1
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.cond_len == 256 and model.num_image_tokens == 256
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, (missing[:5], extra[:5])
    assert got == want


def test_frozen_stages_stay_in_eval_mode():
    model = build("tokens").train()
    assert model.transformer.training
    for stage in (model.first_stage_model, model.cond_stage_model):
        assert not stage.training and not any(p.requires_grad for p in stage.parameters())
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert not hasattr(build("class"), "cond_stage_model")


def test_training_inputs_from_codes_and_images(monkeypatch):
    model = build().eval()
    batch = codes_batch()
    monkeypatch.setattr(model.first_stage_model, "encode", lambda x: pytest.fail("first stage ran on codes"))
    out = model.make_training_inputs(batch)
    assert out["c_len"] == 1 and out["context"] is None
    assert out["idx"].shape == (4, N) and out["targets"].shape == (4, N)
    assert torch.equal(out["idx"][:, 0], batch["label"]) and torch.equal(out["idx"][:, 1:], batch["codes"][:, :-1])
    monkeypatch.undo()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model.make_training_inputs({"image": images, "label": torch.tensor([3, 4])})
    assert torch.equal(out["targets"], model.encode_to_z(images))
    assert torch.equal(out["targets"].view(2, 8, 8), model.first_stage_model.encode_to_indices(images))


def test_pkeep_token_corruption():
    batch = codes_batch(b=8)
    z = batch["codes"]
    kept = build(pkeep=1.0).train().make_training_inputs(batch, generator=gen())
    assert torch.equal(kept["idx"][:, 1:], z[:, :-1])
    model = build(pkeep=0.0)
    assert torch.equal(model.eval().make_training_inputs(batch)["idx"][:, 1:], z[:, :-1])  # eval: untouched
    model.train()
    a = model.make_training_inputs(batch, generator=gen(5))
    assert torch.equal(a["idx"], model.make_training_inputs(batch, generator=gen(5))["idx"])
    inp = a["idx"][:, 1:]
    assert (inp == z[:, :-1]).float().mean() < 0.05  # all replaced (equal only by chance, 1/128)
    assert inp.max() < 128 and torch.equal(a["targets"], z) and torch.equal(a["idx"][:, 0], batch["label"])
    half = build(pkeep=0.5).train().make_training_inputs(batch, generator=gen())["idx"][:, 1:]
    assert 0.35 < (half == z[:, :-1]).float().mean() < 0.65


def test_class_dropout_gives_null_class():
    model = build(class_dropout=0.5)
    batch = codes_batch(b=64)
    c = model.train().make_training_inputs(batch, generator=gen())["idx"][:, 0]
    null = c == 12
    assert 10 < int(null.sum()) < 54
    assert torch.equal(c[~null], batch["label"][~null])
    assert torch.equal(model.eval().make_training_inputs(batch)["idx"][:, 0], batch["label"])


def test_config_errors():
    with pytest.raises(ValueError, match="vocab_size 128 cannot hold 128 class tokens plus the null class"):
        build(n_classes=128, class_dropout=0.1)
    build(n_classes=128)  # labels 0..127 fit without a null class
    with pytest.raises(ValueError, match="needs a null condition"):
        build("tokens", class_dropout=0.1)
    with pytest.raises(ValueError, match="block_size 60 is shorter"):
        cfg = config()
        cfg.gpt.block_size = 60
        Transformer(cfg)


def test_sample_class_seeded_and_cfg():
    model = build(class_dropout=0.1).eval()
    labels = torch.tensor([0, 5, 11])
    a = model.sample(labels, top_k=50, generator=gen())
    assert a.shape == (3, N) and a.dtype == torch.long and a.max() < 128
    assert torch.equal(a, model.sample(labels, top_k=50, generator=gen()))
    assert torch.equal(a, model.sample(labels, top_k=50, cfg_scale=1.0, generator=gen()))
    assert torch.equal(a, model.sample(labels, top_k=50, use_cache=False, generator=gen()))
    assert torch.equal(model.sample(5, batch_size=3, generator=gen(2)), model.sample([5, 5, 5], generator=gen(2)))
    zero = model.sample(labels, cfg_scale=0.0, generator=gen())
    assert torch.equal(zero, generate(model.transformer, torch.full((3, 1), 12), N, generator=gen()))
    with pytest.raises(ValueError, match="n_classes 12"):
        model.sample(12)
    with pytest.raises(ValueError, match="class_dropout=0.0"):
        build().sample(labels, cfg_scale=2.0)


def test_sample_with_prefix_keeps_it():
    model = build().eval()
    prefix = torch.randint(0, 128, (2, 20))
    out = model.sample(torch.tensor([1, 2]), prefix=prefix, generator=gen())
    assert out.shape == (2, N) and torch.equal(out[:, :20], prefix)
    vq = model.first_stage_model
    assert torch.equal(model.decode_to_img(out), vq.decode_code(out.view(2, 8, 8)))


def test_tokens_condition_kind():
    model = build("tokens").eval()
    cond_image = torch.rand(2, 1, 16, 16) * 2 - 1
    batch = {"codes": torch.randint(0, 128, (2, N)), "cond_image": cond_image}
    out = model.make_training_inputs(batch)
    c = model.cond_stage_model.encode_to_indices(cond_image).flatten(1)
    assert out["c_len"] == 16 and out["idx"].shape == (2, 16 + N - 1)
    assert torch.equal(out["idx"][:, :16], c) and torch.equal(out["idx"][:, 16:], batch["codes"][:, :-1])
    assert any(k.startswith("cond_stage_model.") for k in model.state_dict())
    a = model.sample(cond_image, generator=gen())
    assert a.shape == (2, N) and torch.equal(a, model.sample(c, generator=gen()))
    logits = model(out["idx"])
    loss, _ = image_token_loss(logits, out["targets"], out["c_len"])
    assert torch.isfinite(loss)


def test_context_condition_kind():
    model = build("context", class_dropout=0.99)
    ctx = torch.randn(3, 5, 8)
    batch = {"codes": torch.randint(0, 128, (3, N)), "context": ctx}
    out = model.train().make_training_inputs(batch, generator=gen())
    assert out["c_len"] == 1 and (out["idx"][:, 0] == 0).all() and torch.count_nonzero(out["context"]) == 0
    assert torch.equal(model.eval().make_training_inputs(batch)["context"], ctx)
    a = model.sample(ctx, cfg_scale=2.0, generator=gen())
    assert a.shape == (3, N) and torch.equal(a, model.sample(ctx, cfg_scale=2.0, use_cache=False, generator=gen()))
    with torch.no_grad():
        assert not torch.allclose(model(out["idx"], context=ctx), model(out["idx"], context=ctx * 0))


def test_image_token_loss_equals_cross_entropy():
    torch.manual_seed(0)
    c_len, n, v = 3, 10, 17
    logits = torch.randn(2, c_len + n - 1, v)
    targets = torch.randint(0, v, (2, n))
    loss, stats = image_token_loss(logits, targets, c_len)
    want = F.cross_entropy(logits[:, c_len - 1:].reshape(-1, v), targets.reshape(-1))
    assert torch.allclose(loss, want, atol=1e-6)
    acc = (logits[:, c_len - 1:].argmax(-1) == targets).float().mean()
    assert torch.equal(stats["accuracy"], acc)
    loss16, _ = image_token_loss(logits.bfloat16(), targets, c_len)
    assert loss16.dtype == torch.float32
    with pytest.raises(ValueError, match="expected length 12"):
        image_token_loss(logits[:, 1:], targets, c_len)


def test_generate_image_and_transform():
    model = build().eval()
    vq = model.first_stage_model
    images = generate_image(vq, model, torch.tensor([0, 1]), top_k=20, generator=gen())
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    torch.manual_seed(3)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    labels = torch.tensor([4, 7])
    rec = vq.decode_code(vq.encode_to_indices(x)).clamp(-1, 1)
    assert torch.equal(transform(vq, model, x, labels, strength=0.0), rec)
    fresh = transform(vq, model, x, labels, strength=1.0, seed=0)
    assert torch.equal(fresh, transform(vq, model, y, labels, strength=1.0, seed=0))  # independent of the image
    part = transform(vq, model, x, labels, strength=0.5, seed=0)
    assert torch.equal(part, transform(vq, model, x, labels, strength=0.5, seed=0))
    assert not torch.equal(part, rec) and not torch.equal(part, fresh)
    with pytest.raises(ValueError, match="strength 1.5"):
        transform(vq, model, x, labels, strength=1.5)
