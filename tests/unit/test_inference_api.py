"""The inference API of the design's usage snippet: get_condition for each condition kind, and the
transform methods of VQModel and Transformer (the same as the free pipeline.transform)."""
import copy

import pytest
import torch

from taming_dist.config import load_config
from taming_dist.data.synthetic import CLASS_NAMES
from taming_dist.models import Transformer, VQModel, generate_image, get_condition  # the design's import line
from taming_dist.models import pipeline
from taming_dist.models.pipeline import transform


def build(kind="class", **cond):
    cfg = load_config("transformer-tiny").transformer
    cfg.gpt.n_layer, cfg.gpt.n_embd, cfg.gpt.n_head = 2, 32, 2
    cfg.condition.kind, cfg.condition.class_dropout = kind, 0.0
    if kind == "tokens":
        cv = copy.deepcopy(cfg.first_stage)
        cv.ddconfig.in_channels = cv.ddconfig.out_ch = 1
        cv.ddconfig.resolution = 16  # -> 4x4 = 16 condition tokens
        cfg.condition.cond_vqgan = cv
    if kind == "context":
        cfg.gpt.cross_attention, cfg.gpt.context_dim = True, 8
    for k, v in cond.items():
        setattr(cfg.condition, k, v)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_import_line_of_the_design():
    assert generate_image is pipeline.generate_image and get_condition is pipeline.get_condition
    assert callable(VQModel.transform) and callable(Transformer.transform)


def test_class_labels_from_names_and_ints():
    t = build("class")
    want = torch.tensor([0, 5, 11])
    by_name = get_condition(t, ["circle", "checkerboard", "framed_solid"])
    assert CLASS_NAMES[5] == "checkerboard"
    assert torch.equal(by_name, want) and by_name.dtype == torch.long
    assert torch.equal(get_condition(t, [0, "checkerboard", 11]), want)
    assert torch.equal(get_condition(t, torch.tensor([[0], [5], [11]])), want)
    assert get_condition(t, "dots").tolist() == [CLASS_NAMES.index("dots")] == get_condition(t, 8).tolist()
    assert torch.equal(get_condition(t, ["b", "a"], class_names=["a", "b"]), torch.tensor([1, 0]))
    # The condition feeds sampling as labels would: the same codes under the same seed.
    a = t.sample(by_name, generator=torch.Generator().manual_seed(0))
    b = t.sample(torch.tensor([0, 5, 11]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("labels, match", [
    ("hexagon", "unknown class name 'hexagon'; the classes are circle, square"),
    (12, r"outside the model's n_classes 12"),
    (-1, r"outside the model's n_classes 12"),
    ([1.5], "must be an int or a class name"),
    ([], "labels is empty"),
])
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        get_condition(build("class"), labels)


def test_name_beyond_a_smaller_model_n_classes():
    with pytest.raises(ValueError, match=r"'framed_solid' \(index 11\) is outside the model's n_classes 4"):
        get_condition(build("class", n_classes=4), "framed_solid")


def test_tokens_condition_encodes_the_image_with_the_cond_stage():
    t = build("tokens")
    torch.manual_seed(1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    c = get_condition(t, image=x)
    assert c.shape == (2, 16) and c.dtype == torch.long
    assert torch.equal(c, t.cond_stage_model.encode_to_indices(x).reshape(2, -1))
    assert torch.equal(get_condition(t, image=x[0]), c[:1])  # one image (C, H, W)
    assert torch.equal(get_condition(t, image=x.numpy()), c)
    u8 = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)  # scaled to [-1, 1] as in training
    assert torch.equal(get_condition(t, image=u8), get_condition(t, image=u8.float() / 127.5 - 1))
    assert t.sample(c, generator=torch.Generator().manual_seed(0)).shape == (2, 64)
    with pytest.raises(ValueError, match=r"takes images \(B, 1, 16, 16\), got shape \(2, 3, 16, 16\)"):
        get_condition(t, image=torch.zeros(2, 3, 16, 16))


def test_context_condition():
    t = build("context")
    ctx = torch.randn(2, 5, 8)
    assert torch.equal(get_condition(t, context=ctx), ctx)
    assert get_condition(t, context=ctx[0].tolist()).shape == (1, 5, 8)  # plain nested lists, one sequence
    assert t.sample(get_condition(t, context=ctx), generator=torch.Generator().manual_seed(0)).shape == (2, 64)
    with pytest.raises(ValueError, match=r"context must be \(B, L, 8\) \(gpt.context_dim 8\), got shape \(2, 5, 3\)"):
        get_condition(t, context=torch.zeros(2, 5, 3))


def test_unconditional_takes_nothing():
    t = build("none")
    assert get_condition(t) is None
    assert t.sample(get_condition(t), batch_size=3, generator=torch.Generator().manual_seed(0)).shape == (3, 64)


@pytest.mark.parametrize("kind, kwargs, match", [
    ("class", {"image": torch.zeros(1, 3, 32, 32)}, r"condition kind is 'class': pass labels= \(ints in \[0, 12\) "
                                                    r"or class names, one per sample\), not image="),
    ("class", {}, r"condition kind is 'class': pass labels="),
    ("tokens", {"labels": [1]}, r"condition kind is 'tokens': pass image= \(B, 1, 16, 16\) .*, not labels="),
    ("context", {"labels": 1}, r"condition kind is 'context': pass context= \(B, L, 8\), not labels="),
    ("context", {"image": torch.zeros(1, 3, 32, 32)}, r"kind is 'context': pass context= .*, not image="),
    ("none", {"labels": 3}, r"condition kind is 'none': pass nothing \(an unconditional model.*\), not labels="),
])
def test_wrong_kind_names_the_kind_and_what_to_pass(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_condition(build(kind), **kwargs)


def test_transform_methods_equal_the_free_function():
    t = build("class")
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    c = torch.tensor([3, 7])
    free = transform(t.first_stage_model, t, x, c, strength=0.6, seed=0, top_k=16)
    by_vqgan = t.first_stage_model.transform(x, c, strength=0.6, transformer=t, seed=0, top_k=16)
    by_transformer = t.transform(x, c, strength=0.6, seed=0, top_k=16)
    assert free.shape == (2, 3, 32, 32)
    assert torch.equal(by_vqgan, free) and torch.equal(by_transformer, free)
    # Positional strength and the 0.8 default reach the free function too.
    default = transform(t.first_stage_model, t, x, c, seed=1)
    assert torch.equal(t.transform(x, c, 0.8, seed=1), default)
    assert torch.equal(t.first_stage_model.transform(x, c, transformer=t, seed=1), default)
    # The free function's checks hold for the methods.
    with pytest.raises(ValueError, match=r"strength 1.5 must lie in \[0, 1\]"):
        t.transform(x, c, strength=1.5)


def test_vqgan_transform_needs_the_transformer():
    t = build("class")
    with pytest.raises(ValueError, match="VQModel.transform needs transformer="):
        t.first_stage_model.transform(torch.zeros(1, 3, 32, 32), torch.tensor([0]))
