"""The Slicer module's logic end to end: real MRML (slicer-core wheel), a real local job service
(``LocalServer`` child process on 127.0.0.1, this interpreter, bundled chest-ct-mini model on the
CPU, 2 DDIM steps), nodes back in the scene with the input's geometry, transform and hierarchy."""
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

from MedDiffusionGlue import nodes  # noqa: E402
from MedDiffusionGlue.service import (JobCancelled, PREVIEW_NAME, ServiceError, ServiceLogic,  # noqa: E402
                                      segment_mapping)

SAMPLES = ROOT / "MedDiffusion" / "Resources" / "SampleData"


def started_logic() -> ServiceLogic:
    """A service logic on a fresh MRML scene with its local server started (this Python)."""
    scene = slicer.vtkMRMLScene()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    lg = ServiceLogic(scene, seg_logic)
    lg.useLocalServer(sys.executable)
    lg.startServer(wait=True, timeout=120)
    return lg


@pytest.fixture(scope="module")
def served_logic():
    """:func:`started_logic` for one test module (other modules import this fixture)."""
    lg = started_logic()
    yield lg
    lg.stopServer()


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    lg = started_logic()
    yield lg
    lg.stopServer()
    assert lg.server is None


def _load(scene, name, cls="vtkMRMLScalarVolumeNode", storage="vtkMRMLVolumeArchetypeStorageNode"):
    node = scene.AddNewNodeByClass(cls, name.split(".")[0])
    st = getattr(slicer, storage)()
    st.SetFileName(str(SAMPLES / name))
    assert st.ReadData(node)
    return node


def sample_ct(scene, name="ct"):
    """The module's sample chest CT as a volume node of ``scene``."""
    node = _load(scene, "MedDiffusionChestCT.nrrd")
    node.SetName(name)
    return node


def _ids(scene, cls):
    return {scene.GetNthNodeByClass(i, cls).GetID() for i in range(scene.GetNumberOfNodesByClass(cls))}


def test_console_generate_returns_a_node_with_the_models_geometry_and_hu_window(logic):
    server = logic.server
    seen = []
    node = logic.generate(sampler="ddim", steps=2, device="cpu", progressCallback=lambda st: seen.append(st["state"]))
    assert logic.server is server and server.running  # one server, kept for the next job
    assert seen[-1] == "done"
    assert node.GetImageData().GetDimensions() == (64, 64, 64)
    np.testing.assert_allclose(node.GetSpacing(), (4.8, 4.8, 4.3), atol=1e-5)
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((525 + 1022, (525 - 1022) / 2))
    assert node.GetName().startswith("MedDiffusion CT chest-abdomen seed0")
    assert logic.scene.GetFirstNodeByName(PREVIEW_NAME) is None
    assert logic.client().jobs() == []  # the finished job was deleted on the service


def test_simulate_then_reconstruct_keep_the_inputs_grid_transform_and_study(logic):
    scene = logic.scene
    ct = _load(scene, "MedDiffusionChestCT.nrrd")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    m = vtk.vtkMatrix4x4()
    m.SetElement(1, 3, -40.0)
    transform.SetMatrixTransformToParent(m)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.GetSceneItemID(), "study")
    sh.CreateItem(study, ct)

    job = logic.submitSimulate(ct, views=24)  # the non-blocking path the panel uses
    states = [job.state]  # the first poll() ran inside submit: a small local upload may be over already
    while not job.done:
        logic.poll(job)
        states.append(job.state)
        logic._idle(0.02)
    assert states[0] in ("uploading", "queued", "running") and states[-1] == "done"
    (fbp,) = logic.finishJob(job)
    assert fbp.GetName() == "MedDiffusionChestCT FBP 24 views (synthetic)"  # every output is marked
    for out in (fbp, logic.reconstructSparseView(fbp, steps=2, device="cpu")):
        np.testing.assert_allclose(nodes.geometry(out)[0], nodes.geometry(ct)[0], atol=1e-5)
        assert nodes.geometry(out)[1] == nodes.geometry(ct)[1]
        assert out.GetTransformNodeID() == transform.GetID()
        assert sh.GetItemParent(sh.GetItemByDataNode(out)) == study
        assert out.GetDisplayNode().GetWindow() > 1000  # a CT window in HU


def test_synthesize_from_the_sample_segmentation_leaves_no_extra_nodes(logic):
    scene = logic.scene
    ct = _load(scene, "MedDiffusionChestCT.nrrd")
    seg = _load(scene, "MedDiffusionChestCT.seg.nrrd", "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode")
    mapping = segment_mapping(seg, "Air=0, Lung=1, Soft tissue=2, Bone=3, Tumour=4")
    assert sorted(mapping.values()) == [0, 1, 2, 3]
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    out = logic.synthesizeFromSegmentation(seg, ct, mapping, steps=2, device="cpu")
    added = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())} - before
    assert added == {out.GetID(), out.GetDisplayNode().GetID()}  # no label map, no colour table
    np.testing.assert_allclose(nodes.geometry(out)[0], nodes.geometry(ct)[0], atol=1e-5)


def _node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_bad_requests_and_a_cancelled_upload_leave_the_scene_unchanged(logic):
    scene = logic.scene
    before = _node_ids(scene)
    job = logic.submitGenerate(size=(30, 30, 30), spacing=(1, 1, 1), sampler="ddim", steps=2, device="cpu")
    with pytest.raises(ServiceError, match="multiple of"):  # refused by the service after the upload
        logic.finishJob(job)
    assert job.state == "failed" and job.nodes == []
    job = logic.submitGenerate(sampler="ddpm", device="cpu")
    logic.cancel(job)  # still uploading (or just submitted): stops at once
    with pytest.raises(JobCancelled):
        logic.finishJob(job)
    assert job.state == "cancelled" and _node_ids(scene) == before


def test_cancel_mid_run_stops_the_job_and_adds_nothing(logic):
    """Cancel through the logic while the service is sampling (state running, step > 0), as the
    panel's Cancel button does: the job ends cancelled, no result, preview or other node stays."""
    scene = logic.scene
    before = _node_ids(scene)
    job = logic.submitGenerate(sampler="ddpm", device="cpu", previewEvery=1)  # 1000 steps
    while not (job.state == "running" and job.status.get("step", 0) > 0):
        logic.poll(job)
        assert not job.done, job.error
        logic._idle(0.02)
    logic.cancel(job)
    while not job.done:
        logic.poll(job)
        logic._idle(0.02)
    assert job.state == "cancelled" and job.status["state"] == "cancelled"
    assert 0 < job.status["step"] < job.status["total"]
    with pytest.raises(JobCancelled):
        logic.finishJob(job)
    assert _node_ids(scene) == before and scene.GetFirstNodeByName(PREVIEW_NAME) is None
    assert logic.client().jobs() == []


def test_a_download_that_fails_midway_leaves_nothing_in_the_scene(logic):
    """Two results; the second download fails (the service lost it): the first node is removed."""
    scene = logic.scene
    before = _node_ids(scene)
    job = logic.submitGenerate(sampler="ddim", steps=2, device="cpu", numberOfVolumes=2)
    while job.phase != "downloading":
        logic.poll(job, budget=0.001)  # a tiny budget: the poll that sees "done" has no time left to download
        assert not job.done, job.error
        logic._idle(0.02)
    assert job.downloaded == 0
    job.status["results"][1]["name"] = "missing.nrrd"
    with pytest.raises(ServiceError, match="downloading the results failed.*missing.nrrd"):
        logic.finishJob(job)
    assert job.nodes == [] and _node_ids(scene) == before


def test_free_gpu_memory_unloads_the_cached_models(logic):
    assert logic.health(refresh=True)["loaded"]
    out = logic.unload()
    assert out["unloaded"] and not logic.health(refresh=True)["loaded"]


def test_a_dead_local_server_is_restarted_without_waiting(logic):
    """connectStep (the panel's timer) restarts a local server that died with start(wait=False)
    and probes it stepwise: it returns None while the new server starts, then its health."""
    old = logic.server.pid
    logic.server.process.kill()
    logic.server.process.wait(10)
    with pytest.raises(ServiceError):
        logic.client(start=False)  # the panel's requests never restart it implicitly
    answers = []
    while not answers or answers[-1] is None:
        answers.append(logic.connectStep())
        logic._idle(0.02)
    assert answers[0] is None and len(answers) > 1  # returned at once while the server started
    assert logic.server.running and logic.server.pid != old
    assert answers[-1]["models"] and logic.cachedHealth() is answers[-1]


def test_the_panel_moves_its_server_to_another_port_when_its_port_was_taken(monkeypatch):
    """connectStep: the local server exits because another program bound its port first; the
    panel starts it on another port (no wait on the main thread) and connects."""
    import socket

    from MedDiffusionLib import client as client_mod

    blocker = socket.create_server(("127.0.0.1", 0))
    taken = blocker.getsockname()[1]
    picks = [taken]
    real = client_mod.free_port
    monkeypatch.setattr(client_mod, "free_port", lambda host="127.0.0.1": picks.pop(0) if picks else real(host))
    lg = ServiceLogic(slicer.vtkMRMLScene())
    lg.useLocalServer(sys.executable)
    try:
        answers = []
        while not answers or answers[-1] is None:
            answers.append(lg.connectStep())
            lg._idle(0.02)
        assert answers[0] is None and answers[-1]["version"]
        assert lg.server.port != taken and picks == []
        assert "address already in use" in lg.server.log_file.read_text().lower()
    finally:
        lg.stopServer()
        blocker.close()


def test_live_preview_node_follows_the_run_and_goes_at_the_end(logic):
    import time

    before = _ids(logic.scene, "vtkMRMLScalarVolumeNode")
    job = logic.submitGenerate(sampler="ddim", steps=80, device="cpu", previewEvery=10)
    previews = set()
    deadline = time.monotonic() + 180
    while not job.done and time.monotonic() < deadline:
        logic.poll(job)
        if job.previewNode is not None:
            previews.add(job.previewStep)
            assert job.previewNode.GetName() == PREVIEW_NAME
            assert job.previewNode.GetImageData().GetDimensions() == (64, 64, 64)
        time.sleep(0.02)
    nodes_ = logic.finishJob(job)
    assert previews and previews <= set(range(10, 81, 10)), previews
    added = _ids(logic.scene, "vtkMRMLScalarVolumeNode") - before
    result = nodes_[0] if isinstance(nodes_, list) else nodes_
    assert added == {result.GetID()}  # the preview node was removed, only the result stays


# -- a remote service over https: the CA file of the panel's server settings ------------------------------------
def test_a_ca_file_goes_to_every_client_and_a_changed_one_is_a_new_connection(tmp_path):
    from tls_server import TEST_CERT

    ca = tmp_path / "lab-ca.pem"
    ca.write_text(TEST_CERT)
    lg = ServiceLogic(slicer.vtkMRMLScene())  # no server is started: only where jobs would go
    lg.useRemoteServer("https://gpu-server:8765", "secret", caFile=ca)
    client = lg.client(start=False)
    assert (client.url, client.token, client.ca_file) == ("https://gpu-server:8765", "secret", str(ca))
    assert lg.client(start=False) is client  # kept: its TLS context (the CA file) is loaded once
    assert lg.client(timeout=5.0, start=False).ca_file == str(ca)
    lg._health = {"version": "seen"}
    lg.useRemoteServer("https://gpu-server:8765", "secret", caFile=str(ca))  # unchanged: the connection is kept
    assert lg.cachedHealth() == {"version": "seen"} and lg.client(start=False) is client
    lg.useRemoteServer("https://gpu-server:8765", "secret", caFile="")  # empty field: the system's CAs
    assert lg.cachedHealth() is None and lg.remote == ("https://gpu-server:8765", "secret", None)
    assert lg.client(start=False) is not client and lg.client(start=False).ca_file is None
    lg.useRemoteServer("https://gpu-server:8765", "secret", caFile=ca)
    assert lg.client(start=False).ca_file == str(ca)

    before = lg.remote
    with pytest.raises(ServiceError, match="certificate authority file not found") as err:
        lg.useRemoteServer("https://gpu-server:8765", "secret", caFile=tmp_path / "moved.pem")
    assert str(tmp_path / "moved.pem") in err.value.message
    assert lg.remote == before  # the last good setting stays in use
    ca.unlink()  # removed after it was set: the next connection attempt says so (before any request)
    with pytest.raises(ServiceError, match="certificate authority file not found"):
        lg.connectStep()
    with pytest.raises(ServiceError, match="certificate authority file not found"):
        lg.useRemoteServer("https://gpu-server:8765", "secret", caFile=ca)


def test_connect_over_https_trusts_the_ca_file_given(tmp_path, monkeypatch):
    """The panel's stepwise connection to an https:// service with a self-signed certificate: refused
    with the system's CAs, accepted with the certificate as the CA file."""
    import time

    from tls_server import https_server, json_handler

    from MedDiffusionGlue.service import ServiceUnavailable

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)

    Handler = json_handler(lambda h: (200 if h.path == "/v1/health" else 404,
                                      {"version": "tls-test", "auth": h.headers["Authorization"]}))

    def connect(lg):
        deadline = time.monotonic() + 30
        while (health := lg.connectStep()) is None:
            assert time.monotonic() < deadline
        return health

    with https_server(tmp_path, Handler) as url:
        lg = ServiceLogic(slicer.vtkMRMLScene())
        lg.useRemoteServer(url, "secret")
        with pytest.raises(ServiceUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            connect(lg)
        lg.useRemoteServer(url, "secret", caFile=str(tmp_path / "cert.pem"))
        assert connect(lg) == {"version": "tls-test", "auth": "Bearer secret"}
        assert lg.cachedHealth() == {"version": "tls-test", "auth": "Bearer secret"}


def test_slicer_gets_the_same_resolved_request_and_shows_the_services_defaults(logic):
    """Through the service, the Slicer logic's job resolves to what the Python API (and with it the
    CLI, test_job_service) resolves for the same values; the panel's model defaults are the ones
    the library resolves (MedDiffusionLib.defaults), not its own."""
    from MedDiffusionLib.defaults import sampling_defaults_for
    from MedDiffusionLib.jobspec import model_entry, resolve

    model = logic.modelInfo(None)
    assert model["defaults"] == sampling_defaults_for(model_entry(model["id"]))
    job = logic.submitGenerate(classIndex=1, seed=3, sampler="dpm++", steps=2, device="cpu")
    nodes = logic.finishJob(job)
    served = dict(job.status["spec"]["params"])
    api = dict(resolve({"task": "generate", "model": model["id"],
                        "params": {"seed": 3, "sampler": "dpm++", "steps": 2, "class": 1}}).params)
    assert served.pop("device") == "cpu" and api.pop("device") == "auto"  # resolved where the job runs
    assert served == api
    # the result is marked synthetic in the scene: its name and one node attribute per provenance field
    node = nodes[0]
    assert node.GetName().endswith("(synthetic)")
    assert node.GetAttribute("MedDiffusion.provenance.synthetic") == "true"
    assert node.GetAttribute("MedDiffusion.provenance.seed") == "3"
    assert node.GetAttribute("MedDiffusion.provenance.generator") == '"MedDiffusion"'
    for node in nodes:
        logic.scene.RemoveNode(node)
