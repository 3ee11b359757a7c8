"""Fréchet Radiomics Distance (FRD, Konz, Osuala et al. 2026) with ``frd_score`` and pyradiomics.

We follow ``frd_score`` 1.0.1's FRDv1 pipeline for 3-D images (``frd_score.compute_frd(...,
frd_version="v1")``) step by step, with its own building blocks: the extractor of its 3-D YAML
configuration (``get_feature_extractor``: images resampled to 2 mm isotropic voxels with a B-spline,
per-image intensity normalisation, bin width 5; first-order, GLCM, GLRLM, GLSZM and NGTDM features
of the original image and, in the ``"paper"`` configuration, of LoG (sigma 2-5 mm) and wavelet
images), the features it keeps (every non-diagnostic feature plus the numeric diagnostics), then
rows with NaN dropped, float32, z-scores against the *real* set (frd's ``norm_ref="d1"``, its
``z_score_normalize``), columns with NaN or infinity dropped, and ``log`` of its
``calculate_frechet_distance``. The result equals ``compute_frd([real_files, generated_files])``.

What we do differently: the volumes are ours (read with
:func:`~MedDiffusionLib.data.volumes.read_volume`, which checks every header before ITK reads the
file) and go to pyradiomics in memory, in this process; ``compute_frd`` would read the files again
with an unchecked ``SimpleITK.ReadImage`` and extract in a process pool. The mask is the whole
volume (frd's choice without masks: every voxel but one corner voxel, a pyradiomics workaround);
so air around the body counts, and volumes with different fields of view differ for that reason
alone. Compare sets that cover the same anatomy.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..data.volumes import Volume
from ..errors import UserError

FRD_FEATURES = {"paper": None, "original": ["Original"]}  # pyradiomics image types (None: frd v1's own)


def radiomics_extractor(features: str = "paper"):
    """frd_score's FRDv1 3-D extractor; ``features``: ``"paper"`` (original + LoG + wavelet
    images, about 1000 features) or ``"original"`` (original image only, 77 features, ~15x faster)."""
    if features not in FRD_FEATURES:
        raise UserError(f"FRD features {features!r}: use one of {', '.join(FRD_FEATURES)}")
    import logging

    from .deps import require

    frd = require("frd_score.frd", "FRD")
    require("radiomics.featureextractor", "FRD")
    frd._ensure_radiomics()
    frd.setVerbosity(60)  # pyradiomics logs only errors (as compute_frd does when not verbose)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    return frd.get_feature_extractor(frd_version="v1", image_dim=3, image_types=FRD_FEATURES[features])


def radiomics_features(vol: Volume, extractor: Any) -> dict[str, float]:
    """The features frd v1 keeps for one volume (whole-volume mask), in pyradiomics' order."""
    import SimpleITK as sitk

    from .paired import to_sitk

    img = to_sitk(vol, np.float32)
    mask = np.ones(img.GetSize()[::-1], np.uint8)
    mask[0, 0, 0] = 0  # frd's workaround for a pyradiomics bug with all-ones masks
    sm = sitk.GetImageFromArray(mask)
    sm.CopyInformation(img)
    out = extractor.execute(img, sm)
    feats: dict[str, float] = {}
    for name, value in out.items():
        if "diagnostics" not in name:
            feats[name.replace("original_", "")] = float(value)
        else:
            try:
                feats[name] = float(value)
            except (TypeError, ValueError):
                pass  # text diagnostics (versions, hashes)
    return feats


def feature_matrix(rows: Sequence[dict[str, float]]) -> tuple[np.ndarray, list[str]]:
    """``(N, F)`` matrix of feature dicts that share their names (one extractor)."""
    names = list(rows[0])
    if any(list(r) != names for r in rows):
        raise ValueError("radiomics features of one set must come from one extractor")
    return np.array([[r[n] for n in names] for r in rows], dtype=np.float64), names


def frd_from_features(real: np.ndarray, generated: np.ndarray) -> tuple[float, dict[str, Any]]:
    """FRDv1 (``log`` of the squared Fréchet distance) of feature matrices ``(N, F)`` and ``(M, F)``,
    normalised against ``real``; and what was kept (images, features)."""
    from .deps import require

    frd = require("frd_score.frd", "FRD")

    sets = []
    for feats in (real, generated):
        feats = np.asarray(feats, dtype=np.float64)
        sets.append(feats[~np.isnan(feats).any(axis=1)].astype(np.float32))
    if min(len(s) for s in sets) < 2:
        raise UserError("FRD needs at least two volumes with finite radiomics features in each set")
    normed = [frd.z_score_normalize(s, new_min=0.0, new_max=1.0, base_distribution=sets[0], replace_nan=False,
                                    handle_std_zero=False) for s in sets]
    keep = np.ones(normed[0].shape[1], dtype=bool)
    for n in normed:
        keep &= ~(np.isnan(n).any(axis=0) | np.isinf(n).any(axis=0))
    if not keep.any():
        raise UserError("FRD: no radiomics feature varies within the real set (are its volumes identical?)")
    normed = [n[:, keep] for n in normed]
    d2 = float(frd.calculate_frechet_distance(normed[0].mean(axis=0), np.cov(normed[0], rowvar=False),
                                              normed[1].mean(axis=0), np.cov(normed[1], rowvar=False)))
    value = math.log(d2) if d2 > 0 else float("-inf")
    return value, {"volumes": [len(s) for s in sets], "features": int(keep.sum()), "frechet_squared": d2}


__all__ = ["FRD_FEATURES", "radiomics_extractor", "radiomics_features", "feature_matrix", "frd_from_features"]
