"""MedDiffusion: 3D MedDiffusion in 3D Slicer (generate CT/MR, synthesize CT from a segmentation,
reconstruct sparse-view CT). All computation lives in MedDiffusionLib; torch is imported lazily,
so this module loads before torch is installed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from typing import Any, Callable, Optional

import vtk

import slicer

try:  # Slicer >= 5.4 translation helper
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover - older Slicer
    def _(text: str) -> str:
        return text
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.util import VTKObservationMixin

# MedDiffusionLib is installed next to this file by CMake; in a source checkout it is one folder up.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "MedDiffusionLib")) and _candidate not in sys.path:
        sys.path.insert(0, _candidate)

REQUIRED_PACKAGES = ("torch", "safetensors", "nibabel", "huggingface_hub", "tqdm", "einops")


class MedDiffusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDiffusion")
        self.parent.categories = [_("AI")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffusion developers"]
        self.parent.helpText = _(
            "Generate synthetic CT/MR volumes with 3D MedDiffusion, synthesize CT from a segmentation and "
            "reconstruct sparse-view CT. Everything is also available from the Python console through "
            "MedDiffusionLogic (see the README).")
        self.parent.acknowledgementText = _(
            "3D MedDiffusion: Wang et al., IEEE TMI (arXiv 2412.13059). Bundled demo model trained on the "
            "pyradiomics 3.0.1 chest CT test cases (BSD-3).")


#
# Parameter node
#
@parameterNodeWrapper
class MedDiffusionParameterNode:
    modelId: str = ""
    weightsFolder: str = ""
    classIndex: int = 1
    sizeX: int = 64
    sizeY: int = 64
    sizeZ: int = 64
    spacingX: float = 4.8
    spacingY: float = 4.8
    spacingZ: float = 4.3
    seed: int = 0
    sampler: str = "ddpm"
    steps: int = 100
    numberOfVolumes: int = 1
    mapToHU: bool = True
    device: str = "auto"
    referenceKernels: bool = False
    segmentation: slicer.vtkMRMLSegmentationNode
    referenceVolume: slicer.vtkMRMLScalarVolumeNode
    labelsControlNet: str = "chest-ct-mini-labels"
    fbpVolume: slicer.vtkMRMLScalarVolumeNode
    fullCTVolume: slicer.vtkMRMLScalarVolumeNode
    views: int = 40
    sparseViewControlNet: str = "chest-ct-mini-sparse-view"


#
# Logic: usable from the Python console without the widget
#
class MedDiffusionLogic(ScriptedLoadableModuleLogic):
    """Console API. Every task has a blocking form (returns nodes) and a ``start...`` form that
    runs on the worker thread and returns a job; :meth:`finishJob` turns its result into nodes on
    the main thread.

    Example::

        logic = slicer.util.getModuleLogic("MedDiffusion")
        nodes = logic.generate(seed=3)                      # bundled chest CT model, CPU is fine
        fbp = logic.simulateSparseView(getNode("CTChest"), views=40)
        recon = logic.reconstructSparseView(fbp)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._worker = None
        self._pipelines: dict[tuple, Any] = {}

    def getParameterNode(self):
        return MedDiffusionParameterNode(super().getParameterNode())

    # -- dependencies -----------------------------------------------------------------------------
    @staticmethod
    def missingPackages() -> list[str]:
        return [p for p in REQUIRED_PACKAGES if importlib.util.find_spec(p) is None]

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install missing packages after asking once. torch comes from the PyTorch extension's
        PyTorchUtils (CUDA-matched) when available."""
        missing = self.missingPackages()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MedDiffusion needs these Python packages: {packages}. Install them now? "
                  "(PyTorch is a large download.)").format(packages=", ".join(missing))):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils  # from the PyTorch extension
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    raise RuntimeError("PyTorch installation failed")
            except ImportError:
                self._pipInstall(["torch>=2.6"])
            missing.remove("torch")
        if missing:
            requirements = os.path.join(_HERE, "Resources", "requirements.txt")
            if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):  # Slicer >= 5.12
                slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirements),
                                            prompt_install=False, requester="MedDiffusion")
            else:
                with open(requirements) as fh:
                    self._pipInstall([line.strip() for line in fh if line.strip() and not line.startswith("#")])
        return not self.missingPackages()

    @staticmethod
    def _pipInstall(requirements: list[str]) -> None:
        slicer.util.pip_install(" ".join(f'"{r}"' for r in requirements))

    # -- shared machinery -------------------------------------------------------------------------
    @property
    def worker(self):
        if self._worker is None or not self._worker.alive:
            from MedDiffusionGlue.worker import Worker
            self._worker = Worker()
        return self._worker

    def generationPipeline(self, modelId: Optional[str] = None, weightsFolder: Optional[str] = None,
                           device: Optional[str] = None, mode: str = "fast"):
        """Cached pipeline; ``mode`` "fast" (default) or "reference" kernels (switched in place)."""
        from MedDiffusionLib.pipelines.generation import GenerationPipeline
        key = ("gen", modelId or None, weightsFolder or None, device or "auto")
        if key not in self._pipelines:
            self._pipelines[key] = GenerationPipeline.from_pretrained(modelId or None, weightsFolder or None, device,
                                                                      mode=mode)
        pipe = self._pipelines[key]
        if pipe.mode != mode:
            pipe.set_mode(mode)
        return pipe

    def controlledPipeline(self, controlNet: str, modelId: Optional[str] = None, weightsFolder: Optional[str] = None,
                           device: Optional[str] = None, mode: str = "fast"):
        from MedDiffusionLib.pipelines.conditioned import ControlledPipeline
        key = ("cn", controlNet, modelId or None, weightsFolder or None, device or "auto")
        if key not in self._pipelines:
            self._pipelines[key] = ControlledPipeline.from_files(controlNet, modelId or None, weightsFolder or None,
                                                                 device, mode=mode)
        pipe = self._pipelines[key]
        if pipe.mode != mode:
            pipe.set_mode(mode)
        return pipe

    @staticmethod
    def deviceInfo() -> str:
        if importlib.util.find_spec("torch") is None:
            return _("PyTorch is not installed yet")
        import torch
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return f"CUDA: {torch.cuda.get_device_name()} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
        return _("CPU only (no CUDA GPU found): fine for the bundled model, hours for released 256^3 models")

    @staticmethod
    def estimate(modelId: Optional[str], size: tuple[int, int, int], steps: int, device: str,
                 mode: str = "fast") -> tuple[float, str]:
        """(seconds, text) expected for one run before it starts: time, peak memory, decode plan."""
        from MedDiffusionLib.estimate import available_memory_bytes, estimate_run
        from MedDiffusionLib.registry import get_model
        from MedDiffusionLib.weights import bundled_ae_width
        entry = get_model(modelId or None)
        avail = available_memory_bytes(device)
        est = estimate_run(entry.raw, entry.compression, size, steps, device, mode,
                           n_hiddens=bundled_ae_width(entry), budget_bytes=None if avail is None else 0.8 * avail)
        return est.seconds, est.text(device)

    def _run(self, name: str, fn: Callable, blocking: bool, progressCallback, cancelEvent):
        """Run ``fn(progress, cancel)`` here (blocking) or on the worker thread (returns the job)."""
        if blocking:
            cancel = (cancelEvent.is_set if cancelEvent is not None else None)
            return fn(progressCallback, cancel)
        job = self.worker.submit(name, lambda j: fn(j.progress, j.cancelled))
        if cancelEvent is not None:
            job.cancel_event = cancelEvent
        return job

    # -- weights ------------------------------------------------------------------------------------
    def downloadModel(self, modelId: str, blocking: bool = True, progressCallback=None, cancelEvent=None):
        """Download a registry model's files into the Hugging Face cache (no-op for bundled models).
        Blocking: returns {role: path}; else a job."""
        def compute(progress, cancel):
            from MedDiffusionLib.registry import get_model
            from MedDiffusionLib.weights import download_file
            entry = get_model(modelId)
            paths = {}
            for i, spec in enumerate([] if entry.bundled else entry.files):
                if progress:
                    progress(i, len(entry.files))
                paths[spec["role"]] = str(download_file(entry, spec, progress=False))
            return ("download", entry.id, paths)

        result = self._run("download", compute, blocking, progressCallback, cancelEvent)
        return result[2] if blocking else result

    @staticmethod
    def verifyModel(modelId: str) -> list:
        """sha256 check of a model's files: [(role, state, detail)], state ok/unverified/missing/CORRUPT."""
        from MedDiffusionLib.registry import get_model
        from MedDiffusionLib.weights import verify
        return verify(get_model(modelId))

    # -- tasks: computation (any thread) -----------------------------------------------------------
    def _generateCompute(self, p: dict, progress, cancel):
        pipe = self.generationPipeline(p["modelId"], p["weightsFolder"], p["device"], p["mode"])
        return pipe.generate(p["classIndex"], p["size"], p["spacing"], p["seed"], p["sampler"],
                             p["steps"] if p["sampler"] not in (None, "ddpm") else None, p["numberOfVolumes"],
                             progress, cancel)

    # -- tasks: console API -----------------------------------------------------------------------
    def generate(self, modelId: Optional[str] = None, classIndex: Optional[int] = None, size=None, spacing=None,
                 seed: int = 0, sampler: Optional[str] = None, steps: Optional[int] = None, numberOfVolumes: int = 1,
                 huWindow=None, mapToHU: bool = True, weightsFolder: Optional[str] = None, device: Optional[str] = None,
                 progressCallback=None, cancelEvent: Optional[threading.Event] = None, blocking: bool = True,
                 mode: str = "fast"):
        """Generate volumes; blocking: returns the new volume nodes, else a job for :meth:`finishJob`.
        ``mode="reference"`` runs the plain kernels the parity tests pin (slower on the CPU)."""
        params = dict(modelId=modelId, weightsFolder=weightsFolder, classIndex=classIndex, size=size,
                      spacing=spacing, seed=seed, sampler=sampler, steps=steps, numberOfVolumes=numberOfVolumes,
                      device=device, mode=mode)
        result = self._run("generate", lambda pr, ca: ("generate", params, huWindow, mapToHU,
                                                       self._generateCompute(params, pr, ca)),
                           blocking, progressCallback, cancelEvent)
        return self.finishJob(result) if blocking else result

    def simulateSparseView(self, ctVolumeNode, views: int = 40, blocking: bool = True, progressCallback=None,
                           cancelEvent=None):
        """Full CT node (HU) -> new node with the FBP of a ``views``-view fan-beam scan."""
        from MedDiffusionGlue.geometry import node_to_volume
        arr, ijk_to_ras = node_to_volume(ctVolumeNode)

        def compute(progress, cancel):
            from MedDiffusionLib.data.volumes import Volume
            from MedDiffusionLib.pipelines.conditioned import simulate_sparse_view
            return ("volume", f"{ctVolumeNode.GetName()} FBP {views} views",
                    simulate_sparse_view(Volume(arr.astype("float32"), ijk_to_ras), views=views), (-1000.0, 1000.0))

        result = self._run("simulate", compute, blocking, progressCallback, cancelEvent)
        return self.finishJob(result) if blocking else result

    def reconstructSparseView(self, fbpVolumeNode, controlNet: str = "chest-ct-mini-sparse-view", seed: int = 0,
                              steps: int = 50, modelId=None, weightsFolder=None, device=None, blocking: bool = True,
                              progressCallback=None, cancelEvent=None, mode: str = "fast"):
        """Sparse-view FBP node (HU) -> reconstructed CT node on the same grid."""
        from MedDiffusionGlue.geometry import node_to_volume
        arr, ijk_to_ras = node_to_volume(fbpVolumeNode)

        def compute(progress, cancel):
            from MedDiffusionLib.data.volumes import Volume
            from MedDiffusionLib.pipelines.conditioned import reconstruct_sparse_view
            pipe = self.controlledPipeline(controlNet, modelId, weightsFolder, device, mode)
            out = reconstruct_sparse_view(Volume(arr.astype("float32"), ijk_to_ras), pipe, seed=seed, sampler="ddim",
                                          steps=steps, progress=progress, cancel=cancel)
            return ("volume", f"{fbpVolumeNode.GetName()} MedDiffusion recon", out, pipe.hu_window())

        result = self._run("reconstruct", compute, blocking, progressCallback, cancelEvent)
        return self.finishJob(result) if blocking else result

    def synthesizeFromSegmentation(self, segmentationNode, referenceVolumeNode, segmentLabels: dict,
                                   controlNet: str = "chest-ct-mini-labels", seed: int = 0, steps: int = 50,
                                   modelId=None, weightsFolder=None, device=None, blocking: bool = True,
                                   progressCallback=None, cancelEvent=None, mode: str = "fast"):
        """Segments (id -> model label value) rasterised on the reference grid -> synthetic CT node
        on that grid. The conditioning segmentation stays in the scene."""
        from MedDiffusionGlue.geometry import node_ijk_to_ras, segmentation_to_labels
        labels = segmentation_to_labels(slicer.mrmlScene, segmentationNode, referenceVolumeNode, segmentLabels)
        ijk_to_ras = node_ijk_to_ras(referenceVolumeNode)

        def compute(progress, cancel):
            from MedDiffusionLib.data.volumes import Volume
            from MedDiffusionLib.pipelines.conditioned import synthesize_from_labels
            pipe = self.controlledPipeline(controlNet, modelId, weightsFolder, device, mode)
            out = synthesize_from_labels(Volume(labels, ijk_to_ras), pipe, seed=seed, sampler="ddim", steps=steps,
                                         progress=progress, cancel=cancel)
            return ("volume", f"{segmentationNode.GetName()} synthetic CT seed{seed}", out, pipe.hu_window())

        result = self._run("synthesize", compute, blocking, progressCallback, cancelEvent)
        return self.finishJob(result) if blocking else result

    # -- results -> nodes (main thread only) ---------------------------------------------------------
    def finishJob(self, jobOrResult):
        """Create the result nodes. Call on the main thread; re-raises a failed job's exception."""
        from MedDiffusionGlue.geometry import hu_window_to_window_level, volume_to_node, window_level
        result = jobOrResult.wait(0) if hasattr(jobOrResult, "wait") else jobOrResult
        nodes = []
        if result[0] == "generate":
            _kind, params, hu_window, map_to_hu, volumes = result
            from MedDiffusionLib.registry import class_names
            pipe = self.generationPipeline(params["modelId"], params["weightsFolder"], params["device"],
                                           params.get("mode", "fast"))
            for res in volumes:
                window = hu_window
                if window is None and map_to_hu and pipe.entry is not None:
                    window = pipe.entry.class_info(res.class_index).get("hu_window")
                vol = res.volume(window)
                size = "x".join(str(s) for s in vol.shape)
                name = f"MedDiffusion {class_names()[res.class_index]} seed{res.seed + 0} {size}"
                if len(volumes) > 1:
                    name += f" #{res.meta.get('index', 0)}"
                node = volume_to_node(vol.array, vol.affine, slicer.mrmlScene, slicer.mrmlScene.GenerateUniqueName(name))
                node.CreateDefaultDisplayNodes()
                window_level(node, *(hu_window_to_window_level(*window) if window else (2.0, 0.0)))
                nodes.append(node)
        else:
            _kind, name, vol, hu_window = result
            node = volume_to_node(vol.array, vol.affine, slicer.mrmlScene, slicer.mrmlScene.GenerateUniqueName(name))
            node.CreateDefaultDisplayNodes()
            window_level(node, *hu_window_to_window_level(*hu_window))
            nodes.append(node)
        if nodes and slicer.app is not None and hasattr(slicer.util, "setSliceViewerLayers"):
            slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)
        return nodes if len(nodes) != 1 else nodes[0]


#
# Widget
#
class MedDiffusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None

    def setup(self) -> None:
        import qt
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedDiffusionLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._poll)

        self.ui.samplerComboBox.addItems(["ddpm", "ddim"])
        self.ui.deviceComboBox.addItems(["auto", "cpu", "cuda"])
        self._fillModels()
        def guarded(handler):
            """Slot wrapper: an exception before a job starts becomes an error dialog."""
            def slot(*_args):
                with slicer.util.tryWithErrorDisplay(_("MedDiffusion could not start."), waitCursor=False):
                    handler()
            return slot

        self.ui.modelComboBox.connect("currentIndexChanged(int)", guarded(self._onModelChanged))
        self.ui.downloadButton.connect("clicked(bool)", guarded(self._onDownload))
        self.ui.verifyButton.connect("clicked(bool)", guarded(self._onVerify))
        self.ui.generateButton.connect("clicked(bool)", guarded(self._onGenerate))
        self.ui.synthesizeButton.connect("clicked(bool)", guarded(self._onSynthesize))
        self.ui.simulateButton.connect("clicked(bool)", guarded(self._onSimulate))
        self.ui.reconstructButton.connect("clicked(bool)", guarded(self._onReconstruct))
        self.ui.cancelButton.connect("clicked(bool)", guarded(self._onCancel))
        self.ui.estimateButton.connect("clicked(bool)", guarded(self._updateEstimate))
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.ui.deviceLabel.text = MedDiffusionLogic.deviceInfo()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    # parameter node plumbing (template) ---------------------------------------------------------------
    def cleanup(self) -> None:
        self.removeObservers()
        if self._job is not None:
            self._job.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # model section ----------------------------------------------------------------------------------
    def _fillModels(self) -> None:
        from MedDiffusionLib.registry import models
        self.ui.modelComboBox.clear()
        for m in models():
            self.ui.modelComboBox.addItem(m.raw["title"], m.id)
        self._onModelChanged()

    def _currentModelId(self) -> str:
        return self.ui.modelComboBox.currentData or ""

    def _onModelChanged(self, *_args) -> None:
        from MedDiffusionLib.registry import get_model
        from MedDiffusionLib.weights import status
        model_id = self._currentModelId()
        if not model_id:
            return
        entry = get_model(model_id)
        st = status(entry)
        states = ", ".join(f"{role}: {s['state']}" for role, s in st.items())
        sizes = [s["size"] for s in st.values() if s["size"]]
        size = f"{sum(sizes) / 2**20:.0f} MiB" if sizes else _("size unknown")
        self.ui.modelInfoLabel.text = f"{states}; {size}; {_('licence')}: {entry.raw['license']}"
        self.ui.downloadButton.enabled = not entry.bundled
        self.ui.classComboBox.clear()
        for c in entry.raw["classes"]:
            self.ui.classComboBox.addItem(f"{c['index']} {c['name']}", c["index"])
        self.ui.sizePresetComboBox.clear()
        for c in entry.raw["classes"]:
            for s in c["sizes"]:
                label = "x".join(map(str, s["image_xyz"])) + " @ " + "x".join(f"{v:g}" for v in s["spacing_xyz"]) + " mm"
                self.ui.sizePresetComboBox.addItem(f"{c['name']}: {label}", s)
        if self._parameterNode:
            self._parameterNode.modelId = model_id
            defaults = entry.raw["defaults"]
            self._parameterNode.sampler = defaults["sampler"]

    def _onDownload(self) -> None:
        if not self._ensureDeps():
            return
        self._start(self.logic.downloadModel(self._currentModelId(), blocking=False))

    def _onVerify(self) -> None:
        rows = self.logic.verifyModel(self._currentModelId())
        slicer.util.infoDisplay("\n".join(f"{role}: {state} ({detail})" for role, state, detail in rows),
                                windowTitle=_("MedDiffusion: verify weights"))

    # tasks --------------------------------------------------------------------------------------------
    def _ensureDeps(self) -> bool:
        if self.logic.missingPackages():
            return self.logic.ensureDependencies(askConfirmation=True)
        return True

    def _size(self) -> tuple[int, int, int]:
        p = self._parameterNode
        preset = self.ui.sizePresetComboBox.currentData
        if self.ui.usePresetCheckBox.checked and preset:
            return tuple(preset["image_xyz"])
        return (p.sizeX, p.sizeY, p.sizeZ)

    def _spacing(self) -> tuple[float, float, float]:
        p = self._parameterNode
        preset = self.ui.sizePresetComboBox.currentData
        if self.ui.usePresetCheckBox.checked and preset:
            return tuple(preset["spacing_xyz"])
        return (p.spacingX, p.spacingY, p.spacingZ)

    LONG_CPU_RUN_SECONDS = 300

    def _updateEstimate(self) -> tuple[float, str]:
        if importlib.util.find_spec("torch") is None:
            self.ui.estimateLabel.text = _("install dependencies first (press Generate)")
            return 0.0, "cpu"
        p = self._parameterNode
        import torch
        device = p.device if p.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        steps = 1000 if p.sampler == "ddpm" else p.steps
        seconds, text = MedDiffusionLogic.estimate(self._currentModelId(), self._size(), steps, device,
                                                   self._mode())
        self.ui.estimateLabel.text = text
        return seconds, device

    def _mode(self) -> str:
        return "reference" if self._parameterNode.referenceKernels else "fast"

    def _onGenerate(self) -> None:
        if not self._ensureDeps():
            return
        p = self._parameterNode
        from MedDiffusionLib.pipelines.generation import legal_size
        from MedDiffusionLib.registry import get_model
        try:
            legal_size(self._size(), get_model(self._currentModelId()).compression)
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        seconds, device = self._updateEstimate()
        if device == "cpu" and seconds > self.LONG_CPU_RUN_SECONDS and not slicer.util.confirmOkCancelDisplay(
                _("No GPU will be used: this run takes {estimate}. Continue?").format(estimate=self.ui.estimateLabel.text)):
            return
        job = self.logic.generate(modelId=self._currentModelId(), classIndex=self.ui.classComboBox.currentData,
                                  size=self._size(), spacing=self._spacing(), seed=p.seed, sampler=p.sampler,
                                  steps=p.steps, numberOfVolumes=p.numberOfVolumes, mapToHU=p.mapToHU,
                                  weightsFolder=p.weightsFolder or None, device=p.device, blocking=False,
                                  mode=self._mode())
        self._start(job)

    def _onSynthesize(self) -> None:
        p = self._parameterNode
        if not p.segmentation or not p.referenceVolume:
            slicer.util.errorDisplay(_("Select a segmentation and a reference volume."))
            return
        if not self._ensureDeps():
            return
        mapping = self._segmentMapping()
        if not mapping:
            slicer.util.errorDisplay(_("Map at least one segment to a model label (e.g. Lung=1, Tumour=4)."))
            return
        self._start(self.logic.synthesizeFromSegmentation(p.segmentation, p.referenceVolume, mapping,
                                                          controlNet=p.labelsControlNet, seed=p.seed, steps=p.steps,
                                                          device=p.device, blocking=False, mode=self._mode()))

    def _segmentMapping(self) -> dict:
        """'Segment name=label' pairs from the mapping field; segment names are matched case-insensitively."""
        seg = self._parameterNode.segmentation.GetSegmentation()
        names = {seg.GetNthSegment(i).GetName().lower(): seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())}
        mapping = {}
        for item in self.ui.segmentMappingLineEdit.text.split(","):
            if "=" in item:
                name, value = item.rsplit("=", 1)
                sid = names.get(name.strip().lower())
                if sid is None:
                    raise ValueError(f"no segment named {name.strip()!r} in the segmentation")
                mapping[sid] = int(value)
        return mapping

    def _onSimulate(self) -> None:
        p = self._parameterNode
        if not p.fullCTVolume:
            slicer.util.errorDisplay(_("Select a full CT volume to simulate a sparse-view scan from."))
            return
        if not self._ensureDeps():
            return
        self._start(self.logic.simulateSparseView(p.fullCTVolume, views=p.views, blocking=False))

    def _onReconstruct(self) -> None:
        p = self._parameterNode
        if not p.fbpVolume:
            slicer.util.errorDisplay(_("Select the sparse-view FBP volume."))
            return
        if not self._ensureDeps():
            return
        self._start(self.logic.reconstructSparseView(p.fbpVolume, controlNet=p.sparseViewControlNet, seed=p.seed,
                                                     steps=p.steps, device=p.device, blocking=False,
                                                     mode=self._mode()))

    # job handling (main thread) -------------------------------------------------------------------------
    def _setBusy(self, busy: bool) -> None:
        for name in ("generateButton", "synthesizeButton", "simulateButton", "reconstructButton", "downloadButton"):
            getattr(self.ui, name).enabled = not busy
        self.ui.cancelButton.enabled = busy

    def _start(self, job) -> None:
        self._job = job
        self._setBusy(True)
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = _("starting {name} ...").format(name=job.name)
        self._timer.start()

    def _poll(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        if job.total:
            self.ui.progressBar.setMaximum(job.total)
            self.ui.progressBar.setValue(job.step)
            eta = job.eta_seconds()
            self.ui.statusLabel.text = f"{job.name}: step {job.step}/{job.total}" + (f", ETA {eta:.0f} s" if eta else "")
        if not job.done:
            return
        self._timer.stop()
        self._job = None
        self._setBusy(False)
        from MedDiffusionLib.schedulers import Cancelled
        if isinstance(job.error, Cancelled) or (job.cancelled() and job.error is None and job.result is None):
            self.ui.statusLabel.text = _("cancelled; the scene was left unchanged")
            return
        if job.error is not None:
            self.ui.statusLabel.text = _("failed: {error}").format(error=job.error)
            slicer.util.errorDisplay(_("MedDiffusion {name} failed: {error}").format(name=job.name, error=job.error),
                                     detailedText=job.error_details)
            return
        if job.result and job.result[0] == "download":
            self._onModelChanged()
            self.ui.statusLabel.text = _("downloaded {model}").format(model=job.result[1])
            return
        with slicer.util.tryWithErrorDisplay(_("Could not create the result nodes."), waitCursor=True):
            self.logic.finishJob(job)
            self.ui.statusLabel.text = _("{name} done in {seconds:.0f} s").format(name=job.name,
                                                                               seconds=job.finished - job.started)

    def _onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("cancelling after the current step ...")


#
# Test (runs inside Slicer with the bundled models on CPU)
#
class MedDiffusionTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_generate()
        self.test_sparse_view()
        self.test_synthesize()

    def _checkHU(self, node, lo=-1100, hi=3100):
        arr = slicer.util.arrayFromVolume(node)
        self.assertTrue(arr.min() >= lo and arr.max() <= hi, (arr.min(), arr.max()))

    def test_generate(self):
        logic = MedDiffusionLogic()
        node = logic.generate(seed=1, sampler="ddim", steps=20, device="cpu")
        self.assertEqual(node.GetImageData().GetDimensions(), (64, 64, 64))
        self.assertAlmostEqual(node.GetSpacing()[0], 4.8, places=3)
        self._checkHU(node)

    def _chestPhantom(self):
        import numpy as np
        zz, yy, xx = np.mgrid[0:64, 0:96, 0:96] - np.array([31.5, 47.5, 47.5])[:, None, None, None]
        hu = np.full((64, 96, 96), -1000.0, dtype=np.float32)
        body = (xx ** 2 / 44 ** 2 + yy ** 2 / 32 ** 2) < 1
        hu[body] = 40
        for cx in (-20, 20):
            hu[body & (((xx - cx) ** 2 / 14 ** 2 + yy ** 2 / 20 ** 2) < 1)] = -850
        node = slicer.util.addVolumeFromArray(hu, name="phantom")
        node.SetSpacing(3.0, 3.0, 4.0)
        return node

    def test_sparse_view(self):
        logic = MedDiffusionLogic()
        ct = self._chestPhantom()
        fbp = logic.simulateSparseView(ct, views=40)
        self.assertEqual(fbp.GetImageData().GetDimensions(), ct.GetImageData().GetDimensions())
        recon = logic.reconstructSparseView(fbp, steps=10, device="cpu")
        m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        ct.GetIJKToRASMatrix(m1)
        recon.GetIJKToRASMatrix(m2)
        self.assertTrue(all(abs(m1.GetElement(r, c) - m2.GetElement(r, c)) < 1e-6 for r in range(4) for c in range(4)))
        self._checkHU(recon)

    def test_synthesize(self):
        import numpy as np
        logic = MedDiffusionLogic()
        ct = self._chestPhantom()
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(ct)
        arr = slicer.util.arrayFromVolume(ct)
        lab = slicer.util.addVolumeFromArray((arr < -500).astype(np.uint8) * 1 + (arr > -500).astype(np.uint8) * 2,
                                             nodeClassName="vtkMRMLLabelMapVolumeNode")
        lab.CopyOrientation(ct)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(lab, seg)
        ids = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())]
        out = logic.synthesizeFromSegmentation(seg, ct, {ids[0]: 0, ids[1]: 2}, steps=10, device="cpu")
        self.assertEqual(out.GetImageData().GetDimensions(), ct.GetImageData().GetDimensions())
        self._checkHU(out)
