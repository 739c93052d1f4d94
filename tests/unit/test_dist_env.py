import pytest

from taming_dist.engines.dist import env_from_environ, expand_nodelist


@pytest.mark.parametrize("text,hosts", [
    ("node1", ["node1"]),
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("a[1-3]", ["a1", "a2", "a3"]),
    ("rack[9-11]-n", ["rack9-n", "rack10-n", "rack11-n"]),
    ("x,y[002-003]", ["x", "y002", "y003"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


def test_torchrun_env():
    env = env_from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                            "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "h0", 1234)
    assert env.source == "torchrun"


def test_slurm_env_derives_master_and_port():
    env = env_from_environ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                            "SLURM_JOB_NODELIST": "gpu[03-06]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert env.master_addr == "gpu03" and env.master_port == 20000 + 4242 % 20000
    # every task of the job derives the same rendezvous
    env2 = env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[03-06]",
                             "SLURM_JOB_ID": "4242"})
    assert (env2.master_addr, env2.master_port) == (env.master_addr, env.master_port)


def test_single_process_default():
    env = env_from_environ({})
    assert env.world_size == 1 and not env.is_distributed


def test_inconsistent_env_says_what_is_missing():
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT"):
        env_from_environ({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK=2 is outside WORLD_SIZE=2"):
        env_from_environ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="not an integer"):
        env_from_environ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"})


def test_slurm_explicit_master_wins_and_single_task_needs_no_nodelist():
    env = env_from_environ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]",
                            "SLURM_JOB_ID": "7", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"})
    assert (env.master_addr, env.master_port, env.source) == ("127.0.0.1", 29999, "slurm")
    env = env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # `srun -n1 python ...` on a login node
    assert env.world_size == 1 and not env.is_distributed
    with pytest.raises(ValueError, match="neither SLURM_JOB_NODELIST nor MASTER_ADDR"):
        env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"})


def test_launcher_variables_win_over_slurm_ones():
    # torchrun or the deepspeed launcher inside an salloc/sbatch allocation: both sets are present.
    env = env_from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                            "SLURM_JOB_NODELIST": "gpu01", "SLURM_JOB_ID": "9"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "torchrun")


def test_deepspeed_launcher_environment():
    # exactly what deepspeed/launcher/launch.py exports to each process (plus CROSS_RANK/LOCAL_SIZE)
    env = env_from_environ({"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": "29500", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 2, 0, 29500)


def test_slurm_rank_outside_ntasks_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        env_from_environ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"})


def test_expand_nodelist_several_brackets_in_one_name():
    # `scontrol show hostnames 'a[1-2]b[3-4]'` on Slurm 22.05
    assert expand_nodelist("a[1-2]b[3-4]") == ["a1b3", "a1b4", "a2b3", "a2b4"]


# ---- an unreachable master fails in seconds (engines/dist.py: check_master) ----
def _free_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nobody listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_master_name_that_does_not_resolve_fails_at_once_naming_where_it_came_from():
    import time

    from taming_dist.engines.dist import MasterUnreachable, check_master

    env = env_from_environ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "nosuchnode[1-2].invalid",
                            "SLURM_JOB_ID": "77"})
    t0 = time.monotonic()
    with pytest.raises(MasterUnreachable) as e:
        check_master(env, connect_timeout_s=60)
    msg = str(e.value)
    assert time.monotonic() - t0 < 15
    for part in ("nosuchnode1.invalid", "does not resolve", "SLURM_JOB_NODELIST=nosuchnode[1-2].invalid",
                 "SLURM_JOB_ID=77", "--master-addr", "MASTER_ADDR"):
        assert part in msg, (part, msg)


def test_a_port_nobody_listens_on_fails_after_the_connect_timeout():
    import socket
    import time

    from taming_dist.engines.dist import MasterUnreachable, check_master

    port = _free_port()
    env = env_from_environ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    t0 = time.monotonic()
    with pytest.raises(MasterUnreachable, match=rf"master 127.0.0.1:{port} \(host from MASTER_ADDR, port from MASTER_PORT\)"
                       r".*no connection within 2 s") as e:
        check_master(env, connect_timeout_s=2)
    assert 2 <= time.monotonic() - t0 < 10 and "MASTER_ADDR=HOST" in str(e.value)
    # rank 0 serves the rendezvous: it only resolves the name; the same port is fine for it
    check_master(env_from_environ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}), connect_timeout_s=2)
    # Control: once something listens there, rank 1 passes the check.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        check_master(env, connect_timeout_s=2)


def test_train_checks_the_master_before_the_rendezvous(tmp_path):
    """Wired into train(): a rank of a 2-rank job whose master does not resolve exits in seconds (c10d
    alone would retry for engine.startup_timeout_s)."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "nosuchmaster.invalid",
           "MASTER_PORT": "29999", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "taming_dist", "train", "vqgan-tiny", f"out_dir={tmp_path}",
                        "logging.wandb_mode=disabled"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    assert "nosuchmaster.invalid:29999 (host from MASTER_ADDR" in p.stderr and "does not resolve" in p.stderr, p.stderr[-3000:]
    assert "taming-dist train: error: master" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]


def test_the_tests_free_port_is_below_the_ephemeral_range():
    """Multi-process tests take their rendezvous port from tests/distributed/util.free_port: below
    the kernel's ephemeral range, so another job's outgoing connection cannot hold it (EADDRINUSE
    was seen once with a port from bind(0))."""
    import socket

    from tests.distributed.util import _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(10000 <= p < _ephemeral_low() for p in ports), ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free indeed


EXIT_PROBE = """
import atexit, sys
import torch
from taming_dist.engines.dist import ensure_process_group, exit_process
atexit.register(lambda: print("atexit ran"))
if sys.argv[1] == "group":
    ensure_process_group(torch.device("cpu"))
print("unflushed output", end="")
exit_process(3)
"""


@pytest.mark.parametrize("group", [True, False])
def test_exit_process_skips_interpreter_shutdown_only_with_a_process_group(group):
    """With a process group: the status, the output flushed, and no interpreter shutdown (the atexit
    handler never runs; tests/distributed/test_process_exit.py shows why). Without one: sys.exit."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", EXIT_PROBE, "group" if group else "none"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stdout.startswith("unflushed output")
    assert ("atexit ran" in p.stdout) is not group, p.stdout


def test_the_taming_dist_program_ends_through_exit_process():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["taming-dist"] == "taming_dist.cli:program"
    assert "program()" in (root / "taming_dist" / "__main__.py").read_text()
