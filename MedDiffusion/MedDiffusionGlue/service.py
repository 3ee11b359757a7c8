"""The module's logic as a thin client of the MedDiffusion job service (no Qt, no torch).

:class:`ServiceLogic` encodes input nodes as NRRD from memory in short steps (gzip-compressed
piece by piece for a remote service), submits jobs to a local (``LocalServer``) or remote service
through ``MedDiffusionLib.client`` (standard library only), polls them with short timeouts, and
reads the result files into memory in short steps before making each node in one cheap call, all
on the calling (main) thread. ``MedDiffusionLogic`` in ``MedDiffusion.py`` adds Slicer's application services to it.

Nothing here blocks the calling thread for longer than about :data:`POLL_BUDGET_S` once the
service answers: uploads, status requests, previews and downloads are ``Transfer`` objects of the
client moved on in short steps by :meth:`ServiceLogic.poll` (from the panel's ``QTimer``), and a
local server is started (or restarted) without waiting and probed by :meth:`ServiceLogic.connectStep`.
A job goes through ``uploading`` -> ``queued``/``running`` (the service's states) -> ``downloading``
-> ``done`` (or ``failed``/``cancelled``), with nothing added to the scene unless it is ``done``.

Console use (the blocking forms step until the job ends and return the new nodes)::

    logic = slicer.util.getModuleLogic("MedDiffusion")
    ct = logic.generate(seed=3, sampler="ddim", steps=50)
    job = logic.submitGenerate(seed=4)        # non-blocking; then logic.poll(job) until job.done
    nodes = logic.finishJob(job)              # the nodes (or raises JobFailed / JobCancelled)
    logic.reproduce(ct)                       # re-run the job ct's mark records: {"equal": True, "max_abs": 0.0, ...}
    logic.reproduce(recon, fbp)               # a conditioned result: with its input (sha256 checked)
    logic.exportVolume(ct, "/tmp/ct_dicom", format="dicom")  # a marked DICOM series (meddiffusion export, a child)
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from MedDiffusionLib.client import (Client, JobCancelled, JobFailed, LocalServer, ServiceError,
                                    ServiceUnavailable, Transfer)

from .nodes import (InputError, NrrdEncoder, NrrdLoader, StepwiseFileWriter, check_scalar_volume, labels_encoder,
                    propose_segment_mapping, read_volume, remove_node, unmapped_segments, volume_from_array)
from .outputs import (PROVENANCE_ATTRIBUTE, VoxelDifference, VoxelSha256, add_sample, browse_samples, export_volume,
                      mark_synthetic, metadata_fields, metrics_chart, metrics_table, new_sample_sequence,
                      node_provenance, nrrd_with_fields, read_standalone, show_chart, show_uncertainty,
                      standalone_volume, style_std)

TERMINAL = ("done", "failed", "cancelled")
PREVIEW_NAME = "MedDiffusion preview"
CT_WINDOW = (-1000.0, 1000.0)  # display range for CT results in HU when nothing better is known
MODEL_UNITS_WINDOW = (-1.0, 1.0)

FIELD_PREFIX = re.compile(r"^([a-z][a-z_]*): ")
# The panel's control for each request field: the service leads a message about one field with its
# name ("steps: ..."), and the panel words it as its control.
PANEL_CONTROLS = {"steps": "Steps", "sampler": "Sampler", "seed": "Seed", "device": "Run on", "class": "Class",
                  "size": "Size X, Y, Z", "spacing": "Spacing (mm)", "num_volumes": "Number of volumes", "hu": "Map CT to HU",
                  "hu_window": "Map CT to HU", "preview_every": "Live preview every", "mode": "Reference kernels"}
# What some library messages (model management, memory advice) say for the command line, in the panel's words.
PANEL_WORDS = (
    ("--weights FOLDER", "a weights folder on the server"),
    ("(or force it: force=true)", "(or choose a smaller size)"),
)


def panel_message(text: str | None) -> str:
    """A service error message in the panel's words: a leading request field becomes the control's
    name, command-line phrases the panel's."""
    text = text or "unknown error"
    m = FIELD_PREFIX.match(text)  # MedDiffusionLib.errors.FIELD_PREFIX: the module imports only the client
    if m and m.group(1) in PANEL_CONTROLS:
        text = f"{PANEL_CONTROLS[m.group(1)]}: {text[m.end():]}"
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


# The label convention of the bundled labels ControlNet (``ct_labels_from_hu``: 0 air, 1 lung, 2 soft
# tissue, 3 bone, 4 tumour), used where the service lists a ControlNet's label values without names.
DEFAULT_LABEL_NAMES = {0: "Air", 1: "Lung", 2: "Soft tissue", 3: "Bone", 4: "Tumour"}


class UnmappedSegmentsError(InputError):
    """Segments of the segmentation have no model label; ``segments``: [(segment id, name)]."""

    def __init__(self, message: str, segments: list) -> None:
        super().__init__(message)
        self.segments = segments


def controlnet_label_names(info: dict) -> dict:
    """{label value: name} of a labels ControlNet as the service's health lists it
    (``label_values``, and ``label_names`` as a list or {value: name} where the service gives
    them); values without a name get the bundled convention's name (:data:`DEFAULT_LABEL_NAMES`)
    when they all belong to it, else "Label N"."""
    values = [int(v) for v in (info.get("label_values") or [])]
    names = info.get("label_names")
    if isinstance(names, dict):
        given = {int(k): str(v) for k, v in names.items()}
    elif isinstance(names, (list, tuple)) and len(names) == len(values):
        given = {v: str(n) for v, n in zip(values, names)}
    else:
        given = {}
    conventional = all(v in DEFAULT_LABEL_NAMES for v in values)
    return {v: given.get(v) or (DEFAULT_LABEL_NAMES[v] if conventional else f"Label {v}") for v in values}


POLL_BUDGET_S = 0.05  # the longest one poll() moves a job on (the GUI stays responsive)
MAX_SAMPLES = 16  # samples of one synthesize / reconstruct job (MedDiffusionLib.jobspec.MAX_SAMPLES)
START_TIMEOUT_S = 180.0  # how long a starting local server may take to answer

# -- reproduce: what MedDiffusionLib.jobspec and MedDiffusionLib.reproduce say, written out (Slicer's process
# imports only the library's client); Testing/tests/test_slicer_reproduce.py checks that both say the same
_SAMPLING_PARAMS = ("seed", "sampler", "steps", "device", "mode", "precision", "tiling", "max_memory_gb",
                    "preview_every", "force")
TASK_PARAMS = {  # the parameters each task takes (jobspec.TASK_PARAMS; evaluate makes no volume to reproduce)
    "generate": ("class", "size", "spacing", "num_volumes", "seeds", "hu", "hu_window", "compile", *_SAMPLING_PARAMS),
    "synthesize": ("num_samples", *_SAMPLING_PARAMS),
    "reconstruct": ("num_samples", *_SAMPLING_PARAMS),
    "simulate-sparse-view": ("views", "bins", "device", "force"),
}
MODEL_UNITS_TOLERANCE = 5e-3  # reproduce.MODEL_UNITS_TOLERANCE: the parity tolerance of the DDIM loop, model units
DEFAULT_HU_WINDOW = (-1000.0, 1000.0)  # reproduce.DEFAULT_HU_WINDOW: when a result records no window
SIMULATION_TOLERANCE_HU = 1e-2  # reproduce.SIMULATION_TOLERANCE_HU: a deterministic FBP, float rounding only


def reproduce_tolerance(prov: dict) -> float:
    """How far a re-run may be from the result and still be the same (``MedDiffusionLib.reproduce``'s
    rule): 1e-2 HU for simulate-sparse-view; 5e-3 model units, scaled to HU by the result's HU window
    (default 2000 HU wide: 5 HU), for a result in HU; else 5e-3."""
    task = prov.get("task") or (prov.get("job") or {}).get("task")
    if task == "simulate-sparse-view":
        return SIMULATION_TOLERANCE_HU
    if prov.get("units") == "HU":
        lo, hi = prov.get("hu_window") or DEFAULT_HU_WINDOW
        return MODEL_UNITS_TOLERANCE * (float(hi) - float(lo)) / 2.0
    return MODEL_UNITS_TOLERANCE


def recorded_request(prov: dict, device: str | None = None) -> dict:
    """The job request a result's provenance records (``job``: task, model, weights, ControlNet,
    output format, the resolved parameters), as the service takes it: only the task's own
    parameters (:data:`TASK_PARAMS`; resolution filled in the others), no live preview, ``device``
    in place of the recorded one when given. Raises ``InputError`` when it records no job."""
    job = prov.get("job") if isinstance(prov, dict) else None
    if not isinstance(job, dict) or not isinstance(job.get("params"), dict) or job.get("task") not in TASK_PARAMS:
        raise InputError("the result's provenance records no job to re-run (made by an older MedDiffusion or "
                         "another tool)")
    params = {k: v for k, v in job["params"].items() if k in TASK_PARAMS[job["task"]]}
    if "preview_every" in params:
        params["preview_every"] = 0  # previews change nothing in the result, and a reproduce adds no node
    if device:
        params["device"] = device
    spec = {k: job.get(k) for k in ("task", "model", "weights", "controlnet", "output_format")
            if job.get(k) is not None}
    spec["params"] = params
    return spec


class WrongInput(ServiceError, InputError):
    """The input given to reproduce a result is not the volume the result was made from."""


class CheckedUpload:
    """An :class:`EncodedUpload` that first checks, in short steps, that the input's voxels have the
    sha256 the result's provenance records (:class:`~outputs.VoxelSha256`): a different input ends
    it with :class:`WrongInput` before anything is sent. Same interface as the upload."""

    def __init__(self, upload: EncodedUpload, hasher: VoxelSha256, expected: str, what: str) -> None:
        self.upload, self.hasher, self.expected, self.what = upload, hasher, str(expected), what
        self.paths = upload.paths
        self._error: ServiceError | None = None

    @property
    def phase(self) -> str:
        return "checking" if not self.hasher.done else self.upload.phase

    @property
    def done(self) -> bool:
        return self._error is not None or self.upload.done

    @property
    def result(self) -> Any:
        return None if self._error is not None else self.upload.result

    @property
    def error(self) -> ServiceError | None:
        return self._error or self.upload.error

    @property
    def sent(self) -> int:
        return self.upload.sent

    @property
    def total(self) -> int | None:
        return self.upload.total

    def step(self, budget_s: float = POLL_BUDGET_S) -> bool:
        deadline = time.monotonic() + max(0.0, budget_s)
        if self.done:
            return True
        if not self.hasher.done:
            if not self.hasher.step(budget_s):
                return False
            if self.hasher.hexdigest != self.expected:
                self.upload.cancel()
                self._error = WrongInput(
                    f"{self.what} is not the volume this result was made from (its voxels' sha256 is "
                    f"{self.hasher.hexdigest[:12]}..., the result records {self.expected[:12]}...)")
                return True
        return self.upload.step(max(0.0, deadline - time.monotonic()))

    def cancel(self) -> None:
        self.upload.cancel()


def reproduce_text(name: str, report: dict) -> str:
    """A reproduce verdict in one line (the panel's status line)."""
    units = report.get("units")
    unit = " HU" if units == "HU" else " (model units)" if units else ""
    if report["equal"]:
        text = (f"reproduced {name}: the re-run equals it within {report['tolerance']:.4g}{unit} "
                f"(max |difference| {report['max_abs']:.4g}, mean {report['mean_abs']:.4g})")
    else:
        text = (f"DIFFERENT: {name} and its re-run differ by up to {report['max_abs']:.4g}{unit} (mean "
                f"{report['mean_abs']:.4g}), over the tolerance of {report['tolerance']:.4g}")
    return "; ".join([text] + list(report.get("notes") or []))


def library_parent() -> str:
    """The folder holding MedDiffusionLib (what ``LocalServer`` puts first on the server's PYTHONPATH)."""
    import MedDiffusionLib.client

    return os.path.dirname(os.path.dirname(os.path.realpath(MedDiffusionLib.client.__file__)))


class DicomExport:
    """A marked volume node written as a marked DICOM series, without blocking the calling thread:
    the node's NRRD with its mark (:func:`~outputs.export_volume`'s fields, uncompressed) is written
    to a temporary folder in short steps, then ``<python> -m MedDiffusionLib.cli export TMP --format
    dicom --out FOLDER`` runs as a child process (its own process group, like the server) on the
    service's Python, which writes the series (``MedDiffusionLib.io.dicom``: DERIVED\\SECONDARY, new
    UIDs, the provenance in a private block). :meth:`poll` moves it on and returns the exit code once
    it is over (0: written; else ``error`` is the child's one-line message); :meth:`cancel` stops it.
    The temporary folder is removed at the end either way."""

    def __init__(self, node, folder: str, python: str, env: dict | None = None, overwrite: bool = False) -> None:
        check_scalar_volume(node, "volume to export")
        prov = node_provenance(node)
        if not (prov and prov.get("synthetic")):
            raise InputError(f"DICOM export is for MedDiffusion results: {node.GetName()!r} has no synthetic mark")
        folder = os.path.abspath(str(folder))
        if not os.path.basename(folder):
            raise InputError(f"{folder}: give the name of a folder for the DICOM series")
        if not os.path.isdir(os.path.dirname(folder)):
            raise InputError(f"the folder {os.path.dirname(folder)} does not exist")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InputError(f"{folder} is a file; the DICOM series needs a folder there")
        if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
            raise InputError(f"{folder} already exists and is not empty: choose another folder for the DICOM series")
        self.node, self.folder, self.python, self.overwrite = node, folder, str(python), bool(overwrite)
        env = dict(env or {})
        inherited = env["PYTHONPATH"] if "PYTHONPATH" in env else os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (library_parent(), inherited or "") if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.env = env
        self.work = tempfile.mkdtemp(prefix="meddiffusion-dicom-")
        try:
            self.source = os.path.join(self.work, "volume.nrrd")
            encoder = NrrdEncoder(node, self.work, compress=False)
            encoder.header = nrrd_with_fields(encoder.header, metadata_fields(prov))
            self._writer: StepwiseFileWriter | None = StepwiseFileWriter(encoder, self.source)
        except BaseException:
            shutil.rmtree(self.work, ignore_errors=True)
            raise
        self.command = [self.python, "-m", "MedDiffusionLib.cli", "export", self.source, "--format", "dicom",
                        "--out", self.folder] + (["--overwrite"] if self.overwrite else [])
        self.log_file = os.path.join(self.work, "export.log")
        self.process = None  # the child (dependencies.InstallProcess) once the NRRD is written
        self.rc: int | None = None
        self.error: str | None = None
        self.output = ""  # the child's last lines

    @property
    def phase(self) -> str:
        return "writing" if self.process is None and self.rc is None else "converting" if self.rc is None else "done"

    def poll(self, budget: float = POLL_BUDGET_S) -> int | None:
        """One non-blocking step; the exit code once the export is over (0: the series is written)."""
        if self.rc is not None:
            return self.rc
        if self.process is None:
            try:
                if not self._writer.step(budget):
                    return None
                self._writer.close()
                from .dependencies import InstallProcess

                self.process = InstallProcess([self.command], self.log_file, env=self.env)
            except OSError as exc:
                return self._finish(1, f"could not write the volume for the export: {exc}")
        rc = self.process.poll()
        if rc is None:
            return None
        lines = [ln for ln in self.process.tail(20).splitlines() if ln.strip() and not ln.startswith("$ ")]
        self.output = "\n".join(lines)
        if rc == 0:
            return self._finish(0, None)
        error = next((ln for ln in reversed(lines) if ln.startswith("error: ")), None)
        error = error[len("error: "):] if error else (lines[-1] if lines else f"exit code {rc}")
        return self._finish(rc, error.replace("--overwrite", "overwrite=True"))

    def _finish(self, rc: int, error: str | None) -> int:
        self.rc, self.error = rc, error
        if self._writer is not None:
            self._writer.close()
        shutil.rmtree(self.work, ignore_errors=True)
        return rc

    @property
    def done(self) -> bool:
        return self.rc is not None

    def cancel(self) -> None:
        """Stop the export (the child and what it started). The library writes the series into a
        hidden folder beside the target (``.<name>.<pid>-...tmp``), renamed only when complete; a
        killed child cannot remove it, so it is removed here: nothing half-written is left."""
        if self.rc is not None:
            return
        if self.process is not None:
            self.process.kill()
            parent, name = os.path.split(self.folder)
            for left in glob.glob(os.path.join(glob.escape(parent), "." + glob.escape(name[:100]) + ".*.tmp")):
                shutil.rmtree(left, ignore_errors=True)
        self._finish(-1, "the export was cancelled")

    def wait(self, timeout: float | None = None, idle: Callable[[float], None] | None = None) -> str:
        """Block until done (console use); returns the folder, raises ``InputError`` with the child's message."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                self.cancel()
                raise InputError(f"the DICOM export did not finish within {timeout} s (stopped)")
            (idle or time.sleep)(0.05)
        if self.rc != 0:
            raise InputError(f"the DICOM export failed: {self.error}")
        return self.folder


def _logic_or_class(func):
    """A ServiceLogic method that may also be called on the class (``ServiceLogic.exportVolume(node,
    path)``): there ``self`` is None."""

    class Method:
        __doc__ = func.__doc__

        def __get__(self, obj, objtype=None):
            bound = functools.partial(func, obj)
            bound.__doc__ = func.__doc__
            return bound

    return Method()


class EncodedUpload:
    """A job submission whose input NRRDs are encoded from the nodes' voxels in memory, in short
    steps on the calling (main) thread, with the interface of the client's ``Transfer`` (``step``,
    ``cancel``, ``done``, ``result``, ``error``, ``sent``, ``total``).

    ``inputs``: {upload field name: (encoder, path)}, e.g. ``{"input": (encoder, ".../input.nrrd")}``
    (the evaluate task uploads ``prediction`` and ``reference``); the file name sent is the path's.

    Uncompressed (a local server): the multipart body is produced piece by piece as the socket takes
    it (its length is known from the headers and the voxel counts). Compressed (a remote server): the
    length is known only once compressed, so each gzip NRRD is first written to the job's folder
    piece by piece (``encoding``), then all are sent like any input files (``client.start_submit``)."""

    def __init__(self, client: Client, spec: dict, inputs: dict) -> None:
        self.client, self.spec, self.inputs = client, spec, dict(inputs)
        self.paths = [path for _, path in self.inputs.values()]
        self.done = False
        self.result: Any = None
        self.error: ServiceError | None = None
        self.cancelled = False
        self.writers: list[StepwiseFileWriter] = []
        self.transfer: Transfer | None = None
        if any(encoder.compress for encoder, _ in self.inputs.values()):
            self.writers = [StepwiseFileWriter(encoder, path) for encoder, path in self.inputs.values()]
        else:
            headers, length, body = self._multipart(spec, self.inputs)
            self.transfer = Transfer(client, "POST", "/jobs", body=body, length=length, headers=headers)

    @staticmethod
    def _multipart(spec: dict, inputs: dict):
        """The body ``client.start_submit(spec, {name: file, ...})`` sends, with each file's bytes
        from ``encoder.blocks()`` (the same parts, in the same form, as ``_multipart`` of the client)."""
        boundary = uuid.uuid4().hex
        spec_part = (f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n'
                     "Content-Type: application/json\r\n\r\n").encode() + json.dumps(spec).encode() + b"\r\n"
        heads = [(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                  f'filename="{os.path.basename(path)}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
                 for name, (_, path) in inputs.items()]
        tail = f"--{boundary}--\r\n".encode()
        length = len(spec_part) + len(tail) + sum(len(head) + encoder.length + 2
                                                  for head, (encoder, _) in zip(heads, inputs.values()))

        def body():
            yield spec_part
            for head, (encoder, _) in zip(heads, inputs.values()):
                yield head
                yield from encoder.blocks()
                yield b"\r\n"
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
        return headers, length, body()

    @property
    def phase(self) -> str:
        return "encoding" if self.transfer is None else "sending"

    @property
    def sent(self) -> int:
        return self.transfer.sent if self.transfer is not None else 0

    @property
    def total(self) -> int | None:
        if self.transfer is not None:
            return self.transfer.total
        # not sent yet: a cancel drops it
        return sum(len(encoder.header) + encoder.raw_bytes for encoder, _ in self.inputs.values())

    def step(self, budget_s: float = POLL_BUDGET_S) -> bool:
        deadline = time.monotonic() + max(0.0, budget_s)
        if self.done:
            return True
        if self.transfer is None:
            try:
                for writer in self.writers:
                    if not writer.done and not writer.step(max(0.0, deadline - time.monotonic())):
                        return False
                self.transfer = self.client.start_submit(self.spec, {name: path for name, (_, path)
                                                                     in self.inputs.items()})
            except ServiceError as exc:
                return self._finish(error=exc)
            except OSError as exc:
                return self._finish(error=ServiceError(f"could not encode the input: {exc}"))
        if self.transfer.step(max(0.0, deadline - time.monotonic())):
            self._finish(self.transfer.result, self.transfer.error)
        return self.done

    def cancel(self) -> None:
        if self.done:
            return
        self.cancelled = True
        if self.transfer is not None:
            self.transfer.cancel()
        self._finish(error=ServiceError("the transfer was cancelled"))

    def _finish(self, result: Any = None, error: ServiceError | None = None) -> bool:
        self.done, self.result, self.error = True, result, error
        for writer in self.writers:
            writer.close()
        return True


def markSynthetic(node, provenance) -> None:
    """Mark a result node with the service's provenance (MedDiffusionLib.provenance): one node
    attribute per field (``MedDiffusion.provenance.<field>``, JSON value; saved with the scene);
    the node's name says "(synthetic)" (set where the node is made). See :func:`outputs.mark_synthetic`."""
    mark_synthetic(node, provenance)


@dataclass
class Job:
    """A submitted job as the module sees it: the service's status plus what is needed to turn
    the results into nodes (names and input captured on the main thread at submission).

    ``phase``: ``uploading`` -> ``service`` (queued/running on the service) -> ``downloading`` ->
    ``cleanup`` (the service's copy is deleted) -> ``finished``; ``error`` is set when it ended
    without results (:class:`JobFailed`, :class:`JobCancelled` or a :class:`ServiceError`)."""

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
    phase: str = "uploading"
    error: ServiceError | None = None
    transfer: Any = None  # the upload, the current status request or download, or the delete
    previewTransfer: Any = None
    cancelTransfer: Any = None
    downloaded: int = 0  # results loaded so far
    cancelRequested: bool = False
    sceneClosed: bool = False  # the scene was closed during the job: it adds nothing (ServiceLogic.onSceneClosing)
    sequence: Any = None  # an N-sample job: the Sequence the samples go into as they arrive
    sampleWindow: tuple[float, float] | None = None  # the samples' display range
    metrics: dict | None = None  # an evaluate job's metrics ({"rows": [...], ...})
    # an N-sample job once loaded: {"mean", "std", "proxy", "sequence", "browser"} (nodes; also in ``nodes``);
    # an evaluate job: {"table", "chart", "series", "plotTable"}
    outputs: dict = field(default_factory=dict)
    # a reproduce job (ServiceLogic.submitReproduce): what it compares ({"node", "provenance", "result", ...}), and
    # once done its verdict ({"equal", "max_abs", "mean_abs", "tolerance", "result", ...}); it adds no node
    reproduce: dict | None = None
    report: dict | None = None

    @property
    def state(self) -> str:
        """uploading, queued, running, downloading, done, failed or cancelled."""
        if isinstance(self.error, JobCancelled):
            return "cancelled"
        if self.error is not None:
            return "failed"
        if self.phase in ("uploading", "downloading"):
            return self.phase
        return self.status.get("state", "queued")

    @property
    def finished(self) -> bool:
        return self.phase == "finished"

    @property
    def done(self) -> bool:
        """Nothing more to do: results loaded (``nodes``) or ``error`` set."""
        return self.phase == "finished"


class ServiceLogic:
    """Jobs on a MedDiffusion service from Slicer's main thread. ``scene`` defaults to
    ``slicer.mrmlScene``; ``segmentationsLogic`` to a private one (tests have no application)."""

    REQUEST_TIMEOUT_S = 30.0  # a transfer that moves nothing for this long fails

    def __init__(self, scene=None, segmentationsLogic=None, sequencesLogic=None, plotsLogic=None) -> None:
        self._scene = scene
        self.segmentationsLogic = segmentationsLogic
        self.sequencesLogic = sequencesLogic  # Slicer's (updates a browser's proxy node); None: a private one
        self.plotsLogic = plotsLogic  # Slicer's (shows a chart in the layout); None: MRML only
        self.server: LocalServer | None = None
        self.serverPython: str | None = None
        self.serverEnv: dict[str, str] | None = None
        self.remote: tuple[str, str, str | None] | None = None  # (url, token, CA file)
        self._remoteClients: dict[float, Client] = {}  # one per timeout: a client builds its TLS context once
        self._health: dict | None = None
        self._connecting: dict | None = None  # connectStep's state
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

    def useRemoteServer(self, url: str, token: str, caFile: str | None = None) -> None:
        """Run jobs on a service started elsewhere (``meddiffusion serve`` on a GPU machine).
        ``caFile``: a certificate authority (PEM) to trust for an ``https://`` service (the lab's CA
        or the server's self-signed certificate); None or empty: the system's trusted CAs."""
        if not url:
            raise InputError("enter the server address (http://HOST:PORT)")
        caFile = str(caFile) if caFile else None
        Client(url, token, ca_file=caFile)  # validates the address and that the CA file exists
        if self.remote == (url, token, caFile):
            return
        self.stopServer()
        self.remote = (url, token, caFile)
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

    def serverLog(self) -> str:
        return self.server.log_tail() if self.server is not None else ""

    def stopServer(self, wait: bool = False) -> None:
        """Forget the service; a local server's whole process tree is told to stop. Without ``wait``
        this returns at once (the panel's main thread never waits on it): :meth:`reapStoppedServers`
        (the panel's timer) escalates to a kill after the grace time and reaps the processes."""
        if self.server is not None:
            self.server.stop(wait=wait)
            self.server = None
        self._health = None
        self._connecting = None
        self._remoteClients.clear()

    @staticmethod
    def reapStoppedServers() -> bool:
        """One non-blocking step over the local servers stopped without waiting; True when none is left."""
        return LocalServer.poll_stopped()

    def client(self, timeout: float | None = None, start: bool = True) -> Client:
        """A client of the current service. ``start``: start (or restart) the local server if it
        is not running and wait until it answers (console use; the panel uses :meth:`connectStep`);
        else raise ``ServiceUnavailable`` at once."""
        timeout = self.REQUEST_TIMEOUT_S if timeout is None else timeout
        if self.remote is not None:
            client = self._remoteClients.get(timeout)
            if client is None:  # kept: each new client would look the name up and load the CAs again
                url, token, caFile = self.remote
                client = self._remoteClients[timeout] = Client(url, token, timeout, ca_file=caFile)
            return client
        server = self.localServer()
        if not server.running:
            if not start:
                raise ServiceUnavailable("the local MedDiffusion service is not running" +
                                         (f":\n{server.log_tail()}" if server.log_tail() else ""))
            self.connect()
        return server.client(timeout)

    def connectStep(self, budget: float = POLL_BUDGET_S) -> dict | None:
        """Connect without blocking: start (or restart) a local server that is not running with
        ``start(wait=False)``, then probe ``/v1/health`` with a stepwise request. Call it again (from
        a timer) while it returns None; it returns the health answer (also cached) once the service
        answers, and raises ``ServiceUnavailable`` when the local server exits or a remote one
        cannot be reached."""
        c = self._connecting
        if c is None:
            c = self._connecting = {"since": time.monotonic(), "transfer": None, "started": False}
            self._remoteClients.clear()  # a new attempt looks the name up and reads the CA file again
        try:
            if self.isLocal:
                server = self.localServer()
                if not server.running:
                    if c["started"] and server.restart_on_a_free_port():  # another program took its port
                        if c["transfer"] is not None:
                            c["transfer"].cancel()
                            c["transfer"] = None
                        return None
                    if c["started"]:
                        code = server.process.returncode if server.process is not None else None
                        raise ServiceUnavailable(f"the local MedDiffusion server exited (code {code}):\n"
                                                 f"{server.log_tail()}")
                    server.stop(timeout=0)  # collects a dead process (a no-op otherwise)
                    server.start(wait=False)
                    c["started"], self._health = True, None
            if c["transfer"] is None:
                c["transfer"] = self.client(start=False).start_health()
            transfer = c["transfer"]
            if not transfer.step(budget):
                return None
            c["transfer"] = None
            if transfer.error is None:
                self._connecting, self._health = None, transfer.result
                return transfer.result
            waited = time.monotonic() - c["since"]
            if (self.isLocal and isinstance(transfer.error, ServiceUnavailable) and self.server.running
                    and waited < START_TIMEOUT_S):
                return None  # still starting (or busy): probe again on the next call
            if self.isLocal and waited >= START_TIMEOUT_S:
                raise ServiceUnavailable(f"the local MedDiffusion server did not answer within {START_TIMEOUT_S:.0f} s:"
                                         f"\n{self.serverLog()}")
            raise transfer.error
        except BaseException:
            self._connecting = None
            raise

    def connect(self) -> dict:
        """Blocking :meth:`connectStep` (console use; keeps the application painting)."""
        while True:
            health = self.connectStep()
            if health is not None:
                return health
            self._idle(0.05)

    def health(self, refresh: bool = False, timeout: float | None = None) -> dict:
        """The service's ``/v1/health`` (models, ControlNets, devices), cached until ``refresh``."""
        if self._health is None or refresh:
            self._health = None
            self._health = self.connect()
        return self._health

    def cachedHealth(self) -> dict | None:
        return self._health

    def unload(self) -> dict:
        """Free GPU memory: the service drops the models it keeps loaded."""
        return self.client().unload()

    def startUnload(self):
        """:meth:`unload` as a stepwise request (``Transfer``; the panel steps it from its timer)."""
        return self.client(start=False).start_unload()

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

    # -- segment -> label mapping (the panel's table and the console) -----------------------------------------
    def controlNetLabels(self, controlNet: str = "chest-ct-mini-labels") -> dict:
        """{label value: label name} of a labels ControlNet, from the service's health."""
        labels = controlnet_label_names(self.controlNetInfo(controlNet))
        if not labels:
            raise InputError(f"the ControlNet {controlNet!r} takes no label map")
        return labels

    @staticmethod
    def proposeSegmentMapping(segmentationNode, labelNames) -> dict:
        """{segment id: proposed label name, or None where nothing matched} for every segment, from
        the segment names and terminology entries ("left lung" -> Lung, "rib" -> Bone, "nodule" ->
        Tumour). ``labelNames``: a list of names or {value: name} (:meth:`controlNetLabels`)."""
        return propose_segment_mapping(segmentationNode, labelNames)

    @staticmethod
    def unmappedSegments(segmentationNode, segmentLabels: dict) -> list:
        """[(segment id, segment name)] of the segments ``segmentLabels`` gives no label (absent or None)."""
        if segmentationNode is None:
            raise InputError("select a segmentation")
        return unmapped_segments(segmentationNode, segmentLabels or {})

    def segmentLabelValues(self, segmentationNode, segmentLabels: dict, controlNet: str = "chest-ct-mini-labels",
                           allowUnmapped: bool = False) -> dict:
        """``segmentLabels`` ({segment id: label value, label name or None}) as {segment id: value}
        for the export, checked before a job starts: a label name or a value the ControlNet does not
        have is refused, and segments left without a label raise :class:`UnmappedSegmentsError`
        (listing them) unless ``allowUnmapped`` (then they become label 0 like the background)."""
        if segmentationNode is None:
            raise InputError("select a segmentation")
        segmentLabels = dict(segmentLabels or {})
        try:
            labels = self.controlNetLabels(controlNet)
        except (InputError, ServiceError):
            if any(isinstance(v, str) for v in segmentLabels.values()):
                raise
            labels = None  # unknown here: the service checks the ControlNet itself
        byName = {n.strip().lower(): v for v, n in (labels or {}).items()}
        seg = segmentationNode.GetSegmentation()
        values = {}
        for sid, label in segmentLabels.items():
            segment = seg.GetSegment(sid)
            title = segment.GetName() if segment is not None else sid
            if label is None:
                continue
            if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
                if label.strip().lower() not in byName:
                    raise InputError(f"segment {title!r}: the ControlNet has no label {label!r}; it has "
                                     f"{', '.join(labels.values())}")
                label = byName[label.strip().lower()]
            label = int(label)
            if labels is not None and label not in labels:
                raise InputError(f"segment {title!r}: {label} is not a label of the ControlNet {controlNet!r} "
                                 f"({', '.join(f'{v} {n}' for v, n in labels.items())})")
            values[sid] = label
        missing = unmapped_segments(segmentationNode, values)
        if missing and not allowUnmapped:
            zero = (labels or DEFAULT_LABEL_NAMES).get(0, "background")
            raise UnmappedSegmentsError(
                f"{len(missing)} segment{'s' if len(missing) > 1 else ''} of {segmentationNode.GetName()!r} "
                f"{'have' if len(missing) > 1 else 'has'} no model label: {', '.join(n for _, n in missing)}. "
                f"Choose a label for {'them' if len(missing) > 1 else 'it'}, or leave "
                f"{'them' if len(missing) > 1 else 'it'} out on purpose (allowUnmapped=True): "
                f"left-out segments become label 0 ({zero}).", missing)
        if not values:
            raise InputError("map at least one segment to a model label (e.g. Lung=1)")
        return values

    # -- submitting ----------------------------------------------------------------------------------------
    def _newWorkDir(self) -> str:
        return tempfile.mkdtemp(prefix="meddiffusion-job-")

    def _submit(self, spec: dict, name: str, like=None, window=None, inputNode=None, labels=None,
                inputNodes: dict | None = None, inputLut=None, inputSha256: str | None = None,
                inputRole: str = "the input", reproduce: dict | None = None) -> Job:
        """Start the upload of the input (a volume node, ``labels`` = (segmentation, reference,
        mapping), or ``inputNodes`` = {input name: volume node} for a task with several inputs);
        returns the job in phase ``uploading`` (move it on with :meth:`poll`). Each input's NRRD is
        encoded from memory in short steps by :meth:`poll` (:class:`EncodedUpload`): here only its
        header is made (and, for ``labels``, the segments are exported: one Slicer call).
        ``inputLut``: a label map's values through this table (int16, as ``labels`` are uploaded);
        ``inputSha256``: the input's voxels must have this sha256 (:class:`CheckedUpload`, checked
        first, in steps; ``inputRole`` names the input in the message)."""
        work = self._newWorkDir()
        try:
            encoders = {}
            if inputNode is not None:
                encoders["input"] = NrrdEncoder(inputNode, work, compress=not self.isLocal, lut=inputLut)
            elif labels is not None:
                seg, ref, mapping = labels
                encoders["input"] = labels_encoder(self.scene, seg, ref, mapping, work, logic=self.segmentationsLogic,
                                                   compress=not self.isLocal)
            for inputName, node in (inputNodes or {}).items():
                encoders[inputName] = NrrdEncoder(node, work, compress=not self.isLocal)
            if encoders:
                spec = dict(spec, inputs={n: f"{n}.nrrd" for n in encoders})
                transfer = EncodedUpload(self.client(), spec, {n: (e, os.path.join(work, f"{n}.nrrd"))
                                                               for n, e in encoders.items()})
                if inputSha256 is not None:
                    encoder = encoders["input"]
                    transfer = CheckedUpload(transfer, VoxelSha256(encoder.image, encoder.lut), inputSha256, inputRole)
            else:
                transfer = self.client().start_submit(spec, {})
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        job = Job("", spec["task"], name, like, window, {"state": "uploading"}, work, transfer=transfer,
                  reproduce=reproduce)
        self._trackJob(job)
        self.poll(job)
        return job

    # -- the scene closing under running jobs ----------------------------------------------------------------
    def _activeJobs(self) -> list:
        jobs = self.__dict__.setdefault("_jobs", [])  # set here: the module logic's __init__ is Slicer's
        jobs[:] = [j for j in jobs if not j.done]
        return jobs

    def _trackJob(self, job: Job) -> None:
        self._activeJobs().append(job)

    def onSceneClosing(self) -> None:
        """The scene is about to be closed (the panel calls this on ``StartCloseEvent``): every
        unfinished job is cancelled and adds nothing to the scene any more. Its live preview and
        any result loaded so far are removed now and its input node is let go; a job on the service
        is deleted there (which stops it). Keep polling the jobs as usual: each ends ``cancelled``
        (``finishJob`` raises :class:`JobCancelled` and returns no node) without touching the scene."""
        for job in list(self._activeJobs()):
            if job.done:
                continue
            job.sceneClosed, job.like = True, None
            if job.previewTransfer is not None:
                job.previewTransfer.cancel()
                job.previewTransfer = None
            if job.previewNode is not None:
                remove_node(self.scene, job.previewNode)
                job.previewNode = None
            self._removeNodes(job)
            if job.phase == "uploading" and job.transfer is not None and job.transfer.sent < (job.transfer.total or 0):
                job.transfer.cancel()  # the service drops a partial upload: no job was created
                job.transfer = None
                self._end(job, self._sceneClosedError())
            elif job.phase == "uploading":
                job.cancelRequested = True  # all sent: deleted once the service names the job (_stepUpload)
            elif job.phase in ("service", "downloading"):
                self._end(job, self._sceneClosedError())  # DELETE cancels it on the service
            else:  # "cleanup": its results went with the scene; only the service's copy is still being deleted
                job.error = self._sceneClosedError()

    @staticmethod
    def _sceneClosedError() -> JobCancelled:
        return JobCancelled("the scene was closed: the job was cancelled and nothing was added", None)

    def submitGenerate(self, modelId: str | None = None, classIndex: int | None = None, size=None, spacing=None,
                       seed: int = 0, sampler: str | None = None, steps: int | None = None, numberOfVolumes: int = 1,
                       mapToHU: bool | None = None, huWindow=None, device: str = "auto", mode: str = "fast",
                       previewEvery: int = 0) -> Job:
        """Generate volumes from noise. ``size``/``spacing`` (X, Y, Z) default to the class's trained
        size; ``steps`` applies to ddim/dpm++ (DDPM always runs the model's full schedule);
        ``mapToHU`` None = map CT to HU when the model knows the class's HU window."""
        model = self.modelInfo(modelId)
        cls = self.classInfo(model, classIndex)
        asked = mapToHU  # None: the resolver's default (CT in HU when the model knows the window)
        if mapToHU is None:
            mapToHU = bool(cls.get("hu_window")) and huWindow is None
        if mapToHU and not cls.get("hu_window") and huWindow is None:
            raise InputError(f"the model does not know the HU range of class {cls['name']!r}: untick \"Map CT to HU\"")
        params = {"class": cls["index"], "size": list(size) if size else None,
                  "spacing": list(spacing) if spacing else None, "seed": int(seed), "sampler": sampler,
                  "steps": None if sampler == "ddpm" else steps, "num_volumes": int(numberOfVolumes),
                  "hu": None if asked is None else bool(mapToHU), "hu_window": list(huWindow) if huWindow else None,
                  "device": device,
                  "mode": mode, "preview_every": int(previewEvery)}
        window = tuple(huWindow) if huWindow else tuple(cls["hu_window"]) if mapToHU else MODEL_UNITS_WINDOW
        return self._submit({"task": "generate", "model": model["id"], "params": params},
                            f"MedDiffusion {cls['name']} seed{seed}", window=window)

    @staticmethod
    def _samplesParam(params: dict, numSamples) -> dict:
        """``num_samples`` into the job's parameters when more than one sample is asked for (a service
        without the parameter still takes single-sample jobs)."""
        if isinstance(numSamples, bool) or not isinstance(numSamples, int) or not 1 <= numSamples <= MAX_SAMPLES:
            raise InputError(f"Samples: a whole number from 1 to {MAX_SAMPLES}, got {numSamples!r}")
        if numSamples > 1:
            params["num_samples"] = int(numSamples)
        return params

    def submitSynthesize(self, segmentationNode, referenceVolumeNode, segmentLabels: dict,
                         controlNet: str = "chest-ct-mini-labels", seed: int = 0, steps: int | None = None,
                         device: str = "auto", mode: str = "fast", previewEvery: int = 0,
                         allowUnmapped: bool = False, numSamples: int = 1) -> Job:
        """Synthesize CT from segments on the reference grid. ``segmentLabels``: {segment id: model
        label value (or label name)}. Every segment must have a label: the ones without raise
        :class:`UnmappedSegmentsError` (an ``InputError`` listing them) before anything starts,
        unless ``allowUnmapped`` (then they become label 0, like the background). ``numSamples`` > 1
        (at most 16): that many samples (the service draws them reproducibly from ``seed``) as one
        Sequence with a browser, plus their voxel-wise mean and standard deviation (see
        :meth:`finishJob`)."""
        if segmentationNode is None:
            raise InputError("select a segmentation")
        check_scalar_volume(referenceVolumeNode, "reference volume")
        params = self._samplesParam({"seed": int(seed), "sampler": None, "steps": steps, "device": device,
                                     "mode": mode, "preview_every": int(previewEvery)}, numSamples)
        segmentLabels = self.segmentLabelValues(segmentationNode, segmentLabels, controlNet, allowUnmapped)
        return self._submit({"task": "synthesize", "controlnet": controlNet, "params": params},
                            f"{segmentationNode.GetName()} synthetic CT seed{seed}", like=referenceVolumeNode,
                            window=self._controlNetWindow(controlNet),
                            labels=(segmentationNode, referenceVolumeNode, segmentLabels))

    def submitReconstruct(self, fbpVolumeNode, controlNet: str = "chest-ct-mini-sparse-view", seed: int = 0,
                          steps: int | None = None, device: str = "auto", mode: str = "fast",
                          previewEvery: int = 0, numSamples: int = 1) -> Job:
        """Reconstruct CT from a sparse-view FBP volume (HU); the result is on the FBP's grid.
        ``numSamples`` > 1: samples, mean and std as for :meth:`submitSynthesize`."""
        check_scalar_volume(fbpVolumeNode, "sparse-view FBP volume")
        params = self._samplesParam({"seed": int(seed), "sampler": None, "steps": steps, "device": device,
                                     "mode": mode, "preview_every": int(previewEvery)}, numSamples)
        return self._submit({"task": "reconstruct", "controlnet": controlNet, "params": params},
                            f"{fbpVolumeNode.GetName()} MedDiffusion recon", like=fbpVolumeNode,
                            window=self._controlNetWindow(controlNet), inputNode=fbpVolumeNode)

    def submitSimulate(self, ctVolumeNode, views: int = 40, bins: int | None = None) -> Job:
        """Simulate the FBP of a ``views``-view fan-beam scan of a full CT (HU); ``bins``: detector
        bins (None: the service's default)."""
        check_scalar_volume(ctVolumeNode, "full CT volume")
        params = {"views": int(views)}
        if bins is not None:
            params["bins"] = int(bins)
        return self._submit({"task": "simulate-sparse-view", "params": params},
                            f"{ctVolumeNode.GetName()} FBP {views} views", like=ctVolumeNode, window=CT_WINDOW,
                            inputNode=ctVolumeNode)

    def submitEvaluate(self, predictionNode, referenceNode, labels: bool = False, resample: bool = False) -> Job:
        """Compare a prediction with a reference on the service (task ``evaluate``): both volumes are
        uploaded; ``labels``: compare them as label maps (overlap per label), else as intensities;
        ``resample``: put the prediction on the reference's grid first (else the grids must match).
        The finished job adds no volume: its metrics become a Table node (metric, group, value) with
        a bar chart (:meth:`metricsTable`), in ``job.outputs`` and ``finishJob``'s nodes."""
        check_scalar_volume(predictionNode, "prediction volume")
        check_scalar_volume(referenceNode, "reference volume")
        params = {"labels": bool(labels), "resample": bool(resample)}
        return self._submit({"task": "evaluate", "params": params},
                            f"{predictionNode.GetName()} vs {referenceNode.GetName()}", like=predictionNode,
                            inputNodes={"prediction": predictionNode, "reference": referenceNode})

    # -- results as the user uses them (console and panel) ---------------------------------------------------
    def showUncertainty(self, meanNode, stdNode, opacity: float = 0.5) -> list:
        """Every slice view: the mean in the background, the std in a colour table in the foreground
        at ``opacity`` (an N-sample job's ``job.outputs["mean"]``/``["std"]``). Returns the slice
        composite nodes changed."""
        if meanNode is None or stdNode is None:
            raise InputError("select the mean and the std volume")
        return show_uncertainty(self.scene, meanNode, stdNode, opacity)

    @_logic_or_class
    def exportVolume(self, node, path: str, format: str | None = None, overwrite: bool = False,
                     timeout: float | None = None) -> str:
        """Write a volume node keeping the synthetic mark of a result; returns the path written.

        * ``format`` None: the file ``path`` (.nrrd, .nii or .nii.gz, by its name): NRRD key/value
          fields ``meddiffusion_<field>``; NIfTI ``descrip`` "SYNTHETIC ..." and a JSON sidecar
          ``<name>.json`` (what ``meddiffusion info FILE`` reads). A node without the mark is written
          plainly.
        * ``format="dicom"``: ``path`` is the folder of a DICOM series (made; an existing folder must
          be empty, or hold an earlier series and ``overwrite``), for MedDiffusion results only:
          ``meddiffusion export --format dicom`` on the service's Python writes it (marked synthetic,
          DERIVED\\SECONDARY, new UIDs, the provenance in a private block); this waits for it (the
          panel uses :meth:`startExportDicom`). Called on the class (``ServiceLogic.exportVolume``),
          Slicer's own Python runs it."""
        if node is None:
            raise InputError("select the volume to export")
        if format is None:
            return export_volume(node, path)
        if str(format).lower() != "dicom":
            raise InputError(f"format: {format!r} is not one export writes (dicom; or none for a .nrrd, .nii or "
                             ".nii.gz file)")
        if self is None:
            return DicomExport(node, path, default_python(), None, overwrite).wait(timeout)
        return self.startExportDicom(node, path, overwrite).wait(timeout, self._idle)

    def startExportDicom(self, node, folder: str, overwrite: bool = False, python: str | None = None) -> DicomExport:
        """:meth:`exportVolume` to a DICOM series without waiting: a :class:`DicomExport` to ``poll()``
        (from a timer) until it returns the exit code, or ``cancel()``. ``python``: the interpreter
        that runs ``meddiffusion export`` (default: the local service's). Refuses at once (``InputError``)
        a node without the synthetic mark, a missing parent folder or a non-empty folder."""
        if node is None:
            raise InputError("select the volume to export")
        python = python or self.serverPython or default_python()
        return DicomExport(node, folder, python, self._childEnvironment(python), overwrite)

    def _childEnvironment(self, python: str) -> dict | None:
        """The environment a child process on ``python`` runs with (laid over this process's): the
        local server's when it runs that Python."""
        if self.serverEnv is not None and os.path.realpath(python) == os.path.realpath(self.serverPython or ""):
            return self.serverEnv
        return None

    # -- reproduce a marked result ------------------------------------------------------------------------------
    @staticmethod
    def _reproducible(node) -> dict:
        """The provenance of a result node that records its job; else one line of ``InputError``."""
        if node is None:
            raise InputError("select the result to reproduce")
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"{node.GetName()!r} is not a volume; reproduce re-makes a result volume")
        prov = node_provenance(node)
        if not prov:
            raise InputError(f"{node.GetName()!r} has no MedDiffusion provenance: only a result made by MedDiffusion "
                             "can be reproduced")
        if not isinstance(prov.get("job"), dict):
            raise InputError(f"{node.GetName()!r}: its provenance records no job to re-run (made by an older "
                             "MedDiffusion or another tool)")
        check_scalar_volume(node, "result to reproduce")
        return prov

    @staticmethod
    def _labelLut(node):
        """The identity table that uploads a label map volume's values as int16, as a segmentation's
        labels are uploaded (``labels_encoder``): whole numbers 0..32767 only."""
        import numpy as np
        from vtk.util import numpy_support

        values = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
        if not np.issubdtype(values.dtype, np.integer):
            raise InputError(f"{node.GetName()!r} holds {values.dtype} values; the input of a synthesize result is a "
                             "label map of whole numbers")
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > 32767:
            raise InputError(f"{node.GetName()!r} holds labels from {lo} to {hi}; a label map's labels are 0 to 32767")
        return np.arange(hi + 1, dtype=np.int16)

    def submitReproduce(self, node, inputNode=None, segmentLabels: dict | None = None, referenceNode=None,
                        device: str | None = None) -> Job:
        """Re-run the job a result node's mark records (``MedDiffusion.provenance.job``: the resolved
        request; only the task's own parameters are sent, without a live preview) on the service
        this logic uses, download the one result the node is (``result``, e.g. ``sample_2.nrrd``) and
        compare it voxel by voxel with the node's voxels, in short steps (:meth:`poll`); nothing is
        added to the scene. Once ``job.done``, ``job.report`` holds the verdict (see :meth:`reproduce`).

        ``inputNode``: the input of a synthesize, reconstruct or simulate-sparse-view result, uploaded
        as those jobs upload theirs; its voxels must have the sha256 the mark records (checked here
        first, in steps, exactly as the service hashes the uploaded NRRD, and again from the re-run's
        own record): a different volume ends the job with :class:`WrongInput` before the upload.
        For synthesize: a label map volume with the model's label values (uploaded as int16, as the
        labels were), or the segmentation node with ``segmentLabels`` ({segment id: label value or
        name}, the mapping used then) and ``referenceNode`` (the grid; default: the result node,
        which is on it). ``device``: run on this device instead of the recorded one. Raises
        ``InputError`` (one line) for a node without provenance or without a recorded job, a missing
        or superfluous input."""
        prov = self._reproducible(node)
        spec = recorded_request(prov, device)
        task = spec["task"]
        recorded = prov.get("conditions_sha256") if isinstance(prov.get("conditions_sha256"), dict) else {}
        other = sorted(set(recorded) - {"input"})
        if other:
            raise InputError(f"this {task} result was made from inputs this module cannot give ({', '.join(other)})")
        digest = recorded.get("input")
        if task != "generate" and digest is None:
            raise InputError(f"{node.GetName()!r}: its provenance records no sha256 of the input it was made from")
        if digest is not None and inputNode is None:
            raise InputError(f"this {task} result was made from an input volume (sha256 {str(digest)[:12]}...): give "
                             "it as the input (inputNode)")
        if digest is None and inputNode is not None:
            raise InputError(f"this {task} result was made from no input volume: reproduce it without one")
        kwargs: dict = {}
        role = "the input"
        if inputNode is not None and inputNode.IsA("vtkMRMLSegmentationNode"):
            if task != "synthesize":
                raise InputError(f"a {task} result was made from a volume, not from a segmentation")
            controlNet = spec.get("controlnet") or "chest-ct-mini-labels"
            mapping = self.segmentLabelValues(inputNode, segmentLabels, controlNet, allowUnmapped=True)
            kwargs["labels"] = (inputNode, referenceNode or node, mapping)
            role = f"the label map of {inputNode.GetName()!r}"
        elif inputNode is not None:
            check_scalar_volume(inputNode, "input volume")
            kwargs["inputNode"] = inputNode
            if task == "synthesize":
                kwargs["inputLut"] = self._labelLut(inputNode)
            role = repr(inputNode.GetName())
        reproduce = {"node": node, "provenance": prov, "result": prov.get("result"), "started": time.monotonic(),
                     "inputChecked": digest is not None, "stage": "pick"}
        return self._submit(spec, f"{node.GetName()} re-run", inputSha256=digest, inputRole=role,
                            reproduce=reproduce, **kwargs)

    def reproduce(self, node, inputNode=None, progressCallback=None, timeout: float | None = None, **kwargs) -> dict:
        """Blocking :meth:`submitReproduce`: re-run the job recorded in ``node``'s mark and return
        ``{"equal", "max_abs", "mean_abs", "tolerance", "result", "task", "units", "input_checked",
        "notes", "seconds", "text"}``: ``equal`` when the largest voxel difference is within the
        tolerance of ``meddiffusion reproduce`` (5e-3 model units, scaled by the HU window for HU
        results: 5 HU for 2000 HU; 1e-2 HU for simulate-sparse-view); ``text`` says it in one line.
        Adds no node to the scene."""
        job = self.submitReproduce(node, inputNode, **kwargs)
        self.waitJob(job, progressCallback, timeout=timeout)
        return job.report

    def _reproducedResult(self, job: Job) -> dict:
        """The re-run job's result the node is, checked against the node's record (same input, same
        sample batches)."""
        r = job.reproduce
        results = job.status.get("results") or []
        wanted = r["result"]
        match = [x for x in results if x.get("name") == wanted] if wanted else results[:1]
        if not match:
            made = ", ".join(str(x.get("name")) for x in results) or "nothing"
            raise ServiceError(f"the re-run job made {made}, not {wanted!r}")
        res = match[0]
        prov, new = r["provenance"], (res.get("meta") or {}).get("provenance") or {}
        was, now = prov.get("sample_batch"), new.get("sample_batch")
        if was is not None and now is not None and was != now:
            raise ServiceError(f"this sample was drawn in batches of {was}; the service draws {now} at a time, so it "
                               "cannot draw the same noise again")
        recorded, read = prov.get("conditions_sha256") or {}, new.get("conditions_sha256") or {}
        if isinstance(recorded, dict) and isinstance(read, dict):
            for key, digest in recorded.items():
                if key in read and read[key] != digest:
                    raise WrongInput(f"the service read an input other than the one this result was made from (sha256 "
                                     f"{str(read[key])[:12]}..., the result records {str(digest)[:12]}...)")
        return res

    def _stepReproduce(self, job: Job, left: Callable[[], float]) -> None:
        """A reproduce job's download: the one result, read into memory (no node), compared in steps."""
        r = job.reproduce
        try:
            while job.phase == "downloading":
                stage = r["stage"]
                if stage == "pick":
                    res = self._reproducedResult(job)
                    r.update(stage="download", name=res["name"], meta=res.get("meta") or {})
                    job.transfer = self.client(start=False).start_download(
                        job.id, res["name"], os.path.join(job.workDir, "rerun-" + os.path.basename(res["name"])))
                elif stage == "download":
                    if not job.transfer.step(left()):
                        return
                    transfer, job.transfer = job.transfer, None
                    if transfer.error is not None:
                        message = panel_message(transfer.error.message)
                        raise ServiceError(f"downloading the re-run result failed: {message}", transfer.error.status)
                    r.update(stage="load", path=str(transfer.result))
                    job.transfer = NrrdLoader(r["path"])
                elif stage == "load":
                    loader = job.transfer
                    if not loader.done and not loader.step(left()):
                        return
                    job.transfer = None
                    if loader.error is not None:
                        raise ServiceError(f"reading the re-run result failed: {loader.error}")
                    if loader.supported:
                        array, dims, ijkToRas = loader.array, loader.dims, loader.ijk_to_ras
                    else:  # a format the stepwise reader does not take: Slicer's reader, outside the scene
                        array, dims, ijkToRas = read_standalone(r["path"])
                    os.remove(r["path"])
                    node = r["node"]
                    image = node.GetImageData()
                    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
                        raise ServiceError(f"{node.GetName()!r} has no voxels any more")
                    have = tuple(image.GetDimensions())
                    if tuple(dims) != have:
                        raise ServiceError(f"the re-run result has {'x'.join(map(str, dims))} voxels, "
                                           f"{node.GetName()!r} {'x'.join(map(str, have))}: not the same result")
                    from vtk.util import numpy_support

                    r.update(stage="compare", geometry=ijkToRas)
                    job.transfer = VoxelDifference(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()), array)
                elif stage == "compare":
                    if not job.transfer.step(left()):
                        return
                    diff, job.transfer = job.transfer, None
                    job.report = self._reproduceReport(job, diff)
                    self._end(job)
                    return
                if left() <= 0:
                    return
        except ServiceError as exc:
            self._end(job, exc)
        except (OSError, ValueError) as exc:
            self._end(job, ServiceError(f"comparing with the re-run result failed: {exc}"))

    def _reproduceReport(self, job: Job, diff: VoxelDifference) -> dict:
        import numpy as np
        import vtk

        r = job.reproduce
        prov, node = r["provenance"], r["node"]
        new = r["meta"].get("provenance") or {}
        notes = []
        for key in ("weights_sha256", "device", "torch_version", "generator_version"):
            was, now = prov.get(key), new.get(key)
            if was is not None and now is not None and was != now:
                notes.append(f"{key} differs: recorded {was}, now {now}" +
                             (" (the model's weights changed)" if key == "weights_sha256" else ""))
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        mine = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
        if np.abs(mine - np.asarray(r["geometry"], float)).max() > 1e-3:
            notes.append("the node's grid is not the re-run's (moved or resampled since?): voxels compared by index")
        tolerance = reproduce_tolerance(prov)
        report = {"equal": bool(diff.max_abs <= tolerance), "max_abs": float(diff.max_abs),
                  "mean_abs": float(diff.mean_abs), "tolerance": float(tolerance), "result": r["name"],
                  "task": (prov.get("job") or {}).get("task"), "units": prov.get("units"),
                  "input_checked": bool(r["inputChecked"]), "notes": notes,
                  "seconds": time.monotonic() - r["started"]}
        report["text"] = reproduce_text(node.GetName(), report)
        return report

    @staticmethod
    def provenance(node) -> dict | None:
        """The provenance a node is marked with ({field: value}); None for a node without the mark."""
        return node_provenance(node)

    def metricsTable(self, rows, name: str = "MedDiffusion metrics", metric: str | None = None,
                     show: bool = True) -> tuple:
        """Metrics rows ([{"metric", "group", "value"}], as the evaluate task returns them) as a Table
        node plus a bar chart of one metric per group (``metric``; default PSNR, else Dice, SSIM,
        MAE, else the first); ``show``: show the chart in the layout's plot view. Returns (table,
        chart, series, plot table); chart, series and plot table are None when there are no rows."""
        table = metrics_table(self.scene, rows, name)
        if table.GetNumberOfRows() == 0:
            return table, None, None, None
        chart, series, plotTable = metrics_chart(self.scene, table, metric)
        if show:
            self.showChart(chart)
        return table, chart, series, plotTable

    def showChart(self, chartNode) -> None:
        """Show a plot chart in the layout's plot view (switching to a layout with one if needed)."""
        show_chart(self.scene, chartNode, self.plotsLogic)

    def _controlNetWindow(self, name: str) -> tuple[float, float]:
        try:
            window = self.controlNetInfo(name).get("hu_window")
        except (InputError, ServiceError):
            window = None
        return tuple(window) if window else CT_WINDOW

    # -- following a job (main thread, in short steps) ----------------------------------------------------
    def poll(self, job: Job, budget: float = POLL_BUDGET_S) -> dict:
        """Move the job on for at most about ``budget`` seconds: the upload, a status request, the
        live preview, the downloads (each result loaded as a node when complete) and the clean-up.
        Returns ``job.status``. Raises ``ServiceUnavailable`` when a status request finds no service
        (the job is kept: poll again); any other failure ends the job with ``job.error``."""
        deadline = time.monotonic() + budget
        left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        if job.phase == "uploading":
            self._stepUpload(job, left())
        if job.phase == "service":
            self._stepService(job, left)
        if job.phase == "downloading":
            (self._stepDownloads if job.reproduce is None else self._stepReproduce)(job, left)
        if job.phase == "cleanup" and (job.transfer is None or job.transfer.step(left())):
            job.transfer, job.phase = None, "finished"
        return job.status

    def _stepUpload(self, job: Job, budget: float) -> None:
        if not job.transfer.step(budget):
            return
        transfer, job.transfer = job.transfer, None
        for path in getattr(transfer, "paths", ()):  # the service keeps its own copy
            if os.path.exists(path):
                os.remove(path)
        if transfer.error is not None:
            error = transfer.error
            if not isinstance(error, (ServiceUnavailable, WrongInput)):
                error = ServiceError(panel_message(error.message), error.status)
            self._end(job, error)
            return
        job.status, job.id, job.phase = transfer.result, transfer.result["id"], "service"
        self._log(f"submitted {job.task} job {job.id}")
        if job.sceneClosed:
            self._end(job, self._sceneClosedError())
        elif job.cancelRequested:
            self.cancel(job)

    def _stepService(self, job: Job, left: Callable[[], float]) -> None:
        if job.cancelTransfer is not None and not job.cancelTransfer.done:
            job.cancelTransfer.step(left())
        if job.transfer is None:
            job.transfer = self.client(start=False).start_status(job.id)
        if job.transfer.step(left()):
            transfer, job.transfer = job.transfer, None
            if isinstance(transfer.error, ServiceUnavailable):
                raise transfer.error
            if transfer.error is not None:
                self._end(job, transfer.error)
                return
            job.status = transfer.result
            state = job.status.get("state")
            if state == "failed":
                self._end(job, JobFailed(panel_message(job.status.get("error")), None))
                return
            if state == "cancelled":
                self._end(job, JobCancelled("the job was cancelled; the scene was left unchanged", None))
                return
            if state == "done":
                if job.previewTransfer is not None:
                    job.previewTransfer.cancel()
                    job.previewTransfer = None
                job.phase = "downloading"
                return
            step = job.status.get("preview_step")
            if step is not None and step != job.previewStep and job.previewTransfer is None and job.reproduce is None:
                job.previewTransfer = self.client(start=False).start_preview(
                    job.id, os.path.join(job.workDir, "preview.nrrd"))
                job.previewStep = step
        if job.previewTransfer is not None and job.previewTransfer.step(left()):
            transfer, job.previewTransfer = job.previewTransfer, None
            if transfer.error is None and transfer.result is not None:
                job.previewNode = read_volume(self.scene, str(transfer.result), PREVIEW_NAME, like=job.like,
                                              window=job.window, node=job.previewNode)

    def _stepDownloads(self, job: Job, left: Callable[[], float]) -> None:
        results = job.status.get("results") or []
        while job.phase == "downloading":
            if job.transfer is None:
                if job.downloaded >= len(results):
                    try:
                        self._finishOutputs(job)
                    except Exception as exc:  # nothing half-done stays in the scene
                        self._removeNodes(job)
                        self._end(job, ServiceError(f"showing the results failed: {exc}"))
                        return
                    self._end(job)
                    return
                res = results[job.downloaded]
                metrics = (res.get("meta") or {}).get("metrics")
                if isinstance(metrics, dict):  # an evaluate job's metrics: in its status, nothing to download
                    job.metrics = metrics
                    job.downloaded += 1
                    continue
                job.transfer = self.client(start=False).start_download(job.id, res["name"],
                                                                       os.path.join(job.workDir, res["name"]))
            if isinstance(job.transfer, NrrdLoader):
                if not self._stepLoad(job, results[job.downloaded], left):
                    return
                continue
            if not job.transfer.step(left()):
                return
            transfer, job.transfer = job.transfer, None
            if transfer.error is not None:  # nothing half-done stays in the scene
                self._removeNodes(job)
                self._end(job, ServiceError(f"downloading the results failed: {panel_message(transfer.error.message)}",
                                            transfer.error.status))
                return
            try:  # read into memory in steps (NrrdLoader), then made a node at once (_stepLoad)
                job.transfer = NrrdLoader(str(transfer.result))
            except OSError as exc:
                self._removeNodes(job)
                self._end(job, ServiceError(f"loading {results[job.downloaded]['name']} failed: {exc}"))
                return
            if left() <= 0:
                return

    def _stepLoad(self, job: Job, res: dict, left: Callable[[], float]) -> bool:
        """Move the load of a downloaded result on; True once its node is in the scene (or the job
        ended). The node is made at the start of a poll, so that one call has the poll to itself."""
        loader = job.transfer
        if not loader.done:
            if not loader.step(left()):
                return False
            if loader.supported and loader.error is None:
                return False  # read: the node is made on the next poll
        job.transfer = None
        meta = res.get("meta") or {}
        statistic = meta.get("statistic")
        if statistic in ("mean", "std"):
            name = f"{job.name} {statistic}"
        elif statistic == "sample":
            name = f"{job.name} samples"
        else:
            name = job.name if len(job.status.get("results") or []) == 1 else f"{job.name} #{job.downloaded}"
        provenance = meta.get("provenance")
        if isinstance(provenance, dict) and provenance.get("synthetic"):
            name += " (synthetic)"
        try:
            if loader.error is not None:
                raise loader.error
            if statistic == "sample":
                self._addSample(job, loader, res, name, provenance)
            else:
                if loader.supported:
                    node = volume_from_array(self.scene, loader.array, loader.dims, loader.ijk_to_ras, name,
                                             like=job.like, window=self._window(job, res))
                else:  # a file the stepwise reader does not take: Slicer's storage node, in one call
                    node = read_volume(self.scene, loader.path, name, like=job.like, window=self._window(job, res))
                markSynthetic(node, provenance)
                job.nodes.append(node)
                if statistic in ("mean", "std"):
                    job.outputs[statistic] = node
                    if statistic == "std":
                        style_std(self.scene, node)
        except Exception as exc:
            self._removeNodes(job)
            self._end(job, ServiceError(f"loading {res['name']} failed: {exc}"))
            return False
        finally:
            if os.path.exists(loader.path):
                os.remove(loader.path)
        job.downloaded += 1
        return left() > 0

    def _addSample(self, job: Job, loader: NrrdLoader, res: dict, name: str, provenance) -> None:
        """One sample of an N-sample job into the job's Sequence (made with the first): a copy inside
        the sequence, so no sample node enters the main scene."""
        index = (res.get("meta") or {}).get("sample_index")
        if job.sequence is None:
            job.sequence = new_sample_sequence(self.scene, name)
            job.nodes.append(job.sequence)
            job.sampleWindow = self._window(job, res)
        index = job.sequence.GetNumberOfDataNodes() if index is None else int(index)
        if loader.supported:
            node = standalone_volume(loader.array, loader.dims, loader.ijk_to_ras, name)
            mark_synthetic(node, provenance)
            add_sample(job.sequence, node, index)
        else:  # Slicer's storage node reads it into a node of the scene: copied, then removed
            node = read_volume(self.scene, loader.path, name)
            try:
                mark_synthetic(node, provenance)
                add_sample(job.sequence, node, index)
            finally:
                remove_node(self.scene, node)

    def _finishOutputs(self, job: Job) -> None:
        """Once every result is loaded: an N-sample job's Sequence gets its browser (the proxy node
        shows the first sample); an evaluate job's metrics become a table with a bar chart."""
        if job.sequence is not None and "browser" not in job.outputs:
            browser, proxy = browse_samples(self.scene, job.sequence, self.sequencesLogic, like=job.like,
                                            window=job.sampleWindow)
            job.outputs.update(sequence=job.sequence, browser=browser, proxy=proxy)
            others = [n for n in job.nodes if n is not job.sequence]
            job.nodes = others + [proxy, job.sequence, browser]  # mean, std, proxy, sequence, browser
        metrics = job.metrics
        if isinstance(metrics, dict) and "table" not in job.outputs:
            table, chart, series, plotTable = self.metricsTable(metrics.get("rows") or [], f"{job.name} metrics",
                                                                show=False)
            job.outputs.update(table=table, chart=chart, series=series, plotTable=plotTable)
            job.nodes += [table, chart, series, plotTable]

    def cancel(self, job: Job) -> dict:
        """Stop the job: an upload or download stops at once (nothing is added to the scene); a job
        on the service is asked to stop between sampler steps (keep polling until ``job.done``)."""
        if job.done:
            return job.status
        cancelled = JobCancelled("the job was cancelled; the scene was left unchanged", None)
        if job.phase == "uploading" and job.transfer.sent < (job.transfer.total or 0):
            job.transfer.cancel()  # the service drops a partial upload: no job was created
            job.transfer = None
            self._end(job, cancelled)
        elif job.phase == "uploading":
            job.cancelRequested = True  # all sent: the service may have made the job; cancel it once it says so
        elif job.phase == "downloading":
            if job.transfer is not None:
                job.transfer.cancel()
                job.transfer = None
            self._removeNodes(job)
            self._end(job, cancelled)
        elif job.phase == "service" and job.cancelTransfer is None:
            job.cancelTransfer = self.client(start=False).start_cancel(job.id)
            job.cancelTransfer.step(POLL_BUDGET_S)
        return job.status

    def finishJob(self, job: Job) -> list:
        """Step the job to its end (a blocking convenience; the panel polls) and return the new
        nodes. Raises ``JobFailed`` (the service's message in the panel's words), ``JobCancelled`` or
        the ``ServiceError`` that ended it."""
        while not job.done:
            self.poll(job)
            if job.phase == "service" and job.transfer is None:
                self._idle(0.05)
        if job.error is not None:
            raise job.error
        return job.nodes

    @staticmethod
    def _window(job: Job, result: dict) -> tuple[float, float] | None:
        meta = result.get("meta") or {}
        if meta.get("hu_window"):
            return tuple(meta["hu_window"])
        if str(meta.get("units", "")).startswith("model units"):
            return MODEL_UNITS_WINDOW
        return job.window

    def _removeNodes(self, job: Job) -> None:
        for node in reversed(job.nodes):  # a sequence's browser before its proxy and the sequence
            remove_node(self.scene, node)
        job.nodes = []
        job.sequence = None
        job.outputs = {}

    def _end(self, job: Job, error: ServiceError | None = None) -> None:
        """The job is over: remove the preview node and the local files, delete it on the service."""
        job.error = error
        for t in (job.transfer, job.previewTransfer):
            if t is not None:
                t.cancel()
        job.transfer = job.previewTransfer = None
        if job.previewNode is not None:
            remove_node(self.scene, job.previewNode)
            job.previewNode = None
        shutil.rmtree(job.workDir, ignore_errors=True)
        job.phase = "finished"
        if job.id and not isinstance(error, ServiceUnavailable):
            try:  # the service expires finished jobs by itself too
                job.transfer, job.phase = self.client(start=False).start_delete(job.id), "cleanup"
            except ServiceError:
                pass

    def waitJob(self, job: Job, progressCallback: Callable[[dict], None] | None = None, poll: float = 0.25,
                timeout: float | None = None):
        """Step the job until it ends, then return its new node (or a list of nodes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while not job.done:
            self.poll(job)
            if progressCallback is not None and job.status is not seen:
                seen = job.status
                progressCallback(job.status)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(job)
                try:
                    self.finishJob(job)
                except JobCancelled:
                    pass
                raise ServiceError(f"job {job.id} did not finish within {timeout} s (cancelled)")
            if job.phase == "service" and job.transfer is None:
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
                                   progressCallback=None, timeout: float | None = None, numSamples: int = 1,
                                   **kwargs):
        """Blocking :meth:`submitSynthesize`: returns the synthetic CT node on the reference grid
        (``allowUnmapped=True`` to leave segments without a label out on purpose). With
        ``numSamples`` > 1: [mean, std, sample proxy, sample sequence, sequence browser]."""
        job = self.submitSynthesize(segmentationNode, referenceVolumeNode, segmentLabels, numSamples=numSamples,
                                    **kwargs)
        return self.waitJob(job, progressCallback, timeout=timeout)

    def reconstructSparseView(self, fbpVolumeNode, progressCallback=None, timeout: float | None = None,
                              numSamples: int = 1, **kwargs):
        """Blocking :meth:`submitReconstruct`: returns the reconstructed CT node. With ``numSamples``
        > 1: [mean, std, sample proxy, sample sequence, sequence browser]."""
        return self.waitJob(self.submitReconstruct(fbpVolumeNode, numSamples=numSamples, **kwargs), progressCallback,
                            timeout=timeout)

    def evaluate(self, predictionNode, referenceNode, labels: bool = False, resample: bool = False,
                 progressCallback=None, timeout: float | None = None, show: bool = True):
        """Blocking :meth:`submitEvaluate`: returns the metrics Table node (its bar chart shown in the
        layout's plot view unless ``show`` is False; all nodes in ``job.outputs``)."""
        job = self.submitEvaluate(predictionNode, referenceNode, labels=labels, resample=resample)
        self.waitJob(job, progressCallback, timeout=timeout)
        chart = job.outputs.get("chart")
        if show and chart is not None:
            self.showChart(chart)
        return job.outputs.get("table")

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


__all__ = ["ServiceLogic", "Job", "panel_message", "default_python", "segment_mapping", "InputError", "WrongInput",
           "DicomExport", "CheckedUpload", "TASK_PARAMS", "reproduce_tolerance", "recorded_request", "reproduce_text",
           "UnmappedSegmentsError", "controlnet_label_names", "DEFAULT_LABEL_NAMES",
           "ServiceError", "ServiceUnavailable", "JobFailed", "JobCancelled", "TERMINAL", "PREVIEW_NAME", "POLL_BUDGET_S",
           "EncodedUpload", "markSynthetic", "PROVENANCE_ATTRIBUTE", "MAX_SAMPLES"]
