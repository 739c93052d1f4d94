import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Reproducible CPU numerics and no accidental network use in tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TAMING_DIST_CACHE", str(REPO / ".cache" / "taming_dist"))


@pytest.fixture
def repo() -> Path:
    return REPO


def python() -> str:
    return sys.executable
