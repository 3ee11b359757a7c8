"""read_volume inspects headers itself before any reader runs: files that name other files are
refused, the unpacked size is bounded, and NaN/inf voxels survive every format. Real files in
tmp_path, no mocks."""
import gzip
import shutil
import zlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.data.volumes import (DETACHED_SUFFIXES, SUFFIXES, Volume, check_finite, check_writable,
                                          read_volume, write_volume)
from MedDiffusionLib.errors import UserError

SECRET = b"S3CR3T!#"
MHA = "ObjectType = Image\nNDims = 3\nDimSize = 8 1 1\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
NRRD = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 1 1\nencoding: raw\n"


@pytest.fixture
def secret(tmp_path):
    """A planted file that a crafted header points at (also under the name ``LoCaL``, which MetaIO
    reads as a relative file name, not as LOCAL)."""
    path = tmp_path / "planted_secret.bin"
    path.write_bytes(SECRET)
    (tmp_path / "LoCaL").write_bytes(SECRET)
    return path


def _refused(path, match, **kw):
    with pytest.raises(UserError, match=match) as info:
        read_volume(path, **kw)
    text = str(info.value)
    assert "S3CR" not in text and "\n" not in text and len(text) < 300
    return text


def _sitk_volume(path):
    """What SimpleITK itself gives, in read_volume's conventions."""
    img = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    lps[:3, 3] = img.GetOrigin()
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)), np.diag([-1.0, -1, 1, 1]) @ lps


@pytest.mark.parametrize("data_file", ["{secret}", "planted_secret.bin", "./planted_secret.bin",
                                       "../{parent}/planted_secret.bin", "LIST\nplanted_secret.bin",
                                       "LoCaL", "planted_secret.%d 1 1 1"])
def test_mha_element_data_file_naming_another_file_is_refused(tmp_path, secret, data_file):
    path = tmp_path / "p.mha"
    path.write_text(MHA + "ElementDataFile = " + data_file.format(secret=secret, parent=tmp_path.name) + "\n")
    _refused(path, "ElementDataFile names another file")


def test_mha_tricks_metaio_would_read_differently_are_refused(tmp_path, secret):
    # ':' is a MetaIO separator too
    (tmp_path / "a.mha").write_text(MHA + f"ElementDataFile: {secret}\n")
    _refused(tmp_path / "a.mha", "ElementDataFile names another file")
    # MetaIO reads "Comment\nElementDataFile = LOCAL" as one Comment field, then the "data" as header
    (tmp_path / "b.mha").write_text(MHA + f"Comment\nElementDataFile = LOCAL\n\nElementDataFile = {secret}\n")
    _refused(tmp_path / "b.mha", "malformed MetaIO header")
    # the HeaderSize trick of the original report
    (tmp_path / "c.mha").write_text(MHA + f"HeaderSize = 4\nElementDataFile = {secret}\n")
    _refused(tmp_path / "c.mha", "ElementDataFile names another file")


@pytest.mark.parametrize("field", ["data file: {secret}", "datafile: planted_secret.bin", "DATA FILE: {secret}",
                                   "data file: LIST\n{secret}"])
def test_nrrd_data_file_is_refused(tmp_path, secret, field):
    path = tmp_path / "p.nrrd"
    path.write_text(NRRD + field.format(secret=secret) + "\n\n")
    _refused(path, "'data file' field")
    # teem also ends lines at a lone CR
    path.write_text((NRRD + field.format(secret=secret) + "\n\n").replace("\n", "\r"))
    _refused(path, "'data file' field")


@pytest.mark.parametrize("suffix", DETACHED_SUFFIXES)
def test_detached_headers_are_refused(tmp_path, secret, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_text(NRRD + "data file: planted_secret.bin\n" if suffix == ".nhdr"
                    else MHA + "ElementDataFile = planted_secret.bin\n")
    _refused(path, "detached header")
    assert suffix not in SUFFIXES
    with pytest.raises(UserError, match="detached header"):
        check_writable(tmp_path / f"out{suffix}")


def test_nifti_header_image_pair_is_refused(tmp_path, secret):
    nib.save(nib.Nifti1Pair(np.zeros((8, 1, 1), np.uint8), np.eye(4)), tmp_path / "pair.hdr")
    shutil.copy(tmp_path / "pair.hdr", tmp_path / "p.nii")
    shutil.copy(secret, tmp_path / "p.img")
    _refused(tmp_path / "p.nii", "header/image pair")


def test_nifti2_is_refused_clearly(tmp_path):
    nib.save(nib.Nifti2Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v2.nii.gz")
    _refused(tmp_path / "v2.nii.gz", "NIfTI-2 files are not supported")


def test_zip_bomb_is_refused_with_max_bytes(tmp_path):
    path = tmp_path / "bomb.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), np.int16), np.eye(4)), path)
    assert path.stat().st_size < 1 << 20  # small on disk, 32 MiB unpacked
    _refused(path, r"32\.0 MiB unpacked, over the limit of 16\.0 MiB", max_bytes=16 << 20)
    assert read_volume(path).shape == (256, 256, 256)


def test_compressed_mha_and_nrrd_bombs_are_refused_with_max_bytes(tmp_path):
    zeros = np.zeros((128, 128, 128), np.int16)
    packed = zlib.compress(zeros.tobytes(), 9)  # MetaIO needs CompressedDataSize to find the stream
    (tmp_path / "bomb.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 128 128 128\nElementType = MET_SHORT\nCompressedData = True\n"
        b"CompressedDataSize = %d\nElementDataFile = LOCAL\n" % len(packed) + packed)
    (tmp_path / "bomb.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 128 128 128\nendian: little\n"
                                         b"encoding: gzip\n\n" + gzip.compress(zeros.tobytes(), 9))
    for name in ("bomb.mha", "bomb.nrrd"):
        _refused(tmp_path / name, r"4\.0 MiB unpacked, over the limit of 1\.0 MiB", max_bytes=1 << 20)
        assert read_volume(tmp_path / name, max_bytes=4 << 20).shape == (128, 128, 128)


def test_headers_claiming_huge_images_are_refused(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float64), np.eye(4))
    img.header.set_data_shape((30000, 30000, 30000))  # 216 TB of float64 in a 400-byte file
    with open(tmp_path / "huge.nii", "wb") as f:
        img.header.write_to(f)
    _refused(tmp_path / "huge.nii", "over any sensible size")
    (tmp_path / "huge.nrrd").write_text("NRRD0004\ntype: double\ndimension: 3\nsizes: 100000 100000 100000\n"
                                        "encoding: raw\n\n")
    _refused(tmp_path / "huge.nrrd", "over any sensible size")
    (tmp_path / "huge.mha").write_text("NDims = 3\nDimSize = 99999999999 1 1\nElementType = MET_UCHAR\n"
                                       "ElementDataFile = LOCAL\n")
    _refused(tmp_path / "huge.mha", "invalid image size")


def test_four_dimensional_headers_are_refused_up_front(tmp_path):
    (tmp_path / "t.nrrd").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 4\nsizes: 2 2 2 2\nencoding: raw\n\n"
                                      + bytes(16))
    _refused(tmp_path / "t.nrrd", "expected a single-channel 3-D image, the header gives a 4-D image 2x2x2x2")


@pytest.mark.parametrize("writer", ["nibabel", "SimpleITK", "nibabel-scaled", "nibabel-float64"])
def test_nan_and_inf_survive_nifti(tmp_path, writer):
    arr = np.linspace(-1000, 1000, 6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    arr[1, 2, 3], arr[0, 0, 0], arr[5, 4, 3], arr[2, 2, 2] = np.nan, np.inf, -np.inf, 0.0
    path = tmp_path / "nan.nii.gz"
    if writer == "SimpleITK":
        sitk.WriteImage(sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0))), str(path))
    else:
        img = nib.Nifti1Image(arr.astype(np.float64 if writer.endswith("64") else np.float32), np.eye(4))
        if writer.endswith("scaled"):
            img.header.set_slope_inter(2.0, 1.0)
        nib.save(img, path)
    vol = read_volume(path)
    assert np.isnan(vol.array[1, 2, 3]) and np.isnan(vol.array).sum() == 1
    assert vol.array[0, 0, 0] == np.inf and vol.array[5, 4, 3] == -np.inf
    finite = np.isfinite(arr)
    expect = arr * 2 + 1 if writer.endswith("scaled") else arr
    np.testing.assert_array_equal(vol.array[finite], expect[finite].astype(vol.array.dtype))
    with pytest.raises(UserError, match=r"1 NaN and 2 infinite"):
        check_finite(vol, "the input")


def test_nan_and_inf_survive_nrrd_and_mha(tmp_path):
    arr = np.zeros((4, 4, 4), np.float32)
    arr[1, 1, 1], arr[2, 2, 2] = np.nan, np.inf
    for suffix in (".nrrd", ".mha", ".nii.gz"):
        vol = read_volume(write_volume(Volume(arr, np.eye(4)), tmp_path / f"v{suffix}"))
        assert np.isnan(vol.array[1, 1, 1]) and vol.array[2, 2, 2] == np.inf, suffix


def test_messages_with_name_show_no_server_path(tmp_path, secret):
    bad = {"a.mha": MHA + f"ElementDataFile = {secret}\n", "b.nrrd": NRRD + f"data file: {secret}\n\n",
           "c.nrrd": "not an image", "d.mha": MHA + "ElementDataFile = LOCAL\n",  # d: no data
           "e.nhdr": NRRD, "f.txt": "x"}
    for fname, text in bad.items():
        (tmp_path / fname).write_text(text)
    # ITK's own failure: a NIfTI with a non-orthonormal direction
    aff = np.eye(4)
    aff[0, 1] = 0.5
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), aff), tmp_path / "g.nii.gz")
    with pytest.raises(FileNotFoundError) as info:
        read_volume(tmp_path / "missing.nrrd", name="input")
    assert str(info.value) == "input: file not found"
    for fname in sorted(bad) + ["g.nii.gz"]:
        with pytest.raises(UserError) as info:
            read_volume(tmp_path / fname, max_bytes=1 << 20, name="input")
        text = str(info.value)
        assert text.startswith("input: ") and len(text) < 300 and "\n" not in text, text
        for part in (str(tmp_path), tmp_path.name, fname, "/tmp", "pytest"):
            assert part not in text, (part, text)


@pytest.mark.parametrize("suffix,compress", [(".nii.gz", True), (".nii", False), (".nrrd", True), (".nrrd", False),
                                             (".mha", True), (".mha", False)])
def test_ordinary_files_read_as_simpleitk_reads_them(tmp_path, suffix, compress):
    rng = np.random.default_rng(1)
    arr = rng.integers(-1024, 2000, (7, 6, 5)).astype(np.int16)
    img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, 0, s, 0, -1, 0, -s, 0, c))  # oblique and flipped
    path = tmp_path / f"v{suffix}"
    sitk.WriteImage(img, str(path), useCompression=compress)
    want_arr, want_aff = _sitk_volume(path)
    vol = read_volume(path, max_bytes=1 << 20, name="input")
    assert vol.array.dtype == want_arr.dtype
    np.testing.assert_array_equal(vol.array, want_arr)
    np.testing.assert_array_equal(vol.affine, want_aff)
    np.testing.assert_array_equal(vol.array, arr)


# -- the data part must be what the header says ----------------------------------------------------
MHA_Z = "ObjectType = Image\nNDims = 3\nDimSize = {} 1 1\nElementType = MET_UCHAR\nCompressedData = True\n"


def _mha_z(path, voxels, payload, size=None):
    path.write_bytes(MHA_Z.format(voxels).encode() + b"CompressedDataSize = %d\nElementDataFile = LOCAL\n"
                     % (len(payload) if size is None else size) + payload)
    return path


def test_compressed_mha_whose_data_do_not_inflate_is_refused(tmp_path):
    # the review's file: ITK prints "Uncompress failed" and returns an uninitialised buffer
    _refused(_mha_z(tmp_path / "g.mha", 256, b"not zlib data at all" * 3), "damaged zlib data")
    data = bytes(range(256))
    packed = zlib.compress(data)
    _refused(_mha_z(tmp_path / "short.mha", 256, zlib.compress(data[:200])),
             "the compressed data hold 200 bytes of voxel data, the header says 256")
    _refused(_mha_z(tmp_path / "long.mha", 256, zlib.compress(data + b"more")), "hold more than the 256 bytes")
    _refused(_mha_z(tmp_path / "cut.mha", 256, packed[:-3]), "do not end properly")  # all data, no checksum
    _refused(_mha_z(tmp_path / "past.mha", 256, packed, size=len(packed) + 10), "runs past the end of the file")
    (tmp_path / "nosize.mha").write_bytes(MHA_Z.format(256).encode() + b"ElementDataFile = LOCAL\n" + packed)
    _refused(tmp_path / "nosize.mha", "CompressedData without CompressedDataSize")
    # valid compressed data still read: zlib and gzip streams (MetaIO takes both), trailing bytes ignored
    for i, payload in enumerate((packed, gzip.compress(data), packed + b"trailing")):
        vol = read_volume(_mha_z(tmp_path / f"ok{i}.mha", 256, payload), max_bytes=1 << 20)
        np.testing.assert_array_equal(vol.array.ravel(), np.frombuffer(data, np.uint8))


def test_gzip_nrrd_that_is_cut_short_or_damaged_is_refused(tmp_path):
    data = np.arange(4096, dtype=np.uint16).tobytes()
    head = b"NRRD0004\ntype: uint16\ndimension: 3\nsizes: 16 16 16\nendian: little\nencoding: gzip\n\n"
    packed = gzip.compress(data)
    (tmp_path / "cut.nrrd").write_bytes(head + packed[:len(packed) // 2])
    _refused(tmp_path / "cut.nrrd", r"the compressed data hold \d+ bytes of voxel data, the header says 8192")
    (tmp_path / "short.nrrd").write_bytes(head + gzip.compress(data[:3000]))
    _refused(tmp_path / "short.nrrd", "the compressed data hold 3000 bytes of voxel data, the header says 8192")
    (tmp_path / "bad.nrrd").write_bytes(head + b"x" * 5000)  # teem would read these bytes as the image
    _refused(tmp_path / "bad.nrrd", "damaged gzip data")
    bad_crc = bytearray(packed)
    bad_crc[-8] ^= 0xFF
    (tmp_path / "crc.nrrd").write_bytes(head + bytes(bad_crc))
    _refused(tmp_path / "crc.nrrd", "damaged gzip data")
    (tmp_path / "bz.nrrd").write_bytes(head.replace(b"gzip", b"bzip2") + data)
    _refused(tmp_path / "bz.nrrd", "bzip2-compressed NRRD data are not supported")
    (tmp_path / "zrl.nrrd").write_bytes(head.replace(b"gzip", b"zrl") + data)
    _refused(tmp_path / "zrl.nrrd", "'zrl'-encoded NRRD data are not supported")
    # still read: gzip members one after another, skipped lines and bytes, ascii
    want = np.frombuffer(data, np.uint16)
    ok = {"members.nrrd": head + gzip.compress(data[:1000]) + gzip.compress(data[1000:]),
          "skips.nrrd": head.replace(b"\n\n", b"\nline skip: 2\nbyte skip: 3\n\n") + b"one\r\ntwo\r"
                        + gzip.compress(b"xyz" + data),
          "rawskip.nrrd": head.replace(b"gzip\n\n", b"raw\nline skip: 1\nbyte skip: -1\n\n") + b"x\n" + data,
          "GZ.nrrd": head.replace(b"gzip", b"GZ") + packed + b"trailing bytes"}
    for fname, content in ok.items():
        (tmp_path / fname).write_bytes(content)
        np.testing.assert_array_equal(read_volume(tmp_path / fname).array.ravel(order="F"), want, fname)
    (tmp_path / "ascii.nrrd").write_text(NRRD.replace("raw", "ascii") + "\n" + " ".join(map(str, range(8))))
    np.testing.assert_array_equal(read_volume(tmp_path / "ascii.nrrd").array.ravel(), np.arange(8))


@pytest.mark.parametrize("suffix", [".nii", ".mha", ".nrrd"])
def test_raw_files_cut_short_are_refused(tmp_path, suffix):
    path = tmp_path / f"full{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 16, 16), np.int16)), str(path), useCompression=False)
    full = path.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(full[:-1000])
    _refused(tmp_path / f"cut{suffix}", "the file holds 3096 bytes of voxel data, the header says 4096")
    assert read_volume(path).array.sum() == 2048


def test_nii_gz_whose_stream_is_cut_short_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.arange(4096, dtype=np.int16).reshape(16, 16, 16), np.eye(4)), tmp_path / "v.nii")
    raw = (tmp_path / "v.nii").read_bytes()
    data = len(raw) - 352
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:-1000]))
    _refused(tmp_path / "short.nii.gz", f"the compressed data hold {data - 1000} bytes of voxel data, the header "
                                        f"says {data}")
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw)[:-2000])
    _refused(tmp_path / "cut.nii.gz", rf"the compressed data hold \d+ bytes of voxel data, the header says {data}")
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    np.testing.assert_array_equal(read_volume(tmp_path / "members.nii.gz").array,
                                  np.arange(4096, dtype=np.int16).reshape(16, 16, 16))


def test_max_voxels_is_checked_before_reading(tmp_path):
    paths = [write_volume(Volume(np.zeros((16, 16, 16), np.int16), np.eye(4)), tmp_path / f"v{s}") for s in SUFFIXES]
    for path in paths:
        text = _refused(path, "too large: the header gives 4096 voxels, over the limit of 4000 voxels",
                        max_voxels=4000, name="input")
        assert text.startswith("input: ")
        assert read_volume(path, max_voxels=4096).shape == (16, 16, 16)


def test_size_refusals_say_too_large(tmp_path):
    path = write_volume(Volume(np.zeros((64, 64, 64), np.int16), np.eye(4)), tmp_path / "v.nii.gz")
    assert "too large" in _refused(path, r"0\.5 MiB unpacked, over the limit of 0\.2 MiB", max_bytes=200_000)
    assert "too large" in _refused(path, "over the limit of 1000 voxels", max_voxels=1000)
    (tmp_path / "huge.nrrd").write_text("NRRD0004\ntype: double\ndimension: 3\nsizes: 100000 100000 100000\n"
                                        "encoding: raw\n\n")
    assert "too large" in _refused(tmp_path / "huge.nrrd", "over any sensible size")
