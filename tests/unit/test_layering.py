"""STYLE.md principle 1: model and loss code is single-device PyTorch."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "taming_dist"
FORBIDDEN = ("torch.distributed", "deepspeed", "taming_dist.engines", "taming_dist.train", "taming_dist.tasks")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_models_and_losses_never_import_distributed_code():
    files = list((PKG / "models").glob("*.py")) + list((PKG / "losses").glob("*.py"))
    assert len(files) >= 6
    bad = [(f.name, m) for f in files for m in _imports(f) if m.startswith(FORBIDDEN)]
    assert not bad, f"single-device code imports distributed modules: {bad}"


def test_tasks_never_touch_wrapper_internals():
    for f in (PKG / "tasks").glob("*.py"):
        text = f.read_text()
        for needle in ("deepspeed", "DistributedDataParallel", "fully_shard", "ds_tensor", "to_local"):
            assert needle not in text, f"{f.name} mentions {needle}: only engine code may"
