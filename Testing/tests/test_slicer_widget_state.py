"""The panel's state machine without Qt: the widget class and its module-level helpers are taken from
MedDiffusion.py's source and run against stand-ins for the .ui widgets, the timer and the service logic
(every ``self.ui.X`` must exist in the .ui), with real MRML nodes (slicer-core) for Sample Data, and a
real ``meddiffusion serve`` for the API version. Issue 19, items 2 (controls that match the state),
4 (errors shown once, API version), 10 (the server log) and 11 (Sample Data fills the selectors)."""
import ast
import contextlib
import http.server
import os
import sys
import threading
import types

import pytest

from panel_fakes import FakeTimer, FakeUI  # noqa: E402

from panel_fakes import MODULE, StandInBase, StandInMixin, mrml  # noqa: E402
import vtk  # noqa: E402

from MedDiffusionGlue.nodes import InputError  # noqa: E402
from MedDiffusionGlue.service import ServiceError, ServiceUnavailable, panel_message  # noqa: E402
from MedDiffusionLib.client import Client, LocalServer  # noqa: E402

HELPERS = ("sampleDataRoles", "serviceProblem", "rotateLog", "serverLogPath")


# -- stand-ins ---------------------------------------------------------------------------------------------
class FakeLogic:
    def __init__(self, local=True):
        self.isLocal = local
        self.remote = None if local else ("https://gpu.example:8000", "tok", None)
        self.server = None
        self.health = None  # what connectStep answers (an exception is raised)
        self.stopped = self.cancelled = 0
        self.pollError = None

    def connectStep(self):
        if isinstance(self.health, BaseException):
            raise self.health
        return self.health

    @staticmethod
    def reapStoppedServers():
        return True

    def stopServer(self):
        self.stopped += 1
        self.server = None

    def cancel(self, job):
        self.cancelled += 1

    def poll(self, job):
        raise self.pollError

    def serverLog(self):
        return ""

    def localServer(self):
        if self.server is None:
            self.server = LocalServer(python=sys.executable)
        return self.server


def _load(tmp_path):
    """The widget class and the helpers it uses, executed with stand-ins for qt and slicer."""
    tree = ast.parse((MODULE / "MedDiffusion.py").read_text())
    keep = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            keep.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in HELPERS:
            keep.append(node)
        elif isinstance(node, ast.ClassDef) and node.name == "MedDiffusionWidget":
            keep.append(node)
    shown, opened, shots = [], [], []

    def errorDisplay(text, **kwargs):
        shown.append(text)
        if ns.get("reenter"):  # a modal message box: the timer keeps firing inside its event loop
            ns["reenter"]()

    qt = types.SimpleNamespace(
        QTimer=types.SimpleNamespace(singleShot=lambda ms, f: shots.append(f)),
        QUrl=types.SimpleNamespace(fromLocalFile=lambda p: ("file", p)),
        QDesktopServices=types.SimpleNamespace(openUrl=lambda url: opened.append(url) or True))
    slicer = types.SimpleNamespace(
        app=types.SimpleNamespace(temporaryPath=str(tmp_path)), mrmlScene=mrml.vtkMRMLScene(),
        util=types.SimpleNamespace(errorDisplay=errorDisplay, NodeModify=lambda p: contextlib.nullcontext()))
    ns = {"__name__": "MedDiffusionUnderTest", "__file__": str(MODULE / "MedDiffusion.py"), "_": lambda s: s, "qt": qt, "slicer": slicer, "vtk": vtk, "os": os,
          "re": __import__("re"), "time": __import__("time"), "logging": __import__("logging"),
          "ScriptedLoadableModuleWidget": StandInBase, "VTKObservationMixin": StandInMixin, "InputError": InputError,
          "ServiceError": ServiceError, "ServiceUnavailable": ServiceUnavailable, "panel_message": panel_message}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "MedDiffusion.py", "exec"), ns)
    ns.update(shown=shown, opened=opened, shots=shots)
    return ns


@pytest.fixture()
def mod(tmp_path):
    return _load(tmp_path)


def _widget(mod, local=True):
    w = mod["MedDiffusionWidget"]()
    w.ui, w._timer, w.logic = FakeUI(), FakeTimer(), FakeLogic(local)
    w.ran = []
    return w


CONNECTION = ("runOnComboBox", "pythonPathLineEdit", "serverUrlLineEdit", "serverTokenLineEdit",
              "serverCaFilePathLineEdit")


def _connecting(w, health):
    w.logic.health = health
    w._pending = lambda: w.ran.append("action")
    w._setBusy(True)
    w._timer.start()


# -- item 4: errors shown once -------------------------------------------------------------------------------
def test_a_failing_connect_tick_stops_the_timer_shows_one_message_and_leaves_the_panel_usable(mod):
    w = _widget(mod)
    _connecting(w, KeyError("title"))  # not a ServiceError: reached the old tryWithErrorDisplay every tick
    mod["reenter"] = w._onTimer  # the timer fires while the message box is open
    for _ in range(5):
        w._onTimer()
    assert len(mod["shown"]) == 1 and "title" in mod["shown"][0]
    assert not w._timer.active and w._pending is None and w.ran == []
    assert w.ui.connectButton.enabled and not w.ui.cancelButton.enabled
    assert all(getattr(w.ui, n).enabled for n in CONNECTION)
    assert w.ui.progressBar.range == (0, 1)


def test_a_failing_job_tick_drops_the_job_once_and_reenables_the_connection_controls(mod):
    w = _widget(mod)
    w._job = types.SimpleNamespace(done=False, task="generate")
    w.logic.pollError = RuntimeError("the answer made no sense")
    w._setBusy(True)
    assert not any(getattr(w.ui, n).enabled for n in CONNECTION)
    w._timer.start()
    mod["reenter"] = w._onTimer
    w._onTimer()
    w._onTimer()
    assert mod["shown"] == ["MedDiffusion: the answer made no sense"]
    assert w._job is None and not w._timer.active and w.logic.cancelled == 1
    assert all(getattr(w.ui, n).enabled for n in CONNECTION)


@pytest.mark.parametrize("health, words", [
    ({"version": "0.9.0", "devices": [], "models": [], "controlnets": []}, "is version 0.9.0 (API unknown)"),
    ({"version": "2.0.0", "api": 2, "devices": [], "models": [], "controlnets": []}, "is version 2.0.0 (API 2)"),
], ids=["no-api", "api-2"])
def test_a_service_of_another_api_version_gets_one_clear_message_and_nothing_runs(mod, health, words):
    w = _widget(mod, local=False)
    _connecting(w, health)
    for _ in range(3):
        w._onTimer()
    assert mod["shown"] == [f"the service at https://gpu.example:8000 {words}; this module needs API 1: update "
                            "MedDiffusion on the server"]
    assert w.ui.statusLabel.text == mod["shown"][0]
    assert w.ran == [] and w._pending is None and not w._timer.active
    assert w.logic.stopped == 1  # the answer is forgotten: the next job or Connect asks again
    assert not w.ui.freeMemoryButton.enabled and w.ui.connectButton.enabled


def test_a_health_answer_without_a_key_the_panel_reads_is_a_message_not_a_key_error(mod):
    model = {"id": "m", "state": "bundled", "classes": [{"index": 0, "name": "ct", "sizes": []}],
             "defaults": {"class": 0, "sampler": "ddim"}}  # no "title"
    health = {"version": "1.1", "api": 1, "devices": [{"name": "cpu"}], "models": [model], "controlnets": []}
    problem = mod["serviceProblem"](health, "https://gpu.example:8000")
    assert "without devices.label, models.title" in problem and "https://gpu.example:8000 (version 1.1)" in problem
    w = _widget(mod, local=False)
    _connecting(w, health)
    w._onTimer()
    w._onTimer()
    assert mod["shown"] == [problem] and w.ran == [] and not w._timer.active
    good = dict(health, devices=[{"name": "cpu", "label": "CPU"}], models=[dict(model, title="M")])
    assert mod["serviceProblem"](good, "x") is None
    assert mod["serviceProblem"]("<html>", "x").startswith("the service at x sent a status answer")


SEEN_HEADERS: list = []


def _record(handler):
    SEEN_HEADERS.append(dict(handler.headers))
    return 200, {"version": "x", "api": 1}


def test_every_client_request_sends_the_api_version_blocking_and_stepwise():
    from tls_server import json_handler

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), json_handler(_record))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{srv.server_address[1]}", "t")
        assert client.health() == {"version": "x", "api": 1}
        transfer = client.start_health()
        while not transfer.step(0.5):
            pass
        assert transfer.error is None and transfer.result["api"] == 1
    finally:
        srv.shutdown()
        srv.server_close()
    assert len(SEEN_HEADERS) == 2
    assert all(h.get("X-MedDiffusion-API") == "1" for h in SEEN_HEADERS), SEEN_HEADERS


def test_the_real_service_reports_api_1_and_the_panel_accepts_its_health(mod, tmp_path):
    server = LocalServer(log_file=tmp_path / "serve.log")
    try:
        server.start(wait=True, timeout=180)
        health = server.client().health()
    finally:
        server.stop()
    assert health["api"] == 1 == mod["MODULE_API"]
    assert mod["serviceProblem"](health, server.url) is None


# -- item 2: controls that match the state -------------------------------------------------------------------
def test_connection_controls_are_disabled_while_a_job_or_install_runs_and_back_after(mod):
    w = _widget(mod)
    w._updateButtons()
    assert all(getattr(w.ui, n).enabled for n in CONNECTION)
    for attr in ("_job", "_pip"):
        setattr(w, attr, object())
        w._updateButtons()
        assert not any(getattr(w.ui, n).enabled for n in CONNECTION), attr
        setattr(w, attr, None)
        w._setBusy(False)
        assert all(getattr(w.ui, n).enabled for n in CONNECTION), attr
    w._job = object()
    w._endJob()
    assert all(getattr(w.ui, n).enabled for n in CONNECTION)


def test_cancel_works_while_the_server_starts_or_connects(mod):
    w = _widget(mod)
    w.logic.server = LocalServer(python=sys.executable)  # a server being started
    _connecting(w, None)  # no answer yet
    w._onTimer()
    assert w.ui.cancelButton.enabled and w._timer.active
    w._onCancel()
    assert w._pending is None and w.logic.stopped == 1 and w.ran == []
    assert not w.ui.cancelButton.enabled and w.ui.connectButton.enabled
    assert w.ui.statusLabel.text == "cancelled: not connected" and w.ui.progressBar.range == (0, 1)
    w._onTimer()
    assert not w._timer.active and mod["shown"] == []


def test_cancel_while_the_packages_are_checked_keeps_the_server(mod):
    w = _widget(mod)
    w._depCheck = object()
    _connecting(w, None)
    w._onCancel()
    assert w._pending is None and w.logic.stopped == 0 and not w.ui.cancelButton.enabled


# -- item 10: the server log -----------------------------------------------------------------------------------
def test_the_log_is_rotated_over_5_mb_keeping_one_old_copy(mod, tmp_path):
    rotate, path = mod["rotateLog"], str(tmp_path / "server.log")
    assert rotate(path) == path  # no file yet: nothing to do
    (tmp_path / "server.log").write_bytes(b"x" * 100)
    rotate(path)
    assert (tmp_path / "server.log").stat().st_size == 100 and not (tmp_path / "server.log.1").exists()
    (tmp_path / "server.log.1").write_bytes(b"older")
    (tmp_path / "server.log").write_bytes(b"y" * (mod["LOG_MAX_BYTES"] + 1))
    rotate(path)
    assert not (tmp_path / "server.log").exists()
    assert (tmp_path / "server.log.1").read_bytes()[:1] == b"y"


def test_the_local_server_writes_the_kept_log_and_show_log_opens_it(mod, tmp_path):
    w = _widget(mod)
    with pytest.raises(InputError, match="no server log yet"):
        w._onShowLog()
    kept = tmp_path / "MedDiffusion-server.log"
    kept.write_bytes(b"z" * (mod["LOG_MAX_BYTES"] + 1))
    w._useServerLog()
    server = w.logic.server
    own = server.log_file
    assert str(own) == str(kept) and (tmp_path / "MedDiffusion-server.log.1").exists()
    server.log_file.write_text("started\n")
    w._onShowLog()
    assert mod["opened"] == [("file", str(kept))]
    assert f"server log: {kept}" in w._logHint()
    # a failure to start says where the log is
    _connecting(w, ServiceUnavailable("the local MedDiffusion server exited (code 1)"))
    w._onTimer()
    assert f"(server log: {kept};" in w.ui.statusLabel.text and len(mod["shown"]) == 1


def test_a_remote_service_hides_show_log(mod):
    tree = ast.parse((MODULE / "MedDiffusion.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedDiffusionWidget")
    run_on = ast.unparse(next(n for n in widget.body if getattr(n, "name", "") == "_onRunOnChanged"))
    local_list = run_on.split("w.visible = local")[0]
    assert "showLogButton" in local_list
    assert _widget(mod, local=False)._logHint() == ""


# -- item 11: Sample Data fills the selectors ---------------------------------------------------------------------
def test_sample_data_nodes_fill_the_input_selectors(mod):
    w = _widget(mod)
    scene = mod["slicer"].mrmlScene
    w._parameterNode = types.SimpleNamespace(segmentation=None, referenceVolume=None, fullCTVolume=None)
    scene.AddObserver(mrml.vtkMRMLScene.NodeAddedEvent, w.onNodeAdded)  # what addObserver does in setup()
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")  # named after it is added, as loaders may do
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedDiffusionChestCT sparse-view FBP")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MedDiffusionChestCT")
    ct.SetName("MedDiffusionChestCT")
    seg.SetName("MedDiffusionChestCT segmentation")
    assert len(mod["shots"]) == 1  # one deferred check for the whole load
    mod["shots"].pop()()
    p = w._parameterNode
    assert (p.segmentation, p.referenceVolume, p.fullCTVolume) == (seg, ct, ct)
    assert w._addedNodeIDs == []
    roles = mod["sampleDataRoles"]
    again = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedDiffusionChestCT_1")
    assert roles(again) == ("referenceVolume", "fullCTVolume") and roles(other) == ()
    assert roles(scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedDiffusionChestCT segmentation_2")) == (
        "segmentation",)
    assert roles(scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedDiffusionChestCT")) == ()


def test_the_sample_node_names_are_the_registered_ones():
    text = (MODULE / "MedDiffusion.py").read_text()
    assert 'nodeNames=["MedDiffusionChestCT", "MedDiffusionChestCT segmentation"]' in text
