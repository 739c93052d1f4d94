"""The distributed environment: read it from torchrun, the deepspeed launcher or SLURM, then init.

torchrun and the deepspeed launcher both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. Under `srun` (plain sbatch or submitit) only SLURM_* variables exist, so the master
address comes from the first host of SLURM_JOB_NODELIST and the port is derived from the job id
(every task of a job computes the same one).
"""
from __future__ import annotations

import datetime
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | slurm
    # Where master_addr / master_port came from, for error messages (e.g. "MASTER_ADDR",
    # "the first host of SLURM_JOB_NODELIST=gpu[01-04]").
    addr_from: str = "the default"
    port_from: str = "the default"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for r in ranges.split(","):
        if "-" in r:
            lo, hi = r.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"cannot parse range {r!r} in SLURM node list {nodelist!r}")
            out.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
        else:
            out.append(r)
    return out


def _expand_host(pattern: str, nodelist: str) -> list[str]:
    """`a[1-2]b[3-4]` -> a1b3 a1b4 a2b3 a2b4 (each bracket group multiplies, as scontrol does)."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [f"{head}{r}{rest}" for r in _expand_ranges(m.group(1), nodelist) for rest in _expand_host(tail, nodelist)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as `gpu[01-04,07],cpu3` into host names, in order."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        if part.strip():
            hosts.extend(_expand_host(part.strip(), nodelist))
    return hosts


def _int_env(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def env_from_environ(environ: dict | None = None) -> DistEnv:
    """Derive rank, world size and rendezvous from the launcher's environment variables."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(
                f"inconsistent launcher environment: RANK/WORLD_SIZE are set but {', '.join(missing)} "
                "missing; start with torchrun or the deepspeed launcher, or unset RANK/WORLD_SIZE"
            )
        world = _int_env(env, "WORLD_SIZE")
        rank = _int_env(env, "RANK")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        local_world = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int_env(env, "SLURM_NTASKS")
        rank = _int_env(env, "SLURM_PROCID")
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        local_world = _int_env(env, "SLURM_NTASKS_PER_NODE") if env.get("SLURM_NTASKS_PER_NODE", "").isdigit() else 1
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if world > 1 and not nodelist and "MASTER_ADDR" not in env:
            raise ValueError("SLURM_NTASKS > 1 but neither SLURM_JOB_NODELIST nor MASTER_ADDR is set")
        addr = env.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1")
        addr_from = ("MASTER_ADDR" if env.get("MASTER_ADDR") else
                     f"the first host of SLURM_JOB_NODELIST={nodelist}" if nodelist else "the default")
        job_id = env.get("SLURM_JOB_ID", "0")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000
        port_from = "MASTER_PORT" if "MASTER_PORT" in env else f"SLURM_JOB_ID={job_id} (20000 + id mod 20000)"
        if not 0 <= rank < world:
            raise ValueError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world}")
        return DistEnv(rank, world, local_rank, local_world, addr, port, "slurm", addr_from, port_from)
    else:
        return DistEnv()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistEnv(rank, world, local_rank, local_world, env["MASTER_ADDR"], int(env["MASTER_PORT"]), source,
                   "MASTER_ADDR", "MASTER_PORT")


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class MasterUnreachable(ValueError):
    """The rendezvous address is wrong for this rank: a setting to fix, printed by the CLI as one line."""


def check_master(env: DistEnv, connect_timeout_s: float = 60) -> None:
    """Fail in seconds, not after the rendezvous timeout, when the master cannot be reached.

    c10d retries a rendezvous whose host does not resolve or does not answer until its timeout (30
    minutes at start-up here) and prints nothing but its IPv6 warnings meanwhile. So first: the
    address must resolve on every rank, and every rank but 0 (which serves the rendezvous, or whose
    launcher does) must be able to open a TCP connection to it within `connect_timeout_s` (rank 0
    may start a little later; retried every half second). 0 skips the connection test."""
    if not env.is_distributed:
        return
    import socket
    import time

    where = (f"master {env.master_addr}:{env.master_port} (host from {env.addr_from}, port from {env.port_from}), "
             f"seen from rank {env.rank}")
    fix = ("pass a host every node can resolve and reach: `taming-dist launch ... --master-addr HOST`, or export "
           "MASTER_ADDR=HOST (and MASTER_PORT) before the launcher")
    try:
        socket.getaddrinfo(env.master_addr, env.master_port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MasterUnreachable(f"{where}: the host name does not resolve ({e.strerror}); {fix}") from None
    if env.rank == 0 or connect_timeout_s <= 0:
        return
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            with socket.create_connection((env.master_addr, env.master_port),
                                          timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise MasterUnreachable(f"{where}: no connection within {connect_timeout_s:g} s "
                                   f"(engine.master_connect_timeout_s; last error: {e}); is rank 0 running, and is the "
                                   f"port open between the nodes? {fix}") from None
        time.sleep(0.5)


def init_distributed(env: DistEnv, timeout_s: int = 1800, connect_timeout_s: float = 60) -> torch.device:
    """Initialise the default process group (nccl on GPUs, gloo on CPU) when world_size > 1, after
    checking that the master can be reached (check_master)."""
    import torch.distributed as dist

    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A failed or timed-out NCCL collective aborts its communicator and ends the process (1 =
    # TearDown), instead of leaving the rank blocked while it holds its GPU. gloo raises instead.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if env.is_distributed and not dist.is_initialized():
        check_master(env, connect_timeout_s)
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def set_collective_timeout(seconds: float) -> None:
    """Timeout of every later collective on every process group this rank belongs to (the default
    group, FSDP2's mesh groups, DeepSpeed's): a rank that hangs or died makes the others fail after
    `seconds` instead of the 30 minutes of the default."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    groups = list(getattr(c10d._world, "pg_map", {})) or [c10d._get_default_group()]
    for group in groups:
        group.set_timeout(datetime.timedelta(seconds=seconds))


@contextmanager
def long_collectives(cfg):
    """engine.startup_timeout_s for a block (checkpoint writes, exports, image grids), then back to
    engine.collective_timeout_s."""
    set_collective_timeout(cfg.engine.startup_timeout_s)
    try:
        yield
    finally:
        set_collective_timeout(cfg.engine.collective_timeout_s)


def ensure_process_group(device: torch.device) -> None:
    """A process group even for one process: FSDP2's device mesh and DeepSpeed need one."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def exit_process(code: int = 0) -> NoReturn:
    """End this process with status `code`; with a process group, without interpreter shutdown.

    gloo's worker threads let go of a finished collective (and the tensors it holds, each with a
    reference to its Python object) after the rank that waited on it has moved on. When that
    happens once interpreter shutdown has begun, the thread cannot take the GIL and the process
    aborts ("terminate called without an active exception", SIGABRT), so a rank that finished its
    work reads as failed to torchrun or srun (docs/platform-notes.md, "Processes": 2-3 of 8
    two-rank runs of tools/bench_train.py on a loaded 2-core machine). destroy_process_group does
    not prevent it: FSDP2's meshes and DeepSpeed keep the groups, and their threads, alive.

    So a rank with a process group meets the others at a barrier when it succeeded (none leaves
    while a peer may still talk to it), finishes wandb, flushes its logs and output, and leaves with
    os._exit. Every file the run writes is closed by then (checkpoints, logs, exports). Without a
    process group this is sys.exit(code)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    if code == 0 and dist.get_world_size() > 1:
        dist.barrier()
    leave_now(code)


def leave_now(code: int) -> NoReturn:
    """os._exit(code) after what interpreter shutdown would have done that matters here: wandb's
    teardown (its service process), logging's handlers, stdout and stderr."""
    import logging

    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        try:
            wandb.teardown(code)
        except Exception as e:  # leaving regardless: say why wandb may not have synced
            print(f"wandb teardown failed: {e!r}", file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
