"""The Slicer module's MRML glue with real MRML (slicer-core wheel): result files become nodes with
the right geometry, inputs are written with Slicer's own storage, transforms and the subject
hierarchy are respected, segmentation export leaves nothing behind, vector volumes are refused."""
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "MedDiffusion"))

if sys.platform == "linux" and sys.version_info[:2] == (3, 11):
    import slicer  # the test extra installs slicer-core here: a missing wheel must fail, not skip
else:  # no slicer-core wheel exists for this platform/Python
    slicer = pytest.importorskip("slicer", reason="slicer-core wheels exist for CPython 3.11 on Linux only")
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from MedDiffusionGlue import nodes  # noqa: E402
from MedDiffusionGlue.service import segment_mapping  # noqa: E402

OBLIQUE = np.array([[0.0, -0.8, 0.3, 10.0], [0.7, 0.0, 0.0, -20.0], [0.0, 0.24, 2.4, 30.0], [0, 0, 0, 1]])


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def _volume(scene, kji: np.ndarray, ijk_to_ras: np.ndarray, name="vol", cls="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    image = vtk.vtkImageData()
    image.SetDimensions(kji.shape[2], kji.shape[1], kji.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(kji).reshape(-1), deep=True))
    node.SetAndObserveImageData(image)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(ijk_to_ras[r, c]))
    node.SetIJKToRASMatrix(m)
    return node


def _array(node) -> np.ndarray:
    dims = node.GetImageData().GetDimensions()
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])


def _names(scene):
    return sorted(scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes()))


@pytest.mark.parametrize("affine", [np.diag([0.7, 0.8, 2.5, 1.0]), OBLIQUE], ids=["axis-aligned", "oblique"])
def test_service_result_file_becomes_node_with_its_geometry(scene, tmp_path, affine):
    """A file written by the service (library writer, RAS affine, LPS on disk) loads with the same
    voxel -> RAS mapping, values and display range."""
    from MedDiffusionLib.data.volumes import Volume, write_volume
    ijk = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    write_volume(Volume(ijk, affine), tmp_path / "result_0.nrrd")
    node = nodes.read_volume(scene, str(tmp_path / "result_0.nrrd"), "result", window=(-1000, 500))
    matrix, dims = nodes.geometry(node)
    assert dims == (5, 6, 7)
    np.testing.assert_allclose(matrix, affine, atol=1e-5)
    np.testing.assert_allclose(_array(node), np.transpose(ijk, (2, 1, 0)), atol=1e-6)
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1500, -250))
    assert node.GetStorageNode() is None  # not tied to a temporary file


def test_input_written_with_slicer_storage_reads_back_in_the_library(scene, tmp_path):
    from MedDiffusionLib.data.volumes import read_volume
    kji = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    node = _volume(scene, kji, OBLIQUE)
    path = nodes.write_volume(node, str(tmp_path / "input.nrrd"))
    vol = read_volume(path)
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-5)
    np.testing.assert_array_equal(vol.array, np.transpose(kji, (2, 1, 0)))
    assert scene.GetNumberOfNodesByClass("vtkMRMLStorageNode") == 0  # the writer is not left in the scene


def test_result_goes_under_the_inputs_transform_and_next_to_it(scene, tmp_path):
    kji = np.zeros((4, 5, 6), np.float32)
    ct = _volume(scene, kji, OBLIQUE, "CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(shift)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.GetSceneItemID(), "study")
    sh.CreateItem(study, ct)
    path = nodes.write_volume(ct, str(tmp_path / "in.nrrd"))  # local geometry: the transform is not baked in
    out = nodes.read_volume(scene, path, "result", like=ct)
    assert out.GetTransformNodeID() == transform.GetID()
    np.testing.assert_allclose(nodes.geometry(out)[0], OBLIQUE, atol=1e-5)
    assert sh.GetItemParent(sh.GetItemByDataNode(out)) == study


def test_vector_and_empty_volumes_are_refused_with_a_clear_message(scene, tmp_path):
    vec = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vec.SetAndObserveImageData(image)
    with pytest.raises(nodes.InputError, match="vector .*single-component scalar volume"):
        nodes.write_volume(vec, str(tmp_path / "x.nrrd"))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(nodes.InputError, match="no image data"):
        nodes.check_scalar_volume(empty)
    with pytest.raises(nodes.InputError, match="select the full CT"):
        nodes.check_scalar_volume(None, "full CT volume")


def _segmentation(scene, ref, lab_kji):
    labelmap = _volume(scene, lab_kji, np.diag([1.5, 1.5, 2.0, 1.0]), "lab", "vtkMRMLLabelMapVolumeNode")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ImportLabelmapToSegmentationNode(labelmap, seg)
    scene.RemoveNode(labelmap)
    return seg, logic


def test_segmentation_export_writes_model_labels_and_leaves_no_nodes(scene, tmp_path):
    from MedDiffusionLib.data.volumes import read_volume
    ref = _volume(scene, np.zeros((10, 12, 14), np.float32), np.diag([1.5, 1.5, 2.0, 1.0]), "ref")
    lab = np.zeros((10, 12, 14), np.int16)
    lab[2:5, 3:8, 4:9] = 1
    lab[6:9, 2:6, 1:5] = 2
    seg, logic = _segmentation(scene, ref, lab)
    s = seg.GetSegmentation()
    s.GetNthSegment(0).SetName("Lung")
    s.GetNthSegment(1).SetName("Bone")
    mapping = segment_mapping(seg, "Air=0, lung=1, Soft tissue=2, BONE=3, Tumour=4")
    assert sorted(mapping.values()) == [1, 3]
    before = _names(scene)
    path = nodes.write_labels(scene, seg, ref, mapping, str(tmp_path / "labels.nrrd"), logic=logic)
    assert _names(scene) == before  # no temporary label map, no *_ColorTable
    assert not [n for n in _names(scene) if n.endswith("_ColorTable")]
    out = read_volume(path)
    kji = np.transpose(out.array, (2, 1, 0))
    np.testing.assert_array_equal(kji == 1, lab == 1)
    np.testing.assert_array_equal(kji == 3, lab == 2)
    np.testing.assert_allclose(out.affine, np.diag([1.5, 1.5, 2.0, 1.0]), atol=1e-6)
    with pytest.raises(nodes.InputError, match="not found"):
        nodes.write_labels(scene, seg, ref, {"nope": 1}, str(tmp_path / "x.nrrd"), logic=logic)
    with pytest.raises(nodes.InputError, match="no segment .* is named"):
        segment_mapping(seg, "Liver=1")
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    seg.SetAndObserveTransformNodeID(t.GetID())
    with pytest.raises(nodes.InputError, match="different transforms"):
        nodes.write_labels(scene, seg, ref, mapping, str(tmp_path / "x.nrrd"), logic=logic)


def test_preview_node_is_updated_in_place_and_removed_with_its_display(scene, tmp_path):
    from MedDiffusionLib.data.volumes import Volume, write_volume
    write_volume(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "p.nrrd")
    before = scene.GetNumberOfNodes()
    node = nodes.read_volume(scene, str(tmp_path / "p.nrrd"), "preview")
    write_volume(Volume(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "p.nrrd", overwrite=True)
    again = nodes.read_volume(scene, str(tmp_path / "p.nrrd"), "preview", node=node)
    assert again is node and _array(node).min() == 1
    nodes.remove_node(scene, node)
    assert scene.GetNumberOfNodes() == before + (1 if before == 0 else 0)  # only the subject hierarchy node
