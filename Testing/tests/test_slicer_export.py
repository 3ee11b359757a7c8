"""Export keeps the synthetic mark, with real MRML (slicer-core wheel): a marked result node written
to NRRD, NIfTI or gzipped NIfTI reads back with the library's ``read_provenance`` (what
``meddiffusion info FILE`` shows) as the same provenance, with the same voxels and geometry; an
unmarked node is written plainly; the naming convention is the library's."""
import json
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "MedDiffusion"))

if sys.platform == "linux" and sys.version_info[:2] == (3, 11):
    import slicer  # the test extra installs slicer-core here: a missing wheel must fail, not skip
else:  # no slicer-core wheel exists for this platform/Python
    slicer = pytest.importorskip("slicer", reason="slicer-core wheels exist for CPython 3.11 on Linux only")

from MedDiffusionGlue import nodes, outputs  # noqa: E402
from test_slicer_glue import _volume as glue_volume  # noqa: E402
from MedDiffusionGlue.service import InputError, ServiceLogic  # noqa: E402
from MedDiffusionLib import provenance as libprov  # noqa: E402
from MedDiffusionLib.data.volumes import read_volume  # noqa: E402

_c, _s = np.cos(np.radians(30)), np.sin(np.radians(30))
OBLIQUE = np.eye(4)  # rotated 30 degrees about S, spacing 0.7 x 0.8 x 2.4 mm (NIfTI keeps only orthogonal axes)
OBLIQUE[:3, :3] = np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]]) @ np.diag([0.7, 0.8, 2.4])
OBLIQUE[:3, 3] = (10.0, -20.0, 30.0)
PROV = {"synthetic": True, "generator": "MedDiffusion", "generator_version": "0.1.0", "model": "chest-ct-mini",
        "model_revision": None, "weights_sha256": "ab" * 32, "controlnet": "chest-ct-mini-labels",
        "task": "synthesize", "seed": 3, "sampler": "ddim", "steps": 2, "class": 1, "size": None,
        "spacing": [0.7, 0.8, 2.4], "units": "HU", "hu_window": [-1022, 525],
        "conditions_sha256": {"input": "cd" * 32}, "device": "cpu", "torch_version": "2.6.0",
        "created": "2026-01-01T00:00:00+00:00", "decode_exact": True, "decode_method": "whole",
        "result": "result_0.nrrd",
        # values a naive writer would break: quotes, a backslash, a newline, ":=", non-ASCII
        "note": 'a "quoted" C:\\path\nsecond line := µ'}


def _volume(scene, kji, name="result (synthetic)", prov=PROV):
    node = glue_volume(scene, kji, OBLIQUE, name)
    if prov is not None:
        outputs.mark_synthetic(node, prov)
    return node


@pytest.fixture()
def marked():
    scene = slicer.vtkMRMLScene()
    kji = np.random.default_rng(0).normal(0, 300, (5, 6, 7)).astype(np.float32)
    return scene, _volume(scene, kji), kji


@pytest.mark.parametrize("name", ["ct.nrrd", "ct.nii", "ct.nii.gz", "CT.NII.GZ"])
def test_a_marked_node_exports_with_its_provenance(tmp_path, marked, name):
    scene, node, kji = marked
    path = ServiceLogic.exportVolume(node, str(tmp_path / name))  # the console's call
    assert path == str(tmp_path / name)
    assert libprov.read_provenance(path) == PROV  # what `meddiffusion info FILE` reads
    vol = read_volume(path)  # the library's reader: same voxels on the same grid
    np.testing.assert_array_equal(vol.array, kji.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-5)
    back = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "back")  # and Slicer reads it as it wrote it
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    assert storage.ReadData(back)
    np.testing.assert_allclose(nodes.geometry(back)[0], OBLIQUE, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name] + ([] if name.endswith(".nrrd") else [name.split(".")[0] + ".json"]))  # no temporary left
    if name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        descrip = bytes(nib.load(path).header["descrip"]).split(b"\0")[0]
        assert descrip == libprov.nifti_descrip(PROV) == b"SYNTHETIC MedDiffusion 0.1.0 chest-ct-mini synthesize"
        assert json.loads((tmp_path / (name.split(".")[0] + ".json")).read_text()) == PROV
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        fields = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys() if k.startswith("meddiffusion_")}
        assert fields == libprov.metadata_fields(PROV)  # the library writer's fields, byte for byte
        header = open(path, "rb").read(4096)
        assert b"encoding: gzip" in header and b"meddiffusion_synthetic:=true\n" in header


@pytest.mark.parametrize("name", ["plain.nrrd", "plain.nii.gz"])
def test_a_node_without_the_mark_exports_plainly(tmp_path, name):
    scene = slicer.vtkMRMLScene()
    kji = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    node = _volume(scene, kji, "a CT", prov=None)
    side = tmp_path / "plain.json"
    side.write_text(json.dumps(PROV))  # left by an earlier export of a marked node under this name
    other = tmp_path / "notes.json"
    other.write_text("{}")
    outputs.export_volume(node, str(tmp_path / name))
    assert libprov.read_provenance(tmp_path / name) is None
    np.testing.assert_array_equal(read_volume(tmp_path / name).array, kji.transpose(2, 1, 0))
    assert side.exists() == name.endswith(".nrrd")  # a NIfTI's MedDiffusion sidecar would mark it: removed
    assert other.exists()


def test_the_export_refuses_what_it_cannot_write(tmp_path, marked):
    scene, node, _ = marked
    for bad in ("ct.mha", "ct", ".nrrd", "ct.nii.gz.tmp"):
        with pytest.raises(InputError, match="export writes .nrrd, .nii or .nii.gz"):
            outputs.export_volume(node, str(tmp_path / bad))
    with pytest.raises(InputError, match="does not exist"):
        outputs.export_volume(node, str(tmp_path / "missing" / "ct.nrrd"))
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    with pytest.raises(InputError, match="vector"):
        outputs.export_volume(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="select the volume"):
        ServiceLogic.exportVolume(None, str(tmp_path / "none.nrrd"))
    assert list(tmp_path.iterdir()) == []
    # a JSON sidecar that is not ours (a real scan's BIDS sidecar) is never replaced
    (tmp_path / "scan.json").write_text('{"Modality": "CT"}')
    with pytest.raises(InputError, match="not a MedDiffusion sidecar"):
        outputs.export_volume(node, str(tmp_path / "scan.nii.gz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.json"]
    assert (tmp_path / "scan.json").read_text() == '{"Modality": "CT"}'


def test_the_mark_is_named_as_the_library_names_it():
    assert outputs.KEY_PREFIX == libprov.KEY_PREFIX and outputs.MARK == libprov.MARK
    assert outputs.GENERATOR == libprov.GENERATOR and outputs.NIFTI_DESCRIP_BYTES == libprov.NIFTI_DESCRIP_BYTES
    assert outputs.metadata_fields(PROV) == libprov.metadata_fields(PROV)
    long = dict(PROV, model="m" * 100)
    assert outputs.nifti_descrip(long) == libprov.nifti_descrip(long) and len(outputs.nifti_descrip(long)) == 79
    for name in ("a/b.nii.gz", "a/B.NII", "c.nrrd", "d.mha", "e.nhdr", "f.mhd", "g.tif", "h"):
        assert outputs.sidecar_path(name) == str(libprov.sidecar_path(name)), name
    # a node's attributes read back as the provenance they were made from
    scene = slicer.vtkMRMLScene()
    node = _volume(scene, np.zeros((2, 2, 2), np.float32))
    assert outputs.node_provenance(node) == PROV and outputs.is_synthetic(node)
    assert outputs.node_provenance(_volume(scene, np.zeros((2, 2, 2), np.float32), prov=None)) is None
