"""`taming-dist report`: the page of a run folder written by hand (every logged key a curve, every
image grid present, checkpoints, resume/requeue events, config; a live run's half-written files),
a folder of runs, and a real tiny run rendered by a headless Chromium (not blank, no console errors)."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from taming_dist.cli import main
from taming_dist.report import write_report
from taming_dist.report.svg import downsample
from tests.distributed.util import REPO
from tests.distributed.util import test_env as subprocess_env

KEYS = ["loss", "g_loss", "d_loss", "usage", "perplexity", "lr", "images_per_s", "mfu", "peak_mem_gib", "data/corrupt"]


def _png(path, color, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(path)


def fake_run(run, steps=8, images=(("recon", 2), ("recon", 4), ("recon", 6), ("samples", 6)), resume_message=False):
    """A run folder as training leaves it after a stop at step 5, a requeue and a resume from the
    step-4 checkpoint (said in log.txt with `resume_message`), still going: step 5 logged twice, a
    half-written last line, a checkpoint being written."""
    run.mkdir(parents=True)
    config = f"stage: vqgan\nname: {run.name}\nengine:\n  kind: fsdp\ntrain:\n  steps: {steps}\n"
    (run / "config.yaml").write_text(config)
    lines = []
    for step in range(1, 6):
        lines.append({"step": step, **{k: 1.0 / step + i for i, k in enumerate(KEYS)}})
    lines.append({"message": "stop signal received: checkpoint written at step 5, exiting for requeue"})
    lines.append({"message": "requeued after a rank failure (exit 75), restart 1"})
    if resume_message:
        lines.append({"message": f"resumed from {run}/checkpoints/step_000004 at step 4"})
    for step in range(5, 7):  # resumed from step 4: 5 logged again, with other values
        lines.append({"step": step, **{k: 100.0 + step for k in KEYS}, "loss": float("nan") if step == 6 else 0.5})
    lines.append({"message": "step 7: non-finite loss or gradient, step skipped (1 in a row)"})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 7, "loss": 0.'  # being written
    (run / "log.txt").write_text(text)
    for kind, step in images:
        _png(run / "images" / f"{kind}_{step:06d}.png", (step * 30, 80, 200 if kind == "samples" else 40))
    for step, suffix in ((4, ""), (6, ".tmp")):
        ck = run / "checkpoints" / f"step_{step:06d}{suffix}"
        ck.mkdir(parents=True)
        (ck / "state.bin").write_bytes(b"x" * 1000)
        if not suffix:
            (ck / "manifest.json").write_text(json.dumps({"step": step, "engine": "fsdp", "world_size": 8,
                                                          "units": ["generator", "discriminator"]}))
    (run / "checkpoints" / "latest").write_text("step_000004")
    return run


def test_report_of_a_live_run(tmp_path, capsys):
    run = fake_run(tmp_path / "vq-f16")
    cut = (run / "images" / "samples_000006.png").read_bytes()
    (run / "images" / "samples_000008.png").write_bytes(cut[:len(cut) // 2])  # being written
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (run / "report.html").read_text()
    # a curve per logged key, in its group, with the resume marked and the NaN counted
    charts = dict(re.findall(r'<svg class="chart" data-key="([^"]+)"(.*?)</svg>', html, re.S))
    assert sorted(charts) == sorted(KEYS)
    assert all("<polyline" in c for c in charts.values())
    assert "1 non-finite left out" in charts["loss"] and 'class="mark"' in charts["loss"]
    # steps 1..6, the re-logged step 5 once, with its last value
    assert "= 106 @ 6" in charts["usage"] and len(re.search(r'points="([^"]+)"', charts["usage"])[1].split()) == 6
    for group in ("Losses", "Codebook", "Optimisation", "Throughput", "Memory", "Data"):
        assert f"<h4>{group}</h4>" in html
    assert html.index('data-key="mfu"') > html.index("<h4>Throughput</h4>") > html.index('data-key="loss"')
    # every image grid, inlined: the newest of each kind full size, the earlier ones as thumbnails
    for name in ("recon_000002", "recon_000004", "recon_000006", "samples_000006", "samples_000008"):
        assert f'data-image="images/{name}.png"' in html
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 4
    assert re.search(r'<figure class="latest" data-image="images/recon_000006.png"><a', html)
    assert re.search(r'<figure class="latest" data-image="images/samples_000008.png"><span class="muted">unreadable',
                     html)
    # checkpoints, events, config, summary
    assert re.search(r"<td>4</td><td>step_000004</td><td>fsdp</td><td>8</td><td>generator, discriminator</td>"
                     r"<td>[\d.]+ (B|KiB)</td><td>latest</td>", html)
    assert "step_000006.tmp" in html and "incomplete" in html
    for kind, text in (("stop", "stop signal received"), ("requeue", "requeued after a rank failure"),
                       ("restart", "the log restarts at step 5 after step 5"), ("skipped", "step skipped")):
        assert re.search(rf'<tr class="ev-{kind}"><td>\d+</td><td>{kind}</td><td>[^<]*{text}', html), kind
    assert "kind: fsdp" in html and "running, or ended without a stop message" in html
    assert "6 / 8" in html and "1 (a line being written by a live run)" in html
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_report_of_a_folder_of_runs_and_many_images(tmp_path):
    demo = tmp_path / "demo"
    fake_run(demo / "vqgan", images=[("recon", s) for s in range(1, 12)])
    fake_run(demo / "transformer", images=[("samples", 3)], resume_message=True)
    _png(demo / "samples.png", (10, 200, 10), size=300)
    out = write_report(demo, tmp_path / "elsewhere" / "page.html", max_thumbnails=4)
    html = out.read_text()
    assert html.count('<section class="run"') == 2 and 'href="#run-vqgan"' in html
    transformer, vqgan = html.split('<section class="run"')[1:]  # both stage vqgan here: by name
    assert '<tr class="ev-resume"><td>4</td>' in transformer and "ev-restart" not in transformer
    assert "ev-resume" not in vqgan and "ev-restart" in vqgan
    # relative to the page's folder; 1 newest + 4 thumbnails, the other 6 linked
    for s in range(1, 12):
        assert f'data-image="../demo/vqgan/images/recon_{s:06d}.png"' in html
    assert html.count('<figure class="thumb"') == 4 and html.count('<img src="data:') == 1 + 4 + 1 + 1
    assert 'data-image="../demo/samples.png"' in html
    # the 300 px top-level image is the newest of its kind: inlined at full size
    uri = re.search(r'data-image="../demo/samples.png"><a href="[^"]+"><img src="data:image/png;base64,([^"]+)"', html)
    assert Image.open(io.BytesIO(base64.b64decode(uri[1]))).size == (300, 300)
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        write_report(tmp_path / "elsewhere")


def test_downsample_keeps_spikes():
    points = [(i, 0.0) for i in range(10_000)]
    points[7777] = (7777, 50.0)
    shown = downsample(points, 100)
    assert len(shown) <= 200 and (7777, 50.0) in shown and shown == sorted(shown)


# ---------------------------------------------------------------------------------------------
# A real run in a real browser


def chromium() -> str:
    """Debian's chromium, installed (as root, through apt) when missing; skip with the reason otherwise."""
    found = shutil.which("chromium")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be: needs apt-get as root (apt-get install chromium)")
    log = []
    for cmd in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"], ["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        start = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(cmd)}` did not finish in 900 s")
        log.append(f"{' '.join(cmd)}: exit {p.returncode} in {time.time() - start:.0f} s\n{p.stderr[-500:]}")
        if shutil.which("chromium"):
            print(f"installed chromium: {log}")
            return shutil.which("chromium")
    pytest.skip("could not install chromium: " + "\n".join(log))


def headless(browser, tmp_path, url, *args):
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args, url],
                          capture_output=True, text=True, timeout=120)


def screenshot(browser, tmp_path, page, name):
    shot = tmp_path / f"{name}.png"
    p = headless(browser, tmp_path, page.resolve().as_uri(), f"--screenshot={shot}", "--window-size=1200,2000")
    assert shot.exists(), p.stderr[-3000:]
    console = [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    return pixels, console


@pytest.mark.slow
@pytest.mark.one_process  # one process at a time: runs in the parallel batch (tests/conftest.py)
def test_report_renders_in_a_headless_browser(tmp_path):
    browser = chromium()
    args = ["train", "vqgan-tiny", f"out_dir={tmp_path}", "name=tiny", "train.steps=4", "train.log_every=1",
            "train.image_every=2", "train.ckpt_every=2", "logging.wandb_mode=disabled", "logging.progress=false",
            "vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.resolution=16", "data.size=16",
            "vqgan.ddconfig.attn_resolutions=[8]", "train.global_batch_size=4", "train.micro_batch_size=4",
            "data.synthetic_samples=256"]
    for cmd in (args, ["report", str(tmp_path / "tiny")]):
        p = subprocess.run([sys.executable, "-m", "taming_dist", *cmd], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    page = tmp_path / "tiny" / "report.html"
    keys = {k for line in (tmp_path / "tiny" / "log.txt").read_text().splitlines() if line.startswith('{"step"')
            for k in json.loads(line) if k != "step"}

    pixels, console = screenshot(browser, tmp_path, page, "report")
    assert not console, console
    colors = len(np.unique(pixels.reshape(-1, 3), axis=0))
    not_white = (pixels.min(axis=2) < 240).mean()
    assert colors > 50 and not_white > 0.02, (colors, not_white)
    dom = headless(browser, tmp_path, page.resolve().as_uri(), "--dump-dom").stdout
    assert len(re.findall(r'<svg class="chart"', dom)) == len(keys)
    assert 'data-image="images/recon_000002.png"' in dom and 'data-image="images/recon_000004.png"' in dom

    # The same checks fail on a blank page and on a page with a script error.
    (tmp_path / "bad.html").write_text("<html><body><script>undefinedFunction();</script></body></html>")
    pixels, console = screenshot(browser, tmp_path, tmp_path / "bad.html", "bad")
    assert console and len(np.unique(pixels.reshape(-1, 3), axis=0)) < 5
