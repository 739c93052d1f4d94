"""FSDP2 in bf16 when a unit's first forward is a frozen call (the discriminator in the generator step).

The first CUDA run (torch 2.11) failed here on every FSDP2 VQGAN in bf16 and fp16: "attempting to
assign a gradient with dtype 'BFloat16' to a tensor with grad_dtype 'Float'". FSDP2 fixes each
group's gradient dtypes at the root's lazy init from the parameters that require a gradient then;
torch 2.11 leaves them unset when none do, and the discriminator's first forward runs frozen. The
torch this suite pins falls back to the frozen parameters' dtypes, so a plain run here passes with or
without the engine's fix (`fsdp_lazy_init`): these runs put torch 2.11's rule back, and show the step
passing with the fix and failing, with that error, without it."""
import json
import sys

import pytest

from tests.distributed.util import REPO, test_env

pytestmark = [pytest.mark.slow, pytest.mark.one_process]

# One process (FSDP2 over a world of one, gloo): torch 2.11's rule for a group's gradient dtypes in
# place of this torch's, then the equivalence harness on a bf16 FSDP2 VQGAN with the GAN terms from
# step 0 (its discriminator's first forward is the generator step's frozen call).
SCRIPT = """
import runpy, sys
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as groups

def rule_of_torch_2_11(self):  # no trainable parameter at lazy init: no gradient dtypes at all
    for p in self.fsdp_params:
        p.init_dtype_attrs(self.mp_policy)
    trainable = [p for p in self.fsdp_params if p.sharded_param.requires_grad]
    self._orig_dtype = trainable[0].orig_dtype if trainable else None
    self._reduce_dtype = trainable[0].reduce_dtype if trainable else None

groups.FSDPParamGroup._init_mp_dtypes = rule_of_torch_2_11
if sys.argv[1] == "without-fix":
    import taming_dist.engines.torch_engine as torch_engine
    torch_engine.fsdp_lazy_init = lambda module: None
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(tmp_path, mode):
    import subprocess

    out = tmp_path / mode
    out.mkdir()
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(REPO / "tests" / "distributed" / "harness.py"),
                           str(out), "vqgan:fsdp:2:bf16"], cwd=REPO, env=test_env(), capture_output=True,
                          text=True, timeout=300), out


def test_fsdp_bf16_discriminator_first_called_frozen_gets_fp32_gradients(tmp_path):
    fixed, out = _run(tmp_path, "with-fix")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    history = json.loads((out / "results.json").read_text())["vqgan:fsdp:2:bf16"]["history"]
    assert all(h["loss"] == h["loss"] for h in history if "loss" in h) and len(history) >= 2
    # the negative control: the same run without the engine's lazy init fails as the GPU run did
    broken, _ = _run(tmp_path, "without-fix")
    assert broken.returncode != 0 and "to a tensor with grad_dtype 'Float'" in broken.stderr, broken.stderr[-3000:]
