"""3-D image quality: PSNR and SSIM in a HU window (the paper uses [-1000, 1000] for CT), Dice."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _windowed(x: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    lo, hi = window
    return ((x.float().clamp(lo, hi) - lo) / (hi - lo))


def psnr(pred: torch.Tensor, target: torch.Tensor, window: tuple[float, float] = (-1000.0, 1000.0)) -> float:
    """PSNR (dB) of two volumes after clipping to ``window`` and scaling it to [0, 1]."""
    mse = F.mse_loss(_windowed(pred, window), _windowed(target, window)).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: tuple[float, float] = (-1000.0, 1000.0),
         sigma: float = 1.5, size: int = 7) -> float:
    """Mean 3-D SSIM with a Gaussian window (``size``^3, ``sigma``) on the windowed volumes ``(D, H, W)``."""
    x = _windowed(pred, window)[None, None]
    y = _windowed(target, window)[None, None]
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g1 = torch.exp(-0.5 * (ax / sigma) ** 2)
    g1 = g1 / g1.sum()
    kernels = [g1.view(1, 1, -1, 1, 1), g1.view(1, 1, 1, -1, 1), g1.view(1, 1, 1, 1, -1)]

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, 'valid' borders
        for k in kernels:
            t = F.conv3d(t, k)
        return t

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = a.bool(), b.bool()
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)
