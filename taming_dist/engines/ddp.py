"""DistributedDataParallel: replicated parameters, all-reduced gradients."""
from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from taming_dist.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    kind = "ddp"
    planned_weights = "fp32"  # autocast casts the fp32 weights per use (measured with the activations)

    @staticmethod
    def planned_bytes(shapes, groups, blocks, zero_stage, world, ecfg):
        # fp32 parameters, gradients and moments, replicated. Buffers: DDP's gradient buckets, a
        # second copy of every gradient (gradient_as_bucket_view=False).
        P = sum(s.numel() for s in shapes)
        return {"params": 4 * P, "grads": 4 * P, "optim": 8 * P, "buffers": 4 * P}, P

    def _forward_module(self, module):
        if not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def no_sync(self, unit):
        return unit.module.no_sync()
