"""The Slicer module: geometry glue with real MRML from the slicer-core wheel, the worker thread,
and static checks that need no Slicer (lazy torch import, .ui widget names, CMake lists)."""
import ast
import re
import sys
import threading
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from conftest import ROOT

MODULE = ROOT / "MedDiffusion"
sys.path.insert(0, str(MODULE))

from MedDiffusionGlue.worker import Worker  # noqa: E402


# -- static checks --------------------------------------------------------------------------------------
def _module_ast():
    return ast.parse((MODULE / "MedDiffusion.py").read_text())


def test_module_imports_no_torch_at_module_level():
    heavy = {"torch", "MedDiffusionLib", "numpy", "SimpleITK", "nibabel", "safetensors", "huggingface_hub"}
    for node in _module_ast().body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        assert not [n for n in names if n.split(".")[0] in heavy], ast.dump(node)


EXPECTED_CLASSES = {
    "Button": {"QPushButton"}, "CollapsibleButton": {"ctkCollapsibleButton"}, "ComboBox": {"QComboBox"},
    "Selector": {"qMRMLNodeComboBox"}, "SpinBox": {"QSpinBox", "QDoubleSpinBox"}, "Label": {"QLabel"},
    "CheckBox": {"QCheckBox"}, "LineEdit": {"QLineEdit"}, "ProgressBar": {"QProgressBar"},
}


def _ui_widgets():
    tree = ET.parse(MODULE / "Resources" / "UI" / "MedDiffusion.ui")
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}, tree


def test_every_widget_used_in_python_exists_with_expected_class():
    widgets, _ = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "MedDiffusion.py").read_text()))
    assert used, "no widgets referenced?"
    for name in sorted(used):
        assert name in widgets, f"{name} is used in MedDiffusion.py but missing from the .ui"
        suffix = next(s for s in sorted(EXPECTED_CLASSES, key=len, reverse=True) if name.lower().endswith(s.lower()))
        assert widgets[name] in EXPECTED_CLASSES[suffix], (name, widgets[name])


def test_parameter_names_in_ui_match_parameter_node():
    _, tree = _ui_widgets()
    bound = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    cls = next(n for n in _module_ast().body if isinstance(n, ast.ClassDef) and n.name == "MedDiffusionParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert bound and bound <= fields, bound - fields


def test_cmake_lists_every_module_and_library_file():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+([\w/.${}-]+\.(?:py|ui|png|txt|json|safetensors))\s*$", cmake, re.M))
    listed = {p.replace("${MODULE_NAME}", "MedDiffusion") for p in listed}
    module_files = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    lib_files = {str(p.relative_to(ROOT)) for p in (ROOT / "MedDiffusionLib").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    missing = (module_files - {"CMakeLists.txt"}) | lib_files
    assert not missing - listed, sorted(missing - listed)
    assert not {p for p in listed if not ((MODULE / p).exists() or (ROOT / p).exists())}
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "add_subdirectory(MedDiffusion)"):
        assert key in top
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest" in cmake


def test_icon_is_128_png():
    data = (MODULE / "Resources" / "Icons" / "MedDiffusion.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 128 and int.from_bytes(data[20:24], "big") == 128


# -- worker thread ----------------------------------------------------------------------------------------
def test_worker_runs_jobs_reports_progress_and_errors():
    w = Worker()
    seen = []

    def work(job):
        for i in range(1, 4):
            job.progress(i, 3)
            seen.append(threading.current_thread().name)
        return 42

    job = w.submit("ok", work)
    assert job.wait(10) == 42 and job.step == 3 and job.total == 3
    assert set(seen) == {"MedDiffusionWorker"}
    bad = w.submit("bad", lambda j: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.wait(10)
    assert "ZeroDivisionError" in bad.error_details
    assert w.submit("again", lambda j: "still alive").wait(10) == "still alive"  # worker survives errors
    w.stop()


def test_worker_cancel_between_steps():
    from MedDiffusionLib.pipelines.loop import denoise
    from MedDiffusionLib.schedulers import Cancelled, make_scheduler
    import torch
    w = Worker()

    def slow_model(x, t):
        time.sleep(0.01)
        return torch.zeros_like(x)

    job = w.submit("sample", lambda j: denoise(make_scheduler("ddpm"), slow_model, torch.zeros(1, 1, 2, 2, 2),
                                               progress=j.progress, cancel=j.cancelled))
    while job.step < 3:
        time.sleep(0.005)
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait(10)
    assert job.step < 1000
    w.stop()


# -- geometry with real MRML (slicer-core) -----------------------------------------------------------------
if sys.platform == "linux" and sys.version_info[:2] == (3, 11):
    import slicer  # the test extra installs slicer-core here: a missing wheel must fail, not skip
else:  # no slicer-core wheel exists for this platform/Python
    slicer = pytest.importorskip("slicer", reason="slicer-core wheels exist for CPython 3.11 on Linux only")
from MedDiffusionGlue import geometry  # noqa: E402


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def test_generated_volume_in_node_has_spacing_origin_orientation(scene):
    from MedDiffusionLib.data.volumes import Volume
    dhw = np.random.rand(8, 6, 4).astype(np.float32)  # network order (D=Z, H=X, W=Y)
    vol = Volume.from_network(dhw, spacing=(0.7, 0.8, 2.5))
    node = geometry.volume_to_node(vol.array, vol.affine, scene, "gen")
    assert node.GetImageData().GetDimensions() == (6, 4, 8)
    assert np.allclose(node.GetSpacing(), (0.7, 0.8, 2.5)) and np.allclose(node.GetOrigin(), (0, 0, 0))
    np.testing.assert_allclose(geometry.node_ijk_to_ras(node), np.diag([0.7, 0.8, 2.5, 1.0]))
    arr, aff = geometry.node_to_volume(node)
    np.testing.assert_array_equal(arr, vol.array)
    # voxel (i, j, k) lands at RAS = affine @ (i, j, k): check one voxel through MRML's own matrix
    import vtk
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    assert np.allclose(m.MultiplyPoint((2, 3, 5, 1))[:3], (1.4, 2.4, 12.5))


def test_nifti_file_node_array_node_round_trip(scene, tmp_path):
    from MedDiffusionLib.data.volumes import Volume, read_volume, write_volume
    aff = np.array([[0, -0.8, 0, 10.0], [0.7, 0, 0, -20.0], [0, 0, -2.5, 30.0], [0, 0, 0, 1]])
    vol = Volume(np.random.rand(5, 6, 7).astype(np.float32), aff)
    write_volume(vol, tmp_path / "v.nii.gz")
    # read with Slicer's own reader (LPS on disk -> RAS node)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fromfile")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "v.nii.gz"))
    assert storage.ReadData(node)
    arr, ijk_to_ras = geometry.node_to_volume(node)
    # Slicer's reader may store the voxels in another order; the physical image must be the same
    ours, theirs = vol.canonical(), Volume(arr, ijk_to_ras).canonical()
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-5)
    np.testing.assert_allclose(theirs.array, ours.array, atol=1e-6)
    node2 = geometry.volume_to_node(arr, ijk_to_ras, scene, "copy")
    arr2, aff2 = geometry.node_to_volume(node2)
    np.testing.assert_array_equal(arr2, arr)
    np.testing.assert_allclose(aff2, ijk_to_ras, atol=1e-9)
    write_volume(Volume(arr2, aff2), tmp_path / "back.nii.gz")
    back = read_volume(tmp_path / "back.nii.gz").canonical()
    np.testing.assert_allclose(back.affine, ours.affine, atol=1e-5)
    np.testing.assert_allclose(back.array, ours.array, atol=1e-6)
    np.testing.assert_allclose(geometry.lps_to_ras(geometry.ras_to_lps(aff)), aff)


def test_segmentation_exports_to_model_labels_on_reference_grid(scene):
    ref = geometry.volume_to_node(np.zeros((20, 18, 16), np.float32),
                                  np.array([[-1.5, 0, 0, 5], [0, -1.5, 0, 7], [0, 0, 2.0, -3], [0, 0, 0, 1]]), scene, "ref")
    lab_arr = np.zeros((20, 18, 16), np.int16)
    lab_arr[2:8, 3:9, 4:10] = 1
    lab_arr[10:15, 5:12, 2:6] = 2
    labelmap = geometry.volume_to_node(lab_arr, geometry.node_ijk_to_ras(ref), scene, "lab",
                                       class_name="vtkMRMLLabelMapVolumeNode")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ImportLabelmapToSegmentationNode(labelmap, seg)
    ids = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert len(ids) == 2
    out = geometry.segmentation_to_labels(scene, seg, ref, {ids[0]: 4, ids[1]: 1})
    assert out.shape == lab_arr.shape
    np.testing.assert_array_equal(out == 4, lab_arr == 1)
    np.testing.assert_array_equal(out == 1, lab_arr == 2)
    assert scene.GetFirstNodeByName("__meddiffusion_tmp_labels") is None
    with pytest.raises(ValueError, match="not found"):
        geometry.segmentation_to_labels(scene, seg, ref, {"nope": 1})


def test_every_panel_action_maps_to_a_logic_method_in_the_readme():
    tree = _module_ast()
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedDiffusionWidget")
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedDiffusionLogic")
    logic_methods = {f.name for f in logic.body if isinstance(f, ast.FunctionDef)}
    readme = (ROOT / "README.md").read_text()
    handlers = [f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name.startswith("_on")
                and f.name not in ("_onModelChanged", "_onCancel")]
    assert len(handlers) >= 6
    for handler in handlers:
        called = {n.func.attr for n in ast.walk(handler) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                  and isinstance(n.func.value, (ast.Attribute, ast.Name))
                  and getattr(n.func.value, "attr", getattr(n.func.value, "id", "")) in ("logic", "MedDiffusionLogic")}
        public = {c for c in called if c in logic_methods and not c.startswith("_")}
        assert public, f"{handler.name} calls no public Logic method"
        for method in public:
            assert f"logic.{method}(" in readme, f"README has no console example of logic.{method}"
