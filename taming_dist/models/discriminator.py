"""The PatchGAN discriminator (pix2pix, Isola et al. 2017) as in taming's
`modules/discriminator/model.py`, with the original `main.<i>` Sequential layout and init."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from taming_dist.config.schema import DiscriminatorConfig
from taming_dist.models.collectives import ONE_PROCESS, Collectives


def weights_init(m: nn.Module) -> None:
    """The original's DCGAN init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), bias 0."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class ActNorm(nn.Module):
    """Per-channel affine `scale * (x + loc)` with the data-dependent init of Kingma & Dhariwal 2018
    (taming's ActNorm, same keys): on the first training batch loc = -mean, scale = 1/(std + 1e-6).

    The statistics are summed over data-parallel ranks through `collectives` (models/collectives.py,
    given at construction; one process by default) so that every rank initialises to the
    global-batch values and the replicas stay identical.
    """

    def __init__(self, num_features: int, collectives: Collectives = ONE_PROCESS):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.collectives = collectives

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*h*w)
        # Two passes (mean, then squared deviations) rather than E[x^2]-E[x]^2, which cancels badly.
        s = self.collectives.sum(torch.cat([flat.sum(1), flat.new_tensor([flat.shape[1]])]))
        count = s[-1]
        mean = s[:-1] / count
        sq = self.collectives.sum((flat - mean.unsqueeze(1)).pow(2).sum(1))
        std = (sq / (count - 1)).sqrt()  # unbiased, as torch.std in the original
        self.loc.copy_(-mean.view_as(self.loc))
        self.scale.copy_((1.0 / (std + 1e-6)).view_as(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """x (B, input_nc, H, W) -> patch logits (B, 1, H', W') (30x30 for 256 px with 3 layers).

    Layout of `main`: conv 4x4/2 + LeakyReLU(0.2); n_layers-1 blocks of conv 4x4/2, norm, LeakyReLU
    with ndf * min(2**n, 8) channels; one stride-1 block; a 4x4 conv to one channel. Convs before a
    BatchNorm have no bias (it would be cancelled). `norm: none` keeps an Identity in the norm slot
    so the `main.<i>` indices stay those of the original. `collectives` (one process by default)
    goes to every ActNorm (its data-dependent init).
    """

    def __init__(self, cfg: DiscriminatorConfig, collectives: Collectives = ONE_PROCESS):
        super().__init__()
        cfg.validate()
        actnorm = functools.partial(ActNorm, collectives=collectives)
        norm_layer = {"batch": nn.BatchNorm2d, "actnorm": actnorm, "none": lambda c: nn.Identity()}[cfg.norm]
        use_bias = cfg.norm != "batch"
        kw, padw, ndf = 4, 1, cfg.ndf
        seq: list[nn.Module] = [nn.Conv2d(cfg.input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, cfg.n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            seq += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kw, stride=2, padding=padw, bias=use_bias),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**cfg.n_layers, 8)
        seq += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kw, stride=1, padding=padw, bias=use_bias),
            norm_layer(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * nf_mult, 1, kw, stride=1, padding=padw),
        ]
        self.main = nn.Sequential(*seq)
        self.apply(weights_init)

    def parallel_blocks(self) -> list[nn.Module]:
        """None: a PatchGAN is a few convolutions, sharded and compiled as one module."""
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
