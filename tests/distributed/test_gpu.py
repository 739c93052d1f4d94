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
    specs = [f"{s}:{e}:{precision}" for s in ("vqgan", "transformer") for e in ("single:2", "deepspeed:2", "deepspeed:3")]
    specs += [f"transformer:fsdp:2:{precision}"]
    run([HARNESS, str(tmp_path / "out.json"), *specs], nproc=1)
    results = json.loads((tmp_path / "out.json").read_text())
    for spec, r in results.items():
        losses = [h["loss"] for h in r["history"] if "loss" in h]
        assert losses and all(l == l and abs(l) < 1e4 for l in losses), (spec, losses)
        assert sum(h.get("skipped", 0.0) for h in r["history"]) <= 2, spec  # a scaler may skip its first steps
