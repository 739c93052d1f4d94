"""DistributedDataParallel: replicated parameters, all-reduced gradients."""
from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from taming_dist.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    kind = "ddp"

    def _forward_module(self, module):
        if not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def no_sync(self, unit):
        return unit.module.no_sync()
