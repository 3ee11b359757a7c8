"""3-D image quality: PSNR, SSIM and MAE in a HU window (the paper uses [-1000, 1000] for CT), Dice
(per mask and per label value), and the linear-kernel MMD of two sets of volumes."""
from __future__ import annotations

import math
from typing import Sequence

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


def mae(pred: torch.Tensor, target: torch.Tensor, window: tuple[float, float] = (-1000.0, 1000.0)) -> float:
    """Mean absolute error in the window's units (HU) after clipping both volumes to ``window``
    (any shape, both the same)."""
    lo, hi = window
    return float((pred.double().clamp(lo, hi) - target.double().clamp(lo, hi)).abs().mean())


def dice_per_label(pred: torch.Tensor, target: torch.Tensor, labels: Sequence[int]) -> dict[int, float]:
    """Dice of ``pred == v`` against ``target == v`` for each label value ``v`` (integer maps of
    the same shape); 1.0 for a label that neither map holds."""
    return {int(v): dice(pred == v, target == v) for v in labels}


def mmd_linear(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD of two sets ``x`` ``(M, ...)`` and ``y`` ``(N, ...)`` (M, N >= 2) with the
    linear kernel ``k(a, b) = mean(a * b)`` over the voxels: the estimator of
    :class:`monai.metrics.MMDMetric` (Gretton et al. 2012, eq. 3) divided by the voxel count, for
    sets of any sizes (MONAI's needs equal sizes). Can be slightly negative (unbiased)."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least two samples in each set, got {m} and {n}")
    a = x.reshape(m, -1).double()
    b = y.reshape(n, -1).double()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"MMD needs samples of one size, got {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")
    xx, yy, xy = a @ a.T, b @ b.T, a @ b.T
    term_x = (xx.sum() - xx.diagonal().sum()) / (m * (m - 1))
    term_y = (yy.sum() - yy.diagonal().sum()) / (n * (n - 1))
    return float((term_x + term_y - 2 * xy.sum() / (m * n)) / a.shape[1])
