"""Every shell command of the README's "Using it" section runs as written, in order, in a fresh
folder: training commands get short step counts appended (key=value overrides win in order), and
the paths the block assumes but does not make itself are made here first (the demo's run folders,
an original taming checkpoint). So an example that stops working fails CI.

The same runs check two things a user sees at start: rank 0's one-block summary, and no library
warnings that are expected and harmless (DCP's single-process note, DeepSpeed's accelerator probe,
deprecated c10d names inside DeepSpeed), which are silenced where they arise.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import util
from tests.distributed.util import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# per command index: steps to train (the torchrun one resumes the run before it and trains on)
STEPS = {1: 2, 2: 4, 3: 2}
SHORT = ["train.ckpt_every=2", "train.image_every=0", "train.log_every=1", "logging.wandb_mode=disabled",
         "logging.progress=false", "data.synthetic_samples=256"]
# A warning raised inside an installed library, or a library's logged WARNING (our own notices, e.g.
# that a resumed data position changed layout, are meant to be seen).
WARNINGS = re.compile(r"site-packages/\S+: \w*Warning:|\[WARNING\]")


def using_it_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def make_original_checkpoint(folder: Path) -> None:
    """A small original-format VQGAN (Lightning-style dict + model.yaml) where the README expects one."""
    from tests.unit.test_taming_import import VQ_TARGET, lightning, our_vq, vq_params, write_yaml
    from taming_dist.models.vqgan import VQModel

    folder.mkdir(parents=True)
    torch.save(lightning(VQModel(our_vq()).state_dict()), folder / "last.ckpt")
    write_yaml(folder / "model.yaml", VQ_TARGET, vq_params())


def test_every_command_of_using_it_runs_as_written(tmp_path):
    commands = using_it_commands()
    assert len(commands) >= 6 and all(c.startswith(".venv/bin/") for c in commands), commands
    make_original_checkpoint(tmp_path / "vqgan_imagenet_f16_1024")
    for i, command in enumerate(commands):
        argv = shlex.split(command)
        argv[0] = str(BIN / argv[0].removeprefix(".venv/bin/"))
        if "sample" in argv or "reconstruct" in argv:  # the demo's folders: this block's own runs
            for stage, run in (("vqgan", "vqgan-tiny"), ("transformer", "transformer-tiny")):
                link = tmp_path / "runs" / "demo" / stage
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(tmp_path / "runs" / run)
        if "train" in argv:
            argv += [f"train.steps={STEPS[i]}", *SHORT]
        p = subprocess.run(argv, cwd=tmp_path, env=util.test_env(), capture_output=True, text=True, timeout=600)
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"README command {i} failed ({p.returncode}): {command}\n{out[-4000:]}"
        if "train" in argv:
            assert "== taming-dist train" in p.stdout and "batch: global" in p.stdout, out[-2000:]
            assert not WARNINGS.search(out), f"README command {i} printed a library warning:\n{out[-3000:]}"
    assert (tmp_path / "s.png").exists() and (tmp_path / "recon.png").exists()
    assert (tmp_path / "models" / "vqgan-f16-1024" / "model.safetensors").exists()
    log = (tmp_path / "runs" / "vqgan-tiny" / "log.txt").read_text()
    assert '"step": 4' in log and "resumed from" in log  # the FSDP run continued the first one on 2 ranks


def test_the_warning_pattern_sees_library_warnings_and_not_our_notices():
    assert WARNINGS.search("/x/.venv/lib/python3.11/site-packages/torch/distributed/checkpoint/utils.py:488: "
                           "UserWarning: torch.distributed is disabled, unavailable or uninitialized, assuming the "
                           "intent is to save in a single process.")
    assert WARNINGS.search("[2026-12-01 13:10:02,549] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
                           "accelerator to CPU.")
    assert not WARNINGS.search("/work/main/taming_dist/data/stream.py:346: UserWarning: data position saved with "
                               "layout ... is resumed with ...")
