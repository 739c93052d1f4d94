"""Launch helpers for multi-process tests (torchrun on CPU with gloo)."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range is 32768-60999


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range. A port from bind(0) is ephemeral, and an
    outgoing connection of another job (a rank reaching its own store) could take it before this
    job's rank 0 listens on it: a fresh-clone run failed once with EADDRINUSE that way."""
    low, rng = _ephemeral_low(), random.SystemRandom()  # not the global state a test may have seeded
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free below the range: an ephemeral port as before
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ds_accelerator() -> str:
    """DeepSpeed's accelerator for the ranks a test starts: the one their device is (the GPU tests
    run on CUDA; everything else on the CPU, where naming it skips DeepSpeed's probing)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def test_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
                "TAMING_DIST_CACHE": str(REPO / ".cache" / "taming_dist"), "DS_ACCELERATOR": _ds_accelerator()})
    env.update(extra)
    return env


test_env.__test__ = False  # a helper: pytest would collect it as a test where a test file imports it


def run(args: list[str], nproc: int = 1, timeout: int = 600, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`python args...` in one process, or under torchrun with `nproc` processes."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "--master_addr=127.0.0.1", *args]
    else:
        cmd = [sys.executable, *args]
    p = subprocess.run(cmd, cwd=cwd or REPO, env=env or test_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


def cli(args: list[str]) -> None:
    """`taming-dist args...` in this process (no interpreter and torch import to pay for): for the
    one-process commands a test chains after a training run (convert, export, import-taming)."""
    from taming_dist.cli import main

    code = main([str(a) for a in args])
    assert code == 0, f"taming-dist {' '.join(map(str, args))} exited {code}"


def pids_with_env(*, python_only: bool = True, skip_cmdline: tuple[bytes, ...] = (), **match: str) -> list[int]:
    """Processes other than this one whose environment holds every KEY=value of `match` (a test
    tags the processes it starts with a unique variable, and picks a rank by RANK or SLURM_PROCID).
    `python_only`: Python interpreters only; `skip_cmdline`: leave out command lines holding any of
    these."""
    want = {f"{k}={v}".encode() for k, v in match.items()}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()
            if (python_only and b"python" not in cmdline) or any(s in cmdline for s in skip_cmdline):
                continue
            if want <= set((d / "environ").read_bytes().split(b"\0")):
                found.append(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def step_lines(run_dir: Path) -> list[dict]:
    """The metric lines of a run's log.txt, in the order written."""
    import json

    log = Path(run_dir) / "log.txt"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"step"')]
