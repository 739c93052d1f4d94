"""Fast tests of the launchers without SLURM: resources, the sbatch script (its text, and its control
flow run by bash against stand-in srun/scontrol programs), the rank environment of a submitit task,
signals held during start-up, the requeue decision, and the files of the top-level launch/ folder."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from taming_dist.launch.requeue import decide
from taming_dist.launch.sbatch import SlurmResources, log_path, parse_extra_sbatch, render_script, write_script
from taming_dist.launch.requeue import requeue_if_running
from taming_dist.launch.submitit_launcher import _HeldSignals, dist_environ
from tests.distributed.util import REPO


def test_resources_defaults_and_errors():
    assert SlurmResources(gpus_per_node=8).ntasks_per_node == 8
    assert SlurmResources().ntasks_per_node == 1
    assert SlurmResources(nodes=2, tasks_per_node=2).world_size == 4
    with pytest.raises(ValueError, match="tasks_per_node=4 with gpus_per_node=8"):
        SlurmResources(gpus_per_node=8, tasks_per_node=4)
    with pytest.raises(ValueError, match="time_min=2 leaves no training time"):
        SlurmResources(time_min=2, signal_delay_s=120)
    with pytest.raises(ValueError, match="--signal is set by the launcher"):
        SlurmResources(extra_sbatch=["--signal=B:USR1@60"])
    with pytest.raises(ValueError, match="nodes=0"):
        SlurmResources(nodes=0)


def test_extra_sbatch_from_dict_or_strings():
    assert parse_extra_sbatch(["--exclusive", "gres=gpu:8", "--mail_type=END"]) == {
        "exclusive": True, "gres": "gpu:8", "mail-type": "END"}
    assert parse_extra_sbatch({"reservation": "big", "exclusive": True}) == {"reservation": "big", "exclusive": True}
    assert parse_extra_sbatch(None) == {}


def _script(tmp_path, **kw):
    res = SlurmResources(nodes=2, gpus_per_node=4, cpus_per_task=8, mem_gb=64, partition="gpu", account="proj",
                         time_min=90, extra_sbatch=["--exclusive"], job_name="vq", signal_delay_s=100)
    return render_script("vqgan-tiny", ["train.steps=10", "vqgan.ddconfig.ch_mult=[1,2]"], res, chdir=tmp_path,
                         python="/opt/venv/bin/python", **kw)


def test_script_text(tmp_path):
    text = _script(tmp_path)
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for want in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64G",
                 "--time=1:30:00", "--partition=gpu", "--account=proj", "--exclusive", "--requeue",
                 "--open-mode=append", "--job-name=vq", f"--chdir={tmp_path}",
                 f"--output={tmp_path}/slurm_logs/%x-%j.out",
                 # no "B:": the training tasks themselves must receive the signal
                 "--signal=USR1@100"]:
        assert f"#SBATCH {want}" in sbatch, want
    # every #SBATCH line precedes the first command (sbatch ignores later ones)
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert "'vqgan.ddconfig.ch_mult=[1,2]'" in text  # quoted for the shell
    assert "NCCL_SOCKET_IFNAME" in text and "export MASTER_ADDR" not in text  # derived by taming_dist
    assert "export MASTER_ADDR=10.0.0.1" in _script(tmp_path, master_addr="10.0.0.1")
    assert log_path(text, "42", "vq") == tmp_path / "slurm_logs" / "vq-42.out"
    no_gpu = render_script("vqgan-tiny", [], SlurmResources(tasks_per_node=2), chdir=tmp_path)
    assert "--gpus-per-node" not in no_gpu and "#SBATCH --ntasks-per-node=2" in no_gpu
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid shell
    with pytest.raises(ValueError, match="signal='HUP'"):
        render_script("vqgan-tiny", [], signal="HUP")


def _run_script(tmp_path, text, srun_status, restart_count=0, stop_at=None):
    """Run the script's body with stand-in `srun` (records its arguments and environment's stop marker,
    writes the marker when `stop_at` is a step, exits `srun_status`) and `scontrol` (records its
    arguments; the job is RUNNING)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    marker = f'echo \'{{"step": {stop_at}}}\' > "$TAMING_DIST_STOP_MARKER"\n' if stop_at is not None else ""
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/srun.calls\n'
                                  f'echo "$TAMING_DIST_STOP_MARKER" > {tmp_path}/marker.path\n{marker}'
                                  f'exit {srun_status}\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.calls\n'
                                      'if [ "$1" = show ]; then echo "JobId=42 JobState=RUNNING"; fi\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    for name in ("srun.calls", "scontrol.calls"):
        (tmp_path / name).unlink(missing_ok=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": str(restart_count),
           "PYTHONPATH": str(REPO)}
    p = subprocess.run(["bash", write_script(tmp_path / "job.sh", text)], env=env, capture_output=True, text=True)

    def calls(name):
        f = tmp_path / f"{name}.calls"
        return f.read_text().splitlines() if f.exists() else []
    return SimpleNamespace(status=p.returncode, srun=calls("srun"), requeued="requeue 42" in calls("scontrol"),
                           out=p.stdout + p.stderr, marker=(tmp_path / "marker.path").read_text().strip())


def _local_script(tmp_path, **kw):
    res = SlurmResources(tasks_per_node=2, time_min=10, job_name="vq", max_failures=2)
    return render_script("vqgan-tiny", ["train.steps=10", f"out_dir={tmp_path}/runs", "name=r"], res,
                         chdir=tmp_path, python=sys.executable, **kw)


def test_script_requeues_a_stop_and_at_most_max_failures_failures(tmp_path):
    text = _local_script(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    # a stop on the signal: the marker decides, whatever srun reports (--kill-on-bad-exit may say 143)
    r = _run_script(tmp_path, text, 143, stop_at=6)
    assert r.status == 75 and r.requeued, r.out
    assert r.srun == [f"--kill-on-bad-exit=1 {sys.executable} -m taming_dist train vqgan-tiny train.steps=10 "
                      f"out_dir={tmp_path}/runs name=r --resume auto"]
    assert r.marker == f"{run_dir}/launch/42.0.stopped"
    assert "training stopped with a checkpoint (status 75) at step 6: requeueing job 42" in r.out
    assert (tmp_path / "slurm_logs").is_dir()  # write_script made the log folder SLURM will not create
    # finished
    r = _run_script(tmp_path, text, 0, restart_count=1)
    assert r.status == 0 and not r.requeued and r.marker == f"{run_dir}/launch/42.1.stopped"
    # rank failures: requeued twice (--max-failures 2), the third ends the job with srun's status
    for n, restart in ((1, 2), (2, 3)):
        r = _run_script(tmp_path, text, 137, restart_count=restart)
        assert r.status == 137 and r.requeued, r.out
        assert f"rank failure {n} of at most 2 (--max-failures) in job 42: srun exited with status 137" in r.out
    r = _run_script(tmp_path, text, 137, restart_count=4)
    assert r.status == 137 and not r.requeued
    assert "rank failure 3 in job 42 is past --max-failures 2" in r.out
    # a stale marker of an earlier run of the job does not count as this run's stop
    (run_dir / "launch" / "42.5.stopped").write_text('{"step": 1}')
    r = _run_script(tmp_path, text, 1, restart_count=5)
    assert not r.requeued and "past --max-failures" in r.out
    messages = [json.loads(line)["message"] for line in (run_dir / "log.txt").read_text().splitlines()]
    assert [m.split(":")[0] for m in messages] == [
        "training stopped with a checkpoint (status 75) at step 6", "rank failure 1 of at most 2 (--max-failures) in job 42",
        "rank failure 2 of at most 2 (--max-failures) in job 42", "rank failure 3 in job 42 is past --max-failures 2",
        "rank failure 4 in job 42 is past --max-failures 2"]


@pytest.mark.parametrize("status,stopped,failures,expected", [
    (143, {"step": 4}, 5, ("requeue", 75, 5)),  # stops never count, even after failures
    (0, None, 1, ("finish", 0, 1)),
    (9, None, 0, ("requeue", 9, 1)),
    (9, None, 1, ("fail", 9, 2)),
])
def test_requeue_decision(status, stopped, failures, expected):
    d = decide(status, stopped, failures, max_failures=1, job_id="7")
    assert (d.action, d.exit_status, d.failures) == expected


def test_max_failures_zero_never_requeues_a_failure_and_negative_is_refused(tmp_path):
    assert decide(1, None, 0, max_failures=0, job_id="7").action == "fail"
    with pytest.raises(ValueError, match="max_failures=-1"):
        SlurmResources(max_failures=-1)


def test_script_resume_from_a_checkpoint_only_on_first_start(tmp_path):
    text = _local_script(tmp_path, resume="/ck/step_000100")
    assert _run_script(tmp_path, text, 0, restart_count=0).srun[-1].endswith("--resume /ck/step_000100")
    assert _run_script(tmp_path, text, 0, restart_count=1).srun[-1].endswith("--resume auto")


def test_submitit_task_environment():
    def task(rank, local):
        return SimpleNamespace(global_rank=rank, local_rank=local, num_tasks=4, num_nodes=2, job_id="4242")
    envs = [dist_environ(task(r, r % 2), "gpu[07-08]") for r in range(4)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {
        ("4", "2", "gpu07", str(20000 + 4242 % 20000))}
    assert dist_environ(task(3, 1), "n[1-2]", master_addr="127.0.0.1")["MASTER_ADDR"] == "127.0.0.1"
    # an array task's id "12_3" still gives every task of that job one port
    array = SimpleNamespace(global_rank=0, local_rank=0, num_tasks=2, num_nodes=1, job_id="12_3")
    assert dist_environ(array, "a1")["MASTER_PORT"] == str(20000 + 123)
    with pytest.raises(ValueError, match="neither SLURM_JOB_NODELIST nor MASTER_ADDR"):
        dist_environ(task(0, 0), None)


def test_signal_during_start_up_is_replayed_to_the_loop_handler():
    before = signal.getsignal(signal.SIGUSR1)
    got = []
    try:
        _HeldSignals(signals=(signal.SIGUSR1,), poll_s=0.01)
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives "while torch imports": held, not lost
        time.sleep(0.05)
        assert got == []
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))  # the loop installs its handler
        deadline = time.time() + 5
        while not got and time.time() < deadline:
            time.sleep(0.01)
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


@pytest.mark.parametrize("state,requeued", [("RUNNING", True), ("CANCELLED", False), ("TIMEOUT", False)])
def test_requeue_only_a_running_job(tmp_path, monkeypatch, state, requeued):
    (tmp_path / "scontrol").write_text(
        f'#!/bin/bash\necho "$@" >> {tmp_path}/calls\n'
        f'if [ "$1" = show ]; then echo "JobId=7 JobName=x JobState={state} Reason=None"; fi\n')
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert requeue_if_running("7") is requeued
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "show job -o 7"
    assert ("requeue 7" in calls) is requeued


def test_cli_writes_the_script(tmp_path, capsys):
    import argparse

    from taming_dist.commands import launch

    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    args = parser.parse_args(["sbatch", "vqgan-tiny", "train.steps=3", "--tasks-per-node", "2", "--time-min", "10",
                              "--signal-delay-s", "30", "--sbatch=--exclusive", "--sbatch", "gres=gpu:1",
                              "--out", str(tmp_path / "t.sh"), "--chdir", str(tmp_path)])
    assert launch.run(args) == 0
    text = (tmp_path / "t.sh").read_text()
    assert "#SBATCH --signal=USR1@30" in text and "#SBATCH --exclusive" in text and "#SBATCH --gres=gpu:1" in text
    assert re.search(r"train vqgan-tiny \\\n\s+train.steps=3", text)
    assert f"wrote {tmp_path / 't.sh'}" in capsys.readouterr().out
    bad = parser.parse_args(["sbatch", "vqgan-tiny", "train.no_such_key=1", "--out", str(tmp_path / "u.sh")])
    with pytest.raises(ValueError, match="no_such_key"):
        launch.run(bad)
    assert not (tmp_path / "u.sh").exists()


def test_cli_submitit_passes_every_option(monkeypatch, capsys):
    import argparse

    import taming_dist.launch.submitit_launcher as submitit_launcher
    from taming_dist.commands import launch as launch_cmd

    calls = []

    def fake_submit(config, overrides, **kw):
        calls.append((config, overrides, kw))
        return SimpleNamespace(job_id="77", paths=SimpleNamespace(stdout="/l/77_0_log.out", stderr="/l/77_0_log.err"))
    monkeypatch.setattr(submitit_launcher, "submit", fake_submit)
    parser = argparse.ArgumentParser()
    launch_cmd.add_arguments(parser)
    args = parser.parse_args(["submitit", "vqgan-tiny", "train.steps=5", "--nodes", "2", "--gpus-per-node", "8",
                              "--cpus-per-task", "10", "--mem-gb", "64", "--partition", "gpu", "--account", "acc",
                              "--qos", "high", "--time-min", "30", "--constraint", "a100", "--sbatch=--exclusive",
                              "--setup", "module load cuda", "--master-addr", "10.0.0.1", "--resume", "none"])
    assert launch_cmd.run(args) == 0
    assert calls == [("vqgan-tiny", ["train.steps=5"], dict(
        folder="slurm_logs/submitit/%j", master_addr="10.0.0.1", resume="none", setup=["module load cuda"], nodes=2,
        gpus_per_node=8, tasks_per_node=None, cpus_per_task=10, mem_gb=64.0, partition="gpu", account="acc", qos="high",
        time_min=30, constraint="a100", extra_sbatch=["--exclusive"], job_name="taming-dist", signal_delay_s=120,
        max_failures=2))]
    out = capsys.readouterr().out
    assert "submitted job 77" in out and "/l/77_0_log.out" in out and "/l/77_0_log.err" in out


# The files of the top-level launch/ folder, which people copy and run.
LAUNCH = REPO / "launch"
EXAMPLE_SBATCH = dict(
    config="vqgan-f16-1024", overrides=["out_dir=/checkpoint/me/runs", "name=vq-f16", "train.steps=200000",
                                        "engine.kind=fsdp"],
    res=SlurmResources(nodes=2, gpus_per_node=8, cpus_per_task=10, mem_gb=480, partition="gpu", time_min=1440,
                       job_name="vq-f16"),
    chdir="/home/me/taming", python="/home/me/taming/.venv/bin/python")


def test_example_sbatch_script_is_what_the_generator_writes():
    assert (LAUNCH / "train.sbatch").read_text() == render_script(**EXAMPLE_SBATCH), (
        "launch/train.sbatch is out of date: write render_script(**EXAMPLE_SBATCH) to it again")
    assert os.access(LAUNCH / "train.sbatch", os.X_OK) and os.access(LAUNCH / "submit.sh", os.X_OK)


def test_example_hostfile_and_deepspeed_env_parse_like_the_deepspeed_launcher():
    from deepspeed.launcher.runner import _parse_hostfile

    assert _parse_hostfile((LAUNCH / "hostfile").read_text().splitlines()) == {"gpu-node-01": 8, "gpu-node-02": 8}
    # The runner does `key, val = line.split("=", maxsplit=1)` on every line: no comments, no blanks.
    for line in (LAUNCH / ".deepspeed_env").read_text().splitlines(keepends=True):
        key, _ = line.split("=", maxsplit=1)
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line


def test_submit_script_writes_and_submits(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/sbatch.calls\necho "123;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "NODES": "2",
           "GPUS_PER_NODE": "0", "PARTITION": "debug", "JOB_NAME": "vq"}
    p = subprocess.run(["bash", str(LAUNCH / "submit.sh"), "vqgan-tiny", "train.steps=3", "--account", "proj"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "submitted job 123" in p.stdout and f"log: {tmp_path}/slurm_logs/vq-123.out" in p.stdout
    (script,) = (tmp_path / "slurm_logs").glob("vq-*.sbatch")
    assert (tmp_path / "sbatch.calls").read_text().split() == ["--parsable", str(script.relative_to(tmp_path))]
    text = script.read_text()
    for want in ["--nodes=2", "--partition=debug", "--account=proj", "--job-name=vq", f"--chdir={tmp_path}"]:
        assert f"#SBATCH {want}" in text, want
    assert "train vqgan-tiny \\\n    train.steps=3" in text and f"PYTHON={sys.executable}" in text
    p = subprocess.run(["bash", str(LAUNCH / "submit.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "usage: launch/submit.sh CONFIG" in p.stderr


LEAVE_PROBE = """
import atexit, pickle, sys
from taming_dist.engines.dist import leave_now
from taming_dist.launch.submitit_launcher import _leave_after_success
atexit.register(lambda: print("later shutdown ran"))  # runs after the handler registered below
with open(sys.argv[1], "wb") as f:
    pickle.dump((sys.argv[2], {"loss": 1.0}), f)
atexit.register(_leave_after_success, sys.argv[1], leave_now)
print("task done", end="")
sys.exit(int(sys.argv[3]))
"""


@pytest.mark.parametrize("outcome,status,left", [("success", 0, True), ("error", 1, False)])
def test_a_submitit_task_leaves_without_interpreter_shutdown_once_its_success_is_recorded(tmp_path, outcome,
                                                                                           status, left):
    """TrainJob's atexit handler (engines/dist.py: exit_process says why): status 0 through os._exit when
    submitit's result pickle says success, so the rest of shutdown never runs; otherwise shutdown as usual."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", LEAVE_PROBE, str(tmp_path / "result.pkl"), outcome, str(status)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == status, p.stderr[-2000:]
    assert p.stdout.startswith("task done")
    assert ("later shutdown ran" in p.stdout) is not left, p.stdout
    assert "Exception ignored" not in p.stderr, p.stderr  # the handler itself must not fail
