"""The VQGAN objective (taming's VQLPIPSWithDiscriminator), split into the pieces a task needs.

The PatchGAN is not inside this module: it is its own optimized unit, so engines can wrap it.
The adaptive weight takes the two gradients rather than the decoder's last layer, because how they
are obtained depends on the engine (sharded weights, all-reduced across ranks; see tasks/vqgan.py).
Every reduction runs in fp32, also under autocast.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from taming_dist.config import VQLossConfig
from taming_dist.losses.lpips import build_lpips
from taming_dist.profiling import phase


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32, or float64 when given (the gradient checks run the losses in double)."""
    return t if t.dtype == torch.float64 else t.float()


def lecam_penalty(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
    """LeCAM regularisation (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under
    Limited Data", eq. 3, as google/lecam-gan's `lecamreg`):
        R = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(G(z)))^2)
    with the zero-debiased EMAs of the mean logits held in `ema` (3,) = [decay-weighted sum of real
    means, of fake means, total weight 1 - decay^t] (`update_lecam_ema`). 0 before the first update."""
    real, fake = _wide(logits_real), _wide(logits_fake)
    seen = ema[2] > 0
    w = torch.where(seen, ema[2], torch.ones_like(ema[2]))
    ema_real, ema_fake = ema[0] / w, ema[1] / w
    reg = F.relu(real - ema_fake).pow(2).mean() + F.relu(ema_real - fake).pow(2).mean()
    return torch.where(seen, reg, torch.zeros_like(reg))


@torch.no_grad()
def update_lecam_ema(ema: torch.Tensor, mean_real: torch.Tensor, mean_fake: torch.Tensor, decay: float) -> None:
    """One EMA step of the mean logits (the global batch's, so every rank keeps the same state) into
    `ema` in place; the weight term makes the average zero-debiased (google/lecam-gan's
    `zero_debias=True`): after one step it is that step's mean."""
    new = torch.stack([mean_real.to(ema.dtype), mean_fake.to(ema.dtype), torch.ones_like(ema[2])])
    ema.mul_(decay).add_(new, alpha=1.0 - decay)


@dataclass
class GeneratorObjective:
    grad_rec: torch.Tensor  # dL/dxrec of the terms on the reconstruction (fp32, no graph)
    codebook: torch.Tensor  # codebook_weight * mean(qloss), with its graph into the encoder
    loss: torch.Tensor  # the generator loss's value (detached)
    logs: dict

    def surrogate(self, xrec: torch.Tensor) -> torch.Tensor:
        """A scalar whose gradient w.r.t. every generator parameter is the generator loss's:
        <xrec, dL/dxrec> + the codebook term."""
        return (_wide(xrec) * self.grad_rec).sum() + self.codebook


class VQGANLoss(nn.Module):
    def __init__(self, cfg: VQLossConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.perceptual_loss = build_lpips(cfg) if cfg.perceptual_weight > 0 else None

    def train(self, mode: bool = True) -> "VQGANLoss":
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()  # frozen: dropout off whatever the caller's mode
        return self

    def reconstruction_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x, xrec (B, C, H, W) in [-1, 1] -> nll = mean(pixel_weight * |x - xrec| +
        perceptual_weight * LPIPS(x, xrec)), as a scalar fp32 tensor, and logs. With
        pixel_loss=l2 the pixel term is (x - xrec)^2. Both errors are logged (l1, mse)."""
        x32, r32 = _wide(x), _wide(xrec)
        diff = x32 - r32
        l1 = diff.abs()
        sq = diff.square()
        rec = self.cfg.pixel_weight * (l1 if self.cfg.pixel_loss == "l1" else sq)
        logs = {"l1": l1.mean().detach(), "mse": sq.mean().detach()}
        if self.perceptual_loss is not None:
            p = _wide(self.perceptual_loss(x32.contiguous(), r32.contiguous()))  # (B, 1, 1, 1)
            rec = rec + self.cfg.perceptual_weight * p
            logs["lpips"] = p.mean().detach()
        nll = rec.mean()
        logs["nll"] = nll.detach()
        return nll, logs

    def generator_adv_loss(self, logits_fake: torch.Tensor) -> torch.Tensor:
        logits_fake = _wide(logits_fake)
        if self.cfg.disc_loss == "non_saturating":
            return F.softplus(-logits_fake).mean()
        return -logits_fake.mean()  # the original's generator term, for hinge and vanilla alike

    def disc_factor(self, step: int) -> float:
        """The original's `adopt_weight`: no GAN terms before disc_start."""
        return self.cfg.disc_factor if step >= self.cfg.disc_start else 0.0

    @staticmethod
    def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, disc_weight: float) -> torch.Tensor:
        """||dnll/dlast|| / (||dg/dlast|| + 1e-4), clamped to [0, 1e4], detached, times disc_weight
        (Esser et al. 2021, eq. 7; taming's `calculate_adaptive_weight`)."""
        w = torch.norm(_wide(nll_grad)) / (torch.norm(_wide(g_grad)) + 1e-4)
        return torch.clamp(w, 0.0, 1e4).detach() * disc_weight

    def generator_objective(self, x: torch.Tensor, xrec: torch.Tensor, qloss: torch.Tensor, step: int, *,
                            disc_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            last_layer_grad: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            mean_fn: Callable[[torch.Tensor], torch.Tensor] = _identity,
                            autocast: Callable[[], ContextManager] = nullcontext) -> "GeneratorObjective":
        """The generator loss  nll + d_weight * disc_factor * g_loss + codebook_weight * mean(qloss),
        as the one source of both its logged value and its gradient.

        The terms that depend on the reconstruction are evaluated on a detached copy `rec`, and
        their gradients w.r.t. it are summed into `grad_rec` with the same weights that sum the
        value, so a term added to `terms` changes the logs and the training signal alike. Training
        then needs ONE backward of `surrogate(xrec)` through the generator (no second pass of LPIPS
        or the PatchGAN through the engine's graph, which DeepSpeed cannot take).

        disc_fn:         rec -> PatchGAN logits, the discriminator frozen (needed from disc_start on)
        last_layer_grad: dL/drec -> dL/d(decoder's last weight), for the adaptive weight
        mean_fn:         average across data-parallel ranks (so d_weight is the global-batch value)
        """
        rec = _wide(xrec.detach()).requires_grad_()
        with phase("reconstruction_loss"):  # L1 + LPIPS, value and gradient
            with autocast():
                nll, logs = self.reconstruction_loss(x, rec)
            grad_nll, = torch.autograd.grad(nll, rec)
        df = self.disc_factor(step)
        zero = torch.zeros((), device=x.device)
        g_loss, grad_g, d_weight = zero, torch.zeros_like(rec), zero
        if df > 0.0:
            if disc_fn is None:
                raise ValueError(f"step {step} is past loss.disc_start: the generator objective needs disc_fn")
            with phase("gan_loss"):  # the frozen PatchGAN on the reconstruction, value and gradient
                with autocast():
                    g_loss = self.generator_adv_loss(disc_fn(rec))
                grad_g, = torch.autograd.grad(g_loss, rec)
            if self.cfg.adaptive_weight:
                if last_layer_grad is None:
                    raise ValueError("loss.adaptive_weight needs last_layer_grad (dL/drec -> dL/dlast_layer)")
                with phase("adaptive_weight"):
                    d_weight = self.adaptive_weight(mean_fn(last_layer_grad(grad_nll)),
                                                    mean_fn(last_layer_grad(grad_g)), self.cfg.disc_weight)
            else:
                d_weight = torch.tensor(self.cfg.disc_weight, dtype=rec.dtype, device=x.device)
        # (weight, value, d value / d rec) of every term on the reconstruction
        terms = [(1.0, nll, grad_nll), (d_weight * df, g_loss, grad_g)]
        q = _wide(qloss).mean()
        codebook = self.cfg.codebook_weight * q
        value = sum(w * _wide(v.detach()) for w, v, _ in terms) + codebook.detach()
        grad_rec = sum(w * g for w, _, g in terms)
        logs.update({"loss": value, "nll": nll.detach(), "quant_loss": q.detach(), "g_loss": _wide(g_loss.detach()),
                     "d_weight": d_weight.detach(), "disc_factor": torch.tensor(df, device=x.device)})
        return GeneratorObjective(grad_rec=grad_rec, codebook=codebook, loss=value, logs=logs)

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, step: int,
                           lecam_ema: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """disc_factor(step) * (the hinge or logistic ("vanilla"; also used for non_saturating) loss
        + lecam_weight * the LeCAM penalty against `lecam_ema`, when loss.lecam_weight > 0)."""
        real, fake = _wide(logits_real), _wide(logits_fake)
        if self.cfg.disc_loss == "hinge":
            d = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        else:
            d = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
        logs = {"logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}
        if self.cfg.lecam_weight > 0:
            if lecam_ema is None:
                raise ValueError("loss.lecam_weight > 0: the discriminator loss needs lecam_ema (update_lecam_ema)")
            reg = lecam_penalty(real, fake, lecam_ema)
            d = d + self.cfg.lecam_weight * reg
            logs["lecam"] = reg.detach()
        loss = self.disc_factor(step) * d
        return loss, {"d_loss": loss.detach(), **logs}
