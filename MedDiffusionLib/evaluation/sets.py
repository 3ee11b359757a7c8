"""Set evaluation: a set of generated volumes against a set of real ones (no pairing).

Metrics (rows of the report):

* ``frd`` ``"generated vs real"``: Fréchet Radiomics Distance (:mod:`.radiomics`), on each volume
  as read (its own grid; pyradiomics resamples to 2 mm), whole-volume masks. Lower is closer.
* ``mmd`` ``"generated vs real"``: unbiased squared MMD with MONAI's linear kernel
  (:class:`monai.metrics.MMDMetric`, divided by the voxel count: a per-voxel value, independent
  of the grid size) on the normalised volumes of the evaluation grid. MONAI needs sets of equal
  size; for unequal sizes the same estimator comes from :func:`MedDiffusionLib.metrics.mmd_linear`.
  About 0 for sets from one distribution, can be slightly negative. Lower is closer.
* ``ms_ssim`` ``"generated"`` / ``"real"``: diversity, the mean MS-SSIM over pairs of volumes
  within each set (MONAI's ``compute_ms_ssim``, data range 1; Gaussian kernel 7, sigma 1.5 as
  :func:`MedDiffusionLib.metrics.ssim`; as many scales, up to MONAI's 5, as the grid allows: 4 at
  64^3, 3 at 32^3, with MONAI's first weights renormalised to sum 1). At most
  :data:`MAX_MS_SSIM_PAIRS` pairs per set, drawn with a fixed seed. Lower means more diverse;
  compare the generated set's value with the real set's.
* ``fd_<network>`` ``"generated vs real"`` (only with feature weights): squared Fréchet
  distance of a user-supplied 3-D feature network's features (:mod:`.features`); the weights are a
  .safetensors file or the name of weights added to the weights manager (``meddiffusion models
  features add``), checked against their recorded sha256.

The evaluation grid: each volume is put in the closest canonical orientation (i -> R, j -> A,
k -> S) and resampled over its own field of view to ``grid`` voxels (X, Y, Z), default
:data:`DEFAULT_GRID` (64^3, the bundled model's size): shapes are compared, not millimetres, as
image FIDs resize every image. Intensities: when every real volume looks like CT in HU, both sets
are clipped to the paper's window [-1000, 1000] HU and scaled to [0, 1]; otherwise (MR) each
volume is scaled between its own 0.5th and 99.5th percentiles to [0, 1].

A folder is read in name order, volumes of the formats :func:`~MedDiffusionLib.data.volumes.read_volume`
reads, at most :data:`MAX_SET_FILES` of them (the report says how many were found and used) and
each at most :data:`MAX_SET_VOXELS` voxels. Every set needs at least two volumes.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.volumes import SUFFIXES, Volume, check_ct_intensities, check_finite, read_volume
from ..errors import UserError
from .paired import MAX_VOLUME_VOXELS, PAPER_WINDOW
from .report import EvaluationReport

MAX_SET_FILES = 64  # volumes read from one folder (the first in name order)
MAX_SET_VOXELS = MAX_VOLUME_VOXELS  # voxels of one volume of a set (512^3)
MAX_MS_SSIM_PAIRS = 64  # pairs per set for the MS-SSIM diversity (a fixed-seed sample beyond that)
DEFAULT_GRID = (64, 64, 64)  # evaluation grid (X, Y, Z) = (i, j, k) after canonical orientation
MIN_GRID, MAX_GRID = 8, 256  # per side
SET_METRICS = ("frd", "mmd", "ms_ssim")
MS_SSIM_KERNEL, MS_SSIM_SIGMA = 7, 1.5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # MONAI's (Wang et al. 2003)


@dataclass
class _Set:
    """One set, prepared: its volumes on the evaluation grid (each ``(D, H, W)``, network order; HU
    until :func:`_normalise` scales them to [0, 1]), their radiomics and where they came from."""

    name: str
    grid: list[torch.Tensor] = field(default_factory=list)  # (D, H, W) float32 each
    radiomics: list[dict[str, float]] = field(default_factory=list)
    looks_ct: list[bool] = field(default_factory=list)
    found: int = 0
    source: str = ""


def list_volume_files(folder: str | Path, what: str) -> list[Path]:
    """The volume files of ``folder`` in name order (formats of ``read_volume``; hidden files left out)."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder ({what} set)")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder ({what} set); give two files for a paired evaluation, or two folders")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(SUFFIXES))
    if not files:
        raise UserError(f"{folder}: no volumes ({', '.join(SUFFIXES)}) in the {what} folder")
    return files


def check_grid(grid: Sequence[int] | None) -> tuple[int, int, int]:
    """The evaluation grid (X, Y, Z), default :data:`DEFAULT_GRID`; one line if it is not usable."""
    if grid is None:
        return DEFAULT_GRID
    try:
        g = tuple(int(v) for v in grid)
    except (TypeError, ValueError):
        raise UserError(f"grid must be three integers X Y Z, got {grid!r}") from None
    if len(g) != 3 or any(not MIN_GRID <= v <= MAX_GRID for v in g):
        raise UserError(f"grid must be three integers X Y Z between {MIN_GRID} and {MAX_GRID}, got {list(grid)}")
    return g  # type: ignore[return-value]


def to_grid(vol: Volume, grid: Sequence[int]) -> torch.Tensor:
    """``vol`` in canonical orientation, resampled over its field of view to ``grid`` (X, Y, Z);
    returned in network order ``(D, H, W) = (Z, X, Y)``, float32."""
    from ..data.grid import resample

    dhw = torch.from_numpy(np.asarray(vol.canonical().to_network(), dtype=np.float32))
    shape = (grid[2], grid[0], grid[1])
    return dhw if tuple(dhw.shape) == shape else resample(dhw, shape, "image")


def _items(source: Any, what: str, max_files: int) -> tuple[list[Any], _Set]:
    """The files (or volumes) of a set, checked before anything is read: at least two."""
    s = _Set(what)
    if isinstance(source, (str, os.PathLike)):
        files = list_volume_files(source, what)
        s.found, s.source = len(files), str(source)
        items: list[Any] = files[:max_files]
    else:
        items = list(source)
        if not items:
            raise UserError(f"the {what} set is empty")
        if any(not isinstance(v, Volume) for v in items):
            raise UserError(f"the {what} set must be a folder or a list of Volumes")
        s.found, s.source = len(items), f"{len(items)} volumes in memory"
        items = items[:max_files]
    if len(items) < 2:
        raise UserError(f"the {what} set ({s.source}) holds {len(items)} volume; set metrics need at least two")
    return items, s


def _load(items: list[Any], s: _Set, grid: Sequence[int], extractor: Any) -> _Set:
    """Read a set one volume at a time: radiomics (when ``extractor``), CT check, evaluation-grid
    copy; nothing else of a volume is kept."""
    from .radiomics import radiomics_features

    for item in items:
        vol = item if isinstance(item, Volume) else read_volume(item, max_voxels=MAX_SET_VOXELS)
        label = str(item) if not isinstance(item, Volume) else f"a volume of the {s.name} set"
        if np.asarray(vol.array).ndim != 3:
            raise UserError(f"{label}: not a single-channel 3-D volume (array {tuple(np.asarray(vol.array).shape)})")
        check_finite(vol, label)
        s.looks_ct.append(check_ct_intensities(vol) is None)
        if extractor is not None:
            s.radiomics.append(radiomics_features(vol, extractor))
        s.grid.append(to_grid(vol, grid))
    return s


def _normalise(sets: Sequence[_Set], ct: bool) -> None:
    """To [0, 1] in place: the paper's HU window (``ct``) or each volume's 0.5-99.5th percentiles."""
    for s in sets:
        for i, t in enumerate(s.grid):
            if ct:
                lo, hi = PAPER_WINDOW
            else:
                lo, hi = (float(v) for v in torch.quantile(t.flatten()[:: max(1, t.numel() // 2_000_000)],
                                                           torch.tensor([0.005, 0.995])))
                hi = hi if hi > lo else lo + 1.0
            s.grid[i] = ((t.clamp(lo, hi) - lo) / (hi - lo)).float()


def ms_ssim_scales(grid: Sequence[int], kernel: int = MS_SSIM_KERNEL) -> int:
    """Scales of MS-SSIM that fit ``grid``: the most (up to 5) for which MONAI's size check passes
    and the coarsest scale still holds one kernel."""
    side = min(grid)
    best = 0
    for n in range(1, len(MS_SSIM_WEIGHTS) + 1):
        if side // max(1, n - 1) ** 2 > kernel - 1 and side >> (n - 1) >= kernel:
            best = n
    if best == 0:
        raise UserError(f"the evaluation grid {'x'.join(map(str, grid))} is too small for MS-SSIM's {kernel}-voxel "
                        "window; use a larger grid")
    return best


def ms_ssim_diversity(vols: Sequence[torch.Tensor], scales: int, max_pairs: int = MAX_MS_SSIM_PAIRS,
                      batch: int = 8) -> tuple[float, int]:
    """Mean MS-SSIM (MONAI) over pairs of ``vols`` (each ``(D, H, W)`` in [0, 1]) and the number of
    pairs; beyond ``max_pairs`` pairs a sample drawn with seed 0."""
    from .deps import require

    compute_ms_ssim = require("monai.metrics.regression", "MS-SSIM").compute_ms_ssim

    pairs = list(itertools.combinations(range(len(vols)), 2))
    if len(pairs) > max_pairs:
        pick = np.random.default_rng(0).choice(len(pairs), size=max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(pick)]
    w = MS_SSIM_WEIGHTS[:scales]
    w = tuple(float(v) / sum(w) for v in w)
    values = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        a = torch.stack([vols[p] for p, _ in chunk])[:, None]
        b = torch.stack([vols[q] for _, q in chunk])[:, None]
        v = compute_ms_ssim(a, b, spatial_dims=3, data_range=1.0, kernel_size=MS_SSIM_KERNEL,
                            kernel_sigma=MS_SSIM_SIGMA, weights=w)
        values.append(v.reshape(-1).double())
    return float(torch.cat(values).mean()), len(pairs)


def mmd(real: torch.Tensor, generated: torch.Tensor) -> tuple[float, str]:
    """Per-voxel unbiased squared MMD, linear kernel, of ``(N, 1, D, H, W)`` and ``(M, 1, D, H, W)``;
    MONAI's :class:`MMDMetric` for equal sizes, else :func:`metrics.mmd_linear` (same estimator)."""
    from .. import metrics

    n_vox = real[0].numel()
    if real.shape[0] == generated.shape[0]:
        from .deps import require

        MMDMetric = require("monai.metrics", "MMD").MMDMetric  # noqa: N806
        scale = 1.0 / math.sqrt(n_vox)
        value = MMDMetric(y_mapping=lambda t: t.double() * scale)(real, generated)
        return float(value), "monai.metrics.MMDMetric (linear kernel) / voxels"
    return metrics.mmd_linear(real, generated), "MedDiffusionLib.metrics.mmd_linear (MONAI's estimator, unequal sizes)"


def set_metrics(generated: Any, real: Any, *, metrics: Sequence[str] = SET_METRICS, feature_network: str | None = None,
                feature_weights: str | Path | None = None, grid: Sequence[int] | None = None,
                frd_features: str = "paper", max_files: int = MAX_SET_FILES) -> EvaluationReport:
    """Compare a set of ``generated`` volumes with a set of ``real`` ones (each a folder or a
    sequence of :class:`Volume`): ``metrics`` of :data:`SET_METRICS`, plus ``fd_<feature_network>``
    when a registered network and its ``feature_weights`` are given: a .safetensors file, or the
    name of weights added with :func:`~.features.add_feature_weights` (``meddiffusion models
    features add``; their network is recorded, so ``feature_network`` may then be left out, and
    their sha256 is checked before they are loaded). ``grid``:
    evaluation grid (X, Y, Z) for MMD, MS-SSIM and the feature network; ``frd_features``:
    ``"paper"`` or ``"original"`` (:mod:`.radiomics`). Keys read as ``report["frd/generated vs real"]``,
    ``report["ms_ssim/generated"]``."""
    from ..weights import sha256_file
    from .features import (extract_features, feature_statistics, frechet_distance, load_feature_network,
                           resolve_feature_weights)

    chosen = list(dict.fromkeys(metrics))
    bad = [m for m in chosen if m not in SET_METRICS]
    if bad:
        raise UserError(f"unknown set metric(s) {', '.join(map(str, bad))}; use {', '.join(SET_METRICS)}")
    weights_record = None
    if feature_weights is not None:  # a name added to the weights manager: its network, file and sha256 check
        feature_network, feature_weights, weights_record = resolve_feature_weights(feature_weights, feature_network)
    if not chosen and feature_network is None:
        raise UserError("no set metric chosen")
    if not (isinstance(max_files, int) and 2 <= max_files <= MAX_SET_FILES):
        raise UserError(f"max_files must be between 2 and {MAX_SET_FILES}, got {max_files!r}")
    if feature_weights is not None and feature_network is None:
        raise UserError(f"feature weights {feature_weights} were given without a feature network (--feature-network "
                        "NAME); only weights added with `meddiffusion models features add` know theirs")
    g = check_grid(grid)
    scales = ms_ssim_scales(g) if "ms_ssim" in chosen else 0
    real_items, real_set = _items(real, "real", max_files)
    gen_items, gen_set = _items(generated, "generated", max_files)
    net = load_feature_network(feature_network, feature_weights) if feature_network is not None else None
    if "ms_ssim" in chosen or "mmd" in chosen:
        from .deps import require

        require("monai.metrics", "MMD and MS-SSIM")  # before any volume is read
    extractor = None
    if "frd" in chosen:
        from .radiomics import radiomics_extractor

        extractor = radiomics_extractor(frd_features)
    _load(real_items, real_set, g, extractor)
    _load(gen_items, gen_set, g, extractor)
    ct = all(real_set.looks_ct)
    _normalise((real_set, gen_set), ct)
    warnings = []
    if ct and not all(gen_set.looks_ct):
        warnings.append(f"{gen_set.looks_ct.count(False)} generated volume(s) do not look like CT in HU while the "
                        "real set does (compared in the HU window anyway)")
    for s in (real_set, gen_set):
        if s.found > len(s.grid):
            warnings.append(f"the {s.name} set: used the first {len(s.grid)} of {s.found} volumes (limit {max_files})")
    context: dict[str, Any] = {
        "generated": {"source": gen_set.source, "found": gen_set.found, "used": len(gen_set.grid)},
        "real": {"source": real_set.source, "found": real_set.found, "used": len(real_set.grid)},
        "grid_xyz": list(g),
        "intensity": f"HU window {list(PAPER_WINDOW)} -> [0, 1]" if ct else "per-volume 0.5-99.5th percentiles -> [0, 1]",
    }
    if warnings:
        context["warnings"] = warnings
    report = EvaluationReport("sets", context=context)
    vs = "generated vs real"
    real_t = torch.stack(real_set.grid)[:, None]
    gen_t = torch.stack(gen_set.grid)[:, None]
    if "frd" in chosen:
        from .radiomics import feature_matrix, frd_from_features

        fr, names = feature_matrix(real_set.radiomics)
        fg, names_g = feature_matrix(gen_set.radiomics)
        if names != names_g:
            raise ValueError("radiomics of the two sets differ in their feature names (one extractor made both)")
        value, info = frd_from_features(fr, fg)
        report.add("frd", vs, value, "log d^2", version="frd_score v1", features_config=frd_features,
                   mask="whole volume", **info)
    if "mmd" in chosen:
        value, how = mmd(real_t, gen_t)
        report.add("mmd", vs, value, "", kernel="linear, per voxel, unbiased", implementation=how)
    if "ms_ssim" in chosen:
        for s in (gen_set, real_set):
            value, n = ms_ssim_diversity(s.grid, scales)
            report.add("ms_ssim", s.name, value, "", pairs=n, scales=scales, kernel=MS_SSIM_KERNEL,
                       sigma=MS_SSIM_SIGMA)
    if net is not None:
        fr_, fg_ = extract_features(net, real_t), extract_features(net, gen_t)
        d = frechet_distance(*feature_statistics(fr_), *feature_statistics(fg_))
        named = {"weights_name": weights_record["name"]} if weights_record else {}
        report.add(f"fd_{feature_network}", vs, d, "", features=int(fr_.shape[1]), weights=str(feature_weights),
                   weights_sha256=weights_record["sha256"] if weights_record else sha256_file(Path(feature_weights)),
                   **named)
    return report


__all__ = ["MAX_SET_FILES", "MAX_SET_VOXELS", "MAX_MS_SSIM_PAIRS", "DEFAULT_GRID", "SET_METRICS", "set_metrics",
           "list_volume_files", "check_grid", "to_grid", "ms_ssim_scales", "ms_ssim_diversity", "mmd"]
