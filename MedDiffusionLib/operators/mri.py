"""Fast-MRI simulation for magnitude volumes: k-space under-sampling masks and zero-filled recon.

Slices are the last two axes ``(..., H, W)``; k-space is the centred orthonormal 2-D FFT. Masks are
boolean ``(H, W)`` with a fully sampled centre; ``acceleration`` = H*W / sampled points.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from ..errors import UserError


def gaussian_column_mask(shape: tuple[int, int], acceleration: float = 8.0, center_fraction: float = 0.04,
                         sigma_fraction: float = 0.25, seed: int = 0) -> torch.Tensor:
    """1-D variable-density mask: whole phase-encode columns (last axis) drawn without replacement
    with Gaussian density around the centre; the central ``center_fraction`` of columns always kept."""
    h, w = shape
    if acceleration < 1:
        raise UserError(f"acceleration must be >= 1, got {acceleration}")
    n_keep = max(1, int(round(w / acceleration)))
    n_center = min(n_keep, max(1, int(round(w * center_fraction))))
    cols = np.zeros(w, dtype=bool)
    c0 = (w - n_center) // 2
    cols[c0:c0 + n_center] = True
    rng = np.random.default_rng(seed)
    pos = np.arange(w) - (w - 1) / 2
    p = np.exp(-0.5 * (pos / (sigma_fraction * w)) ** 2)
    p[cols] = 0
    extra = n_keep - n_center
    if extra > 0:
        cols[rng.choice(w, size=extra, replace=False, p=p / p.sum())] = True
    return torch.from_numpy(np.broadcast_to(cols, (h, w)).copy())


def _poisson_disc(shape: tuple[int, int], radius: float, density_power: float, center: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Variable-density dart throwing: the exclusion radius grows with the distance from the centre."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    rr = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2))
    local = radius * (center + rr) ** density_power
    mask = np.zeros(shape, dtype=bool)
    order = rng.permutation(h * w)
    cell = max(1.0, float(local.min()))
    grid: dict[tuple[int, int], list[tuple[int, int]]] = {}
    reach = int(math.ceil(local.max() / cell))
    for idx in order:
        y, x = divmod(int(idx), w)
        r = local[y, x]
        gy, gx = int(y / cell), int(x / cell)
        span = min(reach, int(math.ceil(r / cell)))
        ok = True
        for dy in range(-span, span + 1):
            for dx in range(-span, span + 1):
                for (py, px) in grid.get((gy + dy, gx + dx), ()):
                    if (py - y) ** 2 + (px - x) ** 2 < r * r:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            mask[y, x] = True
            grid.setdefault((gy, gx), []).append((y, x))
    return mask


def poisson_disc_mask(shape: tuple[int, int], acceleration: float = 8.0, center_fraction: float = 0.06,
                      seed: int = 0, tolerance: float = 0.05) -> torch.Tensor:
    """2-D variable-density Poisson-disc mask (for 3-D acquisitions with two phase-encode axes),
    radius tuned by bisection to reach ``acceleration`` within ``tolerance``; the central
    ``center_fraction`` x ``center_fraction`` block is fully sampled."""
    h, w = shape
    if acceleration < 1:
        raise UserError(f"acceleration must be >= 1, got {acceleration}")
    target = h * w / acceleration
    ch, cw = max(1, int(round(h * center_fraction))), max(1, int(round(w * center_fraction)))
    center = np.zeros(shape, dtype=bool)
    center[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw] = True
    lo, hi = 0.3, float(max(h, w))
    best = None
    for _ in range(18):
        mid = 0.5 * (lo + hi)
        m = _poisson_disc(shape, mid, 1.5, 0.3, np.random.default_rng(seed)) | center
        best = m
        n = m.sum()
        if abs(n - target) <= tolerance * target:
            break
        if n > target:
            lo = mid
        else:
            hi = mid
    return torch.from_numpy(best)


def zero_filled_recon(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Magnitude of the inverse FFT of masked k-space; ``image (..., H, W)`` real, ``mask (H, W)``."""
    if mask.shape != image.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match slices {tuple(image.shape[-2:])}")
    k = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(image.to(torch.complex64), dim=(-2, -1)), norm="ortho"),
                           dim=(-2, -1))
    k = k * mask.to(k.device)
    rec = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    return rec.abs().to(image.dtype if image.is_floating_point() else torch.float32)
