"""Progress of long commands (taming_dist/progress.py): plain lines off a terminal at a set interval,
tqdm's bar on one, global totals from a rank's share, the training line, and `shard` / `shard
--verify` / `eval-recon` run through the CLI with their output captured."""
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from taming_dist import progress as progress_mod
from taming_dist.cli import main
from taming_dist.config import load_config
from taming_dist.logging import RunLogger
from taming_dist.models.vqgan import VQModel
from taming_dist.progress import EVERY_ENV, progress
from taming_dist.weights.folder import save_model_folder

# A periodic line: count/total unit (percent) | rate unit/s | elapsed | eta
LINE = r"{desc}: (\d+)/{total} {unit} \([\d.]+%\) \| ([\d.]+|\?) {unit}/s \| elapsed [\d:]+ \| eta ([\d:]+|\?)"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_plain_lines_at_the_interval_only(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("tqdm.std.time", clock)
    out = io.StringIO()  # not a terminal
    bar = progress(total=60, desc="job", unit="images", every=30, file=out)
    for _ in range(6):  # one update every 10 s: lines at 30 s and 60 s, not in between
        clock.now += 10
        bar.update(10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [int(re.match(LINE.format(desc="job", total=60, unit="images"), ln)[1]) for ln in lines[:-1]] == [0, 30, 60]
    assert lines[1].endswith("| 1 images/s | elapsed 00:30 | eta 00:30")
    assert lines[-1] == "job: 60/60 images (100.0%) | 1 images/s | done in 01:00"


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(EVERY_ENV, "0")
    out = io.StringIO()
    with progress(total=3, desc="x", unit="shards", file=out) as bar:
        for _ in range(3):
            bar.update(1)
    assert len(out.getvalue().splitlines()) == 1 + 3 + 1  # start, every update, end
    monkeypatch.setenv(EVERY_ENV, "soon")
    with pytest.raises(ValueError, match=EVERY_ENV):
        progress_mod.every_s()


def test_global_total_from_a_ranks_share_and_disabled_ranks():
    out = io.StringIO()
    # rank 0 of 4 holds 25 of 100 samples: each of its samples counts 4
    with progress(total=100, local_total=25, desc="eval", unit="images", every=0, file=out) as bar:
        for _ in range(5):
            bar.update(5)
    counts = [int(m[1]) for m in re.finditer(LINE.format(desc="eval", total=100, unit="images"), out.getvalue())]
    assert counts == [0, 20, 40, 60, 80, 100]
    quiet = io.StringIO()
    with progress(total=100, desc="eval", enabled=False, file=quiet) as bar:
        bar.update(50)
    assert quiet.getvalue() == ""


def test_iterable_and_earlier_work_not_in_the_rate(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("tqdm.std.time", clock)
    out = io.StringIO()

    def items():
        for i in range(4):
            clock.now += 2
            yield i

    bar = progress(items(), total=10, initial=6, desc="codes", unit="shards", every=0, file=out)
    assert list(bar) == [0, 1, 2, 3]
    bar.close()
    assert out.getvalue().splitlines()[-1] == "codes: 10/10 shards (100.0%) | 0.5 shards/s | done in 00:08"


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdms_bar():
    out = FakeTTY()
    with progress(total=4, desc="shard", unit="images", file=out) as bar:
        bar.update(4)
    text = out.getvalue()
    assert "\r" in text and "100%|" in text and "4/4" in text and "images/s" in text
    assert "elapsed" not in text  # not the plain line


def test_training_line_is_the_same_bar(tmp_path, capsys):
    logger = RunLogger(tmp_path, {}, is_main=True, wandb_mode="disabled", project="p", total_steps=10)
    for step in (4, 6, 8):  # a run resumed at step 2, logging every 2 steps: the bar starts at 4
        logger.log(step, {"loss": 1.0 / step, "images_per_s": 12.5, "eta_s": 3.0, "usage": 0.5})
    logger.close()
    lines = capsys.readouterr().err.splitlines()
    assert [int(re.match(r"train: (\d+)/10 steps", ln)[1]) for ln in lines] == [4, 6, 8, 8]
    assert "loss=0.125 images_per_s=12.5" in lines[2] and "eta" in lines[2] and "usage" not in lines[2]
    assert lines[-1].startswith("train: 8/10 steps (80.0%)") and "done in" in lines[-1]
    assert (tmp_path / "log.txt").read_text().count('"step"') == 3


# ---------------------------------------------------------------------------------------------
# The commands, with output captured (not a terminal) and a line at every update


N_IMAGES, SIZE = 24, 32


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        (tmp_path / "src" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "src" / f"c{i % 3}" / f"{i}.png")
    return tmp_path / "src"


def _lines(text, desc, total, unit):
    return [m for m in re.finditer(LINE.format(desc=desc, total=total, unit=unit), text)]


def test_shard_verify_and_eval_recon_print_periodic_lines(tmp_path, image_folder, capsys, monkeypatch):
    monkeypatch.setenv(EVERY_ENV, "0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no VGG weights: LPIPS is left out
    shards = tmp_path / "shards"
    assert main(["shard", str(image_folder), str(shards), "--max-count", "4", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    lines = _lines(err, "shard", N_IMAGES, "images")
    assert [int(m[1]) for m in lines] == [0, 4, 8, 12, 16, 20, 24]  # one line per shard of 4
    assert all(m[2] != "?" for m in lines[1:])  # a rate once work was done
    assert re.search(rf"shard: {N_IMAGES}/{N_IMAGES} images \(100.0%\) \| [\d.]+ images/s \| done in", err)

    assert main(["shard", "--verify", str(shards)]) == 0
    assert len(_lines(capsys.readouterr().err, "verify", 6, "shards")) == 7

    torch.manual_seed(0)
    cfg = load_config("vqgan-tiny", ["vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]",
                                     "vqgan.ddconfig.attn_resolutions=[]"]).vqgan
    model = save_model_folder(tmp_path / "model", "vqgan", cfg, VQModel(cfg).state_dict())
    assert main(["eval-recon", str(model), str(shards), "--out", str(tmp_path / "r.json"), "--batch-size", "5",
                 "--size", str(SIZE)]) == 0
    captured = capsys.readouterr()
    lines = _lines(captured.err, "eval-recon", N_IMAGES, "images")
    assert [int(m[1]) for m in lines] == [0, 5, 10, 15, 20, 24]  # a line per batch of 5
    assert "rank" not in captured.err and f"{N_IMAGES} samples" in captured.out
