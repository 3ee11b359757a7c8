"""The MedDiffusion job service (``meddiffusion serve``): FastAPI + uvicorn.

Runs generation and the ControlNet tasks in its own process, on this computer (the Slicer module
starts one) or on a lab GPU machine. One job at a time per device, first in first out; models stay
loaded between jobs until ``POST /v1/unload``. Every request needs ``Authorization: Bearer TOKEN``
(compared in constant time). The server never opens a path a client sent: inputs arrive as
uploads, models are registry ids or bundled names. Results are written atomically, and a failed or
cancelled job leaves none. Tracebacks go to the server log only; clients get one clear message.

Endpoints (all under ``/v1``; the OpenAPI schema at ``/v1/openapi.json``, with the token): ``GET /health``,
``POST /jobs`` (multipart: ``spec`` JSON + input files), ``GET /jobs``, ``GET /jobs/{id}``,
``POST /jobs/{id}/cancel``, ``GET /jobs/{id}/results/{name}``, ``GET /jobs/{id}/preview``,
``DELETE /jobs/{id}``, ``POST /unload``.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from . import __version__
from .errors import Cancelled, MedDiffusionError, UserError
from .jobs import JobSpec, ModelCache, ProgressEvent, named_controlnets, oom_advice, resolve, run_job

log = logging.getLogger("meddiffusion.server")


@dataclass
class Limits:
    max_upload_bytes: int = 2 * 2 ** 30
    max_queue: int = 16
    result_ttl_s: float = 3600.0


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
    warnings: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    preview_step: int | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    deleted: bool = False


def _user_message(exc: BaseException) -> str | None:
    """The message to show a client for an expected failure, ``None`` for an internal fault."""
    if isinstance(exc, (MedDiffusionError, MemoryError)):
        return str(exc)
    return None


class JobService:
    """Job table, per-device FIFO workers and model caches behind the HTTP layer."""

    def __init__(self, work_dir: Path, limits: Limits):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queues: dict[str, queue.Queue] = {}
        self.caches: dict[str, ModelCache] = {}
        self.running: dict[str, str | None] = {}
        self.busy: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._janitor, name="meddiffusion-janitor", daemon=True).start()

    # -- queue ----------------------------------------------------------------------------------------
    def device_for(self, spec: JobSpec) -> str:
        dev = spec.params.get("device", "auto")
        if dev == "auto":
            import torch

            return "cuda:0" if torch.cuda.is_available() else "cpu"
        return "cuda:0" if dev == "cuda" else dev

    def enqueue(self, job: Job) -> None:
        with self.lock:
            waiting = sum(1 for j in self.jobs.values() if j.state == "queued")
            if waiting >= self.limits.max_queue:
                raise HTTPException(503, f"the queue is full ({self.limits.max_queue} jobs waiting); try again later")
            self.jobs[job.id] = job
            if job.device not in self.queues:
                self.queues[job.device] = queue.Queue()
                self.caches[job.device] = ModelCache()
                self.running[job.device] = None
                self.busy[job.device] = threading.Lock()
                threading.Thread(target=self._worker, args=(job.device,), name=f"meddiffusion-{job.device}",
                                 daemon=True).start()
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
                job.state, job.phase, job.message = "running", "loading", "starting"
            with self.busy[device]:
                self.running[device] = job.id
                try:
                    self._run(job, self.caches[device])
                finally:
                    self.running[device] = None
                    job.inputs.clear()
                    if job.deleted:
                        shutil.rmtree(job.folder, ignore_errors=True)

    def _run(self, job: Job, cache: ModelCache) -> None:
        results_dir = job.folder / "results"

        def progress(ev: ProgressEvent) -> None:
            job.phase, job.step, job.total, job.eta_s, job.message = ev.phase, ev.step, ev.total, ev.eta_s, ev.message
            if ev.notice and ev.notice not in job.warnings:
                job.warnings.append(ev.notice)

        def preview(step: int, vol: Any) -> None:
            from .data.volumes import write_volume

            write_volume(vol, job.folder / "preview.nrrd", overwrite=True)
            job.preview_step = step

        try:
            res = run_job(job.spec, job.inputs, cache=cache, progress=progress, cancel=job.cancel.is_set,
                          preview=preview, resolved=True)
            if job.cancel.is_set():
                raise Cancelled("cancelled")
            job.phase, job.message = "writing", "writing results"
            results_dir.mkdir(exist_ok=True)
            from .data.volumes import write_volume

            written = [{"name": r.name, "meta": _jsonable(r.meta)} for r in res.results]
            for r in res.results:
                write_volume(r.volume, results_dir / r.name)
            if job.cancel.is_set():  # cancelled while writing: nothing stays
                raise Cancelled("cancelled")
            job.results = written
            job.state, job.phase, job.message, job.finished = "done", "done", f"done in {res.seconds:.1f} s", time.time()
            log.info("job %s done in %.1f s", job.id, res.seconds)
        except BaseException as exc:  # noqa: BLE001 - every failure ends the job, the worker lives on
            shutil.rmtree(results_dir, ignore_errors=True)
            (job.folder / "preview.nrrd").unlink(missing_ok=True)
            job.results, job.preview_step = [], None
            job.finished = time.time()
            if isinstance(exc, Cancelled) or type(exc).__name__ == "Cancelled" or job.cancel.is_set():
                job.state, job.phase, job.message = "cancelled", "done", "cancelled"
                log.info("job %s cancelled", job.id)
                return
            job.state, job.phase = "failed", "done"
            if type(exc).__name__ == "OutOfMemoryError":
                job.error = oom_advice(job.spec.params)
            else:
                job.error = _user_message(exc)
            if job.error is None:
                job.error = f"internal error ({type(exc).__name__}); the server log has the details"
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
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
        for j in old:
            shutil.rmtree(j.folder, ignore_errors=True)

    def cancel(self, job: Job) -> None:
        with self.lock:
            job.cancel.set()
            if job.state == "queued":
                job.state, job.phase, job.message, job.finished = "cancelled", "done", "cancelled", time.time()

    def delete(self, job: Job) -> None:
        self.cancel(job)
        with self.lock:
            self.jobs.pop(job.id, None)
            job.deleted = True
            running = job.state == "running"
        if not running:  # a running job's folder goes when its worker lets go of it
            shutil.rmtree(job.folder, ignore_errors=True)

    def unload(self) -> dict[str, Any]:
        names, deferred = [], []
        for device, cache in list(self.caches.items()):
            if self.busy[device].acquire(blocking=False):
                try:
                    names += cache.clear()
                finally:
                    self.busy[device].release()
            else:
                deferred.append(device)
        return {"unloaded": names, "busy_devices": deferred}

    def status(self, job: Job) -> dict[str, Any]:
        return {"id": job.id, "task": job.spec.task, "state": job.state, "phase": job.phase, "step": job.step,
                "total": job.total, "eta_s": job.eta_s, "message": job.message, "error": job.error,
                "warnings": job.warnings, "position": self.position(job), "results": job.results,
                "preview_step": job.preview_step, "spec": _jsonable(job.spec.to_dict()), "device": job.device,
                "created": job.created, "finished": job.finished}

    def close(self) -> None:
        self._stop.set()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def health_info(service: JobService) -> dict[str, Any]:
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
                           "defaults": {"class": m.default_class, **m.sampling_defaults}})
    return {"version": __version__, "torch": torch.__version__, "devices": devices, "models": out_models,
            "controlnets": named_controlnets(),
            "loaded": [k for c in service.caches.values() for k in c.keys()],
            "model_loads": sum(c.loads for c in service.caches.values()),
            "queue": sum(1 for j in service.jobs.values() if j.state == "queued"),
            "running": [j for j in service.running.values() if j]}


class UploadLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes is cut off with 413, whether or
    not the client announced its length (chunked uploads are counted as they arrive)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if started:
                raise
            body = json.dumps({"detail": f"upload too large (the limit is {self.limit / 2 ** 20:.0f} MiB)"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(token: str, work_dir: str | Path | None = None, limits: Limits | None = None) -> FastAPI:
    """The ASGI app. ``token`` is required on every request."""
    if not token:
        raise UserError("the job service needs a non-empty token")
    limits = limits or Limits()
    own_dir = work_dir is None
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="meddiffusion-jobs-"))
    service = JobService(work, limits)
    expected = token.encode()

    def authorised(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        service.close()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    # FastAPI's own /docs and /openapi.json routes would bypass the token: the schema is served
    # below as an ordinary (authorised) endpoint instead.
    app = FastAPI(title="MedDiffusion job service", version=__version__, dependencies=[Depends(authorised)],
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(UploadLimit, limit=limits.max_upload_bytes)
    app.state.service = service

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:  # tracebacks stay in the log
        log.error("request %s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server log has the details"}, 500)

    def job_or_404(job_id: str) -> Job:
        job = service.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept {limits.result_ttl_s:.0f} s)")
        return job

    @app.get("/v1/health")
    def health() -> dict:
        return health_info(service)

    @app.get("/v1/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            raise HTTPException(400, "bad Content-Length header")
        if length is not None and int(length) > limits.max_upload_bytes:
            raise HTTPException(413, f"upload too large ({int(length) / 2 ** 20:.0f} MiB; the limit is "
                                     f"{limits.max_upload_bytes / 2 ** 20:.0f} MiB)")
        job_id = uuid.uuid4().hex[:16]
        folder = work / job_id
        folder.mkdir()
        try:
            return await _submit(request, job_id, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    async def _submit(request: Request, job_id: str, folder: Path) -> dict:
        from starlette.datastructures import UploadFile

        try:
            form = await request.form(max_files=8, max_fields=8)
        except (HTTPException, _TooLarge):
            raise
        except Exception as exc:  # noqa: BLE001 - malformed multipart bodies
            raise HTTPException(400, f"could not read the upload: {exc}") from exc
        raw = form.get("spec")
        if raw is None:
            raise HTTPException(400, "the request needs a 'spec' field with the job spec as JSON")
        try:
            doc = json.loads(raw if isinstance(raw, str) else (await raw.read()).decode())
            spec = await run_in_threadpool(resolve, JobSpec.from_dict(doc), True)
        except json.JSONDecodeError as exc:
            raise HTTPException(400, f"the job spec is not valid JSON: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            msg = _user_message(exc)
            if msg is None:
                raise
            raise HTTPException(400, msg) from exc
        inputs = {}
        for name in spec.inputs:
            upload = form.get(name)
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, f"input {name!r} was not uploaded (send it as a file field named {name!r})")
            inputs[name] = await _read_upload(upload, name, folder)
            spec.inputs[name] = upload.filename or name
        extra = [k for k, v in form.multi_items() if k != "spec" and k not in spec.inputs]
        if extra:
            raise HTTPException(400, f"unexpected upload field(s): {', '.join(extra)}")
        from .jobs import check_input

        warnings = []
        for vol in inputs.values():
            try:
                warnings += [f"warning: {w}" for w in await run_in_threadpool(check_input, spec, vol)]
            except UserError as exc:
                raise HTTPException(400, str(exc)) from exc
        device = await run_in_threadpool(service.device_for, spec)
        job = Job(job_id, spec, device, folder, inputs, warnings=warnings)
        service.enqueue(job)
        log.info("job %s queued: %s on %s", job_id, spec.task, job.device)
        return service.status(job)

    async def _read_upload(upload: Any, name: str, folder: Path) -> Any:
        from .data.volumes import SUFFIXES, read_volume

        fname = (upload.filename or "").lower()
        suffix = next((s for s in SUFFIXES if fname.endswith(s)), None)
        if suffix is None:
            raise HTTPException(415, f"input {name!r} ({upload.filename!r}) is not a volume file; send NRRD, NIfTI "
                                     f"or MHA ({', '.join(SUFFIXES)})")
        if suffix in (".nhdr", ".mhd"):
            raise HTTPException(415, f"input {name!r}: detached headers ({suffix}) cannot be uploaded; send a single "
                                     "file (.nrrd, .nii.gz, .mha)")
        path = folder / f"{name}{suffix}"  # our own name: never the client's path
        size = 0
        with open(path, "wb") as fh:
            while block := await upload.read(1 << 20):
                size += len(block)
                if size > limits.max_upload_bytes:
                    raise HTTPException(413, f"upload too large (the limit is {limits.max_upload_bytes / 2 ** 20:.0f} MiB)")
                fh.write(block)
        try:
            vol = await run_in_threadpool(read_volume, path)  # off the event loop: other requests go on
        except Exception as exc:  # noqa: BLE001 - SimpleITK raises RuntimeError for unreadable files
            raise HTTPException(415, f"input {name!r} ({upload.filename}) could not be read as a volume: "
                                     f"{_first_line(exc)}") from exc
        return vol

    @app.get("/v1/jobs")
    def list_jobs() -> list:
        return [service.status(j) for j in list(service.jobs.values())]

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str) -> dict:
        return service.status(job_or_404(job_id))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict:
        job = job_or_404(job_id)
        service.cancel(job)
        return service.status(job)

    @app.delete("/v1/jobs/{job_id}", status_code=204)
    def delete(job_id: str) -> Response:
        service.delete(job_or_404(job_id))
        return Response(status_code=204)

    @app.get("/v1/jobs/{job_id}/results/{name}")
    def result(job_id: str, name: str) -> FileResponse:
        job = job_or_404(job_id)
        if job.state != "done":
            raise HTTPException(409, f"job {job_id} is {job.state}; results exist only for finished jobs")
        if name not in {r["name"] for r in job.results}:
            raise HTTPException(404, f"job {job_id} has no result {name!r}; it has "
                                     f"{', '.join(r['name'] for r in job.results)}")
        return FileResponse(job.folder / "results" / name, media_type="application/octet-stream", filename=name)

    @app.get("/v1/jobs/{job_id}/preview")
    def preview(job_id: str) -> Response:
        job = job_or_404(job_id)
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
    def unload() -> dict:
        return service.unload()

    return app


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return next((t.strip() for t in reversed(text) if t.strip()), type(exc).__name__)[:300]


def serve(host: str = "127.0.0.1", port: int = 8765, token: str | None = None, work_dir: str | Path | None = None,
          limits: Limits | None = None, exit_with_parent: int | None = None, log_level: str = "info") -> None:
    """Run the service until interrupted (blocking)."""
    import uvicorn

    if exit_with_parent:
        threading.Thread(target=_watch_parent, args=(exit_with_parent,), daemon=True).start()
    app = create_app(token or "", work_dir, limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


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


__all__ = ["create_app", "serve", "Limits", "JobService"]
