"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across ranks.

Order as in torchtitan: activation checkpointing (the model's `grad_checkpointing` switch, set in
Engine.setup) -> compile -> `fully_shard` per block, then the root.

Layout: full sharding over all ranks by default, or hybrid sharding (HSDP) with
`engine.fsdp_shard_size=S`: a 2-D DeviceMesh ("replicate", "shard") of (world / S, S), each
parameter sharded over the S ranks of its group (one node) and replicated across groups, so the
per-block all-gathers stay inside a node and only the gradient all-reduce crosses nodes.
"""
from __future__ import annotations

import contextlib
import math

import torch

from taming_dist.engines.base import _BYTES, local_tensor
from taming_dist.engines.dist import ensure_process_group
from taming_dist.engines.single import SingleEngine
from taming_dist.logging import print0


class FSDPEngine(SingleEngine):
    kind = "fsdp"

    @staticmethod
    def planned_bytes(shapes, groups, blocks, zero_stage, world, ecfg):
        d, P = _BYTES[ecfg.precision], sum(s.numel() for s in shapes)
        blk = max(blocks, default=0)
        # FSDP2 shards each parameter on dim 0 in chunks of ceil(dim0 / world); rank 0 holds a full one.
        shard = ecfg.fsdp_shard_size or world
        local = sum(math.ceil(s[0] / shard) * (s.numel() // s[0]) for s in shapes if s.numel())
        # fp32 shards (MixedPrecisionPolicy casts the gathered copy). Buffers: the gathered copies of
        # the root's parameters (kept through forward and backward) and of two blocks (the running
        # and the prefetched one), one block's unsharded gradients and their fp32 reduce-scatter copy.
        return {"params": 4 * local, "grads": 4 * local, "optim": 8 * local,
                "buffers": d * (P - sum(blocks) + 2 * blk) + (d + 4) * blk}, local

    channels_last_weights = False

    def __init__(self, cfg, env, device):
        super().__init__(cfg, env, device)
        from torch.distributed.device_mesh import init_device_mesh

        ensure_process_group(device)
        shard = cfg.fsdp_shard_size or env.world_size
        if env.world_size % shard:
            raise ValueError(f"engine.fsdp_shard_size {shard} does not divide the world size {env.world_size}; use a "
                             "divisor, e.g. the GPUs per node")
        self.replicas = env.world_size // shard
        if self.replicas > 1:
            self.mesh = init_device_mesh(device.type, (self.replicas, shard), mesh_dim_names=("replicate", "shard"))
            self.layout = f"HSDP: {self.replicas} replicas x {shard}-way sharding"
        else:
            self.mesh = init_device_mesh(device.type, (env.world_size,), mesh_dim_names=("shard",))
            self.layout = f"FSDP2: full sharding over {env.world_size} ranks"
        print0(f"engine: {self.layout}")

    def _distribute(self, module, blocks):
        """Each declared block is compiled, then sharded, then the root (torchtitan's order): every
        block all-gathers on its own, and dynamo leaves FSDP2's hooks out of the graphs
        (torch._dynamo.config.skip_fsdp_hooks, on by default)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.cfg.compile:
            for b in blocks:
                b.compile(backend=self.cfg.compile_backend)
        mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for b in blocks:
            fully_shard(b, mesh=self.mesh, mp_policy=mp)
        fully_shard(module, mesh=self.mesh, mp_policy=mp)
        return module

    def _make_scaler(self):
        if self.cfg.precision != "fp16":
            return None
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler()

    def no_sync(self, unit):
        @contextlib.contextmanager
        def ctx():
            unit.raw.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                unit.raw.set_requires_gradient_sync(True)

        return ctx()

    def grad_norm(self, unit):
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for _, p in self.local_params(unit):
            if p.grad is not None:
                sq += local_tensor(p.grad).detach().float().pow(2).sum()
        # Under HSDP every shard is held by `replicas` ranks (with the same, all-reduced gradient).
        return (self.all_reduce(sq, "sum") / self.replicas).sqrt()
