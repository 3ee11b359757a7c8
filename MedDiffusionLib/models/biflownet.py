"""BiFlowNet noise estimator (state-dict compatible with the official ``ddpm/BiFlowNet.py``).

Input latent ``x`` is ``(B, C, D, H, W)`` with D, H, W multiples of the 8^3 sub-volume;
``time`` int64 ``(B,)``; ``y`` int64 ``(B,)`` class labels; ``res`` float ``(B, 3)`` or
``(3,)`` = latent (D, H, W) / 64. Output: predicted noise, same shape as ``x``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .config import register_to_config
from .dit import (DiTBlock, FinalLayer, PatchEmbedVoxel, merge_subvolumes, sincos_pos_embed_3d,
                  split_subvolumes, unpatchify)
from .unet_blocks import ResnetBlock, SinusoidalPosEmb, attention_or_identity, downsample, upsample

BlockConditioning = Callable[[nn.Module], Any]  # a block -> the conditioning input it reads


def level_widths(dim: int, dim_mults: Sequence[int], init_dim: int | None) -> list[tuple[int, int]]:
    """(in, out) widths of the five U-Net levels."""
    dims = [init_dim or dim, *[dim * m for m in dim_mults]]
    return list(zip(dims[:-1], dims[1:]))


class EncoderSideMixin:
    """Conditioning, DiT input stage and U-Net down path shared by BiFlowNet and ControlNet."""

    def _build_conditioning(self, dim: int, cond_classes: int | None, res_condition: bool) -> int:
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.cond_emb = nn.Embedding(cond_classes, time_dim) if cond_classes else None
        self.res_mlp = (nn.Sequential(nn.Linear(3, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
                        if res_condition else None)
        return time_dim * 2 if res_condition else time_dim

    def _build_down_level(self, i: int, din: int, dout: int, emb_dim: int, use_attn: bool, attn_heads: int,
                          groups: int, n_levels: int) -> nn.ModuleList:
        is_last = i >= n_levels - 1
        return nn.ModuleList([
            ResnetBlock(din, dout, emb_dim, groups),
            attention_or_identity(use_attn, dout, attn_heads),
            ResnetBlock(dout, dout, emb_dim, groups),
            attention_or_identity(use_attn, dout, attn_heads),
            downsample(dout) if (i != 0 and not is_last) else nn.Identity(),
        ])

    def conditioning(self, time: torch.Tensor, y: torch.Tensor | None, res: torch.Tensor | None) -> torch.Tensor:
        """Conditioning vector ``(B, E)`` from timestep, class and latent resolution."""
        emb = self.time_mlp(time)
        if self.cond_emb is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass y (class index per batch item)")
            emb = emb + self.cond_emb(y)
        if self.res_mlp is not None:
            if res is None:
                raise ValueError("this model is resolution-conditional: pass res = latent (D, H, W) / 64")
            res = res.to(emb.dtype)
            if res.dim() == 1:
                res = res.unsqueeze(0)
            res = res.expand(emb.shape[0], -1)
            emb = torch.cat([emb, self.res_mlp(res)], dim=-1)
        return emb

    def block_conditioning(self, emb: torch.Tensor, subvolumes: int) -> BlockConditioning:
        """The conditioning input each block reads: ``emb`` ``(B, E)`` for a U-Net block, ``emb``
        repeated per sub-volume ``(B * subvolumes, E)`` for a DiT block or final layer."""
        c_dit = emb.repeat_interleave(subvolumes, dim=0)
        return lambda block: c_dit if isinstance(block, (DiTBlock, FinalLayer)) else emb

    def _dit_tokens(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        sub = split_subvolumes(x_raw, self.sub_volume_size)
        b, _, d, h, w = x_raw.shape
        grid = (d // self.sub_volume_size[0], h // self.sub_volume_size[1], w // self.sub_volume_size[2])
        return self.x_embedder(sub) + self.pos_embed, grid

    def _dit_map(self, final: nn.Module, tokens: torch.Tensor, cond: BlockConditioning, batch: int,
                 grid: tuple[int, int, int]) -> torch.Tensor:
        return merge_subvolumes(unpatchify(final(tokens, cond(final)), self.patch_size, self.dim), batch, grid)


class BiFlowNet(EncoderSideMixin, nn.Module):
    """DiT intra-patch flow + 3-D U-Net inter-patch flow. Keyword arguments are the official ones."""

    @register_to_config
    def __init__(self, dim: int, learn_sigma: bool = False, cond_classes: int | None = None,
                 dim_mults: Sequence[int] = (1, 2, 4, 8), sub_volume_size: Sequence[int] = (8, 8, 8),
                 patch_size: int = 2, channels: int = 3, attn_heads: int = 8, init_dim: int | None = None,
                 init_kernel_size: int = 3, use_sparse_linear_attn: Sequence[int] = (0, 0, 0, 1, 1),
                 resnet_groups: int = 24, DiT_num_heads: int = 8, mlp_ratio: float = 4, vq_size: int = 64,
                 res_condition: bool = True, num_mid_DiT: int = 1):
        super().__init__()
        self.dim, self.channels, self.patch_size = dim, channels, patch_size
        self.sub_volume_size = tuple(int(s) for s in sub_volume_size)
        if len(set(self.sub_volume_size)) != 1 or self.sub_volume_size[0] % patch_size:
            raise ValueError("sub_volume_size must be a cube whose side is a multiple of patch_size")
        init_dim = init_dim or dim
        in_out = level_widths(dim, dim_mults, init_dim)
        if len(use_sparse_linear_attn) != len(in_out):
            raise ValueError("use_sparse_linear_attn needs one flag per U-Net level")
        self.n_fusion = sum(1 for a, b in in_out if a == b)
        if self.n_fusion > 2:
            raise ValueError(f"dim_mults {list(dim_mults)} repeat a width after the first two U-Net levels; the DiT "
                             "branch fuses one map per repeated width at full resolution, so only the first two "
                             "levels may keep the width (e.g. (1, 1, 2, 4, 8) or (1, 1, 2, 3, 4))")
        out_dim = channels * (2 if learn_sigma else 1)

        self.init_conv = nn.Conv3d(channels, init_dim, init_kernel_size, padding=init_kernel_size // 2)
        emb_dim = self._build_conditioning(dim, cond_classes, res_condition)

        grid = self.sub_volume_size[0] // patch_size
        self.x_embedder = PatchEmbedVoxel(patch_size, channels, dim)
        self.pos_embed = nn.Parameter(sincos_pos_embed_3d(dim, grid), requires_grad=False)
        self.IntraPatchFlow_input = nn.ModuleList([
            nn.ModuleList([DiTBlock(dim, DiT_num_heads, mlp_ratio, emb_dim), FinalLayer(dim, patch_size, dim, emb_dim)])
            for _ in range(self.n_fusion)])
        self.IntraPatchFlow_mid = nn.ModuleList([DiTBlock(dim, DiT_num_heads, mlp_ratio, emb_dim)
                                                 for _ in range(num_mid_DiT)])
        self.IntraPatchFlow_output = nn.ModuleList([
            nn.ModuleList([DiTBlock(dim, DiT_num_heads, mlp_ratio, emb_dim, skip=True),
                           FinalLayer(dim, patch_size, dim, emb_dim)])
            for _ in range(self.n_fusion)])

        n = len(in_out)
        self.downs = nn.ModuleList([
            self._build_down_level(i, din, dout, emb_dim, bool(use_sparse_linear_attn[i]), attn_heads,
                                   resnet_groups, n)
            for i, (din, dout) in enumerate(in_out)])
        self.ups = nn.ModuleList()
        for k, (din, dout) in enumerate(reversed(in_out)):
            level = n - 1 - k
            use_attn = bool(use_sparse_linear_attn[level])
            self.ups.append(nn.ModuleList([
                ResnetBlock(dout * 2, dout, emb_dim, resnet_groups),
                attention_or_identity(use_attn, dout, attn_heads),
                ResnetBlock(dout * 2, din, emb_dim, resnet_groups),
                attention_or_identity(use_attn, din, attn_heads),
                upsample(din) if (level != 0 and level != 1) else nn.Identity(),
            ]))
        mid = in_out[-1][1]
        self.mid_block1 = ResnetBlock(mid, mid, emb_dim, resnet_groups)
        self.mid_spatial_attn = attention_or_identity(True, mid, attn_heads)
        self.mid_block2 = ResnetBlock(mid, mid, emb_dim, resnet_groups)
        self.final_conv = nn.Sequential(ResnetBlock(dim * 2, dim, None, resnet_groups), nn.Conv3d(dim, out_dim, 1))

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None,
                res: torch.Tensor | None = None, controls: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Predicted noise ``(B, C, D, H, W)``.

        ``controls`` (ControlNet residuals): six tensors, one per U-Net level and one for the
        middle; level ``i`` is added to the first skip popped in the matching up level.
        """
        b = x.shape[0]
        tokens, grid = self._dit_tokens(x)
        x = self.init_conv(x)
        r = x.clone()
        cond = self.block_conditioning(self.conditioning(time, y, res), tokens.shape[0] // b)

        dit_maps, stack = [], []
        for block, final in self.IntraPatchFlow_input:
            tokens = block(tokens, cond(block))
            stack.append(tokens)
            dit_maps.append(self._dit_map(final, tokens, cond, b, grid))
        for block in self.IntraPatchFlow_mid:
            tokens = block(tokens, cond(block))
        for block, final in self.IntraPatchFlow_output:
            tokens = block(tokens, cond(block), skip=stack.pop())
            dit_maps.append(self._dit_map(final, tokens, cond, b, grid))

        skips = []
        for i, (block1, attn1, block2, attn2, down) in enumerate(self.downs):
            if i < self.n_fusion:
                x = x + dit_maps.pop(0)
            x = attn1(block1(x, cond(block1)))
            skips.append(x)
            x = attn2(block2(x, cond(block2)))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_spatial_attn(self.mid_block1(x, cond(self.mid_block1))), cond(self.mid_block2))

        level_controls = None
        if controls is not None:
            controls = list(controls)
            if len(controls) != len(self.downs) + 1:
                raise ValueError(f"expected {len(self.downs) + 1} control tensors, got {len(controls)}")
            x = x + controls[-1]
            level_controls = controls[:-1]
        n_ups = len(self.ups)
        for k, (block1, attn1, block2, attn2, up) in enumerate(self.ups):
            if k >= n_ups - self.n_fusion:
                x = x + dit_maps.pop(0)
            skip = skips.pop()
            if level_controls is not None:
                skip = skip + level_controls.pop()
            x = attn1(block1(torch.cat((x, skip), dim=1), cond(block1)))
            x = attn2(block2(torch.cat((x, skips.pop()), dim=1), cond(block2)))
            x = up(x)
        return self.final_conv(torch.cat((x, r), dim=1))
