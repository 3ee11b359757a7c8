"""MedDiffusion: 3D MedDiffusion in 3D Slicer (generate CT/MR, synthesize CT from a segmentation,
reconstruct sparse-view CT).

A thin client: the computation runs in the MedDiffusion job service (``meddiffusion serve``), on
this computer (a child process started and stopped by the module) or on a server. Slicer's process
imports only ``MedDiffusionLib.client`` (standard library) and never torch.
"""
import logging
import os
import re
import sys
import time
from typing import Annotated

if sys.version_info < (3, 10):  # Slicer <= 5.8 ships Python 3.9
    raise ImportError("MedDiffusion needs 3D Slicer 5.10 or later (Python 3.12)")

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, Decimals, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# MedDiffusionLib is installed next to this file by CMake; in a source checkout it is one folder up.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "MedDiffusionLib")) and _candidate not in sys.path:
        sys.path.append(_candidate)

from MedDiffusionGlue import dependencies  # noqa: E402
from MedDiffusionGlue.nodes import InputError  # noqa: E402
from MedDiffusionGlue.service import (DEFAULT_LABEL_NAMES, POLL_BUDGET_S, JobCancelled, ServiceError,  # noqa: E402
                                      ServiceLogic, ServiceUnavailable, default_python, panel_message,
                                      segment_mapping)

PAPER_URL = "https://arxiv.org/abs/2412.13059"
README_URL = "https://github.com/meddiffusion/SlicerMedDiffusion#3d-slicer-extension"
SETTINGS = "MedDiffusion/"  # qt.QSettings keys
RUN_ON = ["This computer", "Server"]
MODULE_API = 1  # the service API this module speaks: sent as X-MedDiffusion-API, the health answer's "api"
LOG_MAX_BYTES = 5 * 2 ** 20  # the local server's log is rotated (one old copy, ".1") when over this


class MedDiffusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDiffusion")
        self.parent.categories = [_("Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffusion developers"]
        self.parent.helpText = _(
            "Generate synthetic CT and MR volumes with 3D MedDiffusion, a diffusion model (generative AI), "
            "synthesize CT from a segmentation and reconstruct sparse-view CT.<br>"
            "<b>Run on</b>: <i>This computer</i> starts a local MedDiffusion service (first use offers to install "
            "its Python packages); <i>Server</i> uses a service on a GPU machine (URL and token).<br>"
            "Try it: load <i>MedDiffusion chest CT + segmentation</i> in Sample Data, then Synthesize or Simulate "
            "and Reconstruct. <b>Samples</b> &gt; 1 draws several samples: they come as one sequence (Sequences "
            "toolbar), with their mean and, in colour over it, their standard deviation (the uncertainty). Every result "
            "is marked as synthetic; <b>Export</b> keeps the mark in the file (<b>Export DICOM</b>: a marked DICOM "
            "series); <b>Reproduce</b> re-runs the job a result's mark records and compares; <b>Evaluate</b> "
            "compares two volumes (metrics as a table and a bar chart). Everything is also available from the "
            "Python console (<code>slicer.util.getModuleLogic(\"MedDiffusion\").generate()</code>).<br>"
            "Paper: <a href=\"{paper}\">Wang et al., 3D MedDiffusion, IEEE TMI (arXiv 2412.13059)</a>. "
            "Documentation: <a href=\"{readme}\">README</a>.").format(paper=PAPER_URL, readme=README_URL)
        self.parent.acknowledgementText = _(
            "3D MedDiffusion: Wang et al., IEEE TMI (arXiv 2412.13059). The bundled demo model and sample data "
            "come from the pyradiomics 3.0.1 chest CT test cases (BSD-3-Clause, (c) 2017 Harvard Medical School).")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#
SAMPLE_DIR = os.path.join(_HERE, "Resources", "SampleData")
# The chest CT test crop (Testing/data/lung2_crop.nii.gz: pyradiomics 3.0.1 lung2, BSD-3) written as NRRD by
# Slicer's storage node, and a segmentation of it from HU thresholds (Air < -900 <= Lung < -400 <= Soft
# tissue < 300 <= Bone, the thresholds the bundled labels ControlNet was trained with).
SAMPLE_CT = ("MedDiffusionChestCT.nrrd", "SHA256:a76e55d7bf8c2a64b56cd7ec501d67f78b89f4fbd6cda44d3365fb3d0900e697")
SAMPLE_SEG = ("MedDiffusionChestCT.seg.nrrd", "SHA256:63e37abc66f7517f0648d724e825a93e9c3c1a3c6fddcea8c2d9529815a3c961")


def registerSampleData() -> None:
    """Register the chest CT test crop and its HU-threshold segmentation with Sample Data."""
    import pathlib

    import SampleData

    def uri(name):
        return pathlib.Path(SAMPLE_DIR, name).as_uri()

    icon = os.path.join(_HERE, "Resources", "Icons", "MedDiffusion.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MedDiffusion", sampleName="MedDiffusion chest CT", thumbnailFileName=icon,
        uris=uri(SAMPLE_CT[0]), fileNames=SAMPLE_CT[0], checksums=SAMPLE_CT[1], nodeNames="MedDiffusionChestCT",
        loadFileTypes="VolumeFile")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MedDiffusion", sampleName="MedDiffusion chest CT + segmentation", thumbnailFileName=icon,
        uris=[uri(SAMPLE_CT[0]), uri(SAMPLE_SEG[0])], fileNames=[SAMPLE_CT[0], SAMPLE_SEG[0]],
        checksums=[SAMPLE_CT[1], SAMPLE_SEG[1]], nodeNames=["MedDiffusionChestCT", "MedDiffusionChestCT segmentation"],
        loadFileTypes=["VolumeFile", "SegmentationFile"])


# Nodes that Sample Data loads for this module (Slicer appends "_N" to a name that is taken) and the
# parameters each fills: a loaded sample is ready for Synthesize CT and Simulate.
SAMPLE_NODE_ROLES = (
    (r"MedDiffusionChestCT segmentation(_\d+)?", "vtkMRMLSegmentationNode", ("segmentation",)),
    (r"MedDiffusionChestCT(_\d+)?", "vtkMRMLScalarVolumeNode", ("referenceVolume", "fullCTVolume")),
)


def sampleDataRoles(node) -> tuple:
    """The parameter names a node loaded from this module's Sample Data should fill; () for any other node
    (a job's result, a label map, a node of another sample)."""
    name = node.GetName() or ""
    for pattern, className, roles in SAMPLE_NODE_ROLES:
        if re.fullmatch(pattern, name) and node.IsA(className) and not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return roles
    return ()


#
# Service answers and the local server's log
#
HEALTH_KEYS = {"devices": ("name", "label"), "models": ("id", "title", "state", "classes", "defaults"),
               "controlnets": ("name", "task")}


def serviceProblem(health, url: str) -> str | None:
    """Why the panel cannot use a service's health answer, as a message for the user (another API
    version, a key this module reads is missing); None when it can."""
    if not isinstance(health, dict):
        return _("the service at {url} sent a status answer this module cannot read").format(url=url)
    api = health.get("api")
    if api != MODULE_API:
        return _("the service at {url} is version {version} (API {api}); this module needs API {need}: update "
                 "MedDiffusion on the server").format(url=url, version=health.get("version", "?"),
                                                      api=_("unknown") if api is None else api, need=MODULE_API)
    missing = []
    for key, itemKeys in HEALTH_KEYS.items():
        items = health.get(key)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            missing.append(key)
            continue
        missing += [f"{key}.{k}" for k in itemKeys if any(k not in i for i in items)]
    for model in health.get("models") or []:
        if not isinstance(model, dict):
            continue
        classes = model.get("classes")
        if not isinstance(classes, list) or not all(isinstance(c, dict) for c in classes):
            missing.append("models.classes")
        else:
            missing += [f"models.classes.{k}" for k in ("index", "name", "sizes") if any(k not in c for c in classes)]
        if not isinstance(model.get("defaults"), dict) or not {"class", "sampler"} <= set(model["defaults"]):
            missing.append("models.defaults")
    if missing:
        return _("the service at {url} (version {version}) sent a status answer without {keys}: update MedDiffusion "
                 "on the server or this module").format(url=url, version=health.get("version", "?"),
                                                        keys=", ".join(sorted(set(missing))))
    return None


def _validSteps(value) -> int | None:
    """A number of sampler steps from the service's status answer, or None when it is not one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000 else None


def rotateLog(path: str, maxBytes: int = LOG_MAX_BYTES) -> str:
    """Before a server starts writing to ``path``: when the file is over ``maxBytes``, keep it as
    ``path.1`` (replacing an older one) so the log starts afresh. A file still held open (Windows) stays."""
    try:
        if os.path.getsize(path) > maxBytes:
            os.replace(path, path + ".1")
    except OSError:
        pass
    return path


def serverLogPath() -> str:
    """The local server's log file, kept between runs (rotated by :func:`rotateLog`)."""
    return os.path.join(slicer.app.temporaryPath, "MedDiffusion-server.log")


#
# Parameter node: every bound widget's type carries the annotations Slicer's GUI connector needs
# (Choice for combo boxes, a range for spin boxes); see Testing/tests/test_slicer_module.py.
#
@parameterNodeWrapper
class MedDiffusionParameterNode:
    # (Run on, Python, server URL and token are application settings kept in qt.QSettings, not here: a new
    # scene must not reset them)
    # set from the service's model list (combo boxes filled at run time, not bound)
    modelId: str = ""
    classIndex: int = -1
    labelsControlNet: str = "chest-ct-mini-labels"
    sparseViewControlNet: str = "chest-ct-mini-sparse-view"
    # generate
    useTrainedSize: bool = True
    sizeX: Annotated[int, WithinRange(16, 1024)] = 64
    sizeY: Annotated[int, WithinRange(16, 1024)] = 64
    sizeZ: Annotated[int, WithinRange(16, 1024)] = 64
    spacingX: Annotated[float, WithinRange(0.01, 20.0), Decimals(3)] = 4.8
    spacingY: Annotated[float, WithinRange(0.01, 20.0), Decimals(3)] = 4.8
    spacingZ: Annotated[float, WithinRange(0.01, 20.0), Decimals(3)] = 4.3
    seed: Annotated[int, WithinRange(0, 2 ** 31 - 1)] = 0
    sampler: Annotated[str, Choice(["ddpm", "ddim", "dpm++"])] = "ddim"
    steps: Annotated[int, WithinRange(1, 1000)] = 100
    numberOfVolumes: Annotated[int, WithinRange(1, 64)] = 1
    mapToHU: bool = True
    # from segmentation
    segmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    # (the segment -> label choices live in the panel's table, rebuilt from the segmentation: not a parameter)
    controlSteps: Annotated[int, WithinRange(1, 1000)] = 50
    numSamples: Annotated[int, WithinRange(1, 16)] = 1  # synthesize and reconstruct: N samples, mean and std
    # sparse-view CT
    fullCTVolume: vtkMRMLScalarVolumeNode
    views: Annotated[int, WithinRange(2, 3600)] = 40
    fbpVolume: vtkMRMLScalarVolumeNode
    # export (keeps the synthetic mark) and evaluation (the service compares two volumes)
    exportVolume: vtkMRMLScalarVolumeNode  # also the result that Reproduce re-runs
    reproduceInput: vtkMRMLVolumeNode  # the input a synthesize / reconstruct / simulate result was made from
    predictionVolume: vtkMRMLVolumeNode  # any volume: label maps too (for label-map metrics)
    evaluationReference: vtkMRMLVolumeNode
    evaluateLabels: bool = False
    evaluateResample: bool = False
    # device
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    referenceKernels: bool = False
    previewEvery: Annotated[int, WithinRange(0, 1000)] = 0


#
# Logic: usable from the Python console without the widget
#
class MedDiffusionLogic(ScriptedLoadableModuleLogic, ServiceLogic):
    """Console API: jobs on the MedDiffusion service, results as nodes.

    Blocking (polls until done, keeps the GUI painting, returns the new node or nodes)::

        logic = slicer.util.getModuleLogic("MedDiffusion")
        ct = logic.generate(seed=3, sampler="ddim", steps=50)
        fbp = logic.simulateSparseView(getNode("MedDiffusionChestCT"), views=40)
        recon = logic.reconstructSparseView(fbp, steps=50)
        # 8 samples: the mean, the std (shown in colour over the mean), the samples as a sequence
        mean, std, sample, sequence, browser = logic.reconstructSparseView(fbp, steps=50, numSamples=8)
        logic.exportVolume(mean, "/tmp/mean.nii.gz")  # keeps the synthetic mark (descrip + JSON sidecar)
        logic.exportVolume(mean, "/tmp/mean_dicom", format="dicom")  # a marked DICOM series (a new folder)
        logic.reproduce(recon, fbp)  # re-run the recorded job: {"equal": True, "max_abs": 0.0, ...}, no new node
        table = logic.evaluate(recon, getNode("MedDiffusionChestCT"))  # metrics table + bar chart

    Non-blocking (what the panel uses): ``job = logic.submitGenerate(...)``, then
    ``logic.poll(job)`` until ``job.done``, then ``logic.finishJob(job)`` -> nodes;
    ``logic.cancel(job)``; ``logic.unload()`` frees GPU memory. Where jobs run:
    ``logic.useLocalServer(python=None)`` (default; Slicer's Python) or
    ``logic.useRemoteServer(url, token, caFile=None)`` (``caFile``: a CA to trust for https).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # also runs ServiceLogic.__init__ (cooperative)
        modules = getattr(slicer, "modules", None)
        self.segmentationsLogic = modules.segmentations.logic() if hasattr(modules, "segmentations") else None
        # an N-sample job's Sequence browser updates its proxy node through the Sequences module's logic;
        # a metrics chart is shown in the layout through the Plots module's logic
        self.sequencesLogic = modules.sequences.logic() if hasattr(modules, "sequences") else None
        self.plotsLogic = modules.plots.logic() if hasattr(modules, "plots") else None

    def getParameterNode(self):
        return MedDiffusionParameterNode(super().getParameterNode())

    def _idle(self, seconds: float) -> None:
        """While a console call waits: keep the application painting."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            slicer.app.processEvents()
            time.sleep(0.02)

    def useLocalServer(self, python: str | None = None, env: dict | None = None) -> None:
        if python and env is None and os.path.realpath(python) != os.path.realpath(default_python()):
            env = externalPythonEnvironment()
        ServiceLogic.useLocalServer(self, python, env)

    def _childEnvironment(self, python: str) -> dict | None:
        """A child on ``python`` (e.g. the DICOM export) runs in the environment the local server gets."""
        return self._dependencyEnvironment(python)

    # -- dependencies of the local service's Python ------------------------------------------------------
    def _dependencyEnvironment(self, python: str) -> dict | None:
        """The environment the local server runs ``python`` with (None: Slicer's own, unchanged)."""
        if _isSlicerPython(python):
            return None
        if self.serverEnv is not None and os.path.realpath(python) == os.path.realpath(self.serverPython or ""):
            return self.serverEnv
        return externalPythonEnvironment()

    def startDependencyCheck(self, python: str | None = None) -> "dependencies.DependencyCheck":
        """Which requirements (incl. torch) ``python`` lacks, in the environment the local server
        will run it with; done at once for Slicer's Python, else a child process to ``poll()``."""
        python = python or self.serverPython or default_python()
        if _isSlicerPython(python):
            return dependencies.DependencyCheck(None)
        return dependencies.DependencyCheck(python, env=self._dependencyEnvironment(python))

    def missingDependencies(self, python: str | None = None) -> list[str]:
        """Requirements (incl. torch) the local service's Python lacks; [] when all are satisfied (blocking)."""
        check = self.startDependencyCheck(python)
        while not check.poll():
            self._idle(0.05)
        if check.error is not None:
            raise RuntimeError(check.error)
        return check.missing

    def torchPlan(self, python: str | None = None) -> "dependencies.TorchPlan":
        """What to do about torch in the local service's Python (see ``dependencies.torch_plan``): ok,
        install (light-the-torch in a child process) or refuse (an older torch is never replaced; Intel
        Macs have no torch >= 2.6). The version is read from package metadata: torch is not imported."""
        python = python or self.serverPython or default_python()
        check = self.startDependencyCheck(python)
        while not check.poll():
            self._idle(0.05)
        if check.error is not None:
            raise RuntimeError(check.error)
        return dependencies.torch_plan(python, check.versions.get("torch"), slicer_python=_isSlicerPython(python))

    def installTorch(self, python: str | None = None, missing: list[str] | None = None) -> None:
        """Install torch into the local service's Python when it has none, and wait (console use; the
        panel polls :meth:`startInstall` instead). A child process runs light-the-torch; torch is never
        imported into Slicer's process, and an installed older torch is never replaced (refused with a
        message pointing to PyTorch Utils). ``missing``: unused, kept for callers of the old signature."""
        python = python or self.serverPython or default_python()
        plan = self.torchPlan(python)
        if plan.action == "ok":
            return
        if plan.action == "refuse":
            raise InputError(plan.message)
        log = os.path.join(slicer.app.temporaryPath, "MedDiffusion-torch.log")
        process = dependencies.InstallProcess(plan.commands, log, env=self._dependencyEnvironment(python))
        while process.poll() is None:
            self._idle(0.2)
        if process.poll() != 0:
            raise RuntimeError(_("Installing PyTorch failed (exit code {rc}); see {log}:\n{tail}").format(
                rc=process.poll(), log=log, tail=process.tail()))

    def startInstall(self, python: str | None = None, missing: list[str] | None = None
                     ) -> "dependencies.InstallProcess | None":
        """Install what the local service's Python lacks, as child processes to ``poll()``: torch
        with light-the-torch when it has none, then the other missing packages with pip. Raises
        ``InputError`` (nothing started) when torch is there but too old, or on an Intel Mac.
        ``missing``: the requirements found missing (checked again when not given)."""
        python = python or self.serverPython or default_python()
        missing = self.missingDependencies(python) if missing is None else missing
        commands = []
        if any(dependencies.split_requirement(r)[0].lower() == "torch" for r in missing):
            plan = self.torchPlan(python)
            if plan.action == "refuse":
                raise InputError(plan.message)
            commands += plan.commands
        others = [r for r in missing if dependencies.split_requirement(r)[0].lower() != "torch"]
        if others:
            commands.append(dependencies.pip_command(python, others))
        if not commands:
            return None
        log = os.path.join(slicer.app.temporaryPath, "MedDiffusion-pip.log")
        return dependencies.InstallProcess(commands, log, env=self._dependencyEnvironment(python))

    def startPipInstall(self, python: str | None = None, missing: list[str] | None = None
                        ) -> "dependencies.PipProcess | None":
        """pip install of the other missing packages (never torch) as a child process; poll it.
        ``missing``: the requirements found missing (checked again when not given)."""
        python = python or self.serverPython or default_python()
        missing = self.missingDependencies(python) if missing is None else missing
        missing = [r for r in missing if dependencies.split_requirement(r)[0].lower() != "torch"]
        if not missing:
            return None
        log = os.path.join(slicer.app.temporaryPath, "MedDiffusion-pip.log")
        return dependencies.PipProcess(python, missing, log, env=self._dependencyEnvironment(python))

    def startImportWeights(self, folder: str, python: str | None = None) -> "dependencies.InstallProcess":
        """Add a folder of weights (the authors' files or converted ones) to the model cache of the
        local service's Python: ``meddiffusion models import FOLDER`` in a child process to ``poll()``
        (torch runs there, never in Slicer's process; one progress line per file goes to its log). The
        local server re-reads the registry, so its next health answer lists the model as downloaded."""
        python = python or self.serverPython or default_python()
        command, env = importWeightsCommand(python, str(folder), self._dependencyEnvironment(python))
        log = os.path.join(slicer.app.temporaryPath, "MedDiffusion-import.log")
        return dependencies.InstallProcess([command], log, env=env)


def _isSlicerPython(python: str) -> bool:
    return os.path.realpath(python) == os.path.realpath(default_python())


def externalPythonEnvironment() -> dict:
    """The environment for a user-picked Python: Slicer's start-up environment, with the variables
    Slicer's launcher added (PYTHONHOME, PYTHONPATH, library paths) removed."""
    env = dict(slicer.util.startupEnvironment())
    for key in os.environ:
        env.setdefault(key, None)  # LocalServer starts from os.environ: None removes what the launcher added
    return env


def libraryParent() -> str:
    """The folder holding MedDiffusionLib: what ``LocalServer.start`` puts first on the server's PYTHONPATH."""
    import MedDiffusionLib.client

    return os.path.dirname(os.path.dirname(os.path.realpath(MedDiffusionLib.client.__file__)))


def importWeightsCommand(python: str, folder: str, env: dict | None = None) -> tuple:
    """The command line and environment of ``meddiffusion models import FOLDER`` on the local
    server's Python, run as the server is: ``env`` laid over this process's environment (``None``
    removes a variable), the folder holding MedDiffusionLib first on PYTHONPATH."""
    env = dict(env or {})
    inherited = env["PYTHONPATH"] if "PYTHONPATH" in env else os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (libraryParent(), inherited or "") if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return [python, "-m", "MedDiffusionLib.cli", "models", "import", folder], env


#
# Widget
#
class MedDiffusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 250

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._pip = None
        self._shownSampler = None  # the sampler whose default steps the panel last applied
        self._shownControlSteps = None  # the ControlNet steps the panel last took from the service
        self._import = None  # an Add weights... child process (meddiffusion models import) in progress
        self._dicom = None  # an Export DICOM... (service.DicomExport: NRRD written in steps, then a child) in progress
        self._dicomName = ""
        self._pending = None  # action to run once the service answers
        self._models: list = []
        self._labelsNets: list = []
        self._sparseNets: list = []
        self._missing: list | None = []  # None: unknown (the check failed)
        self._depCheck = None  # a DependencyCheck in progress
        self._afterInstall = False
        self._unload = None  # a Free-GPU-memory request in progress
        self._startedAt = 0.0
        self._misses = 0
        self._appliedConnection = None  # the Run on settings last applied (see _onConnectionEdited)
        self._ticking = False  # a timer tick is running (a message box it shows runs its own event loop)
        self._addedNodeIDs: list = []  # nodes added to the scene, checked for Sample Data once loading returns
        self._segmentRows: list = []  # [(segment id, label combo box)] of the segment -> label table
        self._segmentLabelNames: list = []  # the label names the table's combo boxes list (then "(leave out)")
        self._segmentChoices: dict = {}  # {segment id: the combo text} the user picked in the table
        self._observedSegmentation = None  # the vtkSegmentation whose segment events rebuild the table

    # -- set-up: connect everything first; nothing here needs torch or the service ---------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDiffusionLogic()
        self.logic.logCallback = logging.info

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._onTimer)

        def guarded(handler):
            def slot(*_args):
                with slicer.util.tryWithErrorDisplay(_("MedDiffusion:"), waitCursor=False):
                    self._guardedCall(handler)
            return slot

        ui = self.ui
        for item in RUN_ON:
            ui.runOnComboBox.addItem(_(item))
        ui.runOnComboBox.connect("currentIndexChanged(int)", guarded(self._onRunOnChanged))
        self._connectPathEdited(ui.pythonPathLineEdit, guarded(self._onConnectionEdited))
        ui.serverUrlLineEdit.connect("editingFinished()", guarded(self._onConnectionEdited))
        ui.serverTokenLineEdit.connect("editingFinished()", guarded(self._onConnectionEdited))
        self._connectPathEdited(ui.serverCaFilePathLineEdit, guarded(self._onConnectionEdited))
        ui.connectButton.connect("clicked(bool)", guarded(self._onConnect))
        ui.installButton.connect("clicked(bool)", guarded(self._onInstall))
        ui.freeMemoryButton.connect("clicked(bool)", guarded(self._onFreeMemory))
        ui.modelComboBox.connect("currentIndexChanged(int)", guarded(self._onModelChanged))
        ui.classComboBox.connect("currentIndexChanged(int)", guarded(self._onClassChanged))
        ui.sizePresetComboBox.connect("currentIndexChanged(int)", guarded(self._onPresetChanged))
        ui.labelsControlNetComboBox.connect("currentIndexChanged(int)", guarded(self._onControlNetChanged))
        ui.sparseViewControlNetComboBox.connect("currentIndexChanged(int)", guarded(self._onControlNetChanged))
        ui.generateButton.connect("clicked(bool)", guarded(self._onGenerate))
        ui.synthesizeButton.connect("clicked(bool)", guarded(self._onSynthesize))
        ui.segmentLabelTable.setColumnCount(2)
        ui.segmentLabelTable.setHorizontalHeaderLabels([_("Segment"), _("Label")])
        ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", guarded(self._onSegmentationChanged))
        ui.simulateButton.connect("clicked(bool)", guarded(self._onSimulate))
        ui.reconstructButton.connect("clicked(bool)", guarded(self._onReconstruct))
        ui.exportButton.connect("clicked(bool)", guarded(self._onExport))
        ui.exportDicomButton.connect("clicked(bool)", guarded(self._onExportDicom))
        ui.reproduceButton.connect("clicked(bool)", guarded(self._onReproduce))
        ui.evaluateButton.connect("clicked(bool)", guarded(self._onEvaluate))
        ui.cancelButton.connect("clicked(bool)", guarded(self._onCancel))
        ui.showLogButton.connect("clicked(bool)", guarded(self._onShowLog))
        ui.addWeightsButton.connect("clicked(bool)", guarded(self._onAddWeights))
        slicer.app.connect("aboutToQuit()", self._onAboutToQuit)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        ui.progressBar.setRange(0, 1)
        ui.progressBar.setValue(0)

        try:
            self._loadSettings()
            self.initializeParameterNode()
        finally:
            self._updateButtons()
        try:
            self._onRunOnChanged()  # shows the local or server fields, checks the local Python's packages
        except Exception as exc:  # a broken Python or a bad saved address must not break the panel
            self._setDependencies(None, _("could not check the Python packages: {error}").format(error=exc))
            self._status(str(exc))

    @staticmethod
    def _connectPathEdited(pathLineEdit, slot) -> None:
        """Call ``slot`` when a ctkPathLineEdit holds a finished path, not per keystroke (its
        currentPathChanged fires for every character typed): when typing ends (editingFinished of
        its line edit: Enter or focus out), or when a path is set without typing (the browse
        dialog, or setCurrentPath: the line edit is then not ``modified``)."""
        lineEdit = pathLineEdit.comboBox().lineEdit()
        lineEdit.connect("editingFinished()", slot)
        pathLineEdit.connect("currentPathChanged(QString)", lambda *_args: None if lineEdit.modified else slot())

    def _guardedCall(self, handler) -> None:
        try:
            handler()
        except InputError as exc:  # the user's input: a message, no traceback
            self._status(str(exc))
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedDiffusion"))
        except ServiceError as exc:
            self._status(panel_message(exc.message))
            raise RuntimeError(panel_message(exc.message)) from exc

    # -- parameter node (template) ----------------------------------------------------------------------------
    def cleanup(self) -> None:
        self.removeObservers()
        self._timer.stop()
        if self._pip is not None:
            self._pip.kill()
        if self._import is not None:
            self._import.kill()
        if self._dicom is not None:
            self._dicom.cancel()
        if self._depCheck is not None:
            self._depCheck.kill()
        if self._job is not None and not self._job.done:  # quitting or reloading: the job goes too
            try:
                self.logic.cancel(self._job)
                for _step in range(20):  # the timer is stopped: step the cancel on (at most ~1 s) so that a
                    if self._job.done:  # remote job does not run on for nobody
                        break
                    self.logic.poll(self._job)
            except ServiceError:
                pass
        self.logic.stopServer()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        """Remember added volumes and segmentations; once the loading call returns (their names are
        set then), those from this module's Sample Data fill the input selectors."""
        if node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLSegmentationNode"):
            self._addedNodeIDs.append(node.GetID())
            if len(self._addedNodeIDs) == 1:
                qt.QTimer.singleShot(0, self._fillFromSampleData)

    def _fillFromSampleData(self) -> None:
        ids, self._addedNodeIDs = self._addedNodeIDs, []
        p = self._parameterNode
        if p is None or self._job is not None:
            return
        nodes = [slicer.mrmlScene.GetNodeByID(i) for i in ids]
        assignments = {role: node for node in nodes if node is not None for role in sampleDataRoles(node)}
        if assignments:
            with slicer.util.NodeModify(p):
                for role, node in assignments.items():
                    setattr(p, role, node)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.onSceneClosing()  # unfinished jobs are cancelled and add nothing to the next scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        self._shownSampler = None  # a node's own sampler and steps (a loaded scene's) are kept as they are
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    # -- connection --------------------------------------------------------------------------------------------
    def _loadSettings(self) -> None:
        """Run on, Python, server URL, token and CA file: application settings (a new scene keeps them)."""
        s = qt.QSettings()
        runOn = s.value(SETTINGS + "runOn", RUN_ON[0])
        widgets = (self.ui.runOnComboBox, self.ui.pythonPathLineEdit, self.ui.serverCaFilePathLineEdit)
        for widget in widgets:
            widget.blockSignals(True)  # setup() applies them once, after loading all
        try:
            self.ui.runOnComboBox.currentIndex = RUN_ON.index(runOn) if runOn in RUN_ON else 0
            self.ui.pythonPathLineEdit.currentPath = s.value(SETTINGS + "python", "")
            self.ui.serverCaFilePathLineEdit.currentPath = s.value(SETTINGS + "serverCaFile", "")
        finally:
            for widget in widgets:
                widget.blockSignals(False)
        self.ui.serverUrlLineEdit.text = s.value(SETTINGS + "serverUrl", "")
        self.ui.serverTokenLineEdit.text = s.value(SETTINGS + "serverToken", "")

    def _saveSettings(self) -> None:
        s = qt.QSettings()
        s.setValue(SETTINGS + "runOn", RUN_ON[0] if self._isLocal() else RUN_ON[1])
        s.setValue(SETTINGS + "serverUrl", self.ui.serverUrlLineEdit.text.strip())
        s.setValue(SETTINGS + "serverToken", self.ui.serverTokenLineEdit.text.strip())
        s.setValue(SETTINGS + "serverCaFile", self._caFile() or "")
        s.setValue(SETTINGS + "python", self.ui.pythonPathLineEdit.currentPath.strip())

    def _isLocal(self) -> bool:
        return self.ui.runOnComboBox.currentIndex == 0

    def _python(self) -> str:
        return self.ui.pythonPathLineEdit.currentPath.strip() or default_python()

    def _caFile(self) -> str | None:
        """The CA file to trust for an https:// server; None: the system's trusted CAs."""
        return self.ui.serverCaFilePathLineEdit.currentPath.strip() or None

    def _onRunOnChanged(self, *_args) -> None:
        local = self._isLocal()
        for w in (self.ui.pythonPathLineEdit, self.ui.label_pythonPathLineEdit, self.ui.installButton,
                  self.ui.dependenciesLabel, self.ui.label_dependenciesLabel, self.ui.showLogButton):
            w.visible = local
        for w in (self.ui.serverUrlLineEdit, self.ui.label_serverUrlLineEdit, self.ui.serverTokenLineEdit,
                  self.ui.label_serverTokenLineEdit, self.ui.serverCaFilePathLineEdit,
                  self.ui.label_serverCaFilePathLineEdit):
            w.visible = not local
        self._updateAddWeights()
        self._onConnectionEdited()

    def _onConnectionEdited(self, *_args) -> None:
        """Settings changed: remember them; the next job (or Connect) uses them. Unchanged settings
        (a field left without an edit, a browsed path then left) keep the connection and what it told."""
        settings = (self._isLocal(), self.ui.pythonPathLineEdit.currentPath.strip(),
                    self.ui.serverUrlLineEdit.text.strip(), self.ui.serverTokenLineEdit.text.strip(), self._caFile())
        if settings == self._appliedConnection:
            return
        self._saveSettings()
        self._applyConnection()  # a Python path that does not exist is refused here; nothing changes
        self._appliedConnection = settings
        if self._isLocal():
            self._refreshDependencies()
        self._setServiceInfo(None)

    def _applyConnection(self) -> None:
        if self._isLocal():
            python = self.ui.pythonPathLineEdit.currentPath.strip() or None
            if python is not None and not os.path.isfile(python):
                raise InputError(_("{path}: no such Python; choose the python executable of the environment "
                                   "(or leave the field empty for Slicer's Python)").format(path=python))
            self.logic.useLocalServer(python)
        elif self.ui.serverUrlLineEdit.text.strip():
            self.logic.useRemoteServer(self.ui.serverUrlLineEdit.text.strip(), self.ui.serverTokenLineEdit.text.strip(),
                                       self._caFile())

    def _onConnect(self) -> None:
        self._withService(lambda: self._status(_("connected")))

    def _withService(self, action, afterInstall: bool = False) -> None:
        """Run ``action`` once the packages are checked and the service answers. Nothing here waits:
        the local server is started with start(wait=False) and probed from the timer."""
        self._afterInstall = afterInstall
        if self._job is not None or self._pip is not None or self._import is not None:
            raise InputError(_("wait for the running job (or Cancel it) first"))
        self._applyConnection()
        if not self._isLocal() and not self.ui.serverUrlLineEdit.text.strip():
            raise InputError(_("enter the server address (http://HOST:PORT) and token under Run on"))
        self._pending = action
        self._startedAt = time.monotonic()
        self._setBusy(True)
        self._advancePending()

    def _advancePending(self) -> None:
        """The next step towards the pending action: package check -> install -> connection -> action."""
        if self._pending is None:
            return
        if self._isLocal():
            if self._depCheck is not None:  # the timer calls back here when the check is done
                self._status(_("checking the Python packages of {python} ...").format(python=self._python()))
                self._timer.start()
                return
            if self._missing is None:
                self._pending = None
                self._setBusy(False)
                raise InputError(_("the packages of {python} could not be checked: {error}").format(
                    python=self._python(), error=self.ui.dependenciesLabel.text))
            if self._missing:
                action, self._pending = self._pending, None
                self._setBusy(False)
                if self._afterInstall:  # asked once: do not loop on a package pip could not provide
                    raise InputError(_("still missing after the installation: {packages}").format(
                        packages=", ".join(self._missing)))
                self._onInstall(then=action)
                return
        server = self.logic.server
        if self.logic.cachedHealth() is not None and (not self.logic.isLocal or (server is not None and server.running)):
            action, self._pending = self._pending, None
            self._setBusy(False)
            action()  # connected before: a dead remote service shows up as the job's error
            return
        if self._isLocal():
            self._useServerLog()
            self._status(_("starting the MedDiffusion service on this computer ..."))
        else:
            self._status(_("connecting to {url} ...").format(url=self.ui.serverUrlLineEdit.text.strip()))
        self.ui.progressBar.setRange(0, 0)
        self._timer.start()

    def _connectTick(self) -> None:
        try:
            health = self.logic.connectStep()
        except ServiceError as exc:
            self._pending = None
            self._setBusy(False)
            self._status(_("the MedDiffusion service could not be reached") + self._logHint())
            slicer.util.errorDisplay(_("The MedDiffusion service could not be reached: {error}").format(
                error=panel_message(exc.message).split("\n", 1)[0]), detailedText=exc.message,
                windowTitle=_("MedDiffusion"))
            return
        if health is None:
            return
        action, self._pending = self._pending, None  # first: whatever follows fails once, never per tick
        self._setBusy(False)
        problem = serviceProblem(health, self._serviceUrl())
        if problem is None:
            try:
                self._setServiceInfo(health)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                problem = _("the service at {url} sent a status answer this module cannot read ({error}): update "
                            "MedDiffusion on the server or this module").format(url=self._serviceUrl(), error=exc)
        if problem is not None:
            self.logic.stopServer()  # forgets the answer: the next job or Connect asks again
            self._setServiceInfo(None)
            self._status(problem)
            slicer.util.errorDisplay(problem, windowTitle=_("MedDiffusion"))
            return
        self._guardedCall(action)  # an error here is shown once by _onTimer

    def _serviceUrl(self) -> str:
        if not self.logic.isLocal:
            return self.logic.remote[0]
        return self.logic.server.url if self.logic.server is not None else _("this computer")

    def _setServiceInfo(self, health) -> None:
        if health is None:
            self.ui.serviceLabel.text = _("not connected (starts with the first job, or press Connect)")
            self.ui.freeMemoryButton.enabled = False
            return
        devices = ", ".join(
            d["label"] + (f" ({d['free_bytes'] / 2 ** 30:.1f} of {d['total_bytes'] / 2 ** 30:.1f} GiB free)"
                          if d.get("total_bytes") else "") for d in health.get("devices", []))
        gpu = any(d["name"].startswith("cuda") for d in health.get("devices", []))
        self.ui.serviceLabel.text = _("MedDiffusion {version}, torch {torch}; {devices}{nogpu}").format(
            version=health.get("version", "?"), torch=health.get("torch", "?"), devices=devices,
            nogpu="" if gpu else _(" - no CUDA GPU: only the bundled model is practical"))
        self.ui.freeMemoryButton.enabled = True
        self._fillModels(health)

    def _onFreeMemory(self) -> None:
        if self._unload is None:
            self._unload = self.logic.startUnload()
            self._status(_("freeing GPU memory ..."))
            self._timer.start()

    def _unloadTick(self) -> None:
        if not self._unload.step(POLL_BUDGET_S):
            return
        transfer, self._unload = self._unload, None
        if transfer.error is not None:
            self._status(_("freeing GPU memory failed: {error}").format(error=panel_message(transfer.error.message)))
            return
        self._status(_("freed: {models}").format(
            models=", ".join(transfer.result.get("unloaded", [])) or _("nothing was loaded")))

    def _onAboutToQuit(self) -> None:
        self.logic.stopServer()

    # -- the local server's log ---------------------------------------------------------------------------------
    def _useServerLog(self) -> None:
        """A local server that has not started yet writes to the kept log file (rotated when over
        LOG_MAX_BYTES) instead of a fresh temporary file, so Show log finds it after a restart too."""
        if not self.logic.isLocal:
            return
        server = self.logic.localServer()
        path = serverLogPath()
        if server.process is not None or str(server.log_file) == path:
            return
        old = str(server.log_file)
        try:
            if os.path.getsize(old) == 0:
                os.remove(old)  # the empty private file LocalServer made for itself
        except OSError:
            pass
        server.log_file = type(server.log_file)(rotateLog(path))

    def _logFile(self) -> str | None:
        server = self.logic.server if self.logic is not None and self.logic.isLocal else None
        path = str(server.log_file) if server is not None else serverLogPath()
        return path if os.path.isfile(path) else None

    def _logHint(self) -> str:
        """For a status line after a failure of the local server: where its log is."""
        path = self._logFile() if self.logic is not None and self.logic.isLocal else None
        return _(" (server log: {path}; Show log opens it)").format(path=path) if path else ""

    def _onShowLog(self) -> None:
        path = self._logFile()
        if path is None:
            raise InputError(_("there is no server log yet: it is written once the local service starts"))
        if not qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(path)):
            raise InputError(_("no application opens {path}: open it with a text editor").format(path=path))

    # -- Add weights...: `meddiffusion models import FOLDER` in a child process on the local server's Python ---------
    def _updateAddWeights(self) -> None:
        button = self.ui.addWeightsButton
        busy = self._job is not None or self._pip is not None or self._pending is not None or self._import is not None
        if not self._isLocal():
            button.enabled = False
            button.toolTip = _("The server's admin adds weights there (`meddiffusion models import FOLDER` on the "
                               "server)")
            return
        button.enabled = not busy
        button.toolTip = (_("A job is running: wait or Cancel") if busy else
                          _("Add a model from a folder of its weights (the authors' files or converted ones): they are "
                            "checked and converted into the model cache of the local service's Python, and the model "
                            "appears in the list"))

    def _onAddWeights(self) -> None:
        if not self._isLocal():
            raise InputError(_("The server's admin adds weights there (`meddiffusion models import FOLDER` on the "
                               "server)"))
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder with the model's weights"))
        if folder:
            self._startAddWeights(folder)

    def _startAddWeights(self, folder: str) -> None:
        """Start the import child (polled from the timer; Cancel stops it)."""
        if self._job is not None or self._pip is not None or self._import is not None or self._pending is not None:
            raise InputError(_("wait for the running job (or Cancel it) first"))
        self._applyConnection()
        self._import = self.logic.startImportWeights(folder, self._python())
        self._setBusy(True)
        self.ui.progressBar.setRange(0, 0)
        self._status(_("adding the weights in {folder} ...").format(folder=folder))
        self._timer.start()

    def _importTick(self) -> None:
        rc = self._import.poll()
        if rc is None:
            line = self._import.last_line()
            if line and not line.startswith("$ "):  # the log's first line is the command itself
                self._status(_("adding weights: {line}").format(line=line[:120]))
            return
        process, self._import = self._import, None
        self._setBusy(False)
        if rc != 0:
            lines = [ln for ln in process.tail(15).splitlines() if ln.strip() and not ln.startswith("$ ")]
            error = lines[-1] if lines else _("exit code {rc}").format(rc=rc)
            if error.startswith("error: "):
                error = error[len("error: "):]
            self._status(_("adding the weights failed: {error}").format(error=error[:200]))
            slicer.util.errorDisplay(_("Adding the weights failed: {error}").format(error=error),
                                     detailedText=_("{command}\n(exit code {rc}; log: {log})\n\n{tail}").format(
                                         command=" ".join(process.command), rc=rc, log=process.log_file,
                                         tail="\n".join(lines)), windowTitle=_("MedDiffusion"))
            return
        model = process.last_line().split(":", 1)[0].strip() or _("the model")
        added = _("added {model}").format(model=model)
        if self.logic.cachedHealth() is None:  # not connected: the list is filled when the service answers
            self._status(added + _(" (it appears in the model list once the service is connected)"))
            return
        # connected: ask the service again (it re-reads the registry); its answer refills the model list
        self._pending = lambda: self._status(added)
        self._startedAt = time.monotonic()
        self._setBusy(True)
        self._status(added + _("; refreshing the model list ..."))
        self._timer.start()

    # -- dependencies of the local service's Python (checked by a child process polled from the timer) ---------
    def _refreshDependencies(self) -> None:
        if not self._isLocal():
            return
        if self._depCheck is not None:
            self._depCheck.kill()
        self._depCheck = self.logic.startDependencyCheck(self._python())
        self._missing = []
        if self._depCheck.poll():
            self._dependenciesChecked()
        else:
            self._setDependencies([], _("checking ..."))
            self.ui.installButton.enabled = False
            self._timer.start()

    def _dependenciesChecked(self) -> None:
        check, self._depCheck = self._depCheck, None
        if check.error is not None:
            self._missing = None
            self._setDependencies(None, _("could not check the Python packages: {error}").format(error=check.error))
        elif check.missing:
            self._missing = check.missing
            self._setDependencies(check.missing, _("dependencies missing: {packages}").format(
                packages=", ".join(check.missing)))
        else:
            self._missing = []
            self._setDependencies([], _("all installed"))
        if self._pending is not None:
            self._advancePending()

    def _setDependencies(self, missing, text: str) -> None:
        intelMac = bool(missing) and dependencies.is_intel_mac() and any(
            dependencies.split_requirement(r)[0].lower() == "torch" for r in missing)
        if intelMac:  # say it up front: no torch >= 2.6 for Intel Macs, so This computer cannot work
            text = _("{text}. Intel Mac: no PyTorch {req} exists for it; choose Run on: Server").format(
                text=text, req=dependencies.TORCH_REQUIREMENT)
        self.ui.dependenciesLabel.text = text
        self.ui.installButton.enabled = bool(missing) or missing is None
        self.ui.installButton.toolTip = (dependencies.intel_mac_message() if intelMac else
            _("Install into {python}: {packages}").format(
            python=self._python(), packages=", ".join(missing)) if missing else
            _("Check the packages again") if missing is None else _("Nothing to install"))

    def _onInstall(self, then=None) -> None:
        python = self._python()
        if self._depCheck is not None:
            raise InputError(_("the packages of {python} are still being checked; try again in a moment").format(
                python=python))
        missing = self._missing
        if missing is None:  # the last check failed: check again (the timer reports the result)
            self._refreshDependencies()
            return
        if not missing:
            if then:
                then()
            return
        if any(dependencies.split_requirement(r)[0].lower() == "torch" for r in missing):
            # An older torch is never replaced and Intel Macs have no torch >= 2.6: explain instead of trying.
            plan = self.logic.torchPlan(python)
            if plan.action == "refuse":
                raise InputError(plan.message)
        if not slicer.util.confirmOkCancelDisplay(
                _("The MedDiffusion service needs these Python packages in {python}:\n{packages}\n\nInstall them "
                  "now? (PyTorch is a large download: light-the-torch picks the build for this computer's GPU. "
                  "Slicer stays usable meanwhile.)").format(
                    python=python, packages="\n".join(missing)), windowTitle=_("MedDiffusion")):
            return
        # torch (light-the-torch) and the other packages (pip) install in child processes polled from the
        # timer: Slicer does not freeze and never imports torch.
        self._pip = self.logic.startInstall(python, missing)
        self._pending = then
        if self._pip is None:
            self._installFinished(0)
            return
        self._setBusy(True)
        self.ui.progressBar.setRange(0, 0)
        self._status(_("installing {packages} ...").format(packages=", ".join(missing)))
        self._timer.start()

    def _pipTick(self) -> None:
        rc = self._pip.poll()
        if rc is None:
            self._status(_("installing ({step}/{steps}): {line}").format(
                step=self._pip.step + 1, steps=len(self._pip.commands), line=self._pip.last_line()[:120]))
            return
        self._installFinished(rc)

    def _installFinished(self, rc: int) -> None:
        import importlib

        pip, self._pip = self._pip, None
        self._setBusy(False)
        self.ui.progressBar.setRange(0, 1)
        importlib.invalidate_caches()
        if rc != 0:
            self._pending = None
            self._status(_("installation failed"))
            slicer.util.errorDisplay(_("Installing the packages failed (exit code {rc}; log: {log}).").format(
                                         rc=rc, log=pip.log_file if pip else ""),
                                     detailedText=pip.tail() if pip else "", windowTitle=_("MedDiffusion"))
            self._refreshDependencies()
            return
        self._status(_("packages installed; checking again ..."))
        action, self._pending = self._pending, None
        self._refreshDependencies()  # the check runs from the timer; then the action (if any) goes on
        if action is not None:
            self._withService(action, afterInstall=True)

    # -- models and ControlNets (from the service) -----------------------------------------------------------------
    def _fillModels(self, health) -> None:
        self._models = health.get("models", [])
        nets = health.get("controlnets", [])
        self._labelsNets = [c for c in nets if c["task"] == "labels"]
        self._sparseNets = [c for c in nets if c["task"] in ("sparse-view", "mri")]
        p = self._parameterNode
        for combo, items, label, current in (
                (self.ui.modelComboBox, self._models, lambda m: f"{m['title']} [{m['state']}]", p.modelId if p else ""),
                (self.ui.labelsControlNetComboBox, self._labelsNets, lambda c: c["name"],
                 p.labelsControlNet if p else ""),
                (self.ui.sparseViewControlNetComboBox, self._sparseNets, lambda c: c["name"],
                 p.sparseViewControlNet if p else "")):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for item in items:
                combo.addItem(label(item))
            ids = [i.get("id", i.get("name")) for i in items]
            combo.currentIndex = ids.index(current) if current in ids else (0 if items else -1)
            combo.blockSignals(wasBlocked)
        self._onModelChanged()
        self._onControlNetChanged()

    def _model(self):
        i = self.ui.modelComboBox.currentIndex
        return self._models[i] if 0 <= i < len(self._models) else None

    def _onModelChanged(self, *_args) -> None:
        model = self._model()
        if model is None:
            return
        self.ui.modelInfoLabel.text = _("{state}; licence: {licence}").format(state=model["state"],
                                                                             licence=model.get("license") or "-")
        combo = self.ui.classComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for c in model["classes"]:
            combo.addItem(f"{c['index']} {c['name']}")
        indices = [c["index"] for c in model["classes"]]
        p = self._parameterNode
        want = p.classIndex if p and p.modelId == model["id"] else model["defaults"]["class"]
        combo.currentIndex = indices.index(want) if want in indices else 0
        combo.blockSignals(wasBlocked)
        if p is not None and p.modelId != model["id"]:
            # the service resolves a model's defaults (MedDiffusionLib.defaults); the panel only shows them
            defaults = model["defaults"]
            p.modelId = model["id"]
            self._shownSampler = p.sampler = defaults["sampler"] if defaults["sampler"] in ("ddpm", "ddim", "dpm++") \
                else p.sampler
            steps = _validSteps(defaults.get("steps"))
            if isinstance(defaults.get("sampler_steps"), dict) and steps:  # an older service sends no per-sampler steps
                p.steps = steps
            controlSteps = _validSteps((defaults.get("controlled") or {}).get("steps")
                                       if isinstance(defaults.get("controlled"), dict) else None)
            if controlSteps and controlSteps != self._shownControlSteps:  # a user's own value stays otherwise
                self._shownControlSteps = p.controlSteps = controlSteps
        self._onClassChanged()

    def _class(self):
        model = self._model()
        i = self.ui.classComboBox.currentIndex
        return model["classes"][i] if model and 0 <= i < len(model["classes"]) else None

    def _onClassChanged(self, *_args) -> None:
        cls = self._class()
        if cls is None:
            return
        if self._parameterNode is not None:
            self._parameterNode.classIndex = cls["index"]
        combo = self.ui.sizePresetComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for s in cls["sizes"]:
            combo.addItem("x".join(map(str, s["image_xyz"])) + " @ " + "x".join(f"{v:g}" for v in s["spacing_xyz"])
                          + " mm")
        combo.blockSignals(wasBlocked)
        hasWindow = bool(cls.get("hu_window"))
        self.ui.mapToHUCheckBox.enabled = hasWindow
        self.ui.mapToHUCheckBox.toolTip = (
            _("Map the result from model units to HU with the class's window {window}").format(window=cls["hu_window"])
            if hasWindow else _("This model does not publish an HU range for this class: results stay in model units "
                                "[-1, 1]"))
        self._onPresetChanged()

    def _onPresetChanged(self, *_args) -> None:
        cls = self._class()
        i = self.ui.sizePresetComboBox.currentIndex
        p = self._parameterNode
        if cls is None or p is None or not (0 <= i < len(cls["sizes"])) or not p.useTrainedSize:
            return
        size, spacing = cls["sizes"][i]["image_xyz"], cls["sizes"][i]["spacing_xyz"]
        with slicer.util.NodeModify(p):
            p.sizeX, p.sizeY, p.sizeZ = size
            p.spacingX, p.spacingY, p.spacingZ = spacing

    def _onControlNetChanged(self, *_args) -> None:
        p = self._parameterNode
        if p is None:
            return
        i, j = self.ui.labelsControlNetComboBox.currentIndex, self.ui.sparseViewControlNetComboBox.currentIndex
        if 0 <= i < len(self._labelsNets):
            p.labelsControlNet = self._labelsNets[i]["name"]
        if 0 <= j < len(self._sparseNets):
            p.sparseViewControlNet = self._sparseNets[j]["name"]
        self._refreshSegmentTable()  # the labels ControlNet's label names fill the table's combo boxes

    # -- segment -> label table (issue 19, item 8) ---------------------------------------------------------------
    def _labelNames(self) -> dict:
        """{value: name} of the selected labels ControlNet: the service's, once it has answered; before
        that the bundled convention's (so Sample Data is pre-mapped before connecting; the names are
        checked against the service's when the job is submitted)."""
        p = self._parameterNode
        if p is not None and self.logic is not None and self.logic.cachedHealth() is not None:
            try:
                return self.logic.controlNetLabels(p.labelsControlNet)  # the cached answer: no request
            except (InputError, ServiceError):
                pass
        return dict(DEFAULT_LABEL_NAMES)

    def _onSegmentationChanged(self, *_args) -> None:
        self._segmentChoices = {}  # another segmentation: the proposals start again
        self._refreshSegmentTable()

    def _observeSegmentation(self, node) -> None:
        """Rebuild the table when segments of the selected segmentation are added, removed or renamed."""
        segmentation = node.GetSegmentation() if node is not None else None
        if segmentation is self._observedSegmentation:
            return
        old, self._observedSegmentation = self._observedSegmentation, segmentation
        for seg, connect in ((old, self.removeObserver), (segmentation, self.addObserver)):
            if seg is not None:
                for event in (seg.SegmentAdded, seg.SegmentRemoved, seg.SegmentModified):
                    connect(seg, event, self._onSegmentsChanged)

    def _onSegmentsChanged(self, *_args) -> None:
        self._refreshSegmentTable()

    def _choiceRecorder(self, segmentId, combo):
        def record(*_args):
            self._segmentChoices[segmentId] = combo.currentText
        return record

    def _refreshSegmentTable(self) -> None:
        """One row per segment of the selected segmentation: its name, and a combo box of the ControlNet's
        label names and "(leave out)", pre-selected by ``proposeSegmentMapping`` (segment names and
        terminology); a label the user picked for a segment is kept while the ControlNet has it."""
        node = self.ui.segmentationSelector.currentNode()
        self._observeSegmentation(node)
        labels = self._labelNames()
        names = list(labels.values())
        proposal = self.logic.proposeSegmentMapping(node, labels) if node is not None else {}
        ui = self.ui  # (the QTableWidget's class is checked in Testing/tests/test_slicer_segment_table.py)
        table = ui.segmentLabelTable
        table.setRowCount(0)
        self._segmentRows, self._segmentLabelNames = [], names
        table.setRowCount(len(proposal))
        segmentation = node.GetSegmentation() if node is not None else None
        for row, (segmentId, proposed) in enumerate(proposal.items()):
            item = qt.QTableWidgetItem(segmentation.GetSegment(segmentId).GetName())
            item.setFlags(qt.Qt.ItemIsEnabled)
            item.setToolTip(_("segment ID: {id}").format(id=segmentId))
            table.setItem(row, 0, item)
            combo = qt.QComboBox()
            combo.addItems(names + [_("(leave out)")])
            chosen = self._segmentChoices.get(segmentId, proposed)
            combo.currentIndex = names.index(chosen) if chosen in names else len(names)
            combo.toolTip = _("The ControlNet label this segment becomes; \"(leave out)\": not exported (its "
                              "voxels become label 0, like the background)")
            combo.connect("currentIndexChanged(int)", self._choiceRecorder(segmentId, combo))
            table.setCellWidget(row, 1, combo)
            self._segmentRows.append((segmentId, combo))
        self._updateButtons()

    def _segmentLabels(self) -> dict:
        """The table's choices: {segment id: label name, or None where left out}."""
        names = self._segmentLabelNames
        return {segmentId: names[combo.currentIndex] if 0 <= combo.currentIndex < len(names) else None
                for segmentId, combo in self._segmentRows}

    # -- buttons: enabled only when their inputs are set --------------------------------------------------------------
    def _updateButtons(self, *_args) -> None:
        p = self._parameterNode
        busy = self._job is not None or self._pip is not None or self._pending is not None or self._import is not None
        needs = {
            "generateButton": [],
            "synthesizeButton": ([] if p and p.segmentation else [_("a segmentation")])
            + ([] if p and p.referenceVolume else [_("a reference volume")])
            + ([] if not (p and p.segmentation) or self._segmentRows else [_("a segmentation with segments")]),
            "simulateButton": [] if p and p.fullCTVolume else [_("a full CT volume")],
            "reconstructButton": [] if p and p.fbpVolume else [_("a sparse-view FBP volume")],
            "evaluateButton": ([] if p and p.predictionVolume else [_("a prediction")])
            + ([] if p and p.evaluationReference else [_("a reference")]),
            "exportButton": [] if p and p.exportVolume else [_("a volume")],
            "exportDicomButton": [] if p and self._isResult(p.exportVolume) else [_("a MedDiffusion result")],
            "reproduceButton": [] if p and self._isResult(p.exportVolume, job=True) else [_("a MedDiffusion result")],
        }
        tips = {"generateButton": _("Generate volumes from noise with the selected model"),
                "synthesizeButton": _("Synthesize a CT on the reference grid from the mapped segments"),
                "simulateButton": _("Simulate the FBP of a sparse fan-beam scan of the full CT (HU)"),
                "reconstructButton": _("Reconstruct a CT from the sparse-view FBP with the ControlNet"),
                "evaluateButton": _("Compare the prediction with the reference on the service: the metrics as a "
                                    "table and a bar chart"),
                "exportButton": _("Save the volume to a file, keeping the synthetic mark of a MedDiffusion result"),
                "exportDicomButton": _("Save the MedDiffusion result as a DICOM series in a new folder (marked "
                                       "synthetic: DERIVED\\SECONDARY, new UIDs, the provenance in a private block)"),
                "reproduceButton": _("Re-run the job recorded in the result's mark on the service and compare the "
                                     "re-run with the result voxel by voxel (nothing is added to the scene); a "
                                     "synthesize, reconstruct or simulate result needs its input below")}
        local = ("exportButton", "exportDicomButton")  # no service involved: usable while a job runs
        for name, missing in needs.items():
            button = getattr(self.ui, name)
            button.enabled = (not busy or name in local) and p is not None and not missing
            if busy and name not in local:
                button.toolTip = _("A job is running: wait or Cancel")
            elif missing:
                button.toolTip = _("Select {items} first").format(items=_(" and ").join(missing))
            else:
                button.toolTip = tips[name]
        if self._dicom is not None:  # one DICOM export at a time
            self.ui.exportDicomButton.enabled = False
            self.ui.exportDicomButton.toolTip = _("A DICOM export is running: wait or Cancel")
        # Cancel: a job, or the server starting / the connection being made (and the package check before it)
        self.ui.cancelButton.enabled = (self._job is not None or self._pending is not None or self._import is not None
                                        or self._dicom is not None)
        self.ui.connectButton.enabled = not busy
        # where jobs run cannot change under a running job or installation (re-enabled when it ends, however)
        working = self._job is not None or self._pip is not None or self._import is not None
        for w in self._connectionWidgets():
            w.enabled = not working
        self._updateAddWeights()
        if p is not None and p.sampler != self._shownSampler:
            # another sampler chosen: its default number of steps, as the service resolves it
            first = self._shownSampler is None
            self._shownSampler = p.sampler
            perSampler = ((self._model() or {}).get("defaults") or {}).get("sampler_steps")
            steps = _validSteps(perSampler.get(p.sampler)) if isinstance(perSampler, dict) else None
            if not first and steps:
                p.steps = steps
        if p is not None:
            self.ui.stepsSpinBox.enabled = p.sampler != "ddpm"
            self.ui.stepsSpinBox.toolTip = (_("DDPM always runs the model's full schedule (1000 steps)")
                                            if p.sampler == "ddpm" else _("Number of sampler steps"))
            for w in (self.ui.sizeXSpinBox, self.ui.sizeYSpinBox, self.ui.sizeZSpinBox, self.ui.spacingXSpinBox,
                      self.ui.spacingYSpinBox, self.ui.spacingZSpinBox):
                w.enabled = not p.useTrainedSize
            self.ui.sizePresetComboBox.enabled = p.useTrainedSize

    def _connectionWidgets(self) -> tuple:
        ui = self.ui
        return (ui.runOnComboBox, ui.pythonPathLineEdit, ui.serverUrlLineEdit, ui.serverTokenLineEdit,
                ui.serverCaFilePathLineEdit)

    # -- tasks ---------------------------------------------------------------------------------------------------------
    def _mode(self) -> str:
        return "reference" if self._parameterNode.referenceKernels else "fast"

    def _onGenerate(self) -> None:
        p = self._parameterNode

        def submit():
            cls = self._class()
            return self.logic.submitGenerate(
                modelId=p.modelId or None, classIndex=cls["index"] if cls else None,
                size=(p.sizeX, p.sizeY, p.sizeZ), spacing=(p.spacingX, p.spacingY, p.spacingZ), seed=p.seed,
                sampler=p.sampler, steps=p.steps, numberOfVolumes=p.numberOfVolumes,
                mapToHU=bool(p.mapToHU and cls and cls.get("hu_window")), device=p.device, mode=self._mode(),
                previewEvery=p.previewEvery)
        self._withService(lambda: self._start(submit()))

    def _onSynthesize(self) -> None:
        p = self._parameterNode
        mapping = self._segmentLabels()  # the table's choices, checked before anything starts
        if not any(label is not None for label in mapping.values()):
            raise InputError(_("give at least one segment a label in the Segment labels table"))
        leftOut = self.logic.unmappedSegments(p.segmentation, mapping)
        if leftOut and not slicer.util.confirmOkCancelDisplay(
                _("These segments have no label: they are not exported and their voxels become label 0, like "
                  "the background:\n\n{segments}\n\nSynthesize anyway?").format(
                    segments="\n".join(name for sid, name in leftOut)), windowTitle=_("MedDiffusion")):
            self._status(_("not started: give the left-out segments a label, or confirm leaving them out"))
            return
        self._withService(lambda: self._start(self.logic.submitSynthesize(
            p.segmentation, p.referenceVolume, mapping, controlNet=p.labelsControlNet, seed=p.seed,
            steps=p.controlSteps, device=p.device, mode=self._mode(), previewEvery=p.previewEvery,
            allowUnmapped=bool(leftOut), numSamples=p.numSamples)))  # left-out segments only once confirmed

    def _onSimulate(self) -> None:
        p = self._parameterNode
        self._withService(lambda: self._start(self.logic.submitSimulate(p.fullCTVolume, views=p.views)))

    def _onReconstruct(self) -> None:
        p = self._parameterNode
        self._withService(lambda: self._start(self.logic.submitReconstruct(
            p.fbpVolume, controlNet=p.sparseViewControlNet, seed=p.seed, steps=p.controlSteps, device=p.device,
            mode=self._mode(), previewEvery=p.previewEvery, numSamples=p.numSamples)))

    def _onExport(self) -> None:
        """Save the selected volume to a file the user picks (.nrrd, .nii, .nii.gz); a result keeps its mark."""
        node = self._parameterNode.exportVolume
        if node is None:
            raise InputError(_("select the volume to export"))
        name = re.sub(r"[^\w.+-]+", "_", node.GetName() or "volume").strip("_") or "volume"
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export volume"), os.path.join(slicer.app.defaultScenePath, name + ".nrrd"),
            _("NRRD (*.nrrd);;NIfTI (*.nii.gz *.nii)"))
        if not path:
            return
        if not path.lower().endswith((".nrrd", ".nii", ".nii.gz")):
            path += ".nrrd"
        written = self.logic.exportVolume(node, path)
        marked = self.logic.provenance(node)
        self._status((_("exported {name} to {path} with its synthetic mark") if marked and marked.get("synthetic")
                      else _("exported {name} to {path}")).format(name=node.GetName(), path=written))

    def _isResult(self, node, job: bool = False) -> bool:
        """A MedDiffusion result (synthetic mark); ``job``: one whose mark records the job (reproducible)."""
        prov = self.logic.provenance(node) if node is not None else None
        return bool(prov and prov.get("synthetic") and (not job or isinstance(prov.get("job"), dict)))

    def _onExportDicom(self) -> None:
        """Save the selected result as a DICOM series in a new folder the user names (a child process
        converts it, polled from the timer; Cancel stops it)."""
        node = self._parameterNode.exportVolume
        if not self._isResult(node):
            raise InputError(_("DICOM export is for MedDiffusion results: select a volume made by MedDiffusion"))
        name = re.sub(r"[^\w.+-]+", "_", node.GetName() or "volume").strip("_") or "volume"
        folder = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export DICOM series (a new folder)"),
            os.path.join(slicer.app.defaultScenePath, name + "_dicom"), _("DICOM series folder (*)"))
        if folder:
            self._startDicomExport(node, folder)

    def _startDicomExport(self, node, folder: str) -> None:
        if self._dicom is not None:
            raise InputError(_("a DICOM export is running: wait for it (or Cancel it) first"))
        self._dicom = self.logic.startExportDicom(node, folder, python=self._python() if self._isLocal() else None)
        self._dicomName = node.GetName()
        self._status(_("exporting {name} as a DICOM series to {folder} ...").format(name=node.GetName(), folder=folder))
        self._updateButtons()
        self._timer.start()

    def _dicomTick(self) -> None:
        export = self._dicom
        if export.poll() is None:
            return
        self._dicom = None
        self._updateButtons()
        if export.rc == 0:
            self._status(_("exported {name} to {folder} as a DICOM series marked synthetic").format(
                name=self._dicomName, folder=export.folder))
            return
        self._status(_("DICOM export failed: {error}").format(error=export.error))
        slicer.util.errorDisplay(_("DICOM export failed: {error}").format(error=export.error),
                                 detailedText=_("{command}\n(exit code {rc})\n\n{output}").format(
                                     command=" ".join(export.command), rc=export.rc, output=export.output),
                                 windowTitle=_("MedDiffusion"))

    def _onReproduce(self) -> None:
        """Re-run the selected result's recorded job on the service and show the verdict in the status line.
        The input: the "Result's input" volume; for a synthesize result without one, the segmentation,
        reference and segment labels of "From segmentation"."""
        p = self._parameterNode
        node = p.exportVolume
        task = ((self.logic.provenance(node) or {}).get("job") or {}).get("task") if node is not None else None
        kwargs = {"inputNode": p.reproduceInput}
        if p.reproduceInput is None and task == "synthesize" and p.segmentation is not None:
            kwargs = {"inputNode": p.segmentation, "segmentLabels": self._segmentLabels(),
                      "referenceNode": p.referenceVolume}
        self.logic._reproducible(node)  # a node without the mark or its job: one line, before connecting
        self._withService(lambda: self._start(self.logic.submitReproduce(node, **kwargs)))

    def _onEvaluate(self) -> None:
        p = self._parameterNode
        self._withService(lambda: self._start(self.logic.submitEvaluate(
            p.predictionVolume, p.evaluationReference, labels=p.evaluateLabels, resample=p.evaluateResample)))

    def _onCancel(self) -> None:
        if self._job is not None:
            self.logic.cancel(self._job)
            self._status(_("cancelling after the current step ..."))
        elif self._import is not None:  # Add weights...: the child (and what it started) stops; it converts into
            # a temporary folder renamed only when complete, so the cache gets nothing half-written
            process, self._import = self._import, None
            process.kill()
            self._setBusy(False)
            self._status(_("adding the weights was cancelled"))
        elif self._dicom is not None:  # the library writes the series into a temporary folder renamed when complete
            export, self._dicom = self._dicom, None
            export.cancel()
            self._updateButtons()
            self._status(_("the DICOM export was cancelled"))
        elif self._pending is not None:  # starting the server / connecting (or checking packages first)
            connecting = self._depCheck is None
            self._pending = None
            if connecting:  # drops the connection attempt; a local server that was starting is stopped
                self.logic.stopServer()
                self._setServiceInfo(None)
            self.ui.progressBar.setRange(0, 1)
            self._setBusy(False)
            self._status(_("cancelled: not connected"))

    # -- job handling (main thread; each timer tick moves things on for at most ~POLL_BUDGET_S) ------------------
    def _setBusy(self, busy: bool) -> None:
        if not busy:
            self.ui.progressBar.setRange(0, 1)
        self._updateButtons()

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _start(self, job) -> None:
        self._job = job
        self._startedAt = time.monotonic()
        self._misses = 0
        self._setBusy(True)
        self.ui.progressBar.setRange(0, 0)
        self._status(_("{task}: uploading the input").format(task=job.task))
        self._timer.start()
        if job.done:
            self._poll()

    def _onTimer(self) -> None:
        """One step of whatever is in progress. A step that fails stops the timer first, drops what
        failed, and shows one message; the panel stays usable. No tick runs inside another (a message
        box opened by a tick runs its own event loop while the timer is live)."""
        if self._ticking:
            return
        self._ticking = True
        stage = None
        try:
            self.logic.reapStoppedServers()  # servers stopped without waiting: kill late ones, reap
            if self._pip is not None:
                stage = "pip"
                self._pipTick()
            elif self._import is not None:
                stage = "import"
                self._importTick()
            elif self._depCheck is not None:
                stage = "dependencies"
                if self._depCheck.poll():
                    self._dependenciesChecked()
            elif self._job is not None:
                stage = "job"
                self._poll()
            elif self._pending is not None:
                stage = "connect"
                self._connectTick()
            if self._unload is not None:
                stage = "unload"
                self._unloadTick()
            if self._dicom is not None:  # runs beside a job (no service involved)
                stage = "dicom"
                self._dicomTick()
        except Exception as exc:  # noqa: BLE001 - shown once below; the timer must not repeat it
            self._timer.stop()
            self._tickFailed(stage, exc)
        finally:
            self._ticking = False
            if not (self._pip or self._import or self._depCheck or self._job or self._pending or self._unload
                    or self._dicom):
                self._timer.stop()

    def _tickFailed(self, stage, exc: Exception) -> None:
        """Drop what a failing tick was doing (and the action waiting for it), reset the panel, show one message."""
        import traceback

        detail = "".join(traceback.format_exception(exc))
        try:
            self._pending = None
            if stage == "pip" and self._pip is not None:
                pip, self._pip = self._pip, None
                pip.kill()
            elif stage == "import" and self._import is not None:
                process, self._import = self._import, None
                process.kill()
            elif stage == "dependencies" and self._depCheck is not None:
                check, self._depCheck = self._depCheck, None
                check.kill()
                self._missing = None
                self._setDependencies(None, _("could not check the Python packages: {error}").format(error=exc))
            elif stage == "job" and self._job is not None:
                job, self._job = self._job, None
                try:
                    self.logic.cancel(job)
                except Exception:  # noqa: BLE001 - the job's service may be what failed
                    pass
            elif stage == "unload":
                self._unload = None
            elif stage == "dicom" and self._dicom is not None:
                export, self._dicom = self._dicom, None
                export.cancel()
        finally:
            self.ui.progressBar.setRange(0, 1)
            self._setBusy(False)
        message = panel_message(exc.message) if isinstance(exc, ServiceError) else str(exc) or type(exc).__name__
        self._status(_("failed: {error}").format(error=message.split("\n", 1)[0]) + self._logHint())
        slicer.util.errorDisplay(_("MedDiffusion: {error}").format(error=message), detailedText=detail,
                                 windowTitle=_("MedDiffusion"))

    def _poll(self) -> None:
        job = self._job
        try:
            st = self.logic.poll(job)
        except ServiceUnavailable as exc:
            self._misses += 1  # refused or cut: keep trying while a local server lives
            server = self.logic.server
            dead = (server is None or not server.running) if self.logic.isLocal else self._misses > 20
            if dead:
                self._endJob()
                detail = self.logic.serverLog() if self.logic.isLocal else exc.message
                self._status(_("the MedDiffusion service stopped answering") + self._logHint())
                slicer.util.errorDisplay(_("The MedDiffusion service stopped answering during the job."),
                                         detailedText=detail, windowTitle=_("MedDiffusion"))
            return
        self._misses = 0
        if job.state == "uploading" and getattr(job.transfer, "phase", "") == "checking":
            self._status(_("{task}: checking that the input is the one the result was made from").format(task=job.task))
        elif job.state == "uploading":
            t = job.transfer
            self._status(_("{task}: uploading the input ({done:.0f} of {total:.0f} MiB)").format(
                task=job.task, done=(t.sent if t else 0) / 2 ** 20, total=((t.total or 0) if t else 0) / 2 ** 20))
        elif job.state == "downloading":
            self.ui.progressBar.setRange(0, 0)
            self._status(_("{task}: downloading the results").format(task=job.task))
        elif not job.done:
            self._showProgress(st)
            node = job.previewNode
            if node is not None and node is not getattr(self, "_shownPreview", None):
                self._shownPreview = node
                slicer.util.setSliceViewerLayers(background=node, fit=True)
        if not job.done:
            return
        self._endJob()
        self._shownPreview = None
        try:
            nodes = self.logic.finishJob(job)  # done: returns the nodes or raises the job's error at once
        except JobCancelled:
            self._status(_("cancelled; the scene was left unchanged"))
            return
        except ServiceError as exc:
            self._status(_("failed: {error}").format(error=panel_message(exc.message)) + self._logHint())
            slicer.util.errorDisplay(_("MedDiffusion {task} failed: {error}").format(
                task=job.task, error=panel_message(exc.message)), windowTitle=_("MedDiffusion"))
            return
        if getattr(job, "report", None) is not None:  # a reproduce job: its verdict, no nodes
            self._status(job.report["text"])
            return
        self._showResults(job, nodes)
        self._status(_("{task} done in {seconds:.0f} s: {names}").format(
            task=job.task, seconds=time.monotonic() - self._startedAt, names=", ".join(n.GetName() for n in nodes)))

    def _showResults(self, job, nodes) -> None:
        """Show a finished job's nodes: the volume in the slice views; an N-sample job's std in colour
        over its mean, with the Sequences toolbar on its sample browser; an evaluation's chart."""
        outputs = job.outputs
        if "mean" in outputs and "std" in outputs:
            self.logic.showUncertainty(outputs["mean"], outputs["std"])
            slicer.util.setSliceViewerLayers(fit=True)
            sequences = getattr(slicer.modules, "sequences", None)
            if sequences is not None and outputs.get("browser") is not None:
                sequences.setToolBarActiveBrowserNode(outputs["browser"])
                sequences.setToolBarVisible(True)
        elif outputs.get("chart") is not None:
            self.logic.showChart(outputs["chart"])
        elif nodes and nodes[0].IsA("vtkMRMLVolumeNode"):
            slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)
            if job.task == "simulate-sparse-view":
                self._parameterNode.fbpVolume = nodes[0]  # ready for Reconstruct

    def _endJob(self) -> None:
        self._job = None
        self._setBusy(False)

    def _showProgress(self, st: dict) -> None:
        bar = self.ui.progressBar
        if st.get("total"):
            bar.setRange(0, int(st["total"]))
            bar.setValue(int(st.get("step", 0)))
        else:
            bar.setRange(0, 0)  # no step count (loading, simulating): indeterminate
        text = f"{st.get('task', '')}: {st.get('message') or st.get('phase', '')}"
        if st.get("position"):
            text += _(" (position {n} in the queue)").format(n=st["position"])
        if st.get("eta_s"):
            text += _(", about {seconds:.0f} s left").format(seconds=st["eta_s"])
        self._status(text)


#
# Test (runs inside Slicer). The job test needs the service's packages: it is reported as skipped
# (unittest's skipTest, not a pass) on build machines that lack them, as the reference extensions do
# with their heavy tests. Whatever happens, the local server it starts is stopped, launcher and all.
#
class MedDiffusionTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """What Slicer's *Reload and Test* calls (the ctest runner calls the ``test_*`` methods
        itself): a skipped test is shown and logged as skipped, neither as a pass nor as an error."""
        import unittest

        for test in (self.test_mapping_and_refusals, self.test_generate_with_local_service):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as skip:
                logging.warning(f"{test.__name__} SKIPPED: {skip}")
                self.delayDisplay(f"{test.__name__} skipped: {skip}")
            finally:
                self.tearDown()

    def test_mapping_and_refusals(self):
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
        seg.GetSegmentation().AddEmptySegment("lung", "Lung")
        self.assertEqual(list(segment_mapping(seg, "Lung=1, Bone=3").values()), [1])
        vec = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
        with self.assertRaises(InputError):
            MedDiffusionLogic().submitSimulate(vec)

    def test_generate_with_local_service(self):
        logic = MedDiffusionLogic()
        try:
            missing = logic.missingDependencies()
            if missing:
                self.skipTest("the MedDiffusion service packages are not installed: " + ", ".join(missing))
            node = logic.generate(sampler="ddim", steps=2, device="cpu", timeout=600)
            self.assertEqual(node.GetImageData().GetDimensions(), (64, 64, 64))
        finally:
            stopped = self._stopServer(logic)
        self.assertTrue(stopped, "a process of the local server outlived stopServer()")

    def _stopServer(self, logic, timeout: float = 30.0) -> bool:
        """Stop the logic's local server and wait (at most ``timeout``) until every process of its
        tree (a launcher such as PythonSlicer and the real server) is gone, whether ``stopServer``
        waits or not. True when nothing is left."""
        from MedDiffusionLib.client import LocalServer

        server = logic.server
        try:
            logic.stopServer()  # returns at once; the tree gets its grace time, then a kill
        finally:
            end = time.monotonic() + timeout
            while not LocalServer.poll_stopped() and time.monotonic() < end:
                time.sleep(0.05)
            left = server is not None and server.running
            if left:  # stopServer must have stopped it; never leave it
                server.stop(timeout=5.0)
        return not left and LocalServer.poll_stopped() and (server is None or not server.stopping)
