"""The GPU suite's CPU dry run: the same benchmark code at tiny sizes, so it cannot rot before a GPU
is at hand (tools/gpu_suite.py, run on a GPU by tools/gpu_suite.sh)."""
import importlib.util
import json

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _load_suite():
    """tools/gpu_suite.py as a module (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "tools" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite


def test_gpu_suite_dry_run_prints_every_row(tmp_path, capsys):
    suite = _load_suite()
    result = suite.main(["--dry-run", "--json", str(tmp_path / "s.json")])
    benches = [r["bench"] for r in result["rows"]]
    # the rows the targets need first: a run cut short by its time limit keeps those
    assert benches == ["vqgan fp32", "vqgan bf16", "vqgan bf16 compile", "gpt bf16", "gpt bf16 compile",
                       "decode b1", "decode b2", "vqgan bf16 channels_last", "vqgan bf16 compile channels_last"]
    assert all(r["rate"] > 0 for r in result["rows"])
    assert all(r["mfu"] is None for r in result["rows"] if "mfu" in r)  # no peak FLOP/s for a CPU
    summary = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert summary["decode_speedup"].keys() == {"1", "2"} and summary["failed"] == {}
    out = capsys.readouterr().out
    assert "vqgan bf16 compile channels_last" in out and "summary:" in out
    text = (REPO / "tools" / "gpu_suite.sh").read_text()
    assert "tests/distributed/test_gpu.py" in text and "tools/gpu_suite.py --json" in text


def test_gpu_suite_reports_a_failed_bench_and_runs_the_others(tmp_path, monkeypatch):
    suite = _load_suite()
    real = suite.train_row

    def flaky(name, *a, **kw):
        if name == "vqgan bf16 compile":
            raise RuntimeError("CUDA out of memory (planted)")
        return real(name, *a, **kw) if name == "vqgan fp32" else {
            "bench": name, "stage": "vqgan", "rate": 1.0, "unit": "images/s", "micro_batch": 1, "config": ""}

    monkeypatch.setattr(suite, "train_row", flaky)
    monkeypatch.setattr(suite, "decode_rows", lambda *a, **kw: [])
    result = suite.main(["--dry-run", "--json", str(tmp_path / "s.json")])
    assert [r["bench"] for r in result["rows"]][:4] == ["vqgan fp32", "vqgan bf16", "vqgan bf16 compile", "gpt bf16"]
    assert result["summary"]["failed"] == {"vqgan bf16 compile": "RuntimeError: CUDA out of memory (planted)"}
    assert result["summary"]["vqgan_bf16_compile_vs_fp32"] is None  # never a ratio from a missing row
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["failed"]  # the JSON says so too


def test_gpu_suite_runs_a_bench_in_its_own_process_and_reports_its_crash(tmp_path, monkeypatch):
    # on the GPU each bench runs in a child process, so a segfault (seen in the first CUDA run) costs
    # one row; here the child runs the dry-run decode bench, and a child that dies is a FAILED row
    suite = _load_suite()
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    rows = suite._in_child("decode", 2, 300, dry=True)
    assert [r["bench"] for r in rows] == ["decode b1", "decode b2"] and all(r["rate"] > 0 for r in rows)
    got = []
    suite._guarded(got, "no such bench", lambda: suite._in_child("no such bench", 2, 300, dry=True), lambda r: None)
    assert got[0]["bench"] == "no such bench" and got[0]["error"].startswith("RuntimeError: exit 1: KeyError")


def test_gpu_wheels_pins_what_requirements_pin():
    # tools/gpu_wheels.sh reads its versions from requirements.txt (`pin NAME`): each must be pinned there
    import re
    import subprocess

    script = REPO / "tools" / "gpu_wheels.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    names = re.findall(r"\$\(pin ([\w-]+)\)", script.read_text())
    pinned = {line.split("==")[0].lower() for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line}
    assert {"deepspeed", "webdataset", "lpips"} <= set(names) and set(names) <= pinned, (names, pinned)
