"""Patch-Volume VQ autoencoder (inference only), state-dict compatible with the official ``patchvolumeAE``.

Tensors are ``(B, C, D, H, W)``; D is the slice (NIfTI k) axis. Images are in [-1, 1].
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import register_to_config
from .quantizer import lookup_codes, nearest_code_indices
from .unet_blocks import voxel_attention


def _norm(channels: int, num_groups: int, norm_type: str = "group") -> nn.Module:
    if norm_type == "group":
        return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)
    if norm_type == "batch":
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"unknown norm_type {norm_type!r} (expected 'group' or 'batch')")


def _act(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient is recorded (inference keeps one map fewer alive)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _residual(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``h + skip``, accumulated into ``h`` when no gradient is recorded."""
    return h.add_(skip) if not torch.is_grad_enabled() else h + skip


class _SiLU(nn.Module):
    """Module form of :func:`_act` (no parameters; keeps the official ``final_block`` indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(x)


class ResBlockX(nn.Module):
    """Residual block with equal input and output width."""

    def __init__(self, channels: int, norm_type: str, num_groups: int):
        super().__init__()
        self.norm1 = _norm(channels, num_groups, norm_type)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = _norm(channels, num_groups, norm_type)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_act(self.norm1(x)))
        h = self.conv2(_act(self.norm2(h)))
        return _residual(h, x)


class ResBlockXY(nn.Module):
    """Residual block changing width, with a 1x1x1 projection on the skip path."""

    def __init__(self, in_channels: int, out_channels: int, norm_type: str, num_groups: int):
        super().__init__()
        self.resConv = nn.Conv3d(in_channels, out_channels, 1)
        self.norm1 = _norm(in_channels, num_groups, norm_type)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, num_groups, norm_type)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_act(self.norm1(x)))
        h = self.conv2(_act(self.norm2(h)))
        return _residual(h, self.resConv(x))


def _res_block(cin: int, cout: int, norm_type: str, num_groups: int) -> nn.Module:
    return ResBlockX(cout, norm_type, num_groups) if cin == cout else ResBlockXY(cin, cout, norm_type, num_groups)


class AttentionBlock(nn.Module):
    """Global self-attention over all voxels (4 heads of 32), with a residual connection."""

    heads = 4
    dim_head = 32

    def __init__(self, channels: int, norm_type: str, num_groups: int):
        super().__init__()
        inner = self.heads * self.dim_head
        self.norm = _norm(channels, num_groups, norm_type)
        self.to_qkv = nn.Linear(channels, inner * 3, bias=False)
        self.to_out = nn.Conv3d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual(self.to_out(voxel_attention(self.norm(x), self.to_qkv, self.heads, self.dim_head)), x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, norm_type: str, num_groups: int):
        super().__init__()
        self.res1 = ResBlockX(channels, norm_type, num_groups)
        self.attn = AttentionBlock(channels, norm_type, num_groups)
        self.res2 = ResBlockX(channels, norm_type, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_trans = nn.ConvTranspose3d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_trans(x)


def _level_widths(n_hiddens: int, levels: int) -> list[int]:
    widths = [n_hiddens * 2 ** i for i in range(levels)]
    return widths + [widths[-1]]


def _num_levels(factors: Sequence[int]) -> int:
    levels = {int(math.log2(f)) for f in factors}
    if len(levels) != 1 or any(2 ** int(math.log2(f)) != f for f in factors):
        raise ValueError(f"compression factors must be one power of two per axis, got {list(factors)}")
    return levels.pop()


class _LevelBlock(nn.Module):
    def __init__(self, cin: int, cout: int, resample: nn.Module, name: str, norm_type: str, num_groups: int):
        super().__init__()
        self.res1 = _res_block(cin, cout, norm_type, num_groups)
        self.res2 = ResBlockX(cout, norm_type, num_groups)
        self.add_module(name, resample)
        self._resample_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._resample_name)(self.res2(self.res1(x)))


class Encoder(nn.Module):
    """Image ``(B, 1, D, H, W)`` -> latent ``(B, embedding_dim, D/f, H/f, W/f)`` (before ``pre_vq_conv``)."""

    def __init__(self, n_hiddens: int, downsample: Sequence[int], image_channel: int = 1, norm_type: str = "group",
                 num_groups: int = 32, embedding_dim: int = 8):
        super().__init__()
        levels = _num_levels(downsample)
        widths = _level_widths(n_hiddens, levels)
        self.conv_blocks = nn.ModuleList()
        for i in range(levels + 1):
            cin = n_hiddens if i == 0 else widths[i - 1]
            down = nn.Conv3d(widths[i], widths[i], 4, stride=2, padding=1) if i < levels else nn.Identity()
            self.conv_blocks.append(_LevelBlock(cin, widths[i], down, "down", norm_type, num_groups))
        self.conv_first = nn.Conv3d(image_channel, n_hiddens, 3, padding=1)
        self.mid_block = MidBlock(widths[-1], norm_type, num_groups)
        self.final_block = nn.Sequential(_norm(widths[-1], num_groups, norm_type), _SiLU(),
                                         nn.Conv3d(widths[-1], embedding_dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_first(x)
        for block in self.conv_blocks:
            h = block(h)
        return self.final_block(self.mid_block(h))


class DecoderStage(NamedTuple):
    """One step of the decoder, applied in order by :meth:`Decoder.stages`. ``kind`` is what a
    decode that streams the stages in cubes must know about it: ``"latent"`` runs whole at latent
    resolution (``conv_first``; the mid-block, whose attention sees every voxel), ``"res"`` is a
    residual block of GroupNorm + SiLU + 3x3x3 convolutions (``ResBlockX`` / ``ResBlockXY``),
    ``"up"`` the 2x transposed convolution, ``"out"`` the final GroupNorm + SiLU + convolution."""

    kind: str
    module: nn.Module


class Decoder(nn.Module):
    """Latent ``(B, embedding_dim, d, h, w)`` -> image ``(B, 1, f*d, f*h, f*w)``: the
    :meth:`stages` in order."""

    def __init__(self, n_hiddens: int, upsample: Sequence[int], image_channel: int = 1, norm_type: str = "group",
                 num_groups: int = 32, embedding_dim: int = 8):
        super().__init__()
        levels = _num_levels(upsample)
        widths = _level_widths(n_hiddens, levels)[::-1]
        self.conv_first = nn.Conv3d(embedding_dim, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], norm_type, num_groups)
        self.conv_blocks = nn.ModuleList()
        for i in range(levels + 1):
            cin = widths[0] if i == 0 else widths[i - 1]
            up = _Upsample(widths[i]) if i < levels else nn.Identity()
            self.conv_blocks.append(_LevelBlock(cin, widths[i], up, "up", norm_type, num_groups))
        self.final_block = nn.Sequential(_norm(widths[-1], num_groups, norm_type), _SiLU(),
                                         nn.Conv3d(widths[-1], image_channel, 3, padding=1))

    def stages(self) -> list[DecoderStage]:
        """The decoder as one flat list: ``conv_first`` and the mid-block (latent resolution), then
        per level its two residual blocks and the 2x up-sampling (none at the last level), then
        ``final_block``. :meth:`forward` applies exactly this list; every decoding strategy
        (:mod:`MedDiffusionLib.decoding`) runs it, whole, per cube, or streamed stage by stage."""
        out = [DecoderStage("latent", self.conv_first), DecoderStage("latent", self.mid_block)]
        for block in self.conv_blocks:
            out += [DecoderStage("res", block.res1), DecoderStage("res", block.res2)]
            resample = getattr(block, block._resample_name)
            if isinstance(resample, _Upsample):
                out.append(DecoderStage("up", resample))
        out.append(DecoderStage("out", self.final_block))
        return out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for stage in self.stages():
            h = stage.module(h)
        return h


class Codebook(nn.Module):
    """Frozen codebook buffers of the official EMA quantiser (``embeddings``, ``N``, ``z_avg``)."""

    def __init__(self, n_codes: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.clone())


class PatchVolumeAE(nn.Module):
    """Patch-Volume autoencoder: patch-wise encoding, volume-wise decoding.

    Constructor arguments use the official config names. ``patch_size`` is the side
    of the image cubes used for patch-wise encoding (64 in the released models).
    """

    @register_to_config
    def __init__(self, n_hiddens: int = 48, downsample: Sequence[int] = (8, 8, 8), image_channels: int = 1,
                 norm_type: str = "group", num_groups: int = 24, embedding_dim: int = 8, n_codes: int = 8192,
                 patch_size: int = 64):
        super().__init__()
        downsample = [int(f) for f in downsample]
        self.encoder = Encoder(n_hiddens, downsample, image_channels, norm_type, num_groups, embedding_dim)
        self.decoder = Decoder(n_hiddens, downsample, image_channels, norm_type, num_groups, embedding_dim)
        self.pre_vq_conv = nn.Conv3d(embedding_dim, embedding_dim, 1)
        self.post_vq_conv = nn.Conv3d(embedding_dim, embedding_dim, 1)
        self.codebook = Codebook(n_codes, embedding_dim)
        self.patch_size = patch_size

    # -- geometry -------------------------------------------------------------------------
    @property
    def compression(self) -> int:
        return int(self.config["downsample"][0])

    @property
    def latent_channels(self) -> int:
        return int(self.config["embedding_dim"])

    # -- encoding -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-volume encoding (no quantisation): ``(B, 1, D, H, W)`` -> ``(B, 8, D/f, H/f, W/f)``."""
        return self.pre_vq_conv(self.encoder(x))

    def patch_encode(self, x: torch.Tensor, patch_size: int | None = None, batch: int | None = None) -> torch.Tensor:
        """Patch-wise encoding as in the official latent generation: cut ``x`` into
        non-overlapping ``patch_size`` cubes, encode each alone, paste latents back.

        ``batch`` limits how many cubes go through the encoder at once (memory).
        """
        p = int(patch_size or self.patch_size)
        b, c, d, h, w = x.shape
        if d % p or h % p or w % p:
            raise ValueError(f"patch-wise encoding needs every image side divisible by {p}; got {d}x{h}x{w}")
        n1, n2, n3 = d // p, h // p, w // p
        cubes = x.reshape(b, c, n1, p, n2, p, n3, p).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, c, p, p, p)
        step = batch or cubes.shape[0]
        lat = torch.cat([self.encode(cubes[i:i + step]) for i in range(0, cubes.shape[0], step)])
        e, q = lat.shape[1], lat.shape[2]
        return lat.reshape(b, n1, n2, n3, e, q, q, q).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, e, n1 * q, n2 * q, n3 * q)

    # -- quantisation ---------------------------------------------------------------------
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices ``(B, d, h, w)`` of a latent ``(B, 8, d, h, w)``."""
        return nearest_code_indices(z, self.codebook.embeddings)

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors ``(B, 8, d, h, w)`` for indices ``(B, d, h, w)``."""
        return lookup_codes(indices, self.codebook.embeddings)

    def codebook_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (min, max) over the codebook matrix, used to normalise latents."""
        emb = self.codebook.embeddings
        return emb.min(), emb.max()

    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> diffusion space: ``(z - min) / (max - min) * 2 - 1``."""
        lo, hi = self.codebook_range()
        return (z - lo) / (hi - lo) * 2.0 - 1.0

    def denormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latent`."""
        lo, hi = self.codebook_range()
        return (z + 1.0) / 2.0 * (hi - lo) + lo

    # -- decoding (tiled and streamed ways, planning: MedDiffusionLib.decoding) -------------
    def decode(self, latent: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Volume-wise (whole) decode. ``latent`` is a float latent ``(B, 8, d, h, w)`` that is
        re-quantised (``quantize=True``) or integer code indices ``(B, d, h, w)``."""
        if quantize:
            if latent.is_floating_point() is False:
                raise TypeError("decode(quantize=True) expects a float latent; pass indices with quantize=False")
            indices = self.quantize(latent)
        else:
            if latent.is_floating_point():
                raise TypeError("decode(quantize=False) expects integer codebook indices")
            indices = latent
        return self.decoder(self.post_vq_conv(self.codes(indices)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-2 reconstruction: patch-wise encode, quantise, volume-wise decode."""
        return self.decode(self.patch_encode(x), quantize=True)
