"""One process (CPU or one GPU); also the base of the DDP and FSDP2 engines.

Checkpoints of all torch engines go through torch.distributed.checkpoint (DCP) with the
`get_state_dict` / `set_state_dict` helpers, which use plain parameter names for every wrapper: a
checkpoint written by one torch engine at one world size loads into another (DCP reshards).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from taming_dist.engines.base import (
    Engine, Unit, build_optimizer, load_schedule_state, schedule_state,
)

TORCH_ENGINES = ("single", "ddp", "fsdp")


class SingleEngine(Engine):
    kind = "single"

    def _wrap(self, module, *, name, optim, lr, lr_lambda, blocks, micro_batch_size, grad_accum) -> Unit:
        module = self._distribute(module, blocks)
        optimizer = build_optimizer(module, optim, lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return Unit(name, raw=module, module=self._forward_module(module), optimizer=optimizer,
                    scheduler=scheduler, scaler=self._make_scaler())

    def _distribute(self, module: nn.Module, blocks: list[nn.Module]) -> nn.Module:
        """Compile (and, in FSDP2, shard) the module in place. One process and DDP compile the
        whole module; in-place `compile()` keeps the parameter names (no `_orig_mod.` prefix in
        checkpoints), and DDP's gradient hooks sit on the parameters, outside the graph."""
        if self.cfg.compile:
            module.compile(backend=self.cfg.compile_backend)
        return module

    def _forward_module(self, module: nn.Module):
        return module

    def _make_scaler(self):
        return torch.amp.GradScaler("cuda") if self.cfg.precision == "fp16" else None

    # -- checkpoints through DCP ----------------------------------------------------------------
    def unit_state_dict(self, unit: Unit) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(unit.raw, unit.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "schedule": schedule_state(unit)}
        if unit.ema:
            state["ema"] = unit.ema  # DTensors under FSDP2: DCP reshards them like the weights
        return state

    def load_unit_state_dict(self, unit: Unit, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(unit.raw, unit.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        load_schedule_state(unit, state["schedule"])
        for k, v in state.get("ema", {}).items():
            if v is not unit.ema[k]:
                unit.ema[k].copy_(v)

    def check_resumable(self, manifest: dict, path: str) -> None:
        if manifest["engine"] not in TORCH_ENGINES:
            raise ValueError(
                f"{path} was written by engine {manifest['engine']!r} but this run uses {self.kind!r}; convert it "
                "with `taming-dist convert` and start from it with `init_from:` instead of resuming"
            )
        # Any world size: DCP reshards the weights, the optimizer state and the EMA.

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
