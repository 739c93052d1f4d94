"""`train()` gives back the signal handlers it takes (train/loop.py, _StopFlag). Left installed, a
SIGTERM after the run only sets a flag: `kill PID` no longer ends the process, and every process
forked from it afterwards inherits that (it once hung the suite at exit, in Pool.terminate()).

The checks run in a child Python (not pytest): they fork, and the pytest process forks nothing."""
import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = r'''
import os, signal, sys, time
from taming_dist.config import load_config
from taming_dist.train import loop

out = sys.argv[1]
cfg = load_config("vqgan-tiny", [f"out_dir={out}", "train.steps=1", "train.global_batch_size=2",
    "train.ckpt_every=1", "train.image_every=0", "loss.lpips_backbone=random", "logging.wandb_mode=disabled",
    "logging.progress=false", "data.size=16", "data.synthetic_samples=64", "vqgan.ddconfig.resolution=16",
    "vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.attn_resolutions=[8]"])


def forked_child_ends_on_sigterm() -> bool:
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    for _ in range(40):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


# 1. A normal run: the defaults come back, and a process forked afterwards dies of SIGTERM.
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
loop.train(cfg, resume="none")
for sig in loop._StopFlag.SIGNALS:
    assert signal.getsignal(sig) == signal.SIG_DFL, (sig, signal.getsignal(sig))
assert forked_child_ends_on_sigterm(), "a process forked after train() ignored SIGTERM"
print("restored after a run; forked child ends on SIGTERM")

# 2. A run that raises: the caller's own handlers come back.
def mine(signum, frame):
    pass

signal.signal(signal.SIGTERM, mine)
from taming_dist.tasks.vqgan import VQGANTask

def broken_step(self, micro, step, sync=None):
    raise RuntimeError("boom in the step")

VQGANTask.train_step = broken_step
try:
    loop.train(cfg, resume="none")
except RuntimeError as e:
    assert "boom" in str(e)
else:
    raise AssertionError("the broken step did not raise")
assert signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGTERM)
print("restored after an exception")

# 3. Negative control: the handlers left installed (what train() did before) make the forked
# child deaf to SIGTERM, so the check above can fail.
signal.signal(signal.SIGTERM, signal.SIG_DFL)
loop._StopFlag().__enter__()
assert not forked_child_ends_on_sigterm()
print("control: left installed, the forked child ignores SIGTERM")
'''


def test_train_restores_the_signal_handlers_and_later_forks_end_on_sigterm(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TAMING_DIST_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "runs")], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    for line in ("restored after a run; forked child ends on SIGTERM", "restored after an exception",
                 "control: left installed, the forked child ignores SIGTERM"):
        assert line in out, out[-4000:]
