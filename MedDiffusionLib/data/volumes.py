"""Volume I/O with explicit geometry.

In memory a :class:`Volume` is a numpy array indexed ``(i, j, k)`` (NIfTI voxel order) plus a
4x4 voxel->RAS affine in millimetres. The network sees ``(D, H, W) = (k, i, j)``, the official
convention (``to_network`` / ``from_network``). Generated volumes get the official writer's
geometry: a positive diagonal affine of the spacings (i -> R, j -> A, k -> S) with origin 0.
NIfTI is written with nibabel (RAS), NRRD and other ITK formats with SimpleITK (LPS on disk).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Volume:
    """``array`` indexed (i, j, k); ``affine`` maps (i, j, k, 1) to RAS millimetres."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])

    def to_network(self) -> np.ndarray:
        """Array in network order ``(D, H, W) = (k, i, j)``."""
        return np.ascontiguousarray(np.transpose(self.array, (2, 0, 1)))

    @classmethod
    def from_network(cls, dhw: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                     affine: np.ndarray | None = None) -> "Volume":
        """Network-order array ``(D, H, W)`` -> volume; default geometry is the official
        writer's ``diag(spacing_i, spacing_j, spacing_k)`` with origin 0."""
        arr = np.ascontiguousarray(np.transpose(dhw, (1, 2, 0)))
        if affine is None:
            affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
        return cls(arr, np.asarray(affine, dtype=np.float64))

    def canonical(self) -> "Volume":
        """Same image with axes permuted/flipped so i -> R, j -> A, k -> S (closest canonical)."""
        return self.canonical_with_orientation()[0]

    def canonical_with_orientation(self) -> tuple["Volume", np.ndarray]:
        """Canonical volume and the nibabel orientation that produced it (for :meth:`restore`)."""
        import nibabel as nib

        ornt = nib.orientations.io_orientation(self.affine)
        arr = nib.orientations.apply_orientation(self.array, ornt)
        aff = self.affine @ nib.orientations.inv_ornt_aff(ornt, self.array.shape)
        return Volume(np.ascontiguousarray(arr), aff), ornt

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxel values."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"array {array.shape} does not fit the grid {self.array.shape}")
        return Volume(array, self.affine.copy())

    @staticmethod
    def restore(canonical_array: np.ndarray, ornt: np.ndarray, original: "Volume") -> "Volume":
        """Put an array computed on the canonical grid back on ``original``'s grid."""
        import nibabel as nib

        return original.with_array(np.ascontiguousarray(nib.orientations.apply_orientation(canonical_array, _inverse_ornt(ornt))))


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    inv = np.empty_like(ornt)
    for in_ax, (out_ax, flip) in enumerate(ornt):
        inv[int(out_ax)] = (in_ax, flip)
    return inv


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    raise UserError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def read_volume(path: str | Path) -> Volume:
    """Read NIfTI/NRRD/MHA with SimpleITK; returns (i, j, k) array and RAS affine."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    _suffix(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:  # SimpleITK's reader reports every unreadable file this way
        reason = next((ln.strip() for ln in str(err).splitlines() if "ERROR" in ln or "Could not" in ln), "")
        raise UserError(f"{path}: not a readable volume{f' ({reason[:160]})' if reason else ''}; MedDiffusion "
                        f"reads {', '.join(SUFFIXES)} images") from err
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: expected a single-channel 3-D image, got {img.GetDimension()}-D with "
                         f"{img.GetNumberOfComponentsPerPixel()} component(s)")
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing())[None, :]
    lps[:3, 3] = img.GetOrigin()
    return Volume(arr, LPS_TO_RAS @ lps)


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    """Validate an output path before any long computation."""
    path = Path(path)
    _suffix(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (use --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise FileNotFoundError(f"{path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{path}: folder {parent} is not writable")
    return path


def write_volume(vol: Volume, path: str | Path, overwrite: bool = False) -> Path:
    """Write atomically (:func:`MedDiffusionLib.io.atomic.atomic_path`): a temporary file in the
    same folder, renamed when complete; a full disk raises ResourceError and leaves nothing."""
    from ..io.atomic import atomic_path

    path = check_writable(path, overwrite)
    suffix = _suffix(path)
    with atomic_path(path) as tmp:
        if suffix in (".nii.gz", ".nii"):
            import nibabel as nib

            img = nib.Nifti1Image(np.asarray(vol.array), vol.affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(vol.affine, code=1)
            img.set_sform(vol.affine, code=1)
            nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            lps = LPS_TO_RAS @ vol.affine
            spacing = np.linalg.norm(lps[:3, :3], axis=0)
            img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol.array, (2, 1, 0))))
            img.SetSpacing([float(s) for s in spacing])
            img.SetDirection([float(v) for v in (lps[:3, :3] / spacing[None, :]).reshape(-1)])
            img.SetOrigin([float(v) for v in lps[:3, 3]])
            sitk.WriteImage(img, str(tmp), useCompression=True)
    return path


# -- intensities ------------------------------------------------------------------------------------
def percentile_normalize(arr: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[np.ndarray, float, float]:
    """Per-volume min-max to [-1, 1] between the given percentiles (the paper's normalisation).
    Returns the array and the (lo, hi) intensities used."""
    lo, hi = np.percentile(arr, [low, high])
    if hi <= lo:
        raise UserError("volume has no intensity range between its 0.5th and 99.5th percentiles (constant image?)")
    out = (np.clip(arr, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    return out.astype(np.float32), float(lo), float(hi)


def check_finite(vol: Volume | np.ndarray, name: str = "the volume") -> None:
    """A :class:`UserError` naming how many voxels are NaN or infinite, if any."""
    arr = np.asarray(vol.array if isinstance(vol, Volume) else vol)
    if not np.issubdtype(arr.dtype, np.floating):
        return
    finite = np.isfinite(arr)
    if not finite.all():
        nan, inf = int(np.isnan(arr).sum()), int((~finite).sum() - np.isnan(arr).sum())
        what = " and ".join(t for t in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if t)
        raise UserError(f"{name} has {what} voxel(s) out of {arr.size}; fill or mask them (e.g. with -1000 HU "
                        "for air) before running")


def check_ct_intensities(vol: Volume | np.ndarray) -> str | None:
    """A warning text when the intensities do not look like CT in Hounsfield units, else ``None``.

    CT in HU has air near -1000 and soft tissue near 0..100: its 1st percentile lies below -500 and
    its values span more than 500 HU. An 8-bit MR (0..255), a normalised image (0..1 or -1..1) or
    any non-negative volume fails this."""
    arr = np.asarray(vol.array if isinstance(vol, Volume) else vol)
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr.ravel()
    if finite.size == 0:
        return "the volume has no finite voxel; it cannot be CT in Hounsfield units"
    lo, hi = (float(v) for v in np.percentile(finite, [1, 99]))
    if lo < -500 and hi - lo > 500:
        return None
    return (f"the input does not look like CT in Hounsfield units (1st-99th percentile {lo:g} to {hi:g}, "
            f"dtype {arr.dtype}; CT air is about -1000 HU): it is treated as HU anyway")


def model_to_hu(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Our convention (not the authors'): ``HU = lo + (clamp(v, -1, 1) + 1) / 2 * (hi - lo)``."""
    return (lo + (np.clip(arr, -1.0, 1.0) + 1.0) * 0.5 * (hi - lo)).astype(np.float32)


def hu_to_model(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Inverse of :func:`model_to_hu` (values outside [lo, hi] are clipped)."""
    return ((np.clip(arr, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32)
