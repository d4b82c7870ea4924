"""Convolutional Encoder / Decoder of the VQ-GAN (Esser et al. 2021, taming-transformers layout).

Encoder: conv_in -> per level [num_res_blocks ResnetBlocks, Downsample except at the last level]
-> mid [Res, Attn?, Res] -> GroupNorm, SiLU, conv_out. The decoder mirrors it. Downsampling factor
= 2 ** (len(channel_mult) - 1). Letters: B batch, C channels, H W image size, h w latent grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest number of GroupNorm groups <= ``max_groups`` that divides ``channels`` (works for width 8)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (SDPA picks flash/efficient kernels)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        qkv = self.qkv(self.norm(x_BChw)).reshape(B, 3, 1, C, h * w).transpose(-1, -2)  # (B, 3, 1, hw, C)
        out_B1LC = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])
        return x_BChw + self.proj(out_B1LC.transpose(-1, -2).reshape(B, C, h, w))


class Downsample(nn.Module):
    """Strided 3x3 conv: halves h and w."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, attention: bool) -> nn.Sequential:
    layers = [ResnetBlock(channels, channels)]
    if attention:
        layers.append(AttnBlock(channels))
    return nn.Sequential(*layers, ResnetBlock(channels, channels))


class Encoder(nn.Module):
    """images (B, in_channels, H, W) -> z (B, z_channels, H / f, W / f), f = 2 ** (len(channel_mult) - 1)."""

    def __init__(self, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, mid_attention: bool = True, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        ch = base_channels
        for i, mult in enumerate(channel_mult):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(ch, base_channels * mult))
                ch = base_channels * mult
            if i < len(channel_mult) - 1:
                blocks.append(Downsample(ch))
            self.levels.append(nn.Sequential(*blocks))
        self.mid = _mid(ch, mid_attention)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, z_channels, 3, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> images (B, out_channels, h * f, w * f), unbounded (clamp to [-1, 1] to view)."""

    def __init__(self, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, mid_attention: bool = True, out_channels: int = 3):
        super().__init__()
        ch = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = _mid(ch, mid_attention)
        self.levels = nn.ModuleList()   # coarse -> fine
        for i in reversed(range(len(channel_mult))):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):   # one more block than the encoder, as in taming
                blocks.append(ResnetBlock(ch, base_channels * channel_mult[i]))
                ch = base_channels * channel_mult[i]
            if i > 0:
                blocks.append(Upsample(ch))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.features(z_BChw))

    def features(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Everything before the last conv (``VQGAN.compile_conv_stacks`` compiles this part)."""
        h = self.mid(self.conv_in(z_BChw))
        for level in self.levels:
            h = level(h)
        return F.silu(self.norm_out(h))

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv: where the adaptive GAN weight compares gradient norms."""
        return self.conv_out.weight
