"""fp16 with loss scaling and bf16 on CUDA (GradScaler / DeepSpeed's scaler / FSDP2's sharded
scaler). Skipped, with the reason, on machines without a CUDA device (as in CI)."""
import json

import pytest
import torch

from tests.distributed.util import REPO, run

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: fp16 loss scaling "
                                 "and NCCL only run on GPUs (tested when a GPU machine is lent)")]
HARNESS = str(REPO / "tests" / "distributed" / "harness.py")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_cuda(tmp_path, precision):
    # world size 1 over NCCL: one process, the engines' CUDA paths (scalers, FusedAdam, fused AdamW)
    engines = ("single:2", "fsdp:2", "deepspeed:1", "deepspeed:2", "deepspeed:3")
    specs = [f"{s}:{e}:{precision}" for s in ("vqgan", "transformer") for e in engines]
    run([HARNESS, str(tmp_path), *specs], nproc=1)
    results = json.loads((tmp_path / "results.json").read_text())
    for spec, r in results.items():
        losses = [h["loss"] for h in r["history"] if "loss" in h]
        assert losses and all(l == l and abs(l) < 1e4 for l in losses), (spec, losses)
        assert sum(h.get("skipped", 0.0) for h in r["history"]) <= 2, spec  # a scaler may skip its first steps


def test_compile_on_cuda(tmp_path):
    specs = [f"transformer:{e}:bf16:noac" for e in ("single:2", "fsdp:2", "deepspeed:2")]
    run([HARNESS, str(tmp_path), *specs, *[f"{s}:engine.compile=true" for s in specs]], nproc=1)
    results = json.loads((tmp_path / "results.json").read_text())
    for s in specs:
        eager, compiled = results[s], results[f"{s}:engine.compile=true"]
        assert compiled["probes"]["graphs"] > 0, s
        for a, b in zip(eager["history"], compiled["history"]):
            assert abs(a["loss"] - b["loss"]) <= 2e-2 * abs(a["loss"]), (s, a["loss"], b["loss"])  # bf16
