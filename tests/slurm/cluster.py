"""A real SLURM cluster on this machine, for the launcher tests: munged, slurmctld and one slurmd per
simulated node, run as root on loopback from a private folder.

Settings follow docs/platform-notes.md ("SLURM on one machine"): Debian's Slurm 22.05,
no accounting, no cgroups. Several slurmd daemons on one host simulate several nodes; their names
(n1, n2) do not resolve, so multi-node jobs must be told MASTER_ADDR=127.0.0.1.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.distributed.util import pids_with_env

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]
PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo"]


def unusable_reason() -> str | None:
    """Install the Debian packages when a program is missing; why SLURM cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root: the test daemons run as root (SlurmUser=root) and installing them needs root"
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    if not shutil.which("apt-get"):
        return "SLURM programs missing and no apt-get to install Debian's " + " ".join(PACKAGES)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for another apt-get holding the lock rather than fail at once.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *PACKAGES]
    p = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:  # a stale package index: refresh it once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        p = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0 or not all(shutil.which(x) for x in PROGRAMS):
        return f"`{' '.join(install)}` failed ({p.returncode}): {(p.stdout + p.stderr)[-1500:]}"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged + slurmctld + one slurmd per name in `nodes`, configured under `root`."""

    def __init__(self, nodes: list[str], cpus_per_node: int = 2):
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.root = Path(tempfile.mkdtemp(prefix="taming-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # ---- life cycle ----
    def start(self) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[int]:
        """Cancel jobs, wait for the queue to drain, then stop slurmd, slurmctld and munged in that
        order: stopping slurmd first while jobs run leaves orphaned slurmstepd processes. Returns the
        job processes that outlived the daemons (killed here; there should be none)."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._daemons):
            self.cmd(["scancel", "--full", "--partition=debug"], check=False)
            deadline = time.time() + 60
            while time.time() < deadline and self.cmd(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                time.sleep(0.5)
        order = [d for d in self._daemons if d[0].startswith("slurmd")] + \
                [d for d in self._daemons if d[0] == "slurmctld"] + [d for d in self._daemons if d[0] == "munged"]
        for _, p in order:
            _terminate(p)
        self._daemons.clear()
        # Job processes exit shortly after their slurmstepd: give them a moment before calling them orphans.
        deadline = time.time() + 10
        while self.leftover_pids() and time.time() < deadline:
            time.sleep(0.2)
        orphans = self.leftover_pids()
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        return orphans

    def leftover_pids(self) -> list[int]:
        """Processes that still carry this cluster's SLURM_CONF: jobs or step daemons it started."""
        return pids_with_env(python_only=False, SLURM_CONF=str(self.conf))

    # ---- commands ----
    def cmd(self, args: list[str], check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}\n{self.logs()}")
        return p

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once it is forgotten."""
        p = self.cmd(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout)) if p.returncode == 0 else {}

    def wait_job(self, job_id: str, states: set[str], timeout: float = 240, poll: float = 0.5) -> dict[str, str]:
        """Poll `scontrol show job` until the job's state is one of `states` (job.result() can hang
        forever on a job that died, see platform facts)."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    # ---- internals ----
    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o755)
        os.chmod(self.root, 0o755)  # munged refuses a socket whose folder others cannot traverse
        (self.root / "log").mkdir()
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket = mdir / "munge.socket.2"
        self._spawn("munged", ["munged", "-F", f"--socket={self.socket}", f"--key-file={key}",
                               f"--pid-file={mdir / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={mdir / 'munged.seed'}"])
        deadline = time.time() + 20
        while not self.socket.exists():
            if time.time() > deadline:
                raise RuntimeError(f"munged did not create {self.socket}\n{self.logs()}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        (r / "state").mkdir()
        for n in self.nodes:
            (r / "spool" / n).mkdir(parents=True)
        lines = [
            "ClusterName=taming",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.socket}",
            "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "ReturnToService=2",
            # Report the configured CPUs whatever this machine has.
            "SlurmdParameters=config_overrides",
            # Seconds between SIGTERM and SIGKILL when a job ends or is requeued (default 30).
            "KillWait=5",
            # Keep finished jobs visible to `scontrol show job` for the tests' polling.
            "MinJobAge=600",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
        ]
        for n, port in zip(self.nodes, node_ports):
            host = "" if n == "localhost" else " NodeHostname=localhost"
            lines.append(f"NodeName={n}{host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} RealMemory=4000 "
                         "State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout.log", "w")
        # Own session: a Ctrl-C in the test terminal reaches pytest (which stops us in order), not the
        # daemons directly. If pytest itself is killed, the kernel sends them SIGTERM (no daemons left).
        p = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=_terminate_with_parent)
        log.close()
        self._daemons.append((name, p))

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            for name, p in self._daemons:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}\n{self.logs()}")
            out = self.cmd(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if set(states) == set(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout}s: {out!r}\n{self.logs()}")


def _terminate_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _terminate(p: subprocess.Popen, timeout: float = 15) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
