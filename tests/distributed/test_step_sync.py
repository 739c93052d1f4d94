"""No host sync or collective per micro-batch (tasks/base.py: reduce_step): for both stages on every
engine, on 2 gloo ranks with 2 micro-batches per step, the collectives and host reads of a step that
does not log are counted (tests/distributed/step_counts.py wraps torch.distributed's collectives and
Tensor.item / __float__ / __int__ / __bool__ / tolist).

Allowed per step: one fused all-reduce (flags, statistics, the loop's stop flag and clock) and one
host read of it; the adaptive GAN weight's mean over ranks (2 per VQGAN micro-batch); the engine's
own collectives (DDP's bucketed reductions and FSDP2's all-gathers / reduce-scatters run below
torch.distributed's Python functions and are not seen; DeepSpeed's ZeRO collectives are) and the global gradient
norm over shards (FSDP2). Not ours and not counted against us: host reads inside DeepSpeed (its
overflow and norm checks) and inside torch (the CPU AdamW reads its step counter; the fused CUDA
kernel does not). Nothing else: in particular no collective and no read of ours per micro-batch.
"""
import json

import pytest

from tests.distributed.util import REPO, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ENGINES = ["ddp", "fsdp", "deepspeed:1", "deepspeed:2", "deepspeed:3"]
SPECS = [f"{stage}:{e}" for stage in ("vqgan", "transformer") for e in ENGINES] + ["vqgan:ddp:break",
                                                                                  "transformer:fsdp:break"]


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("counts") / "counts.json"
    run([str(REPO / "tests" / "distributed" / "step_counts.py"), str(out), *SPECS], nproc=2, timeout=900)
    return json.loads(out.read_text())


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.endswith("break")])
def test_one_fused_all_reduce_and_one_host_read_per_step(counts, spec):
    r = counts[spec]
    c, reads = r["collectives"], r["reads"]
    where = json.dumps(r["where"], indent=1)
    assert c.get("other", 0) == 0, f"collectives of ours outside the fused reduce: {where}"
    assert c.get("fused") == 1, where
    assert c.get("gan_weight", 0) == (2 * r["micro_batches"] if spec.startswith("vqgan") else 0), where
    assert reads.get("ours", 0) == 0 and reads.get("fused") == 1, f"host reads of ours: {where}"
    # rank 1's stop flag and rank 0's clock reach every rank in the same all-reduce (rank 0's view)
    assert r["skipped"] == 0.0 and r["received"] == {"stop": 1.0, "clock": 100.0}
    if "fsdp" in spec:  # the global norm over shards: one all-reduce per unit
        assert c.get("grad_norm", 0) == (2 if spec.startswith("vqgan") else 1), where
    if "deepspeed:3" in spec:  # ZeRO-3's own gathers and reduce-scatters are seen (and not counted as ours)
        assert c.get("engine", 0) > 0, where


@pytest.mark.parametrize("spec", ["vqgan:ddp:break", "transformer:fsdp:break"])
def test_a_collective_and_a_read_per_micro_batch_are_caught(counts, spec):
    """Negative control: the same step with an all-reduce and a float() per micro-batch (what the
    step did before: a finite check per micro-batch) fails the check above."""
    r = counts[spec]
    assert r["collectives"].get("other", 0) >= r["micro_batches"]
    assert r["reads"].get("ours", 0) >= r["micro_batches"]
