"""engines/parallelize.py applies its steps in one order, and the engines are a flat composition
(issue 22): one TorchEngine for single / ddp / fsdp beside DeepSpeedEngine, no inheritance chain,
and an instance interface that is the one base.py's docstring states.

One process, no process group: FSDP2's `fully_shard` and DDP are replaced by recorders that note
the state of the module when they are called. That they work for real is the business of
tests/distributed (test_engine_equivalence, test_hsdp, test_compile)."""
import inspect
import re

import pytest
import torch
import torch.nn as nn

from taming_dist.config import EngineConfig
from taming_dist.engines import engine_class
from taming_dist.engines import base as engines_base
from taming_dist.engines.base import Engine
from taming_dist.engines.parallelize import parallelize


class Tiny(nn.Module):
    """A model as the model code writes them: repeated blocks it declares, its own AC switch."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.head = nn.Linear(4, 1)
        self.grad_checkpointing = False

    def parallel_blocks(self):
        return list(self.blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def compiled(m: nn.Module) -> bool:
    # nn.Module.compile() sets this in place (the parameter names stay the module's own)
    return getattr(m, "_compiled_call_impl", None) is not None


class Recorder(list):
    """Stand-ins for fully_shard and DDP; each call notes (what, module, `state()` at that moment)."""

    def __init__(self, model: Tiny):
        super().__init__()
        # What had been applied when a wrapper was called: AC on, which blocks and whether the root were compiled.
        self.state = lambda: (model.grad_checkpointing, [compiled(b) for b in model.blocks], compiled(model))


@pytest.fixture
def model_and_calls(monkeypatch):
    model = Tiny()
    calls = Recorder(model)

    def fake_fully_shard(module, *, mesh, mp_policy):
        assert mesh == "a mesh"
        calls.append(("fully_shard", module, calls.state(), mp_policy.param_dtype))

    class FakeDDP:
        def __init__(self, module, device_ids=None):
            calls.append(("ddp", module, calls.state()))
            self.module = module

    monkeypatch.setattr("torch.distributed.fsdp.fully_shard", fake_fully_shard)
    monkeypatch.setattr("torch.nn.parallel.DistributedDataParallel", FakeDDP)
    return model, calls


def test_fsdp_mode_checkpoints_then_compiles_each_block_then_shards_blocks_before_the_root(model_and_calls):
    m, calls = model_and_calls
    cfg = EngineConfig(kind="fsdp", precision="bf16", activation_checkpointing=True, compile=True,
                       compile_backend="eager", channels_last=True)
    blocks = m.parallel_blocks()
    out = parallelize(m, blocks, cfg, "fsdp", mesh="a mesh", device=torch.device("cpu"))
    assert out is m  # FSDP2 shards in place; forward is called on the module itself
    assert [c[1] for c in calls] == [*blocks, m]  # every block first, then the root; no DDP
    # AC switched on and every block compiled (the root not: per block) before the first fully_shard
    assert all(c[2] == (True, [True, True], False) for c in calls)
    assert all(c[3] == torch.bfloat16 for c in calls)  # the gathered copy in the compute dtype
    assert all(p.is_contiguous() for p in m.parameters())  # no channels_last weights under FSDP2


def test_fsdp_wrap_root_shards_the_root_only_and_still_compiles_each_block(model_and_calls):
    """engine.fsdp_wrap=root: one FSDP2 group (the whole module); blocks are still compiled alone."""
    m, calls = model_and_calls
    cfg = EngineConfig(kind="fsdp", compile=True, compile_backend="eager", fsdp_wrap="root")
    out = parallelize(m, m.parallel_blocks(), cfg, "fsdp", mesh="a mesh", device=torch.device("cpu"))
    assert out is m and [c[1] for c in calls] == [m]  # one fully_shard, of the root
    assert calls[0][2] == (False, [True, True], False)


def test_fsdp_wrap_root_is_planned_with_the_whole_module_gathered():
    from taming_dist.engines.torch_engine import planned_bytes

    shapes = [torch.Size([64, 64])] * 4  # two blocks of two tensors
    blocks, ecfg = [2 * 64 * 64, 2 * 64 * 64], EngineConfig(kind="fsdp", precision="bf16")
    per_block, local = planned_bytes("fsdp", shapes, None, blocks, 2, ecfg)
    root, local_root = planned_bytes("fsdp", shapes, None, blocks, 2, EngineConfig(kind="fsdp", precision="bf16",
                                                                                  fsdp_wrap="root"))
    P = 4 * 64 * 64
    assert local == local_root == P // 2  # the same shards either way
    assert per_block["buffers"] == 2 * P + 6 * (P // 2)  # root (none) + two blocks gathered, one block's grads
    assert root["buffers"] == 2 * P + 6 * P  # the whole module gathered, all its gradients unsharded


def test_one_process_compiles_the_whole_module(model_and_calls):
    m, calls = model_and_calls
    cfg = EngineConfig(kind="single", activation_checkpointing=True, compile=True, compile_backend="eager")
    out = parallelize(m, m.parallel_blocks(), cfg, "none", device=torch.device("cpu"))
    assert m.grad_checkpointing and compiled(m) and not any(compiled(b) for b in m.blocks)
    assert out is m and calls == []


def test_ddp_compiles_each_block_then_wraps_last(model_and_calls):
    """As torchtitan: each block its own graph (one graph serves all blocks of one kind, whatever
    the depth), DDP's gradient hooks outside them; the whole module is not compiled, so dynamo's
    DDPOptimizer does not split one big graph at the gradient buckets."""
    m, calls = model_and_calls
    cfg = EngineConfig(kind="ddp", activation_checkpointing=True, compile=True, compile_backend="eager")
    out = parallelize(m, m.parallel_blocks(), cfg, "ddp", device=torch.device("cpu"))
    assert m.grad_checkpointing and not compiled(m) and all(compiled(b) for b in m.blocks)
    assert calls == [("ddp", m, (True, [True, True], False))]  # wrapped last, after AC and compile
    assert out.module is m


def test_switches_off_leave_the_module_as_it_was(model_and_calls):
    m, calls = model_and_calls
    out = parallelize(m, m.parallel_blocks(), EngineConfig(), "none")
    assert out is m and calls == [] and not m.grad_checkpointing and not compiled(m)
    assert not any(compiled(b) for b in m.blocks)
    with pytest.raises(ValueError, match="mode 'zero'"):
        parallelize(m, [], EngineConfig(), "zero")


def test_a_module_without_trainable_parameters_is_not_wrapped_by_ddp(model_and_calls):
    m, calls = model_and_calls
    m.requires_grad_(False)
    assert parallelize(m, [], EngineConfig(), "ddp", device=torch.device("cpu")) is m
    assert calls == []


def test_the_engines_are_a_flat_composition():
    torch_cls, ds = engine_class("single"), engine_class("deepspeed")
    # single, ddp and fsdp are one class composed by mode, no longer Single -> DDP / FSDP subclasses
    assert engine_class("ddp") is torch_cls and engine_class("fsdp") is torch_cls
    for cls in (torch_cls, ds):
        assert cls.__bases__ == (Engine,)
    assert not issubclass(ds, torch_cls) and not issubclass(torch_cls, ds)


def documented_interface() -> set[str]:
    """The names base.py's docstring lists as an engine instance's interface."""
    doc = engines_base.__doc__
    section = doc[doc.index("The whole interface of an engine instance:"):doc.index("Facts of an engine *kind*")]
    return set(re.findall(r"\b([a-z][a-z_]*[a-z])\b", section))


def public_interface(cls) -> set[str]:
    return {n for n, v in inspect.getmembers(cls) if not n.startswith("_")}


@pytest.mark.parametrize("kind", ["single", "deepspeed"])
def test_every_public_member_of_an_engine_is_documented_in_base(kind):
    cls = engine_class(kind)
    undocumented = public_interface(cls) - documented_interface() - {"set_cuda_math"}
    assert not undocumented, f"{cls.__name__} has public members base.py's docstring does not list: {undocumented}"


def test_the_interface_is_smaller_than_before_issue_22():
    # before: 38 public names across Engine and its four subclasses (planned_bytes, consolidate,
    # param_count, discard, local_params, ... among them)
    names = public_interface(engine_class("single")) | public_interface(engine_class("deepspeed"))
    assert len(names) <= 30, sorted(names)
    assert not names & {"planned_bytes", "planned_weights", "consolidate", "consolidate_v1", "param_count",
                        "channels_last_weights", "discard", "local_params", "update_ema"}
