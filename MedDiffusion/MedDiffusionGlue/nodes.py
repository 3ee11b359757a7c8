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
    """Write a scalar volume node to ``path`` (NRRD, or NIfTI by its suffix) in its local
    (untransformed) geometry, with Slicer's writer (a storage node outside the scene)."""
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
    label values (``segment_labels``: segment id -> value; later segments win overlaps): the file
    :func:`labels_encoder` encodes, written at once."""
    folder = os.path.dirname(os.path.abspath(str(path)))
    return labels_encoder(scene, segmentation_node, reference_node, segment_labels, folder, logic, compress).write(path)


def labels_encoder(scene, segmentation_node, reference_node, segment_labels: Mapping[str, int], folder: str,
                   logic=None, compress: bool = False) -> "NrrdEncoder":
    """Rasterise segments on the reference volume's grid (one Slicer call) and return the label map
    with the model's label values (``segment_labels``: segment id -> value; later segments win
    overlaps) as an :class:`NrrdEncoder`: the values are mapped piece by piece as it is encoded.

    ``logic`` is Slicer's segmentations logic (``slicer.modules.segmentations.logic()`` in the
    application); a private one is made only where no application exists (tests). Nothing is
    left in the scene: the temporary label map and every node the export adds (its display node
    and the ``<segmentation>_ColorTable[_N]`` colour table) are removed by reference, whatever
    Slicer named them.

    Only the segments in ``segment_labels`` are exported; the caller checks that no segment is
    left out unintentionally (:func:`unmapped_segments`)."""
    slicer = _slicer()
    import numpy as np
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
    # export assigns 1, 2, ... in the order of the ids; the encoder writes the model's values instead
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
        # export value i -> the i-th segment's model value; anything else (0, or out of range) -> 0
        lut = np.zeros(len(order) + 2, np.int16)
        for index, sid in enumerate(order, start=1):
            lut[index] = int(segment_labels[sid])
        encoder = NrrdEncoder(labelmap, folder, compress, image=labelmap.GetImageData(), lut=lut)
    finally:
        # Slicer names the export's colour table "<seg>_ColorTable", then "_1", "_2", ... (the scene
        # never reuses a unique name): remove what this export added, by reference, not by name
        added = _nodes_added(scene, before)
        remove_node(scene, labelmap)
        for node in added:
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
    return encoder


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


# -- stepwise NRRD: inputs encoded from memory, results decoded from the downloaded file -------------------------
# Nothing below takes long at a time: the panel's timer moves the job on in short steps (service.poll), and
# each step here does at most one piece (about PIECE_BYTES of voxels) of copying, compressing or inflating.
PIECE_BYTES = 1 << 20
GZIP_LEVEL = 1  # fast: on the GUI thread the CPU time matters more than the last few percent of size


def _image_array(image):
    from vtk.util import numpy_support

    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())


def nrrd_header(node, folder: str, compress: bool = False, scalar_type: int | None = None) -> bytes:
    """The NRRD header (up to and including the blank line) that :func:`write_volume` writes for
    ``node``, byte for byte: Slicer's own writer writes a 2x2x2 volume with the node's geometry
    and scalar type (``scalar_type``: another VTK type, e.g. for a label map with model values),
    and the ``sizes`` line is set to the node's dimensions. ``folder``: where that tiny file goes."""
    import vtk

    slicer = _slicer()
    image = node.GetImageData()
    tiny = node.CreateNodeInstance()  # same class, not in the scene
    tiny.CopyOrientation(node)
    small = vtk.vtkImageData()
    small.SetDimensions(2, 2, 2)
    small.AllocateScalars(image.GetScalarType() if scalar_type is None else scalar_type, 1)
    _image_array(small)[:] = 0
    tiny.SetAndObserveImageData(small)
    path = os.path.join(folder, "header.nrrd")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(1 if compress else 0)
    try:
        if not storage.WriteData(tiny):
            raise OSError(f"could not write the header of {node.GetName()!r}")
        with open(path, "rb") as fh:
            text = fh.read(1 << 16)
    finally:
        if os.path.exists(path):
            os.remove(path)
    end = text.find(b"\n\n")
    if end < 0:
        raise OSError("Slicer's NRRD writer wrote no header")
    dims = image.GetDimensions()
    lines = text[:end].split(b"\n")
    sizes = [i for i, ln in enumerate(lines) if ln.startswith(b"sizes:")]
    if len(sizes) != 1 or lines[sizes[0]] != b"sizes: 2 2 2":
        raise OSError(f"unexpected NRRD header from Slicer's writer: {text[:end]!r}")
    lines[sizes[0]] = f"sizes: {dims[0]} {dims[1]} {dims[2]}".encode()
    return b"\n".join(lines) + b"\n\n"


class NrrdEncoder:
    """The NRRD file :func:`write_volume` (or :func:`write_labels`) writes, produced in pieces from
    the node's voxels in memory: :meth:`blocks` yields the header, then the voxels (about
    :data:`PIECE_BYTES` at a time, raw, or gzip-compressed piece by piece in one gzip stream).

    ``image``/``dtype``/``lut``: the voxels to encode (default: the node's image data) and, for label
    maps, a look-up table applied piece by piece (``lut[value]``, values clipped to its range). The
    image data object is kept, so a node that gets new image data meanwhile does not matter; edits
    made in place to the node's voxels during the upload do go into the voxels not yet sent."""

    def __init__(self, node, folder: str, compress: bool = False, image=None, lut=None) -> None:
        import vtk

        check_scalar_volume(node)
        self.image = image if image is not None else node.GetImageData()
        extent = self.image.GetExtent()
        if extent[0] or extent[2] or extent[4]:
            raise InputError(f"{node.GetName()!r} has image data that does not start at voxel 0")
        self.compress = bool(compress)
        self.lut = lut
        self.header = nrrd_header(node, folder, compress, None if lut is None else vtk.VTK_SHORT)
        self._voxels = _image_array(self.image).reshape(-1)
        self.itemsize = self._voxels.dtype.itemsize if lut is None else lut.dtype.itemsize
        self.raw_bytes = self._voxels.size * self.itemsize
        self.length = None if self.compress else len(self.header) + self.raw_bytes

    def pieces(self):
        """The voxel data, raw (native byte order, as the header says), in pieces."""
        import numpy as np

        count = max(1, PIECE_BYTES // self.itemsize)
        for start in range(0, self._voxels.size, count):
            piece = self._voxels[start:start + count]
            if self.lut is not None:
                piece = np.take(self.lut, piece, mode="clip")
            yield piece.tobytes()

    def blocks(self):
        """Header, then the (compressed) voxel data."""
        yield self.header
        if not self.compress:
            yield from self.pieces()
            return
        import zlib

        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: a gzip member, as "encoding: gzip" expects
        for piece in self.pieces():
            out = z.compress(piece)
            if out:
                yield out
        yield z.flush()

    def write(self, path: str) -> str:
        """The whole file at once (what :func:`write_volume` does; tests and scripts)."""
        with open(path, "wb") as fh:
            for block in self.blocks():
                fh.write(block)
        return str(path)


class StepwiseFileWriter:
    """An :class:`NrrdEncoder`'s file written in short steps (:meth:`step`), e.g. a compressed input
    whose size must be known before its upload starts."""

    def __init__(self, encoder: NrrdEncoder, path: str) -> None:
        self.path = str(path)
        self._blocks = encoder.blocks()
        self._fh = open(self.path, "wb")
        self.done = False
        self.written = 0

    def step(self, budget: float) -> bool:
        import time

        deadline = time.monotonic() + budget
        while not self.done and time.monotonic() < deadline:
            block = next(self._blocks, None)
            if block is None:
                self._fh.close()
                self.done = True
            else:
                self._fh.write(block)
                self.written += len(block)
        return self.done

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


# NRRD type names (any spelling the format allows) -> numpy dtype names
NRRD_TYPES = {}
for _names, _dtype in (
        (("signed char", "int8", "int8_t"), "i1"), (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
        (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
        (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
        (("int", "signed int", "int32", "int32_t"), "i4"), (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
        (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
         "i8"),
        (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
        (("float",), "f4"), (("double",), "f8")):
    for _n in _names:
        NRRD_TYPES[_n] = _dtype
RAS_FROM = {"left-posterior-superior": (-1.0, -1.0, 1.0), "LPS": (-1.0, -1.0, 1.0),
            "right-anterior-superior": (1.0, 1.0, 1.0), "RAS": (1.0, 1.0, 1.0)}


class NrrdLoader:
    """A result file (single-file NRRD, raw or gzip, as the service writes them) read into a numpy
    array in short steps (:meth:`step`: at most about :data:`PIECE_BYTES` read and up to 4 pieces
    inflated at a time); then :func:`volume_from_array` puts it into a node in one cheap call.

    A file this reader does not take (another encoding, byte order or layout) is left to Slicer's
    storage node: ``supported`` is False and :meth:`step` is done at once."""

    def __init__(self, path: str) -> None:
        import numpy as np

        self.path = str(path)
        self.done = False
        self.error: Exception | None = None
        self.array = None
        self.ijk_to_ras = None
        self.dims = None
        self._fh = open(self.path, "rb")
        try:
            self.supported = self._parse()
        except (ValueError, KeyError, IndexError):
            self.supported = False
        if not self.supported:
            self._fh.close()
            self.done = True
            return
        self._buf = np.empty(self._nbytes, np.uint8)
        self._filled = 0
        self._inflate = None
        if self._gzip:
            import zlib

            self._inflate = zlib.decompressobj(47)  # gzip or zlib header
            self._pending = b""

    def _parse(self) -> bool:
        import numpy as np

        head = self._fh.read(1 << 16)
        end = head.find(b"\n\n")
        if not head.startswith(b"NRRD") or end < 0:
            return False
        fields = {}
        for line in head[:end].decode("latin-1").split("\n")[1:]:
            if not line or line.startswith("#"):
                continue
            if ":=" in line:
                continue  # key/value pairs: not geometry
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("dimension") != "3" or "data file" in fields or "datafile" in fields:
            return False
        if fields.get("line skip", "0") != "0" or fields.get("byte skip", "0") != "0":
            return False
        encoding = fields.get("encoding", "")
        if encoding not in ("raw", "gzip", "gz"):
            return False
        dtype = np.dtype(NRRD_TYPES[fields["type"]])
        if dtype.itemsize > 1 and fields.get("endian", "little") != ("little" if np.little_endian else "big"):
            return False
        flip = RAS_FROM.get(fields.get("space", ""))
        if flip is None:
            return False
        dims = tuple(int(v) for v in fields["sizes"].split())
        dirs = [[float(v) for v in d.strip().strip("()").split(",")] for d in fields["space directions"].split(")")
                if d.strip()]
        origin = [float(v) for v in fields.get("space origin", "(0,0,0)").strip().strip("()").split(",")]
        if len(dims) != 3 or len(dirs) != 3 or any(len(d) != 3 for d in dirs) or len(origin) != 3:
            return False
        cols = np.array(dirs, float)
        norms = np.linalg.norm(cols, axis=1)
        unit = cols / np.where(norms > 0, norms, 1.0)[:, None]
        if not np.all(norms > 0) or np.abs(unit @ unit.T - np.eye(3)).max() > 1e-6:
            return False  # sheared or degenerate axes: Slicer's reader has its own rules for those
        m = np.eye(4)
        for axis in range(3):
            m[:3, axis] = np.array(dirs[axis]) * flip
        m[:3, 3] = np.array(origin) * flip
        self.dtype, self.dims, self.ijk_to_ras = dtype, dims, m
        self._nbytes = int(np.prod(dims)) * dtype.itemsize
        self._gzip = encoding != "raw"
        self._fh.seek(end + 2)
        return True

    def step(self, budget: float) -> bool:
        """Read on for about ``budget`` seconds; True once the whole array is there (or ``error``)."""
        import time

        deadline = time.monotonic() + budget
        try:
            while not self.done and time.monotonic() < deadline:
                self._advance()
        except Exception as exc:  # noqa: BLE001 - reported by the caller as a failed load
            self.error, self.done = exc, True
            self._fh.close()
        return self.done

    def _put(self, data) -> None:
        n = min(len(data), self._nbytes - self._filled)
        self._buf[self._filled:self._filled + n] = memoryview(data)[:n]
        self._filled += n

    def _advance(self) -> None:
        import zlib

        if self._filled >= self._nbytes:
            self._fh.close()
            self.array = self._buf.view(self.dtype)
            self.done = True
            return
        if not self._gzip:
            data = self._fh.read(min(PIECE_BYTES, self._nbytes - self._filled))
            if not data:
                raise OSError(f"{os.path.basename(self.path)}: the file is shorter than its header says")
            self._put(data)
            return
        if not self._pending:
            if self._inflate.eof:  # another gzip member follows (or trailing bytes)
                rest = self._inflate.unused_data
                self._inflate = zlib.decompressobj(47)
                self._pending = rest
            if not self._pending:
                self._pending = self._fh.read(PIECE_BYTES // 4)
                if not self._pending:
                    raise OSError(f"{os.path.basename(self.path)}: the compressed data end before the volume does")
        out = self._inflate.decompress(self._pending, PIECE_BYTES)
        self._pending = self._inflate.unconsumed_tail
        if self._inflate.eof and not self._pending:
            self._pending = b""
        self._put(out)

    def cancel(self) -> None:
        self._fh.close()
        self.done = True


def set_voxels(node, array, dims, ijk_to_ras) -> None:
    """Give a volume node its geometry (``ijk_to_ras``: 4x4) and voxels (``array``: flat, i
    fastest, ``dims`` i, j, k), wrapped without a copy."""
    import vtk
    from vtk.util import numpy_support

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(ijk_to_ras[r][c]))
    node.SetIJKToRASMatrix(m)
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array, deep=False))
    node.SetAndObserveImageData(image)


def volume_from_array(scene, array, dims, ijk_to_ras, name: str, like=None, window: tuple[float, float] | None = None,
                      node=None):
    """:func:`read_volume` for voxels already in memory (``array``: flat, i fastest, as in NRRD;
    ``ijk_to_ras``: 4x4): the image data wraps the array without a copy, and the display range is
    set before the voxels arrive, so no automatic window is computed for a given ``window``."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    if window is not None:
        set_window(node, *window)
    set_voxels(node, array, dims, ijk_to_ras)
    if like is not None:
        node.SetAndObserveTransformNodeID(parent_transform_id(like))
    place_in_hierarchy(scene, node, like)
    return node


__all__ = ["InputError", "check_scalar_volume", "write_volume", "write_labels", "read_volume", "remove_node",
           "set_window", "place_in_hierarchy", "parent_transform_id", "geometry", "label_class", "propose_label",
           "propose_segment_mapping", "segment_terminology", "terminology_text", "unmapped_segments",
           "nrrd_header", "NrrdEncoder", "StepwiseFileWriter", "NrrdLoader", "volume_from_array", "labels_encoder",
           "set_voxels"]
