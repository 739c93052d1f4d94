"""Text to image end to end (issue 23): the README's "Text to image" commands run as written, in
order, in a fresh folder (captions -> shards -> features -> training on FSDP2 under torchrun ->
sampling from a prompt); training commands get short step counts appended as in
test_readme_commands.py. And the LlamaGen-shaped preset is planned and trains 2 steps at a small
width on 2048-wide, 120-token features."""
import json
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
SHORT = ["train.steps=4", "train.ckpt_every=2", "train.image_every=0", "train.log_every=1",
         "logging.wandb_mode=disabled", "logging.progress=false"]


def readme_commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("\n## Text to image\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.distributed
def test_the_readme_text_to_image_path_runs_as_written(tmp_path):
    commands = readme_commands()
    assert any("torchrun" in c and "engine.kind=fsdp" in c for c in commands)
    assert any("--prompt" in c for c in commands) and any("--text-encoder" in c for c in commands)
    for i, command in enumerate(commands):
        argv = shlex.split(command)
        argv[0] = str(BIN / argv[0].removeprefix(".venv/bin/"))
        argv = [str(REPO / a) if a.startswith("tools/") else a for a in argv]  # the repository's tools
        if "train" in argv:
            argv += SHORT
        p = subprocess.run(argv, cwd=tmp_path, env=util.test_env(), capture_output=True, text=True, timeout=600)
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"README text command {i} failed ({p.returncode}): {command}\n{out[-4000:]}"
        if "--verify" in argv:
            assert "captions: 256 present, 0 missing, 0 empty, 0 not UTF-8" in out, out[-2000:]
    manifest = json.loads((tmp_path / "data" / "shapes_codes" / "manifest.json").read_text())
    assert manifest["text"]["encoder"] == "tiny-t5" and manifest["text"]["max_length"] == 16
    log = (tmp_path / "runs" / "transformer-text-tiny" / "log.txt").read_text()
    assert '"step": 4' in log
    assert (tmp_path / "t2i.png").exists()


@pytest.mark.one_process  # one process at a time: runs in the parallel batch (tests/conftest.py)
def test_llamagen_shaped_preset_is_planned_and_trains_two_steps_at_a_small_width(tmp_path, capsys):
    from taming_dist.cli import main
    from taming_dist.config import load_config
    from taming_dist.engines import build_engine
    from taming_dist.engines.dist import DistEnv
    from taming_dist.train.loop import build_task

    assert main(["plan", "gpt-t2i-xl", "--world", "8", "--json", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert "989.5M" in capsys.readouterr().out and plan["config"] == "gpt-t2i-xl"
    cfg = load_config("gpt-t2i-xl", [
        "transformer.gpt.n_layer=2", "transformer.gpt.n_embd=64", "transformer.gpt.n_head=4",
        "engine.kind=single", "engine.precision=fp32", "engine.activation_checkpointing=false",
        "train.global_batch_size=2", "train.max_micro_batch_size=2", "train.steps=2", "train.ema_decay=0.0",
        "first_stage_ckpt=", "logging.wandb_mode=disabled"])
    assert cfg.transformer.gpt.context_dim == 2048 and cfg.transformer.condition.context_len == 120
    engine = build_engine(cfg.engine, DistEnv(), torch.device("cpu"))
    task = build_task(cfg, engine, 1)
    assert task.model.transformer.context_proj.in_features == 2048
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(2):
        batch = {"codes": torch.randint(0, 16384, (2, 256), generator=g), "label": torch.zeros(2, dtype=torch.long),
                 "context": torch.randn(2, 120, 2048, generator=g), "context_len": torch.tensor([7, 120])}
        losses.append(task.train_step([batch], step)["loss"])
    assert all(l == l and l > 0 for l in losses)  # finite
