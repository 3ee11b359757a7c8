"""DICOM export of synthetic volumes (:mod:`MedDiffusionLib.io.dicom`), on the real chest CT crop.

Written series are read back three ways (SimpleITK's GDCM series reader, pydicom file by file, and
:func:`read_dicom_series`) and compared with the NIfTI they came from, itself read by SimpleITK.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import UID

from conftest import DATA, ROOT
from MedDiffusionLib.data.volumes import LPS_TO_RAS, Volume, percentile_normalize, read_volume
from MedDiffusionLib.errors import UserError
from MedDiffusionLib.io import dicom
from MedDiffusionLib.io.dicom import (MAX_SLICES, PRIVATE_CREATOR, PRIVATE_GROUP, dicom_provenance, header_dump,
                                      read_dicom_series, write_dicom_series)

NIFTI = DATA / "lung2_crop.nii.gz"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def provenance(**over) -> dict:
    """A provenance dict with the fields :func:`MedDiffusionLib.provenance.job_provenance` writes."""
    prov = {
        "synthetic": True, "generator": "MedDiffusion", "generator_version": "0.1.0",
        "model": "meddiffusion-ct", "model_revision": "0123456789abcdef0123456789abcdef01234567",
        "weights_sha256": "ab" * 32, "controlnet": None, "task": "generate", "seed": 1234, "sampler": "ddim",
        "steps": 50, "class": 1, "size": [128, 128, 24], "spacing": [2.5078125, 2.5078125, 5.0], "units": "HU",
        "hu_window": [-1000.0, 1000.0], "conditions_sha256": {}, "device": "cpu", "torch_version": "2.5.1",
        "created": "2025-03-04T05:06:07+00:00", "decode_exact": True, "decode_method": "full",
        "job": {"task": "generate", "model": "meddiffusion-ct", "weights": None, "controlnet": None,
                "params": {"seed": 1234, "steps": 50, "class": 1, "note": "back\\slash ünïcode"},
                "output_format": "dicom"},
    }
    prov.update(over)
    return prov


@pytest.fixture(autouse=True)
def _strict_pydicom(monkeypatch):
    """Every value the writer sets must be valid for its VR (length, characters)."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


@pytest.fixture(scope="module")
def source() -> Volume:
    return read_volume(NIFTI)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    assert write_dicom_series(source, folder, provenance()) == folder
    return folder


def headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings a write left behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# -- round trips -------------------------------------------------------------------------------------
def test_ct_geometry_and_values_match_the_nifti(source, exported):
    nifti = sitk.ReadImage(str(NIFTI))
    img = sitk_series(exported)
    assert img.GetSize() == nifti.GetSize() == (128, 128, 24)
    np.testing.assert_allclose(img.GetSpacing(), nifti.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(img.GetOrigin(), nifti.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), nifti.GetDirection(), atol=1e-9)
    assert img.GetPixelID() == sitk.sitkInt16  # slope 1, intercept 0: integer HU stay integers
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(nifti))

    back = read_dicom_series(exported)
    assert back.shape == source.shape and back.array.dtype == np.int16
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)
    np.testing.assert_array_equal(back.array, source.array)


def test_pydicom_sees_each_slice_where_the_affine_puts_it(source, exported):
    dss = headers(exported)
    assert len(dss) == source.shape[2] == 24
    lps = LPS_TO_RAS @ source.affine
    normal = np.cross(*np.array(dss[0].ImageOrientationPatient, float).reshape(2, 3))
    assert [int(ds.InstanceNumber) for ds in dss] == list(range(1, 25))  # file names in instance order
    along = [float(np.array(ds.ImagePositionPatient, float) @ normal) for ds in dss]
    assert along == sorted(along)  # instances ascend along the normal, as readers sort them
    for k, ds in enumerate(dss):
        np.testing.assert_allclose(np.array(ds.ImagePositionPatient, float), (lps @ [0, 0, k, 1])[:3], atol=1e-6)
        assert (ds.Rows, ds.Columns) == (128, 128)
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == 0 and ds.RescaleType == "HU"
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu.T, source.array[:, :, k])
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 5.0


def test_oblique_anisotropic_grid_round_trips(tmp_path):
    """Rows are j and columns i; PixelSpacing is (row, column) = (spacing_j, spacing_i)."""
    rng = np.random.default_rng(0)
    arr = rng.integers(-1024, 3000, size=(5, 7, 4)).astype(np.int16)
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array([0.7, 1.3, 2.1])[None, :]
    affine[:3, 3] = [12.25, -40.5, 7.0]
    vol = Volume(arr, affine)
    write_dicom_series(vol, tmp_path / "obl", provenance())
    ds = headers(tmp_path / "obl")[0]
    assert (ds.Rows, ds.Columns) == (7, 5)
    assert [float(v) for v in ds.PixelSpacing] == [1.3, 0.7]
    back = read_dicom_series(tmp_path / "obl")
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(back.array, arr)


def test_left_handed_grid_comes_back_with_the_slice_axis_reversed(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    affine = np.diag([-1.5, 1.0, 2.0, 1.0])  # RAS, det < 0
    write_dicom_series(Volume(arr, affine), tmp_path / "lh", provenance())
    back = read_dicom_series(tmp_path / "lh")
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = 4
    np.testing.assert_allclose(back.affine, affine @ flip, atol=1e-9)  # same voxels, same places
    np.testing.assert_array_equal(back.array, arr[:, :, ::-1])


def test_model_units_round_trip_within_the_slope(source, tmp_path):
    units, _, _ = percentile_normalize(source.array.astype(np.float32))
    vol = source.with_array(units)
    write_dicom_series(vol, tmp_path / "mu", provenance(units="model units [-1, 1]", hu_window=None))
    ds = headers(tmp_path / "mu")[0]
    slope = float(ds.RescaleSlope)
    assert 0 < slope <= 2 / 60000 and ds.RescaleType == "US" and ds.SOPClassUID == CT
    back = read_dicom_series(tmp_path / "mu")
    assert np.issubdtype(back.array.dtype, np.floating)
    assert np.abs(back.array - units).max() <= slope / 2 + 1e-6
    img = sitk_series(tmp_path / "mu")
    assert np.abs(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)) - units).max() <= slope / 2 + 1e-6


def test_non_integer_hu_and_wide_integers_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    floats = rng.uniform(-1000.0, 2500.0, size=(6, 5, 3)).astype(np.float32)
    write_dicom_series(Volume(floats, np.eye(4)), tmp_path / "f", provenance())
    slope = float(headers(tmp_path / "f")[0].RescaleSlope)
    assert np.abs(read_dicom_series(tmp_path / "f").array - floats).max() <= slope / 2 + 1e-3
    wide = rng.integers(30000, 90000, size=(6, 5, 3)).astype(np.int32)  # integers beyond int16, span < 65536
    write_dicom_series(Volume(wide, np.eye(4)), tmp_path / "w", provenance())
    ds = headers(tmp_path / "w")[0]
    assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) != 0
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "w").array, wide)


def test_mr_modality(source, tmp_path):
    units, _, _ = percentile_normalize(source.array.astype(np.float32))
    prov = provenance(model="meddiffusion-mr", units="model units [-1, 1]", hu_window=None, **{"class": 3})
    for name, kw in (("asked", {"modality": "mr"}), ("from-class", {})):  # class 3 is "MR T1 brain"
        write_dicom_series(source.with_array(units), tmp_path / name, prov, **kw)
        ds = headers(tmp_path / name)[0]
        assert ds.SOPClassUID == MR and ds.file_meta.MediaStorageSOPClassUID == MR and ds.Modality == "MR"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.RescaleType == "US"
        assert ds.ScanningSequence == "RM" and ds.MRAcquisitionType == "3D"
        back = read_dicom_series(tmp_path / name)
        assert np.abs(back.array - units).max() <= float(ds.RescaleSlope) / 2 + 1e-6
    write_dicom_series(source, tmp_path / "ct", prov, modality="CT")
    assert headers(tmp_path / "ct")[0].Modality == "CT"
    with pytest.raises(UserError, match="HU"):
        write_dicom_series(source, tmp_path / "bad", provenance(), modality="MR")


# -- marks, identity, UIDs ---------------------------------------------------------------------------
def test_marked_synthetic_and_provenance_round_trips(exported):
    dss = headers(exported)
    for ds in dss:
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL", "SYNTHETIC"]
        assert ds.SOPClassUID == CT and ds.Modality == "CT" and ds.BurnedInAnnotation == "NO"
        for text in (ds.DerivationDescription, ds.ImageComments, ds.SeriesDescription, ds.StudyDescription):
            assert text.startswith("SYNTHETIC") and "MedDiffusion" in text and "meddiffusion-ct" in text
        assert ds.Manufacturer == "MedDiffusion" and ds.ManufacturerModelName == "meddiffusion-ct"
        assert list(ds.SoftwareVersions) == ["MedDiffusion 0.1.0", "torch 2.5.1"]
        assert (ds.ContentDate, ds.ContentTime) == ("20250304", "050607")
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert block[0x00].VR == "UT" and json.loads(block[0x00].value) == provenance()
    assert dicom_provenance(exported) == provenance()
    assert dicom_provenance(sorted(exported.iterdir())[-1]) == provenance()  # a single file works too
    dump = header_dump(exported)
    assert "DERIVED\\SECONDARY" in dump and "MedDiffusion provenance (JSON)" in dump
    assert "Pixel Data" not in dump and "(7FE0,0010)" not in dump


def test_no_patient_identity_and_fresh_uids(source, exported, tmp_path):
    dss = headers(exported)
    for ds in dss:
        patient = {elem.keyword: elem.value for elem in ds if elem.tag.group == 0x0010}
        assert set(patient) == {"PatientName", "PatientID", "PatientBirthDate", "PatientSex"}
        assert str(patient["PatientName"]) == "SYNTHETIC^MedDiffusion" and patient["PatientID"].startswith("SYN-")
        assert patient["PatientBirthDate"] == "" and patient["PatientSex"] == ""
        texts = " ".join(str(e.value) for e in ds if e.VR in ("LO", "LT", "ST", "SH", "PN", "UT", "CS"))
        assert "lung2" not in texts and str(DATA) not in texts
    assert len({ds.PatientID for ds in dss}) == 1
    shared = {"StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"}
    for key in shared:
        assert len({ds[key].value for ds in dss}) == 1
    sops = [ds.SOPInstanceUID for ds in dss]
    assert len(set(sops)) == len(sops) == 24
    assert all(ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID for ds in dss)
    uids = sops + [dss[0][key].value for key in shared]
    assert len(set(uids)) == len(uids) and all(UID(u).is_valid for u in uids)

    again = headers(write_dicom_series(source, tmp_path / "again", provenance()))
    assert not set(uids) & {u for ds in again for u in [ds.SOPInstanceUID] + [ds[k].value for k in shared]}
    assert again[0].PatientID != dss[0].PatientID


# -- refusals and atomic writes ----------------------------------------------------------------------
def _bad_inputs(source: Volume) -> dict[str, tuple[Volume, dict, dict, str]]:
    nan = source.array.astype(np.float32)
    nan[3, 4, 5] = np.nan
    inf = source.array.astype(np.float32)
    inf[0, 0, 0] = np.inf
    sheared = source.affine.copy()
    sheared[0, 1] = 1.0
    flat = source.affine.copy()
    flat[:, 2] = 0
    return {
        "2-D": (Volume(source.array[:, :, 0], source.affine), {}, {}, "3-D"),
        "4-D": (Volume(source.array[..., None], source.affine), {}, {}, "3-D"),
        "NaN": (source.with_array(nan), {}, {}, "NaN or infinite"),
        "inf": (source.with_array(inf), {}, {}, "NaN or infinite"),
        "complex": (source.with_array(source.array.astype(np.complex64)), {}, {}, "real numbers"),
        "sheared": (Volume(source.array, sheared), {}, {}, "not orthogonal"),
        "zero spacing": (Volume(source.array, flat), {}, {}, "zero voxel spacing"),
        "too many slices": (Volume(np.zeros((1, 1, MAX_SLICES + 1), np.int16), np.eye(4)), {}, {}, "limit"),
        "modality": (source, {}, {"modality": "PET"}, "CT or MR"),
        "not synthetic": (source, {"synthetic": False}, {}, "synthetic"),
        "not JSON": (source, {"seed": {1, 2}}, {}, "not plain JSON"),
        "NaN in provenance": (source, {"seed": float("nan")}, {}, "not plain JSON"),
        "huge provenance": (source, {"note": "x" * 70000}, {}, "over the limit"),
    }


def test_refusals_write_nothing_and_keep_the_old_series(source, exported, tmp_path):
    keep = tmp_path / "keep"
    shutil.copytree(exported, keep)
    before = {p.name: p.read_bytes() for p in keep.iterdir()}
    for name, (vol, prov_over, kw, match) in _bad_inputs(source).items():
        with pytest.raises(UserError, match=match):
            write_dicom_series(vol, tmp_path / "new", provenance(**prov_over), **kw)
        with pytest.raises(UserError, match=match):
            write_dicom_series(vol, keep, provenance(**prov_over), overwrite=True, **kw)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"], name
        assert {p.name: p.read_bytes() for p in keep.iterdir()} == before, name


def test_folder_refusals(source, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        write_dicom_series(source, tmp_path / "file", provenance(), overwrite=True)
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(UserError, match="symbolic link"):
        write_dicom_series(source, tmp_path / "link", provenance())
    with pytest.raises(FileNotFoundError):
        write_dicom_series(source, tmp_path / "missing" / "out", provenance())
    with pytest.raises(UserError, match="folder"):
        write_dicom_series(source, "/", provenance())
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_dicom_series(source, other, provenance())
    with pytest.raises(UserError, match="other things than DICOM"):  # overwrite never deletes unrelated files
        write_dicom_series(source, other, provenance(), overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(leftovers(tmp_path)) == []


def test_overwrite_semantics(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is simply used
    write_dicom_series(source, out, provenance())
    first = headers(out)[0].SeriesInstanceUID
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dicom_series(source, out, provenance())
    assert headers(out)[0].SeriesInstanceUID == first and len(list(out.iterdir())) == 24
    small = Volume(source.array[:, :, :5], source.affine)
    write_dicom_series(small, out, provenance(), overwrite=True)  # replaced whole: no slice of the old one left
    dss = headers(out)
    assert len(dss) == 5 and {ds.SeriesInstanceUID for ds in dss} != {first}
    assert leftovers(tmp_path) == []


# -- reading -----------------------------------------------------------------------------------------
def test_read_refusals(source, exported, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(exported, two)
    for p in write_dicom_series(Volume(source.array[:, :, :3], source.affine), tmp_path / "b", provenance()).iterdir():
        shutil.copy(p, two / f"b-{p.name}")
    with pytest.raises(UserError, match="2 DICOM series"):
        read_dicom_series(two)
    gap = tmp_path / "gap"
    shutil.copytree(exported, gap)
    (gap / "IM00010.dcm").unlink()
    with pytest.raises(UserError, match="not evenly spaced"):
        read_dicom_series(gap)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no files"):
        read_dicom_series(empty)
    (empty / "readme.txt").write_text("not DICOM")
    with pytest.raises(UserError, match="no DICOM series"):
        read_dicom_series(empty)
    with pytest.raises(UserError, match="no DICOM file"):
        dicom_provenance(empty)
    with pytest.raises(UserError, match="not a folder"):
        read_dicom_series(empty / "readme.txt")
    linked = tmp_path / "linked"
    shutil.copytree(exported, linked)
    os.symlink(NIFTI, linked / "zz.dcm")
    with pytest.raises(UserError, match="symbolic link"):
        read_dicom_series(linked)
    many = tmp_path / "many"
    many.mkdir()
    for n in range(MAX_SLICES + dicom.SPARE_ENTRIES + 1):
        (many / f"{n}.dcm").touch()
    with pytest.raises(UserError, match="more than"):
        read_dicom_series(many)
    with pytest.raises(UserError, match="too large"):
        read_dicom_series(exported, max_voxels=1000)


def test_provenance_reader_bounds(exported, tmp_path):
    first = sorted(exported.iterdir())[0]
    ds = pydicom.dcmread(first)
    tag = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR).get_tag(0x00)
    (tmp_path / "none").mkdir()
    plain = pydicom.dcmread(first)
    del plain[tag]
    plain.save_as(tmp_path / "none" / "a.dcm")
    assert dicom_provenance(tmp_path / "none") is None
    for name, value, match in (("big", "{}" + " " * (70 * 1024), "over the limit"), ("junk", "not json", "valid JSON"),
                               ("list", "[1, 2]", "JSON object")):
        (tmp_path / name).mkdir()
        ds[tag].value = value
        ds.save_as(tmp_path / name / "a.dcm")
        with pytest.raises(UserError, match=match):
            dicom_provenance(tmp_path / name)


def test_module_is_light():
    """Writing DICOM needs neither torch nor SimpleITK: importing the module loads neither."""
    import subprocess

    code = "import sys, MedDiffusionLib.io.dicom; print(sorted({'torch', 'SimpleITK'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    assert PRIVATE_GROUP % 2 == 1  # private groups are odd


def test_a_write_that_fails_midway_leaves_the_old_series(exported, tmp_path):
    """A real I/O failure while writing the slices (a file-size limit: writing fails with EFBIG)
    removes the temporary folder and leaves the series that was there untouched."""
    import subprocess
    import sys

    keep = tmp_path / "keep"
    shutil.copytree(exported, keep)
    before = {p.name: p.read_bytes() for p in keep.iterdir()}
    script = (
        "import resource, signal, sys\n"
        "from MedDiffusionLib.data.volumes import read_volume\n"
        "from MedDiffusionLib.io.dicom import write_dicom_series\n"
        "vol = read_volume(sys.argv[1])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # a slice file is about 33 KB\n"
        "try:\n"
        "    write_dicom_series(vol, sys.argv[2], {'synthetic': True, 'units': 'HU'}, overwrite=True)\n"
        "except OSError as err:\n"
        "    print('failed', err.errno)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", script, str(NIFTI), str(keep)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert run.returncode == 0 and run.stdout.split()[0] == "failed", run.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in keep.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
