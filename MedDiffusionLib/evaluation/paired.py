"""Paired evaluation: a prediction against its reference on one grid.

Images (CT in HU): PSNR, SSIM and MAE within named HU windows; both volumes are clipped to the
window first (PSNR and SSIM also scale it to [0, 1]; MAE stays in HU), with the implementations of
:mod:`MedDiffusionLib.metrics` (SSIM: Gaussian window 7, sigma 1.5, valid borders). Label maps:
Dice per label value (0 is background and left out) and their mean over every label that either
map holds (a label only the prediction has scores 0).

Volumes are :class:`~MedDiffusionLib.data.volumes.Volume` s: arrays indexed (i, j, k) with a
voxel->RAS affine. Two volumes are on the same grid when their shapes are equal and their affines
agree within :data:`GRID_TOLERANCE` of a voxel. Otherwise the evaluation stops with one line naming
both grids, unless ``resample=True``: then the prediction is resampled onto the reference grid with
SimpleITK (linear for images, nearest neighbour for labels; voxels outside the prediction's field of
view get -1000 HU or label 0, and the report's context says which fraction of the reference grid
the prediction covered).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from ..data.volumes import Volume, check_ct_intensities, check_finite, set_sitk_grid
from ..errors import Cancelled, UserError
from .report import EvaluationReport

PAPER_WINDOW = (-1000.0, 1000.0)
# named HU windows (lo, hi): the paper's, and the usual soft-tissue (W400/L40), lung (W1500/L-600)
# and bone (W1800/L400) display windows
STANDARD_WINDOWS: dict[str, tuple[float, float]] = {
    "paper": PAPER_WINDOW,
    "soft_tissue": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-500.0, 1300.0),
}
GRID_TOLERANCE = 1e-3  # affines within this fraction of the smallest voxel side count as one grid
SSIM_WINDOW = 7  # voxels per side of metrics.ssim's Gaussian window (valid borders)
MAX_LABELS = 255  # distinct non-zero values a label map may hold (more: it is an image, not labels)
OUTSIDE_HU = -1000.0  # value of reference voxels the resampled prediction does not cover (air)
MAX_VOLUME_VOXELS = 512 ** 3  # voxels of one volume read for an evaluation (read_volume's max_voxels)


# -- grids ------------------------------------------------------------------------------------------
def _fmt(values: Any, digits: int = 4) -> str:
    return "x".join(f"{float(v):.{digits}g}" for v in values)


def describe_grid(vol: Volume, detail: bool = False) -> str:
    """``"64x64x64 voxels, spacing 4.8x4.8x4.3 mm"`` (``detail``: also origin and axis directions)."""
    text = f"{'x'.join(map(str, vol.shape))} voxels, spacing {_fmt(vol.spacing)} mm"
    if detail:
        dirs = vol.affine[:3, :3] / np.asarray(vol.spacing)[None, :]
        text += (f", origin ({', '.join(f'{v:.4g}' for v in vol.affine[:3, 3])}) mm, axes "
                 f"{' '.join('(' + ', '.join(f'{c:.3g}' for c in dirs[:, i]) + ')' for i in range(3))}")
    return text


def grid_of(vol: Volume) -> dict[str, Any]:
    """The grid as plain values (for a report): shape (i, j, k), spacing mm, RAS affine."""
    return {"shape": list(vol.shape), "spacing": [round(s, 6) for s in vol.spacing],
            "affine": np.round(vol.affine, 6).tolist()}


def same_grid(a: Volume, b: Volume, tolerance: float = GRID_TOLERANCE) -> bool:
    """Equal shapes, and affines within ``tolerance`` of the smallest voxel side (spacing, origin, axes)."""
    if a.shape != b.shape:
        return False
    tol = tolerance * min(min(a.spacing), min(b.spacing))
    return bool(np.allclose(a.affine[:3, :4], b.affine[:3, :4], rtol=0.0, atol=tol))


def _set_geometry(img, vol: Volume):
    """Give a SimpleITK image ``vol``'s grid (:func:`~MedDiffusionLib.data.volumes.set_sitk_grid`)."""
    try:
        set_sitk_grid(img, vol)
    except RuntimeError as err:  # ITK wants orthonormal axes
        raise UserError(f"cannot resample a volume whose axes are not orthogonal ({describe_grid(vol, True)})") from err
    return img


def to_sitk(vol: Volume, dtype: Any = np.float32):
    """A SimpleITK image of ``vol`` with pixels of ``dtype`` (LPS geometry, as ITK stores it)."""
    import SimpleITK as sitk

    arr = np.ascontiguousarray(np.transpose(np.asarray(vol.array, dtype=dtype), (2, 1, 0)))
    return _set_geometry(sitk.GetImageFromArray(arr), vol)


def resample_onto(vol: Volume, ref: Volume, labels: bool = False) -> tuple[Volume, float]:
    """``vol`` resampled onto ``ref``'s grid (SimpleITK; nearest neighbour for ``labels``, else
    linear) and the fraction of ``ref``'s voxels that lie inside ``vol``'s field of view."""
    import SimpleITK as sitk

    src = to_sitk(vol, np.int32 if labels else np.float32)
    grid = _set_geometry(sitk.Image([int(n) for n in ref.shape], sitk.sitkUInt8), ref)
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    out = sitk.Resample(src, grid, sitk.Transform(), interp, 0.0 if labels else OUTSIDE_HU,
                        sitk.sitkInt32 if labels else sitk.sitkFloat32)
    ones = sitk.Image(src.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(src)
    inside = sitk.Resample(ones, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    arr = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    cover = float(sitk.GetArrayViewFromImage(inside).mean())
    return Volume(np.ascontiguousarray(arr), ref.affine.copy()), cover


# -- inputs -----------------------------------------------------------------------------------------
def check_windows(windows: Mapping[str, Any] | None) -> dict[str, tuple[float, float]]:
    """Named HU windows ``{name: (lo, hi)}`` (default :data:`STANDARD_WINDOWS`), checked."""
    if windows is None:
        return dict(STANDARD_WINDOWS)
    if not isinstance(windows, Mapping) or not windows:
        raise UserError("windows must name at least one HU window, e.g. {'paper': (-1000, 1000)}")
    out = {}
    for name, bounds in windows.items():
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "\r\n,/"):
            raise UserError(f"window name {name!r}: use a short name without commas, slashes or line breaks")
        try:
            lo, hi = (float(v) for v in bounds)
        except (TypeError, ValueError):
            raise UserError(f"window {name}: give two numbers LO HI in HU, got {bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise UserError(f"window {name}: LO must be below HI (finite HU values), got {lo:g} {hi:g}")
        out[name.strip()] = (lo, hi)
    return out


def _label_array(vol: Volume, what: str) -> np.ndarray:
    """The label map as int64; one line if it cannot be one (non-integer, negative, too many values)."""
    arr = np.asarray(vol.array)
    if np.issubdtype(arr.dtype, np.floating):
        check_finite(arr, f"the {what} label map")
        if not np.array_equal(arr, np.round(arr)):
            raise UserError(f"the {what} is not a label map: it holds non-integer values (drop labels=True / "
                            "--labels to evaluate images)")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise UserError(f"the {what} is not a label map: voxel type {arr.dtype}")
    lab = arr.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise UserError(f"the {what} is not a label map: it holds negative values (min {lab.min()}); label maps "
                        "hold non-negative integers (is it a CT in HU? drop labels=True / --labels)")
    n = np.unique(lab).size - (1 if (lab == 0).any() else 0)
    if n > MAX_LABELS:
        raise UserError(f"the {what} is not a label map: it holds {n} distinct non-zero values, over {MAX_LABELS}")
    return lab


def _percentiles(vol: Volume) -> str:
    arr = np.asarray(vol.array, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    lo, hi = np.percentile(arr, [1, 99]) if arr.size else (math.nan, math.nan)
    return f"1st-99th percentile {lo:g} to {hi:g}"


# -- the evaluation ---------------------------------------------------------------------------------
def check_pair(pred: Volume, ref: Volume, *, labels: bool = False, resample: bool = False) -> None:
    """The refusals of :func:`paired_metrics` that need no metric computed (a job service runs
    them when the two uploads arrive): different grids without ``resample``, and for images a
    reference that does not look like CT in HU. One :class:`UserError` line each."""
    if not same_grid(pred, ref) and not resample:
        detail = pred.shape == ref.shape and np.allclose(pred.spacing, ref.spacing, rtol=1e-4)
        raise UserError(f"the prediction and the reference are on different grids: prediction "
                        f"{describe_grid(pred, detail)}; reference {describe_grid(ref, detail)}; pass "
                        "resample=True (--resample) to resample the prediction onto the reference grid")
    if not labels and check_ct_intensities(ref) is not None:
        raise UserError(f"the reference does not look like CT in Hounsfield units ({_percentiles(ref)}; CT air is "
                        "about -1000 HU): PSNR/SSIM/MAE in HU windows need CT (use labels=True / --labels for label maps)")


def paired_metrics(pred: Volume, ref: Volume, *, windows: Mapping[str, Any] | None = None, labels: bool = False,
                   resample: bool = False, cancel: Callable[[], bool] | None = None) -> EvaluationReport:
    """Compare ``pred`` with ``ref`` (both :class:`Volume`, arrays (i, j, k)).

    Images: rows ``psnr`` (dB), ``ssim`` and ``mae`` (HU) per window of ``windows`` (``{name:
    (lo, hi)}``, default :data:`STANDARD_WINDOWS`); the reference must look like CT in HU.
    ``labels=True``: rows ``dice`` per label value (``"label 3"``) and ``"mean"``. Different grids
    raise a :class:`UserError` unless ``resample=True`` (the prediction is resampled onto the
    reference grid; the report's context records both grids and the coverage). Keys read as
    ``report["psnr/paper"]``, ``report["dice/mean"]``. ``cancel()`` is asked between windows
    (:class:`~MedDiffusionLib.errors.Cancelled` when it turns true)."""
    import torch

    from .. import metrics

    wins = None if labels else check_windows(windows)
    if labels and windows is not None:
        raise UserError("HU windows apply to images; label maps are compared with Dice (drop the windows or labels)")
    for vol, what in ((pred, "prediction"), (ref, "reference")):
        if not isinstance(vol, Volume):
            raise UserError(f"the {what} must be a Volume (read it with read_volume), got {type(vol).__name__}")
        if np.asarray(vol.array).ndim != 3:
            raise UserError(f"the {what} must be a single-channel 3-D volume, got an array of shape "
                            f"{tuple(np.asarray(vol.array).shape)}")
        if not labels:
            check_finite(vol, f"the {what}")
    context: dict[str, Any] = {"reference_grid": grid_of(ref), "resampled": False}
    check_pair(pred, ref, labels=labels, resample=resample)

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise Cancelled("evaluation cancelled")

    if not same_grid(pred, ref):
        pred_grid = pred
        context.update(prediction_grid=grid_of(pred), resampled=True,
                       interpolation="nearest" if labels else "linear")
        if labels:
            _label_array(pred, "prediction")  # refuse a CT before resampling it as labels
        pred, cover = resample_onto(pred, ref, labels=labels)
        if cover == 0.0:
            raise UserError(f"the prediction ({describe_grid(pred_grid)}) does not overlap the reference "
                            f"({describe_grid(ref)}) anywhere in space: nothing to compare (check their origins)")
        context["coverage"] = round(cover, 6)
        if cover < 1.0:
            context["outside_value"] = 0 if labels else OUTSIDE_HU
    report = EvaluationReport("paired", context=context)
    if labels:
        p, r = _label_array(pred, "prediction"), _label_array(ref, "reference")
        values = sorted((set(np.unique(r).tolist()) | set(np.unique(p).tolist())) - {0})
        if not (r != 0).any():
            raise UserError("the reference label map holds no label other than 0 (background)")
        pt, rt = torch.from_numpy(p), torch.from_numpy(r)
        check_cancel()
        scores = metrics.dice_per_label(pt, rt, values)
        for v, d in scores.items():
            report.add("dice", f"label {v}", d, reference_voxels=int((r == v).sum()),
                       prediction_voxels=int((p == v).sum()))
        report.add("dice", "mean", float(np.mean(list(scores.values()))), labels=values)
        return report
    if min(ref.shape) < SSIM_WINDOW:
        raise UserError(f"the volumes ({'x'.join(map(str, ref.shape))} voxels) are smaller than SSIM's "
                        f"{SSIM_WINDOW}-voxel window on some side")
    pt = torch.from_numpy(np.asarray(pred.to_network(), dtype=np.float32))
    rt = torch.from_numpy(np.asarray(ref.to_network(), dtype=np.float32))
    for name, win in wins.items():
        check_cancel()
        ctx = {"window": list(win)}
        report.add("psnr", name, metrics.psnr(pt, rt, win), "dB", **ctx)
        report.add("ssim", name, metrics.ssim(pt, rt, win), "", **ctx)
        report.add("mae", name, metrics.mae(pt, rt, win), "HU", **ctx)
    return report


__all__ = ["PAPER_WINDOW", "STANDARD_WINDOWS", "GRID_TOLERANCE", "MAX_LABELS", "MAX_VOLUME_VOXELS", "paired_metrics", "check_pair", "same_grid",
           "describe_grid", "grid_of", "resample_onto", "check_windows", "to_sitk"]
