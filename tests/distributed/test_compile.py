"""engine.compile (torch.compile of the unit, in place so parameter names do not change) trains to
the same losses as eager, on one process (inductor compiles C++ on CPU: about a minute); and
engine.channels_last gives the same VQGAN losses."""
import json

import pytest

from tests.distributed.util import REPO, run

pytestmark = pytest.mark.slow


def test_compiled_transformer_matches_eager(tmp_path):
    harness = str(REPO / "tests" / "distributed" / "harness.py")
    eager, compiled = "transformer:single:2:fp32", "transformer:single:2:fp32:noac:engine.compile=true"
    run([harness, str(tmp_path / "out.json"), eager, compiled], timeout=900)
    out = json.loads((tmp_path / "out.json").read_text())
    for a, b in zip(out[eager]["history"], out[compiled]["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["loss"], b["loss"])
    assert out[eager]["params"].keys() == out[compiled]["params"].keys()
    assert out[eager]["params"]["transformer"].keys() == out[compiled]["params"]["transformer"].keys()


def test_channels_last_vqgan_matches(tmp_path):
    harness = str(REPO / "tests" / "distributed" / "harness.py")
    plain, cl = "vqgan:single:2:fp32", "vqgan:single:2:fp32:noac:engine.channels_last=true"
    run([harness, str(tmp_path / "out.json"), plain, cl])
    out = json.loads((tmp_path / "out.json").read_text())
    for a, b in zip(out[plain]["history"], out[cl]["history"]):
        for k in ("loss", "nll", "d_weight"):
            assert abs(a[k] - b[k]) <= 1e-3 * max(1.0, abs(a[k])), (k, a[k], b[k])
