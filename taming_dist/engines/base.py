"""The engine interface: what the loop, the tasks and the checkpoint code may ask of an engine.

An engine is built by `build_engine(cfg.engine, env, device)` (engines/__init__.py). Two classes
implement it: `TorchEngine` (engines/torch_engine.py: engine.kind single, ddp or fsdp, one class
that composes the free functions of engines/parallelize.py for its data-parallel mode) and
`DeepSpeedEngine` (engines/deepspeed.py: ZeRO-1/2/3), both directly on `Engine`. What the two do
differently is stated here (raising NotImplementedError) and implemented by both; the rest is
shared here, and DeepSpeedEngine replaces only the defaults that are about its own files and
partitions (describe, manifest_fields, save_native, load_native, _local_params).

A *unit* is one optimized module with its optimizer and LR schedule (the VQGAN stage has two: the
generator and the discriminator). Only engine code touches wrapper internals (DDP.module, DTensor
shards, DeepSpeed's ZeRO partitions). The whole interface of an engine instance:

  facts        kind, cfg, env, device, dtype, is_main, world_size, describe(), manifest_fields(),
               supports_async_checkpoint; layout (FSDP2 only: its mesh, in words)
  collectives  all_reduce, barrier; reduce_fn / broadcast_fn (the same, handed to model code)
  a unit       setup (wrap a module: the one place parallelism is applied); autocast; frozen
               (call a unit without gradients)
  a step       accumulate (micro-batches; uses no_sync), backward, prepare_step (unscale, the
               gradient norm), step (clip, optimizer, schedule, EMA; or skip), lr; state_bytes
               (what this rank holds, for tools and the planner's tests); grad_norm (torch
               engines only: what prepare_step returns; DeepSpeed's norm exists inside its step)
  checkpoints  unit_state_dict / load_unit_state_dict (DCP), save_native / load_native (an
               engine's own files), check_resumable, full_state_dict (export, images)

Facts of an engine *kind* that need no instance live as functions keyed by kind in
engines/__init__.py: `planned_bytes` and `planned_weights` (the memory planner), `consolidate`
(offline conversion), `param_count`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from taming_dist.config import EngineConfig, OptimConfig
from taming_dist.engines.dist import DistEnv

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Unit:
    name: str
    raw: nn.Module  # the module as the model code built it (sharded in place under FSDP2)
    module: Any  # what forward is called on: DDP wrapper, FSDP module, DeepSpeedEngine, or raw
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # local shards of EMA weights
    ema_decay: float = 0.0
    grad_clip: float = 0.0  # global-norm clipping, fixed at setup (0 = off)
    micro_steps: int = 1  # micro-batches in the current optimizer step (set by Engine.accumulate)
    last_micro_step: bool = True


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard of a DTensor that this rank holds (a view), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms and embeddings (minGPT's split)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        if p.ndim < 2 or "norm" in low or ".ln" in low or low.startswith("ln") or "emb" in low:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """torch AdamW with its fused kernel (`aten::_fused_adamw_`: one call updates every tensor), on
    CUDA and on CPU alike. On CPU torch would otherwise pick the per-tensor loop, a dozen ops per
    tensor; on FSDP2's sharded parameters each of them is a DTensor dispatch, and that loop took 46 of
    the 186 ms of a vqgan-tiny step on 2 CPU ranks (fused: 7 of 135 ms; the transformer-text-tiny
    step 70 -> 53 ms; README, "Engine settings for scale"). The kernel ships with torch (nothing is compiled), and the
    engines' equivalence tests hold every engine, DeepSpeed's ZeRO partitions included, to one
    process with it."""
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True)


def keep_kernel_choice(optimizer: torch.optim.Optimizer) -> None:
    """After loading optimizer state: a checkpoint's parameter groups carry the kernel flags of the
    optimizer that wrote them (`fused`, `foreach`), and torch's load puts them back, so a checkpoint
    written before AdamW was fused on CPU would silently bring the per-tensor loop back. The kernel
    is this run's choice (build_optimizer), not state; DeepSpeed's FusedAdam and DeepSpeedCPUAdam
    have no such flags."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


class Engine:
    """The interface of the module docstring, with what both implementations share: the
    collectives, `setup`'s bookkeeping, accumulation, frozen calls and the EMA."""

    kind = "base"  # single | ddp | fsdp | deepspeed: what a checkpoint's manifest records
    supports_async_checkpoint = True  # DCP's async_save holds every part of this engine's state

    def __init__(self, cfg: EngineConfig, env: DistEnv, device: torch.device):
        self.cfg = cfg
        self.env = env
        self.device = device
        self.dtype = _DTYPES[cfg.precision]
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ValueError(
                "engine.precision=fp16 needs a CUDA device (fp16 loss scaling is not supported on CPU); "
                "use engine.precision=bf16 or fp32 here"
            )
        if device.type == "cuda":
            self.set_cuda_math(cfg)

    @staticmethod
    def set_cuda_math(cfg: EngineConfig) -> None:
        """engine.tf32: fp32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs,
        fp32 accumulation); engine.cudnn_benchmark: let cuDNN time its convolution algorithms once
        per input shape (the VQGAN's shapes never change within a run)."""
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark

    # -- facts --------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def describe(self) -> str:
        """How the startup summary names this engine."""
        return self.cfg.kind

    def manifest_fields(self) -> dict:
        """Engine facts a checkpoint's manifest records (read back by `check_resumable`)."""
        return {"zero_stage": None}

    # -- collectives --------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.env.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum or mean) across data-parallel ranks; identity single-process."""
        if self.env.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if op == "mean":
                t /= self.env.world_size
        return t

    def broadcast_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """In-place broadcast from rank 0, handed to model code (dead-code restarts)."""

        def fn(t: torch.Tensor) -> torch.Tensor:
            if self.env.is_distributed:
                import torch.distributed as dist

                dist.broadcast(t, 0)
            return t

        return fn

    def reduce_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The sum-all-reduce handed to model code (codebook usage, EMA codebook statistics)."""
        return lambda t: self.all_reduce(t, "sum")

    # -- a unit -------------------------------------------------------------------------------
    def setup(
        self,
        module: nn.Module,
        *,
        name: str,
        optim: OptimConfig,
        lr: float,
        lr_lambda: Callable[[int], float],
        micro_batch_size: int = 1,
        grad_accum: int = 1,
        ema_decay: float = 0.0,
    ) -> Unit:
        """Wrap `module` as an optimized unit. Its repeated blocks (for activation checkpointing,
        per-block compile and per-block sharding) are the ones the model declares in
        `parallel_blocks()`; clipping at `optim.grad_clip` is fixed here for every later step."""
        module.to(self.device)
        blocks = list(module.parallel_blocks()) if hasattr(module, "parallel_blocks") else []
        unit = self._wrap(module, name=name, optim=optim, lr=lr, lr_lambda=lr_lambda, blocks=blocks,
                          micro_batch_size=micro_batch_size, grad_accum=grad_accum)
        unit.grad_clip = optim.grad_clip
        unit.ema_decay = ema_decay
        if ema_decay > 0:
            unit.ema = {n: t.detach().clone().float() for n, t in self._local_params(unit)}
        return unit

    def _wrap(self, module, *, name, optim, lr, lr_lambda, blocks, micro_batch_size, grad_accum) -> Unit:
        """Make `module` parallel and give it an optimizer, a schedule and (fp16) a loss scaler."""
        raise NotImplementedError

    def _local_params(self, unit: Unit) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, local tensor) for every trainable parameter: the shard this rank owns (a
        DTensor under FSDP2, whose gradients `local_tensor` reads)."""
        for n, p in unit.raw.named_parameters():
            if p.requires_grad:
                yield n, p

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def frozen(self, unit: Unit):
        """Call the unit's module with its parameters frozen (no gradients, no gradient sync):
        the generator step runs the discriminator this way."""
        params = [p for p in unit.raw.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield unit.raw
        finally:
            for p in params:
                p.requires_grad_(True)

    # -- a step -------------------------------------------------------------------------------
    def accumulate(self, unit: Unit, micro_batches: list) -> Iterator:
        """Yield the micro-batches of one optimizer step. The body of the caller's loop runs with
        gradient sync off for all but the last one (`no_sync`), and `backward` divides each loss
        by the number of micro-batches. The one accumulation construct of every engine."""
        n = len(micro_batches)
        unit.micro_steps = n
        try:
            for i, mb in enumerate(micro_batches):
                unit.last_micro_step = i == n - 1
                with contextlib.nullcontext() if unit.last_micro_step else self.no_sync(unit):
                    yield mb
        finally:  # also when the caller leaves early (a non-finite loss)
            unit.micro_steps, unit.last_micro_step = 1, True

    def no_sync(self, unit: Unit):
        """A context in which backward accumulates gradients locally, without the cross-rank sync."""
        raise NotImplementedError

    def backward(self, unit: Unit, loss: torch.Tensor) -> None:
        """Backpropagate `loss / unit.micro_steps` (fp16: scaled)."""
        raise NotImplementedError

    def prepare_step(self, unit: Unit) -> torch.Tensor | None:
        """After the step's last backward: unscale fp16 gradients and return their global norm (a
        device tensor, no host read), or None where the engine only knows it inside `step`
        (DeepSpeed). The caller folds its finiteness into the step's one fused all-reduce."""
        raise NotImplementedError

    def step(self, unit: Unit, skip: bool | None = None, norm: torch.Tensor | None = None) -> dict:
        """Clip (at the unit's grad_clip), optimizer step, LR schedule, EMA, zero grads; or, with
        `skip`, only drop the gradients. `skip` and `norm` come from the caller's fused all-reduce
        (tasks/base.py: reduce_step): every rank passes the same `skip`, so all skip together and no
        host read happens here. Without them (tests, tools) the norm is computed and read here.
        Returns {"grad_norm": the norm before clipping (a device tensor), "skipped": bool}."""
        raise NotImplementedError

    def lr(self, unit: Unit) -> float:
        """The unit's current learning rate (of its first parameter group)."""
        raise NotImplementedError

    def state_bytes(self, unit: Unit) -> dict[str, int]:
        """Bytes this rank holds for the unit: {params, grads, optim} (what plan.py predicts)."""
        raise NotImplementedError

    @torch.no_grad()
    def _update_ema(self, unit: Unit) -> None:
        if unit.ema_decay <= 0:
            return
        for n, t in self._local_params(unit):
            unit.ema[n].lerp_(t.detach().float(), 1.0 - unit.ema_decay)

    # -- checkpoints --------------------------------------------------------------------------
    # A checkpoint is one DCP save of Stateful parts (checkpoint/manager.py): one UnitState per
    # unit, whose content each engine defines, and the run's state. DeepSpeed keeps its model and
    # optimizer in its own format beside it (save_native / load_native).
    def unit_state_dict(self, unit: Unit) -> dict:
        """What a checkpoint holds of a unit; DCP fills this same structure in place on load."""
        raise NotImplementedError

    def load_unit_state_dict(self, unit: Unit, state: dict) -> None:
        raise NotImplementedError

    def save_native(self, path: str, units: dict[str, Unit]) -> None:
        """Engine-owned files beside the DCP state (nothing for the torch engines)."""

    def load_native(self, path: str, units: dict[str, Unit]) -> None:
        """Read what save_native wrote, before the DCP state is loaded."""

    def check_resumable(self, manifest: dict, path: str) -> None:
        """Raise a ValueError saying what to do when a checkpoint (its manifest) cannot be resumed
        by this engine at this world size."""
        raise NotImplementedError

    def full_state_dict(self, unit: Unit, ema: bool = False) -> dict[str, torch.Tensor]:
        """The unit's full (unsharded) fp32 weights on every rank: for export and images."""
        raise NotImplementedError


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def schedule_state(unit: Unit) -> dict:
    """The unit's LR schedule and loss-scaler state: plain values (counters, learning rates, the
    loss scale), each a key DCP can see. Read back with `load_schedule_state`."""
    return {"scheduler": unit.scheduler.state_dict(),
            "scaler": unit.scaler.state_dict() if unit.scaler is not None else None}


def load_schedule_state(unit: Unit, state: dict) -> None:
    unit.scheduler.load_state_dict(state["scheduler"])
    if unit.scaler is not None and state["scaler"] is not None:
        unit.scaler.load_state_dict(state["scaler"])


def lr_lambda_for(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then constant or cosine decay to min_lr_ratio (a multiplier of the base lr)."""

    def f(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(1, total_steps - cfg.warmup_steps)
            t = min(1.0, (step - cfg.warmup_steps) / span)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule {cfg.schedule!r} is not one of constant, cosine")
    return f
