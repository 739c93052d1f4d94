"""Engines: how one optimized unit is wrapped, stepped and checkpointed (see base.py)."""
from taming_dist.engines.base import Engine, Unit, lr_lambda_for
from taming_dist.engines.dist import DistEnv, env_from_environ, init_distributed


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


__all__ = ["DistEnv", "Engine", "Unit", "build_engine", "env_from_environ", "init_distributed", "lr_lambda_for"]
