"""FLOPs per training step and model FLOPs utilisation (MFU, PaLM appendix B).

The VQGAN step is counted with torch.utils.flop_counter.FlopCounterMode over the same calls the
VQGAN task makes (tasks/vqgan.py), on fake tensors: meta storage reporting a CPU device, so
nothing is computed or allocated and vqgan-f16-16384 at 256 px costs a few seconds. Plain meta
tensors do not work: the quantizer opens `torch.autocast(device_type=...)`, which refuses "meta".
FlopCounterMode counts matmuls, convolutions and attention (2 FLOPs per multiply-add, backward
included; attention as model FLOPs, without a fused kernel's recompute) and nothing elementwise:
normalisation layers, activations and the optimizer count 0.
Count once per run (the numbers depend only on the config and the micro batch).
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch.utils.flop_counter import FlopCounterMode

from taming_dist.config import RunConfig

# Dense (no sparsity) peak FLOP/s. The datasheets' tensor-core figures are quoted "with sparsity"
# for Hopper (halved here); fp32 is the non-tensor-core rate (what fp32 matmuls get without TF32).
PEAK_FLOPS = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16/FP16 1,979, TF32 989 TFLOPS with
    # sparsity; FP32 67 TFLOPS.
    "H100 SXM": {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12},
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: the same compute as the H100 SXM.
    "H200 SXM": {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.5e12, "fp32": 67e12},
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column (dense figures as printed):
    # BF16/FP16 312, TF32 156, FP32 19.5 TFLOPS.
    "A100 SXM": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}
# torch.cuda.get_device_name() -> table row. H100 SXM reports "NVIDIA H100 80GB HBM3"; the PCIe and
# NVL boards ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL") are slower and not listed.
_NAMES = [(r"H100\b.*(HBM3|SXM)", "H100 SXM"), (r"H200(?!.*NVL)", "H200 SXM"), (r"A100.*SXM", "A100 SXM")]
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def peak_flops_for_name(name: str, dtype) -> float | None:
    """Dense peak FLOP/s of the device called `name` (as get_device_name reports it) for `dtype`
    (bf16/fp16/tf32/fp32 or a torch dtype); None for a device not in PEAK_FLOPS."""
    key = _DTYPE_KEYS.get(dtype, dtype)
    for pattern, row in _NAMES:
        if re.search(pattern, name):
            return PEAK_FLOPS[row].get(key)
    return None


def device_peak_flops(device, dtype) -> float | None:
    """Peak FLOP/s of a CUDA device; None on CPU or an unknown GPU (MFU is then left out).
    torch.float32 means the TF32 rate while TF32 matmuls are on (engine.tf32 sets that)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        dtype = "tf32"
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


def mfu(flops_per_step: float, step_seconds: float, world_size: int, peak: float) -> float:
    """Achieved / peak FLOP/s: `flops_per_step` is the whole step over all ranks (per-sample FLOPs
    x global batch), run on `world_size` devices of `peak` FLOP/s each."""
    if step_seconds <= 0 or world_size < 1 or peak <= 0:
        raise ValueError(f"mfu needs step_seconds > 0, world_size >= 1, peak > 0 (got {step_seconds}, "
                         f"{world_size}, {peak})")
    return flops_per_step / (step_seconds * world_size * peak)


def transformer_step_flops(cfg: RunConfig) -> int:
    """Training FLOPs per sample of the transformer stage: GPT.flops_per_token (6N + attention) at
    the length the GPT is fed, cond_len + image tokens - 1 (not block_size, which may be larger:
    512 for gpt-cin-1.4b, which trains on 256), times that many tokens."""
    from taming_dist.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.transformer)
    T = model.cond_len + model.num_image_tokens - 1
    return model.transformer.flops_per_token(T, cfg.transformer.condition.context_len) * T


def fake_mode():
    """A FakeTensorMode for counting: real tensors mix in (LPIPS reads its bundled linear layers),
    and a ShapeEnv gives data-dependent shapes (the codebook-usage bincount) a symbolic size."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())


def countable_vqgan_config(cfg: RunConfig) -> RunConfig:
    """The config with what fake tensors cannot run and costs no FLOPs swapped out: k-means init,
    dead-code restarts and ActNorm's init read values (`.item()`, `nonzero`); LPIPS gets a random
    backbone. (k-means runs once per run: its FLOPs are not part of a step.)"""
    q = dataclasses.replace(cfg.vqgan.quantizer, dead_code_threshold=0.0, kmeans_init=False)
    d = cfg.loss.discriminator
    d = dataclasses.replace(d, norm="batch") if d.norm == "actnorm" else d
    loss = dataclasses.replace(cfg.loss, lpips_backbone="random", discriminator=d)
    return dataclasses.replace(cfg, vqgan=dataclasses.replace(cfg.vqgan, quantizer=q), loss=loss)


class _Parts:
    """Stands in for FlopCounterMode's ModuleTracker, whose multi-grad hooks on module inputs break
    `autograd.grad` on a leaf, as generator_objective calls it ("A leaf node was passed to
    _will_engine_execute_node ..."): every FLOP goes to "Global" and to the part set last."""

    def __init__(self):
        self.parents = {"Global"}

    def set(self, part: str) -> None:
        self.parents = {"Global", part}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _attention(q, k, v, *args, out_shape=None, **kwargs) -> int:  # (shapes)
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


def _attention_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    # Model FLOPs (PaLM appendix B): the gradients of both products, 2x forward, without the score
    # recompute of a fused kernel; what the math kernel, which CPU picks for some strides, counts.
    return 2 * _attention(q, k, v)


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that attributes FLOPs to the parts named with `.mod_tracker.set(part)`,
    with formulas for CPU flash attention (its registry has none, so they would count 0)."""
    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward})
    counter.mod_tracker = _Parts()
    return counter


def _hook_parts(model, loss, parts: _Parts) -> None:
    """Name the part that runs, in forward (pre-hooks) and in the VQModel's backward (tensor hooks
    fire when the gradient reaching a part's input is complete: the part below runs next)."""

    def enter(part, backward_to=None):
        def hook(module, inputs):
            parts.set(part)
            if backward_to and inputs[0].requires_grad:
                inputs[0].register_hook(lambda g: parts.set(backward_to))
        return hook

    model.encoder.register_forward_pre_hook(enter("encoder"))
    model.quant_conv.register_forward_pre_hook(enter("quantizer", backward_to="encoder"))
    model.post_quant_conv.register_forward_pre_hook(enter("decoder", backward_to="quantizer"))
    if loss.perceptual_loss is not None:  # its forward, then its backward to the reconstruction
        loss.perceptual_loss.register_forward_pre_hook(enter("lpips"))


PARTS = ("encoder", "quantizer", "decoder", "lpips", "discriminator", "other")


def vqgan_step_flops(cfg: RunConfig, micro_batch: int, gan: bool = True) -> dict:
    """FLOPs of one VQGAN training micro-step of `micro_batch` images, as tasks/vqgan.py runs it:

    generator step: VQModel forward; the reconstruction loss (L1 + LPIPS forward and backward to the
      reconstruction) and, with `gan`, the frozen PatchGAN's forward and backward to it plus the
      adaptive weight's two conv2d_weight products ("other"); one backward through the VQModel.
    discriminator step (with `gan`): PatchGAN forward on the real and the fake batch, backward.

    `gan=False` counts a step before loss.disc_start (no GAN terms, no discriminator step).
    Returns the FLOPs per part (PARTS; forward and backward, both steps), of each step, the
    total and per_image = total / micro_batch.
    """
    from taming_dist.losses.vqgan import VQGANLoss
    from taming_dist.models.discriminator import NLayerDiscriminator
    from taming_dist.models.vqgan import VQModel

    cfg = countable_vqgan_config(cfg)
    gan = gan and cfg.loss.disc_factor > 0
    step = cfg.loss.disc_start if gan else cfg.loss.disc_start - 1
    g_count, d_count = flop_counter(), flop_counter()
    parts = g_count.mod_tracker
    with fake_mode():
        model, disc, loss = VQModel(cfg.vqgan), NLayerDiscriminator(cfg.loss.discriminator), VQGANLoss(cfg.loss)
        _hook_parts(model, loss, parts)
        res = cfg.vqgan.ddconfig.resolution
        x = torch.empty(micro_batch, cfg.vqgan.ddconfig.in_channels, res, res).uniform_(-1, 1)
        captured = {}
        model.decoder.conv_out.register_forward_hook(lambda m, i, o: captured.update(h=i[0]))

        def disc_fn(rec):  # the engine's `frozen`: no parameter gradients
            parts.set("discriminator")
            disc.requires_grad_(False)
            try:
                return disc(rec)
            finally:
                disc.requires_grad_(True)

        def last_layer_grad(grad_rec):  # VQGANTask._last_layer_grad
            parts.set("other")
            h = captured["h"].detach().float()
            shape = (grad_rec.shape[1], h.shape[1], 3, 3)
            return torch.nn.grad.conv2d_weight(h, shape, grad_rec, stride=1, padding=1)

        with g_count:
            xrec, qloss, _ = model(x)
            obj = loss.generator_objective(x, xrec, qloss, step, disc_fn=disc_fn, last_layer_grad=last_layer_grad)
            parts.set("decoder")
            obj.surrogate(xrec).backward()
        d_count.mod_tracker.set("discriminator")
        with d_count:
            if gan:
                d_loss, _ = loss.discriminator_loss(disc(x), disc(xrec.detach()), step)
                d_loss.backward()
    counts = [{k: sum(v.values()) for k, v in c.get_flop_counts().items()} for c in (g_count, d_count)]
    out = {part: sum(c.get(part, 0) for c in counts) for part in PARTS}
    total = g_count.get_total_flops() + d_count.get_total_flops()
    out.update(generator_step=g_count.get_total_flops(), discriminator_step=d_count.get_total_flops(),
               total=total, per_image=total / micro_batch, micro_batch=micro_batch)
    return out
