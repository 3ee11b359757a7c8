"""The authors' ControlNet for BiFlowNet (``ddpm/cldm.py``, recovered from bytecode).

``ControlNet`` is a trainable copy of BiFlowNet's encoder side that reads ``concat(x_t, hint)``
and emits six zero-convolution residuals (five U-Net levels + middle). ``ControlLDM`` holds the
frozen base (``noise_estimator``) and the ControlNet (``controlnet``) with the official key names.
``dit_branch=False`` gives the authors' second variant (``cldm_new``): no DiT input stage, any
``hint_channel`` (e.g. a one-hot label map at latent resolution).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .biflownet import BiFlowNet, EncoderSideMixin, level_widths
from .config import init_args, register_to_config
from .dit import DiTBlock, FinalLayer, PatchEmbedVoxel, sincos_pos_embed_3d
from .unet_blocks import ResnetBlock, attention_or_identity, zero_conv


class ControlNet(EncoderSideMixin, nn.Module):
    """Encoder-side copy of BiFlowNet. ``forward(x, hint, time, y, res)`` returns six tensors
    ``[lvl0 (L), lvl1 (L), lvl2 (L/2), lvl3 (L/4), lvl4 (L/8), mid (L/8)]``."""

    @register_to_config
    def __init__(self, dim: int, hint_channel: int = 8, cond_classes: int | None = None,
                 dim_mults: Sequence[int] = (1, 1, 2, 4, 8), sub_volume_size: Sequence[int] = (8, 8, 8),
                 channels: int = 8, patch_size: int = 1, attn_heads: int = 8, init_dim: int | None = None,
                 init_kernel_size: int = 3, use_sparse_linear_attn: Sequence[int] = (0, 0, 0, 1, 1),
                 resnet_groups: int = 24, DiT_num_heads: int = 8, mlp_ratio: float = 4, vq_size: int = 64,
                 res_condition: bool = True, dit_branch: bool = True):
        super().__init__()
        self.dim, self.channels, self.patch_size, self.hint_channel = dim, channels, patch_size, hint_channel
        self.sub_volume_size = tuple(int(s) for s in sub_volume_size)
        self.dit_branch = dit_branch
        init_dim = init_dim or dim
        in_out = level_widths(dim, dim_mults, init_dim)
        self.n_fusion = sum(1 for a, b in in_out if a == b)
        cin = channels + hint_channel
        self.init_conv = nn.Conv3d(cin, init_dim, init_kernel_size, padding=init_kernel_size // 2)
        emb_dim = self._build_conditioning(dim, cond_classes, res_condition)
        if dit_branch:
            self.x_embedder = PatchEmbedVoxel(patch_size, cin, dim)
            self.pos_embed = nn.Parameter(torch.zeros_like(sincos_pos_embed_3d(dim, self.sub_volume_size[0] // patch_size)),
                                          requires_grad=False)
            self.IntraPatchFlow_input = nn.ModuleList([
                nn.ModuleList([DiTBlock(dim, DiT_num_heads, mlp_ratio, emb_dim), FinalLayer(dim, patch_size, dim, emb_dim)])
                for _ in range(self.n_fusion)])
        n = len(in_out)
        self.downs = nn.ModuleList()
        for i, (din, dout) in enumerate(in_out):
            level = self._build_down_level(i, din, dout, emb_dim, bool(use_sparse_linear_attn[i]), attn_heads,
                                           resnet_groups, n)
            level.append(zero_conv(dout))
            self.downs.append(level)
        mid = in_out[-1][1]
        self.mid_block1 = ResnetBlock(mid, mid, emb_dim, resnet_groups)
        self.mid_spatial_attn = attention_or_identity(True, mid, attn_heads)
        self.mid_block2 = ResnetBlock(mid, mid, emb_dim, resnet_groups)
        self.mid_zero_conv = zero_conv(mid)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None,
                res: torch.Tensor | None = None) -> list[torch.Tensor]:
        if hint.shape[1] != self.hint_channel or hint.shape[0] != x.shape[0] or hint.shape[2:] != x.shape[2:]:
            raise ValueError(f"hint must be (B={x.shape[0]}, {self.hint_channel}, {', '.join(map(str, x.shape[2:]))}); "
                             f"got {tuple(hint.shape)}")
        b = x.shape[0]
        x = torch.cat([x, hint.to(x.dtype)], dim=1)
        emb = self.conditioning(time, y, res)
        dit_maps: list[torch.Tensor] = []
        if self.dit_branch:
            tokens, grid = self._dit_tokens(x)
            cond = self.block_conditioning(emb, tokens.shape[0] // b)
            for block, final in self.IntraPatchFlow_input:
                tokens = block(tokens, cond(block))
                dit_maps.append(self._dit_map(final, tokens, cond, b, grid))
        else:
            cond = self.block_conditioning(emb, 1)
        x = self.init_conv(x)
        outs = []
        for i, (block1, attn1, block2, attn2, down, zconv) in enumerate(self.downs):
            if dit_maps and i < self.n_fusion:
                x = x + dit_maps.pop(0)
            x = attn2(block2(attn1(block1(x, cond(block1))), cond(block2)))
            outs.append(zconv(x))
            x = down(x)
        x = self.mid_block2(self.mid_spatial_attn(self.mid_block1(x, cond(self.mid_block1))), cond(self.mid_block2))
        outs.append(self.mid_zero_conv(x))
        return outs


@torch.no_grad()
def init_from_base(controlnet: ControlNet, base: BiFlowNet) -> dict[str, list[str]]:
    """Official initialisation: copy every base tensor the ControlNet shares; zero-pad the extra
    hint input channels; keys without a counterpart (zero convs) keep their init."""
    base_state = base.state_dict()
    padded, fresh = [], []
    for key, tensor in controlnet.state_dict().items():
        if key not in base_state:
            fresh.append(key)
            continue
        src = base_state[key]
        if src.shape == tensor.shape:
            tensor.copy_(src)
        else:
            tensor.zero_()
            tensor[:, :src.shape[1]].copy_(src)
            padded.append(key)
    return {"keys_zero_padded": padded, "keys_fresh": sorted(fresh)}


def controlled_noise(base: BiFlowNet, controlnet: ControlNet, control_scales: Sequence[float], x: torch.Tensor,
                     time: torch.Tensor, hint: torch.Tensor, y: torch.Tensor | None = None,
                     res: torch.Tensor | None = None) -> torch.Tensor:
    """The official ControlLDM noise: ControlNet residuals, each times its scale, added into the
    frozen base's U-Net. ``x`` ``(B, C, D, H, W)``, ``hint`` ``(B, K, D, H, W)``."""
    controls = [c * s for c, s in zip(controlnet(x, hint, time, y, res), control_scales)]
    return base(x, time, y, res, controls=controls)


def control_scales_list(control_scales: float | Sequence[float], controlnet: ControlNet) -> list[float]:
    """One scale per ControlNet output (a single value is repeated)."""
    n = len(controlnet.downs) + 1
    scales = [float(control_scales)] * n if isinstance(control_scales, (int, float)) else [float(s) for s in control_scales]
    if len(scales) != n:
        raise ValueError(f"control_scales needs one value or {n}")
    return scales


class ControlledNoise(nn.Module):
    """An existing base network and ControlNet (shared, not copied) as one noise model
    ``forward(x, time, y, res, hint) -> eps`` (the argument order of BiFlowNet, hint last)."""

    def __init__(self, base: BiFlowNet, controlnet: ControlNet, control_scales: float | Sequence[float] = 1.0):
        super().__init__()
        self.base, self.controlnet = base, controlnet
        self.control_scales = control_scales_list(control_scales, controlnet)

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None,
                res: torch.Tensor | None = None, hint: torch.Tensor | None = None) -> torch.Tensor:
        if hint is None:
            raise ValueError("a ControlNet needs its hint")
        return controlled_noise(self.base, self.controlnet, self.control_scales, x, time, hint, y, res)


class ControlLDM(nn.Module):
    """Frozen BiFlowNet + ControlNet. ``forward(x, time, hint, y, res)`` -> controlled noise."""

    @register_to_config
    def __init__(self, dim: int, learn_sigma: bool = False, cond_classes: int | None = None,
                 dim_mults: Sequence[int] = (1, 1, 2, 4, 8), sub_volume_size: Sequence[int] = (8, 8, 8),
                 patch_size: int = 1, channels: int = 3, attn_heads: int = 8, init_dim: int | None = None,
                 init_kernel_size: int = 3, use_sparse_linear_attn: Sequence[int] = (0, 0, 0, 1, 1),
                 resnet_groups: int = 24, DiT_num_heads: int = 8, mlp_ratio: float = 4, vq_size: int = 64,
                 res_condition: bool = True, num_mid_DiT: int = 1, control_scales: float | Sequence[float] = 1,
                 hint_channel: int | None = None, dit_branch: bool = True):
        super().__init__()
        self.noise_estimator = BiFlowNet(dim, learn_sigma=learn_sigma, cond_classes=cond_classes, dim_mults=dim_mults,
                                         sub_volume_size=sub_volume_size, patch_size=patch_size, channels=channels,
                                         attn_heads=attn_heads, init_dim=init_dim, init_kernel_size=init_kernel_size,
                                         use_sparse_linear_attn=use_sparse_linear_attn, resnet_groups=resnet_groups,
                                         DiT_num_heads=DiT_num_heads, mlp_ratio=mlp_ratio, vq_size=vq_size,
                                         res_condition=res_condition, num_mid_DiT=num_mid_DiT)
        self.controlnet = ControlNet(**init_args(ControlNet, self.noise_estimator.config,
                                                 hint_channel=hint_channel or channels, dit_branch=dit_branch))
        self.control_scales = control_scales_list(control_scales, self.controlnet)

    def forward(self, x: torch.Tensor, time: torch.Tensor, hint: torch.Tensor, y: torch.Tensor | None = None,
                res: torch.Tensor | None = None) -> torch.Tensor:
        return controlled_noise(self.noise_estimator, self.controlnet, self.control_scales, x, time, hint, y, res)

    def init_controlnet_from_base(self) -> dict[str, list[str]]:
        return init_from_base(self.controlnet, self.noise_estimator)
