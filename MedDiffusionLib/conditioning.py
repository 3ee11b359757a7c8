"""Condition encoders for ControlNet: images through the autoencoder, label maps as one-hot grids.

All hints are ``(B, K, d, h, w)`` on the latent grid and stay constant over the sampler steps.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data.volumes import hu_to_model, percentile_normalize
from .models.autoencoder import PatchVolumeAE
from .errors import UserError


@torch.no_grad()
def image_hint(ae: PatchVolumeAE, image: torch.Tensor, patch_batch: int | None = None) -> torch.Tensor:
    """Image condition in model units ``(B, 1, D, H, W)`` -> normalised latent ``(B, 8, D/f, H/f, W/f)``
    (patch-wise encoding, as training latents are made; the authors' first ControlNet design)."""
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"image condition must be (B, 1, D, H, W), got {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise UserError("the condition volume contains NaN or infinite values")
    return ae.normalize_latent(ae.patch_encode(image, batch=patch_batch))


def one_hot_labels(labels: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """Label map ``(B, D, H, W)`` -> ``(B, K, D, H, W)`` float one-hot over ``values`` (channel k is
    ``labels == values[k]``). Values outside ``values`` raise."""
    values = [int(v) for v in values]
    present = torch.unique(labels).tolist()
    unknown = sorted(set(int(v) for v in present) - set(values))
    if unknown:
        raise UserError(f"label values {unknown} were not in the training labels {values}")
    return torch.stack([(labels == v) for v in values], dim=1).float()


def label_hint(labels: torch.Tensor, values: Sequence[int], latent_shape: Sequence[int],
               mode: str = "nearest") -> torch.Tensor:
    """Label map ``(B, D, H, W)`` -> hint ``(B, K, d, h, w)`` on the latent grid.

    ``nearest`` is the authors' ``cldm_new`` rule (nearest down-sampling); ``area`` keeps the
    fraction of each label per latent voxel, so small structures (a nodule) survive."""
    if labels.dim() != 4:
        raise ValueError(f"label map must be (B, D, H, W), got {tuple(labels.shape)}")
    oh = one_hot_labels(labels, values)
    if mode == "nearest":
        return F.interpolate(oh, size=tuple(latent_shape), mode="nearest")
    if mode == "area":
        return F.adaptive_avg_pool3d(oh, tuple(latent_shape))
    raise ValueError(f"unknown label hint mode {mode!r}; use nearest or area")


def make_hint(ae, hint_meta: dict[str, Any], work: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Working-grid condition ``(D, H, W)`` -> hint ``(1, K, d, h, w)`` following a ControlNet's
    recorded recipe: label values (one-hot on the latent grid) or an image (HU window or
    percentile normalisation, then the autoencoder)."""
    if hint_meta["type"] == "labels":
        latent_shape = [s // ae.compression for s in work.shape]
        return label_hint(work[None].long(), hint_meta["values"], latent_shape,
                          hint_meta.get("mode", "nearest")).to(device)
    if hint_meta.get("normalize") == "hu_window":
        lo, hi = hint_meta.get("hu_window", (-1000.0, 1000.0))
        img = torch.from_numpy(hu_to_model(work.numpy(), lo, hi))
    else:
        img = torch.from_numpy(percentile_normalize(work.numpy())[0])
    return image_hint(ae, img[None, None].to(device))
