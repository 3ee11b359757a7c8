"""Evaluation results in the scene, with real MRML (slicer-core wheel): the metrics rows become a
Table node (metric, group, value) with a bar chart of one metric per group shown in the layout's
plot view; an evaluate job uploads two volumes (prediction and reference) and its finished status
(metrics, no result volumes) becomes those nodes."""
import email.parser
import email.policy
import gzip
import json
import shutil
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

from MedDiffusionGlue import outputs  # noqa: E402
from test_slicer_samples import _Done  # noqa: E402
from test_slicer_service import sample_ct, served_logic  # noqa: E402,F401 (a fixture)
from MedDiffusionGlue.nodes import NrrdEncoder  # noqa: E402
from MedDiffusionGlue.service import EncodedUpload, InputError, ServiceLogic  # noqa: E402

ROWS = [{"metric": "MAE", "group": "all", "value": 41.5}, {"metric": "PSNR", "group": "all", "value": 27.25},
        {"metric": "PSNR", "group": "Lung", "value": 30.5}, {"metric": "PSNR", "group": "Bone", "value": 22.0},
        {"metric": "SSIM", "group": "all", "value": 0.875}]


def _volume(scene, kji, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(kji.shape[2], kji.shape[1], kji.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(kji).reshape(-1), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(1.5, 1.5, 2.0)
    return node


def _scene_with_layout():
    """A scene as the application has it: a layout node (conventional view) and a plot view node."""
    scene = slicer.vtkMRMLScene()
    layout = slicer.vtkMRMLLayoutNode()
    scene.AddNode(layout)
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    plot_view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode", "PlotView1")
    return scene, layout, plot_view


def _table_rows(table):
    return [(table.GetCellText(r, 0), table.GetCellText(r, 1), table.GetTable().GetValue(r, 2).ToDouble())
            for r in range(table.GetNumberOfRows())]


def test_metrics_become_a_table_and_a_bar_chart_of_psnr_per_group():
    scene, layout, plot_view = _scene_with_layout()
    lg = ServiceLogic(scene)

    table, chart, series, plot_table = lg.metricsTable(ROWS, "pred vs ref metrics")

    assert table.GetName() == "pred vs ref metrics"
    assert [table.GetColumnName(i) for i in range(3)] == ["metric", "group", "value"]
    assert [table.GetTable().GetColumn(i).GetClassName() for i in range(3)] == \
        ["vtkStringArray", "vtkStringArray", "vtkDoubleArray"]
    assert _table_rows(table) == [(r["metric"], r["group"], r["value"]) for r in ROWS]
    # the chart: one bar series of PSNR per group, from a table of the PSNR rows only
    assert chart.GetNumberOfPlotSeriesNodes() == 1 and chart.GetNthPlotSeriesNode(0) is series
    assert chart.GetTitle() == "PSNR per group" and chart.GetYAxisTitle() == "PSNR"
    assert series.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar
    assert series.GetTableNode() is plot_table
    assert (series.GetLabelColumnName(), series.GetYColumnName()) == ("group", "PSNR")
    assert [(plot_table.GetCellText(r, 0), plot_table.GetTable().GetValue(r, 1).ToDouble())
            for r in range(plot_table.GetNumberOfRows())] == [("all", 27.25), ("Lung", 30.5), ("Bone", 22.0)]
    # shown: a layout with a plot view, the chart in it
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalPlotView
    assert plot_view.GetPlotChartNodeID() == chart.GetID()

    # another metric on request; an unknown one is refused; no rows: a table without a chart
    _, chart2, _, _ = lg.metricsTable(ROWS, "again", metric="SSIM", show=False)
    assert chart2.GetTitle() == "SSIM per group" and plot_view.GetPlotChartNodeID() == chart.GetID()
    with pytest.raises(InputError, match="no metric 'Dice'.*MAE, PSNR, SSIM"):
        lg.metricsTable(ROWS, "bad", metric="Dice")
    empty, none, _, _ = lg.metricsTable([], "empty")
    assert empty.GetNumberOfRows() == 0 and none is None
    with pytest.raises(InputError, match="a metrics row is"):
        outputs.metrics_table(scene, [{"group": "all", "value": 1.0}], "bad rows")


def test_the_chart_metric_defaults_and_slicers_plots_logic_shows_it():
    assert outputs.chart_metric([{"metric": "dice", "group": "1", "value": 0.9},
                                 {"metric": "hausdorff", "group": "1", "value": 3}]) == "dice"
    assert outputs.chart_metric([{"metric": "NCC", "value": 0.5}]) == "NCC"
    assert outputs.chart_metric([]) is None
    scene, layout, _ = _scene_with_layout()
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
    plots = slicer.vtkSlicerPlotsLogic()
    plots.SetMRMLScene(scene)
    lg = ServiceLogic(scene, plotsLogic=plots)  # the application's path: ShowChartInLayout
    lg.metricsTable(ROWS, "m")
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotView


# -- an evaluate job: two uploads, metrics back ----------------------------------------------------------------
def _two_volumes(scene):
    rng = np.random.default_rng(0)
    pred = _volume(scene, rng.normal(0, 100, (4, 5, 6)).astype(np.float32), "pred (synthetic)")
    ref = _volume(scene, rng.integers(-1000, 1000, (4, 5, 6)).astype(np.int16), "ref")
    return pred, ref


def test_two_inputs_go_in_one_multipart_body_as_the_client_sends_them(tmp_path):
    scene = slicer.vtkMRMLScene()
    pred, ref = _two_volumes(scene)
    encoders = {"prediction": (NrrdEncoder(pred, str(tmp_path)), str(tmp_path / "prediction.nrrd")),
                "reference": (NrrdEncoder(ref, str(tmp_path)), str(tmp_path / "reference.nrrd"))}
    spec = {"task": "evaluate", "params": {"labels": False, "resample": False},
            "inputs": {"prediction": "prediction.nrrd", "reference": "reference.nrrd"}}
    headers, length, body = EncodedUpload._multipart(spec, encoders)
    data = b"".join(body)
    assert len(data) == length == int(headers["Content-Length"])
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + data)
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
    assert list(parts) == ["spec", "prediction", "reference"]
    assert json.loads(parts["spec"].get_payload(decode=True)) == spec
    for name, (encoder, path) in encoders.items():
        assert parts[name].get_filename() == f"{name}.nrrd"
        assert parts[name].get_payload(decode=True) == b"".join(encoder.blocks())  # the NRRD, byte for byte


class _EvaluateService:
    """A remote service as far as the job needs one: takes the upload, says done with metrics."""

    def __init__(self, folder):
        self.folder, self.specs, self.files, self.deleted = folder, [], {}, []

    def start_submit(self, spec, files):
        self.specs.append(spec)
        for name, path in files.items():  # the uploaded files go once sent: keep a copy
            self.files[name] = shutil.copy(path, self.folder / f"{name}.nrrd.gz")
        return _Done({"id": "ev1", "state": "queued", "task": "evaluate"})

    def start_status(self, job_id):
        # as the service answers: the metrics in the result's meta (also downloadable as metrics.json)
        return _Done({"id": job_id, "state": "done", "task": "evaluate",
                      "results": [{"name": "metrics.json", "meta": {"task": "evaluate",
                                                                    "metrics": {"rows": ROWS, "labels": False}}}]})

    def start_delete(self, job_id):
        self.deleted.append(job_id)
        return _Done()


def test_an_evaluate_job_uploads_both_volumes_and_its_metrics_become_a_table(tmp_path):
    scene, layout, plot_view = _scene_with_layout()
    pred, ref = _two_volumes(scene)
    service = _EvaluateService(tmp_path)
    lg = ServiceLogic(scene)
    lg.remote = ("https://gpu.example:8000", "token", None)  # a remote service: the inputs go gzip-compressed
    lg.client = lambda timeout=None, start=True: service
    before = scene.GetNumberOfNodes()

    table = lg.evaluate(pred, ref, labels=True, resample=True)

    (spec,) = service.specs
    assert spec == {"task": "evaluate", "params": {"labels": True, "resample": True},
                    "inputs": {"prediction": "prediction.nrrd", "reference": "reference.nrrd"}}
    from MedDiffusionLib.data.volumes import read_volume

    for name, node in (("prediction", pred), ("reference", ref)):
        raw = gzip.decompress(open(service.files[name], "rb").read().split(b"\n\n", 1)[1])
        dims = node.GetImageData().GetDimensions()
        voxels = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
        np.testing.assert_array_equal(np.frombuffer(raw, voxels.dtype), voxels)  # the node's voxels, as they are
        renamed = tmp_path / f"{name}.nrrd"  # and the library reads what was sent
        shutil.copy(service.files[name], renamed)
        assert read_volume(renamed).array.shape == dims
    assert service.deleted == ["ev1"]
    assert table.GetName() == "pred (synthetic) vs ref metrics"
    assert _table_rows(table) == [(r["metric"], r["group"], r["value"]) for r in ROWS]
    chart = scene.GetFirstNodeByClass("vtkMRMLPlotChartNode")
    assert plot_view.GetPlotChartNodeID() == chart.GetID() and chart.GetTitle() == "PSNR per group"
    assert scene.GetNumberOfNodes() == before + 4  # table, chart, series, plot table; no volume


def test_evaluate_refuses_a_missing_or_vector_volume():
    scene = slicer.vtkMRMLScene()
    pred, _ = _two_volumes(scene)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    lg = ServiceLogic(scene)
    with pytest.raises(InputError, match="select the reference volume"):
        lg.submitEvaluate(pred, None)
    with pytest.raises(InputError, match="vector"):
        lg.submitEvaluate(rgb, pred)


def test_the_librarys_rows_where_and_unit_and_metrics_in_a_results_meta(tmp_path):
    """The library's report rows ({metric, where, value, unit, context}, non-finite values as text),
    carried in the meta of the job's metrics.json result: no download, a table with a unit column."""
    scene, layout, plot_view = _scene_with_layout()
    rows = [{"metric": "psnr", "where": "paper", "value": 31.5, "unit": "dB", "context": {"window": [-1000, 1000]}},
            {"metric": "psnr", "where": "lung", "value": "inf", "unit": "dB", "context": {}},
            {"metric": "mae", "where": "paper", "value": 12.0, "unit": "HU", "context": {}}]
    service = _EvaluateService(tmp_path)
    service.start_status = lambda job_id: _Done({
        "id": job_id, "state": "done", "task": "evaluate",
        "results": [{"name": "metrics.json", "meta": {"task": "evaluate", "metrics": {"kind": "paired", "rows": rows}}}]})
    service.start_download = lambda *a: pytest.fail("the metrics are in the status: nothing to download")
    pred, ref = _two_volumes(scene)
    lg = ServiceLogic(scene)
    lg.remote = ("https://gpu.example:8000", "token", None)
    lg.client = lambda timeout=None, start=True: service
    job = lg.submitEvaluate(pred, ref)
    table, chart, series, plot_table = lg.finishJob(job)
    assert job.outputs == {"table": table, "chart": chart, "series": series, "plotTable": plot_table}
    assert [table.GetColumnName(i) for i in range(4)] == ["metric", "group", "value", "unit"]
    got = [(table.GetCellText(r, 0), table.GetCellText(r, 1), table.GetTable().GetValue(r, 2).ToDouble(),
            table.GetCellText(r, 3)) for r in range(3)]
    assert got == [("psnr", "paper", 31.5, "dB"), ("psnr", "lung", float("inf"), "dB"), ("mae", "paper", 12.0, "HU")]
    assert chart.GetTitle() == "psnr per group" and chart.GetYAxisTitle() == "psnr (dB)"
    assert plot_table.GetNumberOfRows() == 2


def test_evaluate_through_the_local_service(served_logic):
    lg = served_logic
    scene = lg.scene
    ct = sample_ct(scene)
    noisy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "noisy")
    noisy.CopyOrientation(ct)
    image = vtk.vtkImageData()
    image.DeepCopy(ct.GetImageData())
    noisy.SetAndObserveImageData(image)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    voxels += np.random.default_rng(0).integers(-20, 21, voxels.shape).astype(voxels.dtype)
    before = scene.GetNumberOfNodes()
    table = lg.evaluate(noisy, ct, show=False)
    assert table.GetName() == "noisy vs ct metrics"
    rows = [(table.GetCellText(r, 0), table.GetCellText(r, 1), table.GetTable().GetValue(r, 2).ToDouble())
            for r in range(table.GetNumberOfRows())]
    metrics = {m.lower() for m, _, _ in rows}
    assert {"psnr", "ssim", "mae"} <= metrics, rows
    mae = [v for m, _, v in rows if m.lower() == "mae"]
    assert mae and all(0 <= v <= 20 for v in mae) and max(mae) > 0, rows  # the noise: at most 20 HU a voxel
    assert scene.GetNumberOfNodes() == before + 4  # table, chart, series, plot table
    assert lg.client().jobs() == []


def test_the_panel_shows_an_evaluations_chart_not_its_table_in_the_slice_views():
    import types

    from test_slicer_segment_table import _load

    ns = _load()
    calls = []
    ns["slicer"].util.setSliceViewerLayers = lambda **kw: calls.append(kw)
    w = ns["MedDiffusionWidget"]()
    scene, layout, plot_view = _scene_with_layout()
    w.logic = ServiceLogic(scene)
    table, chart, series, plot_table = w.logic.metricsTable(ROWS, "m", show=False)
    assert plot_view.GetPlotChartNodeID() is None
    w._showResults(types.SimpleNamespace(task="evaluate", outputs={"table": table, "chart": chart}),
                   [table, chart, series, plot_table])
    assert plot_view.GetPlotChartNodeID() == chart.GetID() and calls == []
