"""The frozen 2D base tokenizer: a taming-style VQGAN (conv encoder -> nearest code -> conv decoder).

Layout and quirks follow the VQGAN the ALIT authors fine-tune (so their checkpoints load by renaming only):
no quant_conv / post_quant_conv, bias-free residual convolutions, a 1x1 shortcut applied to the residual
branch's output when the channel count changes (``VQGANConfig.shortcut``), average-pool downsampling, nearest + conv
upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codebook import nearest_code
from .config import ShortcutKind, VQGANConfig


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv x2 plus a skip. When channels change, the skip is a 1x1 conv of the branch output
    (``shortcut_from="branch"``, the authors': ``shortcut(h) + h``) or of the input (``"input"``: ``shortcut(x) + h``).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, shortcut_from: ShortcutKind = "branch"):
        super().__init__()
        self.shortcut_from = shortcut_from
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        shortcut_in = in_channels if shortcut_from == "input" else out_channels
        self.shortcut = (nn.Conv2d(shortcut_in, out_channels, 1, bias=False)
                         if in_channels != out_channels else None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.shortcut is None:
            skip = x
        else:
            skip = self.shortcut(x if self.shortcut_from == "input" else h)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (taming's AttnBlock)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return x + self.proj_out(h.reshape(batch, channels, height, width))


class _Level(nn.Module):
    """One resolution level: residual blocks (+ attention) and an optional resampler."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            self.add_module(name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[index](x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _AvgPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class _Middle(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, groups)
        self.block_2 = ResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class VQGANEncoder(nn.Module):
    """``[N, 3, R, R]`` pixels in [0, 1] -> ``[N, z_channels, R/f, R/f]`` continuous features."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        ch, mults, groups = config.ch, config.ch_mult, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1, bias=False)
        levels, resolution, channels = [], config.resolution, ch
        for level, mult in enumerate(mults):
            blocks, attn = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(channels, ch * mult, groups, config.shortcut))
                channels = ch * mult
                if resolution in config.attn_resolutions:
                    attn.append(AttnBlock(channels, groups))
            last = level == len(mults) - 1
            levels.append(_Level(blocks, attn, None if last else _AvgPool(), "downsample"))
            resolution = resolution if last else resolution // 2
        self.down = nn.ModuleList(levels)
        self.mid = _Middle(channels, groups)
        self.norm_out = _group_norm(channels, groups)
        self.conv_out = nn.Conv2d(channels, config.z_channels, 1)

    def forward(self, pixels: Tensor) -> Tensor:
        h = self.conv_in(pixels)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """``[N, z_channels, g, g]`` code vectors -> ``[N, 3, R, R]`` pixels (unclamped)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        ch, mults, groups = config.ch, config.ch_mult, config.norm_groups
        channels = ch * mults[-1]
        resolution = config.grid_size
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = _Middle(channels, groups)
        levels: list[nn.Module] = []
        for level in reversed(range(len(mults))):
            blocks, attn = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(channels, ch * mults[level], groups, config.shortcut))
                channels = ch * mults[level]
                if resolution in config.attn_resolutions:
                    attn.append(AttnBlock(channels, groups))
            levels.insert(0, _Level(blocks, attn, _Upsample(channels) if level else None, "upsample"))
            resolution = resolution * 2 if level else resolution
        self.up = nn.ModuleList(levels)  # indexed by level, applied from the coarsest (last) to level 0
        self.norm_out = _group_norm(channels, groups)
        self.conv_out = nn.Conv2d(channels, config.out_channels, 3, padding=1)

    def forward(self, codes: Tensor) -> Tensor:
        h = self.mid(self.conv_in(codes))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(nn.Module):
    """Base tokenizer. ``encode`` gives the continuous grid features ALIT consumes and their nearest-code ids."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = VQGANEncoder(config)
        self.decoder = VQGANDecoder(config)
        self.codebook = nn.Parameter(torch.zeros(config.codebook_size, config.codebook_dim))

    def encode(self, pixels: Tensor) -> Tensor:
        """``[N, 3, R, R]`` -> continuous features ``[N, z_channels, g, g]`` (before quantization)."""
        return self.encoder(pixels)

    def code_ids(self, features: Tensor) -> Tensor:
        """Nearest (unnormalised, squared-L2) codebook entry of each grid cell: ``[N, C, g, g]`` -> ``[N, g*g]``."""
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        return nearest_code(flat, self.codebook).view(features.shape[0], -1)

    def decode_features(self, features: Tensor) -> Tensor:
        """``[N, g*g, C]`` code vectors (row-major grid) -> ``[N, 3, R, R]`` pixels, unclamped."""
        grid = self.config.grid_size
        codes = features.reshape(features.shape[0], grid, grid, features.shape[-1]).permute(0, 3, 1, 2)
        return self.decoder(codes.contiguous())

    def decode_ids(self, ids: Tensor) -> Tensor:
        """``[N, g*g]`` base code ids -> ``[N, 3, R, R]`` pixels (the base tokenizer's own reconstruction)."""
        return self.decode_features(self.codebook[ids])
