"""What a job leaves in the scene and what leaves the scene again, with MRML only (no Qt, no
application): the module runs these in Slicer, the tests with the ``slicer-core`` wheel.

* The synthetic mark: one node attribute per provenance field (``MedDiffusion.provenance.<field>``,
  JSON values; saved with the scene), read back by :func:`node_provenance`.
* N samples with uncertainty: the samples become one Sequence (``vtkMRMLSequenceNode``: its data
  nodes are copies inside the sequence's own scene, not nodes of the main scene) browsed by a
  ``vtkMRMLSequenceBrowserNode`` whose proxy node shows one sample at a time; the voxel-wise mean
  and standard deviation are ordinary volume nodes, the std shown as a colour overlay on the mean
  (:func:`show_uncertainty`).
* Export with the mark (:func:`export_volume`): NRRD with one key/value field per provenance field,
  NIfTI with a ``descrip`` starting with ``SYNTHETIC`` and a JSON sidecar.
* Evaluation metrics as a Table node with a bar chart (:func:`metrics_table`, :func:`metrics_chart`).

The naming convention of the file mark is MedDiffusionLib.provenance's (``KEY_PREFIX``,
``nifti_descrip``, ``sidecar_path``), written out here because Slicer's process imports only the
library's client; Testing/tests/test_slicer_export.py checks that both say the same.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Mapping

from .nodes import (PIECE_BYTES, InputError, NrrdEncoder, _image_array, check_scalar_volume, geometry,
                    place_in_hierarchy, remove_node, set_voxels, set_window, write_volume)

PROVENANCE_ATTRIBUTE = "MedDiffusion.provenance."  # one node attribute per provenance field
MAX_MARK_FIELDS = 64
MAX_MARK_VALUE_CHARS = 4096

# MedDiffusionLib.provenance, written out (see the module docstring)
GENERATOR = "MedDiffusion"
MARK = "SYNTHETIC"
KEY_PREFIX = "meddiffusion_"
NIFTI_DESCRIP_BYTES = 79
SIDECAR_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd")
EXPORT_SUFFIXES = (".nrrd", ".nii.gz", ".nii")


def _slicer():
    import slicer

    return slicer


# -- the synthetic mark on nodes -----------------------------------------------------------------------------
def mark_synthetic(node, provenance) -> None:
    """Mark ``node`` with a result's provenance (MedDiffusionLib.provenance): one node attribute per
    field, ``MedDiffusion.provenance.<field>`` = the JSON value (at most 64 fields of 4096 characters)."""
    if not isinstance(provenance, Mapping):
        return
    for key, value in list(provenance.items())[:MAX_MARK_FIELDS]:
        node.SetAttribute(PROVENANCE_ATTRIBUTE + str(key)[:64], json.dumps(value)[:MAX_MARK_VALUE_CHARS])


def node_provenance(node) -> dict | None:
    """The provenance a node is marked with ({field: value}), None for a node without the mark.
    A value that is not JSON (cut at 4096 characters) is kept as its text."""
    if node is None:
        return None
    out: dict[str, Any] = {}
    for name in node.GetAttributeNames() or ():
        if not name.startswith(PROVENANCE_ATTRIBUTE):
            continue
        text = node.GetAttribute(name)
        try:
            out[name[len(PROVENANCE_ATTRIBUTE):]] = json.loads(text)
        except (TypeError, ValueError):
            out[name[len(PROVENANCE_ATTRIBUTE):]] = text
    return out or None


def is_synthetic(node) -> bool:
    return bool((node_provenance(node) or {}).get("synthetic"))


# -- N samples: one Sequence, its browser, the mean and the std -----------------------------------------------------
SAMPLE_INDEX_NAME = "sample"


def standalone_volume(array, dims, ijk_to_ras, name: str = "sample"):
    """A scalar volume node in no scene whose image data wraps ``array`` (flat, i fastest, as
    :func:`nodes.volume_from_array` takes it): what :func:`add_sample` copies into a sequence
    without a node ever entering the main scene."""
    node = _slicer().vtkMRMLScalarVolumeNode()
    node.SetName(name)
    set_voxels(node, array, dims, ijk_to_ras)
    return node


def new_sample_sequence(scene, name: str):
    """An empty Sequence for the samples of one job (index "sample", numeric: 0, 1, ...)."""
    slicer = _slicer()
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
    sequence.SetIndexName(SAMPLE_INDEX_NAME)
    sequence.SetIndexUnit("")
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    return sequence


def add_sample(sequence, volume_node, index: int):
    """Put a copy of ``volume_node`` into ``sequence`` at index ``index`` (Slicer always deep-copies,
    attributes and so the mark included); returns the copy, which lives in the sequence's own scene.
    The first sample's mark (less its sample index) marks the sequence itself."""
    copy = sequence.SetDataNodeAtValue(volume_node, str(int(index)))
    if copy is None:
        raise InputError(f"could not add {volume_node.GetName()!r} to the sequence {sequence.GetName()!r}")
    if sequence.GetNumberOfDataNodes() == 1:
        prov = node_provenance(volume_node)
        if prov:
            for key in ("sample_index", "result"):
                prov.pop(key, None)
            mark_synthetic(sequence, dict(prov, statistic="samples"))
    return copy


def browse_samples(scene, sequence, sequences_logic=None, like=None, window=None):
    """A Sequence browser for ``sequence`` with its proxy node (the sample shown, a volume node of
    the main scene named "<sequence> [sample=i]") on the first sample: returns (browser, proxy).

    ``sequences_logic``: Slicer's (``slicer.modules.sequences.logic()``), which also updates the
    proxy whenever the browser's selected item changes; a private one is used where no application
    exists (tests). ``like``: the input node (the proxy goes under its transform and next to it in
    the subject hierarchy, with the sequence); ``window``: (low, high) display range of the proxy."""
    slicer = _slicer()
    private = sequences_logic is None
    if private:  # (it also registers the browser node class with a scene of no application)
        sequences_logic = slicer.vtkSlicerSequencesLogic()
        sequences_logic.SetMRMLScene(scene)
    browser = proxy = None
    try:
        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                          scene.GenerateUniqueName(sequence.GetName() + " browser"))
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        browser.SetOverwriteProxyName(sequence, True)
        browser.SetSelectedItemNumber(0)
        sequences_logic.UpdateProxyNodesFromSequences(browser)
        proxy = browser.GetProxyNode(sequence)
        if proxy is None:
            raise InputError(f"Slicer made no proxy node for the sequence {sequence.GetName()!r}")
        mark_synthetic(browser, node_provenance(sequence))
        if proxy.GetDisplayNode() is None:
            proxy.CreateDefaultDisplayNodes()
        if window is not None:
            set_window(proxy, *window)
        if like is not None:
            proxy.SetAndObserveTransformNodeID(like.GetTransformNodeID())
        place_in_hierarchy(scene, sequence, like)
        place_in_hierarchy(scene, proxy, like)
    except BaseException:
        for node in (browser, proxy):  # nothing half-made stays in the scene
            remove_node(scene, node)
        raise
    finally:
        if private:
            sequences_logic.SetMRMLScene(None)
    return browser, proxy


def sample_sequence(scene, sample_nodes: Iterable, name: str, sequences_logic=None, like=None, window=None,
                    remove: bool = True):
    """The samples (volume nodes, in order) as one Sequence with a browser: returns
    (sequence, browser, proxy). Nodes of the main scene are removed once the sequence and its
    browser are made (``remove``), so the samples do not clutter the scene; on a failure the scene
    is left as it was."""
    sample_nodes = list(sample_nodes)
    if not sample_nodes:
        raise InputError("no samples to put in a sequence")
    sequence = new_sample_sequence(scene, name)
    try:
        for index, node in enumerate(sample_nodes):
            add_sample(sequence, node, index)
        browser, proxy = browse_samples(scene, sequence, sequences_logic, like, window)
    except BaseException:
        remove_node(scene, sequence)
        raise
    if remove:
        for node in sample_nodes:
            if node.GetScene() is scene:
                remove_node(scene, node)
    return sequence, browser, proxy


# Colour of the std overlay: perceptually uniform Inferno (a colour file of the application), else
# the built-in Iron table (always there, also in a scene without the application's colour files).
STD_COLOR_FILES = ("Inferno.txt",)


def std_color_node_id(scene) -> str | None:
    """The ID of the colour table the std overlay uses: the first of Inferno, Iron in ``scene``."""
    slicer = _slicer()
    ids = [slicer.vtkMRMLColorLogic.GetFileColorNodeID(f) for f in STD_COLOR_FILES]
    ids.append(slicer.vtkMRMLColorLogic.GetColorTableNodeID(slicer.vtkMRMLColorTableNode.Iron))
    return next((i for i in ids if scene.GetNodeByID(i) is not None), None)


def std_window(node) -> tuple[float, float]:
    """Display range of a std volume: 0 to about its 99.5th percentile (a few extreme voxels do not
    wash the overlay out)."""
    import numpy as np
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    step = max(1, values.size // 1_000_000)  # a strided subsample: cheap on the main thread
    sample = np.asarray(values[::step], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    high = float(np.percentile(sample, 99.5)) if sample.size else 1.0
    return 0.0, high if high > 0 else 1.0


def style_std(scene, std_node) -> None:
    """Show a std volume in a colour table (:func:`std_color_node_id`) with :func:`std_window`."""
    display = std_node.GetDisplayNode()
    if display is None:
        std_node.CreateDefaultDisplayNodes()
        display = std_node.GetDisplayNode()
    color = std_color_node_id(scene)
    if color is not None:
        display.SetAndObserveColorNodeID(color)
    set_window(std_node, *std_window(std_node))


def show_uncertainty(scene, mean_node, std_node, opacity: float = 0.5) -> list:
    """Every slice view: the mean in the background, the std (colour table, :func:`style_std`) in
    the foreground at ``opacity``; what ``slicer.util.setSliceViewerLayers(background=mean,
    foreground=std, foregroundOpacity=opacity)`` does, for ``scene``. Returns the slice composite
    nodes changed."""
    style_std(scene, std_node)
    changed = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(mean_node.GetID())
        composite.SetForegroundVolumeID(std_node.GetID())
        composite.SetForegroundOpacity(float(opacity))
        changed.append(composite)
    return changed


# -- export with the mark -----------------------------------------------------------------------------------
def export_format(path: str) -> str:
    """``.nrrd``, ``.nii.gz`` or ``.nii`` (from the file name, any case); else InputError."""
    name = os.path.basename(str(path)).lower()
    for suffix in EXPORT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise InputError(f"{os.path.basename(str(path))!r}: export writes .nrrd, .nii or .nii.gz files")


def sidecar_path(path: str) -> str:
    """The BIDS-style JSON sidecar of a volume file: ``a/b.nii.gz`` -> ``a/b.json``
    (MedDiffusionLib.provenance.sidecar_path)."""
    folder, name = os.path.split(str(path))
    for suffix in SIDECAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return os.path.join(folder, name[: -len(suffix)] + ".json")
    return os.path.join(folder, name + ".json")


def metadata_fields(prov: Mapping[str, Any]) -> dict[str, str]:
    """NRRD key/value fields: ``meddiffusion_<field>`` -> compact JSON (MedDiffusionLib.provenance.metadata_fields)."""
    return {KEY_PREFIX + k: json.dumps(v, separators=(",", ":")) for k, v in prov.items()}


def nifti_descrip(prov: Mapping[str, Any]) -> bytes:
    """``SYNTHETIC <generator> <version> <model> <task>``, at most 79 bytes
    (MedDiffusionLib.provenance.nifti_descrip)."""
    words = [MARK, str(prov.get("generator", GENERATOR)), str(prov.get("generator_version", "")),
             str(prov.get("model") or prov.get("controlnet") or ""), str(prov.get("task") or "")]
    text = " ".join(w for w in words if w)
    return text.encode("ascii", "replace")[:NIFTI_DESCRIP_BYTES]


def _nrrd_escape(text: str) -> str:
    """A NRRD key/value value as teem writes it: backslash and newline escaped (``\\\\``, ``\\n``)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def nrrd_with_fields(header: bytes, fields: Mapping[str, str]) -> bytes:
    """``header`` (up to and including the blank line) with ``key:=value`` lines added before the blank line."""
    if not header.endswith(b"\n\n"):
        raise OSError("not a complete NRRD header")
    lines = []
    for key, value in fields.items():
        if ":=" in key or "\n" in key:
            raise ValueError(f"not a NRRD key: {key!r}")
        lines.append(f"{key}:={_nrrd_escape(value)}".encode("utf-8"))
    return header[:-1] + b"".join(line + b"\n" for line in lines) + b"\n"


NIFTI_DESCRIP_OFFSET = {348: 148, 540: 240}  # sizeof_hdr -> offset of descrip[80] (NIfTI-1, NIfTI-2)


def patch_nifti_descrip(path: str, descrip: bytes) -> None:
    """Overwrite the ``descrip`` field of an uncompressed NIfTI-1 or NIfTI-2 file in place."""
    import struct

    with open(path, "r+b") as fh:
        head = fh.read(4)
        size = None
        for order in ("<", ">"):
            value = struct.unpack(order + "i", head)[0] if len(head) == 4 else None
            if value in NIFTI_DESCRIP_OFFSET:
                size = value
        if size is None:
            raise OSError(f"{os.path.basename(path)} is not a NIfTI-1/2 file")
        fh.seek(NIFTI_DESCRIP_OFFSET[size])
        fh.write(descrip[:NIFTI_DESCRIP_BYTES].ljust(80, b"\0"))


def _gzip_file(source: str, dest: str, level: int = 6) -> None:
    import gzip
    import shutil

    with open(source, "rb") as src, gzip.open(dest, "wb", compresslevel=level) as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _write_json_atomic(path: str, doc: Mapping[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".meddiffusion-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(dict(doc), fh, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _is_our_sidecar(path: str) -> bool:
    try:
        if os.path.getsize(path) > 64 * 1024:
            return False
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("generator") == GENERATOR


def export_volume(node, path: str) -> str:
    """Write a scalar volume node to ``path`` (``.nrrd``, ``.nii`` or ``.nii.gz``) in its local
    (untransformed) geometry, as Slicer's own writer does, with the synthetic mark when the node
    has one (:func:`node_provenance`):

    * NRRD (gzip): the header of Slicer's writer plus one key/value field per provenance field,
      ``meddiffusion_<field>:=<JSON value>``;
    * NIfTI: Slicer's writer, then the ``descrip`` set to ``SYNTHETIC MedDiffusion <version> <model>
      <task>`` and a JSON sidecar ``<name>.json`` with every field (a MedDiffusion sidecar left
      there by an earlier export of a marked node is removed when an unmarked node is written).

    A node without the mark is written plainly. The file appears complete or not at all (written
    next to it, then renamed). Returns the path."""
    check_scalar_volume(node, "volume to export")
    suffix = export_format(path)
    path = os.path.abspath(str(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"the folder {folder} does not exist")
    prov = node_provenance(node)
    marked = bool(prov and prov.get("synthetic"))
    side = sidecar_path(path)
    if suffix != ".nrrd" and os.path.exists(side) and not _is_our_sidecar(side):  # e.g. a real scan's BIDS sidecar
        raise InputError(f"{side} exists and is not a MedDiffusion sidecar: not replaced; choose another name")
    work = tempfile.mkdtemp(prefix=".meddiffusion-export-", dir=folder)
    try:
        if suffix == ".nrrd":
            tmp = os.path.join(work, "volume.nrrd")
            if marked:
                encoder = NrrdEncoder(node, work, compress=True)
                encoder.header = nrrd_with_fields(encoder.header, metadata_fields(prov))
                encoder.write(tmp)
            else:
                write_volume(node, tmp, compress=True)
            os.replace(tmp, path)
        else:
            tmp = os.path.join(work, "volume.nii")
            write_volume(node, tmp, compress=False)
            if marked:
                patch_nifti_descrip(tmp, nifti_descrip(prov))
            if suffix == ".nii.gz":
                _gzip_file(tmp, tmp + ".gz")
                tmp += ".gz"
            os.replace(tmp, path)  # the volume first: a failure now leaves no sidecar marking another file
            if marked:
                _write_json_atomic(side, prov)
            elif os.path.isfile(side):
                os.remove(side)  # ours, from an earlier export: it would mark this unmarked file as synthetic
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return path


# -- reproduce: the input's fingerprint, the voxel-wise comparison, a result read outside the scene ------------------
# Both run in short steps on the main thread (about PIECE_BYTES of voxels a step): the panel's timer moves them on.
class VoxelSha256:
    """The sha256 ``MedDiffusionLib.provenance.sha256_of`` gives the voxels the service reads from
    the NRRD :class:`~nodes.NrrdEncoder` uploads for ``image``: the ``(i, j, k)`` array in C order
    (``k`` fastest) of the voxels' own type (``lut``: a label map's look-up table, applied as the
    encoder applies it; the type is then the table's), hashed after ``"<shape>:<dtype>;"``.
    ``image`` holds the voxels with ``i`` fastest, so the array is hashed one slab of ``i`` at a
    time, transposed on the way. :meth:`step` moves on for about ``budget`` seconds; ``hexdigest``
    is set once ``done``."""

    def __init__(self, image, lut=None) -> None:
        import hashlib

        import numpy as np

        dims = tuple(int(d) for d in image.GetDimensions())
        flat = _image_array(image).reshape(-1)
        self._kji = flat.reshape(dims[2], dims[1], dims[0])
        self._lut = lut
        dtype = np.dtype(flat.dtype if lut is None else lut.dtype)
        self._hash = hashlib.sha256(f"{dims}:{dtype};".encode())
        self._slab = max(1, PIECE_BYTES // max(1, dims[1] * dims[2] * dtype.itemsize))
        self._next, self._count = 0, dims[0]
        self.done = False
        self.hexdigest: str | None = None

    def step(self, budget: float) -> bool:
        import time

        import numpy as np

        deadline = time.monotonic() + max(0.0, budget)
        while not self.done:
            i = self._next
            block = np.ascontiguousarray(self._kji[:, :, i:i + self._slab].transpose(2, 1, 0))
            if self._lut is not None:
                block = np.take(self._lut, block, mode="clip")
            self._hash.update(block)
            self._next = i + self._slab
            if self._next >= self._count:
                self.hexdigest, self.done = self._hash.hexdigest(), True
            elif time.monotonic() >= deadline:
                break
        return self.done


class VoxelDifference:
    """max and mean of ``|old - new|`` (as float64) over two flat voxel arrays of the same size, a
    piece at a time (:meth:`step`); a NaN anywhere makes both NaN (never equal)."""

    def __init__(self, old, new) -> None:
        if old.size != new.size:
            raise ValueError("the arrays differ in size")
        self.old, self.new = old.reshape(-1), new.reshape(-1)
        self._next = 0
        self._sum = 0.0
        self.max_abs = 0.0
        self.mean_abs = 0.0
        self.done = self.old.size == 0

    def step(self, budget: float) -> bool:
        import time

        import numpy as np

        deadline = time.monotonic() + max(0.0, budget)
        count = max(1, PIECE_BYTES // 8)
        while not self.done:
            s = self._next
            diff = np.abs(self.old[s:s + count].astype(np.float64) - self.new[s:s + count].astype(np.float64))
            top = float(diff.max())
            if top > self.max_abs or top != top:  # once NaN, it stays NaN (nothing compares greater)
                self.max_abs = top
            self._sum += float(diff.sum())
            self._next = s + count
            if self._next >= self.old.size:
                self.mean_abs, self.done = self._sum / self.old.size, True
            elif time.monotonic() >= deadline:
                break
        return self.done

    def cancel(self) -> None:
        self.done = True


def read_standalone(path: str):
    """A volume file read by Slicer's storage node into a scalar volume node of no scene (nothing
    enters the scene): returns (flat voxels, dimensions, IJK->RAS 4x4 as nested lists)."""
    slicer = _slicer()
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise OSError(f"could not read {os.path.basename(str(path))}")
    ijk_to_ras, dims = geometry(node)
    return _image_array(node.GetImageData()).reshape(-1).copy(), tuple(dims), ijk_to_ras


# -- evaluation metrics: a table and a bar chart ----------------------------------------------------------------
METRIC_COLUMNS = ("metric", "group", "value")
PREFERRED_CHART_METRICS = ("psnr", "dice", "ssim", "mae")


def _metric_rows(rows) -> list[tuple[str, str, float, str]]:
    """(metric, group, value, unit) of each row: ``{"metric", "group" (or the library's "where"),
    "value", "unit" (optional)}``; a value the service sent as "nan"/"inf" text is that number."""
    out = []
    for row in rows or ():
        if not isinstance(row, Mapping) or "metric" not in row:
            raise InputError(f"a metrics row is {{metric, group, value}}, got {row!r}")
        group = row.get("group", row.get("where"))
        value = row.get("value")
        try:
            value = float("nan") if value is None else float(value)
        except (TypeError, ValueError):
            raise InputError(f"a metrics row's value is a number, got {value!r}") from None
        out.append((str(row["metric"]), "" if group is None else str(group), value, str(row.get("unit") or "")))
    return out


def metrics_table(scene, rows, name: str, provenance: Mapping | None = None):
    """A Table node with the columns metric (text), group (text) and value (number), plus unit
    (text) when a row has one, one row per ``{"metric", "group", "value"}`` of ``rows`` (the
    evaluate task's ``metrics["rows"]``; the library's ``where`` is the group).
    ``provenance``: marks the table (what was compared) when given."""
    import vtk

    data = _metric_rows(rows)
    titles = METRIC_COLUMNS + (("unit",) if any(unit for *_, unit in data) else ())
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    columns = [vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkStringArray()][:len(titles)]
    for column, title in zip(columns, titles):
        column.SetName(title)
        column.SetNumberOfValues(len(data))
    for i, row in enumerate(data):
        for column, value in zip(columns, row):
            column.SetValue(i, value)
    for column in columns:
        table.AddColumn(column)
    table.SetColumnDescription("value", "the metric's value for the group")
    if provenance:
        mark_synthetic(table, provenance)
    return table


def chart_metric(rows, metric: str | None = None) -> str | None:
    """The metric to chart: ``metric`` when given, else the first of PSNR, Dice, SSIM, MAE present
    (any case), else the first metric of the rows; None for no rows."""
    names = [m for m, *_ in _metric_rows(rows)]
    if metric is not None:
        if metric not in names:
            raise InputError(f"no metric {metric!r} in the results; they have {', '.join(dict.fromkeys(names))}")
        return metric
    lower = {n.lower(): n for n in reversed(names)}
    for want in PREFERRED_CHART_METRICS:
        if want in lower:
            return lower[want]
    return names[0] if names else None


def metrics_chart(scene, table, metric: str | None = None, name: str | None = None):
    """A bar chart of one metric's value per group from a :func:`metrics_table` table: a Plot chart
    node with one bar Plot series on a small table of that metric's rows (columns group, <metric>;
    a series plots every row of its table). Returns (chart, series, plot table)."""
    import vtk

    has_unit = table.GetNumberOfColumns() > 3
    rows = [{"metric": table.GetCellText(r, 0), "group": table.GetCellText(r, 1),
             "value": table.GetTable().GetValue(r, 2).ToDouble(), "unit": table.GetCellText(r, 3) if has_unit else ""}
            for r in range(table.GetNumberOfRows())]
    metric = chart_metric(rows, metric)
    if metric is None:
        raise InputError("there are no metrics to plot")
    name = name or f"{table.GetName()} {metric}"
    picked = [r for r in rows if r["metric"] == metric]
    plot_table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name + " table"))
    groups, values = vtk.vtkStringArray(), vtk.vtkDoubleArray()
    groups.SetName("group")
    values.SetName(metric)
    for r in picked:
        groups.InsertNextValue(r["group"] or metric)
        values.InsertNextValue(r["value"])
    plot_table.AddColumn(groups)
    plot_table.AddColumn(values)
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(name))
    series.SetAndObserveTableNodeID(plot_table.GetID())
    series.SetPlotType(series.PlotTypeBar)
    series.SetLabelColumnName("group")
    series.SetYColumnName(metric)
    series.SetUniqueColor()
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name + " chart"))
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"{metric} per group")
    chart.SetXAxisTitle("group")
    units = {r["unit"] for r in picked if r["unit"]}
    chart.SetYAxisTitle(f"{metric} ({units.pop()})" if len(units) == 1 else metric)
    chart.SetLegendVisibility(False)
    return chart, series, plot_table


def show_chart(scene, chart, plots_logic=None) -> None:
    """Show ``chart`` in the layout's plot view, switching to a layout with one if needed.
    ``plots_logic``: Slicer's (``slicer.modules.plots.logic()``: ``ShowChartInLayout``); without it
    (tests) the same with MRML: the layout node's arrangement (``GetLayoutWithPlot``) and the chart
    set on every plot view node."""
    if plots_logic is not None:
        plots_logic.ShowChartInLayout(chart)
        return
    slicer = _slicer()
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        wanted = slicer.vtkSlicerPlotsLogic.GetLayoutWithPlot(layout.GetViewArrangement())
        if wanted != layout.GetViewArrangement():
            layout.SetViewArrangement(wanted)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLPlotViewNode").SetPlotChartNodeID(chart.GetID())


__all__ = ["PROVENANCE_ATTRIBUTE", "mark_synthetic", "node_provenance", "is_synthetic", "standalone_volume",
           "new_sample_sequence", "add_sample", "browse_samples", "sample_sequence", "std_color_node_id",
           "std_window", "style_std", "show_uncertainty", "export_format", "sidecar_path", "metadata_fields",
           "nifti_descrip", "nrrd_with_fields", "patch_nifti_descrip", "export_volume", "metrics_table",
           "chart_metric", "metrics_chart", "show_chart", "VoxelSha256", "VoxelDifference", "read_standalone"]
