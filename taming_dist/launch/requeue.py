"""What a SLURM job does once its `srun` of training returns: requeue, give up, or finish.

Both launchers run this after srun (the generated sbatch script after its srun line, submitit as
its `teardown` lines), in the batch shell of the job:

    python -m taming_dist.launch.requeue --status $? --run-dir RUN --max-failures N

srun runs with --kill-on-bad-exit, so when one rank dies (kill -9, an OOM kill, a GPU fault) SLURM
ends the others at once and srun returns non-zero within seconds; nothing waits in a collective.
That makes srun's status useless for telling a stop on the warning signal (every rank wrote the
checkpoint and exits 75, and srun may then report a kill of the slower ranks) from a failure. The
training loop therefore writes a marker after the last checkpoint's barrier
(taming_dist/train/loop.py, path from $TAMING_DIST_STOP_MARKER, one per job id and restart):

    marker present           stopped with a checkpoint: requeue (preemption; never counted)
    no marker, status 0      finished
    no marker, status != 0   a rank failed: requeue while failures <= N, else end as FAILED

The failure count lives in RUN/launch/<job id>.failures (the job id survives requeues; a new
submission starts at 0). Each decision is printed to the job's log and appended to RUN/log.txt as
a message, so the run's own log shows each requeue with its count and reason. Imports nothing heavy:
it runs in the batch shell, after the training processes are gone.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from taming_dist.train import EXIT_STOPPED, STOP_MARKER_ENV

DEFAULT_MAX_FAILURES = 2


def marker_path(run_dir: str | Path, job_id: str, restart: int | str) -> Path:
    return Path(run_dir) / "launch" / f"{job_id}.{restart}.stopped"


def failures_path(run_dir: str | Path, job_id: str) -> Path:
    return Path(run_dir) / "launch" / f"{job_id}.failures"


def shell_setup(run_dir: str | Path) -> list[str]:
    """Lines for the batch shell before srun: the marker path of this run of the job, exported to the
    training processes, and any stale marker of the same name removed."""
    folder = shlex.quote(str(Path(run_dir) / "launch"))
    return [f"mkdir -p {folder}",
            f'export {STOP_MARKER_ENV}={folder}/"${{SLURM_JOB_ID}}.${{SLURM_RESTART_COUNT:-0}}.stopped"',
            f'rm -f "${STOP_MARKER_ENV}"']


@dataclass(frozen=True)
class Decision:
    action: str  # requeue | finish | fail
    exit_status: int
    message: str
    failures: int  # rank failures counted so far for this job id


def decide(status: int, stopped: dict | None, failures: int, max_failures: int, job_id: str) -> Decision:
    """The pure rule (module docstring). `stopped`: the marker's content, or None when absent;
    `failures`: rank failures already counted for this job id."""
    if stopped is not None:
        return Decision("requeue", EXIT_STOPPED,
                        f"training stopped with a checkpoint (status {EXIT_STOPPED}) at step {stopped.get('step')}: "
                        f"requeueing job {job_id} (a preemption or time-limit stop; not counted against "
                        f"--max-failures)", failures)
    if status == 0:
        return Decision("finish", 0, f"job {job_id}: training finished", failures)
    n = failures + 1
    reason = f"srun exited with status {status} without a stop marker (a rank died or failed)"
    if n <= max_failures:
        return Decision("requeue", status,
                        f"rank failure {n} of at most {max_failures} (--max-failures) in job {job_id}: {reason}; "
                        f"requeueing: it resumes from the latest checkpoint", n)
    return Decision("fail", status,
                    f"rank failure {n} in job {job_id} is past --max-failures {max_failures}: {reason}; "
                    f"not requeued, the job ends as FAILED", n)


def _append_log(run_dir: Path, message: str) -> None:
    if run_dir.is_dir():
        with open(run_dir / "log.txt", "a") as f:
            f.write(json.dumps({"message": message}) + "\n")


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # written atomically; unreadable means something else is wrong
        return {"step": "?"}


def requeue_if_running(job_id: str) -> bool:
    """`scontrol requeue` the job unless it already ended (cancelled, timed out): only a stop that
    asked for a requeue (the warning signal, a preemption notice) gets one."""
    p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    state = next((w.split("=", 1)[1] for w in p.stdout.split() if w.startswith("JobState=")), "UNKNOWN")
    if state != "RUNNING":
        print(f"job {job_id} is {state}: not requeued", flush=True)
        return False
    # Said before the requeue: SLURM ends the job's processes as it requeues it, so a line printed
    # after `scontrol requeue` returns can be lost (a fresh-clone CI run lost it once).
    print(f"requeueing job {job_id}: it resumes from the latest checkpoint when it starts again", flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    return True


def after_srun(status: int, run_dir: str | Path, max_failures: int, environ=None, requeue=None) -> int:
    """Apply `decide` for the job in `environ` (default os.environ); returns the batch shell's exit
    status. `requeue(job_id) -> bool` defaults to `scontrol requeue` when the job still runs."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID", "0")
    restart = env.get("SLURM_RESTART_COUNT", "0") or "0"
    run_dir = Path(run_dir)
    counter = failures_path(run_dir, job_id)
    failures = int(counter.read_text().strip() or 0) if counter.exists() else 0
    d = decide(status, _read_marker(marker_path(run_dir, job_id, restart)), failures, max_failures, job_id)
    if d.failures != failures:
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(f"{d.failures}\n")
    print(d.message, flush=True)
    if d.action != "finish":
        _append_log(run_dir, d.message)
    if d.action == "requeue":
        if requeue is None:
            requeue = requeue_if_running
        requeue(job_id)
    return d.exit_status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m taming_dist.launch.requeue", description=__doc__.split("\n")[0])
    ap.add_argument("--status", type=int, required=True, help="srun's exit status")
    ap.add_argument("--run-dir", required=True, help="the training run's folder (out_dir/name)")
    ap.add_argument("--max-failures", type=int, default=DEFAULT_MAX_FAILURES)
    args = ap.parse_args(argv)
    return after_srun(args.status, args.run_dir, args.max_failures)


if __name__ == "__main__":
    sys.exit(main())
