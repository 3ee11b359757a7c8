"""Reproducing a marked result and exporting it as DICOM from Slicer, with real MRML (slicer-core
wheel): ``ServiceLogic.reproduce(node)`` re-runs the job the node's mark records on a real local job
service, downloads only the result the node is and compares it with the node's voxels, adding no
node to the scene; the input of a conditioned result is checked against the recorded sha256 the way
the service computes it. ``exportVolume(node, folder, format="dicom")`` runs ``meddiffusion export``
in a real child process; the series reads back with the library's reader. The rules the module
writes out (task parameters, tolerances, the input fingerprint) are the library's."""
import os
import sys
import time

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

from MedDiffusionGlue import outputs, service  # noqa: E402
from MedDiffusionGlue.nodes import NrrdEncoder, labels_encoder  # noqa: E402
from MedDiffusionGlue.service import InputError, ServiceLogic, WrongInput, segment_mapping  # noqa: E402
from test_slicer_export import OBLIQUE, PROV  # noqa: E402
from test_slicer_glue import _volume as glue_volume  # noqa: E402
from test_slicer_service import _load, sample_ct, served_logic  # noqa: E402,F401 (a fixture)
from MedDiffusionLib import jobspec, reproduce as libreproduce  # noqa: E402
from MedDiffusionLib.data.volumes import read_volume  # noqa: E402
from MedDiffusionLib.provenance import sha256_of  # noqa: E402

JOB = {"task": "generate", "model": "chest-ct-mini", "weights": None, "controlnet": None,
       "params": dict(jobspec.PARAM_DEFAULTS, **{"class": 1, "size": [64, 64, 64], "spacing": [4.8, 4.8, 4.3],
                                                  "seed": 3, "sampler": "ddim", "steps": 2, "hu": True,
                                                  "hu_window": [-1022.0, 525.0], "device": "cpu",
                                                  "preview_every": 5}),
       "output_format": ".nrrd"}


def _ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _voxels(node):
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())


# -- the rules written out in the module are the library's ------------------------------------------------------------
def test_task_parameters_tolerances_and_the_recorded_request_are_the_librarys():
    assert service.TASK_PARAMS == {k: v for k, v in jobspec.TASK_PARAMS.items() if k != "evaluate"}
    assert (service.MODEL_UNITS_TOLERANCE, service.DEFAULT_HU_WINDOW, service.SIMULATION_TOLERANCE_HU) == \
        (libreproduce.MODEL_UNITS_TOLERANCE, libreproduce.DEFAULT_HU_WINDOW, libreproduce.SIMULATION_TOLERANCE_HU)
    for prov in ({"task": "generate", "units": "HU", "hu_window": [-1022, 525]}, {"task": "reconstruct", "units": "HU"},
                 {"task": "generate", "units": "model units [-1, 1]"}, {"task": "simulate-sparse-view", "units": "HU"}):
        assert service.reproduce_tolerance(prov) == libreproduce._tolerance(prov), prov
    assert service.reproduce_tolerance({"task": "reconstruct", "units": "HU"}) == 5.0  # 2000 HU window -> 5 HU
    for job in (JOB, dict(JOB, task="reconstruct", model="chest-ct-mini", controlnet="chest-ct-mini-sparse-view")):
        request = service.recorded_request({"job": job}, device="cuda")
        lib = libreproduce.recorded_spec({"job": job}, device="cuda").to_dict()
        assert request["params"] == dict(lib["params"], preview_every=0)  # no live preview: it adds no node
        assert {k: v for k, v in request.items() if k != "params"} == \
            {k: lib[k] for k in ("task", "model", "weights", "controlnet", "output_format") if lib[k] is not None}
    with pytest.raises(InputError, match="records no job"):
        service.recorded_request({"job": {"task": "evaluate", "params": {}}})


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_the_input_fingerprint_is_the_sha256_the_service_computes_from_the_uploaded_nrrd(tmp_path, dtype):
    scene = slicer.vtkMRMLScene()
    kji = (np.random.default_rng(1).normal(0, 50, (5, 6, 7)) + 60).astype(dtype)
    node = glue_volume(scene, kji, OBLIQUE, "input")
    encoder = NrrdEncoder(node, str(tmp_path))
    served = read_volume(encoder.write(str(tmp_path / "input.nrrd"))).array  # what the service reads and hashes
    hasher = outputs.VoxelSha256(node.GetImageData())
    while not hasher.step(0.0):  # one slab a step at least
        pass
    assert hasher.hexdigest == sha256_of(served) == sha256_of(kji.transpose(2, 1, 0))
    # a label map through a look-up table, as a segmentation's labels are uploaded (int16)
    lut = np.array([0, 4, 2, 1, 3, 3, 3, 3] + [0] * 300, np.int16)
    labels = glue_volume(scene, (kji % 8).astype(np.uint8), OBLIQUE, "labels", cls="vtkMRMLLabelMapVolumeNode")
    encoder = NrrdEncoder(labels, str(tmp_path), lut=lut)
    served = read_volume(encoder.write(str(tmp_path / "labels.nrrd"))).array
    hasher = outputs.VoxelSha256(labels.GetImageData(), lut)
    assert hasher.step(10.0) and hasher.hexdigest == sha256_of(served) and served.dtype == np.int16


def test_the_voxel_difference_in_steps_is_numpys():
    rng = np.random.default_rng(2)
    old, new = rng.normal(size=300_001).astype(np.float32), rng.normal(size=300_001).astype(np.float32)
    diff = outputs.VoxelDifference(old, new)
    while not diff.step(0.0):
        pass
    expected = np.abs(old.astype(np.float64) - new.astype(np.float64))
    assert diff.max_abs == expected.max() and diff.mean_abs == pytest.approx(expected.mean(), rel=1e-12)
    new[7] = np.nan
    diff = outputs.VoxelDifference(old, new)
    assert diff.step(10.0) and np.isnan(diff.max_abs)  # never "equal"


def test_a_result_the_stepwise_reader_does_not_take_is_read_outside_the_scene(tmp_path):
    scene = slicer.vtkMRMLScene()
    kji = np.random.default_rng(4).normal(size=(5, 6, 7)).astype(np.float32)
    node = glue_volume(scene, kji, OBLIQUE, "result")
    path = outputs.export_volume(node, str(tmp_path / "result.nii.gz"))
    before = _ids(scene)
    voxels, dims, ijk_to_ras = outputs.read_standalone(path)
    assert _ids(scene) == before and dims == (7, 6, 5)
    np.testing.assert_array_equal(voxels, kji.reshape(-1))
    np.testing.assert_allclose(ijk_to_ras, OBLIQUE, atol=1e-5)


# -- refusals: one line, before anything is sent ----------------------------------------------------------------------
def test_a_node_without_provenance_or_job_and_a_wrong_input_count_are_refused_in_one_line():
    scene = slicer.vtkMRMLScene()
    logic = ServiceLogic(scene)  # no service: every refusal comes before a request
    kji = np.zeros((4, 5, 6), np.float32)
    plain = glue_volume(scene, kji, np.eye(4), "a CT")
    jobless = glue_volume(scene, kji, np.eye(4), "old result")
    outputs.mark_synthetic(jobless, {k: v for k, v in PROV.items() if k != "job"})
    generated = glue_volume(scene, kji, np.eye(4), "generated")
    outputs.mark_synthetic(generated, dict(PROV, task="generate", conditions_sha256={}, job=JOB))
    recon = glue_volume(scene, kji, np.eye(4), "recon")
    outputs.mark_synthetic(recon, dict(PROV, task="reconstruct", job=dict(JOB, task="reconstruct")))
    cases = [((None,), "select the result"), ((plain,), "'a CT' has no MedDiffusion provenance"),
             ((jobless,), "'old result': its provenance records no job to re-run"),
             ((generated, plain), "made from no input volume"),
             ((recon,), r"made from an input volume \(sha256 cdcdcdcdcdcd...\): give it"),
             ((scene.AddNewNodeByClass("vtkMRMLTableNode", "t"),), "is not a volume")]
    for args, message in cases:
        with pytest.raises(InputError, match=message) as info:
            logic.submitReproduce(*args)
        assert "\n" not in str(info.value)
    assert logic.server is None  # nothing was started or sent


# -- against a real local service -------------------------------------------------------------------------------------
def test_a_generated_result_reproduces_exactly_and_one_changed_voxel_does_not(served_logic):
    logic = served_logic
    node = logic.generate(sampler="ddim", steps=2, seed=3)
    prov = outputs.node_provenance(node)
    assert prov["result"] == "result_0.nrrd" and prov["job"]["params"]["seed"] == 3
    before = _ids(logic.scene)

    report = logic.reproduce(node)

    assert report["equal"] and report["max_abs"] == 0.0 and report["mean_abs"] == 0.0
    assert report["result"] == "result_0.nrrd" and report["task"] == "generate" and report["units"] == "HU"
    assert report["tolerance"] == pytest.approx(5e-3 * (525 + 1022) / 2) and not report["input_checked"]
    assert report["text"].startswith(f"reproduced {node.GetName()}: ") and report["notes"] == []
    assert _ids(logic.scene) == before  # the downloaded volume never entered the scene
    assert logic.client().jobs() == []  # the re-run job was deleted on the service

    voxels = _voxels(node)
    voxels[1234] += 100.0
    node.GetImageData().Modified()
    job = logic.submitReproduce(node)  # the panel's way: stepped by poll()
    while not job.done:
        logic.poll(job)
        logic._idle(0.02)
    assert logic.finishJob(job) == [] and _ids(logic.scene) == before
    report = job.report
    assert not report["equal"] and report["max_abs"] == pytest.approx(100.0, abs=1e-3)
    assert report["mean_abs"] == pytest.approx(100.0 / voxels.size, rel=1e-3)
    assert report["text"].startswith(f"DIFFERENT: {node.GetName()} and its re-run differ by up to 100 HU")


def test_a_reconstruction_reproduces_with_its_input_and_another_input_is_refused_before_the_upload(served_logic):
    logic = served_logic
    scene = logic.scene
    ct = sample_ct(scene)
    recon = logic.reconstructSparseView(ct, steps=2, device="cpu")
    before = _ids(scene)

    report = logic.reproduce(recon, ct)

    assert report["equal"] and report["max_abs"] == 0.0 and report["input_checked"], report
    assert report["result"] == "result_0.nrrd" and report["task"] == "reconstruct"
    assert report["tolerance"] == pytest.approx(service.reproduce_tolerance(outputs.node_provenance(recon)))
    assert _ids(scene) == before
    # a volume that is not the recorded input: refused after the local check, before anything is sent
    other = sample_ct(scene, "other")
    _voxels(other)[0] += 1
    other.GetImageData().Modified()
    before = _ids(scene)
    job = logic.submitReproduce(recon, other)
    while not job.done:
        logic.poll(job)
    assert job.id == "" and job.state == "failed"  # the service never named a job: nothing was submitted
    with pytest.raises(WrongInput, match="'other' is not the volume this result was made from") as info:
        logic.finishJob(job)
    assert isinstance(info.value, InputError) and "\n" not in str(info.value)
    with pytest.raises(WrongInput, match="'other' is not the volume"):  # the console's blocking call
        logic.reproduce(recon, other)
    assert logic.client().jobs() == [] and _ids(scene) == before


def test_a_sample_of_an_n_sample_job_reproduces_as_the_sample_it_is(served_logic):
    logic = served_logic
    ct = sample_ct(logic.scene)
    mean, std, proxy, sequence, browser = logic.reconstructSparseView(ct, steps=2, device="cpu", numSamples=2)
    browser.SetSelectedItemNumber(1)  # the proxy shows (and is marked as) the second sample: Slicer's sequences
    sequences = slicer.vtkSlicerSequencesLogic()  # logic updates it (a private one here: no application)
    sequences.SetMRMLScene(logic.scene)
    sequences.UpdateProxyNodesFromSequences(browser)
    sequences.SetMRMLScene(None)
    assert outputs.node_provenance(proxy)["result"] == "sample_1.nrrd"
    before = _ids(logic.scene)
    report = logic.reproduce(proxy, ct)
    assert report["equal"] and report["max_abs"] == 0.0 and report["result"] == "sample_1.nrrd", report
    report = logic.reproduce(std, ct)
    assert report["equal"] and report["result"] == "std.nrrd", report
    assert _ids(logic.scene) == before


def test_a_synthesized_result_reproduces_from_its_segmentation_and_mapping(served_logic):
    logic = served_logic
    scene = logic.scene
    ct = sample_ct(scene)
    seg = _load(scene, "MedDiffusionChestCT.seg.nrrd", "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode")
    mapping = segment_mapping(seg, "Air=0, Lung=1, Soft tissue=2, Bone=3, Tumour=4")
    out = logic.synthesizeFromSegmentation(seg, ct, mapping, steps=2, device="cpu")
    before = _ids(scene)

    report = logic.reproduce(out, seg, segmentLabels=mapping, referenceNode=ct)
    assert report["equal"] and report["max_abs"] == 0.0 and report["input_checked"], report
    # the result's own grid stands in for the reference it was made on
    assert logic.reproduce(out, seg, segmentLabels=mapping)["equal"]
    # a label map volume with the model's values is the same input (uploaded as int16, as the labels were)
    encoder = labels_encoder(scene, seg, ct, mapping, logic._newWorkDir(), logic=logic.segmentationsLogic)
    values = np.take(encoder.lut, numpy_support.vtk_to_numpy(encoder.image.GetPointData().GetScalars()), mode="clip")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    image = vtk.vtkImageData()
    image.SetDimensions(encoder.image.GetDimensions())
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values.astype(np.uint8), deep=True))
    labelmap.SetAndObserveImageData(image)
    labelmap.CopyOrientation(ct)
    assert _ids(scene) - before == {labelmap.GetID()}
    assert logic.reproduce(out, labelmap)["equal"]
    with pytest.raises(WrongInput, match="is not the volume this result was made from"):  # another mapping
        logic.reproduce(out, seg, segmentLabels=dict(mapping, **{next(iter(mapping)): 3}), referenceNode=ct)
    assert _ids(scene) - before == {labelmap.GetID()}


# -- DICOM export through the real child process ----------------------------------------------------------------------
@pytest.fixture()
def marked_node():
    scene = slicer.vtkMRMLScene()
    kji = np.random.default_rng(3).normal(-200, 300, (5, 6, 7)).astype(np.float32)
    prov = dict(PROV, job=dict(JOB, task="synthesize", controlnet="chest-ct-mini-labels"))
    node = glue_volume(scene, kji, OBLIQUE, "synthetic CT")
    outputs.mark_synthetic(node, prov)
    return scene, node, kji, prov


def test_a_marked_node_exports_as_a_marked_dicom_series_through_the_cli(tmp_path, marked_node):
    from MedDiffusionLib.io.dicom import dicom_provenance, read_dicom_series

    scene, node, kji, prov = marked_node
    logic = ServiceLogic(scene)
    logic.useLocalServer(sys.executable)  # the service's Python runs `meddiffusion export` (no server started)
    before = _ids(scene)
    folder = str(tmp_path / "series")

    assert logic.exportVolume(node, folder, format="dicom") == folder

    assert logic.server is None and _ids(scene) == before
    assert dicom_provenance(folder) == prov
    vol = read_dicom_series(folder)
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-4)
    step = float(np.ptp(kji)) / 64000  # int16 with a rescale slope of about range/64000
    np.testing.assert_allclose(vol.array, kji.transpose(2, 1, 0), atol=step)
    assert not [p for p in os.listdir(os.path.dirname(folder)) if p != "series"]  # no temporary files left
    # a non-empty folder is refused at once; with overwrite the earlier series is replaced
    with pytest.raises(InputError, match="already exists and is not empty"):
        logic.exportVolume(node, folder, format="dicom")
    assert ServiceLogic.exportVolume(node, folder, format="dicom", overwrite=True) == folder  # the console's class call
    assert dicom_provenance(folder) == prov


def test_dicom_export_refuses_an_unmarked_node_and_runs_stepwise_and_cancels(tmp_path, marked_node):
    scene, node, kji, prov = marked_node
    logic = ServiceLogic(scene)
    logic.useLocalServer(sys.executable, env={"MEDDIFFUSION_TEST_MARK": "1"})
    plain = glue_volume(scene, kji, OBLIQUE, "a CT")
    with pytest.raises(InputError, match="DICOM export is for MedDiffusion results: 'a CT' has no synthetic mark"):
        logic.exportVolume(plain, str(tmp_path / "plain"), format="dicom")
    with pytest.raises(InputError, match="format: 'png'"):
        logic.exportVolume(node, str(tmp_path / "x"), format="png")
    with pytest.raises(InputError, match="does not exist"):
        logic.startExportDicom(node, str(tmp_path / "missing" / "series"))
    # the panel's way: polled, each poll short; the child runs on the server's Python and environment
    export = logic.startExportDicom(node, str(tmp_path / "stepwise"))
    assert export.command[:4] == [sys.executable, "-m", "MedDiffusionLib.cli", "export"]
    assert export.command[-4:] == ["--format", "dicom", "--out", str(tmp_path / "stepwise")]
    assert export.env["MEDDIFFUSION_TEST_MARK"] == "1"
    assert export.env["PYTHONPATH"].split(os.pathsep)[0] == service.library_parent()
    longest, end = 0.0, time.monotonic() + 60
    while True:
        t0 = time.monotonic()
        rc = export.poll()
        longest = max(longest, time.monotonic() - t0)
        if rc is not None:
            break
        assert time.monotonic() < end
        time.sleep(0.02)
    assert rc == 0 and export.error is None and longest < 0.5
    assert not os.path.exists(export.work) and len(os.listdir(tmp_path / "stepwise")) == kji.shape[0]
    # the child's own refusal comes back as its one line (here: the series' folder became a file meanwhile)
    export = logic.startExportDicom(node, str(tmp_path / "late"))
    (tmp_path / "late").write_text("")
    with pytest.raises(InputError, match="the DICOM export failed: .*is a file"):
        export.wait(60)
    # Cancel stops the child; nothing is left behind
    export = logic.startExportDicom(node, str(tmp_path / "cancelled"))
    while export.process is None:
        export.poll()
    export.cancel()
    assert export.rc == -1 and export.process.process.poll() is not None
    assert not os.path.exists(export.work) and not os.path.exists(tmp_path / "cancelled")


# -- the panel: Reproduce and Export DICOM... in "Export and evaluate" (no Qt: stand-ins, the real logic) -------------
def _panel(tmp_path, logic=None, chosen=""):
    import types
    import xml.etree.ElementTree as ET

    from panel_fakes import UI, FakeTimer, FakeUI
    from test_slicer_add_weights import _load

    ns = _load(tmp_path)
    asked = []

    def getSaveFileName(parent, caption, path, filters):
        asked.append((caption, path, filters))
        return chosen

    ns["qt"].QFileDialog.getSaveFileName = getSaveFileName
    ns["slicer"].app.defaultScenePath = str(tmp_path)
    w = ns["MedDiffusionWidget"]()
    w.ui, w._timer = FakeUI(), FakeTimer()
    w.logic = logic or ns["MedDiffusionLogic"]()
    w._withService = lambda action: action()  # connected (the connection ticks are tested elsewhere)
    w._parameterNode = types.SimpleNamespace(
        segmentation=None, referenceVolume=None, fullCTVolume=None, fbpVolume=None, predictionVolume=None,
        evaluationReference=None, exportVolume=None, reproduceInput=None, sampler="ddim", useTrainedSize=True)
    widgets = {x.get("name"): x for x in ET.parse(UI).iter("widget")}
    return ns, w, asked, widgets


def _tick_until(w, attr, timeout=60.0):
    end = time.monotonic() + timeout
    while getattr(w, attr) is not None:
        assert time.monotonic() < end, f"{attr} did not finish"
        w._onTimer()
        time.sleep(0.02)


def test_the_panel_offers_reproduce_and_dicom_export_for_a_marked_result_only(tmp_path, marked_node):
    scene, node, kji, prov = marked_node
    ns, w, asked, widgets = _panel(tmp_path)
    for name, text in (("reproduceButton", "Reproduce"), ("exportDicomButton", "Export DICOM...")):
        props = {p.get("name"): next(iter(p)).text for p in widgets[name].findall("property")}
        assert widgets[name].get("class") == "QPushButton" and props["text"] == text and props["toolTip"]
    assert widgets["reproduceInputSelector"].get("class") == "qMRMLNodeComboBox"
    source = (ROOT / "MedDiffusion" / "MedDiffusion.py").read_text()
    for line in ('ui.reproduceButton.connect("clicked(bool)", guarded(self._onReproduce))',
                 'ui.exportDicomButton.connect("clicked(bool)", guarded(self._onExportDicom))'):
        assert line in source
    plain = glue_volume(scene, kji, OBLIQUE, "a CT")
    jobless = glue_volume(scene, kji, OBLIQUE, "old result")
    outputs.mark_synthetic(jobless, {k: v for k, v in prov.items() if k != "job"})
    for selected, dicom, reproduce in ((None, False, False), (plain, False, False), (jobless, True, False),
                                       (node, True, True)):
        w._parameterNode.exportVolume = selected
        w._updateButtons()
        assert (w.ui.exportDicomButton.enabled, w.ui.reproduceButton.enabled) == (dicom, reproduce), selected
        assert w.ui.exportButton.enabled == (selected is not None)
    w._parameterNode.exportVolume = plain
    w._updateButtons()
    assert w.ui.reproduceButton.toolTip == "Select a MedDiffusion result first"
    w._guardedCall(w._onReproduce)  # (a click on a disabled button cannot happen; the call refuses in one line)
    assert w.ui.statusLabel.text == "'a CT' has no MedDiffusion provenance: only a result made by MedDiffusion can " \
                                    "be reproduced"


def test_export_dicom_from_the_panel_runs_the_child_from_the_timer_and_says_where(tmp_path, marked_node):
    from MedDiffusionLib.io.dicom import dicom_provenance

    scene, node, kji, prov = marked_node
    folder = str(tmp_path / "series")
    ns, w, asked, _ = _panel(tmp_path, chosen=folder)
    w._parameterNode.exportVolume = node
    w._updateButtons()
    assert w.ui.exportDicomButton.enabled
    w._onExportDicom()
    assert asked == [("Export DICOM series (a new folder)", str(tmp_path / "synthetic_CT_dicom"),
                      "DICOM series folder (*)")]
    assert w._dicom is not None and w._timer.active and w.ui.cancelButton.enabled
    assert not w.ui.exportDicomButton.enabled and w.ui.exportButton.enabled  # one at a time; files still export
    assert w._dicom.command[0] == w._python()  # the Python field's interpreter (the local service's)
    _tick_until(w, "_dicom")
    assert w.ui.statusLabel.text == f"exported synthetic CT to {folder} as a DICOM series marked synthetic"
    assert dicom_provenance(folder) == prov and not w._timer.active and w.ui.exportDicomButton.enabled
    # a folder that is not empty: refused before anything starts, in one message
    w._guardedCall(w._onExportDicom)
    assert w._dicom is None and ns["shown"] == [(w.ui.statusLabel.text, {"windowTitle": "MedDiffusion"})]
    assert w.ui.statusLabel.text == f"{folder} already exists and is not empty: choose another folder for the " \
                                    "DICOM series"
    # the child's refusal (the folder became a file before it ran): one message, the panel usable again
    w._startDicomExport(node, str(tmp_path / "late"))
    (tmp_path / "late").write_text("")
    _tick_until(w, "_dicom")
    assert w.ui.statusLabel.text.startswith("DICOM export failed: ") and "is a file" in w.ui.statusLabel.text
    assert len(ns["shown"]) == 2 and "export" in ns["shown"][1][1]["detailedText"]
    assert w.ui.exportDicomButton.enabled and not w._timer.active
    # Cancel
    w._startDicomExport(node, str(tmp_path / "cancelled"))
    export = w._dicom
    w._onCancel()
    assert w._dicom is None and export.rc == -1 and w.ui.statusLabel.text == "the DICOM export was cancelled"
    w._onTimer()
    assert not w._timer.active and not (tmp_path / "cancelled").exists()


def test_reproduce_from_the_panel_shows_the_verdict_in_the_status_line(tmp_path, served_logic):
    logic = served_logic
    node = logic.generate(sampler="ddim", steps=2, seed=5)
    ns, w, _, _ = _panel(tmp_path, logic=logic)
    w._parameterNode.exportVolume = node
    w._updateButtons()
    assert w.ui.reproduceButton.enabled
    before = _ids(logic.scene)
    w._onReproduce()
    assert w._job is not None and w._timer.active and not w.ui.reproduceButton.enabled
    _tick_until(w, "_job")
    assert w.ui.statusLabel.text.startswith(f"reproduced {node.GetName()}: the re-run equals it within 3.868 HU")
    assert _ids(logic.scene) == before and w.ui.reproduceButton.enabled and ns["shown"] == []
