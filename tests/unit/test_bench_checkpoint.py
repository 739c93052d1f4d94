"""tools/bench_checkpoint.py on a tiny GPT in one process (seconds): both modes run through the real
CheckpointManager and report a stall, a write time and the checkpoint's size."""
import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_checkpoint.py"


def test_bench_checkpoint_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_checkpoint", TOOL)  # tools/ is not a package
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "bench.json"
    report = tool.main(["--n-layer", "1", "--n-embd", "32", "--vocab", "64", "--block", "16", "--worlds", "1",
                        "--warmup", "1", "--normal", "2", "--after", "1", "--repeats", "1", "--dir", str(tmp_path / "w"),
                        "--json", str(out)])
    assert json.loads(out.read_text()) == report
    rows = {r["mode"]: r for r in report["rows"]}
    assert set(rows) == {"sync", "async"}
    for r in rows.values():
        assert r["world"] == 1 and r["params"] < 50_000 and r["checkpoint_bytes"] > 3 * 4 * r["params"]
        assert r["write_s"] > 0 and r["save_call_s"] > 0 and r["normal_step_s"] > 0 and r["threads"] >= 1
    assert rows["sync"]["stall_vs_sync"] == 1.0
    assert "async" in capsys.readouterr().out.split("\n", 2)[2]  # the table's rows
