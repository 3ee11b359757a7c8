"""3-D U-Net building blocks of BiFlowNet's inter-patch flow (and of the ControlNet copy).

Feature maps are ``(B, C, D, H, W)``; ``emb`` is the conditioning vector ``(B, E)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalPosEmb(nn.Module):
    """Integer timestep ``(B,)`` -> ``(B, dim)``: sines first, then cosines."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class Block(nn.Module):
    """Conv3d k3 -> GroupNorm -> optional FiLM (scale, shift) -> SiLU."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.proj = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(groups, cout)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two :class:`Block` s with FiLM from the conditioning vector and a residual path."""

    def __init__(self, cin: int, cout: int, emb_dim: int | None, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout * 2)) if emb_dim else None
        self.block1 = Block(cin, cout, groups)
        self.block2 = Block(cout, cout, groups)
        self.res_conv = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        scale_shift = None
        if self.mlp is not None and emb is not None:
            scale_shift = self.mlp(emb)[:, :, None, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, D, H, W)`` with a gain and no bias."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.gamma


def voxel_attention(x: torch.Tensor, to_qkv: nn.Linear, heads: int, dim_head: int) -> torch.Tensor:
    """Multi-head self-attention over all voxels: ``(B, C, D, H, W)`` -> ``(B, heads*dim_head, D, H, W)``
    (tokens in (D, H, W) raster order; the output projection is the caller's)."""
    b, _, d, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = to_qkv(tokens).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, dim_head)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim_head)
    return out.transpose(1, 2).flatten(2).transpose(1, 2).reshape(b, -1, d, h, w)


class SpatialAttention(nn.Module):
    """Full self-attention over all voxels (``heads`` x 32 channels)."""

    def __init__(self, channels: int, heads: int, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Linear(channels, inner * 3, bias=False)
        self.to_out = nn.Conv3d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(voxel_attention(x, self.to_qkv, self.heads, self.dim_head))


class PreNorm(nn.Module):
    def __init__(self, channels: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def attention_or_identity(enabled: bool, channels: int, heads: int) -> nn.Module:
    return Residual(PreNorm(channels, SpatialAttention(channels, heads))) if enabled else nn.Identity()


def downsample(channels: int) -> nn.Module:
    return nn.Conv3d(channels, channels, 4, stride=2, padding=1)


def upsample(channels: int) -> nn.Module:
    return nn.ConvTranspose3d(channels, channels, 4, stride=2, padding=1)


def zero_conv(channels: int) -> nn.Conv3d:
    conv = nn.Conv3d(channels, channels, 1, padding=0)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv
