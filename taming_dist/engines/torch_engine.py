"""engine.kind single, ddp and fsdp: one class, composed by data-parallel mode.

`TorchEngine` owns what the three share: torch's AdamW and LR schedule, the loss scaler, clipping,
and checkpoints through torch.distributed.checkpoint (DCP) with the `get_state_dict` /
`set_state_dict` helpers, which use plain parameter names for every wrapper: a checkpoint written
by one torch engine at one world size loads into another (DCP reshards). What differs by mode is
the parallelism (engines/parallelize.py, applied in its one order), how gradient sync is paused
(`no_sync`) and how the gradient norm is summed over shards (`grad_norm`).

The layout facts of these kinds that need no instance (the memory planner's bytes, offline
conversion) are the module-level functions at the end.
"""
from __future__ import annotations

import contextlib
import math

import torch

from taming_dist.engines.base import (
    _BYTES, Engine, Unit, _strip, build_optimizer, keep_kernel_choice, load_schedule_state, local_tensor,
    schedule_state,
)
from taming_dist.engines.dist import ensure_process_group
from taming_dist.engines.parallelize import data_parallel_mesh, parallelize
from taming_dist.logging import print0

TORCH_KINDS = {"single": "none", "ddp": "ddp", "fsdp": "fsdp"}  # engine.kind -> data-parallel mode


class TorchEngine(Engine):
    """One process ("single", mode none), DDP or FSDP2 (full sharding or HSDP on a 2-D mesh)."""

    def __init__(self, cfg, env, device, kind: str | None = None):
        super().__init__(cfg, env, device)
        self.kind = kind or cfg.kind
        self.mode = TORCH_KINDS[self.kind]
        self.mesh, self.replicas = None, 1
        if self.mode == "fsdp":
            ensure_process_group(device)
            self.mesh, self.replicas, self.layout = data_parallel_mesh(env.world_size, device, cfg.fsdp_shard_size)
            print0(f"engine: {self.layout}")

    def _wrap(self, module, *, name, optim, lr, lr_lambda, blocks, micro_batch_size, grad_accum) -> Unit:
        forward = parallelize(module, blocks, self.cfg, self.mode, mesh=self.mesh, device=self.device)
        optimizer = build_optimizer(module, optim, lr)  # after sharding: FSDP2's AdamW steps the shards
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return Unit(name, raw=module, module=forward, optimizer=optimizer, scheduler=scheduler,
                    scaler=self._scaler())

    def _scaler(self):
        if self.cfg.precision != "fp16":
            return None
        if self.mode == "fsdp":  # the inf checks of the shards are all-reduced
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler()
        return torch.amp.GradScaler("cuda")

    def frozen(self, unit: Unit):
        if self.mode == "fsdp":
            fsdp_lazy_init(unit.raw)
        return super().frozen(unit)

    def no_sync(self, unit):
        if self.mode == "ddp":
            return unit.module.no_sync()
        if self.mode == "fsdp":
            return _fsdp_no_sync(unit.raw)
        return contextlib.nullcontext()

    def backward(self, unit, loss):
        loss = loss / unit.micro_steps
        if unit.scaler is not None:
            unit.scaler.scale(loss).backward()
        else:
            loss.backward()

    def grad_norm(self, unit) -> torch.Tensor:
        """Global L2 norm of the gradients (across shards); fp32 scalar tensor, no host read."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for _, p in self._local_params(unit):
            if p.grad is not None:
                sq += local_tensor(p.grad).detach().float().pow(2).sum()
        if self.mode == "fsdp":
            # Each rank holds a shard; under HSDP every shard is held by `replicas` ranks (with the
            # same, all-reduced gradient), counted once.
            sq = self.all_reduce(sq, "sum") / self.replicas
        return sq.sqrt()

    def prepare_step(self, unit):
        if unit.scaler is not None:
            unit.scaler.unscale_(unit.optimizer)
        return self.grad_norm(unit)

    def step(self, unit, skip=None, norm=None):
        if norm is None:
            norm = self.prepare_step(unit)
        if skip is None:
            skip = not bool(torch.isfinite(norm))  # a host read; the training step passes `skip`
        if not skip and unit.grad_clip > 0:
            coef = torch.clamp(unit.grad_clip / (norm + 1e-6), max=1.0)
            for _, p in self._local_params(unit):
                if p.grad is not None:
                    local_tensor(p.grad).detach().mul_(coef.to(p.grad.dtype))
        if unit.scaler is not None:
            if skip:
                unit.scaler.update()  # the inf checks of unscale_ are recorded; reset for the next step
            else:
                unit.scaler.step(unit.optimizer)  # skips by itself on inf/nan
                unit.scaler.update()
        elif not skip:
            unit.optimizer.step()
        unit.optimizer.zero_grad(set_to_none=True)
        if not skip:
            unit.scheduler.step()
            self._update_ema(unit)
        return {"grad_norm": norm, "skipped": skip}

    def lr(self, unit):
        return unit.optimizer.param_groups[0]["lr"]

    def state_bytes(self, unit):
        # Gradients: one per local parameter element, in the parameter's dtype, as during backward.
        params = sum(local_tensor(p).numel() * p.element_size() for _, p in self._local_params(unit))
        optim = sum(local_tensor(v).numel() * v.element_size() for st in unit.optimizer.state.values()
                    for v in st.values() if torch.is_tensor(v) and v.ndim > 0)
        return {"params": params, "grads": params, "optim": optim}

    # -- checkpoints through DCP ----------------------------------------------------------------
    def unit_state_dict(self, unit):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(unit.raw, unit.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "schedule": schedule_state(unit)}
        if unit.ema:
            state["ema"] = unit.ema  # DTensors under FSDP2: DCP reshards them like the weights
        return state

    def load_unit_state_dict(self, unit, state):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(unit.raw, unit.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        keep_kernel_choice(unit.optimizer)
        load_schedule_state(unit, state["schedule"])
        for k, v in state.get("ema", {}).items():
            if v is not unit.ema[k]:
                unit.ema[k].copy_(v)

    def check_resumable(self, manifest, path):
        if manifest["engine"] not in TORCH_KINDS:
            raise ValueError(
                f"{path} was written by engine {manifest['engine']!r} but this run uses {self.kind!r}; convert it "
                "with `taming-dist convert` and start from it with `init_from:` instead of resuming"
            )
        # Any world size: DCP reshards the weights, the optimizer state and the EMA.

    def full_state_dict(self, unit, ema=False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(unit.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        sd = {k: _full(v).detach().float().cpu().clone() if v.is_floating_point() else _full(v).cpu().clone()
              for k, v in sd.items()}
        if ema and unit.ema:
            for k, v in unit.ema.items():
                sd[k] = _full(v).detach().float().cpu().clone()
        return sd


def fsdp_lazy_init(module) -> None:
    """Run FSDP2's lazy init of the root `module` now, while its parameters require gradients.

    FSDP2 fixes each parameter group's gradient dtypes (reduce in `reduce_dtype`, then cast to the
    shards' dtype) at the root's lazy init, the first forward, from the parameters that require a
    gradient at that moment. Up to torch 2.11 at least, a group with none of them gets neither, so a
    unit whose first forward is a frozen call (the discriminator, in the generator step) reduces in
    the compute dtype and then fails to assign bf16 / fp16 gradients to its fp32 shards: the first
    CUDA run showed it (docs/platform-notes.md, "The first CUDA run"); newer torch falls back to the
    frozen parameters' dtypes. Idempotent: the first forward then finds the root initialised."""
    get_state = getattr(module, "_get_fsdp_state", None)  # private, no public equivalent (2.11-2.14)
    if get_state is not None:
        get_state()._lazy_init()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    """FSDP2's accumulation switch: no reduce-scatter until it is turned back on."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective: every rank must call), else the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -- facts of the kinds, no instance needed (engines/__init__.py dispatches to them) -------------
def planned_bytes(kind, shapes, groups, blocks, world, ecfg) -> tuple[dict, int]:
    """plan.py's memory model of one unit on the largest rank under DDP or FSDP2."""
    d, P = _BYTES[ecfg.precision], sum(s.numel() for s in shapes)
    if kind == "ddp":
        # fp32 parameters, gradients and moments, replicated. Buffers: DDP's gradient buckets, a
        # second copy of every gradient (gradient_as_bucket_view=False).
        return {"params": 4 * P, "grads": 4 * P, "optim": 8 * P, "buffers": 4 * P}, P
    if kind != "fsdp":
        raise ValueError(f"the memory planner has no model of engine {kind!r}")
    root_only = ecfg.fsdp_wrap == "root"
    if root_only:
        blocks = []  # one group: the root's gathered copy is the whole module's (below)
    blk = max(blocks, default=0)
    # FSDP2 shards each parameter on dim 0 in chunks of ceil(dim0 / world); rank 0 holds a full one.
    shard = ecfg.fsdp_shard_size or world
    local = sum(math.ceil(s[0] / shard) * (s.numel() // s[0]) for s in shapes if s.numel())
    # fp32 shards (MixedPrecisionPolicy casts the gathered copy). Buffers: the gathered copies of
    # the root's parameters (kept through forward and backward) and of two blocks (the running
    # and the prefetched one), one block's unsharded gradients and their fp32 reduce-scatter copy;
    # with the root as the only group, all of the module's gathered parameters and gradients.
    grads = (d + 4) * (P if root_only else blk)
    return {"params": 4 * local, "grads": 4 * local, "optim": 8 * local,
            "buffers": d * (P - sum(blocks) + 2 * blk) + grads}, local


def consolidate(ckpt, manifest: dict, ema: bool, read_tensors) -> dict[str, dict]:
    """{unit: full state dict} of a format-2/3 checkpoint, offline (no process group):
    `{unit}.model.*` and `{unit}.ema.*` of the DCP state."""
    result = {}
    for name in manifest["units"]:
        state = read_tensors(ckpt / "state", [f"{name}.model."] + ([f"{name}.ema."] if ema else []),
                             f"convert {name}")
        sd = _strip(state, f"{name}.model.")
        sd.update(_strip(state, f"{name}.ema."))
        result[name] = sd
    return result


def consolidate_v1(ckpt, meta: dict, ema: bool) -> dict[str, dict]:
    """The same for format version 1 (meta.pt, a `dcp/` folder of {unit: {model, optim, ema}})."""
    import tempfile
    from pathlib import Path

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(ckpt / "dcp", Path(tmp) / "full.pt")
        state = torch.load(Path(tmp) / "full.pt", weights_only=True)
    result = {}
    for name in meta["schedulers"]:
        sd = dict(state[name]["model"])
        if ema and state[name].get("ema"):
            sd.update(state[name]["ema"])
        result[name] = sd
    return result
