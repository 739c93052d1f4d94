"""The README's Python example runs (against a small randomly initialised model folder)."""
import re
from pathlib import Path

import torch

from taming_dist.weights.folder import save_model_folder
from taming_dist.config import load_config
from taming_dist.models.transformer import Transformer

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(name: str) -> str:
    """The python block after the README's `<!-- test: NAME ... -->` marker."""
    m = re.search(rf"<!-- test: {name}\b[^>]*-->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no python block marked <!-- test: {name} -->"
    return m.group(1)


def test_readme_inference_example_runs(tmp_path):
    # Untrained tiny models stand in for the runs of "Using it": the block must run, not draw well.
    cfg = load_config("transformer-tiny").transformer
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_model_folder(tmp_path / "vqgan-tiny" / "model", "vqgan", cfg.first_stage, model.first_stage_model.state_dict())
    save_model_folder(tmp_path / "transformer-tiny" / "model", "transformer", cfg, model.state_dict())
    code = readme_block("inference").replace("runs/", f"{tmp_path}/")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["condition"].tolist() == [0, 5, 7, 11]  # built-in indices of circle and checkerboard
    assert scope["image"].shape == scope["transformed"].shape == (4, 3, 32, 32)
    assert scope["image"].min() >= -1 and scope["image"].max() <= 1
    assert scope["samples"].shape == (4, 64) and scope["guided"].shape == (1, 64)
    assert torch.equal(scope["transformed"], scope["same"])


def test_local_links_and_pictures_exist():
    """Every relative link or picture of the README (docs/demo-overview.png, ...) is in the repository."""
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", README.read_text())
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert "docs/demo-overview.png" in local
    missing = [t for t in local if not (README.parent / t).exists()]
    assert not missing, f"README links to files that are not in the repository: {missing}"
