"""The wheel works outside the source checkout: built from a copy of the tree, installed into a fresh
venv that borrows the already installed dependencies, it finds its presets, ships no top-level module
but taming_dist, and `taming-dist info` / `train` run from an unrelated folder."""
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.distributed.util import REPO
from tests.distributed.util import test_env as child_env  # renamed: pytest would collect `test_env`
from tests.e2e.test_cli import TINY_VQ

pytestmark = pytest.mark.slow

# Top-level folders of a working checkout that a fresh clone does not have.
NOT_SOURCE = {".git", ".venv", ".cache", ".pytest_cache", "build", "dist", "runs", "wandb", "data", "slurm_logs"}


def _not_source(folder, names):
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return skip | (NOT_SOURCE & set(names) if Path(folder) == REPO else set())


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, f"{' '.join(p.args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.mark.one_process  # one process at a time: runs in the parallel batch (tests/conftest.py)
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    # Build from a copy (links kept, as in a clone): an in-tree build would reuse stale build/ files.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_not_source)
    # No build isolation: the installed setuptools builds it, nothing is downloaded.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("taming_dist-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"taming_dist"}, "extra top-level modules"
        for preset in (REPO / "configs").glob("*.yaml"):
            assert zf.read(f"taming_dist/presets/{preset.name}") == preset.read_bytes(), preset.name
    assert "taming_dist/launch/submitit_launcher.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    # This environment's pip installs into the new venv, which then holds only the wheel.
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel])
    # Only then borrow the dependencies (torch, ...): a .pth line adds this environment's
    # site-packages as a plain folder, whose own .pth files (the editable install's finder) never run.
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    Path(site, "borrowed_deps.pth").write_text(
        "\n".join(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = child_env()
    env.pop("PYTHONPATH", None)
    probe = _run([py, "-c", "import taming_dist, taming_dist.launch.submitit_launcher as s; "
                            "from taming_dist.config.load import PRESET_DIR; "
                            "print(taming_dist.__file__, s.__file__, PRESET_DIR)"], cwd=elsewhere, env=env)
    for path in probe.stdout.split():
        assert Path(path).resolve().is_relative_to(venv.resolve()), f"{path} is not the installed wheel's"

    cli = venv / "bin" / "taming-dist"
    info = _run([cli, "info"], cwd=elsewhere, env=env).stdout
    line = next(line for line in info.splitlines() if line.startswith("presets: "))
    listed, source = line.removeprefix("presets: ").split(" (from ")
    assert listed.split(", ") == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert Path(source.rstrip(")")).is_relative_to(venv)
    assert "stage: vqgan" in _run([cli, "info", "--preset", "vqgan-tiny"], cwd=elsewhere, env=env).stdout

    _run([cli, "train", "vqgan-tiny", "out_dir=runs", "name=wheel", "train.steps=2", "train.log_every=1",
          "logging.wandb_mode=disabled", "train.image_every=0", "data.synthetic_samples=256", *TINY_VQ],
         cwd=elsewhere, env=env)
    run_dir = elsewhere / "runs" / "wheel"
    rows = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if line.startswith('{"step"')]
    assert [r["step"] for r in rows] == [1, 2] and (run_dir / "model" / "model.safetensors").exists()
