"""DICOM export of synthetic volumes: one single-frame CT or MR Image Storage file per slice.

Every file says it is synthetic, in the ways a DICOM reader or PACS shows or can query:

* ``ImageType`` ``DERIVED\\SECONDARY\\<AXIAL|OTHER>\\SYNTHETIC`` (value 3 is ``AXIAL`` for CT, as the CT
  Image module requires for a cross-sectional image, ``OTHER`` for MR);
* ``DerivationDescription``, ``ImageComments``, ``SeriesDescription`` and ``StudyDescription``
  start with ``SYNTHETIC`` and name the generator and the model (no ``DerivationCodeSequence``: no
  standard code means "synthesised by a generative model", and a made-up one would mislead);
* ``Manufacturer`` is the generator, ``ManufacturerModelName`` the model, ``SoftwareVersions`` the
  generator and torch versions; ``BurnedInAnnotation`` ``NO``;
* the whole provenance (:mod:`MedDiffusionLib.provenance`) as JSON (ASCII) in a private block: group
  :data:`PRIVATE_GROUP`, creator :data:`PRIVATE_CREATOR`, element offset :data:`PROVENANCE_OFFSET`,
  VR ``UT`` (up to 2**32-2 bytes; the JSON is capped at ``MAX_PROVENANCE_BYTES``).

Identity: nothing is copied from any input. ``PatientName`` is ``SYNTHETIC^MedDiffusion``,
``PatientID`` a random ``SYN-`` + 16 hex digits new to each export (many archives refuse an empty
one), the other patient and study identifiers are present but empty (type 2). Study, series,
frame-of-reference and SOP instance UIDs are new (:func:`pydicom.uid.generate_uid`).

Geometry: a :class:`~MedDiffusionLib.data.volumes.Volume` maps ``(i, j, k)`` to RAS; DICOM patient
coordinates are LPS, so the LPS affine is ``diag(-1, -1, 1) @ affine``. Slice ``k`` is a file whose
column index is ``i`` and row index ``j`` (as ITK reads it back: x = i, y = j):
``ImageOrientationPatient`` is the unit LPS direction of ``i`` then of ``j``, ``PixelSpacing`` is
``[spacing_j, spacing_i]`` (row spacing first), ``ImagePositionPatient`` the LPS centre of voxel
``(0, 0, k)``. The grid's axes must be orthogonal (DICOM slices cannot be sheared). Readers sort
slices along the normal ``row x column``; ``InstanceNumber`` counts in that order. When the grid is
left-handed in LPS (the slice axis points against that normal), the files are the same but a reader
gives the slice axis reversed: the same voxels in the same places, ``k`` counted the other way.

Pixels: signed 16-bit with ``RescaleSlope``/``RescaleIntercept``. Integer values that span at most
65535 are stored exactly (slope 1; intercept 0 when they fit int16, so HU round-trip bit for bit);
anything else (model units [-1, 1], non-integer HU) gets a slope of about range/64000 and a
round-trip error of at most half of it. ``RescaleType`` is ``HU`` for HU, ``US`` (unspecified) else.

Writing is atomic: the files go into a temporary sibling folder that is renamed into place when
complete. Reading uses SimpleITK's GDCM series reader with bounded file and voxel counts.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..data.volumes import LPS_TO_RAS, Volume, itk_reason, volume_from_sitk
from ..errors import ResourceError, UserError

MAX_SLICES = 4096  # slices (files) one series may have, written or read
MAX_PIXELS_PER_SIDE = 65535  # Rows and Columns are US (16-bit)
SPARE_ENTRIES = 16  # entries a folder read may hold beyond MAX_SLICES (DICOMDIR, notes)
DEFAULT_MAX_VOXELS = 1 << 30  # read_dicom_series refuses more unless told otherwise
PRIVATE_GROUP = 0x0011  # odd group: private
PRIVATE_CREATOR = "MedDiffusion"
PROVENANCE_OFFSET = 0x00  # element (0011,xx00) in the creator's block
FILE_PATTERN = "IM{:05d}.dcm"
ORTHOGONAL_TOLERANCE = 1e-4  # |cos| between grid axes that still counts as orthogonal
_STEPS = 32000  # half the int16 codes used when a slope is needed (margin below 32767)
_LO_CHARS = 64  # LO / SH value lengths
_MR = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
_CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


# -- checks ------------------------------------------------------------------------------------------
def _check_volume(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The array and the LPS affine of ``vol``, or a :class:`UserError` saying why it cannot be a series."""
    if not isinstance(vol, Volume):
        raise UserError(f"DICOM export: expected a Volume, got {type(vol).__name__}")
    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise UserError(f"DICOM export: expected a 3-D volume, got a {arr.ndim}-D array of shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool):
        raise UserError(f"DICOM export: voxels must be real numbers, not {arr.dtype}")
    ni, nj, nk = arr.shape
    if min(arr.shape) < 1:
        raise UserError(f"DICOM export: the volume is empty (shape {tuple(arr.shape)})")
    if max(ni, nj) > MAX_PIXELS_PER_SIDE:
        raise UserError(f"DICOM export: slices of {ni}x{nj} voxels are over the DICOM limit of {MAX_PIXELS_PER_SIDE}")
    if nk > MAX_SLICES:
        raise UserError(f"DICOM export: {nk} slices, over the limit of {MAX_SLICES} files per series")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            raise UserError(f"DICOM export: the volume has {int(arr.size - finite.sum())} NaN or infinite voxel(s) "
                            f"out of {arr.size}; DICOM pixels are integers, fill them first")
    affine = np.asarray(vol.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise UserError("DICOM export: the volume's affine must be a finite 4x4 matrix")
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if not (spacing > 1e-6).all():
        raise UserError(f"DICOM export: the affine gives a zero voxel spacing ({', '.join(f'{s:g}' for s in spacing)})")
    units = lps[:3, :3] / spacing[None, :]
    cos = [abs(float(units[:, a] @ units[:, b])) for a, b in ((0, 1), (0, 2), (1, 2))]
    if max(cos) > ORTHOGONAL_TOLERANCE:
        raise UserError("DICOM export: the volume's grid axes are not orthogonal (sheared affine); DICOM slices "
                        "cannot hold it; resample the volume first")
    return arr, lps


def _resolve_modality(provenance: Mapping[str, Any], modality: str | None) -> str:
    """``"CT"`` or ``"MR"``: ``modality`` if given, else the provenance's ``modality``, else CT for
    HU, else the modality the registry gives the provenance's class, else CT."""
    units = provenance.get("units")
    chosen = modality if modality is not None else provenance.get("modality")
    if chosen is None and units != "HU" and isinstance(provenance.get("class"), int):
        from ..registry import class_names

        name = class_names().get(provenance["class"], "")
        chosen = name[:2] if name[:2] in ("CT", "MR") else None
    chosen = "CT" if chosen is None else str(chosen).upper()
    if chosen not in ("CT", "MR"):
        given = modality if modality is not None else chosen
        raise UserError(f"DICOM export: modality must be CT or MR, not {str(given)[:20]!r}", field="modality")
    if chosen == "MR" and units == "HU":
        raise UserError("DICOM export: the volume is in HU (CT) but MR was asked for", field="modality")
    return chosen


def _provenance_json(provenance: Mapping[str, Any]) -> str:
    from ..provenance import MAX_PROVENANCE_BYTES

    if not isinstance(provenance, Mapping):
        raise UserError(f"DICOM export: provenance must be a mapping, not {type(provenance).__name__}")
    if "synthetic" in provenance and provenance["synthetic"] is not True:
        raise UserError("DICOM export: this writer marks volumes as synthetic; the provenance says they are not")
    try:
        text = json.dumps(dict(provenance), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise UserError(f"DICOM export: the provenance is not plain JSON ({str(err)[:120]})") from err
    if len(text) > MAX_PROVENANCE_BYTES:
        raise UserError(f"DICOM export: the provenance is {len(text)} bytes of JSON, over the limit of "
                        f"{MAX_PROVENANCE_BYTES}")
    return text


def check_series_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute target folder; refuses a file or link there, a missing or read-only parent, an
    existing non-empty folder unless ``overwrite``, and (even then) one that holds anything but
    ``*.dcm`` files (a previous export), so that ``overwrite`` never deletes unrelated data."""
    path = Path(os.path.abspath(os.fspath(folder)))
    if not path.name or path.name in (".", ".."):
        raise UserError(f"{folder}: give the name of a folder to create")
    if path.is_symlink():
        raise UserError(f"{path}: is a symbolic link; give a real folder for the DICOM series")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: is a file; the DICOM series needs a folder there")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"{path}: folder {path.parent} is not writable")
    if path.is_dir():
        entries = list(os.scandir(path))
        if entries and not overwrite:
            raise FileExistsError(f"{path}: already exists and is not empty (use --overwrite to replace it)")
        other = [e.name for e in entries if e.is_symlink() or not e.is_file() or not e.name.lower().endswith(".dcm")]
        if other:
            raise UserError(f"{path}: holds other things than DICOM files ({other[0][:60]!r}...); not replaced, "
                            "remove it yourself or choose another folder")
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path}: is not writable")
    return path


# -- values ------------------------------------------------------------------------------------------
def _ds(value: float) -> str:
    """A decimal string (DS, at most 16 characters) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    value = float(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return format_number_as_ds(value)


def _encode(arr: np.ndarray) -> tuple[np.ndarray, str, str]:
    """``(int16 array, RescaleSlope, RescaleIntercept)`` with ``stored * slope + intercept`` = the values:
    exactly for integers spanning at most 65535, else within half a slope."""
    a = arr.astype(np.int64) if (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)) else arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    integral = np.issubdtype(a.dtype, np.integer) or bool(np.all(a == np.rint(a)))
    if integral and hi - lo <= 65535 and max(abs(lo), abs(hi)) < 1e14:  # intercept fits a DS
        inter = 0 if (lo >= -32768 and hi <= 32767) else int(lo) + 32768
        return (a - inter).astype(np.int16), "1", str(inter)
    center = _ds((lo + hi) / 2)
    c = float(center)
    span = max(hi - c, c - lo)
    if span <= 0:
        return np.zeros(a.shape, np.int16), "1", center
    slope = _ds(span / _STEPS)
    stored = np.rint((a - c) / float(slope))
    return np.clip(stored, -32768, 32767).astype(np.int16), slope, center


def _text(value: Any, limit: int) -> str:
    """A single-valued DICOM string: no backslash (the value separator), no control characters, ``limit`` long."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value)).replace("\\", "/")
    return text[:limit].rstrip()


def _created(provenance: Mapping[str, Any]) -> _dt.datetime:
    try:
        when = _dt.datetime.fromisoformat(str(provenance.get("created")))
        return when.astimezone(_dt.timezone.utc) if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)
    except (TypeError, ValueError):
        return _dt.datetime.now(_dt.timezone.utc)


def _summary(provenance: Mapping[str, Any]) -> str:
    """``SYNTHETIC MedDiffusion 0.1.0 model task``: the short mark."""
    words = ["SYNTHETIC", provenance.get("generator") or "MedDiffusion", provenance.get("generator_version"),
             provenance.get("model") or provenance.get("controlnet"), provenance.get("task")]
    return " ".join(_text(w, 64) for w in words if w)


def _details(provenance: Mapping[str, Any]) -> str:
    keys = ("model_revision", "seed", "sampler", "steps", "class", "units")
    parts = [f"{k} {provenance[k]}" for k in keys if provenance.get(k) is not None]
    return "; ".join(parts)


# -- writing -----------------------------------------------------------------------------------------
def write_dicom_series(vol: Volume, folder: str | os.PathLike, provenance: Mapping[str, Any], *,
                       modality: str | None = None, overwrite: bool = False) -> Path:
    """Write ``vol`` as a DICOM series (one CT or MR Image Storage file per slice) marked synthetic
    with ``provenance``, into ``folder`` (created; atomically: all files or none). ``modality``
    (``"CT"``/``"MR"``) overrides what the provenance implies. An existing non-empty folder is
    refused unless ``overwrite``, which replaces it whole when it holds only ``.dcm`` files.
    Returns the folder."""
    arr, lps = _check_volume(vol)
    prov_json = _provenance_json(provenance)
    kind = _resolve_modality(provenance, modality)
    target = check_series_folder(folder, overwrite)
    stored, slope, intercept = _encode(arr)
    datasets = _datasets(stored, slope, intercept, lps, provenance, prov_json, kind)
    tmp = target.with_name(f".{target.name[:100]}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.mkdir(tmp)
        for name, ds in datasets:
            _save(ds, tmp / name)
        _put_in_place(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        from .atomic import is_disk_full

        if is_disk_full(err):
            raise ResourceError(f"{target}: the disk is full (free some space or write elsewhere); nothing was "
                                "written") from err
        raise
    return target


def _put_in_place(tmp: Path, target: Path) -> None:
    """Rename the complete folder ``tmp`` to ``target``; an existing ``target`` (checked by the
    caller) is moved aside first and removed only once the new one is in place."""
    if not target.exists():
        try:
            os.rename(tmp, target)
            return
        except OSError as err:  # another writer made it meanwhile (rename over a non-empty folder fails)
            if not target.exists():
                raise
            raise FileExistsError(f"{target}: appeared while writing; nothing was replaced") from err
    old = target.with_name(f".{target.name[:100]}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save(ds: Any, path: Path) -> None:
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pydicom 2.x: the encoding is set on the data set
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)


def _datasets(stored: np.ndarray, slope: str, intercept: str, lps: np.ndarray, provenance: Mapping[str, Any],
              prov_json: str, kind: str) -> Iterator[tuple[str, Any]]:
    """``(file name, Dataset)`` of every slice, in instance order (made one at a time)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    ni, nj, nk = stored.shape
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    u = lps[:3, :3] / spacing[None, :]
    normal = np.cross(u[:, 0], u[:, 1])
    ascending = float(u[:, 2] @ normal) > 0
    order = range(nk) if ascending else range(nk - 1, -1, -1)
    sop_class = _MR if kind == "MR" else _CT
    hu = provenance.get("units") == "HU"
    when = _created(provenance)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    summary = _summary(provenance)
    model = provenance.get("model") or provenance.get("controlnet") or "unknown"
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    patient_id = "SYN-" + secrets.token_hex(8)
    lo, hi = (float(v) * float(slope) + float(intercept) for v in (stored.min(), stored.max()))
    window = provenance.get("hu_window") if hu else None
    if isinstance(window, (list, tuple)) and len(window) == 2 and all(isinstance(v, (int, float)) for v in window):
        lo, hi = float(min(window)), float(max(window))
    details = _details(provenance)
    derivation = _text(f"{summary}: image synthesised by a generative model, not acquired from a patient"
                       f"{'; ' + details if details else ''}", 1024)
    where = f"({PRIVATE_GROUP:04X},xx{PROVENANCE_OFFSET:02X})"
    comments = _text(f"{derivation}. Full provenance (JSON) in private tag {where} of creator {PRIVATE_CREATOR}.",
                     10240)
    generator = f"{provenance.get('generator') or 'MedDiffusion'} {provenance.get('generator_version') or ''}"
    versions = [_text(generator, _LO_CHARS)]
    if provenance.get("torch_version"):
        versions.append(_text(f"torch {provenance['torch_version']}", 64))

    for number, k in enumerate(order, start=1):
        position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "MEDDIFFUSION"
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if kind == "CT" else "OTHER", "SYNTHETIC"]
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.StudyDate, ds.SeriesDate, ds.ContentDate = date, date, date
        ds.StudyTime, ds.SeriesTime, ds.ContentTime = time, time, time
        ds.AccessionNumber = ""
        ds.Modality = kind
        ds.Manufacturer = _text(provenance.get("generator") or "MedDiffusion", _LO_CHARS)
        ds.ReferringPhysicianName = ""
        ds.TimezoneOffsetFromUTC = "+0000"
        ds.StudyDescription = _text(summary, _LO_CHARS)
        ds.SeriesDescription = _text(summary, _LO_CHARS)
        ds.ManufacturerModelName = _text(model, _LO_CHARS)
        ds.DerivationDescription = derivation
        ds.PatientName = "SYNTHETIC^MedDiffusion"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.SliceThickness = _ds(spacing[2])
        if kind == "CT":
            ds.KVP = ""
        else:
            ds.ScanningSequence = "RM"  # research mode: no real pulse sequence
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = ""
            ds.EchoTime = ""
            ds.EchoTrainLength = ""
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.SoftwareVersions = versions
        ds.PatientPosition = ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyID = ""
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = ""
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*u[:, 0], *u[:, 1])]
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(position @ normal))
        ds.ImageComments = comments
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (along j), column spacing (along i)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.BurnedInAnnotation = "NO"
        ds.WindowCenter = _ds((lo + hi) / 2)
        ds.WindowWidth = _ds(max(hi - lo, 1.0))
        ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
        ds.RescaleType = "HU" if hu and kind == "CT" else "US"
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(PROVENANCE_OFFSET, "UT", prov_json)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()
        yield FILE_PATTERN.format(number), ds


# -- reading -----------------------------------------------------------------------------------------
def _listing(folder: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The folder and its regular files (sorted by name); at most :data:`MAX_SLICES` entries (plus
    :data:`SPARE_ENTRIES` for a DICOMDIR, notes...) are looked at; links refused."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (a DICOM series is read from the folder holding its files)")
    files = []
    with os.scandir(path) as it:
        for count, entry in enumerate(it, start=1):
            if count > MAX_SLICES + SPARE_ENTRIES:
                raise UserError(f"{path}: more than {MAX_SLICES + SPARE_ENTRIES} files; over the limit for one "
                                f"series ({MAX_SLICES} slices)")
            if entry.is_symlink():
                raise UserError(f"{path}: holds a symbolic link ({entry.name[:60]!r}); not followed")
            if entry.is_file():
                files.append(path / entry.name)
    if not files:
        raise UserError(f"{path}: no files; no DICOM series there")
    return path, sorted(files)


def read_dicom_series(folder: str | os.PathLike, *, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> Volume:
    """The one DICOM series in ``folder`` as a :class:`Volume` (RAS affine; rescaled values, as
    SimpleITK's GDCM reader gives them: int16 when slope 1 and intercept integral, else float64).
    Refuses a folder with no series or several, more than :data:`MAX_SLICES` files, more than
    ``max_voxels`` voxels, and slices that are not evenly spaced (missing slices)."""
    import SimpleITK as sitk

    path, _files = _listing(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not ids:
        raise UserError(f"{path}: no DICOM series found")
    if len(ids) > 1:
        raise UserError(f"{path}: holds {len(ids)} DICOM series; put each series in its own folder")
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0])
    if not names or len(names) > MAX_SLICES:
        raise UserError(f"{path}: {len(names)} files in the series; the limit is {MAX_SLICES}")
    info = sitk.ImageFileReader()
    info.SetImageIO("GDCMImageIO")
    info.SetFileName(names[0])
    try:
        info.ReadImageInformation()
    except RuntimeError as err:
        raise UserError(f"{path}: not a readable DICOM series ({_reason(err)})") from err
    size = info.GetSize()
    voxels = int(np.prod([int(s) for s in size[:2]])) * len(names)
    if info.GetNumberOfComponents() != 1:
        raise UserError(f"{path}: expected single-channel slices, got {info.GetNumberOfComponents()} components")
    if max_voxels is not None and voxels > max_voxels:
        raise UserError(f"{path}: too large: {voxels} voxels, over the limit of {max_voxels}")
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's header, for the spacing check
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise UserError(f"{path}: not a readable DICOM series ({_reason(err)})") from err
    _check_slices(path, reader, img, len(names))
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: expected a single-channel 3-D image, got {img.GetDimension()}-D with "
                        f"{img.GetNumberOfComponentsPerPixel()} component(s)")
    vol = volume_from_sitk(img)
    return Volume(np.ascontiguousarray(vol.array), vol.affine)


def _check_slices(path: Path, reader: Any, img: Any, count: int) -> None:
    """Refuse slices that are not evenly spaced along the series' normal (missing or duplicate
    slices) or that drift sideways (tilted stacks): the reader would give them a wrong grid."""
    if count < 2 or img.GetDimension() != 3:
        return
    positions = []
    for n in range(count):
        try:
            positions.append([float(v) for v in reader.GetMetaData(n, "0020|0032").split("\\")[:3]])
        except (RuntimeError, ValueError):
            raise UserError(f"{path}: a slice has no readable ImagePositionPatient") from None
    pos = np.array(positions)
    if pos.shape != (count, 3) or not np.isfinite(pos).all():
        raise UserError(f"{path}: a slice has no readable ImagePositionPatient")
    normal = np.array(img.GetDirection()).reshape(3, 3)[:, 2]
    offsets = pos - pos[0]
    along = offsets @ normal
    steps = np.diff(along)
    step = float(img.GetSpacing()[2])
    tol = 1e-3 * step + 1e-6
    if not (steps > 0).all() or np.abs(steps - step).max() > tol:
        raise UserError(f"{path}: the slices are not evenly spaced (missing or duplicate slices?)")
    if np.abs(offsets - along[:, None] * normal[None, :]).max() > tol * count:
        raise UserError(f"{path}: the slices are not stacked along their normal (tilted series); not supported")


def _reason(err: BaseException) -> str:
    return (itk_reason(err) or type(err).__name__)[:160]


def _first_dicom(folder: str | os.PathLike) -> tuple[Path, Any]:
    """The first file (by name) of ``folder`` that parses as DICOM, header only, values over 64 KiB
    left unread (or ``folder`` itself when it is a file)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ..provenance import MAX_PROVENANCE_BYTES

    path = Path(folder)
    files = [path] if path.is_file() and not path.is_symlink() else _listing(path)[1]
    for name in files:
        try:
            return name, pydicom.dcmread(name, stop_before_pixels=True, defer_size=MAX_PROVENANCE_BYTES)
        except (InvalidDicomError, EOFError, ValueError, OSError):
            continue
    raise UserError(f"{path}: no DICOM file there")


def dicom_provenance(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance a MedDiffusion DICOM export holds (its private block, JSON), from the first
    DICOM file of ``folder`` (or that file); ``None`` when the file has no such block. JSON only,
    at most ``MAX_PROVENANCE_BYTES``; nothing in the file is followed or unpickled."""
    from pydicom.dataelem import RawDataElement

    from ..provenance import MAX_PROVENANCE_BYTES

    name, ds = _first_dicom(folder)
    try:
        tag = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR).get_tag(PROVENANCE_OFFSET)
    except KeyError:
        return None
    if tag not in ds:
        return None
    try:
        raw = ds.get_item(tag, keep_deferred=True)  # a long value stays unread: its length is enough
    except TypeError:  # pydicom 2.x reads it
        raw = ds.get_item(tag)
    length = raw.length if isinstance(raw, RawDataElement) else len(raw.value or "")
    if length > MAX_PROVENANCE_BYTES:
        raise UserError(f"{name}: the provenance block is {length} bytes, over the limit of {MAX_PROVENANCE_BYTES}")
    value = ds[tag].value
    if isinstance(value, (bytes, bytearray)):  # VR UN (written with implicit VR by another tool)
        value = bytes(value).decode("utf-8", "replace")
    try:
        doc = json.loads(str(value).rstrip(" \0"))
    except ValueError as err:
        raise UserError(f"{name}: the provenance block is not valid JSON") from err
    if not isinstance(doc, dict):
        raise UserError(f"{name}: the provenance block is not a JSON object")
    return doc


def header_dump(folder: str | os.PathLike, width: int = 100) -> str:
    """A readable dump of the header (file meta and data set, no pixel data) of the first DICOM file
    in ``folder`` (or that file), one element a line; long values are cut to ``width`` characters."""
    name, ds = _first_dicom(folder)
    try:
        ours = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR).get_tag(PROVENANCE_OFFSET)
    except KeyError:
        ours = None
    lines = [f"# {name.name}"]
    _dump(ds.file_meta, lines, "", width, ours)
    _dump(ds, lines, "", width, ours)
    return "\n".join(lines)


def _dump(ds: Any, lines: list[str], indent: str, width: int, ours: Any) -> None:
    from pydicom.multival import MultiValue
    from pydicom.uid import UID

    for elem in ds:
        title = f"{PRIVATE_CREATOR} provenance (JSON)" if elem.tag == ours else elem.name
        label = f"{indent}{elem.tag} {title[:36]:<36} {elem.VR}"
        if elem.VR == "SQ":
            lines.append(f"{label}: {len(elem.value)} item(s)")
            for item in elem.value:
                _dump(item, lines, indent + "  ", width, ours)
            continue
        value = elem.value
        if isinstance(value, (bytes, bytearray)):
            text = f"<{len(value)} bytes>"
        elif value is None:
            text = ""
        elif isinstance(value, MultiValue):
            text = "\\".join(str(v) for v in value)
        elif isinstance(value, UID) and value.name != str(value):
            text = f"{value} ({value.name})"
        else:
            text = str(value)
        if len(text) > width:
            text = f"{text[:width]}... ({len(text)} characters)"
        lines.append(f"{label}: {text}")


__all__ = ["write_dicom_series", "read_dicom_series", "dicom_provenance", "header_dump", "check_series_folder", "MAX_SLICES",
           "PRIVATE_GROUP", "PRIVATE_CREATOR"]
