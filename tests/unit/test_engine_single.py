"""The single-process engine and the checkpoint manager on a small module (fast)."""
import math

import pytest
import torch
import torch.nn as nn

from taming_dist.checkpoint.manager import CheckpointManager
from taming_dist.checkpoint.state import TrainState, training_state
from taming_dist.config import EngineConfig, OptimConfig
from taming_dist.engines import DistEnv, build_engine, lr_lambda_for


def _engine(**kw):
    return build_engine(EngineConfig(kind="single", **kw), DistEnv(), torch.device("cpu"))


def _unit(engine, ema=0.0, clip=0.0):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    oc = OptimConfig(lr=0.1, betas=[0.9, 0.99], weight_decay=0.1, grad_clip=clip)
    return engine.setup(m, name="m", optim=oc, lr=oc.lr, lr_lambda=lr_lambda_for(oc, 10), ema_decay=ema)


def _train(engine, unit, steps):
    out = []
    for i in range(steps):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        loss = unit.module(x).pow(2).mean()
        engine.backward(unit, loss)
        out.append(engine.step(unit))
    return out


def test_lr_schedules():
    f = lr_lambda_for(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 104)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0) and f(54) == pytest.approx(0.55) and f(104) == pytest.approx(0.1)
    assert lr_lambda_for(OptimConfig(), 10)(7) == 1.0
    with pytest.raises(ValueError, match="schedule 'linear'"):
        lr_lambda_for(OptimConfig(schedule="linear"), 10)


def test_weight_decay_groups_skip_norms_and_biases():
    e = _engine()
    u = _unit(e)
    groups = u.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim == 2 for p in groups[0]["params"]) and len(groups[0]["params"]) == 2


def test_clipping_uses_global_norm():
    e = _engine()
    u = _unit(e, clip=1.0)  # fixed at setup, for every step
    e.backward(u, u.module(torch.randn(16, 4) * 100).pow(2).mean())
    norm = float(e.grad_norm(u))
    assert norm > 1.0
    expected = [p.grad.clone() / (norm + 1e-6) for p in u.raw.parameters()]
    seen = []
    real_step = u.optimizer.step
    u.optimizer.step = lambda: seen.extend(p.grad.clone() for p in u.raw.parameters())
    try:
        stats = e.step(u)
    finally:
        u.optimizer.step = real_step
    assert stats["grad_norm"] == pytest.approx(norm)
    for g, x in zip(seen, expected):
        torch.testing.assert_close(g, x)


def test_non_finite_gradients_skip_the_step():
    e = _engine()
    u = _unit(e)
    before = [p.detach().clone() for p in u.raw.parameters()]
    loss = u.module(torch.randn(2, 4)).sum() * float("nan")
    e.backward(u, loss)
    stats = e.step(u)
    assert stats["skipped"] and math.isnan(stats["grad_norm"])
    for b, p in zip(before, u.raw.parameters()):
        assert torch.equal(b, p)
    assert u.scheduler.last_epoch == 0  # the schedule did not advance either


def test_ema_tracks_parameters():
    e = _engine()
    u = _unit(e, ema=0.5)
    p0 = {n: p.detach().clone() for n, p in u.raw.named_parameters()}
    _train(e, u, 1)
    for n, p in u.raw.named_parameters():
        torch.testing.assert_close(u.ema[n], 0.5 * p0[n] + 0.5 * p.detach())


def test_fp16_needs_cuda_message():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: fp16 is allowed")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        _engine(precision="fp16")


class FakeStream:
    """Stands in for a data stream: a position of plain values."""

    def __init__(self):
        self.position = {"epoch": 0, "batches": 0}

    def state_dict(self):
        return dict(self.position)

    def load_state_dict(self, state):
        self.position = dict(state)


def test_checkpoint_roundtrip_and_keep_last(tmp_path):
    e = _engine()
    u = _unit(e, ema=0.9)
    mgr = CheckpointManager(tmp_path / "ck", e, keep_last=2)
    _train(e, u, 2)
    progress, data = TrainState(skipped_total=1), FakeStream()
    state = training_state(e, {"m": u}, progress, data=data)
    for step in (2, 3, 4):
        progress.step, data.position["batches"] = step, step
        path = mgr.save(step, state)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest", "step_000003", "step_000004"]
    assert mgr.latest() == path
    state = {n: p.detach().clone() for n, p in u.raw.named_parameters()}
    ema = {n: t.clone() for n, t in u.ema.items()}
    rng_next = torch.rand(3)
    ref = _train(e, u, 2)
    e2 = _engine()
    u2 = _unit(e2, ema=0.9)
    progress2, data2 = TrainState(), FakeStream()
    CheckpointManager(tmp_path / "ck", e2).load(path, training_state(e2, {"m": u2}, progress2, data=data2))
    assert (progress2.step, progress2.skipped_total) == (4, 1) and data2.position == {"epoch": 0, "batches": 4}
    assert u2.scheduler.last_epoch == u.scheduler.last_epoch - 2  # the LR schedule came back too
    assert torch.equal(torch.rand(3), rng_next)  # RNG restored
    for n, p in u2.raw.named_parameters():
        assert torch.equal(p, state[n]) and torch.equal(u2.ema[n], ema[n])
    again = _train(e2, u2, 2)
    assert [r["grad_norm"] for r in ref] == [r["grad_norm"] for r in again]  # optimizer state restored


def test_incomplete_pointer_target_is_reported(tmp_path):
    e = _engine()
    (tmp_path / "ck" / "step_000001").mkdir(parents=True)
    (tmp_path / "ck" / "latest").write_text("step_000001")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointManager(tmp_path / "ck", e).latest()


def test_accumulate_divides_and_matches_one_batch():
    """Engine.accumulate: 4 micro-batches of 4 give the gradient of one batch of 16."""
    e = _engine()
    u = _unit(e)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    for mb in e.accumulate(u, list(x.split(4))):
        e.backward(u, u.module(mb).pow(2).mean())
    acc = [p.grad.clone() for p in u.raw.parameters()]
    assert u.micro_steps == 1 and u.last_micro_step  # reset after the loop
    u.optimizer.zero_grad()
    e.backward(u, u.module(x).pow(2).mean())
    for a, p in zip(acc, u.raw.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_loading_an_unfused_optimizer_state_keeps_the_fused_kernel():
    """A checkpoint written before AdamW was fused on CPU holds fused=None in its parameter groups;
    loading it must not bring the per-tensor loop back (engines/base.py: keep_kernel_choice)."""
    e = _engine()
    u = _unit(e)
    _train(e, u, 1)
    state = e.unit_state_dict(u)
    for group in state["optim"]["param_groups"]:
        group["fused"] = None
    e.load_unit_state_dict(u, state)
    assert [g["fused"] for g in u.optimizer.param_groups] == [True, True]


def test_one_checkpoint_folder_of_stateful_parts(tmp_path):
    import json

    e = _engine()
    u = _unit(e, ema=0.9)
    _train(e, u, 1)
    path = CheckpointManager(tmp_path / "ck", e).save(1, training_state(e, {"m": u}, TrainState(step=1)))
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["engine"] == "single" and manifest["units"] == ["m"]


def test_old_format_checkpoint_is_refused_with_its_version(tmp_path):
    old = tmp_path / "ck" / "step_000002"
    (old / "dcp").mkdir(parents=True)
    torch.save({"step": 2, "engine": "single", "world_size": 1}, old / "meta.pt")
    e = _engine()
    with pytest.raises(ValueError, match="format version 1.*taming-dist convert"):
        CheckpointManager(tmp_path / "ck", e).load(old, training_state(e, {"m": _unit(e)}, TrainState()))


def test_convert_still_reads_format_version_1(tmp_path):
    """Checkpoints written before format 2 (meta.pt + dcp/ holding {unit: {model, optim, ema}}) are
    refused for resuming but their weights stay readable by `convert`."""
    import torch.distributed.checkpoint as dcp

    from taming_dist.checkpoint.convert import consolidate

    e = _engine()
    u = _unit(e, ema=0.5)
    _train(e, u, 1)
    old = tmp_path / "step_000001"
    state = {"m": {"model": dict(u.raw.state_dict()), "optim": {}, "ema": dict(u.ema)}}
    dcp.save(state, checkpoint_id=str(old / "dcp"))
    torch.save({"step": 1, "engine": "single", "world_size": 1, "schedulers": {"m": {}}}, old / "meta.pt")
    raw, ema = consolidate(old)["m"], consolidate(old, ema=True)["m"]
    for k, p in u.raw.state_dict().items():
        assert torch.equal(raw[k], p) and torch.equal(ema[k], u.ema[k])


def test_convert_reads_only_model_and_ema_tensors(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from taming_dist.checkpoint import convert

    e = _engine()
    u = _unit(e, ema=0.5)
    _train(e, u, 1)
    path = CheckpointManager(tmp_path / "ck", e).save(1, training_state(e, {"m": u}, TrainState(step=1)))
    requested = []
    real_load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda sd, **kw: (requested.extend(sd), real_load(sd, **kw))[1])
    out = convert.consolidate(path, ema=True)["m"]
    assert requested and all(k.startswith(("m.model.", "m.ema.")) for k in requested), requested
    for k, v in u.ema.items():
        assert torch.equal(out[k], v)


def test_cuda_math_switches(monkeypatch):
    """engine.tf32 / engine.cudnn_benchmark set torch's backend flags (applied on CUDA devices)."""
    from taming_dist.engines.base import Engine

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        Engine.set_cuda_math(EngineConfig(tf32=True, cudnn_benchmark=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
        Engine.set_cuda_math(EngineConfig(tf32=False, cudnn_benchmark=False))
        assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 or torch.backends.cudnn.benchmark)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def _fused_adamw_calls(monkeypatch) -> list:
    """Count the calls of torch's fused AdamW kernel (torch.optim looks it up on `torch` per step)."""
    calls, real = [], torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(len(a[0])), real(*a, **k))[1])
    return calls


def test_adamw_steps_with_the_fused_kernel_on_cpu(monkeypatch):
    """build_optimizer's AdamW updates every tensor in one fused call, on CPU too (engines/base.py);
    the per-tensor loop torch picks on CPU by default makes no such call (the probe can fail)."""
    from taming_dist.engines.base import build_optimizer

    calls = _fused_adamw_calls(monkeypatch)
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # two parameter groups (decay, no decay)
    m(torch.randn(2, 4)).sum().backward()
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1), 1e-3)
    assert opt.defaults["fused"]
    opt.step()
    assert calls == [1, 3]  # one call per group: the Linear weight; its bias and the norm's 2 tensors
    torch.optim.AdamW(m.parameters(), lr=1e-3).step()
    assert calls == [1, 3]
    if torch.cuda.is_available():
        assert build_optimizer(m.cuda(), OptimConfig(), 1e-3).defaults["fused"]
