"""The panel's *Add weights...* (issue 19, item 9) without Qt: the widget, the module logic and their
module-level helpers are taken from MedDiffusion.py's source and run with stand-ins for Qt's widgets, the
timer and ``slicer`` only; the logic is the real ``MedDiffusionLogic`` over the real ``ServiceLogic``, and
the child is a real ``python -m MedDiffusionLib.cli models import FOLDER`` (or a stand-in program for the
success and Cancel paths, which need no weights)."""
import ast
import os
import time
import types
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT
from panel_fakes import FakeTimer, FakeUI  # noqa: E402

from panel_fakes import MODULE, UI, StandInBase, StandInMixin, mrml  # noqa: E402
import vtk  # noqa: E402

from MedDiffusionGlue import dependencies  # noqa: E402
from MedDiffusionGlue.nodes import InputError  # noqa: E402
from MedDiffusionGlue.service import (ServiceError, ServiceLogic, ServiceUnavailable, default_python,  # noqa: E402
                                      panel_message)

HELPERS = ("serviceProblem", "rotateLog", "serverLogPath", "_isSlicerPython", "externalPythonEnvironment",
           "libraryParent", "importWeightsCommand")
CLASSES = ("MedDiffusionLogic", "MedDiffusionWidget")
REMOTE_TIP = "The server's admin adds weights there (`meddiffusion models import FOLDER` on the server)"


def _load(tmp_path, chosen=""):
    """The logic and widget classes and their helpers, executed with stand-ins for qt and slicer."""
    tree = ast.parse((MODULE / "MedDiffusion.py").read_text())
    keep = [n for n in tree.body
            if (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets))
            or (isinstance(n, ast.FunctionDef) and n.name in HELPERS)
            or (isinstance(n, ast.ClassDef) and n.name in CLASSES)]
    shown, dialogs = [], []

    class ModuleLogic:  # Slicer's ScriptedLoadableModuleLogic: cooperative, so ServiceLogic.__init__ runs
        def __init__(self, *args, **kwargs):
            super().__init__()

    def errorDisplay(text, **kwargs):
        shown.append((text, kwargs))

    def getExistingDirectory(parent, caption):  # Slicer 5.10 calls it (parent, caption[, dir])
        dialogs.append((parent, caption))
        return ns["chosen"]

    qt = types.SimpleNamespace(QFileDialog=types.SimpleNamespace(getExistingDirectory=getExistingDirectory))
    slicer = types.SimpleNamespace(
        app=types.SimpleNamespace(temporaryPath=str(tmp_path)), mrmlScene=mrml.vtkMRMLScene(),
        util=types.SimpleNamespace(errorDisplay=errorDisplay, mainWindow=lambda: "main window",
                                   startupEnvironment=lambda: dict(os.environ)))
    ns = {"__name__": "MedDiffusionUnderTest", "__file__": str(MODULE / "MedDiffusion.py"), "_": lambda s: s,
          "qt": qt, "slicer": slicer, "vtk": vtk, "os": os, "re": __import__("re"), "time": time,
          "logging": __import__("logging"), "ScriptedLoadableModuleLogic": ModuleLogic, "ServiceLogic": ServiceLogic,
          "ScriptedLoadableModuleWidget": StandInBase, "VTKObservationMixin": StandInMixin, "InputError": InputError,
          "ServiceError": ServiceError, "ServiceUnavailable": ServiceUnavailable, "panel_message": panel_message,
          "dependencies": dependencies, "default_python": default_python, "chosen": chosen,
          "MedDiffusionParameterNode": None}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "MedDiffusion.py", "exec"), ns)
    ns.update(shown=shown, dialogs=dialogs)
    return ns


@pytest.fixture()
def mod(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFFUSION_CACHE", str(tmp_path / "cache"))  # the child never touches the user's cache
    return _load(tmp_path)


def _widget(mod, python="", server=False):
    w = mod["MedDiffusionWidget"]()
    w.ui, w._timer, w.logic = FakeUI(), FakeTimer(), mod["MedDiffusionLogic"]()
    w.ui.pythonPathLineEdit.currentPath = python
    w.ui.runOnComboBox.currentIndex = 1 if server else 0
    return w


def _finish(w, timeout=60.0):
    end = time.monotonic() + timeout
    while w._import is not None:
        assert time.monotonic() < end, "the import child did not finish"
        w._onTimer()
        time.sleep(0.05)


def _standin_python(tmp_path, body):
    """A program in place of the server's Python (a shell script), for paths that need no weights."""
    exe = tmp_path / "python-standin"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return str(exe)


def test_the_ui_has_the_add_weights_button_with_a_tooltip():
    widget = next(w for w in ET.parse(UI).iter("widget") if w.get("name") == "addWeightsButton")
    props = {p.get("name"): next(iter(p)).text for p in widget.findall("property")}
    assert widget.get("class") == "QPushButton" and props["text"] == "Add weights..." and props["toolTip"]
    source = (MODULE / "MedDiffusion.py").read_text()
    assert 'ui.addWeightsButton.connect("clicked(bool)", guarded(self._onAddWeights))' in source


def test_the_child_command_line_runs_the_cli_on_the_servers_python_with_the_library_on_pythonpath(mod, tmp_path,
                                                                                                   monkeypatch):
    lib_parent = str(ROOT)
    assert os.path.isdir(os.path.join(mod["libraryParent"](), "MedDiffusionLib"))
    assert os.path.realpath(mod["libraryParent"]()) == os.path.realpath(lib_parent)
    monkeypatch.setenv("PYTHONPATH", "/inherited")
    cmd, env = mod["importWeightsCommand"]("/opt/py/bin/python", "/data/weights")
    assert cmd == ["/opt/py/bin/python", "-m", "MedDiffusionLib.cli", "models", "import", "/data/weights"]
    assert env["PYTHONPATH"].split(os.pathsep) == [mod["libraryParent"](), "/inherited"]
    _, env = mod["importWeightsCommand"]("/opt/py/bin/python", "/w", {"PYTHONPATH": None, "X": "1"})
    assert env["PYTHONPATH"] == mod["libraryParent"]() and env["X"] == "1"  # a removed PYTHONPATH stays removed
    # what the widget starts: the logic's child, on the Python of the Python field (Slicer's by default)
    w = _widget(mod, python=_standin_python(tmp_path, "sleep 30\n"))
    mod["chosen"] = str(tmp_path)
    w._onAddWeights()
    try:
        assert mod["dialogs"] == [("main window", "Folder with the model's weights")]
        assert w._import.command == [w._python(), "-m", "MedDiffusionLib.cli", "models", "import", str(tmp_path)]
        assert w._import._env["PYTHONPATH"].split(os.pathsep)[0] == mod["libraryParent"]()
        assert w._timer.active and w.ui.cancelButton.enabled and not w.ui.addWeightsButton.enabled
        assert not w.ui.connectButton.enabled and not w.ui.pythonPathLineEdit.enabled
    finally:
        w._import.kill()


def test_an_empty_folder_fails_in_the_real_child_with_one_clear_message(mod, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    w = _widget(mod)  # Slicer's Python here is this interpreter: the real CLI runs
    w._updateButtons()
    assert w.ui.addWeightsButton.enabled
    w._startAddWeights(str(empty))
    assert w.ui.statusLabel.text.startswith("adding the weights in") and w.ui.progressBar.range == (0, 0)
    _finish(w)
    assert len(mod["shown"]) == 1
    text, kwargs = mod["shown"][0]
    assert text.startswith("Adding the weights failed: ") and "no autoencoder and no biflownet weights found" in text
    assert "models import" in kwargs["detailedText"] and "exit code 2" in kwargs["detailedText"]
    assert w.ui.statusLabel.text.startswith("adding the weights failed: ") and "no autoencoder" in w.ui.statusLabel.text
    assert not w._timer.active and w._pending is None and w.ui.progressBar.range == (0, 1)
    assert w.ui.addWeightsButton.enabled and w.ui.connectButton.enabled and not w.ui.cancelButton.enabled
    w._onTimer()
    assert len(mod["shown"]) == 1  # shown once
    assert not (tmp_path / "cache" / "imported").exists()


def test_progress_lines_show_and_success_says_added_model(mod, tmp_path):
    go = tmp_path / "go"  # the stand-in goes on once the test has seen its progress line
    python = _standin_python(tmp_path, 'echo "autoencoder.safetensors: converting" >&2\n'
                                       f'for i in $(seq 600); do [ -e "{go}" ] && break; sleep 0.05; done\n'
                                       'echo "my-model: imported into /cache/my-model; ..."\n')
    w = _widget(mod, python=python)
    w._startAddWeights(str(tmp_path))
    seen = set()
    end = time.monotonic() + 30
    while w._import is not None and time.monotonic() < end:
        w._onTimer()
        seen.add(w.ui.statusLabel.text)
        if "adding weights: autoencoder.safetensors: converting" in seen:
            go.touch()
        time.sleep(0.05)
    assert "adding weights: autoencoder.safetensors: converting" in seen
    assert mod["shown"] == [] and w.ui.statusLabel.text.startswith("added my-model")
    assert w.ui.addWeightsButton.enabled and not w._timer.active  # not connected: the list fills on connect


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie not yet reaped by init
    except FileNotFoundError:
        return True


def test_cancel_stops_the_child_and_what_it_started(mod, tmp_path):
    """The child stands in for PythonSlicer (a launcher that runs python-real and passes no signals on)."""
    pidfile = tmp_path / "grandchild.pid"
    w = _widget(mod, python=_standin_python(tmp_path, f"trap '' TERM INT\nsleep 30 &\necho $! > {pidfile}\nwait\n"))
    w._startAddWeights(str(tmp_path))
    process = w._import.process
    end = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < end
        time.sleep(0.02)
    grandchild = int(pidfile.read_text())
    w._onCancel()
    assert process.poll() is not None and w._import is None
    end = time.monotonic() + 5
    while not _gone(grandchild):
        assert time.monotonic() < end, "the launcher's child outlived Cancel"
        time.sleep(0.05)
    assert w.ui.statusLabel.text == "adding the weights was cancelled" and w.ui.addWeightsButton.enabled
    w._onTimer()
    assert not w._timer.active and mod["shown"] == []


def test_a_remote_server_disables_add_weights_and_says_the_admin_adds_them(mod):
    w = _widget(mod, server=True)
    w._updateButtons()
    assert not w.ui.addWeightsButton.enabled and w.ui.addWeightsButton.toolTip == REMOTE_TIP
    with pytest.raises(InputError, match="admin adds weights"):
        w._onAddWeights()
    assert mod["dialogs"] == []
    local = _widget(mod)
    local._updateButtons()
    assert local.ui.addWeightsButton.enabled and local.ui.addWeightsButton.toolTip != REMOTE_TIP
