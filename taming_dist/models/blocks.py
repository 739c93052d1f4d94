"""The convolutional Encoder/Decoder of taming-transformers (`taming/modules/diffusionmodules/model.py`).

Module names and nesting follow the original exactly, so original checkpoints load key-for-key
(see docs/taming-compat.md). Differences that do not touch the numbers or the keys:
no time-embedding plumbing (the VQGAN never used it), attention through
`scaled_dot_product_attention`, and an optional activation-checkpointing switch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from taming_dist.config.schema import EncoderDecoderConfig


def Normalize(in_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, softmax(q.k * C^-0.5) v: exactly the
    original's bmm formulation, computed by the fused kernel (its default scale is C^-0.5)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        H, W = x.shape[-2:]
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c") for t in (self.q(h_), self.k(h_), self.v(h_)))
        h_ = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, C)
        h_ = rearrange(h_, "b 1 (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h_)


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric zero pad (right and bottom only), as the original: torch convs cannot express it.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Checkpointed(nn.Module):
    """Runs ResnetBlocks/AttnBlocks through activation checkpointing when `grad_checkpointing` is
    set: engines flip the attribute instead of wrapping modules, so state_dict keys never change."""

    grad_checkpointing: bool

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _mid(self, h: torch.Tensor) -> torch.Tensor:
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        return self._run(self.mid.block_2, h)


def _mid_block(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(_Checkpointed):
    """x (B, in_channels, R, R) -> z (B, z_channels [x2 if double_z], R/f, R/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__()
        self.grad_checkpointing = False
        ch, ch_mult = cfg.ch, tuple(cfg.ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + ch_mult
        curr_res = cfg.resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(cfg.num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = _mid_block(block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(block_in, out, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = self._run(down.block[i_block], h)
                if len(down.attn) > 0:
                    h = self._run(down.attn[i_block], h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self._mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(_Checkpointed):
    """z (B, z_channels, r, r) -> x (B, out_ch, r*f, r*f).

    Level modules sit under `up.<i>` in forward index order (the original inserts each at the
    front) but run from the highest index down, so the keys match original checkpoints."""

    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__()
        self.grad_checkpointing = False
        ch, ch_mult = cfg.ch, tuple(cfg.ch_mult)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, cfg.z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, cfg.dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(cfg.num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = self._run(up.block[i_block], h)
                if len(up.attn) > 0:
                    h = self._run(up.attn[i_block], h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
