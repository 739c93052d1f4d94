"""Training jobs on a real local SLURM (tests/slurm/conftest.py starts the daemons).

One unbroken 2-task submitit run is the reference: a preempted submitit job, a preempted job of the
generated sbatch script and a job over two simulated nodes (1 task each) must log the same losses at
every step, since they train the same config at the same world size. Job states are polled with
`scontrol show job`: job.result() can hang on a job that died (platform facts).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from taming_dist.launch.submitit_launcher import submit
from tests.distributed.util import REPO, pids_with_env

pytestmark = pytest.mark.slow

STEPS = 8
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
TINY = ["train.ckpt_every=4", "train.log_every=1", "train.image_every=0", "logging.wandb_mode=disabled",
        "logging.progress=false", "data.synthetic_samples=256", "vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]",
        "vqgan.ddconfig.resolution=16", "data.size=16", "vqgan.ddconfig.attn_resolutions=[8]",
        "loss.discriminator.n_layers=1", "train.global_batch_size=4", "train.micro_batch_size=2", "engine.kind=ddp"]


def overrides(out: Path, name: str) -> list[str]:
    return [f"out_dir={out}", f"name={name}", f"train.steps={STEPS}", *TINY]


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) for every metrics line of log.txt, in the order written."""
    if not (run_dir / "log.txt").exists():
        return []
    rows = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if line.startswith('{"step"')]
    return [(r["step"], r["loss"]) for r in rows]


def messages(run_dir: Path) -> list[str]:
    lines = (run_dir / "log.txt").read_text().splitlines()
    return [json.loads(line)["message"] for line in lines if line.startswith('{"message"')]


def latest_checkpoint_step(run_dir: Path) -> int:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / name / "manifest.json").exists(), name
    return int(re.search(r"\d+", name).group())


def wait_for(cond, timeout: float, what: str, cluster, job_id: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout}s; job {job_id}: {cluster.job(job_id)}\n{cluster.logs()}")


def preempt(cluster, job_id: str, run_dir: Path, sig: str) -> dict:
    """Signal the job once training has started, wait for it to be requeued, release it from the
    requeue hold (about 2 minutes otherwise) and wait for it to finish."""
    wait_for(lambda: step_losses(run_dir), 180, "no training step logged", cluster, job_id)
    cluster.cmd(["scancel", f"--signal={sig}", job_id])
    info: dict = {}

    def requeued_or_ended() -> bool:
        info.update(cluster.job(job_id))
        return info.get("Restarts") == "1" or info.get("JobState") in ENDED
    wait_for(requeued_or_ended, 120, "neither requeued nor ended", cluster, job_id)
    assert info["Restarts"] == "1", f"the job ended without a requeue: {info}"
    requeued_at = time.time()

    def released() -> bool:
        state = cluster.job(job_id).get("JobState")
        # Not in the second of the requeue: slurmd accepts the new run's credential only if it was
        # created in a later second than the old run's kill (slurm_cred_revoked: ctime <= revoked),
        # else "Job credential revoked" and the job fails. SLURM's own ~2 minute hold avoids this.
        if state == "PENDING" and time.time() > requeued_at + 2:
            cluster.cmd(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        return state not in ("PENDING", "REQUEUED", "COMPLETING")
    wait_for(released, 120, "requeued job never started again", cluster, job_id)
    return cluster.wait_job(job_id, ENDED, timeout=240)


def assert_resumed_like(reference: list, run_dir: Path):
    got = step_losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "each step logged once, none lost or repeated"
    assert got == reference, "a preempted and resumed run must log the unbroken run's losses exactly"
    assert latest_checkpoint_step(run_dir) == STEPS
    stops = [m for m in messages(run_dir) if m.startswith("stop signal received")]
    assert len(stops) == 1, messages(run_dir)
    return int(re.search(r"step (\d+)", stops[0]).group(1))


@pytest.fixture(scope="module")
def slurm_env(slurm):
    # submitit runs sbatch/scontrol with this process's environment; jobs inherit it too.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(slurm.conf))
        mp.setenv("PYTHONUNBUFFERED", "1")
        yield slurm


@pytest.fixture(scope="module")
def straight(slurm_env, tmp_path_factory):
    """The reference: a 2-task submitit job run without interruption."""
    out = tmp_path_factory.mktemp("straight")
    job = submit("vqgan-tiny", overrides(out, "straight"), tasks_per_node=2, time_min=10, job_name="straight",
                 folder=str(out / "submitit" / "%j"))
    info = slurm_env.wait_job(job.job_id, ENDED, timeout=300)
    return job, info, out / "straight"


def test_submitit_two_tasks_complete_and_checkpoint(straight):
    job, info, run_dir = straight
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, job.stderr())
    assert info["NumTasks"] == "2"
    results = job.results()  # both tasks returned the loop's final metrics
    assert len(results) == 2 and all(r["skipped_total"] == 0 for r in results)
    assert [s for s, _ in step_losses(run_dir)] == list(range(1, STEPS + 1))
    assert latest_checkpoint_step(run_dir) == STEPS
    script = job.paths.submission_file.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=10"):
        assert line in script


def test_submitit_preempted_job_checkpoints_requeues_and_resumes(slurm_env, straight, tmp_path):
    job = submit("vqgan-tiny", overrides(tmp_path, "preempted"), tasks_per_node=2, time_min=10, job_name="preempted",
                 folder=str(tmp_path / "submitit" / "%j"))
    info = preempt(slurm_env, job.job_id, tmp_path / "preempted", "USR2")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    stop_step = assert_resumed_like(step_losses(straight[2]), tmp_path / "preempted")
    assert 1 <= stop_step < STEPS
    rank0 = job.paths.stdout.read_text()  # appended across both runs
    assert f"requeueing job {job.job_id}: it resumes from the latest checkpoint" in rank0
    assert f"at step {stop_step}" in rank0.split("resumed from")[1].splitlines()[0]
    # submitit's own handler (rank-0 checkpoint, its timeout counter) never ran
    assert "Caught signal" not in job.paths.stderr.read_text()


def test_sbatch_script_preempted_requeues_and_resumes(slurm, straight, tmp_path):
    env = {**slurm.env, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "taming_dist", "launch", "sbatch", "vqgan-tiny",
                        *overrides(tmp_path, "sbatch"), "--tasks-per-node", "2", "--time-min", "10",
                        "--job-name", "sb", "--out", str(tmp_path / "train.sbatch"), "--chdir", str(tmp_path),
                        "--submit"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    job_id = re.search(r"submitted job (\d+)", p.stdout).group(1)
    log = tmp_path / "slurm_logs" / f"sb-{job_id}.out"
    assert f"log: {log}" in p.stdout
    info = preempt(slurm, job_id, tmp_path / "sbatch", "USR1")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log.read_text()[-3000:])
    stop_step = assert_resumed_like(step_losses(straight[2]), tmp_path / "sbatch")
    text = log.read_text()
    assert f"training stopped with a checkpoint (status 75) at step {stop_step}: requeueing job {job_id}" in text
    assert not (tmp_path / "sbatch" / "launch" / f"{job_id}.failures").exists()  # a stop is not a failure
    assert f"at step {stop_step}" in text.split("resumed from")[1].splitlines()[0]


def test_two_simulated_nodes_one_task_each(slurm2, straight, tmp_path):
    # n1/n2 do not resolve: rank 0's address is given (on a real cluster the first host name is used).
    env = {**slurm2.env, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "taming_dist", "launch", "sbatch", "vqgan-tiny",
                        *overrides(tmp_path, "two_nodes"), "--nodes", "2", "--tasks-per-node", "1", "--time-min", "10",
                        "--master-addr", "127.0.0.1", "--job-name", "n2", "--out", str(tmp_path / "n2.sbatch"),
                        "--chdir", str(tmp_path), "--submit"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    job_id = re.search(r"submitted job (\d+)", p.stdout).group(1)
    info = slurm2.wait_job(job_id, ENDED, timeout=300)
    log = (tmp_path / "slurm_logs" / f"n2-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, log[-3000:])
    assert (info["NumNodes"], info["NumTasks"], info["NodeList"]) == ("2", "2", "n[1-2]")
    assert latest_checkpoint_step(tmp_path / "two_nodes") == STEPS
    # world size 2 either way: the same losses as 2 tasks on one node
    assert step_losses(tmp_path / "two_nodes") == step_losses(straight[2])


# -- a rank dies: the job ends within seconds, is requeued up to --max-failures, resumes -----------

def kill_rank1(tag: str) -> int:
    """kill -9 of the job's rank 1 training process (found by the test's tag in its environment)."""
    deadline = time.time() + 30
    while not (pids := pids_with_env(TD_TEST_TAG=tag, SLURM_PROCID="1")) and time.time() < deadline:
        time.sleep(0.05)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def left_running_within(cluster, job_id: str, seconds: float) -> float:
    t0 = time.time()
    wait_for(lambda: cluster.job(job_id).get("JobState") != "RUNNING", seconds, "job still RUNNING after a rank died",
             cluster, job_id)
    return time.time() - t0


def release(cluster, job_id: str, restarts: str) -> None:
    """Wait for the requeue, then start the job again at once (SLURM would hold it ~2 minutes)."""
    info: dict = {}

    def requeued() -> bool:
        info.update(cluster.job(job_id))
        return info.get("Restarts") == restarts or info.get("JobState") in ENDED
    wait_for(requeued, 60, "not requeued", cluster, job_id)
    assert info["Restarts"] == restarts, info
    at = time.time()

    def started() -> bool:
        state = cluster.job(job_id).get("JobState")
        if state == "PENDING" and time.time() > at + 2:  # see preempt(): not within the second of the requeue
            cluster.cmd(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        return state == "RUNNING"
    wait_for(started, 120, "requeued job never started again", cluster, job_id)


def last_loss_per_step(run_dir: Path) -> dict[int, float]:
    return dict(step_losses(run_dir))  # a step logged twice (before the kill and after the resume): the later


def test_sbatch_rank_killed_job_ends_requeues_and_resumes_like_an_unbroken_run(slurm, straight, tmp_path):
    tag = uuid.uuid4().hex
    env = {**slurm.env, "PYTHONUNBUFFERED": "1", "TD_TEST_TAG": tag}
    run_dir = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-m", "taming_dist", "launch", "sbatch", "vqgan-tiny",
                        *overrides(tmp_path, "killed"), "train.ckpt_every=2", "--tasks-per-node", "2",
                        "--time-min", "10", "--max-failures", "1", "--job-name", "kill", "--out",
                        str(tmp_path / "kill.sbatch"), "--chdir", str(tmp_path), "--submit"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    job_id = re.search(r"submitted job (\d+)", p.stdout).group(1)
    log = tmp_path / "slurm_logs" / f"kill-{job_id}.out"
    ckpts = run_dir / "checkpoints"
    wait_for(lambda: (ckpts / "latest").exists(), 180, "no checkpoint written", slurm, job_id)
    kill_rank1(tag)
    took = left_running_within(slurm, job_id, 60)
    resume_step = latest_checkpoint_step(run_dir)
    assert resume_step < STEPS, "the run finished before the kill: nothing was tested"
    release(slurm, job_id, "1")
    info = slurm.wait_job(job_id, ENDED, timeout=240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text[-3000:])
    assert "rank failure 1 of at most 1 (--max-failures) in job" in text
    assert any(m.startswith(f"rank failure 1 of at most 1 (--max-failures) in job {job_id}: srun exited with status")
               for m in messages(run_dir)), messages(run_dir)
    assert f"at step {resume_step}" in text.split("resumed from")[1].splitlines()[0]
    # every step after the checkpoint trained again, to the unbroken run's losses
    assert last_loss_per_step(run_dir) == dict(step_losses(straight[2]))
    assert [s for s, _ in step_losses(run_dir)][-(STEPS - resume_step):] == list(range(resume_step + 1, STEPS + 1))
    print(f"\nsbatch: the job left RUNNING {took:.1f} s after kill -9 of rank 1; resumed at step {resume_step}")


def test_submitit_rank_killed_past_max_failures_ends_failed(slurm_env, tmp_path, monkeypatch):
    tag = uuid.uuid4().hex
    monkeypatch.setenv("TD_TEST_TAG", tag)  # submitit's sbatch passes the environment to the tasks
    run_dir = tmp_path / "twice"
    job = submit("vqgan-tiny", [*overrides(tmp_path, "twice"), "train.steps=200"], tasks_per_node=2, time_min=10,
                 job_name="twice", folder=str(tmp_path / "submitit" / "%j"), max_failures=1)
    took = []
    for restarts in ("1", None):
        logged = len(step_losses(run_dir))
        wait_for(lambda: len(step_losses(run_dir)) > logged, 180, "no new training step", slurm_env, job.job_id)
        kill_rank1(tag)
        took.append(left_running_within(slurm_env, job.job_id, 60))
        if restarts:
            release(slurm_env, job.job_id, restarts)
    info = slurm_env.wait_job(job.job_id, ENDED, timeout=120)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", info
    reasons = [m for m in messages(run_dir) if m.startswith("rank failure")]
    assert [r.split(":")[0] for r in reasons] == [
        f"rank failure 1 of at most 1 (--max-failures) in job {job.job_id}",
        f"rank failure 2 in job {job.job_id} is past --max-failures 1"], reasons
    assert "the job ends as FAILED" in reasons[1]
    print(f"\nsubmitit: the job left RUNNING {took[0]:.1f} s / {took[1]:.1f} s after each kill -9 of rank 1")
