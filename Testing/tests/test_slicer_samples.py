"""N samples with uncertainty in the scene, with real MRML (slicer-core wheel):

- the samples become one Sequence (copies inside the sequence, none left in the main scene) with a
  Sequence browser whose proxy node shows one sample at a time, every node marked synthetic;
- the std is shown as a colour overlay on the mean in every slice view;
- an N-sample job's results (sample_0 .. sample_{N-1}, mean, std: files written by the library's
  writer) go through the logic's download path into those nodes; a failure leaves nothing behind;
- with the real local service: a 3-sample reconstruction (2 DDIM steps on the CPU).
"""
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
from vtk.util import numpy_support  # noqa: E402

from MedDiffusionGlue import nodes, outputs  # noqa: E402
from test_slicer_glue import _volume as glue_volume  # noqa: E402
from test_slicer_service import sample_ct, served_logic  # noqa: E402,F401 (a fixture)
from MedDiffusionGlue.service import Job, ServiceError, ServiceLogic  # noqa: E402

SHAPE = (6, 7, 8)  # k, j, i
IJK_TO_RAS = np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])


def _prov(i=None, statistic="sample"):
    p = {"synthetic": True, "generator": "MedDiffusion", "generator_version": "0.1.0", "model": "chest-ct-mini",
         "controlnet": "chest-ct-mini-sparse-view", "task": "reconstruct", "seed": 7, "statistic": statistic}
    if i is not None:
        p["sample_index"] = i
    return p


def _scene():
    """A scene as the application has it: the default colour tables and three slice views."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    for _ in range(3):
        scene.AddNode(slicer.vtkMRMLSliceCompositeNode())
    return scene, colors


def _volume(scene, kji, name):
    node = glue_volume(scene, kji, IJK_TO_RAS, name)
    return node


def _array(node):
    dims = node.GetImageData().GetDimensions()
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1])


def _nodes_of(scene, cls):
    return [scene.GetNthNodeByClass(i, cls) for i in range(scene.GetNumberOfNodesByClass(cls))]


def _input_in_study(scene):
    """An input volume under a transform, in a study of the subject hierarchy."""
    ref = _volume(scene, np.zeros(SHAPE, np.float32), "fbp")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    ref.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.GetSceneItemID(), "study")
    sh.CreateItem(study, ref)
    return ref, transform, sh, study


def test_samples_become_one_sequence_with_a_browser_and_leave_no_sample_node(tmp_path):
    scene, _colors = _scene()
    ref, transform, sh, study = _input_in_study(scene)
    rng = np.random.default_rng(0)
    values = [rng.normal(100.0 * i, 5.0, SHAPE).astype(np.float32) for i in range(4)]
    samples = []
    for i, v in enumerate(values):
        node = _volume(scene, v, f"sample {i}")
        node.CreateDefaultDisplayNodes()
        outputs.mark_synthetic(node, _prov(i))
        samples.append(node)

    seq, browser, proxy = outputs.sample_sequence(scene, samples, "fbp recon samples (synthetic)", like=ref,
                                                  window=(-1000.0, 1000.0))

    # the sequence holds N copies, in order, with their values, geometry and marks
    assert seq.GetNumberOfDataNodes() == 4
    assert [seq.GetNthIndexValue(i) for i in range(4)] == ["0", "1", "2", "3"]
    assert seq.GetIndexName() == "sample" and seq.GetIndexType() == slicer.vtkMRMLSequenceNode.NumericIndex
    for i in range(4):
        item = seq.GetNthDataNode(i)
        assert item.GetScene() is not scene  # inside the sequence's own scene
        np.testing.assert_array_equal(_array(item), values[i])
        assert nodes.geometry(item)[0] == nodes.geometry(ref)[0]
        assert outputs.node_provenance(item) == _prov(i)
    # the sample nodes are gone from the scene: one volume for the samples, the proxy
    assert not any(scene.IsNodePresent(n) for n in samples)
    volumes = _nodes_of(scene, "vtkMRMLScalarVolumeNode")
    assert {n.GetID() for n in volumes} == {ref.GetID(), proxy.GetID()}
    assert len(_nodes_of(scene, "vtkMRMLScalarVolumeDisplayNode")) == 1  # the proxy's; the samples' went with them
    # the browser shows the first sample in its proxy node, under the input's transform, in its study
    assert browser.GetMasterSequenceNode() is seq and browser.GetNumberOfItems() == 4
    assert browser.GetProxyNode(seq) is proxy and browser.GetSelectedItemNumber() == 0
    assert proxy.GetName() == "fbp recon samples (synthetic) [sample=0]"
    np.testing.assert_array_equal(_array(proxy), values[0])
    assert proxy.GetTransformNodeID() == transform.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(proxy)) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(seq)) == study
    display = proxy.GetDisplayNode()
    assert not display.GetAutoWindowLevel() and (display.GetWindow(), display.GetLevel()) == (2000.0, 0.0)
    # every node is marked: the proxy as its sample, the sequence and browser as the samples
    assert outputs.node_provenance(proxy) == _prov(0)
    whole = dict(_prov(), statistic="samples")
    assert outputs.node_provenance(seq) == whole and outputs.node_provenance(browser) == whole
    assert outputs.is_synthetic(browser)

    # stepping through: Slicer's sequences logic copies the selected sample into the proxy
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    browser.SetSelectedItemNumber(2)
    logic.UpdateProxyNodesFromSequences(browser)
    np.testing.assert_array_equal(_array(proxy), values[2])
    assert proxy.GetName() == "fbp recon samples (synthetic) [sample=2]"
    assert outputs.node_provenance(proxy) == _prov(2)
    assert proxy.GetTransformNodeID() == transform.GetID() and proxy.GetDisplayNode() is display
    logic.SetMRMLScene(None)


def test_a_failure_while_browsing_leaves_the_scene_as_it_was():
    scene, _colors = _scene()
    samples = [_volume(scene, np.full(SHAPE, float(i), np.float32), f"sample {i}") for i in range(2)]
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    class Broken:
        """A sequences logic that fails to make the proxy node."""

        def UpdateProxyNodesFromSequences(self, browser):
            raise RuntimeError("no proxy")

    slicer.vtkSlicerSequencesLogic().SetMRMLScene(scene)  # registers the browser node class, as the application has it
    with pytest.raises(RuntimeError, match="no proxy"):
        outputs.sample_sequence(scene, samples, "samples", sequences_logic=Broken())
    assert {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())} == before  # samples kept
    with pytest.raises(outputs.InputError, match="no samples"):
        outputs.sample_sequence(scene, [], "samples")


def test_std_is_a_colour_overlay_on_the_mean_in_every_slice_view():
    scene, _colors = _scene()
    mean = _volume(scene, np.full(SHAPE, 40.0, np.float32), "mean")
    std = np.abs(np.random.default_rng(1).normal(0, 10, SHAPE)).astype(np.float32)
    std[0, 0, 0] = 1e6  # one wild voxel does not wash the overlay out
    std_node = _volume(scene, std, "std")
    for n in (mean, std_node):
        n.CreateDefaultDisplayNodes()
    logic = ServiceLogic(scene)

    changed = logic.showUncertainty(mean, std_node, opacity=0.5)

    composites = _nodes_of(scene, "vtkMRMLSliceCompositeNode")
    assert len(changed) == len(composites) == 3
    for c in composites:
        assert c.GetBackgroundVolumeID() == mean.GetID() and c.GetForegroundVolumeID() == std_node.GetID()
        assert c.GetForegroundOpacity() == 0.5
    iron = slicer.vtkMRMLColorLogic.GetColorTableNodeID(slicer.vtkMRMLColorTableNode.Iron)
    display = std_node.GetDisplayNode()
    assert scene.GetNodeByID(iron) is not None and display.GetColorNodeID() == iron  # no colour files here: Iron
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    assert low == 0.0 and 10.0 < high < 100.0  # about the 99.5th percentile, not the wild voxel
    assert mean.GetDisplayNode().GetColorNodeID() != iron  # the mean stays grey


# -- the logic's download path with an N-sample job's results -------------------------------------------------
class _Done:
    """A finished stepwise request (the client's Transfer interface)."""

    def __init__(self, result=None, error=None):
        self.done, self.result, self.error, self.sent, self.total = True, result, error, 0, 0

    def step(self, budget=0.0):
        return True

    def cancel(self):
        pass


class _FilesClient:
    """Serves result files from a folder; downloads of the names in ``fail`` fail."""

    def __init__(self, folder, fail=()):
        self.folder, self.fail, self.deleted = folder, set(fail), []

    def start_download(self, job_id, name, dest):
        if name in self.fail:
            return _Done(error=ServiceError("connection reset"))
        shutil.copy(self.folder / name, dest)
        return _Done(result=str(dest))

    def start_delete(self, job_id):
        self.deleted.append(job_id)
        return _Done()


def _served_results(folder, n):
    """The results an n-sample reconstruct job lists, written by the library's writer."""
    from MedDiffusionLib.data.volumes import Volume, write_volume

    rng = np.random.default_rng(2)
    affine = IJK_TO_RAS
    arrays = [rng.normal(-500 + 50 * i, 20, SHAPE[::-1]).astype(np.float32) for i in range(n)]  # (i, j, k)
    stack = np.stack(arrays)
    results = []
    named = [(f"sample_{i}.nrrd", a, dict(_prov(i), result=f"sample_{i}.nrrd")) for i, a in enumerate(arrays)]
    named += [("mean.nrrd", stack.mean(0), dict(_prov(statistic="mean"), samples=n)),
              ("std.nrrd", stack.std(0, ddof=1), dict(_prov(statistic="std"), samples=n))]
    for name, array, prov in named:
        write_volume(Volume(np.ascontiguousarray(array, np.float32), affine), folder / name, provenance=prov)
        meta = {"statistic": prov["statistic"], "units": "HU", "provenance": prov}
        if "sample_index" in prov:
            meta["sample_index"] = prov["sample_index"]
        results.append({"name": name, "meta": meta})
    return results, arrays, stack


def _downloading_job(lg, tmp_path, results, like):
    work = tmp_path / "work"
    work.mkdir()
    job = Job("job1", "reconstruct", "fbp MedDiffusion recon", like, (-1000.0, 1000.0),
              {"state": "done", "results": results}, str(work), phase="downloading")
    return job


def _offline(scene, folder, fail=()):
    lg = ServiceLogic(scene)
    client = _FilesClient(folder, fail)
    lg.client = lambda timeout=None, start=True: client
    return lg, client


def test_an_n_sample_jobs_results_become_sequence_mean_and_std(tmp_path):
    scene, _colors = _scene()
    ref, transform, sh, study = _input_in_study(scene)
    served = tmp_path / "served"
    served.mkdir()
    results, arrays, stack = _served_results(served, 3)
    lg, client = _offline(scene, served)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    job = _downloading_job(lg, tmp_path, results, ref)
    mean, std, proxy, seq, browser = lg.finishJob(job)

    assert client.deleted == ["job1"]
    assert job.outputs == {"mean": mean, "std": std, "proxy": proxy, "sequence": seq, "browser": browser}
    assert [n.GetName() for n in (mean, std, seq)] == ["fbp MedDiffusion recon mean (synthetic)",
                                                       "fbp MedDiffusion recon std (synthetic)",
                                                       "fbp MedDiffusion recon samples (synthetic)"]
    assert proxy.GetName() == "fbp MedDiffusion recon samples (synthetic) [sample=0]"
    assert seq.GetNumberOfDataNodes() == 3
    for i in range(3):  # the library's (i, j, k) arrays, here (k, j, i)
        np.testing.assert_allclose(_array(seq.GetNthDataNode(i)), arrays[i].transpose(2, 1, 0))
        assert outputs.node_provenance(seq.GetNthDataNode(i))["sample_index"] == i
    np.testing.assert_allclose(_array(proxy), arrays[0].transpose(2, 1, 0))
    np.testing.assert_allclose(_array(mean), stack.mean(0).transpose(2, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(_array(std), stack.std(0, ddof=1).transpose(2, 1, 0), rtol=1e-6)
    for node in (mean, std, proxy, seq, browser):
        assert outputs.is_synthetic(node), node.GetName()
    assert outputs.node_provenance(mean)["statistic"] == "mean"
    assert outputs.node_provenance(std)["statistic"] == "std"
    for node in (mean, std, proxy):  # on the input's grid, under its transform, in its study
        np.testing.assert_allclose(nodes.geometry(node)[0], IJK_TO_RAS, atol=1e-5)
        assert node.GetTransformNodeID() == transform.GetID()
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert proxy.GetDisplayNode().GetWindow() == 2000.0  # the samples keep the CT window
    iron = slicer.vtkMRMLColorLogic.GetColorTableNodeID(slicer.vtkMRMLColorTableNode.Iron)
    assert std.GetDisplayNode().GetColorNodeID() == iron and std.GetDisplayNode().GetWindowLevelMin() == 0.0
    # what the job added: the three volumes with their display nodes (and the proxy's storage node),
    # the sequence and its browser; no sample node
    added = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())} - before
    expected = {n.GetID() for n in (mean, std, proxy, seq, browser)}
    expected |= {n.GetDisplayNode().GetID() for n in (mean, std, proxy)} | {proxy.GetStorageNode().GetID()}
    assert added == expected
    assert not (tmp_path / "work").exists()  # the job's folder went with it


def test_a_failed_download_of_an_n_sample_job_leaves_nothing(tmp_path):
    scene, _colors = _scene()
    ref, *_ = _input_in_study(scene)
    served = tmp_path / "served"
    served.mkdir()
    results, _, _ = _served_results(served, 2)
    lg, _client = _offline(scene, served, fail={"std.nrrd"})
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    job = _downloading_job(lg, tmp_path, results, ref)
    with pytest.raises(ServiceError, match="downloading the results failed: connection reset"):
        lg.finishJob(job)
    after = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    assert after == before  # the sequence and the mean loaded before the failure were removed
    assert job.nodes == [] and job.outputs == {} and job.sequence is None


def test_samples_are_asked_for_only_when_more_than_one_and_within_the_limit():
    from MedDiffusionGlue.service import InputError

    scene, _colors = _scene()
    ref = _volume(scene, np.zeros(SHAPE, np.float32), "fbp")
    lg = ServiceLogic(scene)
    lg._health = {"version": "test", "models": [], "controlnets": []}
    specs = []
    lg._submit = lambda spec, name, **kw: specs.append(spec) or "job"
    lg.submitReconstruct(ref, steps=2)
    lg.submitReconstruct(ref, steps=2, numSamples=4)
    assert "num_samples" not in specs[0]["params"]  # an older service takes single-sample jobs unchanged
    assert specs[1]["params"]["num_samples"] == 4
    for bad in (0, 17, 2.5, True):
        with pytest.raises(InputError, match="Samples: a whole number from 1 to 16"):
            lg.submitReconstruct(ref, numSamples=bad)
    assert len(specs) == 2


# -- end to end, through a real local service ------------------------------------------------------------------
def test_reconstruct_three_samples_through_the_local_service(served_logic):
    lg = served_logic
    scene = lg.scene
    ct = sample_ct(scene)
    fbp_ids = {n.GetID() for n in _nodes_of(scene, "vtkMRMLScalarVolumeNode")}
    mean, std, proxy, seq, browser = lg.reconstructSparseView(ct, steps=2, device="cpu", seed=5, numSamples=3)
    assert seq.GetNumberOfDataNodes() == 3
    a = [_array(seq.GetNthDataNode(i)).astype(np.float64) for i in range(3)]
    assert not np.array_equal(a[0], a[1])  # three different draws
    np.testing.assert_allclose(_array(mean), np.mean(a, 0), atol=1e-2)
    np.testing.assert_allclose(_array(std), np.std(a, 0, ddof=1), atol=1e-2)  # the sample estimate
    assert nodes.geometry(mean) == nodes.geometry(ct) and nodes.geometry(proxy) == nodes.geometry(ct)
    for node in (mean, std, proxy, seq, browser):
        assert outputs.is_synthetic(node) and outputs.node_provenance(node)["seed"] is not None
    assert [outputs.node_provenance(seq.GetNthDataNode(i))["sample_index"] for i in range(3)] == [0, 1, 2]
    new = {n.GetID() for n in _nodes_of(scene, "vtkMRMLScalarVolumeNode")} - fbp_ids
    assert new == {mean.GetID(), std.GetID(), proxy.GetID()}  # no sample node in the scene
    assert lg.client().jobs() == []


def test_the_panel_shows_std_over_mean_with_the_sequences_toolbar_and_a_plain_result_as_before():
    """The panel's ``_showResults`` (the widget's code without Qt: test_slicer_segment_table's stand-ins)."""
    import types

    from test_slicer_segment_table import _load

    ns = _load()
    calls = []
    ns["slicer"].util.setSliceViewerLayers = lambda **kw: calls.append(("layers", kw))
    ns["slicer"].modules = types.SimpleNamespace(sequences=types.SimpleNamespace(
        setToolBarActiveBrowserNode=lambda b: calls.append(("browser", b)),
        setToolBarVisible=lambda v: calls.append(("toolbar", v))))
    w = ns["MedDiffusionWidget"]()
    scene, _colors = _scene()
    w.logic = ServiceLogic(scene)
    mean = _volume(scene, np.zeros(SHAPE, np.float32), "mean")
    std = _volume(scene, np.ones(SHAPE, np.float32), "std")
    browser = object()
    job = types.SimpleNamespace(task="reconstruct", outputs={"mean": mean, "std": std, "browser": browser})
    w._showResults(job, [mean, std])
    for c in _nodes_of(scene, "vtkMRMLSliceCompositeNode"):
        assert (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity()) == \
            (mean.GetID(), std.GetID(), 0.5)
    assert calls == [("layers", {"fit": True}), ("browser", browser), ("toolbar", True)]

    calls.clear()
    w._parameterNode = types.SimpleNamespace(fbpVolume=None)
    fbp = _volume(scene, np.zeros(SHAPE, np.float32), "fbp")
    w._showResults(types.SimpleNamespace(task="simulate-sparse-view", outputs={}), [fbp])
    assert calls == [("layers", {"background": fbp, "fit": True})] and w._parameterNode.fbpVolume is fbp
