"""The VQGAN stage: two units (generator = encoder+quantizer+decoder, discriminator).

One generator forward per step (the original ran it once per optimizer), then the generator
step, then the discriminator step on the detached reconstruction (as LlamaGen does).

The adaptive GAN weight (Esser et al. 2021, eq. 7) needs the gradients of the reconstruction
loss and of the GAN loss w.r.t. the decoder's last layer. Under FSDP2 and ZeRO-3 that weight is
sharded, and DeepSpeed breaks when `autograd.grad` runs through its engine. So every engine takes
one path (measured exact, docs/platform-notes.md): `VQGANLoss.generator_objective` computes both
losses on a detached copy of the reconstruction; their gradients w.r.t. it are mapped onto
`conv_out.weight` with `torch.nn.grad.conv2d_weight` from conv_out's captured input, averaged across
ranks (which gives the global-batch value), and the generator's backward is a single `backward` of
`<xrec, dL/dxrec> + codebook term` on the real graph: no second forward of LPIPS or the PatchGAN.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from taming_dist.config import RunConfig
from taming_dist.engines.base import Engine, lr_lambda_for
from taming_dist.losses.vqgan import VQGANLoss, update_lecam_ema
from taming_dist.models.collectives import Collectives
from taming_dist.models.discriminator import NLayerDiscriminator
from taming_dist.models.quantize import fold_code_offset
from taming_dist.models.vqgan import VQModel
from taming_dist.profiling import phase
from taming_dist.tasks.base import StepSync, add_stats, nonfinite, reduce_step, to_device
from taming_dist.tasks.init import load_init_weights


class RealFakeDiscriminator(nn.Module):
    """The PatchGAN applied to real and fake images in ONE forward call, each batch separately
    (BatchNorm statistics per call, as in the original). One call keeps DDP's rule of one
    forward per backward. Keys are `discriminator.*`, the original's `loss.discriminator.*`.

    With LeCAM (loss.lecam_weight > 0) it also holds the buffer `lecam_ema` (3,), the EMA state of
    the mean logits (losses/vqgan.py `update_lecam_ema`): a buffer of the discriminator unit, so
    every engine's checkpoint saves and restores it with the unit's weights."""

    def __init__(self, discriminator: nn.Module, lecam: bool = False):
        super().__init__()
        self.discriminator = discriminator
        if lecam:
            self.register_buffer("lecam_ema", torch.zeros(3))

    def parallel_blocks(self) -> list[nn.Module]:
        return self.discriminator.parallel_blocks()

    def forward(self, real: torch.Tensor, fake: torch.Tensor | None = None):
        # One input: the generator step's logits (called on the sharded root, so FSDP2 gathers).
        if fake is None:
            return self.discriminator(real)
        return self.discriminator(real), self.discriminator(fake)


class VQGANTask:
    def __init__(self, cfg: RunConfig, engine: Engine, grad_accum: int):
        self.cfg, self.engine, self.grad_accum = cfg, engine, grad_accum
        t = cfg.train
        # What the quantizer (code counts, EMA statistics, k-means, restarts, LFQ's entropy) and
        # ActNorm's data-dependent init need from the data-parallel group, given to the models'
        # constructors: k-means and restarts draw rows of the global batch on rank 0 (broadcast)
        # and fetch them from the rank that holds them.
        collectives = Collectives(reduce=engine.reduce_fn(), broadcast=engine.broadcast_fn(),
                                  rank=engine.env.rank, world_size=engine.world_size)
        model = VQModel(cfg.vqgan, collectives=collectives)
        disc = RealFakeDiscriminator(NLayerDiscriminator(cfg.loss.discriminator, collectives=collectives),
                                     lecam=cfg.loss.lecam_weight > 0)
        if cfg.init_from:
            load_init_weights(cfg.init_from, {"generator": model, "discriminator": disc.discriminator}, engine.is_main)
        self.quantizer = model.quantize
        self.loss = VQGANLoss(cfg.loss).to(engine.device)
        self._conv_out_in: torch.Tensor | None = None
        model.decoder.conv_out.register_forward_hook(self._capture_conv_out_input)
        scale = t.global_batch_size if t.optim.scale_lr else 1
        common = dict(micro_batch_size=t.micro_batch_size, grad_accum=grad_accum)
        self.G = engine.setup(model, name="generator", optim=t.optim, lr=t.optim.lr * scale,
                              lr_lambda=lr_lambda_for(t.optim, t.steps),
                              ema_decay=t.ema_decay, **common)
        dscale = t.global_batch_size if t.disc_optim.scale_lr else 1
        self.D = engine.setup(disc, name="discriminator", optim=t.disc_optim, lr=t.disc_optim.lr * dscale,
                              lr_lambda=lr_lambda_for(t.disc_optim, t.steps), **common)
        self.units = {"generator": self.G, "discriminator": self.D}

    def _capture_conv_out_input(self, module, inputs, output) -> None:
        self._conv_out_in = inputs[0]

    def work_per_sample(self) -> tuple[str, int]:
        return "images", 1

    def flops_per_sample(self) -> float:
        """Training FLOPs per image of a step with the GAN terms on (taming_dist/perf.py)."""
        from taming_dist.perf import vqgan_step_flops

        return vqgan_step_flops(self.cfg, self.cfg.train.micro_batch_size)["per_image"]

    def _last_layer_grad(self, grad_rec: torch.Tensor) -> torch.Tensor:
        """dL/dxrec -> dL/d(decoder.conv_out.weight), from conv_out's captured input: the same
        value as autograd w.r.t. the weight, without touching the (possibly sharded) parameter."""
        h = self._conv_out_in.detach().float()
        shape = (grad_rec.shape[1], h.shape[1], 3, 3)
        return torch.nn.grad.conv2d_weight(h, shape, grad_rec, stride=1, padding=1)

    def train_step(self, micro_batches: list[dict], step: int, sync: StepSync | None = None) -> dict:
        eng = self.engine
        n = len(micro_batches)
        disc_factor = self.loss.disc_factor(step)
        stats: dict = {}
        recs = []
        # Non-finite losses seen on this rank, as device tensors: no collective or host read per
        # micro-batch. A non-finite micro-batch is still backpropagated; the step's one fused
        # all-reduce (reduce_step) then tells every rank to skip the whole step, as it would have.
        bad_g = torch.zeros((), device=eng.device)

        def disc_fn(rec):
            with eng.frozen(self.D) as d:
                return d(rec)

        for mb in eng.accumulate(self.G, micro_batches):
            x = to_device(mb, eng.device)["image"]
            if self.cfg.engine.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with phase("generator_forward"), eng.autocast():
                xrec, qloss, info = self.G.module(x)
            obj = self.loss.generator_objective(x, xrec, qloss, step, disc_fn=disc_fn,
                                                last_layer_grad=self._last_layer_grad,
                                                mean_fn=lambda t: eng.all_reduce(t, "mean"), autocast=eng.autocast)
            bad_g = bad_g + nonfinite(obj.loss, obj.grad_rec)
            with phase("generator_backward"):
                eng.backward(self.G, obj.surrogate(xrec))
            recs.append((x, xrec.detach()))
            add_stats(stats, {**obj.logs, **{k: info[k] for k in QUANTIZER_LOGS if k in info}}, n)
            if "restarted" in info:  # a count over the step's micro-batches
                add_stats(stats, {"codes_restarted": info["restarted"]}, 1)
        norms = {"generator": eng.prepare_step(self.G)}
        flags = {"generator": bad_g}
        lecam = getattr(self.D.raw, "lecam_ema", None)
        if disc_factor > 0.0:
            # The discriminator is not trained before disc_start (its loss is zero there anyway).
            # Its step is independent of the generator's (it sees the detached reconstructions), so
            # both backward passes come first and one all-reduce decides both steps.
            bad_d = torch.zeros((), device=eng.device)
            for x, xrec in eng.accumulate(self.D, recs):
                with phase("discriminator_forward"), eng.autocast():
                    real, fake = self.D.module(x, xrec)
                    d_loss, dlogs = self.loss.discriminator_loss(real, fake, step, lecam_ema=lecam)
                bad_d = bad_d + nonfinite(d_loss)
                with phase("discriminator_backward"):
                    eng.backward(self.D, d_loss)
                add_stats(stats, dlogs, n)
            norms["discriminator"] = eng.prepare_step(self.D)
            flags["discriminator"] = bad_d
        for name, norm in norms.items():
            if norm is not None:
                flags[name] = flags[name] + nonfinite(norm)
        counts = self.quantizer.take_step_counts()  # kept back by the quantizer: reduced here, once
        stats = reduce_step(eng, flags, stats, sync, sums={"code_counts": counts} if counts is not None else None)
        if counts is not None:
            stats.update(self.quantizer.finish_step(stats.pop("code_counts")))
        skip_g = flags["generator"] > 0
        with phase("generator_optimizer_step"):
            stats.update({f"g_{k}": v for k, v in eng.step(self.G, skip=skip_g, norm=norms["generator"]).items()})
        stats["lr"] = eng.lr(self.G)
        if disc_factor > 0.0:
            # As before the fused reduce: a skipped generator step skips the discriminator's too.
            skip_d = skip_g or flags["discriminator"] > 0
            with phase("discriminator_optimizer_step"):
                stats.update({f"d_{k}": v for k, v in
                              eng.step(self.D, skip=skip_d, norm=norms["discriminator"]).items()})
            if lecam is not None and not skip_d:
                # The step's mean logits over the global batch (their means over micro-batches,
                # averaged over ranks by the fused reduce): the same EMA on every rank. Updated
                # after the step, so every micro-batch of a step (and every engine and accumulation
                # split) is regularised towards the same EMA of the earlier steps.
                update_lecam_ema(lecam, stats["logits_real"], stats["logits_fake"], self.cfg.loss.lecam_ema_decay)
        stats["skipped"] = float(bool(stats.pop("g_skipped", False)) or bool(stats.pop("d_skipped", False)))
        return stats

    @torch.no_grad()
    def save_images(self, batch: dict, step: int, folder: Path) -> list[Path]:
        from taming_dist.data.images import save_grid

        x = to_device(batch, self.engine.device)["image"][:8]
        model = self.G.raw
        was_training = model.training
        model.eval()
        with self.engine.autocast():
            xrec, _, _ = model(x)
        model.train(was_training)
        if not self.engine.is_main:
            return []
        path = folder / f"recon_{step:06d}.png"
        save_grid(torch.cat([x, xrec.float().clamp(-1, 1)]), path, nrow=x.shape[0])
        return [path]

    def export(self, folder: Path, ema: bool = True) -> None:
        from taming_dist.weights.folder import save_model_folder

        sd = self.engine.full_state_dict(self.G, ema=ema and bool(self.G.ema))
        if self.engine.is_main:
            save_model_folder(folder, "vqgan", self.cfg.vqgan, fold_code_offset(sd))


# what the step logs from the quantizer's info (LFQ adds its two entropy terms)
QUANTIZER_LOGS = ("perplexity", "usage", "window_usage", "per_sample_entropy", "codebook_entropy")


