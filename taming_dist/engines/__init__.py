"""Engines: how one optimized unit is wrapped, stepped and checkpointed (see base.py)."""
from taming_dist.engines.base import Engine, Unit, lr_lambda_for
from taming_dist.engines.dist import DistEnv, env_from_environ, init_distributed


# The engine layouts the memory planner compares (kind, ZeRO stage), in the order it prints them.
PLANNED_LAYOUTS = [("ddp", 0), ("fsdp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def engine_class(kind: str) -> type[Engine]:
    """The class of engine.kind `kind` (imported on demand; DeepSpeed's only when asked for)."""
    if kind == "single":
        from taming_dist.engines.single import SingleEngine as cls
    elif kind == "ddp":
        from taming_dist.engines.ddp import DDPEngine as cls
    elif kind == "fsdp":
        from taming_dist.engines.fsdp import FSDPEngine as cls
    elif kind == "deepspeed":
        from taming_dist.engines.deepspeed import DeepSpeedEngine as cls
    else:
        raise ValueError(f"engine {kind!r} is not one of single, ddp, fsdp, deepspeed")
    return cls


def layout_name(kind: str, zero_stage: int) -> str:
    """How the planner labels a layout: the kind, with the ZeRO stage for DeepSpeed."""
    return f"{kind} zero-{zero_stage}" if kind == "deepspeed" else kind


def build_engine(cfg, env: DistEnv, device) -> Engine:
    if cfg.kind == "single" and env.is_distributed:
        raise ValueError(
            f"engine.kind=single but the launcher started {env.world_size} processes; "
            "use engine.kind=ddp, fsdp or deepspeed"
        )
    if cfg.kind == "single" or (cfg.kind == "ddp" and not env.is_distributed):
        # DDP in one process is plain single-process training (same DCP checkpoints).
        from taming_dist.engines.single import SingleEngine

        return SingleEngine(cfg, env, device)
    if cfg.kind == "ddp":
        from taming_dist.engines.ddp import DDPEngine

        return DDPEngine(cfg, env, device)
    if cfg.kind == "fsdp":
        from taming_dist.engines.fsdp import FSDPEngine

        return FSDPEngine(cfg, env, device)
    from taming_dist.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(cfg, env, device)


__all__ = ["DistEnv", "Engine", "PLANNED_LAYOUTS", "Unit", "build_engine", "engine_class", "env_from_environ",
           "init_distributed", "layout_name", "lr_lambda_for"]
