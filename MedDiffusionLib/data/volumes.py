"""Volume I/O with explicit geometry.

In memory a :class:`Volume` is a numpy array indexed ``(i, j, k)`` (NIfTI voxel order) plus a
4x4 voxel->RAS affine in millimetres. The network sees ``(D, H, W) = (k, i, j)``, the official
convention (``to_network`` / ``from_network``). Generated volumes get the official writer's
geometry: a positive diagonal affine of the spacings (i -> R, j -> A, k -> S) with origin 0.
NIfTI is written with nibabel (RAS), NRRD and MHA with SimpleITK (LPS on disk). Only single-file
formats are read and written (:data:`SUFFIXES`); :func:`read_volume` checks each header itself
before SimpleITK reads the file (headers that name other files, unpacked size and voxel count, data
as long as the header says, compressed data that inflate exactly, NaN kept).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import UserError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


# -- reading -----------------------------------------------------------------------------------------
# Why we parse headers ourselves: SimpleITK follows paths written *inside* a header. A MetaIO
# ``ElementDataFile = /etc/passwd`` (or ``LIST``, a file pattern, any relative name), a NRRD
# ``data file:`` field, a detached ``.nhdr``/``.mhd`` header and a NIfTI ``ni1`` header (which makes
# ITK open a ``.img`` beside it) all make the reader open another file on this machine, and no
# reader bounds the unpacked size (a 261 KB ``.nii.gz`` can unpack to 256 MiB). So before any image
# reader runs, :func:`_inspect` reads at most ``HEADER_LIMIT`` bytes of header (the 348-byte NIfTI-1
# header through gzip for ``.nii.gz``), parses it the way the ITK reader will (MetaIO's and teem's
# tokenisation), refuses anything that names another file, and computes the unpacked size in
# Python ints. The reader is then pinned to the ImageIO of the format we checked, so that ITK cannot
# pick another (GDCM, Bruker, ...) for a file crafted to look like two formats.
# The readers also trust the data part: the NIfTI reader fills data that end early with zeros, and
# MetaIO prints "Uncompress failed" and hands back an uninitialised buffer (heap contents) when its
# zlib data do not inflate. So once the size is known to be within bounds, :func:`_check_data`
# measures the data part: raw data by the file size, compressed data by inflating them once more in
# bounded chunks and counting (nothing kept). Data shorter than the header says, and compressed data
# that are damaged (or, for MetaIO, do not inflate to exactly the header's size), are refused. NRRD
# encodings are limited to what we verify (raw, gzip) or what teem verifies value by value (ascii, hex).
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats: read and written
DETACHED_SUFFIXES = (".nhdr", ".mhd")  # headers that always name a separate data file: refused
HEADER_LIMIT = 64 * 1024  # bytes of NRRD/MetaIO header we read; a longer header is refused
ABSURD_BYTES = 1 << 40  # an unpacked size over 1 TiB is refused even without max_bytes
_MAX_DIM = 2 ** 31 - 1


@dataclass
class _Header:
    """What :func:`_inspect` learnt from a header before any reader ran."""

    io: str  # the ITK ImageIO the reader is pinned to
    unpacked: int  # bytes the reader will produce (voxels x components x bytes, plus skipped bytes)
    nifti_float: str = ""  # numpy dtype of NIfTI float data, whose NaN/inf ITK turns into 0 (restored after)
    slope: float = 0.0  # NIfTI scl_slope / scl_inter as ITK applies them
    inter: float = 0.0
    offset: int = 0  # NIfTI vox_offset
    sizes: tuple = ()  # NIfTI dim[1..dim[0]]
    voxels: int = 0  # grid points the header gives (product of its sizes; MetaIO channels not counted)
    # where and how the data part is stored, for _check_data
    encoding: str = ""  # "raw", "gzip" (gzip members), "zlib" (MetaIO: one zlib/gzip stream); "" = not checked
    data_start: int = 0  # file offset of the data part
    skip: int = 0  # bytes of the (inflated) data part before the voxels (NIfTI vox_offset, NRRD byte skip)
    data_bytes: int = 0  # bytes of voxel data the header says the reader takes
    line_skip: int = 0  # NRRD: lines of the file skipped before the data part
    compressed_size: int = 0  # MetaIO CompressedDataSize


def _suffix(path: Path, label: str | None = None, writing: bool = False) -> str:
    label = str(path) if label is None else label
    name = path.name.lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return s
    if name.endswith(DETACHED_SUFFIXES):
        what = ("writes a detached header and a separate data file" if writing else
                "is a detached header that names another file (not followed)")
        raise UserError(f"{label}: {'/'.join(DETACHED_SUFFIXES)} {what}; use a single-file format: "
                        f"{', '.join(SUFFIXES)}")
    raise UserError(f"{label}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def _refuse(label: str, what: str) -> UserError:
    return UserError(f"{label}: {what}")


def _unreadable(label: str, why: str) -> UserError:
    """The message for a file that is not what its suffix says (same words as an ITK failure)."""
    err = UserError(f"{label}: not a readable volume ({why}); MedDiffusion reads {', '.join(SUFFIXES)} images")
    err.__cause__ = ValueError(why)
    return err


def _prod(sizes: Sequence[int], label: str) -> int:
    total = 1
    for s in sizes:
        if s < 1 or s > _MAX_DIM:
            raise _refuse(label, f"the header gives an invalid image size {list(sizes)[:8]}")
        total *= s
    return total


def _check_spatial(label: str, sizes: Sequence[int]) -> None:
    big = [s for s in sizes if s > 1]
    if len(big) > 3:
        raise _refuse(label, f"expected a single-channel 3-D image, the header gives a {len(big)}-D image "
                             f"{'x'.join(str(s) for s in big[:8])}")


def _inspect(path: Path, suffix: str, label: str) -> _Header:
    """Parse the header with bounded reads; refuse what names another file or is malformed."""
    try:
        with open(path, "rb") as f:
            if suffix in (".nii.gz", ".nii"):
                return _inspect_nifti(f, suffix, label)
            head = f.read(HEADER_LIMIT)
            size = os.fstat(f.fileno()).st_size
    except OSError as err:
        raise _refuse(label, f"cannot be read ({err.strerror or type(err).__name__})") from err
    return _inspect_nrrd(head, label) if suffix == ".nrrd" else _inspect_metaio(head, size, label)


# NIfTI-1 datatype code -> bytes per voxel (nifti1.h)
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                1536: 16, 1792: 16, 2048: 32, 2304: 4}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # float32, float64: the ITK NIfTI reader zeroes their NaN/inf voxels


def _nifti_stream(f, suffix: str, label: str):
    """A file object over the NIfTI bytes: through gzip when a .nii.gz starts with the gzip magic
    (zlib, which ITK uses, also reads a plain file named .gz)."""
    import gzip

    gz = suffix == ".nii.gz" and f.read(2) == b"\x1f\x8b"
    f.seek(0)
    return gzip.GzipFile(fileobj=f) if gz else f


def _read_exactly(src, n: int, label: str, keep: bool = True) -> bytes:
    """Up to ``n`` bytes (fewer at the end of the data; none kept unless ``keep``); gzip errors
    become a refusal."""
    import zlib

    out = []
    try:
        while n > 0:
            chunk = src.read(min(n, 1 << 24))  # gzip unpacks no more than asked
            if not chunk:
                break
            if keep:
                out.append(chunk)
            n -= len(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise _unreadable(label, "damaged gzip data") from err
    return b"".join(out)


def _inspect_nifti(f, suffix: str, label: str) -> _Header:
    import struct

    hdr = _read_exactly(_nifti_stream(f, suffix, label), 540, label)
    if len(hdr) < 348:
        raise _unreadable(label, f"too short for a NIfTI header: {len(hdr)} bytes")
    for end in "<>":
        if struct.unpack(end + "i", hdr[:4])[0] == 540:
            raise _refuse(label, "NIfTI-2 files are not supported; save the image as NIfTI-1 (.nii.gz)")
    # byte order as niftilib decides it: the order in which dim[0] is 1..7
    end = next((e for e in "<>" if 1 <= struct.unpack(e + "h", hdr[40:42])[0] <= 7), None)
    if end is None or struct.unpack(end + "i", hdr[:4])[0] != 348:
        raise _unreadable(label, "not a NIfTI-1 header: bad sizeof_hdr or dim[0]")
    magic = hdr[344:348]
    if magic == b"ni1\x00":
        raise _refuse(label, "a NIfTI header/image pair (.hdr/.img) names another file (not followed); save "
                             "the image as a single .nii or .nii.gz file")
    if magic != b"n+1\x00":
        raise _unreadable(label, f"not a single-file NIfTI-1 image: magic {magic!r}, expected b'n+1\\x00'")
    dims = struct.unpack(end + "8h", hdr[40:56])
    datatype = struct.unpack(end + "h", hdr[70:72])[0]
    vox_offset, slope, inter = struct.unpack(end + "3f", hdr[108:120])
    sizes = list(dims[1:dims[0] + 1])
    voxels = _prod(sizes, label)
    if datatype not in _NIFTI_BYTES:
        raise _refuse(label, f"unsupported NIfTI data type code {datatype}")
    if not (math.isfinite(vox_offset) and 352 <= vox_offset <= _MAX_DIM):  # single file: data after the header
        raise _unreadable(label, f"invalid NIfTI vox_offset {vox_offset:g}")
    _check_spatial(label, [s for i, s in enumerate(sizes, 1) if i != 5])  # dim[5]: vector components
    # niftilib's FIXED_FLOAT: a non-finite slope or intercept reads as 0; ITK rescales only when slope != 0
    slope = slope if math.isfinite(slope) else 0.0
    inter = inter if math.isfinite(inter) else 0.0
    f.seek(0)
    gz = suffix == ".nii.gz" and f.read(2) == b"\x1f\x8b"  # as _nifti_stream decides
    return _Header("NiftiImageIO", int(vox_offset) + voxels * _NIFTI_BYTES[datatype],
                   end + _NIFTI_FLOATS[datatype] if datatype in _NIFTI_FLOATS else "", slope, inter,
                   int(vox_offset), tuple(sizes), voxels=voxels, encoding="gzip" if gz else "raw",
                   skip=int(vox_offset), data_bytes=voxels * _NIFTI_BYTES[datatype])


# teem's nrrdType names (case-insensitive, spaces collapsed) -> bytes
_NRRD_TYPES = {**dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
               **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t",
                                "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
               **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32",
                                "uint32_t", "float"), 4),
               **dict.fromkeys(("longlong", "long long", "long long int", "signed long long",
                                "signed long long int", "int64", "int64_t", "ulonglong", "unsigned long long",
                                "unsigned long long int", "uint64", "uint64_t", "double"), 8)}
_NRRD_FIELDS = ("type", "dimension", "sizes", "encoding", "byteskip", "lineskip", "kinds")
_NRRD_SPATIAL_KINDS = ("domain", "space", "time", "???", "none")
# teem's encoding names (case-insensitive) -> what _check_data does: measure raw data, inflate gzip
# data; ascii/hex are parsed value by value by teem, which refuses a missing or malformed value
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "ascii": "", "text": "", "txt": "", "hex": ""}
_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")  # teem's airOneLine: a line ends at \n, \r or \r\n


def _inspect_nrrd(head: bytes, label: str) -> _Header:
    m = _LINE.match(head)
    if not m or not re.fullmatch(rb"NRRD000[1-5]", m.group(1)):
        raise _unreadable(label, "not a NRRD file: no NRRD000x magic")
    pos, fields = m.end(), {}
    while True:
        m = _LINE.match(head, pos)
        if not m:
            raise _refuse(label, f"no complete NRRD header with its data in the first {HEADER_LIMIT // 1024} KiB "
                                 "(a header without data names another file)")
        line, pos = m.group(1), m.end()
        if not line:
            break  # the empty line: the data follow
        if b"\x00" in line:
            raise _refuse(label, "the NRRD header contains a NUL byte")
        if line.startswith(b"#"):
            continue
        # teem takes the text before the first ": " as the field name, lower-cased ("data file" or
        # "datafile"); we also catch any spacing and a missing space after the colon
        if any(re.sub(rb"\s+", b"", line.split(sep, 1)[0]).lower() == b"datafile" for sep in (b": ", b":")):
            raise _refuse(label, "the NRRD header has a 'data file' field, i.e. names another file (not "
                                 "followed); save the image as a single .nrrd file with its data attached")
        if b": " in line:
            key = re.sub(rb"\s+", b"", line.split(b": ", 1)[0]).lower().decode("latin-1")
            if key in _NRRD_FIELDS:
                if key in fields:
                    raise _refuse(label, f"the NRRD header gives '{key}' twice")
                fields[key] = line.split(b": ", 1)[1].strip().decode("latin-1")
    missing = [k for k in ("type", "dimension", "sizes", "encoding") if k not in fields]
    if missing:
        raise _refuse(label, f"the NRRD header has no {', '.join(missing)} field")
    tsize = _NRRD_TYPES.get(" ".join(fields["type"].lower().split()))
    if tsize is None:
        raise _refuse(label, f"unsupported NRRD type {fields['type'][:40]!r}")
    numbers = [fields["dimension"], fields.get("byteskip", "0"), fields.get("lineskip", "0"), *fields["sizes"].split()]
    if not all(re.fullmatch(r"-?[0-9]{1,30}", t) for t in numbers):
        raise _refuse(label, "the NRRD header has a malformed dimension, sizes or skip field")
    dim, byte_skip, line_skip, *sizes = (int(t) for t in numbers)
    if line_skip < 0:
        raise _refuse(label, "the NRRD header has a negative line skip")
    if not 1 <= dim <= 16 or len(sizes) != dim or byte_skip < -1:
        raise _refuse(label, f"the NRRD header gives dimension {dim} but sizes {fields['sizes'][:60]!r}")
    voxels = _prod(sizes, label)
    kinds = fields.get("kinds", "").lower().split()
    _check_spatial(label, [s for i, s in enumerate(sizes) if len(kinds) != dim or kinds[i] in _NRRD_SPATIAL_KINDS])
    encoding = _NRRD_ENCODINGS.get(fields["encoding"].lower())
    if encoding is None:
        what = "bzip2-compressed" if fields["encoding"].lower() in ("bzip2", "bz2") else \
            f"{fields['encoding'][:40]!r}-encoded"
        raise _refuse(label, f"{what} NRRD data are not supported; save the image with raw or gzip encoding")
    if encoding == "gzip" and byte_skip < 0:  # teem would inflate the whole stream to skip from its end
        raise _refuse(label, "the NRRD header gives 'byte skip: -1' with gzip data, which is not supported")
    return _Header("NrrdImageIO", voxels * tsize + max(byte_skip, 0), voxels=voxels, encoding=encoding,
                   data_start=pos, skip=max(byte_skip, 0), data_bytes=voxels * tsize, line_skip=line_skip)


_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}
_MET_TYPES.update({k + "_ARRAY": v for k, v in list(_MET_TYPES.items())})
# MetaIO fields read with `>>` (which would run across lines on a short or empty value)
_MET_SCALARS = ("NDims", "FileFormatVersion", "ID", "ParentID", "CompressedDataSize", "HeaderSize", "ElementMin",
                "ElementMax", "ElementNumberOfChannels", "ElementNBits", "ElementToIntensityFunctionSlope",
                "ElementToIntensityFunctionOffset")
_MET_VECTORS = ("Position", "Origin", "Offset", "CenterOfRotation", "ElementSpacing", "DimSize", "ImagePosition",
                "ElementOrigin", "SequenceID", "ElementSize")
_MET_MATRICES = ("TransformMatrix", "Rotation", "Orientation", "ElementDirection")
_NUMBER = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_LOCAL = (b"LOCAL", b"Local", b"local")  # the spellings MetaIO reads as "data in this file"


def _inspect_metaio(head: bytes, file_size: int, label: str) -> _Header:
    """Tokenise like MetaIO's MET_Read (name up to '=' or ':', exact case; value to the end of the
    line) and stop where it stops, at ``ElementDataFile``. Lines MetaIO would read across (no
    separator, short numeric values) are refused rather than guessed."""
    pos, n, fields = 0, len(head), {}
    bad = lambda what: _unreadable(label, f"malformed MetaIO header: {what}")  # noqa: E731
    while True:
        while pos < n and head[pos] in b" \t\n\v\f\r":
            pos += 1
        start = pos
        while pos < n and head[pos] not in b"=:\r\n" and pos - start < 500:
            pos += 1
        if pos >= n:
            raise _unreadable(label, f"no MetaIO ElementDataFile line in the first {HEADER_LIMIT // 1024} KiB")
        if pos - start >= 500 or head[pos] in b"\r\n":
            raise bad(f"line {head[start:pos][:30]!r} has no '=' separator")
        key = head[start:pos].rstrip(b" \t")
        while pos < n and head[pos] in b"=: \t":
            pos += 1
        eol = head.find(b"\n", pos)
        if eol < 0:
            raise _unreadable(label, "incomplete MetaIO header")
        value, pos = head[pos:eol], eol + 1
        if len(value) >= 499 or len(key) > 200 or b"\x00" in key + value or not key:
            raise bad("over-long line, NUL byte or empty name")
        while value and not 0x21 <= value[-1] <= 0x7E:  # MET_StringStripEnd
            value = value[:-1]
        name = key.decode("latin-1")
        if name == "ElementDataFile":
            if value not in _LOCAL:
                raise _refuse(label, "the MetaIO header's ElementDataFile names another file (not followed); "
                                     "save the image as a single .mha file (ElementDataFile = LOCAL)")
            break
        if name.lower().replace(" ", "") == "elementdatafile":
            raise bad(f"{name[:30]!r} is not spelled ElementDataFile")
        need = 1 if name in _MET_SCALARS else 4 if name == "Color" else 0
        if name in _MET_VECTORS + _MET_MATRICES:
            if "NDims" not in fields:
                raise bad(f"{name} before NDims")
            need = fields["NDims"][0] ** (2 if name in _MET_MATRICES else 1)
        if need:
            tokens = value.split()
            if len(tokens) < need or not all(_NUMBER.fullmatch(t) for t in tokens[:need]):
                raise bad(f"{name} needs {need} number(s)")
        if name in fields and (need or name in ("ElementType", "CompressedData", "BinaryData")):
            raise bad(f"{name} given twice")
        fields[name] = [float(t) for t in value.split()[:need]] if need else value.decode("latin-1")
        if name == "NDims" and (fields[name][0] != int(fields[name][0]) or not 1 <= fields[name][0] <= 16):
            raise bad("NDims")
        if name == "NDims":
            fields[name] = [int(fields[name][0])]
    if "NDims" not in fields or "DimSize" not in fields or "ElementType" not in fields:
        raise bad("NDims, DimSize and ElementType are required")
    if any(s != int(s) for s in fields["DimSize"]):
        raise bad("DimSize must be whole numbers")
    sizes = [int(s) for s in fields["DimSize"]]
    channels = fields.get("ElementNumberOfChannels", [1])[0]
    if channels != int(channels):
        raise bad("ElementNumberOfChannels")
    if not 0 <= fields.get("CompressedDataSize", [0])[0] <= file_size:
        raise bad("CompressedDataSize larger than the file")
    tsize = _MET_TYPES.get(fields["ElementType"])
    if tsize is None:
        raise _refuse(label, f"unsupported MetaIO ElementType {fields['ElementType'][:40]!r}")
    voxels = _prod(sizes + [int(channels)], label)
    _check_spatial(label, sizes)
    unpacked = voxels * tsize
    # where MetaIO's M_ReadElements looks for the data: HeaderSize > 0 is an offset from the start of the
    # file, -1 means "the last bytes of the file" (we require them after the header), else after the header
    header_size = int(fields.get("HeaderSize", [0])[0])
    start = header_size if header_size > 0 else pos
    true = lambda key: fields.get(key, "")[:1] in ("T", "t", "1")  # noqa: E731 (MetaIO's test)
    binary = "BinaryData" not in fields or true("BinaryData")
    if not binary:  # ASCII values, parsed one by one by MetaIO, which fails on a missing one
        return _Header("MetaImageIO", unpacked, voxels=_prod(sizes, label))
    if not true("CompressedData"):
        return _Header("MetaImageIO", unpacked, voxels=_prod(sizes, label), encoding="raw", data_start=start,
                       data_bytes=unpacked)
    compressed = int(fields.get("CompressedDataSize", [0])[0])
    if compressed == 0:  # MetaIO then inflates the whole file, header included: never a valid image
        raise bad("CompressedData without CompressedDataSize")
    if header_size == -1:
        raise bad("HeaderSize = -1 with CompressedData")
    return _Header("MetaImageIO", unpacked, voxels=_prod(sizes, label), encoding="zlib", data_start=start,
                   data_bytes=unpacked, compressed_size=compressed)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n < 2 ** 40 else f"{n / 2 ** 40:.3g} TiB"


_CHUNK = 1 << 22  # bytes read or inflated per step when measuring the data part
_EOL = re.compile(rb"\r\n|\r|\n")  # teem's airOneLine line ends


def _skip_lines(f, count: int) -> bool:
    """Move ``f`` past ``count`` lines (ended as teem's airOneLine ends them); False if the file ends first."""
    while count > 0:
        chunk = f.read(_CHUNK)
        while chunk.endswith(b"\r"):  # keep a \r\n pair in one chunk
            more = f.read(1)
            if not more:
                break
            chunk += more
        if not chunk:
            return False
        ends = [m.end() for _, m in zip(range(count), _EOL.finditer(chunk))]
        count -= len(ends)
        if count == 0:
            f.seek(ends[-1] - len(chunk), os.SEEK_CUR)
    return True


def _inflated(f, cap: int, label: str, what: str, *, wbits: int, limit_in: int | None = None,
              members: bool = False) -> tuple[int, bool]:
    """Inflate the compressed data at ``f``'s position and count the bytes out, never more than ``cap``
    (and never more than ``_CHUNK`` in memory at a time); nothing is kept. Returns (bytes out, whether
    the stream ended properly). ``limit_in`` bounds the compressed bytes read; with ``members``,
    gzip members that follow one another are read on, as zlib's gzread does (trailing bytes that
    are not a gzip member are ignored, as there). Damaged data are refused."""
    import zlib

    d, out, buf, left = zlib.decompressobj(wbits), 0, b"", limit_in

    def more() -> bytes:
        nonlocal left
        data = f.read(_CHUNK if left is None else min(left, _CHUNK))
        if left is not None:
            left -= len(data)
        return data

    try:
        while out < cap:
            if not buf:
                buf = more()
                if not buf:
                    return out, d.eof
            out += len(d.decompress(buf, min(cap - out, _CHUNK)))
            buf = d.unconsumed_tail
            if d.eof:
                if not members:
                    return out, True
                buf = d.unused_data
                if len(buf) < 2:
                    buf += more()
                if not buf.startswith(b"\x1f\x8b"):
                    return out, True
                d = zlib.decompressobj(wbits)
    except zlib.error as err:
        raise _unreadable(label, f"damaged {what} data") from err
    return out, d.eof


def _check_data(path: Path, header: _Header, label: str) -> None:
    """Refuse a data part shorter than the header says, and compressed data that are damaged (MetaIO:
    that do not inflate to exactly the header's size), before a reader fills the rest with zeros or
    leaves it uninitialised. Called after the size checks, so the work is bounded."""
    if not header.encoding:
        return  # ASCII / hex values: the reader parses and checks each one
    need = header.skip + header.data_bytes
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(min(header.data_start, size))
            if header.encoding == "zlib":  # MetaIO: one zlib (or gzip) stream of CompressedDataSize bytes
                if header.data_start + header.compressed_size > size:
                    raise _unreadable(label, "the MetaIO CompressedDataSize runs past the end of the file")
                have, ended = _inflated(f, header.data_bytes + 1, label, "zlib", wbits=47,
                                        limit_in=header.compressed_size)
                if have > header.data_bytes:
                    raise _refuse(label, f"the compressed data hold more than the {header.data_bytes} bytes of voxel "
                                         "data the header says")
                if have == header.data_bytes and not ended:
                    raise _unreadable(label, "the zlib data do not end properly (truncated or damaged)")
            elif not _skip_lines(f, header.line_skip):
                have = 0
            elif header.encoding == "raw":
                have = size - f.tell()
            else:
                have, _ = _inflated(f, need + 1, label, "gzip", wbits=31, members=True)  # + 1: up to the CRC
    except OSError as err:
        raise _refuse(label, f"cannot be read ({err.strerror or type(err).__name__})") from err
    if have < need:
        where = "compressed data hold" if header.encoding != "raw" else "file holds"
        raise _refuse(label, f"the {where} {max(have - header.skip, 0)} bytes of voxel data, the header says "
                             f"{header.data_bytes}")


def read_volume(path: str | Path, *, max_bytes: int | None = None, max_voxels: int | None = None,
                name: str | None = None) -> Volume:
    """Read a single-file NIfTI-1 / NRRD / MHA volume: (i, j, k) array and RAS affine.

    The header is checked first (see the comment above :data:`SUFFIXES`): headers that name another
    file are refused, and so is an unpacked size over ``max_bytes`` or a voxel count over
    ``max_voxels`` (when given; these refusals say "too large"). Then the data part is measured: data
    shorter than the header says, and compressed data that do not inflate as the header says, are
    refused. NaN and infinite voxels are kept in every format. Messages name ``name`` when given (the
    job service passes the upload's field name; no server path reaches a client), else ``path``."""
    import SimpleITK as sitk

    path = Path(path)
    label = str(path) if name is None else name
    if not path.exists():
        raise FileNotFoundError(f"{label}: file not found")
    suffix = _suffix(path, label)
    header = _inspect(path, suffix, label)
    if header.unpacked > ABSURD_BYTES or (max_bytes is not None and header.unpacked > max_bytes):
        limit = f"the limit of {_mib(max_bytes)}" if max_bytes is not None and max_bytes < ABSURD_BYTES else \
            "any sensible size"
        raise _refuse(label, f"too large: the header gives an image of {_mib(header.unpacked)} unpacked, over {limit}")
    if max_voxels is not None and header.voxels > max_voxels:
        raise _refuse(label, f"too large: the header gives {header.voxels} voxels, over the limit of {max_voxels} "
                             "voxels")
    _check_data(path, header, label)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(header.io)  # never let ITK pick another reader for this file
    reader.SetFileName(str(path))
    try:
        img = reader.Execute()
    except RuntimeError as err:  # SimpleITK's reader reports every unreadable file this way
        reason = _scrub(itk_reason(err), path, label, name is not None)
        raise UserError(f"{label}: not a readable volume{f' ({reason[:160]})' if reason else ''}; MedDiffusion "
                        f"reads {', '.join(SUFFIXES)} images") from err
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{label}: expected a single-channel 3-D image, got {img.GetDimension()}-D with "
                         f"{img.GetNumberOfComponentsPerPixel()} component(s)")
    vol = volume_from_sitk(img)
    if header.nifti_float:
        vol = Volume(_restore_nonfinite(path, suffix, vol.array, header, label), vol.affine)
    return vol


def itk_reason(err: BaseException) -> str:
    """The line of a SimpleITK error that says why ('' when none does)."""
    return next((ln.strip() for ln in str(err).splitlines() if "ERROR" in ln or "Could not" in ln), "")


def volume_from_sitk(img: Any) -> Volume:
    """A 3-D SimpleITK image as a :class:`Volume` (array ``(X, Y, Z)``, a view of ITK's ``(Z, Y, X)``
    array; RAS affine from ITK's LPS geometry)."""
    import SimpleITK as sitk

    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    lps[:3, 3] = img.GetOrigin()
    return Volume(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)), LPS_TO_RAS @ lps)


def set_sitk_grid(img: Any, vol: Volume) -> Any:
    """Give a SimpleITK image ``vol``'s grid (LPS, as ITK stores it): spacing, origin, then the
    direction (ITK raises ``RuntimeError`` for axes that are not orthonormal). Returns ``img``."""
    lps = LPS_TO_RAS @ vol.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing[None, :]).reshape(-1)])
    return img


def _scrub(reason: str, path: Path, label: str, strict: bool) -> str:
    """ITK's one-line reason; when ``strict`` (a ``name`` was given) the file's path is replaced by
    the name, and the reason dropped altogether if anything path-like is left."""
    reason = re.sub(r"\(0x[0-9a-fA-F]+\)", "", reason)
    if not strict:
        return reason
    for text in sorted({str(path), str(path.resolve()), path.name}, key=len, reverse=True):
        reason = reason.replace(text, label)
    parent = str(path.parent)
    return "" if "/" in reason or "\\" in reason or (parent != "." and parent in reason) else reason


def _restore_nonfinite(path: Path, suffix: str, arr: np.ndarray, header: _Header, label: str) -> np.ndarray:
    """Put back the NaN/inf voxels that the ITK NIfTI reader turned into 0.

    niftilib's ``nifti_read_buffer`` replaces every non-finite float32/float64 value with 0 (whatever
    scl_slope says), so ``check_finite`` never saw them. We read the raw values ourselves (the
    header is already checked, so the size is bounded); where those are non-finite we put them back,
    scaled the way ITK scales (slope 0 means no scaling). Other voxels keep ITK's values, so
    ordinary files read exactly as before."""
    rescale = header.slope != 0 and (header.slope != 1 or header.inter != 0)
    zeroed = np.asarray(header.inter if rescale else 0, dtype=arr.dtype)
    if not np.any(arr == zeroed):
        return arr  # no voxel holds the value a zeroed voxel would have: nothing was replaced
    with open(path, "rb") as f:
        src = _nifti_stream(f, suffix, label)
        _read_exactly(src, header.offset, label, keep=False)  # the header and its extensions
        data = _read_exactly(src, header.unpacked - header.offset, label)
    if len(data) != header.unpacked - header.offset or math.prod(header.sizes) != arr.size:
        raise _refuse(label, "the NIfTI data do not match the header")
    raw = np.frombuffer(data, dtype=header.nifti_float).reshape(arr.shape, order="F")  # NIfTI: i varies fastest
    bad = ~np.isfinite(raw)
    if not rescale and not np.array_equal(arr[~bad], raw[~bad]):  # we and ITK must agree on every other voxel
        raise _refuse(label, "the NIfTI data could not be read consistently")
    if bad.any():
        vals = raw[bad].astype(np.float64)
        if rescale:
            with np.errstate(invalid="ignore", over="ignore"):
                vals = vals * header.slope + header.inter
        arr = np.array(arr, copy=True)
        arr[bad] = vals.astype(arr.dtype)
    return arr


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    """Validate an output volume path (a format this library writes) before any long computation."""
    from ..io.atomic import check_output_path

    path = Path(path)
    _suffix(path, writing=True)
    return check_output_path(path, overwrite)


def write_volume(vol: Volume, path: str | Path, overwrite: bool = False,
                 provenance: Mapping[str, Any] | None = None) -> Path:
    """Write atomically (:func:`MedDiffusionLib.io.atomic.atomic_path`): a temporary file in the
    same folder, renamed when complete; a full disk raises ResourceError and leaves nothing.

    ``provenance`` (:mod:`MedDiffusionLib.provenance`) marks the file as synthetic: NIfTI gets a
    ``descrip`` starting with ``SYNTHETIC`` and a JSON sidecar ``<name>.json`` with every field
    (both or neither are left), NRRD / MHA one key/value field per provenance field."""
    from .. import provenance as prov_mod

    path = check_writable(path, overwrite)
    suffix = _suffix(path)
    nifti = suffix in (".nii.gz", ".nii")
    side = prov_mod.sidecar_path(path) if (nifti and provenance is not None) else None
    if side is not None and side.exists() and not overwrite:
        raise FileExistsError(f"{side}: already exists (use --overwrite to replace it)")
    try:
        _write_marked(vol, path, suffix, provenance, side)
    except BaseException:
        if side is not None:  # the volume was not put in place: its sidecar goes too
            side.unlink(missing_ok=True)
        raise
    return path


def _write_marked(vol: Volume, path: Path, suffix: str, provenance: Mapping[str, Any] | None,
                  side: Path | None) -> None:
    from ..io.atomic import atomic_path
    from .. import provenance as prov_mod

    with atomic_path(path) as tmp:
        if suffix in (".nii.gz", ".nii"):
            import nibabel as nib

            img = nib.Nifti1Image(np.asarray(vol.array), vol.affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(vol.affine, code=1)
            img.set_sform(vol.affine, code=1)
            if provenance is not None:
                img.header["descrip"] = prov_mod.nifti_descrip(provenance)
            nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            img = set_sitk_grid(sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol.array, (2, 1, 0)))), vol)
            for key, value in prov_mod.metadata_fields(provenance or {}).items():
                img.SetMetaData(key, value)
            sitk.WriteImage(img, str(tmp), useCompression=True)
        if side is not None:  # written before the volume is renamed into place: both or neither
            prov_mod.write_sidecar(path, provenance or {})


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
