"""Runs tasks on engines with fixed global batches, for the engine-equivalence tests.

Usage (one process or under torchrun): python harness.py OUT_DIR SPEC [SPEC ...]
SPEC = stage:engine[:zero_stage][:precision][:ac|noac][:accum][:key=value ...]
       e.g. vqgan:deepspeed:3:fp32:ac or transformer:fsdp:2:fp32:noac:train.ema_decay=0.5
key=value pairs are config overrides, except these harness switches:
  break=skip_step     rank 1 (rank 0 in one process) skips its optimizer update at step 2 (a negative control)
  break=no_grad_sync  every backward runs inside the engine's no_sync (gradients never averaged)
  break=quantizer_unplaced  the VQGAN's quantizer is told rank 0's place in the batch on every rank
  save=N              stop after N steps and write a checkpoint to OUT_DIR/ckpt_<tag>
  resume=TAG          load OUT_DIR/ckpt_<TAG> first and continue from its step
  tag=NAME            names the spec's checkpoint (default: its index)
  steps=N             train only the first N of the 5 steps (same schedule), for checks of step 0
Each rank takes its slice of the same global batch, so every world size sees the same data.
Rank 0 writes OUT_DIR/results.json (per-step metrics, mechanism counters) and, per spec,
OUT_DIR/<index>.pt: for every unit and tensor the update theta_end - theta_init (full tensors,
fp64), EMA the same way, and (single process) each tensor's gradient norm at step 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from taming_dist.checkpoint.manager import CheckpointManager
from taming_dist.checkpoint.state import TrainState, training_state
from taming_dist.config import load_config
from taming_dist.engines import build_engine, env_from_environ, exit_process, init_distributed
from taming_dist.train.loop import build_task, grad_accum_steps

STEPS = 5
GLOBAL_BATCH = 8
HARNESS_KEYS = ("break", "save", "resume", "tag", "steps")


def make_cfg(stage: str, engine: str, zero: int, precision: str, ac: bool, micro: int, extra: tuple = ()):
    # Warmup + cosine decay and active clipping, so the schedule and clipping are part of what
    # every engine must reproduce.
    common = [f"engine.kind={engine}", f"engine.zero_stage={zero}", f"engine.precision={precision}",
              f"engine.activation_checkpointing={ac}", f"train.global_batch_size={GLOBAL_BATCH}",
              f"train.micro_batch_size={micro}", "logging.wandb_mode=disabled", f"train.steps={STEPS}",
              "train.optim.warmup_steps=2", "train.optim.schedule=cosine", "train.optim.min_lr_ratio=0.1"]
    if stage == "vqgan":
        return load_config("vqgan-tiny", common + [
            # lr 5e-5: small enough that no code assignment (argmin) or L1 sign flips within the 5
            # steps on any engine; at 1e-4 the 2-rank runs with accumulation cross one such
            # discrete boundary that one process does not, and then differ by 2% of the update.
            "loss.disc_start=0", "loss.lpips_backbone=random", "loss.perceptual_weight=1.0", "train.optim.lr=5e-5",
            "train.disc_optim.lr=5e-5", "train.disc_optim.warmup_steps=2", "train.disc_optim.schedule=cosine",
            "vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.resolution=16",
            "vqgan.ddconfig.attn_resolutions=[8]", "loss.discriminator.n_layers=2",
            # BatchNorm statistics depend on the per-rank batch, so they cannot match one process.
            "loss.discriminator.norm=none", "train.optim.grad_clip=0.05", "train.disc_optim.grad_clip=0.01", *extra,
        ])
    return load_config("transformer-tiny", common + [
        "data.kind=codes", "data.path=unused", "transformer.condition.class_dropout=0.0",
        "transformer.gpt.n_layer=2", "transformer.gpt.n_embd=64", "train.optim.grad_clip=0.5", *extra,
    ])


def global_batch(stage: str, step: int, cfg) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    if stage == "vqgan":
        s = cfg.vqgan.ddconfig.resolution
        return {"image": torch.rand(GLOBAL_BATCH, 3, s, s, generator=g) * 2 - 1}
    n_embed = cfg.transformer.first_stage.quantizer.n_embed
    n = (cfg.transformer.first_stage.ddconfig.resolution // cfg.transformer.first_stage.downsample_factor) ** 2
    batch = {"codes": torch.randint(0, n_embed, (GLOBAL_BATCH, n), generator=g),
             "label": torch.randint(0, cfg.transformer.condition.n_classes, (GLOBAL_BATCH,), generator=g)}
    if cfg.transformer.gpt.cross_attention:  # text rows (issue 23): caption features and their true lengths
        L, D = cfg.transformer.condition.context_len, cfg.transformer.gpt.context_dim
        batch["context"] = torch.randn(GLOBAL_BATCH, L, D, generator=g)
        batch["context_len"] = torch.randint(1, L + 1, (GLOBAL_BATCH,), generator=g)
    return batch


_FUSED_ADAMW_CALLS = [0]


def _counting(kernel):
    def counted(*args, **kwargs):
        _FUSED_ADAMW_CALLS[0] += 1
        return kernel(*args, **kwargs)
    return counted


# torch.optim's AdamW looks its fused kernel up on `torch` at every step, so this counts each call
torch._fused_adamw_ = _counting(torch._fused_adamw_)


class Probes:
    """What the switches must change, observed in the step: block forwards (activation
    checkpointing recomputes each block in backward), the memory format of every conv input and
    weight (channels_last), dynamo's compiled graphs (compile) and the calls of torch's fused AdamW
    kernel (engines/base.py: build_optimizer)."""

    def __init__(self, units):
        from torch._dynamo.utils import counters

        # A fresh dynamo per spec: graphs cached by an earlier spec in this process would
        # otherwise serve this one, and the count would say nothing about this engine.
        torch._dynamo.reset()
        self.graphs_before = int(counters["stats"]["unique_graphs"])
        self.fused_adamw_before = _FUSED_ADAMW_CALLS[0]
        self.block_forwards = 0
        self.conv_inputs = [0, 0]  # [channels_last, total]
        self.conv_weights = [0, 0]
        for unit in units.values():
            for b in unit.raw.parallel_blocks():
                # a pre-hook: checkpoint's recompute stops early, before a block's forward returns
                b.register_forward_pre_hook(self._count)
            for m in unit.raw.modules():
                if isinstance(m, nn.Conv2d):
                    m.register_forward_pre_hook(self._formats)

    def _count(self, module, inputs):
        self.block_forwards += 1

    def _formats(self, module, inputs):
        for seen, t in ((self.conv_inputs, inputs[0]), (self.conv_weights, module.weight)):
            if t.dim() == 4 and t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
                continue  # both layouts at once (1x1 kernels, one channel): says nothing
            seen[0] += int(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            seen[1] += 1

    @staticmethod
    def layout(units) -> dict:
        """How the largest parameter of each unit is laid out: its DTensor placements, mesh shape
        and the local shard's shape against the full one (FSDP2 / HSDP), and how many modules are
        FSDP2 groups (fully_shard'ed: the blocks and the root, or the root alone); else None."""
        from torch.distributed.fsdp import FSDPModule

        out = {}
        for name, unit in units.items():
            p = max(unit.raw.parameters(), key=lambda t: t.numel())
            if hasattr(p, "placements"):
                out[name] = {"placements": [str(x) for x in p.placements], "mesh": list(p.device_mesh.shape),
                             "local": list(p.to_local().shape), "full": list(p.shape),
                             "fsdp_groups": sum(isinstance(m, FSDPModule) for m in unit.raw.modules())}
            elif hasattr(unit.module, "zero_offload_optimizer"):  # a DeepSpeedEngine: what it runs with
                inner = getattr(unit.optimizer, "optimizer", unit.optimizer)
                out[name] = {"optimizer": type(inner).__name__, "offload_optimizer": bool(unit.module.zero_offload_optimizer()),
                             "offload_param": bool(unit.module.zero_offload_param()),
                             "zero": {k: v for k, v in unit.module.config["zero_optimization"].items()
                                      if not isinstance(v, dict)}}
        return out

    def report(self) -> dict:
        from torch._dynamo.utils import counters

        return {"block_forwards": self.block_forwards, "conv_inputs": self.conv_inputs,
                "conv_weights": self.conv_weights, "graphs": int(counters["stats"]["unique_graphs"]) - self.graphs_before,
                "fused_adamw_calls": _FUSED_ADAMW_CALLS[0] - self.fused_adamw_before}


def _parse(spec: str, world_size: int):
    parts = spec.split(":")
    opts = dict(p.split("=", 1) for p in parts if "=" in p and p.split("=", 1)[0] in HARNESS_KEYS)
    overrides = tuple(p for p in parts if "=" in p and p.split("=", 1)[0] not in HARNESS_KEYS)
    plain = [p for p in parts if "=" not in p]
    stage, engine_kind = plain[0], plain[1]
    zero = int(plain[2]) if len(plain) > 2 else 2
    precision = plain[3] if len(plain) > 3 else "fp32"
    ac = len(plain) > 4 and plain[4] == "ac"
    micro = GLOBAL_BATCH // world_size // (2 if "accum" in plain else 1)  # accum: 2 micro-steps
    return stage, make_cfg(stage, engine_kind, zero, precision, ac, micro, extra=overrides), opts


def _break(engine, task, opts, env):
    """Deliberately broken variants, to prove the comparisons can fail."""
    kind = opts.get("break")
    if kind == "skip_step":
        unit = next(iter(task.units.values()))
        inner = getattr(unit.optimizer, "optimizer", unit.optimizer)  # the torch AdamW inside ZeRO's wrapper
        real, calls = inner.step, [0]

        def step(*a, **k):
            calls[0] += 1
            if calls[0] == 3 and env.rank == min(1, env.world_size - 1):
                return None  # this rank's parameters (or its shard) miss one update
            return real(*a, **k)

        inner.step = step
    elif kind == "no_grad_sync":
        real_accumulate = engine.accumulate

        def accumulate(unit, items):
            with engine.no_sync(unit):
                yield from real_accumulate(unit, items)

        engine.accumulate = accumulate
    elif kind == "quantizer_unplaced":
        # every rank believes it holds the first rows of the global batch (k-means, restarts): the
        # one place collectives are swapped after construction, a deliberate fault
        q = task.G.raw.quantize
        q.collectives = dataclasses.replace(q.collectives, rank=0)
    elif kind:
        raise ValueError(f"unknown break={kind}")


def _full(engine, task, ema: bool) -> dict:
    return {name: {k: v.double() for k, v in engine.full_state_dict(u, ema=ema).items() if v.is_floating_point()}
            for name, u in task.units.items()}


def _replica_spread(engine, full: dict, env) -> float:
    """Largest difference between this rank's view of the full weights and rank 0's (0 when every
    rank holds the same model), max over ranks."""
    if not env.is_distributed:
        return 0.0
    import torch.distributed as dist

    worst = torch.zeros((), dtype=torch.float64)
    for sd in full.values():
        for t in sd.values():
            ref = t.clone()
            dist.broadcast(ref, 0)
            worst = torch.maximum(worst, (t - ref).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def run_spec(index: int, spec: str, out: Path, env, device) -> dict:
    stage, cfg, opts = _parse(spec, env.world_size)
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, env, device)
    accum = grad_accum_steps(cfg, env.world_size)
    task = build_task(cfg, engine, accum)
    probes = Probes(task.units)
    init = _full(engine, task, ema=False)
    init_ema = _full(engine, task, ema=True)
    _break(engine, task, opts, env)
    ckpt_dir = out / f"ckpt_{opts.get('tag', index)}"
    start = 0
    if "resume" in opts:
        mgr = CheckpointManager(out / f"ckpt_{opts['resume']}", engine)
        progress = TrainState()
        mgr.load(mgr.latest(), training_state(engine, task.units, progress))
        start = progress.step
    stop = int(opts.get("save", opts.get("steps", STEPS)))
    grads: dict = {}
    if env.world_size == 1:
        real_step = engine.step

        def step(unit, **kw):  # each tensor's gradient norm at step 0, before clipping
            if not grads.get(unit.name):
                grads[unit.name] = {n: float(p.grad.norm()) for n, p in unit.raw.named_parameters()
                                    if p.grad is not None}
            return real_step(unit, **kw)

        engine.step = step
    history = []
    for step in range(start, stop):
        gb = global_batch(stage, step, cfg)
        # Micro-step i of every rank together is the same slice of the global batch at every world
        # size, so per-micro-step statistics (the VQGAN's adaptive weight) match one process.
        chunk = GLOBAL_BATCH // accum
        micro = chunk // env.world_size
        micro_batches = [{k: v[i * chunk + env.rank * micro:i * chunk + (env.rank + 1) * micro] for k, v in gb.items()}
                         for i in range(accum)]
        stats = task.train_step(micro_batches, step)
        history.append({"step": step, **{k: float(v) for k, v in stats.items()}})
    if "save" in opts:
        CheckpointManager(ckpt_dir, engine).save(stop, training_state(engine, task.units, TrainState(step=stop)))
    final = _full(engine, task, ema=False)
    spread = _replica_spread(engine, final, env)
    updates = {u: {k: final[u][k] - init[u][k] for k in final[u]} for u in final}
    # The resolution of the stored fp32 weights: each of the in-place updates rounds a weight to
    # its float32 spacing (<= eps * |theta|), so two runs' updates are known to about steps x that
    # per element, whatever the engine.
    spacing = torch.finfo(torch.float32).eps * len(history)
    resolution = {u: {k: float((final[u][k].abs() * spacing).norm()) for k in final[u]} for u in final}
    result = {"history": history, "probes": probes.report(), "layout": Probes.layout(task.units),
              "replica_spread": spread,
              "lr": {n: engine.lr(u) for n, u in task.units.items()}}
    if any(u.ema for u in task.units.values()):
        final_ema = _full(engine, task, ema=True)
        updates_ema = {u: {k: final_ema[u][k] - init_ema[u][k] for k in final_ema[u]} for u in final_ema}
    else:
        updates_ema = {}
    if env.rank == 0:
        torch.save({"updates": updates, "ema": updates_ema, "grads": grads, "resolution": resolution},
                   out / f"{index}.pt")
    return result


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    env = env_from_environ()
    device = init_distributed(env)
    results = {}
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        results[spec] = {"index": i, **run_spec(i, spec, out, env, device)}
        results[spec]["seconds"] = round(time.perf_counter() - t0, 2)  # where a launch spends its time
    if env.rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    exit_process(0)  # not interpreter shutdown, where a gloo thread can abort a finished rank


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
