"""Scene hygiene of the Slicer module's logic, with real MRML (slicer-core wheel):

- the segmentation export leaves nothing behind however often it runs (Slicer names the second
  colour table ``<seg>_ColorTable_1``: it is removed by reference, not by name);
- segments without a model label are proposed one from their names and terminology, and are
  reported before a job starts instead of silently becoming label 0;
- closing the scene during a job (``onSceneClosing`` + ``Clear``) cancels it and adds nothing,
  against a real local job service (``LocalServer`` child process, this interpreter).
"""
import sys

import numpy as np
import pytest

from conftest import DATA, ROOT

sys.path.insert(0, str(ROOT / "MedDiffusion"))

if sys.platform == "linux" and sys.version_info[:2] == (3, 11):
    import slicer  # the test extra installs slicer-core here: a missing wheel must fail, not skip
else:  # no slicer-core wheel exists for this platform/Python
    slicer = pytest.importorskip("slicer", reason="slicer-core wheels exist for CPython 3.11 on Linux only")
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from MedDiffusionGlue import nodes  # noqa: E402
from MedDiffusionGlue.service import InputError, JobCancelled, ServiceLogic, segment_mapping  # noqa: E402

LABELS_NET = {"name": "chest-ct-mini-labels", "task": "labels", "base_model": "chest-ct-mini", "class": 1,
              "label_values": [0, 1, 2, 3, 4], "hu_window": [-1022, 525]}  # as the service's health lists it


def _volume(scene, kji, name="ref", cls="vtkMRMLScalarVolumeNode", spacing=(1.5, 1.5, 2.0)):
    node = scene.AddNewNodeByClass(cls, name)
    image = vtk.vtkImageData()
    image.SetDimensions(kji.shape[2], kji.shape[1], kji.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(kji).reshape(-1), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    return node


def _segmentation(scene, names, shape=(8, 10, 12)):
    """A segmentation node "seg" with one box segment per name (on a grid like the reference's)."""
    lab = np.zeros(shape, np.int16)
    for i in range(len(names)):
        lab[1:3, i % shape[1], 1 + i % (shape[2] - 1)] = i + 1
    labelmap = _volume(scene, lab, "lab", "vtkMRMLLabelMapVolumeNode")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ImportLabelmapToSegmentationNode(labelmap, seg)
    scene.RemoveNode(labelmap)
    s = seg.GetSegmentation()
    assert s.GetNumberOfSegments() == len(names)
    for i, name in enumerate(names):
        s.GetNthSegment(i).SetName(name)
    return seg, logic


def _node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _names(scene):
    return sorted(scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes()))


# -- 1. the export's own colour table is removed by reference --------------------------------------------------
def test_three_exports_in_a_row_leave_no_colour_table_and_no_other_node(tmp_path):
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)  # Slicer's scene always has one
    ref = _volume(scene, np.zeros((8, 10, 12), np.float32))
    seg, logic = _segmentation(scene, ["Lung", "Bone"])
    # a colour table the user made earlier (Segmentations > Export) under the name the first export would take
    users = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "seg_ColorTable")
    users.SetTypeToUser()
    s = seg.GetSegmentation()
    mapping = {s.GetNthSegmentID(0): 1, s.GetNthSegmentID(1): 3}
    before, names = _node_ids(scene), _names(scene)
    for run in range(3):
        nodes.write_labels(scene, seg, ref, mapping, str(tmp_path / f"labels{run}.nrrd"), logic=logic)
        leftovers = [n for n in _names(scene) if "ColorTable" in n and n != "seg_ColorTable"]
        assert leftovers == [], f"after export #{run + 1}: {leftovers}"
        assert _node_ids(scene) == before and _names(scene) == names
    assert scene.IsNodePresent(users)  # the user's own table, though named like an export's, stays


# -- 2. segment -> label: proposals, and no silent label 0 --------------------------------------------------------
SEGMENTS = {  # segment name -> the label the proposal must pick (None: nothing matches, the user chooses)
    "lung": "Lung", "left lung": "Lung", "Right lung": "Lung", "lung_upper_lobe_left": "Lung",
    "bone": "Bone", "Ribs": "Bone", "rib_left_3": "Bone", "spine": "Bone", "vertebra": "Bone", "vertebrae_T5": "Bone",
    "soft tissue": "Soft tissue", "Soft-tissue": "Soft tissue", "body": "Soft tissue", "muscle": "Soft tissue",
    "tumor": "Tumour", "Tumour": "Tumour", "nodule": "Tumour", "lung nodule": "Tumour", "Lesion 2": "Tumour",
    "air": "Air", "Background": "Air",
    "Liver": None, "Segment_1": None, "airway": None,
}


def test_proposed_mapping_from_names_and_terminology():
    from MedDiffusionGlue.service import controlnet_label_names

    labels = controlnet_label_names(LABELS_NET)
    assert labels == {0: "Air", 1: "Lung", 2: "Soft tissue", 3: "Bone", 4: "Tumour"}
    assert controlnet_label_names({"label_values": [0, 1], "label_names": ["Background", "Liver"]}) == \
        {0: "Background", 1: "Liver"}
    assert controlnet_label_names({"label_values": [0, 7]}) == {0: "Label 0", 7: "Label 7"}

    scene = slicer.vtkMRMLScene()
    names = list(SEGMENTS) + ["Segment_2", "Segment_3"]
    seg, _ = _segmentation(scene, names, shape=(4, 30, 30))
    s = seg.GetSegmentation()
    # Slicer's terminology entries (vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry, v5.10.0)
    s.GetNthSegment(len(SEGMENTS)).SetTerminology(
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^39607008^Lung~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^")
    s.GetNthSegment(len(SEGMENTS) + 1).SetTerminology(
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered "
        "Structure~SCT^27925004^Nodule~^^~Anatomic codes - DICOM master list~^^~^^")
    # every other segment keeps Slicer's default entry (type "Tissue"): it must not make them "Soft tissue"
    assert "85756007" in nodes.segment_terminology(s.GetNthSegment(0))

    proposal = ServiceLogic.proposeSegmentMapping(seg, labels)
    assert list(proposal) == [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]  # every segment
    got = {s.GetSegment(sid).GetName(): label for sid, label in proposal.items()}
    assert got == dict(SEGMENTS, Segment_2="Lung", Segment_3="Tumour")
    # a ControlNet without a tumour label proposes nothing for a nodule (the user chooses), not "Lung"
    no_tumour = ServiceLogic.proposeSegmentMapping(seg, ["Background", "Lung", "Bone"])
    by_name = {s.GetSegment(sid).GetName(): label for sid, label in no_tumour.items()}
    assert by_name["lung nodule"] is None and by_name["Right lung"] == "Lung" and by_name["air"] == "Background"


def _offline_logic(scene):
    """A logic that knows the service's ControlNets (cached health) and must not submit anything."""
    lg = ServiceLogic(scene)
    lg._health = {"version": "test", "models": [], "controlnets": [LABELS_NET]}
    submitted = []

    def submit(spec, name, like=None, window=None, inputNode=None, labels=None):
        submitted.append(labels[2])
        return "job"

    lg._submit = submit
    return lg, submitted


def test_unmapped_segments_are_reported_before_the_job_never_silently_zeroed():
    scene = slicer.vtkMRMLScene()
    ref = _volume(scene, np.zeros((8, 10, 12), np.float32))
    seg, _ = _segmentation(scene, ["Lung", "Bone", "Liver", "Heart"])
    ids = {seg.GetSegmentation().GetSegment(sid).GetName(): sid for sid in
           [seg.GetSegmentation().GetNthSegmentID(i) for i in range(4)]}
    lg, submitted = _offline_logic(scene)

    typed = segment_mapping(seg, "Air=0, Lung=1, Soft tissue=2, Bone=3, Tumour=4")  # the console's dict form
    assert typed == {ids["Lung"]: 1, ids["Bone"]: 3}
    with pytest.raises(InputError, match=r"2 segments of 'seg' have no model label: Liver, Heart") as err:
        lg.submitSynthesize(seg, ref, typed)
    from MedDiffusionGlue.service import UnmappedSegmentsError

    assert isinstance(err.value, UnmappedSegmentsError) and "label 0 (Air)" in str(err.value)
    assert err.value.segments == [(ids["Liver"], "Liver"), (ids["Heart"], "Heart")]
    assert submitted == []  # refused before anything was written or sent
    # None (the table's "choose ...") is unmapped too
    with pytest.raises(UnmappedSegmentsError, match="Heart"):
        lg.submitSynthesize(seg, ref, dict(typed, **{ids["Liver"]: 2, ids["Heart"]: None}))
    assert ServiceLogic.unmappedSegments(seg, dict(typed, **{ids["Heart"]: None})) == \
        [(ids["Liver"], "Liver"), (ids["Heart"], "Heart")]

    assert lg.submitSynthesize(seg, ref, typed, allowUnmapped=True) == "job"  # left out on purpose
    assert submitted == [typed]
    # label names as the table gives them, values checked against the ControlNet's labels
    lg.submitSynthesize(seg, ref, {ids["Lung"]: "Lung", ids["Bone"]: "bone", ids["Liver"]: "Soft tissue",
                                   ids["Heart"]: 2})
    assert submitted[-1] == {ids["Lung"]: 1, ids["Bone"]: 3, ids["Liver"]: 2, ids["Heart"]: 2}
    with pytest.raises(InputError, match=r"'Heart': 7 is not a label of the ControlNet .*0 Air, 1 Lung"):
        lg.submitSynthesize(seg, ref, dict(typed, **{ids["Liver"]: 2, ids["Heart"]: 7}))
    with pytest.raises(InputError, match="has no label 'Kidney'"):
        lg.submitSynthesize(seg, ref, dict(typed, **{ids["Liver"]: 2, ids["Heart"]: "Kidney"}))
    assert len(submitted) == 2


# -- 3. closing the scene during a job ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served():
    from test_slicer_service import started_logic

    lg = started_logic()
    yield lg
    lg.stopServer()


def _load_ct(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "lung2_crop")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(DATA / "lung2_crop.nii.gz"))
    assert storage.ReadData(node)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    sh.CreateItem(sh.CreateStudyItem(sh.GetSceneItemID(), "study"), node)
    return node


@pytest.mark.parametrize("when", ["after-submit", "preview-shown", "results-ready", "results-loaded"])
def test_closing_the_scene_during_a_job_cancels_it_and_adds_nothing(served, when):
    """The panel calls ``onSceneClosing()`` on StartCloseEvent, then Slicer clears the scene; the
    job is then polled to its end as usual: no exception, it ends cancelled, the scene stays empty
    and the service forgets the job."""
    lg, scene = served, served.scene
    ct = _load_ct(scene)
    if when == "preview-shown":  # sampling on the service, its live preview in the scene
        job = lg.submitGenerate(sampler="ddim", steps=200, device="cpu", previewEvery=1)
        while job.previewNode is None:
            lg.poll(job)
            assert not job.done, job.error
            lg._idle(0.02)
        assert job.state == "running" and scene.IsNodePresent(job.previewNode)
    else:
        job = lg.submitSimulate(ct, views=8)
    if when == "results-ready":  # the service finished; nothing downloaded yet
        while job.phase != "downloading":
            lg.poll(job, budget=0.001)
            assert not job.done, job.error
            lg._idle(0.02)
        assert job.downloaded == 0 and job.status["state"] == "done"
    elif when == "results-loaded":  # the result node is in the scene; the service's copy is being deleted
        while job.phase != "cleanup":
            lg.poll(job, budget=0.0005)
            assert not job.done, job.error
            if job.phase == "service":
                lg._idle(0.02)
        assert job.error is None and job.nodes and scene.IsNodePresent(job.nodes[0])
    elif when == "after-submit":
        assert job.phase in ("uploading", "service") and not job.done
    lg.onSceneClosing()  # what the panel's StartCloseEvent observer calls
    scene.Clear(0)
    after_clear = _node_ids(scene)
    while not job.done:
        lg.poll(job)  # must not raise
        lg._idle(0.02)
    assert job.state == "cancelled" and job.nodes == [] and job.previewNode is None
    with pytest.raises(JobCancelled, match="scene was closed"):
        lg.finishJob(job)
    assert _node_ids(scene) == after_clear
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert lg.client().jobs() == []  # deleted on the service (a running one is stopped by the delete)
    # the logic goes on working in the new scene
    job = lg.submitSimulate(_load_ct(scene), views=8)
    (fbp,) = lg.finishJob(job)
    assert scene.IsNodePresent(fbp) and fbp.GetName() == "lung2_crop FBP 8 views (synthetic)"
    scene.Clear(0)
