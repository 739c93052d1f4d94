"""keep_last keeps the newest checkpoints by step number: names are `step_{step:06d}`, so past step
999,999 they no longer sort by name (`step_1000000` < `step_999999`)."""
import torch

from taming_dist.checkpoint.manager import CheckpointManager
from taming_dist.checkpoint.state import TrainState, training_state
from taming_dist.config import EngineConfig
from taming_dist.engines import DistEnv, build_engine
from tests.unit.test_engine_single import _unit


def test_prune_keeps_the_newest_by_step_past_a_million(tmp_path):
    e = build_engine(EngineConfig(kind="single"), DistEnv(), torch.device("cpu"))
    u = _unit(e)
    mgr = CheckpointManager(tmp_path / "ck", e, keep_last=2)
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        path = mgr.save(step, training_state(e, {"m": u}, TrainState(step=step)))
        latest = mgr.latest()
        assert latest == path and latest.is_dir(), "latest names the folder just written"
    names = sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name != "latest")
    assert names == ["step_1000000", "step_1000001"], names
    # A sort by name (the old rule) would have kept these two, deleting the newest right after
    # `latest` pointed at it:
    assert sorted(["step_999999", "step_1000000", "step_1000001"])[-2:] == ["step_1000001", "step_999999"]
