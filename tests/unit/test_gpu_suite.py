"""The GPU suite's CPU dry run: the same benchmark code at tiny sizes, so it cannot rot before a GPU
is at hand (tools/gpu_suite.py, run on a GPU by tools/gpu_suite.sh)."""
import importlib.util
import json

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_suite_dry_run_prints_every_row(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "tools" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    result = suite.main(["--dry-run", "--json", str(tmp_path / "s.json")])
    benches = [r["bench"] for r in result["rows"]]
    assert benches[:5] == ["vqgan fp32", "vqgan bf16", "vqgan bf16 channels_last", "vqgan bf16 compile",
                           "vqgan bf16 compile channels_last"]
    assert benches[5:7] == ["gpt bf16", "gpt bf16 compile"] and benches[7:] == ["decode b1", "decode b2"]
    assert all(r["rate"] > 0 for r in result["rows"])
    assert all(r["mfu"] is None for r in result["rows"] if "mfu" in r)  # no peak FLOP/s for a CPU
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["decode_speedup"].keys() == {"1", "2"}
    out = capsys.readouterr().out
    assert "vqgan bf16 compile channels_last" in out and "summary:" in out
    text = (REPO / "tools" / "gpu_suite.sh").read_text()
    assert "tests/distributed/test_gpu.py" in text and "tools/gpu_suite.py --json" in text
