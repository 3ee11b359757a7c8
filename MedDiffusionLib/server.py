"""The MedDiffusion job service (``meddiffusion serve``): FastAPI + uvicorn.

Runs generation and the ControlNet tasks in its own process, on this computer (the Slicer module
starts one) or on a lab GPU machine. One job at a time per device, first in first out; models stay
loaded between jobs until ``POST /v1/unload``.

What it defends (README, *Security*):

* **Who.** Every request needs ``Authorization: Bearer TOKEN``: one token (``--token-file`` or
  ``$MEDDIFFUSION_TOKEN``, its user is an admin) or a tokens file with one user per line
  (:mod:`MedDiffusionLib.auth`). A job belongs to its submitter: others get 404. Admins list every
  job, cancel or delete any, and unload models; results are served to the owner only. Failed
  authentication is rate-limited per client address; every submit, download, delete, cancel,
  unload and refusal is written to the audit log (``audit.log`` in the work folder).
* **What comes in.** The job spec is validated at the door (:mod:`MedDiffusionLib.schema`: size,
  nesting, finite numbers, ranges, the admin's caps). Uploads are streamed into the job's own
  folder (never a shared temporary folder), cut off at ``--max-upload-mb``, and read by
  :func:`MedDiffusionLib.data.volumes.read_volume`, which refuses any header that names another
  file and bounds the unpacked size. The server never opens a path a client sent. Malformed
  requests get a short 4xx naming no server path; a fault of ours gets 500 with an id that the log
  also has.
* **What it keeps.** Jobs are in SQLite in the work folder (:mod:`MedDiffusionLib.jobstore`) and
  survive a restart: finished jobs stay listed until their TTL, queued jobs run, a job that was
  running is failed with "the server restarted". The work folder is 0700, its files 0600; uploads
  are removed when their job ends, expired job folders at start and by the janitor.
* **The network.** Loopback by default; ``--tls-cert``/``--tls-key`` serve HTTPS. No redirects;
  request headers must arrive within ``header_timeout_s`` and the body may not stall longer than
  ``body_timeout_s``; a full queue is answered before the body is read, with ``Retry-After``.

Endpoints (all under ``/v1``; the OpenAPI schema at ``/v1/openapi.json``, with the token):
``GET /health``, ``GET /metrics`` (Prometheus), ``POST /jobs`` (multipart: ``spec`` JSON + input
files, or a JSON spec alone), ``GET /jobs``, ``GET /jobs/{id}``, ``POST /jobs/{id}/cancel``,
``GET /jobs/{id}/results/{name}``, ``GET /jobs/{id}/preview``, ``DELETE /jobs/{id}``,
``POST /unload``. A client may name its job (header ``X-Job-Id``, 16-32 hex digits) so that it can
delete it even when it was interrupted before the answer came.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import __version__
from .data.volumes import DETACHED_SUFFIXES
from .data.volumes import SUFFIXES as UPLOAD_SUFFIXES  # single-file formats only
from .auth import AuditLog, FailureLimiter, User, Users
from .errors import Cancelled, MedDiffusionError, ResourceError, SetupError, UserError, fielded
from .controlnets import controlnet_search_path, named_controlnets
from .defaults import sampling_defaults_for
from .jobs import oom_advice, run_job
from .jobspec import INPUT_NAMES, JobSpec
from .jobstore import JobStore
from .model_cache import ModelCache
from .progress import ProgressEvent
from .schema import MAX_MESSAGE_CHARS, Caps, one_line, parse_spec, request_schema

log = logging.getLogger("meddiffusion.server")

JOB_ID_RE = re.compile(r"[0-9a-f]{16,32}")  # always used with fullmatch
MAX_DETAIL = MAX_MESSAGE_CHARS  # characters of an error message sent to a client
MAX_FORM_PARTS = 4
MAX_SPEC_PART = 64 * 1024
TOMBSTONE_S = 300.0
MAX_TOMBSTONES = 10000


@dataclass
class Limits:
    """What the admin allows: upload size, queue length, result lifetime, the job caps
    (:class:`MedDiffusionLib.schema.Caps`), network time-outs and the failed-login limit."""

    max_upload_bytes: int = 2 * 2 ** 30
    max_queue: int = 16
    result_ttl_s: float = 3600.0
    caps: Caps = field(default_factory=Caps)
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    auth_failures: int = 10  # per address within auth_window_s, then locked out for the rest of it
    auth_window_s: float = 60.0
    spill_dir: str | None = None  # where exact decodes spill stage maps (the admin's; default <cache root>/spill)
    max_spill_bytes: float | None = 64e9  # stage maps one job may spill to disk (a tiny max_memory_gb must not fill it)
    controlnet_dirs: tuple[str, ...] = ()  # folders of the admin's named ControlNets, after the bundled ones


@dataclass
class Job:
    id: str
    spec: JobSpec
    device: str
    folder: Path
    inputs: dict[str, Any] = field(default_factory=dict)
    state: str = "queued"
    phase: str = "queued"
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    message: str = "waiting in the queue"
    error: str | None = None
    # why it failed: "request" (the request or an input is wrong: running it again gives the same
    # error), "setup" (this server lacks the weights it needs: another server may run it),
    # "resources" (memory), "time_limit", "internal",
    # "interrupted" (the server restarted while it ran); None otherwise
    error_kind: str | None = None
    warnings: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    preview_step: int | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    deleted: bool = False
    owner: str = "owner"
    input_names: dict[str, str] = field(default_factory=dict)  # the client's file names (shown to the owner only)
    started: float | None = None
    timed_out: bool = False

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "task": self.spec.task, "state": self.state,
                "spec": _jsonable(self.spec.to_dict()), "device": self.device, "message": self.message,
                "error": self.error, "warnings": self.warnings, "results": self.results,
                "input_names": self.input_names, "created": self.created, "finished": self.finished,
                "error_kind": self.error_kind}


def _queue_full(limits: Limits) -> HTTPException:
    return HTTPException(503, f"the queue is full ({limits.max_queue} jobs waiting); try again later",
                         headers={"Retry-After": "30"})


def _user_message(exc: BaseException) -> str | None:
    """The message to show a client for an expected failure, ``None`` for an internal fault."""
    if isinstance(exc, (MedDiffusionError, MemoryError)):
        return str(exc)
    return None


def _short(text: str, work: Path | None = None, spill: str | None = None) -> str:
    """One client-facing line: server paths removed (the work folder, the spill folder), cut at
    :data:`MAX_DETAIL` characters."""
    if work is not None:
        text = text.replace(str(work), "<work>")
    if spill is not None:
        from .models.streaming_decode import spill_directory

        text = text.replace(str(spill_directory(spill or None)), "<spill folder>")
    return one_line(text, MAX_DETAIL)


class JobService:
    """Job table (in memory, mirrored in SQLite), per-device FIFO workers and model caches."""

    def __init__(self, work_dir: Path, limits: Limits, metrics: "Metrics | None" = None):
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if any(self.work_dir.iterdir()) and not (self.work_dir / "jobs.sqlite3").exists():
            raise UserError(f"{self.work_dir}: the work folder must be empty or one a MedDiffusion server made "
                            "(it holds other files, which the server would manage as its own)")
        self._lock_file = _lock_folder(self.work_dir)
        os.chmod(self.work_dir, 0o700)
        self.limits = limits
        self.metrics = metrics
        self.controlnet_dirs = controlnet_search_path(limits.controlnet_dirs)  # where named ControlNets are
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queues: dict[str, queue.Queue] = {}
        self.caches: dict[str, ModelCache] = {}
        self.running: dict[str, str | None] = {}
        self.busy: dict[str, threading.Lock] = {}
        self.tombstones: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self.store = JobStore(self.work_dir / "jobs.sqlite3")
        self._recover()
        threading.Thread(target=self._janitor, name="meddiffusion-janitor", daemon=True).start()

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, job: Job) -> None:
        if job.state != "receiving" and not job.deleted and not self._stop.is_set():
            self.store.save(job.row())

    def _recover(self) -> None:
        """Load the table a previous run left: expired jobs go, a job that was running is failed,
        queued jobs are queued again; job folders the table does not know are removed."""
        now = time.time()
        for row in self.store.rows():
            folder = self.work_dir / row["id"]
            if not JOB_ID_RE.fullmatch(row["id"] or ""):
                self.store.delete(row["id"])
                continue
            if row["finished"] and now - row["finished"] > self.limits.result_ttl_s:
                self.store.delete(row["id"])
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                spec = JobSpec.from_dict(row["spec"]).as_stored_resolution()  # stored after resolve()
            except UserError:
                self.store.delete(row["id"])
                shutil.rmtree(folder, ignore_errors=True)
                continue
            job = Job(row["id"], spec, row["device"], folder, state=row["state"], message=row["message"] or "",
                      error=row["error"], error_kind=row.get("error_kind"), warnings=row["warnings"] or [],
                      results=row["results"] or [],
                      created=row["created"], finished=row["finished"], owner=row["owner"],
                      input_names=row["input_names"] or {})
            job.phase = "done" if job.state in ("done", "failed", "cancelled") else "queued"
            if job.state == "running" or (job.state == "queued" and not folder.is_dir()):
                job.state, job.phase, job.finished = "failed", "done", now
                job.error = job.message = "the server restarted while this job ran; submit it again"
                job.error_kind = "interrupted"
                job.results = []
                self._drop_files(job)
                shutil.rmtree(folder / "results", ignore_errors=True)
                self.store.save(job.row())
            self.jobs[job.id] = job
        for child in self.work_dir.iterdir():
            if child.is_dir() and JOB_ID_RE.fullmatch(child.name) and child.name not in self.jobs:
                shutil.rmtree(child, ignore_errors=True)
        for job in sorted(self.jobs.values(), key=lambda j: j.created):
            if job.state == "queued":
                self._start_worker(job.device)
                self.queues[job.device].put(job.id)
        if self.jobs:
            log.info("recovered %d job(s) from %s", len(self.jobs), self.store.path.name)

    # -- queue ----------------------------------------------------------------------------------------
    def waiting(self) -> int:
        with self.lock:
            return sum(1 for j in self.jobs.values() if j.state in ("queued", "receiving"))

    def device_for(self, spec: JobSpec) -> str:
        """The device a job runs on, resolved once here, where it runs (:func:`resolve_device`):
        only devices this machine has, one worker thread each."""
        from .devices import resolve_device

        return str(resolve_device(str(spec.params.get("device", "auto")), warn=False))

    def _start_worker(self, device: str) -> None:
        if device not in self.queues:
            self.queues[device] = queue.Queue()
            self.caches[device] = ModelCache(local_paths=False)
            self.running[device] = None
            self.busy[device] = threading.Lock()
            threading.Thread(target=self._worker, args=(device,), name=f"meddiffusion-{device}", daemon=True).start()

    def enqueue(self, job: Job) -> None:
        with self.lock:
            if job.deleted:  # its client deleted it while the upload was read
                raise HTTPException(409, "the job was deleted by its client during the upload")
            waiting = sum(1 for j in self.jobs.values() if j.state == "queued")
            if waiting >= self.limits.max_queue:
                raise _queue_full(self.limits)
            self.jobs[job.id] = job
            job.state, job.phase = "queued", "queued"
            self._start_worker(job.device)
            self.save(job)
            self.queues[job.device].put(job.id)

    def position(self, job: Job) -> int | None:
        if job.state != "queued":
            return None
        with self.lock:
            ahead = [j for j in self.jobs.values() if j.device == job.device and j.state == "queued"
                     and j.created < job.created]
        return len(ahead) + (1 if self.running.get(job.device) else 0)

    def _worker(self, device: str) -> None:
        q = self.queues[device]
        while not self._stop.is_set():
            job_id = q.get()
            with self.lock:  # claim the job atomically against a concurrent cancel
                job = self.jobs.get(job_id)
                if job is None or job.state != "queued":
                    continue
                job.state, job.phase, job.message, job.started = "running", "loading", "starting", time.monotonic()
                self.save(job)
            with self.busy[device]:
                self.running[device] = job.id
                try:
                    self._run(job, self.caches[device])
                finally:
                    self.running[device] = None
                    job.inputs.clear()
                    self._drop_files(job)
                    with self.lock:  # against a concurrent delete: save() writes no deleted job's row
                        self.save(job)
                    if job.deleted:
                        shutil.rmtree(job.folder, ignore_errors=True)
                    if self.metrics is not None:
                        self.metrics.finished(job)

    @staticmethod
    def _drop_files(job: Job) -> None:
        """Uploads (every input name: ``input``, ``prediction``, ``reference``) go when the job ends."""
        for name in INPUT_NAMES:
            for path in job.folder.glob(f"{name}.*"):
                path.unlink(missing_ok=True)

    def _cancelled(self, job: Job) -> Callable[[], bool]:
        limit = self.limits.caps.job_time_limit_s

        def cancelled() -> bool:
            if job.cancel.is_set():
                return True
            if limit and job.started is not None and time.monotonic() - job.started > limit:
                job.timed_out = True
                job.cancel.set()
                return True
            return False

        return cancelled

    def _load_inputs(self, job: Job) -> dict[str, Any]:
        """The job's input volumes: in memory from the upload, or read again after a restart."""
        from .data.volumes import read_volume

        if job.inputs or not job.spec.inputs:
            return job.inputs
        out = {}
        for name in job.spec.inputs:
            path = next(iter(job.folder.glob(f"{name}.*")), None)
            if path is None:
                raise UserError("the uploaded input is gone (the server restarted); submit the job again")
            out[name] = read_volume(path, max_bytes=self.limits.max_upload_bytes,
                                    max_voxels=self.limits.caps.max_input_voxels, name=name)
        return out

    def _run(self, job: Job, cache: ModelCache) -> None:
        from .data.volumes import write_volume
        from .results import write_result

        results_dir = job.folder / "results"
        cancelled = self._cancelled(job)

        def progress(ev: ProgressEvent) -> None:
            job.phase, job.step, job.total, job.eta_s, job.message = ev.phase, ev.step, ev.total, ev.eta_s, ev.message
            notice = _short(ev.notice, self.work_dir, self.limits.spill_dir or "") if ev.notice else None
            if notice and notice not in job.warnings:
                job.warnings.append(notice)

        def preview(step: int, vol: Any) -> None:
            path = job.folder / "preview.nrrd"
            write_volume(vol, path, overwrite=True)
            os.chmod(path, 0o600)
            job.preview_step = step

        try:
            if job.started is None:
                job.started = time.monotonic()
            inputs = self._load_inputs(job)
            res = run_job(job.spec, inputs, cache=cache, progress=progress, cancel=cancelled, preview=preview,
                          spill_dir=self.limits.spill_dir, max_spill_bytes=self.limits.max_spill_bytes,
                          controlnet_dirs=self.controlnet_dirs)
            if cancelled():
                raise Cancelled("cancelled")
            job.phase, job.message = "writing", "writing results"
            results_dir.mkdir(mode=0o700, exist_ok=True)
            written = [{"name": r.name, "meta": _jsonable(r.meta)} for r in res.results]
            for r in res.results:
                if cancelled():  # cancelled while writing: nothing stays
                    raise Cancelled("cancelled")
                write_result(r, results_dir / r.name)
                os.chmod(results_dir / r.name, 0o600)
            if cancelled():
                raise Cancelled("cancelled")
            job.results = written
            job.state, job.phase, job.message, job.finished = "done", "done", f"done in {res.seconds:.1f} s", time.time()
            log.info("job %s done in %.1f s", job.id, res.seconds)
        except BaseException as exc:  # noqa: BLE001 - every failure ends the job, the worker lives on
            shutil.rmtree(results_dir, ignore_errors=True)
            (job.folder / "preview.nrrd").unlink(missing_ok=True)
            job.results, job.preview_step = [], None
            job.finished = time.time()
            if job.timed_out:
                job.state, job.phase = "failed", "done"
                job.error = job.message = (f"the job ran longer than this server's limit of "
                                           f"{self.limits.caps.job_time_limit_s:.0f} s and was stopped")
                job.error_kind = "time_limit"
                log.warning("job %s stopped at the time limit", job.id)
                return
            if isinstance(exc, Cancelled) or type(exc).__name__ == "Cancelled" or job.cancel.is_set():
                job.state, job.phase, job.message = "cancelled", "done", "cancelled"
                log.info("job %s cancelled", job.id)
                return
            job.state, job.phase = "failed", "done"
            job.error_kind = "setup" if isinstance(exc, SetupError) else "request" if isinstance(
                exc, UserError) else "resources" if isinstance(exc, (ResourceError, MemoryError)) or type(
                exc).__name__ == "OutOfMemoryError" else "internal"
            if type(exc).__name__ == "OutOfMemoryError":
                job.error = oom_advice(job.spec.params)
            else:
                msg = _user_message(exc)
                job.error = None if msg is None else _short(msg, self.work_dir, self.limits.spill_dir or "")
            if job.error is None:
                eid = uuid.uuid4().hex[:12]
                job.error = f"internal error (id {eid}); the server log has the details"
                log.error("job %s failed (error id %s):\n%s", job.id, eid, traceback.format_exc())
            else:
                log.warning("job %s failed: %s", job.id, job.error)
            job.message = job.error
            if not isinstance(exc, Exception):
                raise

    # -- housekeeping ---------------------------------------------------------------------------------
    def _janitor(self) -> None:
        while not self._stop.wait(min(60.0, max(0.5, self.limits.result_ttl_s / 4))):
            self.expire()

    def expire(self) -> None:
        now = time.time()
        with self.lock:
            old = [j for j in self.jobs.values() if j.finished and now - j.finished > self.limits.result_ttl_s]
            for j in old:
                del self.jobs[j.id]
            for key in [k for k, t in self.tombstones.items() if now - t > TOMBSTONE_S]:
                del self.tombstones[key]
        for j in old:
            self.store.delete(j.id)
            shutil.rmtree(j.folder, ignore_errors=True)
        with self.lock:  # folders no job owns (a job's folder is made and registered under this lock)
            orphans = [c for c in self.work_dir.iterdir()
                       if c.is_dir() and JOB_ID_RE.fullmatch(c.name) and c.name not in self.jobs]
        for child in orphans:
            shutil.rmtree(child, ignore_errors=True)

    def cancel(self, job: Job) -> None:
        with self.lock:
            job.cancel.set()
            if job.state == "queued":
                job.state, job.phase, job.message, job.finished = "cancelled", "done", "cancelled", time.time()
                self.save(job)
                self._drop_files(job)

    def delete(self, job: Job) -> None:
        self.cancel(job)
        with self.lock:
            self.jobs.pop(job.id, None)
            job.deleted = True
            running = job.state == "running"
            receiving = job.state == "receiving"
            self.store.delete(job.id)
        if not (running or receiving):  # a running job's folder goes when its worker lets go of it
            shutil.rmtree(job.folder, ignore_errors=True)

    def bury(self, owner: str, job_id: str) -> None:
        """Remember an id deleted before its job existed (an interrupted upload): a submit that
        arrives later under that id is refused."""
        with self.lock:
            if len(self.tombstones) >= MAX_TOMBSTONES:
                del self.tombstones[next(iter(self.tombstones))]
            self.tombstones[(owner, job_id)] = time.time()

    def unload(self) -> dict[str, Any]:
        names, deferred = [], []
        for device, cache in list(self.caches.items()):
            # no job running there: the worker may still be finishing one's bookkeeping (files, the
            # job table) under the lock, a moment's wait; a running job defers the unload
            idle = self.running.get(device) is None
            if self.busy[device].acquire(timeout=5.0) if idle else self.busy[device].acquire(blocking=False):
                try:
                    names += cache.clear()
                finally:
                    self.busy[device].release()
            else:
                deferred.append(device)
        return {"unloaded": names, "busy_devices": deferred}

    def visible(self, job: Job, user: User) -> bool:
        return job.owner == user.name or user.admin

    def status(self, job: Job, viewer: User | None = None) -> dict[str, Any]:
        own = viewer is None or viewer.name == job.owner
        spec = _jsonable(job.spec.to_dict())
        spec["inputs"] = {k: (job.input_names.get(k, v) if own else k) for k, v in spec["inputs"].items()}
        return {"id": job.id, "owner": job.owner, "task": job.spec.task, "state": job.state, "phase": job.phase,
                "step": job.step, "total": job.total, "eta_s": job.eta_s, "message": job.message, "error": job.error,
                "error_kind": job.error_kind, "warnings": job.warnings, "position": self.position(job), "results": job.results,
                "preview_step": job.preview_step, "spec": spec, "device": job.device,
                "created": job.created, "finished": job.finished}

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def close(self) -> None:
        self._stop.set()  # no row is written after this: a running job is failed at the next start
        for device, job_id in self.running.items():
            if job_id:
                log.warning("stopping while job %s runs on %s; it is failed at the next start", job_id, device)
        with self.lock:
            self.store.close()
        self._unlock()


def _lock_folder(folder: Path) -> Any:
    """An exclusive lock on ``folder/.lock`` held while the service lives: two servers sharing one
    work folder would fail each other's jobs and delete each other's uploads."""
    fh = open(os.open(folder / ".lock", os.O_WRONLY | os.O_CREAT, 0o600), "w")
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt locks a byte range instead
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            fh.close()
            raise UserError(f"{folder}: another MedDiffusion server uses this work folder") from None
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise UserError(f"{folder}: another MedDiffusion server uses this work folder") from None
    return fh


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def health_info(service: JobService, viewer: User | None = None) -> dict[str, Any]:
    import torch

    from .registry import models
    from .weights import status as weight_status

    devices = [{"name": "cpu", "label": f"CPU ({os.cpu_count()} cores)", "free_bytes": None, "total_bytes": None}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"name": f"cuda:{i}", "label": torch.cuda.get_device_name(i), "free_bytes": free,
                            "total_bytes": total})
    out_models = []
    for m in models():
        try:
            states = {v["state"] for v in weight_status(m).values()}
            state = "bundled" if states == {"bundled"} else "downloaded" if states == {"cached"} else \
                "partly downloaded" if "cached" in states else "not downloaded"
        except Exception:  # noqa: BLE001 - a broken cache must not break health
            state = "unknown"
        out_models.append({"id": m.id, "title": m.title, "compression": m.compression, "bundled": m.bundled,
                           "state": state, "license": m.license, "classes": m.classes,
                           "defaults": sampling_defaults_for(m)})
    with service.lock:  # a snapshot: submits change the table from other threads
        jobs = dict(service.jobs)
        running = [j for j in service.running.values() if j]
    if viewer is not None and not viewer.admin:
        running = [j for j in running if j in jobs and jobs[j].owner == viewer.name]
    caps = service.limits.caps
    return {"version": __version__, "api": 1, "torch": torch.__version__, "devices": devices, "models": out_models,
            "controlnets": named_controlnets(service.controlnet_dirs),
            "loaded": [k for c in service.caches.values() for k in c.keys()],
            "model_loads": sum(c.loads for c in service.caches.values()),
            "queue": sum(1 for j in jobs.values() if j.state == "queued"),
            "running": running,
            "user": viewer.name if viewer else None, "admin": bool(viewer and viewer.admin),
            "limits": {"max_upload_bytes": service.limits.max_upload_bytes,
                       **{k: getattr(caps, k) for k in caps.__dataclass_fields__}}}


# -- metrics ----------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app, in its own registry (no process-wide state)."""

    def __init__(self, service_ref: Callable[[], JobService]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.queue = Gauge("meddiffusion_queue_length", "jobs waiting", registry=self.registry)
        self.queue.set_function(lambda: service_ref().waiting())
        self.running = Gauge("meddiffusion_running_jobs", "jobs running", registry=self.registry)
        self.running.set_function(lambda: sum(1 for j in service_ref().running.values() if j))
        self.duration = Histogram("meddiffusion_job_duration_seconds", "wall time of finished jobs", ["task"],
                                  buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, float("inf")),
                                  registry=self.registry)
        self.jobs = Counter("meddiffusion_jobs_finished", "jobs that ended, by task and state", ["task", "state"],
                            registry=self.registry)
        self.failures = Counter("meddiffusion_job_failures", "jobs that failed, by task", ["task"],
                                registry=self.registry)
        self.refused = Counter("meddiffusion_auth_failures", "requests refused for a missing or wrong token",
                               registry=self.registry)
        self.gpu = Gauge("meddiffusion_gpu_memory_allocated_bytes", "GPU memory held by this process", ["device"],
                         registry=self.registry)

    def finished(self, job: Job) -> None:
        self.jobs.labels(job.spec.task, job.state).inc()
        if job.state == "failed":
            self.failures.labels(job.spec.task).inc()
        if job.state == "done" and job.started is not None:
            self.duration.labels(job.spec.task).observe(time.monotonic() - job.started)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        try:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    self.gpu.labels(f"cuda:{i}").set(torch.cuda.memory_allocated(i))
        except Exception:  # noqa: BLE001 - metrics never fail a scrape
            pass
        return generate_latest(self.registry)


# -- the gate: authentication, rate limit, audit, body limits, faults ---------------------------------------
def _action(method: str, path: str) -> tuple[str | None, str | None]:
    """(audited action, job id) of a request path under /v1."""
    parts = path.strip("/").split("/")
    job = parts[2] if len(parts) >= 3 and parts[:2] == ["v1", "jobs"] and JOB_ID_RE.fullmatch(parts[2]) else None
    if method == "POST" and parts == ["v1", "jobs"]:
        return "submit", None
    if method == "POST" and len(parts) == 4 and parts[3] == "cancel":
        return "cancel", job
    if method == "DELETE" and len(parts) == 3:
        return "delete", job
    if method == "GET" and len(parts) == 5 and parts[3] == "results":
        return "download", job
    if method == "GET" and len(parts) == 4 and parts[3] == "preview":
        return "preview", job
    if method == "POST" and parts == ["v1", "unload"]:
        return "unload", None
    return None, job


async def _send_json(send: Any, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


class Gate:
    """Pure ASGI middleware in front of the app: rate limit and token check on every request (no
    route, redirect or 404 is reached without a token), the audit line, the body limits (size and
    stall time-out) and the last catch of faults (500 with an id, logged once)."""

    def __init__(self, app: Any, users: Users, limits: Limits, audit: AuditLog, limiter: FailureLimiter,
                 metrics: Metrics | None = None):
        self.app, self.users, self.limits, self.audit, self.limiter = app, users, limits, audit, limiter
        self.metrics = metrics
        self._locked: dict[str, float] = {}

    def _first_refusal(self, addr: str) -> bool:
        now = time.monotonic()
        last = self._locked.get(addr)
        if last is not None and now - last < self.limits.auth_window_s:
            return False
        if len(self._locked) >= 10000:
            self._locked.clear()
        self._locked[addr] = now
        return True

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        addr = (scope.get("client") or ("-",))[0]
        method, path = scope["method"], scope["path"]
        action, job = _action(method, path)
        retry = self.limiter.retry_after(addr)
        if retry is not None:
            if self._first_refusal(addr):  # one audit line per lockout, not one per request
                self.audit.record(addr, None, "locked out", job, 429)
            return await _send_json(send, 429, f"too many failed sign-ins from this address; try again in "
                                               f"{retry:.0f} s", {"Retry-After": str(int(retry + 0.999))})
        headers = dict(scope.get("headers") or [])
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        user = self.users.authenticate(given) if scheme.lower() == "bearer" and given.strip() else None
        if user is None:
            self.limiter.failed(addr)
            if self.metrics is not None:
                self.metrics.refused.inc()
            self.audit.record(addr, None, "refused", job, 401)
            return await _send_json(send, 401, "missing or wrong token", {"WWW-Authenticate": "Bearer"})
        scope.setdefault("state", {})["user"] = user

        status = 0
        seen = 0
        body_done = False

        async def guarded_receive() -> dict:
            nonlocal seen, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_timeout_s)
            except asyncio.TimeoutError:
                raise _BodyStalled() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limits.max_upload_bytes:
                    raise _TooLarge()
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except Exception as exc:  # noqa: BLE001 - the last catch: one 500 with an id, logged once
            eid = getattr(exc, "meddiffusion_error_id", None)
            if eid is None:
                eid = uuid.uuid4().hex[:12]
                log.error("request %s %s failed (error id %s):\n%s", method, path, eid, traceback.format_exc())
            if not status:
                status = 500
                await _send_json(send, 500, f"internal error (id {eid}); the server log has the details")
        finally:
            state = scope.get("state", {})
            if action is not None or status >= 400:
                self.audit.record(addr, user.name, action or "refused", state.get("job", job), status)


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for the request line and headers: a connection that
    has not sent a whole request head ``seconds`` after it opened (or after its last answer) is
    closed. uvicorn has no such option; slow clients would otherwise hold sockets for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            marker = self.cycle  # before super(): it may start a pipelined request's cycle
            super().on_response_complete()
            self._arm_head_deadline(marker)

        def _arm_head_deadline(self, marker: Any = None) -> None:
            self.loop.call_later(seconds, self._head_deadline, marker)

        def _head_deadline(self, marker: Any) -> None:
            if self.cycle is marker and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


# -- uploads --------------------------------------------------------------------------------------------------
class _FormReader:
    """Streams a multipart body: the ``spec`` part into memory (at most :data:`MAX_SPEC_PART`
    bytes), file parts straight into the job folder as ``<field><suffix>`` (0600). Nothing goes
    to a shared temporary folder, and a refused upload leaves nothing open."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.spec: bytearray | None = None
        self.files: dict[str, tuple[str, Path]] = {}
        self.parts = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._name: str | None = None
        self._fh: Any = None
        self.ended = False

    def callbacks(self) -> dict[str, Callable]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field_cb,
                "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _end(self) -> None:
        self.ended = True

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            raise HTTPException(400, f"too many parts in the upload (at most {MAX_FORM_PARTS})")
        self._headers, self._name = {}, None

    def _header_field_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _disp, opts = parse_options_header(self._headers.get("content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        if name == "spec":
            if self.spec is not None:
                raise HTTPException(400, "the upload has two 'spec' parts")
            self.spec, self._name = bytearray(), "spec"
            return
        if name not in INPUT_NAMES:
            raise HTTPException(400, f"unexpected upload field {name[:40]!r}; send 'spec' and the file 'input' "
                                     "(evaluate: 'prediction' and 'reference')")
        if name in self.files:
            raise HTTPException(400, f"the upload has two {name!r} files")
        fname = (filename or b"").decode("utf-8", "replace")[:255]
        low = fname.lower()
        suffix = next((s for s in UPLOAD_SUFFIXES if low.endswith(s)), None)
        if suffix is None:
            if low.endswith((*DETACHED_SUFFIXES, ".hdr", ".img")):
                raise HTTPException(415, f"input {name!r}: detached headers and header/image pairs cannot be "
                                         "uploaded; send a single file (.nrrd, .nii.gz, .nii, .mha)")
            raise HTTPException(415, f"input {name!r} ({_short(fname)[:60]!r}) is not a volume file; send NRRD, "
                                     f"NIfTI or MHA ({', '.join(UPLOAD_SUFFIXES)})")
        path = self.folder / f"{name}{suffix}"  # our own name: never the client's path
        self._fh = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self.files[name] = (fname, path)
        self._name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "spec":
            self.spec += data[start:end]
            if len(self.spec) > MAX_SPEC_PART:
                raise HTTPException(413, f"the job spec is too large (at most {MAX_SPEC_PART // 1024} KiB)")
        elif self._fh is not None:
            self._fh.write(data[start:end])

    def _part_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


async def _read_body(request: Request, folder: Path) -> tuple[bytes, dict[str, tuple[str, Path]]]:
    """(spec bytes, {field: (client file name, saved path)}) of a submission: multipart with a
    ``spec`` part and file parts, or a JSON spec alone (``application/json``)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype == b"application/json":
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_SPEC_PART:
                raise HTTPException(413, f"the job spec is too large (at most {MAX_SPEC_PART // 1024} KiB)")
        return bytes(body), {}
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise HTTPException(415, "send the job as multipart/form-data (a 'spec' part and input files) or as a "
                                 "JSON spec (application/json)")
    reader = _FormReader(folder)
    try:
        parser = MultipartParser(opts[b"boundary"], reader.callbacks(), max_header_count=8, max_header_size=1024)
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except HTTPException:
                raise
            except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors
                raise HTTPException(400, f"could not read the upload ({type(exc).__name__})") from exc
        try:
            parser.finalize()
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(400, f"could not read the upload ({type(exc).__name__})") from exc
    finally:
        reader.close()
    if not reader.ended:
        raise HTTPException(400, "the upload ended before its closing boundary")
    if reader.spec is None:
        raise HTTPException(400, "the request needs a 'spec' field with the job spec as JSON")
    return bytes(reader.spec), reader.files


# -- the app ----------------------------------------------------------------------------------------------------
ERRORS = {400: "bad request (one line says what)", 401: "missing or wrong token", 403: "an admin's action",
          404: "no such job (or not yours)", 408: "the request body stalled",
          409: "conflict (job not finished, or id in use)", 413: "upload or spec too large",
          415: "not a readable single-file volume", 429: "too many failed sign-ins from this address",
          500: "internal error (with an id the server log has)", 503: "the queue is full"}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus what routes taking a raw request cannot say themselves: the job
    request body, the bearer security scheme, the error answers each route gives and the media
    types of its successful answers."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="MedDiffusion job service. Every request needs a bearer token.")
    schema = request_schema(ref_template="#/components/schemas/{model}")  # one request model per task
    comps = doc.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    schemas.update(schema.pop("$defs", {}))
    schemas["JobRequest"] = schema
    schemas["Error"] = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
    comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    doc["security"] = [{"bearer": []}]
    ref = {"$ref": "#/components/schemas/JobRequest"}
    paths = doc["paths"]
    post = paths["/v1/jobs"]["post"]
    post["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": ref},
        "multipart/form-data": {"schema": {"type": "object", "required": ["spec"], "properties": {
            "spec": ref, **{name: {"type": "string", "format": "binary"} for name in INPUT_NAMES}}},
            "encoding": {"spec": {"contentType": "application/json"}}}}}
    post["parameters"] = [{"name": "X-Job-Id", "in": "header", "required": False,
                           "schema": {"type": "string", "pattern": f"^{JOB_ID_RE.pattern}$"}}]
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    for path in ("/v1/jobs/{job_id}/results/{name}", "/v1/jobs/{job_id}/preview"):
        paths[path]["get"]["responses"]["200"]["content"] = binary
    paths["/v1/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    common = (400, 401, 404, 429, 500)
    extra = {("/v1/jobs", "post"): (408, 409, 413, 415, 503), ("/v1/unload", "post"): (403,),
             ("/v1/jobs/{job_id}/results/{name}", "get"): (409,)}
    for path, item in paths.items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for code in common + extra.get((path, method), ()):
                answer = {"description": ERRORS[code], "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                if code in (429, 503):
                    answer["headers"] = RETRY_AFTER
                responses.setdefault(str(code), answer)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return doc


def create_app(token: str | None = None, work_dir: str | Path | None = None, limits: Limits | None = None,
               tokens_file: str | Path | None = None) -> FastAPI:
    """The ASGI app. Either ``token`` (one user, an admin) or ``tokens_file`` (users)."""
    if tokens_file is None and not (token or "").strip():
        raise UserError("the job service needs a non-empty token")
    users = Users(tokens_file=tokens_file) if tokens_file is not None else Users(token=token)
    limits = limits or Limits()
    own_dir = work_dir is None
    work = Path(work_dir).resolve() if work_dir else Path(tempfile.mkdtemp(prefix="meddiffusion-jobs-")).resolve()
    service: JobService | None = None
    metrics = Metrics(lambda: service)
    service = JobService(work, limits, metrics)
    audit = AuditLog(work / "audit.log")
    limiter = FailureLimiter(limits.auth_failures, limits.auth_window_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        service.close()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    # FastAPI's own /docs and /openapi.json routes would bypass the token: the schema is served
    # below as an ordinary (authorised) endpoint instead. No slash redirects: a redirect built
    # from the client's Host header is no answer to give anyone.
    app = FastAPI(title="MedDiffusion job service", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan, redirect_slashes=False)
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": _short(str(exc.detail), work)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, exc: _TooLarge) -> JSONResponse:  # raised by the gate's receive
        return JSONResponse({"detail": f"upload too large (the limit is {limits.max_upload_bytes / 2 ** 20:.0f} MiB)"},
                            413)

    @app.exception_handler(_BodyStalled)
    async def stalled(request: Request, exc: _BodyStalled) -> JSONResponse:
        return JSONResponse({"detail": f"the request body stalled for {limits.body_timeout_s:.0f} s"}, 408)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "malformed request"}, 400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:  # tracebacks stay in the log
        eid = uuid.uuid4().hex[:12]
        exc.meddiffusion_error_id = eid  # type: ignore[attr-defined] - the gate does not log it twice
        log.error("request %s %s failed (error id %s):\n%s", request.method, request.url.path, eid,
                  traceback.format_exc())
        return JSONResponse({"detail": f"internal error (id {eid}); the server log has the details"}, 500)

    def user_of(request: Request) -> User:
        return request.scope["state"]["user"]

    def job_or_404(job_id: str, user: User) -> Job:
        job = service.jobs.get(job_id)
        if job is None or not service.visible(job, user) or job.state == "receiving":
            raise HTTPException(404, f"no job {job_id[:40]!r} (finished jobs are kept {limits.result_ttl_s:.0f} s)")
        return job

    @app.get("/v1/health")
    def health(request: Request) -> dict:
        return health_info(service, user_of(request))

    @app.get("/v1/metrics", response_class=Response)
    def metrics_route() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return _openapi(app)

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> dict:
        user = user_of(request)
        if service.waiting() >= limits.max_queue:  # before a byte of the body is read
            raise _queue_full(limits)
        length = request.headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            raise HTTPException(400, "bad Content-Length header")
        if length is not None and int(length) > limits.max_upload_bytes:
            raise HTTPException(413, f"upload too large ({int(length) / 2 ** 20:.0f} MiB; the limit is "
                                     f"{limits.max_upload_bytes / 2 ** 20:.0f} MiB)")
        wanted = request.headers.get("x-job-id")
        if wanted is not None and not JOB_ID_RE.fullmatch(wanted):
            raise HTTPException(400, "X-Job-Id must be 16 to 32 lowercase hex digits")
        job_id = wanted or uuid.uuid4().hex[:16]
        with service.lock:
            if job_id in service.jobs or (user.name, job_id) in service.tombstones or (work / job_id).exists():
                raise HTTPException(409, f"job id {job_id} is in use or was deleted; choose another")
            folder = work / job_id
            folder.mkdir(mode=0o700)
            job = Job(job_id, JobSpec("generate"), "cpu", folder, state="receiving", phase="receiving",
                      message="receiving the upload", owner=user.name)
            service.jobs[job_id] = job
        request.scope["state"]["job"] = job_id
        try:
            try:
                await _submit(request, job, user)
            except ClientDisconnect:
                log.info("job %s: the client went away during the upload", job_id)
                raise HTTPException(499, "the client went away during the upload") from None
            service.enqueue(job)  # refuses a job its client deleted while the upload was read
        except BaseException:
            with service.lock:
                if service.jobs.get(job_id) is job:
                    del service.jobs[job_id]
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("job %s queued for %s: %s on %s", job_id, user.name, job.spec.task, job.device)
        return service.status(job, user)

    async def _submit(request: Request, job: Job, user: User) -> None:
        from .checks import check_input

        raw, files = await _read_body(request, job.folder)
        try:
            spec = await run_in_threadpool(parse_spec, raw, limits.caps, service.controlnet_dirs)
        except UserError as exc:
            raise HTTPException(400, fielded(exc)) from exc
        for key, why in (("force", "run past the memory check"), ("compile", "start an ahead-of-time build")):
            if spec.params.get(key) and not user.admin:  # either would let one user take the machine
                raise HTTPException(400, f"{key}: only an admin may {why} on this server")
        missing = [n for n in spec.inputs if n not in files]
        if missing:
            raise HTTPException(400, f"input {missing[0]!r} was not uploaded (send it as a file field named "
                                     f"{missing[0]!r})")
        extra = [n for n in files if n not in spec.inputs]
        if extra:
            raise HTTPException(400, f"unexpected upload field(s): {', '.join(extra)}")
        try:
            device = await run_in_threadpool(service.device_for, spec)
        except (UserError, ResourceError) as exc:  # a device this server does not have
            raise HTTPException(400, fielded(exc)) from exc
        spec = spec.with_params(device=device)  # what the worker runs on is what the spec says
        warnings = []
        spec = spec.with_inputs({name: name for name in spec.inputs})  # the uploads, stored under their field names
        pair: dict[str, Any] = {}
        for name, (fname, path) in files.items():
            vol = await run_in_threadpool(_read_upload, path, name)
            job.input_names[name] = fname or name
            try:
                found = await run_in_threadpool(check_input, spec, vol, limits.caps, service.controlnet_dirs)
            except UserError as exc:
                raise HTTPException(400, fielded(exc)) from exc
            warnings += [f"warning: {w}" for w in found]
            if spec.task == "evaluate":  # the two are checked together below
                pair[name] = vol
            del vol  # queued jobs keep their inputs on disk only; the worker reads them again
        if pair:
            from .evaluation.paired import check_pair

            try:
                await run_in_threadpool(check_pair, pair["prediction"], pair["reference"],
                                        labels=bool(spec.params.get("labels")), resample=bool(spec.params.get("resample")))
            except UserError as exc:
                raise HTTPException(400, fielded(exc)) from exc
            pair.clear()
        job.spec, job.device, job.warnings = spec, device, warnings
        job.created = time.time()

    def _read_upload(path: Path, name: str) -> Any:
        from .data.volumes import read_volume

        try:
            return read_volume(path, max_bytes=limits.max_upload_bytes, max_voxels=limits.caps.max_input_voxels,
                               name=name)
        except UserError as exc:
            raise HTTPException(415 if "too large" not in str(exc) else 413,
                                f"input {name!r} could not be read as a volume: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any reader fault: the file is unreadable
            raise HTTPException(415, f"input {name!r} could not be read as a volume "
                                     f"({type(exc).__name__})") from exc

    @app.get("/v1/jobs")
    def list_jobs(request: Request) -> list:
        user = user_of(request)
        with service.lock:
            jobs = list(service.jobs.values())
        return [service.status(j, user) for j in jobs if service.visible(j, user) and j.state != "receiving"]

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str, request: Request) -> dict:
        user = user_of(request)
        return service.status(job_or_404(job_id, user), user)

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, request: Request) -> dict:
        user = user_of(request)
        job = job_or_404(job_id, user)
        service.cancel(job)
        return service.status(job, user)

    @app.delete("/v1/jobs/{job_id}", status_code=204)
    def delete(job_id: str, request: Request) -> Response:
        user = user_of(request)
        job = service.jobs.get(job_id)
        if job is not None and job.state == "receiving" and job.owner == user.name:
            service.delete(job)  # the submit handler sees it and drops the upload
            return Response(status_code=204)
        if job is None and JOB_ID_RE.fullmatch(job_id):
            service.bury(user.name, job_id)  # an interrupted submit may still arrive under this id
        service.delete(job_or_404(job_id, user))
        return Response(status_code=204)

    def owned(job_id: str, user: User) -> Job:
        job = job_or_404(job_id, user)
        if job.owner != user.name:
            raise HTTPException(404, f"no job {job_id[:40]!r} of yours (results go to their owner only)")
        return job

    @app.get("/v1/jobs/{job_id}/results/{name}")
    def result(job_id: str, name: str, request: Request) -> FileResponse:
        job = owned(job_id, user_of(request))
        if job.state != "done":
            raise HTTPException(409, f"job {job_id} is {job.state}; results exist only for finished jobs")
        if name not in {r["name"] for r in job.results}:
            raise HTTPException(404, f"job {job_id} has no result {name[:60]!r}; it has "
                                     f"{', '.join(r['name'] for r in job.results)}")
        return FileResponse(job.folder / "results" / name, media_type="application/octet-stream", filename=name)

    @app.get("/v1/jobs/{job_id}/preview")
    def preview(job_id: str, request: Request) -> Response:
        job = owned(job_id, user_of(request))
        try:  # read whole: the worker replaces the file (atomically) while a job runs
            data = (job.folder / "preview.nrrd").read_bytes() if job.preview_step is not None else None
        except FileNotFoundError:
            data = None
        if data is None or job.state in ("failed", "cancelled"):
            raise HTTPException(404, "no preview yet" if job.state in ("queued", "running") else
                                f"no preview: the job is {job.state}")
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="preview.nrrd"'})

    @app.post("/v1/unload")
    def unload(request: Request) -> dict:
        if not user_of(request).admin:
            raise HTTPException(403, "only an admin may unload the models")
        return service.unload()

    return Gate(app, users, limits, audit, limiter, metrics)


def serve(host: str = "127.0.0.1", port: int = 8765, token: str | None = None, work_dir: str | Path | None = None,
          limits: Limits | None = None, exit_with_parent: int | None = None, log_level: str = "info",
          tokens_file: str | Path | None = None, tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Run the service until interrupted (blocking). ``tls_cert``/``tls_key``: serve HTTPS."""
    import uvicorn

    if exit_with_parent:
        threading.Thread(target=_watch_parent, args=(exit_with_parent,), daemon=True).start()
    limits = limits or Limits()
    app = create_app(token, work_dir, limits, tokens_file)
    # proxy_headers=False: X-Forwarded-For from any local process would otherwise pick the address
    # that the sign-in limit and the audit log see
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, proxy_headers=False,
                http=header_timeout_protocol(limits.header_timeout_s), timeout_keep_alive=5,
                ssl_certfile=tls_cert, ssl_keyfile=tls_key)


def _watch_parent(pid: int) -> None:
    """Exit when the process that started us is gone (Slicer quit or crashed)."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if handle:
            kernel32.WaitForSingleObject(handle, 0xFFFFFFFF)  # INFINITE
    else:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)  # signal 0: existence check only (POSIX)
            except ProcessLookupError:
                break
            except PermissionError:
                continue
    log.warning("parent process %d is gone; stopping", pid)
    os._exit(0)


__all__ = ["create_app", "serve", "Limits", "JobService", "Job", "Metrics", "Gate"]
