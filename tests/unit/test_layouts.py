"""Key-for-key layout against the original checkpoints (tests/data/layouts/, see docs/taming-compat.md):
weight compatibility is a hard requirement, so every key and shape of VQModel and the PatchGAN must match."""
import re
from pathlib import Path

import pytest
import torch

from taming_dist.config import load_config
from taming_dist.models.discriminator import NLayerDiscriminator
from taming_dist.models.vqgan import VQModel

# The reference layouts, derived from the original module code (docs/taming-compat.md).
LAYOUTS = Path(__file__).resolve().parents[1] / "data" / "layouts"
MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "quantize.", "post_quant_conv.")
DISC_PREFIX = "loss.discriminator."
_LINE = re.compile(r"^(\S+)\s+\[([\d,\s]*)\]\s*$")

GUMBEL_F16_1024 = [
    "vqgan.ddconfig.ch_mult=[1,1,2,2,4]", "vqgan.ddconfig.attn_resolutions=[16]", "vqgan.quantizer.n_embed=1024",
]
CASES = {
    "vqgan_f16_1024": ("vqgan-f16-1024", []),
    "vqgan_f16_16384": ("vqgan-f16-16384", []),
    "gumbel_f16_1024": ("gumbel-f8-8192", GUMBEL_F16_1024),
}


def parse_layout(path: Path) -> dict[str, tuple[int, ...]]:
    """`key [d1, d2]` lines (`[]` for scalars) up to the `----` summary."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("----"):
            break
        m = _LINE.match(line.strip())
        if m:
            dims = [d for d in m.group(2).replace(" ", "").split(",") if d]
            out[m.group(1)] = tuple(int(d) for d in dims)
    return out


def shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def _compare(got: dict, want: dict) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"shape mismatches (got, want): {wrong}"


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    preset, overrides = CASES[request.param]
    cfg = load_config(preset, overrides)
    layout = parse_layout(LAYOUTS / f"{request.param}.txt")
    assert len(layout) > 300, "layout parser found too few keys"
    return cfg, layout


def test_vqmodel_keys_and_shapes(case):
    cfg, layout = case
    with torch.device("meta"):
        model = VQModel(cfg.vqgan)
    _compare(shapes(model), {k: v for k, v in layout.items() if k.startswith(MODEL_PREFIXES)})


def test_discriminator_keys_and_shapes(case):
    cfg, layout = case
    with torch.device("meta"):
        disc = NLayerDiscriminator(cfg.loss.discriminator)
    _compare(shapes(disc, DISC_PREFIX), {k: v for k, v in layout.items() if k.startswith(DISC_PREFIX)})


def test_f16_1024_parameter_count():
    layout = parse_layout(LAYOUTS / "vqgan_f16_1024.txt")
    want = sum(torch.Size(s).numel() for k, s in layout.items() if k.startswith(MODEL_PREFIXES))
    with torch.device("meta"):
        model = VQModel(load_config("vqgan-f16-1024").vqgan)
    assert sum(p.numel() for p in model.parameters()) == want
    # The summary at the end of the file (every tensor of the Lightning module, loss included).
    text = (LAYOUTS / "vqgan_f16_1024.txt").read_text()
    total = int(re.search(r"#####.*?([\d,]+) elements", text).group(1).replace(",", ""))
    assert total == sum(torch.Size(s).numel() for s in layout.values())


def test_parser_handles_scalars_and_summary(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("a.weight [2, 3]\nb.num_batches_tracked []\n---- groups\nc.weight [9]\n")
    assert parse_layout(p) == {"a.weight": (2, 3), "b.num_batches_tracked": ()}
