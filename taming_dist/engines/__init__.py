"""Engines: how one optimized unit is made parallel, stepped and checkpointed.

base.py states the interface of an engine instance (in its docstring); parallelize.py applies
activation checkpointing, compile, FSDP2 and DDP in one order; torch_engine.py composes them for
engine.kind single / ddp / fsdp, deepspeed.py wraps ZeRO-1/2/3. The functions below answer what
the rest of the package asks about an engine *kind* without building one.
"""
from taming_dist.engines.base import Engine, Unit, lr_lambda_for
from taming_dist.engines.dist import DistEnv, env_from_environ, exit_process, init_distributed

KINDS = ("single", "ddp", "fsdp", "deepspeed")

# The engine layouts the memory planner compares (kind, ZeRO stage), in the order it prints them.
PLANNED_LAYOUTS = [("ddp", 0), ("fsdp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"engine {kind!r} is not one of {', '.join(KINDS)}")


def _impl(kind: str):
    """The module that knows `kind` (imported on demand; DeepSpeed's only when asked for)."""
    _check(kind)
    if kind == "deepspeed":
        from taming_dist.engines import deepspeed

        return deepspeed
    from taming_dist.engines import torch_engine

    return torch_engine


def engine_class(kind: str) -> type[Engine]:
    """The class of engine.kind `kind`."""
    impl = _impl(kind)
    return impl.DeepSpeedEngine if kind == "deepspeed" else impl.TorchEngine


def build_engine(cfg, env: DistEnv, device) -> Engine:
    _check(cfg.kind)
    if cfg.kind == "single" and env.is_distributed:
        raise ValueError(
            f"engine.kind=single but the launcher started {env.world_size} processes; "
            "use engine.kind=ddp, fsdp or deepspeed"
        )
    if cfg.kind == "deepspeed":
        return engine_class("deepspeed")(cfg, env, device)
    # DDP in one process is plain single-process training (same DCP checkpoints).
    kind = "single" if cfg.kind == "ddp" and not env.is_distributed else cfg.kind
    return engine_class(kind)(cfg, env, device, kind=kind)


def layout_name(kind: str, zero_stage: int) -> str:
    """How the planner labels a layout: the kind, with the ZeRO stage for DeepSpeed."""
    return f"{kind} zero-{zero_stage}" if kind == "deepspeed" else kind


def planned_bytes(kind: str, shapes: list, groups: list, blocks: list[int], zero_stage: int, world: int,
                  ecfg) -> tuple[dict, int]:
    """The memory model of plan.py for one unit on the largest rank: ({params, grads, optim,
    buffers}: bytes, local parameter elements). `shapes`: the trainable parameters' shapes;
    `groups`: AdamW's groups of shapes; `blocks`: elements per parallel block."""
    if kind == "deepspeed":
        return _impl(kind).planned_bytes(shapes, groups, blocks, zero_stage, world, ecfg)
    return _impl(kind).planned_bytes(kind, shapes, groups, blocks, world, ecfg)


def planned_weights(kind: str) -> str:
    """Which weights the planner's measured activations assume under `kind`: "fp32" (autocast
    casts the fp32 weights per use, measured with the activations) or "cast" (the engine keeps a
    copy in the compute dtype)."""
    _check(kind)
    return "fp32" if kind == "ddp" else "cast"


def consolidate(kind: str, ckpt, manifest: dict, ema: bool, read_tensors) -> dict[str, dict]:
    """{unit: full state dict} of a format-2/3 checkpoint that engine `kind` wrote, offline (no
    process group); `read_tensors(folder, prefixes, desc)` loads the DCP tensors whose keys start so."""
    return _impl(kind).consolidate(ckpt, manifest, ema, read_tensors)


def consolidate_v1(kind: str, ckpt, meta: dict, ema: bool) -> dict[str, dict]:
    """The same for format version 1 (meta.pt beside the engine's files)."""
    return _impl(kind).consolidate_v1(ckpt, meta, ema)


def param_count(module) -> int:
    """Trainable and frozen parameters of `module`, full size on every engine: DTensors report
    their full numel, and a ZeRO-3 partition its full size as ds_numel."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


__all__ = ["DistEnv", "Engine", "KINDS", "PLANNED_LAYOUTS", "Unit", "build_engine", "consolidate", "consolidate_v1",
           "engine_class", "env_from_environ", "exit_process", "init_distributed", "layout_name", "lr_lambda_for",
           "param_count", "planned_bytes", "planned_weights"]
