"""DeepSpeed ZeRO-1/2/3: one DeepSpeedEngine per unit (the VQGAN stage has two).

Our config generates DeepSpeed's: on CPU a torch AdamW is passed in (its fused kernel ships with
torch; no DeepSpeed op is JIT-compiled), gradient accumulation is driven by
`set_gradient_accumulation_boundary`, so the loop calls `step` once per optimizer step like on every
other engine, and clipping is DeepSpeed's own.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import warnings

import torch

from taming_dist.engines.base import (
    _BYTES, Engine, Unit, _strip, build_optimizer, keep_kernel_choice, load_schedule_state, param_groups,
    schedule_state,
)
from taming_dist.engines.dist import ensure_process_group
from taming_dist.engines.parallelize import apply_ac


def init_deepspeed_comm(env, device: torch.device) -> None:
    import torch.distributed as dist

    # DeepSpeed reads the launcher's variables itself; under srun or plain python they are not
    # set, so export what engines/dist.py derived.
    for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                       ("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port)):
        os.environ.setdefault(key, str(value))
    ensure_process_group(device)
    # Named before the first import of deepspeed: its accelerator probe otherwise logs a WARNING per
    # rank ("Setting accelerator to CPU") on every CPU run.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    if device.type == "cpu":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op at init (~50 s, see
        # docs/platform-notes.md); gloo's all-reduce is used without it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # DeepSpeed's ZeRO code calls two c10d collectives that torch deprecated; the FutureWarning
    # (one per call site and rank) tells a user nothing they can act on. Only these two messages.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())


def _register_table_reads(module: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters only when that module's forward runs. Codebooks are
    nn.Embedding children whose `.weight` the parent reads as a table (distances, lookups), so
    they are registered as external parameters of the parent to be gathered with it."""
    import deepspeed

    for parent in module.modules():
        for child in parent.children():
            if isinstance(child, torch.nn.Embedding):
                deepspeed.zero.register_external_parameter(parent, child.weight)


# Keys of a user's DeepSpeed config that this project sets from its own config: the loop, the data
# stream and the checkpoints depend on them, so a different value would silently break them.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x ranks)",
    "bf16": "engine.precision", "fp16": "engine.precision", "amp": "engine.precision",
    "gradient_clipping": "train.optim.grad_clip / train.disc_optim.grad_clip",
    "optimizer": "train.optim (the engine passes its own AdamW)",
    "scheduler": "train.optim.schedule (the engine steps its own LR schedule)",
    "zero_optimization.stage": "engine.zero_stage",
}


def read_user_config(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            user = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"engine.deepspeed_config: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"engine.deepspeed_config: {path} is not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise ValueError(f"engine.deepspeed_config: {path} must hold a JSON object")
    return user


def merge_user_config(generated: dict, user: dict) -> dict:
    """`user` merged over `generated` (nested dicts merged key by key, the user's values winning),
    except the keys this project owns, which are refused by name with the setting to use instead."""
    owned = [k for k in OWNED_KEYS if _lookup(user, k) is not None]
    if owned:
        raise ValueError("engine.deepspeed_config sets keys taming_dist derives from its own config: "
                         + "; ".join(f"{k} (set {OWNED_KEYS[k]})" for k in owned))
    return _merge(generated, user)


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# DeepSpeed defaults (deepspeed/runtime/zero/config.py) that this engine leaves as they are, and its
# own stage-3 persistence threshold: what the memory plan (planned_bytes) assumes.
DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size: one buffer of this many elements (contiguous_gradients)
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size
DS_PERSISTENCE = 10_000  # stage3_param_persistence_threshold: smaller parameters stay gathered


def unflatten_zero3(parts: list[torch.Tensor], shape) -> torch.Tensor:
    """A ZeRO-3 parameter (or a tensor laid out like it, e.g. its EMA) from every rank's flat,
    padded partition, in rank order. Shared by the engine (export) and `convert` (offline)."""
    numel = torch.Size(shape).numel()
    return torch.cat([p.flatten() for p in parts])[:numel].view(shape)


def ema_rank_key(rank: int) -> str:
    """Under ZeRO-3 each rank's EMA is its own partition: one checkpoint key per rank."""
    return f"ema_rank{rank:05d}"


class DeepSpeedEngine(Engine):
    kind = "deepspeed"

    def __init__(self, cfg, env, device):
        super().__init__(cfg, env, device)
        init_deepspeed_comm(env, device)

    def _ds_config(self, micro_batch_size: int, grad_accum: int, grad_clip: float) -> dict:
        """The generated DeepSpeed config, with the user's `engine.deepspeed_config` merged over it."""
        zero: dict = {"stage": self.cfg.zero_stage}
        if self.cfg.zero_stage == 3:
            # Small parameters (norms, biases) stay replicated: fewer tiny all-gathers.
            zero.update({"stage3_param_persistence_threshold": 10_000, "stage3_gather_16bit_weights_on_model_save": False})
        if self.cfg.offload_optimizer == "cpu":
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if self.cfg.offload_params == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        generated = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch_size * grad_accum * self.world_size,
            "gradient_clipping": grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.cfg.precision == "bf16"},
            "fp16": {"enabled": self.cfg.precision == "fp16", "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if not self.cfg.deepspeed_config:
            return generated
        return merge_user_config(generated, read_user_config(self.cfg.deepspeed_config))

    def _wrap(self, module, *, name, optim, lr, lr_lambda, blocks, micro_batch_size, grad_accum) -> Unit:
        """Activation checkpointing, then DeepSpeed's own wrapping (ZeRO re-views the parameters
        into flat buffers, so their memory format stays; only the activations are channels_last),
        then DeepSpeedEngine.compile of the whole module."""
        import deepspeed

        apply_ac(module, self.cfg.activation_checkpointing)
        optimizer = self._optimizer(module, optim, lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        ds_engine, ds_opt, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer,
            config=self._ds_config(micro_batch_size, grad_accum, optim.grad_clip),
        )
        if self._partitioned():
            _register_table_reads(ds_engine.module)
        if self.cfg.compile:
            ds_engine.compile(backend=self.cfg.compile_backend)
        return Unit(name, raw=ds_engine.module, module=ds_engine, optimizer=ds_opt, scheduler=scheduler)

    def _optimizer(self, module, optim, lr):
        """ZeRO-Offload steps the optimizer on the CPU with DeepSpeedCPUAdam (DeepSpeed refuses
        another optimizer there); its C++ op is JIT-built once into TORCH_EXTENSIONS_DIR (the
        Makefile points it at .cache/). On CUDA without offload, DeepSpeed's FusedAdam; else (CPU)
        torch's fused AdamW (engines/base.py: build_optimizer), which needs no DeepSpeed op at all."""
        groups = param_groups(module, optim.weight_decay)
        kw = dict(lr=lr, betas=tuple(optim.betas), eps=optim.eps)
        if self.cfg.offload_optimizer == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        if self.device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        return build_optimizer(module, optim, lr)

    def _partitioned(self) -> bool:
        return self.cfg.zero_stage == 3

    def _local_params(self, unit):
        for n, p in unit.raw.named_parameters():
            if p.requires_grad:
                yield n, (p.ds_tensor if self._partitioned() else p)

    def no_sync(self, unit):
        # DeepSpeed defers the gradient reduction itself until the accumulation boundary, which
        # backward sets from Engine.accumulate's bookkeeping.
        return contextlib.nullcontext()

    def backward(self, unit, loss):
        unit.module.set_gradient_accumulation_boundary(unit.last_micro_step)
        # Divided here like on every engine, not by DeepSpeed (whose count is per call of step).
        unit.module.backward(loss / unit.micro_steps, scale_wrt_gas=False)

    supports_async_checkpoint = False  # its model and optimizer files come from its own synchronous save_checkpoint

    def describe(self):
        return f"deepspeed ZeRO-{self.cfg.zero_stage}"

    def manifest_fields(self):
        return {"zero_stage": self.cfg.zero_stage}

    def prepare_step(self, unit):
        return None  # DeepSpeed computes (and clips by) the norm inside its own step

    def step(self, unit, skip=None, norm=None):
        if skip:  # drop the accumulated gradients
            unit.module.set_gradient_accumulation_boundary(True)
            unit.module.zero_grad()
            return {"grad_norm": torch.full((), float("nan"), device=self.device), "skipped": True}
        # Clipping is DeepSpeed's own, at the `gradient_clipping` its config got at setup.
        unit.module.step()
        norm = unit.module.get_global_grad_norm()
        if norm is None:
            norm = float("nan")
        if not torch.is_tensor(norm):
            norm = torch.tensor(float(norm), device=self.device)
        applied = unit.module.was_step_applied() if hasattr(unit.module, "was_step_applied") else True
        if applied:
            unit.scheduler.step()
            self._update_ema(unit)
        return {"grad_norm": norm, "skipped": not applied}

    def state_bytes(self, unit):
        """ZeRO's per-rank state: the (partitioned at stage 3) module parameters, the gradients
        in the training dtype (partitioned at stage 2/3, full at stage 1) and the optimizer's fp32
        master partition plus its moments, read from the ZeRO optimizer."""
        opt = unit.optimizer
        params = sum(t.numel() * t.element_size() for _, t in self._local_params(unit))
        inner = getattr(opt, "optimizer", opt)
        moments = sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.ndim > 0)
        masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", [])
        master = sum(t.numel() * t.element_size() for t in masters)
        full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in unit.raw.parameters() if p.requires_grad)
        grad_numel = full if self.cfg.zero_stage == 1 else sum(t.numel() for t in masters)
        return {"params": params, "grads": grad_numel * self.dtype.itemsize, "optim": moments + master}

    def lr(self, unit):
        return unit.scheduler.get_last_lr()[0]

    # -- checkpoints: DeepSpeed's own files for model + optimizer, the rest in the DCP state ---
    def unit_state_dict(self, unit):
        state = {"schedule": schedule_state(unit)}
        if unit.ema:
            # ZeRO-1/2: full EMA tensors, the same on every rank; ZeRO-3: this rank's partitions.
            state[ema_rank_key(self.env.rank) if self._partitioned() else "ema"] = unit.ema
        return state

    def load_unit_state_dict(self, unit, state):
        load_schedule_state(unit, state["schedule"])
        ema = state.get(ema_rank_key(self.env.rank) if self._partitioned() else "ema", {})
        for k, v in ema.items():
            if v is not unit.ema[k]:
                unit.ema[k].copy_(v)

    def save_native(self, path, units):
        for name, u in units.items():
            u.module.save_checkpoint(f"{path}/deepspeed", tag=name, save_latest=False)

    def load_native(self, path, units):
        for name, u in units.items():
            load_path, _ = u.module.load_checkpoint(f"{path}/deepspeed", tag=name, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
            if load_path is None:
                raise ValueError(f"DeepSpeed found no checkpoint for unit {name!r} under {path}/deepspeed")
            keep_kernel_choice(getattr(u.optimizer, "optimizer", u.optimizer))  # the torch AdamW inside ZeRO's wrapper

    def check_resumable(self, manifest, path):
        if manifest["engine"] != self.kind:
            raise ValueError(
                f"{path} was written by engine {manifest['engine']!r} but this run uses {self.kind!r}; convert it "
                "with `taming-dist convert` and start from it with `init_from:` instead of resuming"
            )
        if manifest["world_size"] != self.world_size:
            raise ValueError(
                f"{path} is a DeepSpeed checkpoint from {manifest['world_size']} ranks and this run has "
                f"{self.world_size}; DeepSpeed cannot reshard its own format. Convert it first: `python -m "
                f"deepspeed.checkpoint.ds_to_universal --input_folder {path}/deepspeed/<unit> --output_folder "
                f"{path}/deepspeed/<unit>_universal --inject_missing_state`, or resume on {manifest['world_size']} ranks"
            )
        if manifest.get("zero_stage") != self.cfg.zero_stage:
            raise ValueError(f"{path} was written at ZeRO stage {manifest.get('zero_stage')} and this run uses "
                             f"engine.zero_stage={self.cfg.zero_stage}; resume at the same stage")

    def _gather_flat(self, part: torch.Tensor, shape) -> torch.Tensor:
        """Rebuild a ZeRO-3 parameter from every rank's flat partition."""
        import torch.distributed as dist

        parts = [torch.empty_like(part) for _ in range(self.world_size)]
        dist.all_gather(parts, part.contiguous())
        return unflatten_zero3(parts, shape)

    def full_state_dict(self, unit, ema=False):
        import deepspeed

        params = list(unit.raw.parameters())
        ctx = deepspeed.zero.GatheredParameters(params) if self._partitioned() else contextlib.nullcontext()
        with ctx:
            sd = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
                  for k, v in unit.raw.state_dict().items()}
        if ema and unit.ema:
            for n, p in unit.raw.named_parameters():
                if n in unit.ema:
                    t = unit.ema[n]
                    sd[n] = (self._gather_flat(t, p.ds_shape) if self._partitioned() else t).float().cpu().clone()
        return sd


# -- facts of the kind, no instance needed (engines/__init__.py dispatches to them) --------------
def planned_bytes(shapes, groups, blocks, zero_stage, world, ecfg) -> tuple[dict, int]:
    """plan.py's memory model of one unit on the largest rank under ZeRO-`zero_stage`."""
    d, P = _BYTES[ecfg.precision], sum(s.numel() for s in shapes)
    blk = max(blocks, default=0)
    if zero_stage == 3:  # each parameter partitioned (padded) on its own
        master = sum(math.ceil(s.numel() / world) for s in shapes)
        local = master
        params = d * master
        persistent = sum(s.numel() for s in shapes if s.numel() <= DS_PERSISTENCE)
        gathered = d * (blk + min(DS_PREFETCH_BUCKET, P) + persistent)
    else:  # each AdamW group flattened, padded to 2 x world elements (nccl_start_alignment_factor)
        master = sum(2 * math.ceil(sum(s.numel() for s in g) / (2 * world)) for g in groups)
        local = P
        params = d * P
        gathered = 0
    grads = d * (P if zero_stage == 1 else master)
    out = {"params": params, "grads": grads, "optim": 12 * master, "buffers": d * DS_REDUCE_BUCKET + gathered}
    if ecfg.offload_optimizer == "cpu":  # ZeRO-Offload: master, moments and gradient partitions on the host
        out.update(optim=0, grads=0)
    if ecfg.offload_params == "cpu":
        out["params"] = 0
    return out, local


def consolidate(ckpt, manifest, ema, read_tensors):
    """The model from DeepSpeed's own fp32 consolidation of its files; the EMA from the DCP state,
    where ZeRO-3 keeps one partition per rank (reassembled by `unflatten_zero3`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    result = {}
    for name in manifest["units"]:
        sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag=name))
        if ema and manifest.get("zero_stage") == 3:
            keys = [f"{name}.{ema_rank_key(r)}." for r in range(manifest["world_size"])]
            parts = read_tensors(ckpt / "state", keys, f"convert {name} EMA")
            per_rank = [_strip(parts, k) for k in keys]
            sd.update({k: unflatten_zero3([p[k] for p in per_rank], sd[k].shape) for k in per_rank[0]})
        elif ema:
            sd.update(_strip(read_tensors(ckpt / "state", [f"{name}.ema."], f"convert {name} EMA"), f"{name}.ema."))
        result[name] = sd
    return result


def consolidate_v1(ckpt, meta, ema):
    """The same for format version 1 (DeepSpeed tags, ema_rank*.pt)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    result = {}
    for name in meta["schedulers"]:
        sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=name))
        files = sorted((ckpt / name).glob("ema_rank*.pt"))
        if ema and files:
            parts = [torch.load(f, weights_only=True) for f in files]
            for k in parts[0]:
                sd[k] = unflatten_zero3([p[k] for p in parts], sd[k].shape)
        result[name] = sd
    return result
