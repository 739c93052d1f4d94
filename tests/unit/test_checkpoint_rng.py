"""A checkpoint written without CUDA resumes on a CUDA machine at the same world size (and the
reverse): the CUDA RNG state is an optional entry, and a load asks DCP only for what was saved.
CUDA is stood in for by patching torch.cuda's RNG functions (no GPU here)."""
import pytest
import torch

from taming_dist.checkpoint.manager import CheckpointManager
from taming_dist.checkpoint.state import PerRank, RNGState, TrainState, training_state
from taming_dist.config import EngineConfig
from taming_dist.engines import DistEnv, build_engine
from tests.unit.test_engine_single import _unit


class FakeCuda:
    def __init__(self, monkeypatch, state):
        self.state, self.set_calls = state, []
        monkeypatch.setattr(RNGState, "has_cuda", staticmethod(lambda: True))
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: self.state.clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a, **k: self.set_calls.append(s.clone()))


def _save(tmp_path, step=3):
    e = build_engine(EngineConfig(kind="single"), DistEnv(), torch.device("cpu"))
    mgr = CheckpointManager(tmp_path / "ck", e, keep_last=2)
    return e, mgr, mgr.save(step, training_state(e, {"m": _unit(e)}, TrainState(step=step)))


def test_a_checkpoint_without_cuda_rng_resumes_where_cuda_is_available(tmp_path, monkeypatch):
    e, mgr, path = _save(tmp_path)  # no CUDA here: no rng.rank00000.cuda entry
    cuda = FakeCuda(monkeypatch, torch.arange(8, dtype=torch.uint8))
    train = TrainState()
    mgr.load(path, training_state(e, {"m": _unit(e)}, train))
    assert train.step == 3 and cuda.set_calls == []  # the CUDA generator stays as seeded


def test_without_the_optional_rule_the_same_load_fails(tmp_path, monkeypatch):
    """Negative control: asking DCP for the CUDA state the checkpoint lacks is what failed before."""
    e, mgr, path = _save(tmp_path)
    FakeCuda(monkeypatch, torch.arange(8, dtype=torch.uint8))
    monkeypatch.setattr(PerRank, "expect", lambda self, name, saved: None)
    with pytest.raises(BaseException) as failed:  # DCP's CheckpointException is a BaseException
        mgr.load(path, training_state(e, {"m": _unit(e)}, TrainState()))
    causes = getattr(failed.value, "failures", {0: failed.value})  # DCP wraps each rank's error
    assert "Missing key in checkpoint state_dict: rng.rank00000.cuda" in str(causes[0])


def test_a_cuda_rng_state_is_saved_and_restored_and_ignored_without_cuda(tmp_path, monkeypatch):
    saved = torch.arange(16, dtype=torch.uint8)
    with monkeypatch.context() as m:
        cuda = FakeCuda(m, saved)
        e, mgr, path = _save(tmp_path)
        cuda.state = torch.zeros(16, dtype=torch.uint8)  # the generator moved on
        mgr.load(path, training_state(e, {"m": _unit(e)}, TrainState()))
        assert len(cuda.set_calls) == 1 and torch.equal(cuda.set_calls[0], saved)
    train = TrainState()  # a machine without CUDA resumes the same checkpoint (the entry is not read)
    mgr.load(path, training_state(e, {"m": _unit(e)}, train))
    assert train.step == 3
