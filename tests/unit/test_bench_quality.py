"""tools/bench_quality.py at a toy budget: every quantizer family trains, is scored on held-out
images and lands in the table and the JSON with the overrides that define it."""
import importlib.util
import json

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("bench_quality", REPO / "tools" / "bench_quality.py")
bench_quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_quality)


def test_bench_quality_rows_for_vq_fsq_lfq(tmp_path, capsys):
    names = ["vq", "kmeans+restarts", "fsq", "lfq"]
    assert bench_quality.main(["--steps", "2", "--batch", "4", "--eval-samples", "16", "--settings", ",".join(names),
                               "--json", str(tmp_path / "q.json"), "--out-dir", str(tmp_path / "runs")]) == 0
    out = json.loads((tmp_path / "q.json").read_text())
    rows = {r["setting"]: r for r in out["rows"]}
    assert list(rows) == names and out["steps"] == 2
    sizes = {"vq": 128, "kmeans+restarts": 128, "fsq": 1000, "lfq": 1024}
    for name, r in rows.items():
        assert r["codebook_size"] == sizes[name] and r["eval_samples"] == 16
        assert 0 < r["psnr"] < 60 and 0 < r["usage"] <= 1 and r["perplexity"] >= 1
    table = capsys.readouterr().out
    assert all(f"\n{name} " in table for name in names)
    # each setting trained its own quantizer: the saved configs say so
    import yaml
    kinds = {n: yaml.safe_load((tmp_path / "runs" / n.replace("+", "_") / "config.yaml").read_text())["vqgan"]["quantizer"]
             for n in names}
    assert [kinds[n]["kind"] for n in names] == ["vq", "vq", "fsq", "lfq"]
    assert kinds["kmeans+restarts"]["kmeans_init"] and kinds["kmeans+restarts"]["dead_code_threshold"] > 0
