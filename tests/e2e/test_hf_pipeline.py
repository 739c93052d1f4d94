"""`export --format hf-pipeline`: the README.md written into the folder makes our image with diffusers
and transformers alone, run as written in a process where taming_dist cannot be imported; and the
main README's "From cluster to inference" interop commands and code blocks run as written."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from taming_dist.cli import main
from taming_dist.models.transformer import Transformer
from taming_dist.weights.folder import save_model_folder
from tests.distributed.util import REPO
from tests.unit.interop_util import gpt_config, perturb, synthetic_images, trained_transformer

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

# Run before the README's code: drop every way this checkout is importable (the editable install's
# finder, the checkout itself on sys.path; the virtualenv inside it stays), then prove `import taming_dist` fails.
WITHOUT_US = f"""
import os
import sys
repo = {str(REPO)!r}
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in getattr(f, "__name__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != repo]
sys.path_importer_cache.clear()
try:
    import taming_dist
except ImportError:
    pass
else:
    raise SystemExit("taming_dist is still importable from " + taming_dist.__file__)
"""


def python_block(text: str) -> str:
    m = re.search(r"```python\n(.*?)```", text, re.S)
    assert m, "no python block"
    return m.group(1)


@pytest.mark.slow
@pytest.mark.one_process  # one process at a time: runs in the parallel batch (tests/conftest.py)
def test_pipeline_readme_makes_our_image_without_taming_dist(tmp_path):
    """~25 s: the isolated process imports torch, diffusers and transformers from scratch."""
    model = trained_transformer(gpt_config("class"))
    save_model_folder(tmp_path / "ours", "transformer", model.config, model.state_dict())
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"), "--format", "hf-pipeline"]) == 0
    folder = tmp_path / "hf"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "transformer", "vqgan"]
    code = python_block((folder / "README.md").read_text())
    probe = subprocess.run([sys.executable, "-I", "-c", WITHOUT_US + "print('isolated')"], cwd=folder,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and "isolated" in probe.stdout, probe.stderr
    done = subprocess.run([sys.executable, "-I", "-c", WITHOUT_US + code], cwd=folder, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    image = torch.load(folder / "image.pt", weights_only=True)
    with torch.no_grad():  # ours: label 0, greedy, guided at 3.0 as the README
        codes = model.sample(torch.tensor([0]), top_k=1, cfg_scale=3.0)
        ours = model.decode_to_img(codes).clamp(-1, 1)
    assert image.shape == ours.shape == (1, 3, 32, 32)
    torch.testing.assert_close(image, ours, rtol=1e-5, atol=1e-5)


def section_blocks() -> tuple[list[str], dict[str, str]]:
    """The interop subsection's bash commands and its python blocks by test name."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## From cluster to inference\n", 1)[1].split("\n## ", 1)[0]
    sub = section.split("\n### Into diffusers, transformers and ONNX Runtime\n", 1)[1].split("\n### ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", sub, re.S).group(1)
    commands = [line.split("  #", 1)[0].strip() for line in bash.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    blocks = dict(re.findall(r"<!-- test: (interop-\w+) -->\n```python\n(.*?)```", sub, re.S))
    return commands, blocks


@pytest.mark.slow
@pytest.mark.one_process
def test_readme_interop_section_runs_as_written(tmp_path, monkeypatch):
    """~60 s (one ONNX export). The demo's VQGAN and runs/transformer-tiny are stood in for by transformer-tiny-shaped models
    (random weights); every command runs in-process through the CLI, every code block as written."""
    from taming_dist.config import load_config

    commands, blocks = section_blocks()
    assert len(commands) >= 5 and set(blocks) >= {"interop-diffusers", "interop-transformers", "interop-onnx"}
    cfg = load_config("transformer-tiny").transformer
    torch.manual_seed(0)
    model = Transformer(cfg)
    perturb(model.transformer, 0, 0.1)
    perturb(model.first_stage_model, 1, 0.02)
    monkeypatch.chdir(tmp_path)
    save_model_folder(Path("runs/demo/vqgan/model"), "vqgan", cfg.first_stage, model.first_stage_model.state_dict())
    save_model_folder(Path("runs/transformer-tiny/model"), "transformer", cfg, model.state_dict())
    # the demo's own GPT is text-conditioned: transformers' GPT-2 cannot hold cross-attention, and the
    # README must not point the transformers export at it
    assert not any("runs/demo/transformer" in c and "transformers" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "taming-dist", command
        assert main(argv[1:]) == 0, command
    x = synthetic_images(2)
    scope: dict = {}
    exec(compile(blocks["interop-diffusers"], "README.md", "exec"), scope)
    ours = model.first_stage_model.encode_to_indices(scope["images"])
    assert torch.equal(scope["codes"], ours)
    scope = {}
    exec(compile(blocks["interop-transformers"], "README.md", "exec"), scope)
    assert scope["codes"].shape == (1, 64) and int(scope["codes"].max()) < cfg.first_stage.quantizer.n_embed
    scope = {}
    exec(compile(blocks["interop-onnx"], "README.md", "exec"), scope)
    with torch.no_grad():
        ours = model.first_stage_model.encode_to_indices(torch.from_numpy(scope["images"]))
    assert np.array_equal(scope["codes"], ours.numpy())
    assert scope["recon"].shape == (4, 3, 32, 32)
    back = Path("models/demo-vqgan")
    assert (back / "config.json").exists() and x.shape[0] == 2
