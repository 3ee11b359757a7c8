"""The panel's segment -> label table (issue 19, item 8, and item 11's "table pre-mapped"): the .ui has a
QTableWidget in place of the old text mapping; the widget code (taken from MedDiffusion.py's source and run
against stand-ins for the Qt widgets, like test_slicer_widget_state.py) builds one row per segment of a real
MRML segmentation (slicer-core) from the logic's ``proposeSegmentMapping``, rebuilds it when segments are
added or removed, and *Synthesize CT* lists left-out segments in one confirmation before the job starts,
passing ``allowUnmapped`` only once the user confirmed."""
import ast
import contextlib
import os
import types
import xml.etree.ElementTree as ET

import pytest

import panel_fakes  # noqa: E402
from panel_fakes import FakeWidget  # noqa: E402

from panel_fakes import MODULE, UI, StandInBase, mrml  # noqa: E402
import vtk  # noqa: E402

from MedDiffusionGlue.nodes import InputError  # noqa: E402
from MedDiffusionGlue.service import (DEFAULT_LABEL_NAMES, ServiceError, ServiceLogic,  # noqa: E402
                                      ServiceUnavailable, UnmappedSegmentsError, controlnet_label_names,
                                      panel_message)

WIDGETS = {w.get("name"): w for w in ET.parse(UI).iter("widget")}
SOURCE = (MODULE / "MedDiffusion.py").read_text()


# -- the .ui ---------------------------------------------------------------------------------------------------
def test_the_ui_has_the_segment_label_table_and_no_text_mapping():
    table = WIDGETS.get("segmentLabelTable")
    assert table is not None and table.get("class") == "QTableWidget"
    props = {p.get("name"): p for p in table.findall("property")}
    assert "toolTip" in props and "SlicerParameterName" not in props  # rebuilt from the segmentation, not bound
    headers = [c.find("property/string").text for c in table.findall("column")]
    assert headers == ["Segment", "Label"]
    assert props["editTriggers"].find("set").text == "QAbstractItemView::NoEditTriggers"
    assert "label_segmentLabelTable" in WIDGETS
    # the old text field and its parameter are gone together (no stale binding, no unused parameter)
    assert "segmentMappingLineEdit" not in WIDGETS
    assert "segmentMapping" not in ET.tostring(ET.parse(UI).getroot(), encoding="unicode")
    assert "segmentMapping:" not in SOURCE and "p.segmentMapping" not in SOURCE


def test_the_table_is_used_through_the_names_slicer_has():
    # Slicer v5.10.0: Base/Python/slicer/util.py:3081 confirmOkCancelDisplay(text, windowTitle=None, ...);
    # Libs/MRML/Widgets/qMRMLNodeComboBox.h:324 currentNodeChanged(vtkMRMLNode*);
    # Libs/vtkSegmentationCore/vtkSegmentation.h:105-110 SegmentAdded, SegmentRemoved, SegmentModified
    assert "slicer.util.confirmOkCancelDisplay(" in SOURCE
    assert 'segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)"' in SOURCE
    seg = mrml.vtkSegmentation()
    assert (seg.SegmentAdded, seg.SegmentRemoved, seg.SegmentModified) == (
        mrml.vtkSegmentation.SegmentAdded, mrml.vtkSegmentation.SegmentRemoved, mrml.vtkSegmentation.SegmentModified)


# -- stand-ins --------------------------------------------------------------------------------------------------
class FakeSelector(FakeWidget):
    node = None

    def currentNode(self):
        return self.node


class FakeTable(FakeWidget):
    def __init__(self, name):
        super().__init__(name)
        self.rows, self.columns, self.headers = [], 0, []

    def setColumnCount(self, n):
        self.columns = n

    def setHorizontalHeaderLabels(self, labels):
        self.headers = list(labels)

    def setRowCount(self, n):
        self.rows = (self.rows + [[None, None] for _ in range(n)])[:n]

    def setItem(self, row, column, item):
        self.rows[row][column] = item

    def setCellWidget(self, row, column, widget):
        self.rows[row][column] = widget


class FakeItem:
    def __init__(self, text):
        self.text, self.flags, self.toolTip = text, None, ""

    def setFlags(self, flags):
        self.flags = flags

    def setToolTip(self, tip):
        self.toolTip = tip


class FakeCombo:
    def __init__(self):
        self.items, self._index, self.toolTip, self.slots = [], -1, "", []

    def addItems(self, items):
        self.items += list(items)
        if self._index < 0 and self.items:
            self._index = 0

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, i):
        changed = i != self._index
        self._index = i
        if changed:
            for slot in self.slots:
                slot(i)

    @property
    def currentText(self):
        return self.items[self._index] if 0 <= self._index < len(self.items) else ""

    def connect(self, signal, slot):
        assert signal == "currentIndexChanged(int)"
        self.slots.append(slot)


class FakeUI(panel_fakes.FakeUI):
    KINDS = {"segmentLabelTable": FakeTable, "segmentationSelector": FakeSelector}


HEALTH = {"version": "x", "api": 1, "devices": [], "models": [],
          "controlnets": [{"name": "chest-ct-mini-labels", "task": "labels", "label_values": [0, 1, 2, 3, 4]},
                          {"name": "lungs-only", "task": "labels", "label_values": [0, 1],
                           "label_names": ["Background", "Lung"]}]}


class FakeLogic:
    """The real segment-mapping methods of ServiceLogic over a cached health; submitSynthesize checks the
    mapping like the real one (``segmentLabelValues``) and records the call instead of starting a job."""
    proposeSegmentMapping = staticmethod(ServiceLogic.proposeSegmentMapping)
    unmappedSegments = staticmethod(ServiceLogic.unmappedSegments)

    def __init__(self, health=None):
        self._health = health
        self.submitted = []

    def cachedHealth(self):
        return self._health

    def controlNetLabels(self, controlNet):
        info = next((c for c in self._health["controlnets"] if c["name"] == controlNet), None)
        if info is None:
            raise InputError(f"the service has no ControlNet {controlNet!r}")
        return controlnet_label_names(info)

    def submitSynthesize(self, seg, ref, segmentLabels, controlNet="chest-ct-mini-labels", allowUnmapped=False,
                         **kwargs):
        values = ServiceLogic.segmentLabelValues(self, seg, segmentLabels, controlNet, allowUnmapped)
        self.submitted.append((segmentLabels, values, allowUnmapped))
        self.kwargs = kwargs
        return "job"


class Observing:
    """VTKObservationMixin's addObserver / removeObserver / removeObservers on real VTK objects."""

    def __init__(self, *args, **kwargs):
        self._tags = {}

    def addObserver(self, obj, event, method):
        self._tags[(obj, event, method)] = obj.AddObserver(event, lambda caller, ev: method(caller, ev))

    def removeObserver(self, obj, event, method):
        obj.RemoveObserver(self._tags.pop((obj, event, method)))

    def removeObservers(self):
        for (obj, _event, _method), tag in self._tags.items():
            obj.RemoveObserver(tag)
        self._tags = {}


def _load():
    tree = ast.parse(SOURCE)
    keep = [n for n in tree.body if (isinstance(n, ast.ClassDef) and n.name == "MedDiffusionWidget") or (
        isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets))]
    asked = []
    answer = {"ok": True}

    def confirmOkCancelDisplay(text, windowTitle=None, **kwargs):
        asked.append(text)
        return answer["ok"]

    qt = types.SimpleNamespace(QTableWidgetItem=FakeItem, QComboBox=FakeCombo,
                               Qt=types.SimpleNamespace(ItemIsEnabled=32))
    slicer = types.SimpleNamespace(
        mrmlScene=mrml.vtkMRMLScene(),
        util=types.SimpleNamespace(confirmOkCancelDisplay=confirmOkCancelDisplay,
                                   errorDisplay=lambda *a, **k: None,
                                   NodeModify=lambda p: contextlib.nullcontext()))
    ns = {"__name__": "MedDiffusionUnderTest", "__file__": str(MODULE / "MedDiffusion.py"), "_": lambda s: s, "qt": qt, "slicer": slicer, "vtk": vtk, "os": os,
          "ScriptedLoadableModuleWidget": StandInBase, "VTKObservationMixin": Observing, "InputError": InputError,
          "ServiceError": ServiceError, "ServiceUnavailable": ServiceUnavailable, "panel_message": panel_message,
          "DEFAULT_LABEL_NAMES": DEFAULT_LABEL_NAMES}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "MedDiffusion.py", "exec"), ns)
    ns.update(asked=asked, answer=answer, scene=slicer.mrmlScene)
    return ns


@pytest.fixture()
def mod():
    return _load()


def _add(node, segmentId, name):
    """A segment with an (empty) binary labelmap: AddEmptySegment needs converter rules slicer-core lacks."""
    segment = mrml.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(mrml.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              mrml.vtkOrientedImageData())
    assert node.GetSegmentation().AddSegment(segment, segmentId)


def _segmentation(scene, *names):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    for name in names:
        _add(node, name.lower().replace(" ", "_"), name)
    return node


def _widget(mod, health=None, segmentation=None):
    w = mod["MedDiffusionWidget"]()
    w.ui, w.logic = FakeUI(), FakeLogic(health)
    w._parameterNode = types.SimpleNamespace(
        segmentation=segmentation, referenceVolume=object(), labelsControlNet="chest-ct-mini-labels", seed=0,
        controlSteps=5, device="cpu", previewEvery=0, sampler="ddim", useTrainedSize=True, fullCTVolume=None,
        fbpVolume=None, referenceKernels=False, fromUI=True, numSamples=3, exportVolume=None, predictionVolume=None,
        evaluationReference=None, evaluateLabels=False, evaluateResample=False)
    w.started = []
    w._withService = lambda action: action()
    w._start = w.started.append
    w.ui.segmentationSelector.node = segmentation
    w._onSegmentationChanged()  # what the selector's currentNodeChanged(vtkMRMLNode*) calls
    return w


def _rows(w):
    return [(item.text, combo.currentText, combo.items) for item, combo in w.ui.segmentLabelTable.rows]


# -- the table ---------------------------------------------------------------------------------------------------
def test_rows_are_built_from_propose_segment_mapping_before_and_after_connecting(mod):
    seg = _segmentation(mod["scene"], "left lung", "rib", "nodule", "pacemaker")
    w = _widget(mod, segmentation=seg)  # not connected: the bundled convention's names (Sample Data, item 11)
    names = list(DEFAULT_LABEL_NAMES.values())
    assert _rows(w) == [("left lung", "Lung", names + ["(leave out)"]), ("rib", "Bone", names + ["(leave out)"]),
                        ("nodule", "Tumour", names + ["(leave out)"]),
                        ("pacemaker", "(leave out)", names + ["(leave out)"])]
    proposal = ServiceLogic.proposeSegmentMapping(seg, DEFAULT_LABEL_NAMES)
    assert [r[1] for r in _rows(w)] == [v or "(leave out)" for v in proposal.values()]
    assert w._segmentLabels() == {"left_lung": "Lung", "rib": "Bone", "nodule": "Tumour", "pacemaker": None}
    assert w.ui.synthesizeButton.enabled

    # the service answers, with another labels ControlNet selected: its names, proposals made again
    w.logic._health = HEALTH
    w._parameterNode.labelsControlNet = "lungs-only"
    w._refreshSegmentTable()
    assert [(r[0], r[1]) for r in _rows(w)] == [("left lung", "Lung"), ("rib", "(leave out)"),
                                               ("nodule", "(leave out)"), ("pacemaker", "(leave out)")]
    assert _rows(w)[0][2] == ["Background", "Lung", "(leave out)"]


def test_a_users_choice_survives_a_rebuild_and_a_new_segmentation_starts_again(mod):
    seg = _segmentation(mod["scene"], "left lung", "pacemaker")
    w = _widget(mod, segmentation=seg)
    w.ui.segmentLabelTable.rows[1][1].currentIndex = 3  # the user: pacemaker -> Bone
    w._refreshSegmentTable()
    assert w._segmentLabels() == {"left_lung": "Lung", "pacemaker": "Bone"}
    other = _segmentation(mod["scene"], "pacemaker")
    w.ui.segmentationSelector.node = other
    w._onSegmentationChanged()
    assert w._segmentLabels() == {"pacemaker": None}


def test_adding_or_removing_segments_rebuilds_the_table(mod):
    seg = _segmentation(mod["scene"], "lung")
    w = _widget(mod, segmentation=seg)
    _add(seg, "bone", "Bone")  # vtkSegmentation::SegmentAdded
    assert [r[:2] for r in _rows(w)] == [("lung", "Lung"), ("Bone", "Bone")]
    seg.GetSegmentation().RemoveSegment("lung")  # vtkSegmentation::SegmentRemoved
    assert [r[:2] for r in _rows(w)] == [("Bone", "Bone")]
    seg.GetSegmentation().GetSegment("bone").SetName("rib")  # vtkSegmentation::SegmentModified
    assert [r[:2] for r in _rows(w)] == [("rib", "Bone")]
    # another segmentation: the first one's events no longer touch the table
    w.ui.segmentationSelector.node = None
    w._onSegmentationChanged()
    assert _rows(w) == [] and w._observedSegmentation is None
    _add(seg, "lung", "Lung")
    assert _rows(w) == []


def test_no_segmentation_or_no_segments_leaves_synthesize_disabled(mod):
    w = _widget(mod, segmentation=_segmentation(mod["scene"]))
    assert _rows(w) == [] and not w.ui.synthesizeButton.enabled
    assert "a segmentation with segments" in w.ui.synthesizeButton.toolTip


# -- Synthesize CT -------------------------------------------------------------------------------------------------
def test_everything_mapped_submits_without_a_question(mod):
    seg = _segmentation(mod["scene"], "Lung", "Bone")
    w = _widget(mod, HEALTH, seg)
    w._onSynthesize()
    assert mod["asked"] == [] and w.started == ["job"]
    assert w.logic.submitted == [({"lung": "Lung", "bone": "Bone"}, {"lung": 1, "bone": 3}, False)]
    assert w.logic.kwargs["numSamples"] == 3  # the panel's Samples


@pytest.mark.parametrize("ok", [True, False], ids=["confirmed", "cancelled"])
def test_left_out_segments_are_listed_once_and_allow_unmapped_only_after_confirmation(mod, ok):
    seg = _segmentation(mod["scene"], "Lung", "pacemaker", "cable")
    w = _widget(mod, HEALTH, seg)
    mod["answer"]["ok"] = ok
    w._onSynthesize()
    assert len(mod["asked"]) == 1
    assert "pacemaker\ncable" in mod["asked"][0] and "label 0" in mod["asked"][0]
    if ok:
        assert w.started == ["job"] and w.logic.submitted == [
            ({"lung": "Lung", "pacemaker": None, "cable": None}, {"lung": 1}, True)]
    else:
        assert w.started == [] and w.logic.submitted == []
        assert w.ui.statusLabel.text.startswith("not started")


def test_the_logic_refuses_left_out_segments_without_allow_unmapped(mod):
    # what the panel relies on: the console's dict form is refused, never silently zeroed
    seg = _segmentation(mod["scene"], "Lung", "pacemaker")
    with pytest.raises(UnmappedSegmentsError) as err:
        FakeLogic(HEALTH).submitSynthesize(seg, None, {"lung": 1})
    assert err.value.segments == [("pacemaker", "pacemaker")]


def test_every_segment_left_out_is_an_input_error_before_any_question(mod):
    seg = _segmentation(mod["scene"], "pacemaker")
    w = _widget(mod, HEALTH, seg)
    with pytest.raises(InputError, match="at least one segment"):
        w._onSynthesize()
    assert mod["asked"] == [] and w.started == []
