"""The SLURM options of a training job, and a readable sbatch script that runs it.

`SlurmResources` is shared with the submitit launcher. `render_script` writes a script that starts one
`srun` task per GPU running `python -m taming_dist train`, asks SLURM for SIGUSR1 before the time
limit, and requeues the job when training stops with a checkpoint (exit status 75).
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from taming_dist.launch.requeue import DEFAULT_MAX_FAILURES, shell_setup
from taming_dist.train import EXIT_STOPPED

# sbatch options the launchers set themselves: passing them as extras would break rank layout,
# logging or the stop-and-requeue contract.
MANAGED = {"nodes", "ntasks-per-node", "ntasks", "signal", "requeue", "no-requeue", "open-mode", "output", "error",
           "job-name", "time", "chdir"}


def parse_extra_sbatch(extra: dict | list | tuple | None) -> dict[str, str | bool]:
    """Extra sbatch options as {option: value or True}, from a dict or from strings such as
    "--exclusive", "gres=gpu:8" or "--mail-type=END"."""
    if not extra:
        return {}
    items = extra.items() if isinstance(extra, dict) else [_split_option(str(o)) for o in extra]
    out: dict[str, str | bool] = {}
    for key, value in items:
        key = str(key).lstrip("-").replace("_", "-")
        if not key:
            raise ValueError(f"empty sbatch option in extra_sbatch={extra!r}")
        if key in MANAGED:
            raise ValueError(f"extra sbatch option --{key} is set by the launcher; use its own argument "
                             f"(nodes, tasks_per_node, time_min, job_name, ...) instead")
        out[key] = value if value is True else str(value)
    return out


def _split_option(option: str) -> tuple[str, str | bool]:
    key, sep, value = option.partition("=")
    return (key, value) if sep else (key, True)


@dataclass(frozen=True)
class SlurmResources:
    """What a training job asks SLURM for. One task per GPU: tasks_per_node defaults to
    gpus_per_node (and to 1 with gpus_per_node=0, a CPU job)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    constraint: str | None = None
    extra_sbatch: dict = field(default_factory=dict)
    job_name: str = "taming-dist"
    # Seconds between the stop signal and the time limit: must cover one step plus a checkpoint write.
    signal_delay_s: int = 120
    # Requeues after a rank failure (a rank died or raised) before the job ends as FAILED; stops on
    # the signal (preemption, time limit) never count (taming_dist/launch/requeue.py).
    max_failures: int = DEFAULT_MAX_FAILURES

    def __post_init__(self):
        object.__setattr__(self, "extra_sbatch", parse_extra_sbatch(self.extra_sbatch))
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes}: need at least 1 node")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node={self.gpus_per_node} is negative")
        if self.ntasks_per_node < 1:
            raise ValueError(f"tasks_per_node={self.tasks_per_node}: need at least 1 task per node")
        if self.gpus_per_node and self.ntasks_per_node != self.gpus_per_node:
            raise ValueError(f"tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: "
                             "training runs one task per GPU; leave tasks_per_node unset")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task={self.cpus_per_task}: need at least 1")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"mem_gb={self.mem_gb}: must be positive (or unset for the partition default)")
        if self.max_failures < 0:
            raise ValueError(f"max_failures={self.max_failures}: must be >= 0 (0 = never requeue a failed job)")
        if self.signal_delay_s < 1:
            raise ValueError(f"signal_delay_s={self.signal_delay_s}: must be at least 1 second")
        if self.time_min * 60 <= self.signal_delay_s:
            # The stop signal would come at start: stop, requeue, start, stop... forever.
            raise ValueError(f"time_min={self.time_min} leaves no training time before the stop signal "
                             f"{self.signal_delay_s}s ahead of the limit: raise time_min or lower signal_delay_s")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def run_dir_of(config: str, overrides, base: str | Path) -> Path:
    """The absolute run folder (out_dir/name) the job will train in, with `base` as its working folder."""
    from taming_dist.config import load_config

    cfg = load_config(config, list(overrides))
    return (Path(base) / cfg.out_dir / cfg.name).resolve()


def _time(minutes: int) -> str:
    return f"{minutes // 60}:{minutes % 60:02d}:00"


def _mem(gb: float) -> str:
    return f"{int(gb)}G" if gb == int(gb) else f"{int(gb * 1024)}M"


def _flag(key: str, value) -> str:
    return f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}"


NCCL_NOTES = """\
# NCCL settings worth knowing on GPU clusters (add `export NAME=value` above srun when needed):
#   NCCL_DEBUG=INFO               prints the chosen transport and topology once per rank; WARN is quiet.
#   NCCL_SOCKET_IFNAME=ib0        interface for NCCL's bootstrap and socket traffic when the default
#                                 pick is wrong (docker0, lo); "^docker0,lo" excludes instead.
#   NCCL_IB_HCA=mlx5              which InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP.
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1   a failed or timed-out collective aborts the process instead of
#                                 holding the GPUs until the time limit.
#   NCCL_P2P_DISABLE=1 / NCCL_SHM_DISABLE=1   only to diagnose intra-node transport problems."""


def render_script(config: str, overrides: list[str] | tuple = (), res: SlurmResources | None = None, *,
                  log_dir: str | Path = "slurm_logs", chdir: str | Path | None = None, python: str | None = None,
                  signal: str = "USR1", master_addr: str | None = None, resume: str = "auto") -> str:
    """The text of an sbatch script that trains `config` with `overrides` on `res`."""
    res = res or SlurmResources()
    if signal not in ("USR1", "USR2"):
        raise ValueError(f"signal={signal!r}: use USR1 or USR2 (the training loop stops on both)")
    chdir = Path(chdir or Path.cwd()).resolve()
    log_dir = chdir / log_dir
    python = python or sys.executable
    L = ["#!/bin/bash",
         f"# Train {config!r} with taming-dist on {res.nodes} node(s) x {res.ntasks_per_node} task(s) = "
         f"{res.world_size} process(es){', one per GPU' if res.gpus_per_node else ' on CPUs'}.",
         "# Written by `taming-dist launch sbatch`; submit it with `sbatch THIS_FILE`. Edit freely.",
         "#",
         "# Resources. Every #SBATCH line must come before the first command of the script.",
         _flag("job-name", res.job_name),
         _flag("nodes", res.nodes),
         "# One task (training process) per GPU; each reads its rank from SLURM_PROCID and SLURM_LOCALID.",
         _flag("ntasks-per-node", res.ntasks_per_node)]
    if res.gpus_per_node:
        L.append(_flag("gpus-per-node", res.gpus_per_node))
    if res.cpus_per_task:
        L += ["# CPUs per task: the main thread plus the data-loader workers (data.num_workers).",
              _flag("cpus-per-task", res.cpus_per_task)]
    if res.mem_gb:
        L.append(_flag("mem", _mem(res.mem_gb)))
    L.append(_flag("time", _time(res.time_min)))
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            L.append(_flag(key, getattr(res, key)))
    if res.extra_sbatch:
        L.append("# Extra options given to the launcher.")
        L += [_flag(k, v) for k, v in res.extra_sbatch.items()]
    L += ["#",
          f"# Time limit and preemption: SLURM sends SIG{signal} {res.signal_delay_s}s before the time limit.",
          "# No \"B:\" prefix, on purpose: with it only this batch shell would get the signal; without it",
          "# every task of the job steps does, i.e. every training process. Each one sets a stop flag, the",
          "# ranks agree on it at the next step, all write a checkpoint at that same step, and",
          f"# `taming-dist train` exits with status {EXIT_STOPPED}. The delay must cover one step plus one",
          "# checkpoint write.",
          _flag("signal", f"{signal}@{res.signal_delay_s}"),
          "# The job may be requeued: by SLURM (preemption, node failure) or by this script below.",
          _flag("requeue", True),
          "# A requeued job appends to its log instead of overwriting it (%x = job name, %j = job id).",
          _flag("open-mode", "append"),
          _flag("output", log_dir / "%x-%j.out"),
          _flag("chdir", chdir),
          "",
          "set -u",
          "",
          "# Threads per training process for CPU work: the CPUs SLURM gave each task.",
          "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}",
          "",
          "# Rendezvous: taming_dist reads SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, takes the master",
          "# address from the first host of SLURM_JOB_NODELIST and the port 20000 + job id % 20000, so",
          "# every task (and every requeued run, which keeps its job id) agrees without setup here."]
    if master_addr:
        L += ["# Node names do not resolve to an address the tasks can reach: use this one for rank 0's node.",
              f"export MASTER_ADDR={shlex.quote(master_addr)}"]
    L += ["", NCCL_NOTES, "", f"PYTHON={shlex.quote(python)}"]
    if resume == "auto":
        L += ["# Resume from the run's latest checkpoint when it has one (after a requeue it always does).",
              "RESUME=auto"]
    else:
        L += ["# First start: --resume as given; a requeued run (SLURM_RESTART_COUNT > 0) continues from its",
              "# own latest checkpoint instead of going back to that starting point.",
              f'if [ "${{SLURM_RESTART_COUNT:-0}}" -eq 0 ]; then RESUME={shlex.quote(resume)}; else RESUME=auto; fi']
    run_dir = run_dir_of(config, overrides, chdir)
    L += ["",
          "# Stop marker: after the last checkpoint of a stop on the signal, rank 0 writes this file, which",
          "# tells that stop apart from a failure below (srun's status cannot: see the srun line).",
          *shell_setup(run_dir),
          "",
          "# One srun task per GPU, all running the same command. --kill-on-bad-exit: when one rank dies",
          "# (kill -9, OOM kill, GPU fault) or fails, SLURM ends the others at once instead of leaving them",
          "# blocked in a collective while they hold their GPUs.",
          f'srun --kill-on-bad-exit=1 "$PYTHON" -m taming_dist train {shlex.quote(config)} \\']
    L += [f"    {shlex.quote(o)} \\" for o in overrides]
    L += ['    --resume "$RESUME"',
          "status=$?",
          "",
          "# Then: with the stop marker, requeue (the job returns to the queue with the same id; SLURM holds",
          "# it back about 2 minutes, `scontrol update JobId=ID StartTime=now` releases it) and resume from",
          f"# the latest checkpoint, exit {EXIT_STOPPED}; without it and status 0, done; otherwise a rank failed:",
          f"# requeue and resume up to {res.max_failures} time(s) (--max-failures), then end as FAILED. Each",
          "# decision goes to this log and to the run's log.txt. A cancelled job never gets here: scancel",
          "# also stops this batch shell.",
          f'"$PYTHON" -m taming_dist.launch.requeue --status "$status" --run-dir {shlex.quote(str(run_dir))} '
          f'--max-failures {res.max_failures}',
          'exit $?',
          ""]
    return "\n".join(L)


def write_script(path: str | Path, text: str) -> Path:
    """Write the script (executable) and create the log folder named in its --output: SLURM does not
    create it, and a job whose log folder is missing fails without a trace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    for line in text.splitlines():
        if line.startswith("#SBATCH --output="):
            Path(shlex.split(line.split("=", 1)[1])[0]).parent.mkdir(parents=True, exist_ok=True)
    return path


def submit_script(path: str | Path, env: dict | None = None) -> str:
    """`sbatch` the script; returns the job id."""
    p = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip().split(";")[0]


def log_path(text: str, job_id: str, job_name: str) -> Path:
    """The stdout log of job `job_id` of a script rendered by render_script."""
    for line in text.splitlines():
        if line.startswith("#SBATCH --output="):
            return Path(shlex.split(line.split("=", 1)[1])[0].replace("%x", job_name).replace("%j", job_id))
    raise ValueError("the script has no #SBATCH --output= line")
