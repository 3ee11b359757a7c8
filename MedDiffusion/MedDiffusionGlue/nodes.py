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
    left in the scene: the temporary label map and the colour table export creates are removed."""
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
        remove_node(scene, labelmap)
    return str(path)


def remove_node(scene, node) -> None:
    """Remove a node with its display, storage and (exported) colour nodes."""
    if node is None or scene is None:
        return
    extra = []
    if hasattr(node, "GetDisplayNode") and node.GetDisplayNode() is not None:
        display = node.GetDisplayNode()
        color = display.GetColorNode() if hasattr(display, "GetColorNode") else None
        if color is not None and color.GetID() == display.GetColorNodeID() and _is_user_color(color):
            extra.append(color)
    for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        extra.append(node.GetNthDisplayNode(i))
    if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
        extra.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for n in extra:
        if n is not None and scene.IsNodePresent(n):
            scene.RemoveNode(n)


def _is_user_color(color) -> bool:
    """A colour table made for one node (export makes "<name>_ColorTable"), not a shared default one."""
    return not color.GetSingletonTag() and color.GetName().endswith("_ColorTable")


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
           "set_window", "place_in_hierarchy", "parent_transform_id", "geometry"]
