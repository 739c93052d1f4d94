"""The VQGAN objective (taming's VQLPIPSWithDiscriminator), split into the pieces a task needs.

The PatchGAN is not inside this module: it is its own optimized unit, so engines can wrap it.
The adaptive weight takes the two gradients rather than the decoder's last layer, because how they
are obtained depends on the engine (sharded weights, all-reduced across ranks; see tasks/vqgan.py).
Every reduction runs in fp32, also under autocast.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from taming_dist.config import VQLossConfig
from taming_dist.losses.lpips import build_lpips


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
        perceptual_weight * LPIPS(x, xrec)), as a scalar fp32 tensor, and logs."""
        x32, r32 = x.float(), xrec.float()
        l1 = (x32 - r32).abs()
        rec = self.cfg.pixel_weight * l1
        logs = {"l1": l1.mean().detach()}
        if self.perceptual_loss is not None:
            p = self.perceptual_loss(x32.contiguous(), r32.contiguous()).float()  # (B, 1, 1, 1)
            rec = rec + self.cfg.perceptual_weight * p
            logs["lpips"] = p.mean().detach()
        nll = rec.mean()
        logs["nll"] = nll.detach()
        return nll, logs

    def generator_adv_loss(self, logits_fake: torch.Tensor) -> torch.Tensor:
        logits_fake = logits_fake.float()
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
        w = torch.norm(nll_grad.float()) / (torch.norm(g_grad.float()) + 1e-4)
        return torch.clamp(w, 0.0, 1e4).detach() * disc_weight

    def generator_loss(self, nll: torch.Tensor, qloss: torch.Tensor, g_loss: torch.Tensor, d_weight, step: int
                       ) -> tuple[torch.Tensor, dict]:
        """nll + d_weight * disc_factor(step) * g_loss + codebook_weight * mean(qloss)."""
        df = self.disc_factor(step)
        q = qloss.float().mean()
        loss = nll.float() + d_weight * df * g_loss + self.cfg.codebook_weight * q
        logs = {"loss": loss.detach(), "nll": nll.detach().float(), "quant_loss": q.detach(),
                "g_loss": torch.as_tensor(g_loss).detach().float(), "d_weight": torch.as_tensor(d_weight).detach(),
                "disc_factor": torch.tensor(df)}
        return loss, logs

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, step: int
                           ) -> tuple[torch.Tensor, dict]:
        """disc_factor(step) * the hinge or logistic ("vanilla"; also used for non_saturating) loss."""
        real, fake = logits_real.float(), logits_fake.float()
        if self.cfg.disc_loss == "hinge":
            d = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        else:
            d = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
        loss = self.disc_factor(step) * d
        return loss, {"d_loss": loss.detach(), "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}
