"""One process (CPU or one GPU); also the base of the DDP and FSDP2 engines.

Checkpoints of all torch engines go through torch.distributed.checkpoint (DCP) with the
`get_state_dict` / `set_state_dict` helpers, which use plain parameter names for every wrapper: a
checkpoint written by one torch engine at one world size loads into another (DCP reshards).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from taming_dist.engines.base import Engine, Unit, build_optimizer


class SingleEngine(Engine):
    kind = "single"

    def _wrap(self, module, *, name, optim, lr, lr_lambda, blocks, micro_batch_size, grad_accum) -> Unit:
        module = self._distribute(module, blocks)
        optimizer = build_optimizer(module, optim, lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        scaler = self._make_scaler()
        if self.cfg.compile:
            # In-place compile keeps the parameter names (no `_orig_mod.` prefix in checkpoints).
            module.compile()
        return Unit(name, raw=module, module=self._forward_module(module), optimizer=optimizer,
                    scheduler=scheduler, scaler=scaler)

    def _distribute(self, module: nn.Module, blocks: list[nn.Module]) -> nn.Module:
        return module

    def _forward_module(self, module: nn.Module):
        return module

    def _make_scaler(self):
        return torch.amp.GradScaler("cuda") if self.cfg.precision == "fp16" else None

    # -- checkpoints through DCP ----------------------------------------------------------------
    def _unit_state(self, unit: Unit) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(unit.raw, unit.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if unit.ema:
            state["ema"] = unit.ema
        return state

    def save(self, path: str, units: dict[str, Unit]) -> None:
        import torch.distributed.checkpoint as dcp

        state = {name: self._unit_state(u) for name, u in units.items()}
        dcp.save(state, checkpoint_id=f"{path}/dcp")

    def load(self, path: str, units: dict[str, Unit]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = {name: self._unit_state(u) for name, u in units.items()}
        dcp.load(state, checkpoint_id=f"{path}/dcp")
        for name, u in units.items():
            set_state_dict(u.raw, u.optimizer, model_state_dict=state[name]["model"],
                           optim_state_dict=state[name]["optim"])
            if u.ema:
                for k, v in state[name]["ema"].items():
                    u.ema[k].copy_(v)

    def full_state_dict(self, unit: Unit, ema: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(unit.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        sd = {k: _full(v).detach().float().cpu().clone() if v.is_floating_point() else _full(v).cpu().clone()
              for k, v in sd.items()}
        if ema and unit.ema:
            for k, v in unit.ema.items():
                sd[k] = _full(v).detach().float().cpu().clone()
        return sd


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective: every rank must call), else the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
