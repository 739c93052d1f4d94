"""Checkpoint format 3 (Stateful parts DCP can see) and format 2 (kept as test data), on 2 gloo ranks
and resharded onto one process: each rank's RNG and data position come back to that rank; at
another world size every rank takes rank 0's data position and keeps its RNG."""
import json
import shutil

import pytest

from tests.distributed.util import REPO, run

pytestmark = pytest.mark.slow

SCRIPT = "tests.distributed.checkpoint_ranks"  # run as a module: it imports the harness
V2 = REPO / "tests" / "data" / "ckpt_v2"


def _json(path):
    return json.loads(path.read_text())


def _same_sums(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """A format-3 checkpoint of the same run as tests/data/ckpt_v2, written by this code on 2 ranks."""
    out = tmp_path_factory.mktemp("v3")
    run(["-m", SCRIPT, "save", str(out)], nproc=2, timeout=300)
    return out


def _checkpoints(which, v3):
    return V2 if which == "v2" else v3


@pytest.mark.parametrize("which", ["v2", "v3"])
def test_resume_on_the_same_ranks_is_exact(tmp_path, v3, which):
    src = _checkpoints(which, v3)
    if which == "v2":  # read-only test data: resume from a copy
        src = tmp_path / "ckpts"
        shutil.copytree(V2, src)
    run(["-m", SCRIPT, "resume", str(src), str(tmp_path)], nproc=2, timeout=300)
    for rank in (0, 1):
        want, got = _json(src / f"expected_rank{rank}.json"), _json(tmp_path / f"got_rank{rank}.json")
        assert got["format"] == (2 if which == "v2" else 3)
        assert (got["step"], got["skipped_total"]) == (2, 1)
        assert got["data"] == want["data"] == {"epoch": 0, "batches_in_epoch": 3 - rank}  # its own rank's
        for key in ("next_torch", "next_numpy", "next_python"):  # this rank's RNG streams, continued
            assert got[key] == want[key], (rank, key)
        _same_sums(got["weight_sums"], want["weight_sums"])
        _same_sums(got["ema_sums"], want["ema_sums"])
        assert got["loss_step3"] == pytest.approx(want["loss_step3"], rel=1e-6)  # optimizer state and schedule too


@pytest.mark.parametrize("which", ["v2", "v3"])
def test_resharded_resume_on_one_process_takes_rank0_data_and_keeps_its_rng(tmp_path, v3, which):
    src = _checkpoints(which, v3)
    if which == "v2":
        src = tmp_path / "ckpts"
        shutil.copytree(V2, src)
    run(["-m", SCRIPT, "resume", str(src), str(tmp_path)], nproc=1, timeout=300)
    want0, want1 = _json(src / "expected_rank0.json"), _json(src / "expected_rank1.json")
    got = _json(tmp_path / "got_rank0.json")
    assert (got["step"], got["skipped_total"]) == (2, 1)
    assert got["data"] == want0["data"] != want1["data"]
    _same_sums(got["weight_sums"], want0["weight_sums"])
    _same_sums(got["ema_sums"], want0["ema_sums"])
    # The RNG stays as seeded before the load (torch.manual_seed(7) in the script): not rank 0's.
    import torch

    torch.manual_seed(7)
    assert got["next_torch"] == torch.rand(4).tolist() != want0["next_torch"]
