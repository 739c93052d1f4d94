"""Runs tasks on engines with fixed global batches, for the engine-equivalence tests.

Usage (one process or under torchrun): python harness.py OUT.json SPEC [SPEC ...]
SPEC = stage:engine[:zero_stage][:precision][:ac|noac][:accum][:key=value ...]
       e.g. vqgan:deepspeed:3:fp32:ac or transformer:fsdp:2:fp32:noac:train.ema_decay=0.5
Each rank takes its slice of the same global batch, so every world size sees the same data;
rank 0 writes per-step metrics and the final full parameters (as lists of sums) to OUT.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from taming_dist.config import load_config
from taming_dist.engines import build_engine, env_from_environ, init_distributed
from taming_dist.train.loop import build_task, grad_accum_steps

STEPS = 5
GLOBAL_BATCH = 8


def make_cfg(stage: str, engine: str, zero: int, precision: str, ac: bool, micro: int, extra: tuple = ()):
    common = [f"engine.kind={engine}", f"engine.zero_stage={zero}", f"engine.precision={precision}",
              f"engine.activation_checkpointing={ac}", f"train.global_batch_size={GLOBAL_BATCH}",
              f"train.micro_batch_size={micro}", "logging.wandb_mode=disabled"]
    if stage == "vqgan":
        return load_config("vqgan-tiny", common + [
            "loss.disc_start=0", "loss.lpips_backbone=random", "loss.perceptual_weight=1.0", "train.optim.lr=1e-4", "train.disc_optim.lr=1e-4",
            "vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.resolution=16",
            "vqgan.ddconfig.attn_resolutions=[8]", "loss.discriminator.n_layers=2",
            # BatchNorm statistics depend on the per-rank batch, so they cannot match one process.
            "loss.discriminator.norm=none", "train.optim.grad_clip=1.0", *extra,
        ])
    return load_config("transformer-tiny", common + [
        "data.kind=codes", "data.path=unused", "transformer.condition.class_dropout=0.0",
        "transformer.gpt.n_layer=2", "transformer.gpt.n_embd=64", "train.optim.warmup_steps=0", *extra,
    ])


def global_batch(stage: str, step: int, cfg) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    if stage == "vqgan":
        s = cfg.vqgan.ddconfig.resolution
        return {"image": torch.rand(GLOBAL_BATCH, 3, s, s, generator=g) * 2 - 1}
    n_embed = cfg.transformer.first_stage.quantizer.n_embed
    n = (cfg.transformer.first_stage.ddconfig.resolution // cfg.transformer.first_stage.downsample_factor) ** 2
    return {"codes": torch.randint(0, n_embed, (GLOBAL_BATCH, n), generator=g),
            "label": torch.randint(0, cfg.transformer.condition.n_classes, (GLOBAL_BATCH,), generator=g)}


def run_spec(spec: str, env, device) -> dict:
    parts = spec.split(":")
    stage, engine_kind = parts[0], parts[1]
    zero = int(parts[2]) if len(parts) > 2 else 2
    precision = parts[3] if len(parts) > 3 else "fp32"
    ac = len(parts) > 4 and parts[4] == "ac"
    micro = GLOBAL_BATCH // env.world_size // (2 if "accum" in parts else 1)
    overrides = tuple(p for p in parts if "=" in p)  # e.g. init_from=/path, train.ema_decay=0.9
    cfg = make_cfg(stage, engine_kind, zero, precision, ac, micro, extra=overrides)
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, env, device)
    accum = grad_accum_steps(cfg, env.world_size)
    task = build_task(cfg, engine, accum)
    history = []
    for step in range(STEPS):
        gb = global_batch(stage, step, cfg)
        per_rank = GLOBAL_BATCH // env.world_size
        local = {k: v[env.rank * per_rank:(env.rank + 1) * per_rank] for k, v in gb.items()}
        micro_batches = [{k: v[i * micro:(i + 1) * micro] for k, v in local.items()} for i in range(accum)]
        stats = task.train_step(micro_batches, step)
        history.append({k: float(v) for k, v in stats.items()})
    params = {}
    for name, unit in task.units.items():
        sd = engine.full_state_dict(unit, ema=bool(unit.ema))
        params[name] = {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in sd.items()
                        if v.is_floating_point()}
    return {"history": history, "params": params}


def main() -> None:
    out, specs = sys.argv[1], sys.argv[2:]
    env = env_from_environ()
    device = init_distributed(env)
    results = {spec: run_spec(spec, env, device) for spec in specs}
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    if env.is_distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
