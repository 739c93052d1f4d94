"""A rank that finished must end with status 0 (taming_dist/engines/dist.py: exit_process).

gloo's worker thread lets go of a finished collective, and of its tensors' Python objects, after the
rank that started it moved on; if that falls after interpreter shutdown began, the thread cannot take
the GIL and the process aborts ("terminate called without an active exception"). A fresh-clone CI
run failed on it: tools/bench_train.py's rank 0 aborted after it had printed its table.
tests/distributed/late_collective.py makes the timing certain: rank 1 joins an all_gather a second
late, after rank 0 dropped it. The negative case shows the scenario does abort a rank that ends by
interpreter shutdown (so the positive case is not vacuous); exit_process ends both ranks with 0.
"""
import subprocess
import sys

import pytest

from tests.distributed.util import REPO, free_port, test_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = REPO / "tests" / "distributed" / "late_collective.py"
ABORT = "terminate called without an active exception"


def launch(mode: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(SCRIPT), mode, "1.0"]
    return subprocess.run(cmd, cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300)


def test_a_rank_that_ends_by_interpreter_shutdown_aborts_on_a_late_collective():
    p = launch("shutdown")
    out = p.stdout + p.stderr
    assert "rank 0: at the end" in out and "rank 1: at the end" in out, out[-3000:]
    assert p.returncode != 0 and ABORT in out, (
        "the late all_gather no longer aborts a rank at interpreter shutdown with this torch: the scenario "
        f"does not test exit_process any more (status {p.returncode}):\n{out[-3000:]}")


def test_exit_process_ends_both_ranks_with_status_0_after_a_late_collective():
    p = launch("exit_process")
    out = p.stdout + p.stderr
    assert p.returncode == 0 and ABORT not in out, f"status {p.returncode}:\n{out[-3000:]}"
    assert "rank 0: at the end" in out and "rank 1: at the end" in out
