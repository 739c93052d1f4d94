"""Real SLURM daemons for the launcher tests, started once per session and stopped at its end.

`slurm`: one node named localhost (2 CPUs). `slurm2`: two simulated nodes n1 and n2 (2 CPUs each)
served by two slurmd on this machine. The Debian packages are installed when missing; the tests are
skipped, with the reason, only when that is impossible (not root, no apt-get, install failed).
"""
import pytest

from tests.slurm.cluster import SlurmCluster, unusable_reason


def _cluster(nodes):
    reason = unusable_reason()
    if reason:
        pytest.skip(f"no usable SLURM: {reason}")
    cluster = SlurmCluster(nodes).start()
    yield cluster
    orphans = cluster.stop()
    assert not orphans, f"SLURM job processes {orphans} outlived the daemons"


@pytest.fixture(scope="session")
def slurm():
    yield from _cluster(["localhost"])


@pytest.fixture(scope="session")
def slurm2():
    yield from _cluster(["n1", "n2"])
