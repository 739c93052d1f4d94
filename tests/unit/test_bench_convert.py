"""tools/bench_convert.py on a tiny GPT (a few thousand parameters): both methods run in their own
processes, report an RSS, and give identical tensors (fast: two worker processes, run at once)."""
import importlib.util
import json
from pathlib import Path

import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_convert.py"


def _tool():
    # tools/ is not a package: load the script as a module.
    spec = importlib.util.spec_from_file_location("bench_convert", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_convert_tiny(tmp_path):
    tool = _tool()
    out = tmp_path / "bench.json"
    tool.main(["--n-layer", "1", "--n-embd", "32", "--vocab", "64", "--block", "16", "--ema", "--stages", "load",
               "--jobs", "2", "--dir", str(tmp_path / "work"), "--json", str(out)])
    report = json.loads(out.read_text())
    assert 0 < report["params"] < 50_000 and report["ema"]
    sizes = report["checkpoint_tensor_bytes"]
    assert sizes["model"] == sizes["ema"] == report["model_fp32_bytes"] and sizes["optim"] >= 2 * sizes["model"]
    assert set(report["methods"]) == {"model-only", "whole-checkpoint"}
    for stages in report["methods"].values():
        r = stages["load"]
        assert r["peak_rss"] > 0 and r["baseline_rss"] > 0 and r["added_rss"] >= 0 and r["wall_s"] > 0
        assert r["tensors"] > 0
    assert report["tensors_match"]
    assert not any((tmp_path / "work").iterdir())  # its work folder inside --dir is removed without --keep


def test_digest_tells_tensors_apart():
    tool = _tool()
    a = {"w": torch.arange(6.0).view(2, 3)}
    assert tool.tensor_digest(a) == tool.tensor_digest({"w": torch.arange(6.0).view(2, 3).clone()})
    assert tool.tensor_digest(a)["sha256"] != tool.tensor_digest({"w": torch.arange(6.0).view(3, 2)})["sha256"]
    b = {"w": a["w"].clone()}
    b["w"][1, 2] = torch.nextafter(b["w"][1, 2], torch.tensor(10.0))
    assert tool.tensor_digest(a)["sha256"] != tool.tensor_digest(b)["sha256"]
    assert tool.parse_count("300M") == 300_000_000 and tool.parse_count("1.5k") == 1500
