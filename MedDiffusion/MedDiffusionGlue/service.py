"""The module's logic as a thin client of the MedDiffusion job service (no Qt, no torch).

:class:`ServiceLogic` writes input nodes to temporary NRRD files, submits jobs to a local
(``LocalServer``) or remote service through ``MedDiffusionLib.client`` (standard library only),
polls them with short timeouts, and loads the result files as nodes on the calling (main)
thread. ``MedDiffusionLogic`` in ``MedDiffusion.py`` adds Slicer's application services to it.

Console use (the blocking forms poll until the job ends and return the new nodes)::

    logic = slicer.util.getModuleLogic("MedDiffusion")
    ct = logic.generate(seed=3, sampler="ddim", steps=50)
    job = logic.submitGenerate(seed=4)        # non-blocking; then logic.poll(job) / logic.finishJob(job)
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from MedDiffusionLib.client import (Client, JobCancelled, JobFailed, LocalServer, ServiceError,
                                    ServiceUnavailable)

from .nodes import InputError, check_scalar_volume, read_volume, remove_node, write_labels, write_volume

TERMINAL = ("done", "failed", "cancelled")
PREVIEW_NAME = "MedDiffusion preview"
CT_WINDOW = (-1000.0, 1000.0)  # display range for CT results in HU when nothing better is known
MODEL_UNITS_WINDOW = (-1.0, 1.0)

# What the library's messages call command-line flags, in the panel's words.
PANEL_WORDS = (
    ("give one with --hu-window LO HI", "untick \"Map CT to HU\""),
    ("--hu-window LO HI", "an HU window"),
    ("--weights FOLDER", "a weights folder on the server"),
    ("(or force it)", "(or choose a smaller size)"),
    ("--steps", "Steps"),
    ("--sampler", "Sampler"),
    ("--seed", "Seed"),
    ("--device", "Device"),
)


def panel_message(text: str | None) -> str:
    """A service error message with command-line flags replaced by the panel's control names."""
    text = text or "unknown error"
    for cli, panel in PANEL_WORDS:
        text = text.replace(cli, panel)
    return text


def default_python() -> str:
    """The interpreter a local server runs on: Slicer's ``PythonSlicer`` inside the application
    (the same environment the module's packages are installed into), else this interpreter."""
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            exe = shutil.which("PythonSlicer")
            if exe:
                return exe
    except ImportError:  # pragma: no cover - always importable where this module runs
        pass
    return sys.executable


@dataclass
class Job:
    """A submitted job as the module sees it: the service's status plus what is needed to turn
    the results into nodes (names and input captured on the main thread at submission)."""

    id: str
    task: str
    name: str
    like: Any = None  # the input node: results go under its transform, next to it in the hierarchy
    window: tuple[float, float] | None = None
    status: dict = field(default_factory=dict)
    workDir: str = ""
    nodes: list = field(default_factory=list)
    previewNode: Any = None
    previewStep: int | None = None
    finished: bool = False

    @property
    def state(self) -> str:
        return self.status.get("state", "queued")

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


class ServiceLogic:
    """Jobs on a MedDiffusion service from Slicer's main thread. ``scene`` defaults to
    ``slicer.mrmlScene``; ``segmentationsLogic`` to a private one (tests have no application)."""

    POLL_TIMEOUT_S = 0.1  # the longest a status request may block the GUI
    REQUEST_TIMEOUT_S = 30.0

    def __init__(self, scene=None, segmentationsLogic=None) -> None:
        self._scene = scene
        self.segmentationsLogic = segmentationsLogic
        self.server: LocalServer | None = None
        self.serverPython: str | None = None
        self.serverEnv: dict[str, str] | None = None
        self.remote: tuple[str, str] | None = None
        self._health: dict | None = None
        self.logCallback: Callable[[str], None] | None = None

    # -- where jobs run ------------------------------------------------------------------------------
    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    def useLocalServer(self, python: str | None = None, env: dict[str, str] | None = None) -> None:
        """Run jobs on a ``meddiffusion serve`` child process (started on first use) on ``python``
        (default: Slicer's own Python). A running server on another interpreter is stopped."""
        python = python or None
        if self.remote is None and (python, env) == (self.serverPython, self.serverEnv):
            return  # unchanged: keep the server and what it told us
        if self.server is not None:
            self.stopServer()
        self.serverPython, self.serverEnv, self.remote = python, env, None
        self._health = None

    def useRemoteServer(self, url: str, token: str) -> None:
        """Run jobs on a service started elsewhere (``meddiffusion serve`` on a GPU machine)."""
        if not url:
            raise InputError("enter the server address (http://HOST:PORT)")
        Client(url, token)  # validates the address
        if self.remote == (url, token):
            return
        self.stopServer()
        self.remote = (url, token)
        self._health = None

    @property
    def isLocal(self) -> bool:
        return self.remote is None

    def localServer(self) -> LocalServer:
        if self.server is None:
            self.server = LocalServer(python=self.serverPython or default_python(), env=self.serverEnv)
        return self.server

    def startServer(self, wait: bool = True, timeout: float = 120.0) -> None:
        """Start the local server (no-op for a remote one). ``wait=False`` returns at once."""
        if self.isLocal:
            self.localServer().start(wait=wait, timeout=timeout)

    def serverReady(self, timeout: float = POLL_TIMEOUT_S) -> bool:
        """A quick probe (at most ``timeout`` seconds)."""
        if self.isLocal:
            return self.server is not None and self.server.ready(timeout=timeout)
        try:
            self.client(timeout).health(timeout=timeout)
            return True
        except ServiceError:
            return False

    def serverLog(self) -> str:
        return self.server.log_tail() if self.server is not None else ""

    def stopServer(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._health = None

    def client(self, timeout: float | None = None, start: bool = True) -> Client:
        """A client of the current service. ``start``: start (or restart) the local server if it
        is not running (blocks until it answers); else raise ``ServiceUnavailable`` at once."""
        timeout = self.REQUEST_TIMEOUT_S if timeout is None else timeout
        if self.remote is not None:
            return Client(self.remote[0], self.remote[1], timeout)
        server = self.localServer()
        if not server.running:
            if not start:
                raise ServiceUnavailable("the local MedDiffusion service is not running" +
                                         (f":\n{server.log_tail()}" if server.log_tail() else ""))
            server.ensure()
        return server.client(timeout)

    def health(self, refresh: bool = False, timeout: float | None = None) -> dict:
        """The service's ``/v1/health`` (models, ControlNets, devices), cached until ``refresh``."""
        if self._health is None or refresh:
            self._health = self.client(timeout).health(timeout=timeout)
        return self._health

    def cachedHealth(self) -> dict | None:
        return self._health

    def unload(self) -> dict:
        """Free GPU memory: the service drops the models it keeps loaded."""
        return self.client().unload()

    # -- registry facts from the service ----------------------------------------------------------------
    def modelInfo(self, modelId: str | None = None) -> dict:
        models = self.health()["models"]
        if not models:
            raise ServiceError("the service offers no models")
        if not modelId:
            return next((m for m in models if m.get("bundled")), models[0])
        for m in models:
            if m["id"] == modelId:
                return m
        raise InputError(f"the service has no model {modelId!r}; it offers {', '.join(m['id'] for m in models)}")

    @staticmethod
    def classInfo(model: dict, classIndex: int | None) -> dict:
        index = model["defaults"]["class"] if classIndex is None else classIndex
        for c in model["classes"]:
            if c["index"] == index:
                return c
        raise InputError(f"model {model['id']!r} has no class {index}")

    def controlNetInfo(self, name: str) -> dict:
        for c in self.health().get("controlnets", []):
            if c["name"] == name:
                return c
        raise InputError(f"the service has no ControlNet {name!r}")

    # -- submitting ----------------------------------------------------------------------------------------
    def _newWorkDir(self) -> str:
        return tempfile.mkdtemp(prefix="meddiffusion-job-")

    def _submit(self, spec: dict, name: str, like=None, window=None, inputNode=None, labels=None) -> Job:
        """Write the input (a volume node, or ``labels`` = (segmentation, reference, mapping)),
        submit, and return the job. Inputs are written on this (main) thread."""
        work = self._newWorkDir()
        files = {}
        try:
            if inputNode is not None:
                files["input"] = write_volume(inputNode, os.path.join(work, "input.nrrd"), compress=not self.isLocal)
            elif labels is not None:
                seg, ref, mapping = labels
                files["input"] = write_labels(self.scene, seg, ref, mapping, os.path.join(work, "input.nrrd"),
                                              logic=self.segmentationsLogic, compress=not self.isLocal)
            if files:
                spec = dict(spec, inputs={"input": "input.nrrd"})
            status = self.client().submit(spec, files)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            for path in files.values():  # the upload is done: the service keeps its own copy
                if os.path.exists(path):
                    os.remove(path)
        job = Job(status["id"], spec["task"], name, like, window, status, work)
        self._log(f"submitted {job.task} job {job.id}")
        return job

    def submitGenerate(self, modelId: str | None = None, classIndex: int | None = None, size=None, spacing=None,
                       seed: int = 0, sampler: str | None = None, steps: int | None = None, numberOfVolumes: int = 1,
                       mapToHU: bool | None = None, huWindow=None, device: str = "auto", mode: str = "fast",
                       previewEvery: int = 0) -> Job:
        """Generate volumes from noise. ``size``/``spacing`` (X, Y, Z) default to the class's trained
        size; ``steps`` applies to ddim/dpm++ (DDPM always runs the model's full schedule);
        ``mapToHU`` None = map CT to HU when the model knows the class's HU window."""
        model = self.modelInfo(modelId)
        cls = self.classInfo(model, classIndex)
        if mapToHU is None:
            mapToHU = bool(cls.get("hu_window")) and huWindow is None
        if mapToHU and not cls.get("hu_window") and huWindow is None:
            raise InputError(f"the model does not know the HU range of class {cls['name']!r}: untick \"Map CT to HU\"")
        params = {"class": cls["index"], "size": list(size) if size else None,
                  "spacing": list(spacing) if spacing else None, "seed": int(seed), "sampler": sampler,
                  "steps": None if sampler == "ddpm" else steps, "num_volumes": int(numberOfVolumes),
                  "hu": bool(mapToHU), "hu_window": list(huWindow) if huWindow else None, "device": device,
                  "mode": mode, "preview_every": int(previewEvery)}
        window = tuple(huWindow) if huWindow else tuple(cls["hu_window"]) if mapToHU else MODEL_UNITS_WINDOW
        return self._submit({"task": "generate", "model": model["id"], "params": params},
                            f"MedDiffusion {cls['name']} seed{seed}", window=window)

    def submitSynthesize(self, segmentationNode, referenceVolumeNode, segmentLabels: dict,
                         controlNet: str = "chest-ct-mini-labels", seed: int = 0, steps: int | None = None,
                         device: str = "auto", mode: str = "fast", previewEvery: int = 0) -> Job:
        """Synthesize CT from segments (segment id -> model label value) on the reference grid."""
        if segmentationNode is None:
            raise InputError("select a segmentation")
        check_scalar_volume(referenceVolumeNode, "reference volume")
        params = {"seed": int(seed), "sampler": "ddim", "steps": steps, "device": device, "mode": mode,
                  "preview_every": int(previewEvery)}
        return self._submit({"task": "synthesize", "controlnet": controlNet, "params": params},
                            f"{segmentationNode.GetName()} synthetic CT seed{seed}", like=referenceVolumeNode,
                            window=self._controlNetWindow(controlNet),
                            labels=(segmentationNode, referenceVolumeNode, segmentLabels))

    def submitReconstruct(self, fbpVolumeNode, controlNet: str = "chest-ct-mini-sparse-view", seed: int = 0,
                          steps: int | None = None, device: str = "auto", mode: str = "fast",
                          previewEvery: int = 0) -> Job:
        """Reconstruct CT from a sparse-view FBP volume (HU); the result is on the FBP's grid."""
        check_scalar_volume(fbpVolumeNode, "sparse-view FBP volume")
        params = {"seed": int(seed), "sampler": "ddim", "steps": steps, "device": device, "mode": mode,
                  "preview_every": int(previewEvery)}
        return self._submit({"task": "reconstruct", "controlnet": controlNet, "params": params},
                            f"{fbpVolumeNode.GetName()} MedDiffusion recon", like=fbpVolumeNode,
                            window=self._controlNetWindow(controlNet), inputNode=fbpVolumeNode)

    def submitSimulate(self, ctVolumeNode, views: int = 40) -> Job:
        """Simulate the FBP of a ``views``-view fan-beam scan of a full CT (HU)."""
        check_scalar_volume(ctVolumeNode, "full CT volume")
        return self._submit({"task": "simulate-sparse-view", "params": {"views": int(views)}},
                            f"{ctVolumeNode.GetName()} FBP {views} views", like=ctVolumeNode, window=CT_WINDOW,
                            inputNode=ctVolumeNode)

    def _controlNetWindow(self, name: str) -> tuple[float, float]:
        try:
            window = self.controlNetInfo(name).get("hu_window")
        except (InputError, ServiceError):
            window = None
        return tuple(window) if window else CT_WINDOW

    # -- following a job (main thread) --------------------------------------------------------------------
    def poll(self, job: Job, timeout: float = POLL_TIMEOUT_S) -> dict:
        """Refresh ``job.status`` with one short request (raises ``ServiceUnavailable`` on timeout)."""
        job.status = self.client(timeout, start=False).status(job.id, timeout=timeout)
        return job.status

    def cancel(self, job: Job) -> dict:
        """Ask the service to stop the job (it stops between sampler steps); keep polling."""
        job.status = self.client(self.POLL_TIMEOUT_S * 20, start=False).cancel(job.id)
        return job.status

    def updatePreview(self, job: Job) -> Any:
        """Show the service's latest live preview in a temporary volume node; returns it or None."""
        step = job.status.get("preview_step")
        if step is None or step == job.previewStep or job.done:
            return job.previewNode
        path = os.path.join(job.workDir, "preview.nrrd")
        if self.client(start=False).preview(job.id, path) is None:
            return job.previewNode
        job.previewNode = read_volume(self.scene, path, PREVIEW_NAME, like=job.like, window=job.window,
                                      node=job.previewNode)
        job.previewStep = step
        return job.previewNode

    def finishJob(self, job: Job) -> list:
        """For a finished job: download the results, load them as nodes and clean up. Raises
        ``JobFailed`` (with the service's message in the panel's words) or ``JobCancelled``."""
        if job.finished:
            return job.nodes
        try:
            if job.state == "failed":
                raise JobFailed(panel_message(job.status.get("error")), None)
            if job.state == "cancelled":
                raise JobCancelled("the job was cancelled; the scene was left unchanged", None)
            if job.state != "done":
                raise ServiceError(f"job {job.id} is still {job.state}")
            client = self.client(start=False)
            results = job.status.get("results") or []
            for i, res in enumerate(results):
                path = client.download(job.id, res["name"], os.path.join(job.workDir, res["name"]))
                name = job.name if len(results) == 1 else f"{job.name} #{i}"
                job.nodes.append(read_volume(self.scene, path, name, like=job.like, window=self._window(job, res)))
                os.remove(path)
        finally:
            job.finished = True
            self._discard(job)
        return job.nodes

    @staticmethod
    def _window(job: Job, result: dict) -> tuple[float, float] | None:
        meta = result.get("meta") or {}
        if meta.get("hu_window"):
            return tuple(meta["hu_window"])
        if str(meta.get("units", "")).startswith("model units"):
            return MODEL_UNITS_WINDOW
        return job.window

    def _discard(self, job: Job) -> None:
        """Remove the preview node, the job's files here and its files on the service."""
        if job.previewNode is not None:
            remove_node(self.scene, job.previewNode)
            job.previewNode = None
        shutil.rmtree(job.workDir, ignore_errors=True)
        try:
            self.client(self.POLL_TIMEOUT_S * 20, start=False).delete(job.id)
        except ServiceError:
            pass  # the service expires finished jobs by itself

    def waitJob(self, job: Job, progressCallback: Callable[[dict], None] | None = None, poll: float = 0.25,
                timeout: float | None = None):
        """Poll until the job ends, then load its results: the new node (or a list of nodes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.poll(job, timeout=self.REQUEST_TIMEOUT_S)
            if progressCallback is not None:
                progressCallback(status)
            if job.done:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(job)
                raise ServiceError(f"job {job.id} did not finish within {timeout} s (cancelled)")
            self._idle(poll)
        nodes = self.finishJob(job)
        return nodes[0] if len(nodes) == 1 else nodes

    def _idle(self, seconds: float) -> None:
        time.sleep(seconds)

    def _log(self, text: str) -> None:
        if self.logCallback is not None:
            self.logCallback(text)

    # -- blocking console API --------------------------------------------------------------------------------
    def generate(self, progressCallback=None, timeout: float | None = None, **kwargs):
        """Blocking :meth:`submitGenerate`: returns the new volume node (a list for several)."""
        return self.waitJob(self.submitGenerate(**kwargs), progressCallback, timeout=timeout)

    def synthesizeFromSegmentation(self, segmentationNode, referenceVolumeNode, segmentLabels: dict,
                                   progressCallback=None, timeout: float | None = None, **kwargs):
        """Blocking :meth:`submitSynthesize`: returns the synthetic CT node on the reference grid."""
        job = self.submitSynthesize(segmentationNode, referenceVolumeNode, segmentLabels, **kwargs)
        return self.waitJob(job, progressCallback, timeout=timeout)

    def reconstructSparseView(self, fbpVolumeNode, progressCallback=None, timeout: float | None = None, **kwargs):
        """Blocking :meth:`submitReconstruct`: returns the reconstructed CT node."""
        return self.waitJob(self.submitReconstruct(fbpVolumeNode, **kwargs), progressCallback, timeout=timeout)

    def simulateSparseView(self, ctVolumeNode, views: int = 40, progressCallback=None, timeout: float | None = None):
        """Blocking :meth:`submitSimulate`: returns the FBP node on the CT's grid."""
        return self.waitJob(self.submitSimulate(ctVolumeNode, views), progressCallback, timeout=timeout)


def segment_mapping(segmentationNode, text: str) -> dict:
    """``"Name=value, ..."`` -> {segment id: value}; names match segment names case-insensitively.
    Names not present in the segmentation are skipped; a malformed item is refused."""
    seg = segmentationNode.GetSegmentation()
    ids = {seg.GetNthSegment(i).GetName().strip().lower(): seg.GetNthSegmentID(i)
           for i in range(seg.GetNumberOfSegments())}
    mapping = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise InputError(f"{item.strip()!r} is not Segment=label (e.g. Lung=1)")
        name, value = item.rsplit("=", 1)
        try:
            label = int(value)
        except ValueError:
            raise InputError(f"{item.strip()!r}: the label must be a whole number") from None
        sid = ids.get(name.strip().lower())
        if sid is not None:
            mapping[sid] = label
    if not mapping:
        raise InputError("no segment of the segmentation is named in the mapping (e.g. Lung=1, Bone=3)")
    return mapping


__all__ = ["ServiceLogic", "Job", "panel_message", "default_python", "segment_mapping", "InputError",
           "ServiceError", "ServiceUnavailable", "JobFailed", "JobCancelled", "TERMINAL", "PREVIEW_NAME"]
