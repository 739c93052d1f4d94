"""Implicit codebooks, which the original has not: finite scalar quantization (kind fsq, Mentzer et
al. 2023) and lookup-free quantization (kind lfq, MAGVIT-v2, Yu et al. 2023). The codes are a fixed
grid computed from the indices: nothing to initialise, restart or fold, so they sit on the small
base `Quantizer` (models/quantizer_base.py) and carry no codebook state at all."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from taming_dist.config.schema import QuantizerConfig
from taming_dist.models.collectives import ONE_PROCESS, Collectives
from taming_dist.models.quantizer_base import Quantizer, fp32


class FiniteScalarQuantizer(Quantizer):
    """kind fsq: finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
    Made Simple"). Channel i of z is bounded by a shifted tanh so that rounding gives exactly
    `levels[i]` integers, rounded with a straight-through gradient and rescaled to [-1, 1]. The
    codebook is implicit: the prod(levels) points of that grid, so there is nothing to learn, no
    codebook loss (the loss is 0) and no code to collapse. embed_dim is len(levels): quant_conv and
    post_quant_conv are the projections in and out. Index = sum_i digit_i * basis_i with digit_i in
    [0, levels[i]) and basis = cumprod([1] + levels[:-1]) (channel 0 least significant), as the
    paper's reference code (its appendix A.1)."""

    def __init__(self, levels: list[int], usage_window: int = 65536, collectives: Collectives = ONE_PROCESS):
        super().__init__(math.prod(levels), len(levels), usage_window, collectives)
        basis = [1]
        for level in levels[:-1]:
            basis.append(basis[-1] * level)
        # integer buffers: an engine that casts the module to bf16 (DeepSpeed) leaves them exact
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    @classmethod
    def from_config(cls, cfg: QuantizerConfig, z_channels: int, collectives: Collectives) -> "FiniteScalarQuantizer":
        return cls(list(cfg.levels), cfg.usage_window, collectives)

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).float()

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) fp32 -> values whose rounding takes levels[i] integers in channel i:
        -(L-1)/2 .. (L-1)/2 for odd L, -L/2 .. L/2 - 1 for even L (the half offset). The shift by
        tan(offset / half_l) is the paper's (bound(0) ~ 0); eps keeps the ends from rounding up."""
        levels = self.levels.float()
        half_l = (levels - 1) * (1 - 1e-3) / 2
        offset = torch.where(self.levels % 2 == 1, 0.0, 0.5)
        shift = torch.tan(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) fp32 -> codes in [-1, 1] (..., D), straight-through rounding."""
        b = self.bound(z)
        return (b + (torch.round(b) - b).detach()) / self._half_width()

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., D) on the grid -> indices (...) long."""
        hw = self._half_width()
        digits = torch.round(codes.float() * hw + hw).long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) long -> codes (..., D) fp32 in [-1, 1]."""
        digits = (indices.long().unsqueeze(-1) // self.basis) % self.levels
        hw = self._half_width()
        return (digits.float() - hw) / hw

    def forward(self, z: torch.Tensor):
        B, C, H, W = z.shape
        with fp32(z.device):
            zf = rearrange(z.float(), "b c h w -> (b h w) c")
            zq = self.quantize(zf)
            idx = self.codes_to_indices(zq.detach())
            counts = self._counts(idx)
            loss = zf.new_zeros(())
        z_q = rearrange(zq, "(b h w) c -> b c h w", b=B, h=H, w=W).to(z.dtype)
        return z_q, loss, self._info(idx.view(B, H, W), counts)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        return rearrange(self.indices_to_codes(indices), "b h w c -> b c h w")

    def codebook(self) -> torch.Tensor:
        return self.indices_to_codes(torch.arange(self.n_e, device=self.levels.device))


def entropy_groups(bits: int, group_bits: int) -> list[int]:
    """Split `bits` into the fewest groups of at most `group_bits`, sizes differing by at most one
    (18 bits at most 10 per group -> [9, 9])."""
    n = -(-bits // group_bits)
    return [bits // n + (1 if i < bits % n else 0) for i in range(n)]


def _signs(bits: int, device) -> torch.Tensor:
    """Every code of `bits` bits as +-1 vectors (2**bits, bits); bit j of code k is (k >> j) & 1."""
    k = torch.arange(2**bits, device=device)
    return ((k.unsqueeze(1) >> torch.arange(bits, device=device)) & 1).float() * 2 - 1


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last dimension. The clamp keeps the gradient finite
    where a probability underflowed to 0 (low temperatures)."""
    return -(p * torch.log(p.clamp_min(1e-10))).sum(-1)


class LookupFreeQuantizer(Quantizer):
    """kind lfq: lookup-free quantization (MAGVIT-v2, Yu et al. 2023, "Language Model Beats
    Diffusion -- Tokenizer is Key to Visual Generation", sec. 3.1). Each of the `codebook_dim`
    channels is quantized to its sign (+-1, straight-through gradient): the codebook is the implicit
    set of 2**codebook_dim corners, index = sum_j [z_j > 0] 2**j. embed_dim is codebook_dim
    (quant_conv / post_quant_conv project in and out).

    loss = beta * mean((z - sg(q))^2) + entropy_weight * (H_sample - diversity_gamma * H_codebook)
    (the paper's eq. 5 plus the commitment term): H_sample, the mean entropy of each vector's soft
    assignment softmax(2 <z, c> / temperature) over the codes c (-|z - c|^2 up to terms softmax
    cancels), is minimised so that assignments are confident; H_codebook, the entropy of the mean
    assignment over the GLOBAL batch (one `collectives.reduce` call), is maximised so that all codes are
    used. Both run in fp32, in groups of at most `group_bits` bits (`entropy_groups`): a group of g
    bits has 2**g codes, so 18 bits cost 2 x 512 probabilities per vector instead of 262144. The
    assignment distribution factorises over bits, so H_sample is exact in groups; H_codebook is
    the sum of the groups' entropies, the entropy of the product of their marginals (equal to the
    whole-codebook entropy when the groups are used independently, an upper bound otherwise).

    Data parallelism: H_codebook is a function of the whole global batch, so the gradient one rank
    gets from its own rows is 1/world_size of that rank's share of it in one process, and engines
    AVERAGE gradients over ranks. The gradient of that term is therefore scaled by world_size (its
    value is left alone), which makes every engine's update the one-process update on the global
    batch (tests/distributed/test_engine_equivalence.py)."""

    def __init__(self, codebook_dim: int, beta: float = 0.25, entropy_weight: float = 0.1,
                 diversity_gamma: float = 1.0, temperature: float = 0.01, group_bits: int = 10,
                 usage_window: int = 65536, collectives: Collectives = ONE_PROCESS):
        super().__init__(2**codebook_dim, codebook_dim, usage_window, collectives)
        self.codebook_dim, self.beta = codebook_dim, beta
        self.entropy_weight, self.diversity_gamma, self.temperature = entropy_weight, diversity_gamma, temperature
        self.groups = entropy_groups(codebook_dim, group_bits)
        self.register_buffer("bit_weights", 2 ** torch.arange(codebook_dim), persistent=False)  # long

    @classmethod
    def from_config(cls, cfg: QuantizerConfig, z_channels: int, collectives: Collectives) -> "LookupFreeQuantizer":
        return cls(cfg.codebook_dim, cfg.beta, cfg.entropy_weight, cfg.diversity_gamma, cfg.entropy_temperature,
                   cfg.entropy_group_bits, cfg.usage_window, collectives)

    def entropies(self, zf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """zf (N, D) fp32 -> (H_sample, H_codebook), in nats, summed over the bit groups. In training
        H_codebook is that of the global batch (reduced), its gradient scaled by world_size (see the
        class docstring)."""
        per_sample = zf.new_zeros(())
        sums, start = [], 0
        for g in self.groups:
            logits = 2 * zf[:, start:start + g] @ _signs(g, zf.device).t() / self.temperature  # (N, 2**g)
            start += g
            logp = F.log_softmax(logits, dim=1)
            p = logp.exp()
            per_sample = per_sample - (p * logp).sum(1).mean()
            sums.append(p.sum(0))
        local = torch.cat(sums)  # (sum_g 2**g,) this rank's summed assignments
        if self.training:
            stats = self.collectives.sum(torch.cat([local.detach(), local.new_tensor([zf.shape[0]])]))
            # the global sum's value; the gradient flows through this rank's rows only
            mean = (local + (stats[:-1] - local).detach()) / stats[-1]
        else:
            mean = local / zf.shape[0]
        codebook = sum(_entropy(m) for m in mean.split([2**g for g in self.groups]))
        world = self.collectives.world_size
        if self.training and world > 1:
            codebook = codebook.detach() + world * (codebook - codebook.detach())
        return per_sample, codebook

    def forward(self, z: torch.Tensor):
        B, C, H, W = z.shape
        with fp32(z.device):
            zf = rearrange(z.float(), "b c h w -> (b h w) c")
            bits = zf > 0
            q = torch.where(bits, 1.0, -1.0)
            idx = (bits.long() * self.bit_weights).sum(1)
            commit = torch.mean((zf - q) ** 2)
            per_sample, codebook = self.entropies(zf)
            loss = self.beta * commit + self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
            zq = zf + (q - zf).detach()  # straight-through
            counts = self._counts(idx)
        z_q = rearrange(zq, "(b h w) c -> b c h w", b=B, h=H, w=W).to(z.dtype)
        info = self._info(idx.view(B, H, W), counts)
        info.update({"per_sample_entropy": per_sample.detach(), "codebook_entropy": codebook.detach()})
        return z_q, loss, info

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) long -> +-1 codes (..., D) fp32."""
        return ((indices.long().unsqueeze(-1) // self.bit_weights) % 2).float() * 2 - 1

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        return rearrange(self.indices_to_codes(indices), "b h w c -> b c h w")

    def codebook(self) -> torch.Tensor:
        return self.indices_to_codes(torch.arange(self.n_e, device=self.bit_weights.device))
