"""Submit `taming-dist train` to SLURM with submitit; on a stop signal it checkpoints, requeues, resumes.

How a stop travels:
1. SLURM sends SIGUSR2 to every task `signal_delay_s` before the time limit (submitit writes
   `#SBATCH --signal=USR2@<s>`, without "B:", so the training processes get it), or someone runs
   `scancel --signal=USR2 JOBID` (preemption notices, tests).
2. submitit installed a USR2 handler before calling the job. It would call `checkpoint()` on rank 0
   only and requeue, which cannot write a sharded checkpoint (every rank must take part). TrainJob
   replaces it: a signal that arrives while the job starts up is held and replayed once the training
   loop has installed its own handler; the loop sets a flag on every rank, all-reduces it each step,
   and all ranks save at the same step (taming_dist/train/loop.py).
3. train() returns with "stopped_at" after rank 0 wrote the stop marker, and every rank exits with
   status 75 without writing a submitit result, so `job.result()` waits for the requeued run.
4. srun returns (it runs with --kill-on-bad-exit) and the job's teardown lines run
   taming_dist/launch/requeue.py in the batch shell, as the generated sbatch script does: with the
   marker it runs `scontrol requeue $SLURM_JOB_ID` if the job is still RUNNING (a cancelled or
   timed-out job stays ended); without it, a failed srun is requeued up to `max_failures` times.
5. SLURM starts the job again with the same id and the same pickled TrainJob; train() resumes from the
   run's latest checkpoint. Our handler never calls submitit's, so stops do not count against
   submitit's max_num_timeout.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

# Nothing here imports torch at module level: submitit unpickles the job (importing this module)
# before it installs any signal handler, and a stop signal in that window kills the task outright.
from taming_dist.launch.requeue import DEFAULT_MAX_FAILURES, shell_setup
from taming_dist.launch.sbatch import SlurmResources
from taming_dist.train import EXIT_STOPPED

# The signals on which the training loop checkpoints and stops.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def dist_environ(job_env, nodelist: str | None, master_addr: str | None = None) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT for one task of a
    submitit job. `job_env` is a submitit.JobEnvironment (or anything with its attributes); the master
    is the first host of `nodelist` unless `master_addr` is given, the port comes from the job id,
    both derived by taming_dist.engines.dist like for a plain srun task."""
    slurm = {"SLURM_PROCID": str(job_env.global_rank), "SLURM_NTASKS": str(job_env.num_tasks),
             "SLURM_LOCALID": str(job_env.local_rank), "SLURM_JOB_ID": str(job_env.job_id),
             "SLURM_NTASKS_PER_NODE": str(job_env.num_tasks // max(job_env.num_nodes, 1))}
    if nodelist:
        slurm["SLURM_JOB_NODELIST"] = nodelist
    if master_addr:
        slurm["MASTER_ADDR"] = master_addr
    from taming_dist.engines.dist import env_from_environ

    env = env_from_environ(slurm)
    return {"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size), "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port)}


class _HeldSignals:
    """Holds stop signals that arrive while the job starts up (imports, model build, checkpoint load)
    and replays them once the training loop has put its own handler in place, so a stop during
    start-up still ends in a collective checkpoint instead of submitit's rank-0-only path."""

    def __init__(self, signals=STOP_SIGNALS, poll_s: float = 0.1):
        self.pending: list[int] = []
        self._signals = signals
        for sig in signals:
            signal.signal(sig, self._hold)
        threading.Thread(target=self._replay, args=(poll_s,), daemon=True, name="held-signals").start()

    def _hold(self, signum, frame):
        self.pending.append(signum)

    def _replay(self, poll_s: float) -> None:
        while any(signal.getsignal(s) == self._hold for s in self._signals):
            time.sleep(poll_s)
        for signum in self.pending:
            os.kill(os.getpid(), signum)


@dataclass
class TrainJob:
    """The callable submitit pickles and runs in every task: `taming-dist train` in-process."""

    config: str
    overrides: list[str] = field(default_factory=list)
    resume: str = "auto"
    master_addr: str | None = None

    def __call__(self) -> dict:
        _HeldSignals()  # first: submitit's rank-0 handler must never see our stop signals
        import submitit

        job_env = submitit.JobEnvironment()
        os.environ.update(dist_environ(job_env, os.environ.get("SLURM_JOB_NODELIST"), self.master_addr))
        from taming_dist.config import load_config
        from taming_dist.train.loop import train

        # A requeued run continues from its own latest checkpoint, not from the starting point given.
        resume = "auto" if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 else self.resume
        result = train(load_config(self.config, self.overrides), resume=resume)
        # imported here, not in the atexit handler: an import during shutdown fails
        from taming_dist.engines.dist import exit_process, leave_now

        if "stopped_at" in result:
            # No result is written for this run, so the submitter keeps waiting for the requeued one
            # (the teardown requeues it); exit_process skips interpreter shutdown, where a gloo
            # thread can abort a rank (taming_dist/engines/dist.py).
            exit_process(EXIT_STOPPED)
        # submitit writes this task's result after we return; then the process would end through
        # interpreter shutdown. Once that result says success, it leaves as exit_process does.
        atexit.register(_leave_after_success, job_env.paths.result_pickle, leave_now)
        return result


def _leave_after_success(result_pickle, leave) -> None:
    """atexit: `leave(0)` (engines.dist.leave_now: os._exit after flushing) when submitit recorded a
    success for this task; anything else (no result, an error submitit caught) ends the usual way, with
    its status. `leave` is resolved when the handler is registered: during shutdown an import that
    was not done yet fails (torch registers atexit handlers of its own)."""
    import pickle

    try:
        with open(result_pickle, "rb") as f:
            outcome = pickle.load(f)[0]
    except Exception:
        return
    if outcome == "success":
        leave(0)


def submit(config: str, overrides: list[str] | tuple = (), *, nodes: int = 1, gpus_per_node: int = 0,
           tasks_per_node: int | None = None, cpus_per_task: int | None = None, mem_gb: float | None = None,
           partition: str | None = None, account: str | None = None, qos: str | None = None, time_min: int = 60,
           constraint: str | None = None, extra_sbatch: dict | list | None = None,
           folder: str = "slurm_logs/submitit/%j", job_name: str = "taming-dist", master_addr: str | None = None,
           signal_delay_s: int = 120, resume: str = "auto", setup: list[str] | None = None,
           max_failures: int = DEFAULT_MAX_FAILURES):
    """Submit a training job; returns the submitit Job (job.job_id, job.paths.stdout/stderr).

    One task per GPU (gpus_per_node; tasks_per_node for CPU-only jobs), requeueable, with SIGUSR2
    `signal_delay_s` before `time_min`. `master_addr` overrides rank 0's address where node names do
    not resolve; `setup` holds shell lines run before srun (module load, conda activate). A rank
    failure ends the other ranks at once (srun --kill-on-bad-exit) and requeues the job up to
    `max_failures` times (taming_dist/launch/requeue.py)."""
    import shlex

    import submitit

    from taming_dist.launch.sbatch import run_dir_of

    res = SlurmResources(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
                         cpus_per_task=cpus_per_task, mem_gb=mem_gb, partition=partition, account=account, qos=qos,
                         time_min=time_min, constraint=constraint, extra_sbatch=extra_sbatch or {},
                         job_name=job_name, signal_delay_s=signal_delay_s, max_failures=max_failures)
    run_dir = run_dir_of(config, overrides, ".")  # a typo in an override fails here, not in the queue
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # After srun: the same requeue-or-fail step as the generated sbatch script, in the batch shell.
    teardown = ["status=$?",
                f"{shlex.quote(sys.executable)} -m taming_dist.launch.requeue --status \"$status\" "
                f"--run-dir {shlex.quote(str(run_dir))} --max-failures {res.max_failures}",
                "exit $?"]
    slurm = {"partition": partition, "account": account, "qos": qos, "constraint": constraint}
    executor.update_parameters(
        name=job_name, nodes=res.nodes, tasks_per_node=res.ntasks_per_node, gpus_per_node=res.gpus_per_node or None,
        cpus_per_task=cpus_per_task, mem_gb=mem_gb, timeout_min=time_min, slurm_signal_delay_s=signal_delay_s,
        slurm_additional_parameters={"requeue": True, **res.extra_sbatch},
        slurm_setup=[*(setup or []), *shell_setup(run_dir)], slurm_teardown=teardown,
        slurm_srun_args=["--kill-on-bad-exit=1"],
        **{f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    return executor.submit(TrainJob(config, list(overrides), resume, master_addr))
