"""Grids and resampling for volumes in network order ``(D, H, W)``: legal model sizes, the working
grid an input maps onto, resampling, and the random affine augmentation used in training."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from .volumes import Volume


def legal_size(size_xyz: Sequence[int], compression: int) -> tuple[int, int, int]:
    """Check an output size; the error lists the nearest legal sizes. Each side must be a
    multiple of 8 latent voxels (the DiT sub-volume), i.e. 64 (8x) or 32 (4x) image voxels."""
    step = 8 * compression
    size = tuple(int(s) for s in size_xyz)
    if len(size) != 3 or any(s <= 0 for s in size):
        raise UserError(f"size must be three positive integers X Y Z, got {list(size_xyz)}")
    if all(s % step == 0 for s in size):
        return size  # type: ignore[return-value]
    down = tuple(max(step, (s // step) * step) for s in size)
    up = tuple(math.ceil(s / step) * step for s in size)
    options = sorted({down, up, tuple(round(s / step) * step or step for s in size)})
    text = " or ".join("x".join(map(str, o)) for o in options)
    raise UserError(f"size {'x'.join(map(str, size))} is not possible for this {compression}x model: every side must "
                    f"be a multiple of {step} voxels; nearest legal sizes: {text}")


@dataclass
class WorkingGrid:
    """How an input volume maps onto the model's grid (network order (D, H, W))."""

    shape_dhw: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]


def working_grid(vol: Volume, spacing_xyz: Sequence[float], compression: int) -> WorkingGrid:
    """Legal size nearest to the input's extent at the model's trained spacing."""
    step = 8 * compression
    ext = [n * s for n, s in zip(vol.shape, vol.spacing)]  # (i, j, k) mm
    size_xyz = [max(step, int(round(e / sp / step)) * step) for e, sp in zip(ext, spacing_xyz)]
    legal_size(size_xyz, compression)
    spacing = tuple(e / n for e, n in zip(ext, size_xyz))
    return WorkingGrid((size_xyz[2], size_xyz[0], size_xyz[1]), spacing)


def resample(arr: torch.Tensor, shape: Sequence[int], kind: str) -> torch.Tensor:
    """``(D, H, W)`` -> ``shape``; ``image``: area-averaged where shrinking, then trilinear; ``labels``: nearest."""
    x = arr[None, None].float()
    if kind == "labels":
        return F.interpolate(x, size=tuple(shape), mode="nearest")[0, 0].to(arr.dtype)
    shrink = tuple(min(a, b) for a, b in zip(x.shape[2:], shape))
    if shrink != tuple(x.shape[2:]):
        x = F.adaptive_avg_pool3d(x, shrink)
    return F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]




def random_affine_theta(g: torch.Generator, degrees: float = 6.0, scale: float = 0.08, shift: float = 0.1) -> torch.Tensor:
    """Random ``(3, 4)`` affine for :func:`apply_affine`: scale ``1 +- scale``, rotation ``+-degrees``
    in the axial (H, W) plane and shift ``+-shift`` (fraction of the half-extent); no flips (keeps
    the heart on the anatomical left). Grid axes are (x=W, y=H, z=D)."""
    ang = math.radians(float(torch.empty(1).uniform_(-degrees, degrees, generator=g)))
    s = float(torch.empty(1).uniform_(1 - scale, 1 + scale, generator=g))
    tr = torch.empty(3).uniform_(-shift, shift, generator=g)
    c, si = math.cos(ang) / s, math.sin(ang) / s
    return torch.tensor([[c, -si, 0.0, float(tr[0])], [si, c, 0.0, float(tr[1])], [0.0, 0.0, 1.0 / s, float(tr[2])]])


def apply_affine(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``x`` ``(D, H, W)`` or ``(B, C, D, H, W)`` through ``theta`` (border padding);
    ``mode="nearest"`` for label maps (dtype kept)."""
    x5 = x[None, None] if x.dim() == 3 else x
    grid = F.affine_grid(theta[None].expand(x5.shape[0], -1, -1), list(x5.shape), align_corners=False)
    out = F.grid_sample(x5.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    out = out[0, 0] if x.dim() == 3 else out
    return out.to(x.dtype) if not x.dtype.is_floating_point else out


__all__ = ["legal_size", "WorkingGrid", "working_grid", "resample", "random_affine_theta", "apply_affine"]
