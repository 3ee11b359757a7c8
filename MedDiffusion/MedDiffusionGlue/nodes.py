"""MRML nodes <-> files for the job service, with Slicer's own storage nodes.

Inputs are written with ``vtkMRMLVolumeArchetypeStorageNode`` (the writer behind
``slicer.util.saveNode``), results are read with the same storage node (the reader behind
``slicer.util.loadVolume``), so geometry (IJK->RAS, LPS on disk) is handled by Slicer itself.

Every function takes the scene explicitly and imports no Qt, so the module runs them in Slicer
and the tests run them with the ``slicer-core`` wheel (real MRML, no application).

Transforms: a volume is written in its *local* coordinates (the parent transform is not applied)
and each result is placed under the input's parent transform, so it lands exactly on the input.
"""
from __future__ import annotations

import os
from typing import Mapping


class InputError(ValueError):
    """An input node the service cannot use; the message is for the user."""


def _slicer():
    import slicer

    return slicer


def check_scalar_volume(node, role: str = "input volume") -> None:
    """Refuse what the service cannot read as one 3-D scalar volume (vector/RGB, empty)."""
    if node is None:
        raise InputError(f"select the {role}")
    if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode"):
        raise InputError(f"{node.GetName()!r} is a vector (multi-component) volume; the {role} must be a "
                         "single-component scalar volume (e.g. convert it with the Vector to Scalar Volume module)")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"{node.GetName()!r} has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{node.GetName()!r} has {image.GetNumberOfScalarComponents()} components per voxel; the "
                         f"{role} must be a single-component scalar volume")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InputError(f"{node.GetName()!r} is not a 3-D volume (dimensions {dims[0]}x{dims[1]}x{dims[2]})")


def write_volume(node, path: str, compress: bool = False) -> str:
    """Write a scalar volume node to ``path`` (NRRD) in its local (untransformed) geometry."""
    check_scalar_volume(node)
    slicer = _slicer()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()  # not added to the scene: leaves no trace
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node):
        raise OSError(f"could not write {node.GetName()!r} to {path}")
    return str(path)


def parent_transform_id(node) -> str | None:
    return node.GetTransformNodeID() if node is not None else None


def write_labels(scene, segmentation_node, reference_node, segment_labels: Mapping[str, int], path: str,
                 logic=None, compress: bool = False) -> str:
    """Rasterise segments on the reference volume's grid and write a label map with the model's
    label values (``segment_labels``: segment id -> value; later segments win overlaps).

    ``logic`` is Slicer's segmentations logic (``slicer.modules.segmentations.logic()`` in the
    application); a private one is made only where no application exists (tests). Nothing is
    left in the scene: the temporary label map and every node the export adds (its display node
    and the ``<segmentation>_ColorTable[_N]`` colour table) are removed by reference, whatever
    Slicer named them.

    Only the segments in ``segment_labels`` are exported; the caller checks that no segment is
    left out unintentionally (:func:`unmapped_segments`)."""
    slicer = _slicer()
    import vtk

    if segmentation_node is None:
        raise InputError("select a segmentation")
    check_scalar_volume(reference_node, "reference volume")
    if parent_transform_id(segmentation_node) != parent_transform_id(reference_node):
        raise InputError("the segmentation and the reference volume are under different transforms; put them under "
                         "the same transform (or harden both) first")
    if not segment_labels:
        raise InputError("map at least one segment to a model label (e.g. Lung=1)")
    segmentation = segmentation_node.GetSegmentation()
    missing = [s for s in segment_labels if segmentation.GetSegment(s) is None]
    if missing:
        raise InputError(f"segments not found in {segmentation_node.GetName()!r}: {', '.join(missing)}")
    if logic is None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
    # export assigns 1, 2, ... in the order of the ids; write the model's values instead
    order = list(segment_labels)
    ids = vtk.vtkStringArray()
    for sid in order:
        ids.InsertNextValue(sid)
    before = _node_ids(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("MedDiffusion labels"))
    try:
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_node,
                                                  slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise InputError("exporting the segments to a label map failed")
        from vtk.util import numpy_support

        scalars = labelmap.GetImageData().GetPointData().GetScalars()
        exported = numpy_support.vtk_to_numpy(scalars)
        out = exported.astype("int16")
        out[:] = 0
        for index, sid in enumerate(order, start=1):
            out[exported == index] = int(segment_labels[sid])
        image = vtk.vtkImageData()
        image.DeepCopy(labelmap.GetImageData())
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(out, deep=True, array_type=vtk.VTK_SHORT))
        labelmap.SetAndObserveImageData(image)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(1 if compress else 0)
        if not storage.WriteData(labelmap):
            raise OSError(f"could not write the label map to {path}")
    finally:
        # Slicer names the export's colour table "<seg>_ColorTable", then "_1", "_2", ... (the scene
        # never reuses a unique name): remove what this export added, by reference, not by name
        added = _nodes_added(scene, before)
        remove_node(scene, labelmap)
        for node in added:
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
    return str(path)


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _nodes_added(scene, before: set) -> list:
    """Nodes added to ``scene`` since ``before`` (a :func:`_node_ids` snapshot), except shared ones:
    singletons and the subject hierarchy (made on first use, kept by Slicer for the scene's life)."""
    added = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetID() in before or node.GetSingletonTag() or node.IsA("vtkMRMLSubjectHierarchyNode"):
            continue
        added.append(node)
    return added


def remove_node(scene, node) -> None:
    """Remove a node with its display and storage nodes (a node no longer in the scene, e.g.
    after the scene was closed, is left alone). Colour nodes are shared and are not removed."""
    if node is None or scene is None or not scene.IsNodePresent(node):
        return
    extra = []
    for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        extra.append(node.GetNthDisplayNode(i))
    if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
        extra.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for n in extra:
        if n is not None and scene.IsNodePresent(n):
            scene.RemoveNode(n)


# -- segment -> model label: proposals from names and terminology, and the unmapped ones -------------------------
# What a segment is, from the words of its name or terminology entry. The first rule that matches wins, so a
# "lung nodule" or a "bone lesion" is a tumour, not lung or bone. Words are whole words of the lower-cased text
# with "_", "-" and digits as separators (TotalSegmentator's "vertebrae_T5" and "rib_left_3" match).
LABEL_RULES = (
    ("tumour", ("tumour", "tumor", "tumours", "tumors", "nodule", "nodules", "lesion", "lesions", "mass", "masses",
                "neoplasm", "neoplasms", "cancer", "carcinoma", "metastasis", "metastases", "gtv")),
    ("air", ("air", "background")),
    ("lung", ("lung", "lungs")),
    ("bone", ("bone", "bones", "rib", "ribs", "spine", "vertebra", "vertebrae", "vertebral column", "spinal column",
              "skeleton", "sternum", "clavicle", "scapula", "skull", "femur", "humerus", "pelvis", "sacrum")),
    ("soft tissue", ("soft tissue", "soft tissues", "body", "muscle", "muscles", "fat", "adipose", "skin")),
)
# Slicer gives every new segment this terminology type ("Tissue", vtkSegment.cxx:71 in v5.10.0): it says nothing
GENERIC_TERMINOLOGY_CODES = {("SCT", "85756007")}


def _words(text: str) -> str:
    import re

    return " " + " ".join(re.findall(r"[a-z]+", (text or "").lower())) + " "


def label_class(text: str) -> str | None:
    """The kind of structure ``text`` names (``tumour``, ``air``, ``lung``, ``bone``, ``soft tissue``)
    by :data:`LABEL_RULES`, or None when it names none of them."""
    words = _words(text)
    for kind, keys in LABEL_RULES:
        if any(f" {k} " in words for k in keys):
            return kind
    return None


def segment_terminology(segment) -> str:
    """The segment's serialised terminology entry (``context~category~type~modifier~region context~
    region~region modifier``, each code ``scheme^value^meaning``), "" when it has none.
    ``vtkSegment.GetTerminology()`` (Slicer >= 5.10), else the ``TerminologyEntry`` tag."""
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag("TerminologyEntry", value) else ""


def terminology_text(entry: str) -> str:
    """The meanings of a terminology entry's type, type modifier, region and region modifier
    (e.g. "Lung Right"), without Slicer's default type "Tissue"; "" when it says nothing."""
    fields = (entry or "").split("~")
    if len(fields) < 3:
        return ""
    out = []
    for index in (2, 3, 5, 6):
        if index >= len(fields):
            continue
        code = fields[index].split("^")
        if len(code) < 3 or not code[2]:
            continue
        if index == 2 and (code[0], code[1]) in GENERIC_TERMINOLOGY_CODES:
            return ""  # the default entry of a new segment: nothing chosen
        out.append(code[2])
    return " ".join(out)


def _label_name_list(label_names) -> list:
    if isinstance(label_names, Mapping):
        return [str(v) for v in label_names.values()]
    return [str(v) for v in label_names]


def propose_label(text: str, label_names, terminology: str = "") -> str | None:
    """The label name (one of ``label_names``) a segment called ``text`` most likely is: the label
    of the same name (any case, "_"/"-" as spaces), else the label of the same kind
    (:func:`label_class`: "left lung" -> Lung, "rib" -> Bone, "nodule" -> Tumour), else the same from
    the terminology entry's meanings; None when nothing matches (the user must choose)."""
    names = _label_name_list(label_names)
    key = _words(text).strip()
    for name in names:
        if _words(name).strip() == key and key:
            return name
    for source in (text, terminology_text(terminology)):
        kind = label_class(source)
        if kind is None:
            continue
        for name in names:
            if label_class(name) == kind:
                return name
        return None  # a known kind the model has no label for (e.g. no Tumour label): the user chooses
    return None


def propose_segment_mapping(segmentation_node, label_names) -> dict:
    """{segment id: proposed label name or None} for every segment of ``segmentation_node``, in the
    segmentation's order, from each segment's name and terminology entry (:func:`propose_label`).
    ``label_names``: the model's label names (a list, or {value: name})."""
    if segmentation_node is None:
        raise InputError("select a segmentation")
    seg = segmentation_node.GetSegmentation()
    out = {}
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        out[seg.GetNthSegmentID(i)] = propose_label(segment.GetName(), label_names, segment_terminology(segment))
    return out


def unmapped_segments(segmentation_node, segment_labels: Mapping) -> list:
    """[(segment id, segment name)] of the segments ``segment_labels`` gives no label (absent or
    None): they would not be exported and their voxels would become label 0."""
    seg = segmentation_node.GetSegmentation()
    return [(seg.GetNthSegmentID(i), seg.GetNthSegment(i).GetName()) for i in range(seg.GetNumberOfSegments())
            if segment_labels.get(seg.GetNthSegmentID(i)) is None]


def read_volume(scene, path: str, name: str, like=None, window: tuple[float, float] | None = None, node=None):
    """Load a result file as a scalar volume node (new, or ``node`` updated in place).

    ``like``: the input node: the result goes under its parent transform and next to it in the
    subject hierarchy. ``window``: (low, high) display range; ``None`` keeps the automatic one."""
    slicer = _slicer()

    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if not storage.ReadData(node):
        if node.GetImageData() is None:
            remove_node(scene, node)
        raise OSError(f"could not read the result file {os.path.basename(str(path))}")
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    if window is not None:
        set_window(node, *window)
    if like is not None:
        node.SetAndObserveTransformNodeID(parent_transform_id(like))
    place_in_hierarchy(scene, node, like)
    return node


def set_window(node, low: float, high: float) -> None:
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(low), float(high))


def place_in_hierarchy(scene, node, like=None) -> None:
    """Put ``node`` next to ``like`` (same parent, e.g. the input's study) in the subject hierarchy."""
    slicer = _slicer()

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    parent = sh.GetSceneItemID()
    if like is not None:
        like_item = sh.GetItemByDataNode(like)
        if like_item:
            parent = sh.GetItemParent(like_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def geometry(node):
    """(IJK->RAS as nested lists, dimensions) of a volume node: for tests and checks."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return [[m.GetElement(r, c) for c in range(4)] for r in range(4)], node.GetImageData().GetDimensions()


__all__ = ["InputError", "check_scalar_volume", "write_volume", "write_labels", "read_volume", "remove_node",
           "set_window", "place_in_hierarchy", "parent_transform_id", "geometry", "label_class", "propose_label",
           "propose_segment_mapping", "segment_terminology", "terminology_text", "unmapped_segments"]
