"""Exact resume, kill -9 during a checkpoint write, and resume onto another world size."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from tests.distributed.util import REPO, run, test_env
from tests.e2e.runs import ENGINES as RUN_ENGINES
from tests.e2e.runs import TINY, engine_params, train

pytestmark = pytest.mark.slow


def losses(run_dir):
    lines = (run_dir / "log.txt").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith('{"step"')]
    return {r["step"]: (r["loss"], r.get("d_loss", 0.0)) for r in rows}


# DDP saves and loads through single's path (full tensors, one DCP save); its per-rank RNG and data
# positions are the 2-rank FSDP2 run's.
ENGINES = {name: RUN_ENGINES[name] for name in ("single", "fsdp", "zero3")}


@pytest.mark.parametrize("name", engine_params(ENGINES))
def test_exact_resume(tmp_path, name, vqgan_run):
    """An unbroken 4-step run checkpoints at steps 2 and 4; a new run started on a copy of its
    step-2 checkpoint alone (what a job killed after step 2 leaves) resumes and gives the same
    losses at steps 3 and 4 and the same final (EMA) weights, bit for bit. Two launches, not three:
    the unbroken run (the session's shared run of this engine) also writes the checkpoint the resume
    starts from."""
    engine, nproc = ENGINES[name]
    straight = vqgan_run(name)
    src, dst = straight / "checkpoints", tmp_path / "resumed" / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copytree(src / "step_000002", dst / "step_000002")
    (dst / "latest").write_text("step_000002\n")
    p = train(tmp_path, "resumed", 4, engine, nproc)
    assert "resumed from" in p.stdout + p.stderr and "step_000002" in p.stdout + p.stderr
    a, b = losses(straight), losses(tmp_path / "resumed")
    assert set(a) == {1, 2, 3, 4} and set(b) == {3, 4}
    for step in (3, 4):
        assert a[step] == b[step], f"step {step}: straight {a[step]} vs resumed {b[step]}"
    wa = load_file(straight / "model" / "model.safetensors")
    wb = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed.checkpoint as dcp
    real_save = dcp.save
    calls = []
    def save(state, checkpoint_id):
        calls.append(checkpoint_id)
        real_save(state, checkpoint_id=checkpoint_id)
        if len(calls) == 2:   # second checkpoint: the DCP state written, manifest.json not yet
            os.kill(os.getpid(), signal.SIGKILL)
    dcp.save = save
    from taming_dist.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.one_process  # one process at a time: runs in the parallel batch (tests/conftest.py)
def test_kill_9_during_checkpoint_write_keeps_previous(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    args = [sys.executable, str(script), "train", "vqgan-tiny", f"out_dir={tmp_path}", "name=k", "train.steps=4",
            "train.ckpt_every=2", *TINY]
    p = subprocess.run(args, cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    ck = tmp_path / "k" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000002"
    assert (ck / "step_000004.tmp").exists() and not (ck / "step_000004").exists()
    p = run(["-m", "taming_dist", "train", "vqgan-tiny", f"out_dir={tmp_path}", "name=k", "train.steps=4",
             "train.ckpt_every=2", *TINY])
    assert "resumed from" in p.stdout and "step_000002" in p.stdout
    assert (ck / "latest").read_text().strip() == "step_000004"
    assert not (ck / "step_000004.tmp").exists()


ASYNC_KILLER = textwrap.dedent("""
    import os, signal, sys, threading
    from torch.distributed.checkpoint import FileSystemWriter
    real_write = FileSystemWriter.write_data
    threads = []
    def write_data(self, plan, planner):
        threads.append(threading.current_thread() is threading.main_thread())
        if len(threads) == 2:   # the second checkpoint's background write, under way
            with open(os.environ["TD_WRITE_THREADS"], "w") as f:
                f.write(repr(threads))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, plan, planner)
    FileSystemWriter.write_data = write_data
    from taming_dist.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.one_process
def test_kill_9_during_async_background_write_keeps_previous(tmp_path):
    """train.async_checkpoint=true: the write runs on DCP's background thread (recorded: not the main
    thread, for both checkpoints), and a kill -9 in the middle of it leaves `latest` at the previous
    checkpoint, which resumes."""
    script = tmp_path / "killer.py"
    script.write_text(ASYNC_KILLER)
    report = tmp_path / "threads.txt"
    args = [sys.executable, str(script), "train", "vqgan-tiny", f"out_dir={tmp_path}", "name=k", "train.steps=4",
            "train.ckpt_every=2", "train.async_checkpoint=true", *TINY]
    p = subprocess.run(args, cwd=REPO, env=test_env(TD_WRITE_THREADS=str(report)), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert report.read_text() == "[False, False]"  # both writes off the main (training) thread
    ck = tmp_path / "k" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000002"
    assert (ck / "step_000004.tmp").exists() and not (ck / "step_000004").exists()
    p = run(["-m", "taming_dist", "train", "vqgan-tiny", f"out_dir={tmp_path}", "name=k", "train.steps=4",
             "train.ckpt_every=2", "train.async_checkpoint=true", *TINY])
    assert "resumed from" in p.stdout and "step_000002" in p.stdout
    assert (ck / "latest").read_text().strip() == "step_000004" and (ck / "step_000004" / "manifest.json").exists()
    assert not (ck / "step_000004.tmp").exists()


def test_fsdp_resume_on_one_rank_reshards_and_keeps_the_global_batch(tmp_path):
    derived = ["train.micro_batch_size=null"]  # as the presets: the micro batch follows the world size
    p = train(tmp_path, "f", 2, ["engine.kind=fsdp"], 2, derived)
    assert "batch: global 4 = micro 2 x 2 rank(s) x 1 accumulation step(s)" in p.stdout
    two = load_file(tmp_path / "f" / "model" / "model.safetensors")
    os.remove(tmp_path / "f" / "model" / "model.safetensors")
    p = train(tmp_path, "f", 2, ["engine.kind=fsdp"], 1, derived)  # loads step 2 on 1 rank, nothing left to train
    assert "resumed from" in p.stdout
    one = load_file(tmp_path / "f" / "model" / "model.safetensors")
    for k in two:
        assert (two[k] == one[k]).all(), k
    # the same command, nothing edited, trains on: the global batch of 4 is one rank's micro batch now,
    # or two micro-steps under a per-device limit
    p = train(tmp_path, "f", 3, ["engine.kind=fsdp"], 1, [*derived, "train.max_micro_batch_size=2"])
    assert "batch: global 4 = micro 2 x 1 rank(s) x 2 accumulation step(s)" in p.stdout
    assert sorted(losses(tmp_path / "f")) == [1, 2, 3]


def test_deepspeed_other_world_size_explains_conversion(tmp_path, vqgan_run):
    shutil.copytree(vqgan_run("zero2"), tmp_path / "d", symlinks=True)  # the shared 2-rank run, 4 steps
    with pytest.raises(AssertionError, match="ds_to_universal"):
        train(tmp_path, "d", 5, ["engine.kind=deepspeed", "engine.zero_stage=2"], 1)
