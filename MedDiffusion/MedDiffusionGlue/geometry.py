"""Volumes <-> MRML nodes with exact geometry, and segmentations -> label maps on a reference grid.

A library :class:`~MedDiffusionLib.data.volumes.Volume` holds an ``(i, j, k)`` array and an IJK->RAS
affine; a Slicer volume node holds a ``(k, j, i)`` array and the same IJK->RAS matrix. Files and
ITK are LPS (``RAS = diag(-1, -1, 1) LPS``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(matrix: np.ndarray) -> np.ndarray:
    """IJK->LPS (or any LPS 4x4) -> IJK->RAS; the same matrix converts back."""
    return LPS_TO_RAS @ np.asarray(matrix, dtype=float)


ras_to_lps = lps_to_ras


def _vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def node_ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _update_image(node, kji: np.ndarray) -> None:
    """Deep-copy a ``(k, j, i)`` array into the node's image data (as slicer.util.updateVolumeFromArray)."""
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(kji)
    if arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    image = node.GetImageData() or vtk.vtkImageData()
    image.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    image.SetOrigin(0, 0, 0)
    image.SetSpacing(1, 1, 1)
    vtk_arr = numpy_support.numpy_to_vtk(arr.reshape(-1), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(arr.dtype))
    image.GetPointData().SetScalars(vtk_arr)
    node.SetAndObserveImageData(image)
    image.Modified()


def volume_to_node(array_ijk: np.ndarray, ijk_to_ras: np.ndarray, scene, name: str,
                   node=None, class_name: str = "vtkMRMLScalarVolumeNode"):
    """Put an ``(i, j, k)`` array with its IJK->RAS into a (new or given) volume node of ``scene``."""
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    else:
        node.SetName(name)
    _update_image(node, np.transpose(array_ijk, (2, 1, 0)))
    node.SetIJKToRASMatrix(_vtk_matrix(np.asarray(ijk_to_ras, dtype=float)))
    return node


def node_to_volume(node) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j, k)`` array (a copy) and IJK->RAS of a volume node."""
    from vtk.util import numpy_support

    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume node {node.GetName()!r} has no image data")
    dims = image.GetDimensions()
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    return np.ascontiguousarray(np.transpose(kji, (2, 1, 0))).copy(), node_ijk_to_ras(node)


def segmentation_to_labels(scene, segmentation_node, reference_volume_node,
                           segment_labels: Mapping[str, int]) -> np.ndarray:
    """Rasterise segments on the reference volume's grid: ``(i, j, k)`` int array whose value is
    ``segment_labels[segment_id]`` inside each segment (0 elsewhere; later segments win overlaps)."""
    import vtk

    import slicer

    if not segment_labels:
        raise ValueError("map at least one segment to a model label")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # registers the representation converters
    segmentation = segmentation_node.GetSegmentation()
    missing = [s for s in segment_labels if segmentation.GetSegment(s) is None]
    if missing:
        raise ValueError(f"segments not found in {segmentation_node.GetName()!r}: {missing}")
    ids = vtk.vtkStringArray()
    order = list(segment_labels)
    for sid in order:
        ids.InsertNextValue(sid)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__meddiffusion_tmp_labels")
    try:
        ok = logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume_node,
                                                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok:
            raise RuntimeError("exporting the segments to a label map failed")
        exported, _ = node_to_volume(labelmap)
    finally:
        scene.RemoveNode(labelmap)
    out = np.zeros(exported.shape, dtype=np.int64)
    for index, sid in enumerate(order, start=1):  # export assigns 1, 2, ... in the order of the ids
        out[exported == index] = int(segment_labels[sid])
    return out


def window_level(node, window: float, level: float) -> None:
    """Fixed display window (HU for CT results) instead of the automatic one."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(float(window), float(level))


def hu_window_to_window_level(lo: float, hi: float) -> tuple[float, float]:
    return hi - lo, (hi + lo) / 2.0


__all__: Sequence[str] = ["lps_to_ras", "ras_to_lps", "volume_to_node", "node_to_volume", "segmentation_to_labels",
                          "window_level", "hu_window_to_window_level", "node_ijk_to_ras"]
