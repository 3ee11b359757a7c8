"""DiT pieces of BiFlowNet's intra-patch flow: token embedding, DiT block, final layer,
fixed 3-D sin-cos position table and the sub-volume split/merge helpers.

Tokens are ``(N, T, C)``: N = batch x sub-volumes, T = tokens per sub-volume.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention over tokens (qkv with bias, output projection)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DiT width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; with ``skip`` it first fuses a skip token stream."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, cond_dim: int, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * hidden, hidden) if skip else None
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(N, T, C)`` tokens, ``c`` ``(N, E)`` their conditioning vectors."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Token -> ``patch^3 * out_channels`` values, adaLN-modulated."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size ** 3 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbedVoxel(nn.Module):
    """Sub-volume ``(N, C, s, s, s)`` -> tokens ``(N, (s/p)^3, hidden)``."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.float()).flatten(2).transpose(1, 2)


def sincos_pos_embed_3d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 3-D sin-cos table ``(1, grid^3, dim)``; token (i, j, k) has i along D.

    Each axis gets ``dim/3`` channels: sines then cosines of ``pos * 10000^(-m/(dim/6))``.
    Computed in float64, returned as float32.
    """
    if dim % 6:
        raise ValueError(f"3-D sin-cos position embedding needs a width divisible by 6, got {dim}")
    axis_dim = dim // 3
    omega = 1.0 / 10000 ** (np.arange(axis_dim // 2, dtype=np.float64) / (axis_dim / 2.0))
    pos = np.arange(grid, dtype=np.float64)
    ii, jj, kk = np.meshgrid(pos, pos, pos, indexing="ij")

    def axis(p: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([axis(ii), axis(jj), axis(kk)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def split_subvolumes(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B*S, C, s1, s2, s3)``; rows ordered (b, i, j, k), k fastest."""
    b, c, d, h, w = x.shape
    s1, s2, s3 = size
    if d % s1 or h % s2 or w % s3:
        raise ValueError(f"latent size {d}x{h}x{w} is not a multiple of the sub-volume size {s1}x{s2}x{s3}")
    x = x.reshape(b, c, d // s1, s1, h // s2, s2, w // s3, s3).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(-1, c, s1, s2, s3)


def merge_subvolumes(x: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`split_subvolumes`: ``(B*S, C, s1, s2, s3)`` -> ``(B, C, D, H, W)``."""
    n1, n2, n3 = grid
    _, c, s1, s2, s3 = x.shape
    x = x.reshape(batch, n1, n2, n3, c, s1, s2, s3).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(batch, c, n1 * s1, n2 * s2, n3 * s3)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens ``(N, g^3, p^3*C)`` -> sub-volumes ``(N, C, g*p, g*p, g*p)``."""
    n, t, _ = tokens.shape
    g = round(t ** (1 / 3))
    p = patch_size
    x = tokens.reshape(n, g, g, g, p, p, p, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(n, channels, g * p, g * p, g * p)
