"""How a module is made data-parallel: free functions, applied in one visible order by `parallelize`.

The order is torchtitan's (`parallelize_llama`), and each step needs the ones before it:

  1. activation checkpointing: the model's own switch (`grad_checkpointing`), so the recomputed
     region is the block's forward as the model wrote it, inside whatever steps 3 and 4 add.
  2. channels_last weights: before compile, so the graphs are traced for the layout they run with
     (not under FSDP2, which refuses non-contiguous parameters).
  3. compile: in place (`module.compile()`, no `_orig_mod.` in parameter names, so checkpoints do
     not depend on it). Per declared block under FSDP2 and DDP: under FSDP2 every block is its own
     graph between the all-gather hooks (dynamo leaves those hooks out:
     torch._dynamo.config.skip_fsdp_hooks); under DDP the gradient hooks sit on the parameters,
     outside the graphs, and blocks of one kind share one graph, so compile time does not grow with
     depth (the whole module took 5 graphs, split by dynamo's DDPOptimizer at the gradient buckets,
     and 13 s against 4.5 s for the 2-block test GPT). One process compiles the whole module.
  4. FSDP2: `fully_shard` each declared block, then the root, which takes the parameters left over.
     Every block all-gathers and frees on its own; the root's parameters stay gathered. With
     `engine.fsdp_wrap=root` only the root: one all-gather and one reduce-scatter for the whole
     module, which small models on slow links prefer (the demo's VQGAN step on 2 CPU ranks: 0.36 s
     against 0.57 s per block).
  5. DDP: wrap what forward is called on; the parameters stay the module's own.

The modes: "none" (one process), "ddp", "fsdp" (full sharding, or HSDP on a 2-D mesh; see
`data_parallel_mesh`). DeepSpeed wraps modules itself (engines/deepspeed.py) and uses `apply_ac` only.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from taming_dist.config import EngineConfig
from taming_dist.engines.base import _DTYPES

MODES = ("none", "ddp", "fsdp")


def apply_ac(module: nn.Module, enabled: bool) -> None:
    """Activation checkpointing of the model's repeated blocks: the model implements it (it knows
    which activations are cheap to recompute); here it is only switched on."""
    if enabled and hasattr(module, "grad_checkpointing"):
        module.grad_checkpointing = True


def apply_channels_last(module: nn.Module, enabled: bool) -> None:
    """Convolution weights in channels_last (NHWC) memory format, what tensor cores read best."""
    if enabled:
        module.to(memory_format=torch.channels_last)


def apply_compile(module: nn.Module, blocks: list[nn.Module], backend: str, per_block: bool) -> None:
    """torch.compile in place: each block on its own (`per_block`) or the whole module."""
    for m in (blocks if per_block else [module]):
        m.compile(backend=backend)


def apply_fsdp(module: nn.Module, blocks: list[nn.Module], mesh, param_dtype: torch.dtype) -> None:
    """FSDP2 (`fully_shard`), each block first, then the root. The gathered copy is cast to
    `param_dtype` for compute; gradients are reduced in fp32 and the shards stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for b in blocks:
        fully_shard(b, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)


def apply_ddp(module: nn.Module, device: torch.device) -> Any:
    """DistributedDataParallel around `module`; a module without trainable parameters is left as
    it is (DDP refuses one, and it has no gradients to average)."""
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in module.parameters()):
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def parallelize(module: nn.Module, blocks: list[nn.Module], cfg: EngineConfig, mode: str, mesh=None,
                device: torch.device | None = None) -> Any:
    """Apply steps 1-5 of the module docstring for `mode`, in that order; `module` is changed in
    place (and sharded under FSDP2). Returns what forward is called on (the DDP wrapper, or
    `module`). `blocks` are the model's repeated blocks (`parallel_blocks()`); `mesh` is FSDP2's."""
    if mode not in MODES:
        raise ValueError(f"data-parallel mode {mode!r} is not one of {', '.join(MODES)}")
    apply_ac(module, cfg.activation_checkpointing)
    apply_channels_last(module, cfg.channels_last and mode != "fsdp")
    if cfg.compile:
        apply_compile(module, blocks, cfg.compile_backend, per_block=mode in ("ddp", "fsdp"))
    if mode == "fsdp":
        apply_fsdp(module, blocks if cfg.fsdp_wrap == "blocks" else [], mesh, _DTYPES[cfg.precision])
    if mode == "ddp":
        return apply_ddp(module, device)
    return module


def data_parallel_mesh(world_size: int, device: torch.device, shard_size: int = 0):
    """FSDP2's DeviceMesh and a line describing it: full sharding over all ranks, or with
    `shard_size=S` hybrid sharding (HSDP), a 2-D mesh ("replicate", "shard") of (world / S, S):
    each parameter sharded over the S ranks of its group (one node) and replicated across groups,
    so the per-block all-gathers stay inside a node and only the gradient all-reduce crosses nodes.
    Returns (mesh, replicas, description)."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = shard_size or world_size
    if world_size % shard:
        raise ValueError(f"engine.fsdp_shard_size {shard} does not divide the world size {world_size}; use a "
                         "divisor, e.g. the GPUs per node")
    replicas = world_size // shard
    if replicas > 1:
        mesh = init_device_mesh(device.type, (replicas, shard), mesh_dim_names=("replicate", "shard"))
        return mesh, replicas, f"HSDP: {replicas} replicas x {shard}-way sharding"
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    return mesh, 1, f"FSDP2: full sharding over {world_size} ranks"
