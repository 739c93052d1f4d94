"""Per-device memory plan of a training run, from its config alone (no device, nothing allocated).

Per engine and unit: parameters, gradients and optimizer state as each engine keeps them on its
largest rank (what `Engine.state_bytes` measures), the EMA, frozen modules, engine buffers, and the
activations saved for backward with and without activation checkpointing (AC). Activations are
measured on fake tensors (meta storage, see perf.py) with `saved_tensors_hooks` at micro batch 1
and 2, fitted as constant + per-sample bytes. Not counted: the CUDA context, allocator
fragmentation, temporaries that live inside one op, and activation gradients during backward.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from taming_dist.config import EngineConfig, RunConfig, batch_layout
from taming_dist.engines import PLANNED_LAYOUTS, layout_name, planned_bytes, planned_weights
from taming_dist.engines.base import param_groups

GiB = 2**30
ENGINES = PLANNED_LAYOUTS


@dataclass
class UnitSpec:
    """What the estimate needs of one optimized unit: its trainable parameters' shapes, its AdamW
    groups (ZeRO-1/2 flatten each) and its parallel blocks (FSDP2 gathers one at a time)."""

    name: str
    shapes: list[torch.Size]
    groups: list[list[torch.Size]]
    blocks: list[int]
    ema: bool = False
    # weights ("fp32": DDP's, cast by autocast; "cast": FSDP2's and DeepSpeed's, in the compute dtype)
    # -> micro batch -> {"no_ac"|"ac": bytes}, as measured
    measured: dict = field(default_factory=dict)

    def activations(self, weights: str) -> dict[str, tuple[int, int]]:
        """{"no_ac"|"ac": (constant, per-sample bytes)}, fitted to micro batches 1 and 2."""
        m1, m2 = self.measured[weights][1], self.measured[weights][2]
        return {k: (max(0, 2 * m1[k] - m2[k]), m2[k] - m1[k]) for k in ("no_ac", "ac")}

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)


def _spec(name: str, module: torch.nn.Module, weight_decay: float, ema: bool) -> UnitSpec:
    shapes = [p.shape for p in module.parameters() if p.requires_grad]
    groups = [[p.shape for p in g["params"]] for g in param_groups(module, weight_decay)]
    blocks = [sum(p.numel() for p in b.parameters()) for b in getattr(module, "parallel_blocks", list)()]
    return UnitSpec(name, shapes, groups, blocks, ema)


def state_bytes(unit: UnitSpec, engine: str, zero_stage: int, world: int, ecfg: EngineConfig) -> dict[str, int]:
    """Bytes on the largest rank: params, grads, optim (AdamW's two fp32 moments, and DeepSpeed's fp32
    master partition), ema (fp32, of the local parameters) and buffers (engine-owned, transient), as
    the engine models them (engines.planned_bytes). Of `ecfg` (engine.*): precision, fsdp_shard_size
    (HSDP shards over that many ranks) and, for DeepSpeed, offload_optimizer / offload_params (that
    state lives in host memory)."""
    out, local = planned_bytes(engine, unit.shapes, unit.groups, unit.blocks, zero_stage, world, ecfg)
    out["ema"] = 4 * local if unit.ema else 0
    return out


# -- activations ------------------------------------------------------------------------------
class _NormsInFp32(TorchFunctionMode):
    """CUDA autocast runs layer_norm and group_norm in fp32 (its fp32 op list) and their saved
    inputs are fp32; CPU autocast, which the fake tensors run under, keeps them in bf16."""

    NORMS = (F.group_norm, F.layer_norm, torch.group_norm, torch.layer_norm)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.NORMS and torch.is_autocast_enabled("cpu"):
            up = lambda a: a.float() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
            with torch.autocast("cpu", enabled=False):
                return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


class SavedBytes:
    """A context recording each storage saved for backward once (parameters excluded: they are
    state), owned by the parallel block running then (or None), and each block's input."""

    def __init__(self, module: torch.nn.Module | None = None):
        self.saved: dict[int, tuple[int, int | None]] = {}  # storage id -> (bytes, block index or None)
        self.inputs: dict[int, int] = {}  # storage id -> bytes, of the blocks' inputs
        self.keep: list[torch.Tensor] = []  # ids stay unique while the tensors live
        self.params = {p.untyped_storage()._cdata for p in module.parameters()} if module is not None else set()
        self.blocks = module.parallel_blocks() if hasattr(module, "parallel_blocks") else []
        self.block: int | None = None

    def __enter__(self):
        self._handles = [h for i, b in enumerate(self.blocks) for h in (
            b.register_forward_pre_hook(lambda m, args, i=i: self._enter(i, args[0])),
            b.register_forward_hook(lambda m, args, out: setattr(self, "block", None)))]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def _enter(self, i: int, x: torch.Tensor) -> None:
        self.block = i
        self.keep.append(x)
        self.inputs[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.params and key not in self.saved:
            self.keep.append(t)
            self.saved[key] = (t.untyped_storage().nbytes(), self.block)
        return t

    def totals(self) -> dict[str, int]:
        """no_ac: everything saved. ac: what no block owns, the blocks' inputs, and the largest
        block's own activations (one block is recomputed at a time in backward)."""
        kept = {k: n for k, (n, owner) in self.saved.items() if owner is None}
        kept.update(self.inputs)
        per_block: dict[int, int] = defaultdict(int)
        for k, (n, owner) in self.saved.items():
            if owner is not None and k not in kept:
                per_block[owner] += n
        return {"no_ac": sum(n for n, _ in self.saved.values()),
                "ac": sum(kept.values()) + max(per_block.values(), default=0)}


def _measure(fn, module=None) -> tuple[dict[str, int], object]:
    with SavedBytes(module) as rec:
        out = fn()
    return rec.totals(), out


def _vqgan_activations(cfg: RunConfig, B: int, models) -> dict[str, dict[str, int]]:
    """Generator: the VQModel's forward plus the larger of the loss's transient graphs (LPIPS, the
    frozen PatchGAN), which generator_objective frees before the VQModel's backward. Discriminator:
    the PatchGAN on the real and the fake batch."""
    model, disc, loss = models
    res = cfg.vqgan.ddconfig.resolution
    x = torch.empty(B, cfg.vqgan.ddconfig.in_channels, res, res).uniform_(-1, 1)
    gen, (xrec, _, _) = _measure(lambda: model(x), model)
    rec = xrec.detach().float().requires_grad_()
    side = []
    if loss.perceptual_loss is not None:
        side.append(_measure(lambda: loss.perceptual_loss(x, rec), loss.perceptual_loss)[0])
    disc.requires_grad_(False)
    side.append(_measure(lambda: disc(rec), disc)[0])
    disc.requires_grad_(True)
    gen = {k: v + max(s[k] for s in side) for k, v in gen.items()}
    return {"generator": gen, "discriminator": _measure(lambda: (disc(x), disc(xrec.detach())), disc)[0]}


def _gpt_activations(cfg: RunConfig, B: int, models) -> dict[str, dict[str, int]]:
    from taming_dist.losses.lm import image_token_loss

    transformer = models[0]
    gpt, c_len, n = transformer.transformer, transformer.cond_len, transformer.num_image_tokens
    idx = torch.randint(0, cfg.transformer.gpt.vocab_size, (B, c_len + n - 1))
    targets = torch.randint(0, cfg.transformer.first_stage.quantizer.n_embed, (B, n))
    inputs = transformer.condition.example_inputs(B)  # the context (and its lengths) of context/text models
    return {"transformer": _measure(lambda: image_token_loss(gpt(idx, **inputs), targets, c_len), gpt)[0]}


def build_units(cfg: RunConfig, batches=(1, 2)) -> tuple[list[UnitSpec], int]:
    """The config's units with their activations measured at `batches`, and the frozen parameters'
    count (LPIPS; the transformer's first and conditioning stages), built and run on fake tensors."""
    from taming_dist.perf import countable_vqgan_config, fake_mode

    dtype = torch.float32 if cfg.engine.precision == "fp32" else torch.bfloat16  # fp16 saves the same bytes
    t = cfg.train
    with fake_mode():
        if cfg.stage == "vqgan":
            from taming_dist.losses.vqgan import VQGANLoss
            from taming_dist.models.discriminator import NLayerDiscriminator
            from taming_dist.models.vqgan import VQModel

            cfg = countable_vqgan_config(cfg)
            model, disc = VQModel(cfg.vqgan), NLayerDiscriminator(cfg.loss.discriminator)
            loss = VQGANLoss(cfg.loss)
            models, trained = (model, disc, loss), [model, disc]
            units = [_spec("generator", model, t.optim.weight_decay, t.ema_decay > 0),
                     _spec("discriminator", disc, t.disc_optim.weight_decay, False)]
            frozen = sum(p.numel() for p in loss.parameters())
            measure = _vqgan_activations
        else:
            from taming_dist.models.transformer import Transformer

            model = Transformer(cfg.transformer)
            models, trained = (model,), [model.transformer]
            units = [_spec("transformer", model.transformer, t.optim.weight_decay, t.ema_decay > 0)]
            frozen = sum(p.numel() for p in model.parameters()) - units[0].numel
            measure = _gpt_activations
        for m in trained:
            m.train()
        measured = {}
        for weights in ("fp32", "cast"):
            if weights == "cast" and dtype != torch.float32:
                for m in trained:
                    for p in m.parameters():  # not `.to`: fake parameters cannot be swapped in place
                        p.data = p.data.to(dtype)
            if weights == "cast" and dtype == torch.float32:
                measured["cast"] = measured["fp32"]
                break
            with _NormsInFp32(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                measured[weights] = {b: measure(cfg, b, models) for b in batches}
    for u in units:
        u.measured = {w: {b: m[u.name] for b, m in per_b.items()} for w, per_b in measured.items()}
    return units, frozen


def plan(cfg: RunConfig, world: int, engines=ENGINES, micro_batch: int | None = None,
         gpu_mem_gib: float = 80.0) -> dict:
    """The memory plan as a JSON-ready dict: per engine, per unit bytes and the largest micro batch
    that fits in `gpu_mem_gib` without and with AC. Units run one after the other, so the
    engine's activations are the largest unit's."""
    if world < 1:
        raise ValueError(f"--world must be >= 1, got {world}")
    B = micro_batch or batch_layout(cfg.train, world)[0]  # the micro batch a run at `world` ranks uses
    units, frozen = build_units(cfg)
    use_ac = cfg.engine.activation_checkpointing
    rows = []
    for kind, stage in engines:
        per_unit, acts = {}, {u.name: u.activations(planned_weights(kind)) for u in units}
        for u in units:
            b = state_bytes(u, kind, stage, world, cfg.engine)
            b.update({k: c + B * s for k, (c, s) in acts[u.name].items()})
            per_unit[u.name] = b
        fixed = sum(v for b in per_unit.values() for k, v in b.items() if k not in ("no_ac", "ac")) + 4 * frozen
        act = {k: max(b[k] for b in per_unit.values()) for k in ("no_ac", "ac")}
        fits = {}
        for k in ("no_ac", "ac"):
            room = gpu_mem_gib * GiB - fixed
            fits[k] = max(0, min(math.floor((room - c) / max(s, 1)) for c, s in (a[k] for a in acts.values())))
        rows.append({"engine": layout_name(kind, stage), "units": per_unit,
                     "frozen": 4 * frozen, "total": fixed + act["ac" if use_ac else "no_ac"],
                     "max_micro_batch": fits})
    return {"config": cfg.name, "stage": cfg.stage, "world_size": world, "precision": cfg.engine.precision,
            "micro_batch": B, "activation_checkpointing": use_ac, "gpu_mem_gib": gpu_mem_gib,
            "parameters": {u.name: u.numel for u in units}, "frozen_parameters": frozen, "engines": rows}


def format_table(report: dict) -> str:
    cols = ["params", "grads", "optim", "ema", "buffers", "no_ac", "ac"]
    # MiB for models whose parameters fit in 1 GiB: DeepSpeed's fixed buckets would set GiB alone.
    big = max(b["params"] for r in report["engines"] for b in r["units"].values()) >= GiB
    unit, scale = ("GiB", GiB) if big else ("MiB", 2**20)
    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in report["parameters"].items())
    lines = [f"{report['config']} ({report['stage']}): world {report['world_size']}, {report['precision']}, micro "
             f"batch {report['micro_batch']}, AC {'on' if report['activation_checkpointing'] else 'off'}; "
             f"trainable {params}; frozen {report['frozen_parameters'] / 1e6:.1f}M (fp32, on every rank)",
             f"per device, {unit} (act = saved activations at micro batch {report['micro_batch']}; total uses the "
             f"config's AC; max micro = largest micro batch within {report['gpu_mem_gib']:g} GiB)",
             f"{'engine':<17}{'unit':<15}" + "".join(f"{c if c not in ('no_ac', 'ac') else 'act ' + c:>10}"
                                                     for c in cols) + f"{'frozen':>9}{'total':>9}  max micro"]
    for r in report["engines"]:
        for i, (name, b) in enumerate(r["units"].items()):
            lines.append(f"{r['engine'] if i == 0 else '':<17}{name:<15}"
                         + "".join(f"{b[c] / scale:>10.2f}" for c in cols))
        fits = r["max_micro_batch"]
        lines.append(f"{'':<17}{'(total)':<15}{'':>70}{r['frozen'] / scale:>9.2f}{r['total'] / scale:>9.2f}  "
                     f"{fits['no_ac']} (AC: {fits['ac']})")
    return "\n".join(lines)
