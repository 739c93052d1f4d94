"""The README's Python example runs (against a small randomly initialised model folder)."""
import re
from pathlib import Path

import torch

from taming_dist.checkpoint.pretrained import save_model_folder
from taming_dist.config import load_config
from taming_dist.models.transformer import Transformer

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    cfg = load_config("transformer-tiny").transformer
    torch.manual_seed(0)
    save_model_folder(tmp_path / "model", "transformer", cfg, Transformer(cfg).state_dict())
    code = blocks[0].replace("runs/demo/transformer/model", str(tmp_path / "model"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["images"].shape == (4, 3, 32, 32) and scope["edited"].shape == (4, 3, 32, 32)
    assert scope["codes"].shape == (1, 64)
    assert scope["images"].min() >= -1 and scope["images"].max() <= 1
