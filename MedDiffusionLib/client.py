"""Client of the MedDiffusion job service (``meddiffusion serve``), standard library only.

Slicer's own Python (or any Python without torch) can drive a server on this computer or on a lab
GPU machine with it, and :class:`LocalServer` starts and stops a server as a child process::

    from MedDiffusionLib.client import Client, LocalServer

    server = LocalServer()               # python -m MedDiffusionLib.cli serve on 127.0.0.1, random port/token
    server.start()
    client = server.client()
    job = client.submit({"task": "generate", "params": {"sampler": "ddim", "steps": 20}})
    client.wait(job["id"], progress=lambda s: print(s["phase"], s["step"], s["total"]))
    client.download(job["id"], "result_0.nrrd", "sample.nrrd")
    server.stop()

Never import torch, numpy or any other third-party package here.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, urlsplit

API = "/v1"
TOKEN_ENV = "MEDDIFFUSION_TOKEN"
TERMINAL = ("done", "failed", "cancelled")


class ServiceError(Exception):
    """The service answered with an error (``status`` = HTTP code) or could not be used."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class ServiceUnavailable(ServiceError):
    """No answer: the server is not running, stopped, or the address is wrong."""


class JobFailed(ServiceError):
    """The job ended with an error; ``message`` is the server's explanation."""


class JobCancelled(ServiceError):
    """The job was cancelled."""


class Client:
    """One MedDiffusion service at ``url`` (``http://host:port`` or ``https://...`` behind a proxy)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceError(f"not a service address: {url!r} (expected http://HOST:PORT)")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.timeout = timeout

    # -- transport ------------------------------------------------------------------------------------
    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout if timeout is None else timeout)

    def _request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None, stream_to: Path | None = None) -> Any:
        hdrs = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        hdrs.update(headers or {})
        conn = self._connection(timeout)
        try:
            try:
                conn.request(method, self._prefix + API + path, body=body, headers=hdrs)
                resp = conn.getresponse()
            except (ConnectionError, socket.timeout, TimeoutError, OSError, http.client.HTTPException) as exc:
                raise ServiceUnavailable(f"cannot reach the MedDiffusion service at {self.url} "
                                         f"({type(exc).__name__}: {exc}); is it running?") from exc
            if resp.status >= 400:
                raw = resp.read()
                try:
                    detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
                except (ValueError, AttributeError):
                    detail = raw.decode(errors="replace")
                if not isinstance(detail, str):
                    detail = json.dumps(detail)
                if resp.status == 401:
                    detail = f"{detail} (check the service token)"
                raise ServiceError(detail, resp.status)
            if stream_to is not None:
                return self._save(resp, stream_to)
            raw = resp.read()
            if not raw:
                return None
            return json.loads(raw)
        except (ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(f"the MedDiffusion service at {self.url} stopped answering "
                                     f"({type(exc).__name__}: {exc})") from exc
        finally:
            conn.close()

    @staticmethod
    def _save(resp: http.client.HTTPResponse, dest: Path) -> Path:
        dest = Path(dest)
        tmp = str(dest.parent / f".{dest.name}.{uuid.uuid4().hex}.part")
        # created with 0o666 so the process umask applies (never toggled: other threads may create files)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                while block := resp.read(1 << 20):
                    fh.write(block)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return dest

    # -- endpoints ------------------------------------------------------------------------------------
    def health(self, timeout: float | None = None) -> dict:
        """Version, devices, models (with download state), ControlNets, loaded models, queue."""
        return self._request("GET", "/health", timeout=timeout)

    def submit(self, spec: dict, files: dict[str, str | Path] | None = None, timeout: float | None = None) -> dict:
        """Submit a job spec with its input files (``{input name: local path}``); returns its status.
        ``timeout`` bounds each socket operation (default: the client's)."""
        boundary = uuid.uuid4().hex
        parts: list[tuple[bytes, Path | bytes]] = []
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n'
                "Content-Type: application/json\r\n\r\n").encode()
        parts.append((head, json.dumps(spec).encode() + b"\r\n"))
        for name, path in (files or {}).items():
            path = Path(path)
            if not path.is_file():
                raise ServiceError(f"{path}: input file not found")
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{quote(name)}"; '
                    f'filename="{quote(path.name)}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
            parts.append((head, path))
        tail = f"--{boundary}--\r\n".encode()
        length = len(tail) + sum(len(h) + (p.stat().st_size + 2 if isinstance(p, Path) else len(p)) for h, p in parts)

        def body() -> Iterator[bytes]:
            for h, p in parts:
                yield h
                if isinstance(p, Path):
                    with open(p, "rb") as fh:
                        while block := fh.read(1 << 20):
                            yield block
                    yield b"\r\n"
                else:
                    yield p
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
        return self._request("POST", "/jobs", body=body(), headers=headers, timeout=timeout)

    def status(self, job_id: str, timeout: float | None = None) -> dict:
        return self._request("GET", f"/jobs/{quote(job_id)}", timeout=timeout)

    def jobs(self) -> list[dict]:
        return self._request("GET", "/jobs")

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/jobs/{quote(job_id)}/cancel")

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/jobs/{quote(job_id)}")

    def unload(self) -> dict:
        """Drop the models the service keeps loaded and free their GPU memory."""
        return self._request("POST", "/unload")

    def download(self, job_id: str, name: str, dest: str | Path) -> Path:
        """Save one result file to ``dest`` (written to a temporary file, then renamed)."""
        return self._request("GET", f"/jobs/{quote(job_id)}/results/{quote(name)}", stream_to=Path(dest))

    def preview(self, job_id: str, dest: str | Path) -> Path | None:
        """Save the latest live preview (NRRD) to ``dest``; ``None`` when there is none yet."""
        try:
            return self._request("GET", f"/jobs/{quote(job_id)}/preview", stream_to=Path(dest))
        except ServiceError as exc:
            if exc.status == 404:
                return None
            raise

    def wait(self, job_id: str, progress: Callable[[dict], None] | None = None, poll: float = 0.25,
             timeout: float | None = None) -> dict:
        """Poll until the job ends; ``progress(status)`` after each poll. Raises :class:`JobFailed`
        or :class:`JobCancelled`, or :class:`ServiceUnavailable` when the server goes away."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if progress is not None:
                progress(st)
            if st["state"] == "done":
                return st
            if st["state"] == "failed":
                raise JobFailed(st.get("error") or "the job failed", None)
            if st["state"] == "cancelled":
                raise JobCancelled("the job was cancelled", None)
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(f"job {job_id} did not finish within {timeout} s")
            time.sleep(poll)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """A ``meddiffusion serve`` child process on 127.0.0.1 with a free port and a random token.

    ``python``: the interpreter to run it with (default: this one), e.g. a conda env with CUDA torch.
    The child imports the same ``MedDiffusionLib`` as this process (its folder is put on
    ``PYTHONPATH``) and exits by itself when this process dies. ``env`` is laid over this process's
    environment; a value of ``None`` removes that variable."""

    def __init__(self, python: str | None = None, port: int | None = None, token: str | None = None,
                 env: dict[str, str | None] | None = None, log_file: str | Path | None = None,
                 extra_args: list[str] | None = None):
        import secrets

        self.python = python or sys.executable
        self.port = port
        self.token = token or secrets.token_urlsafe(32)
        self.env = dict(env or {})
        self.log_file = Path(log_file) if log_file else Path(tempfile.gettempdir()) / f"meddiffusion-serve-{os.getpid()}.log"
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.url, self.token, timeout)

    def start(self, wait: bool = True, timeout: float = 120.0) -> None:
        """Start the process (a no-op when it runs). ``wait=False`` returns at once: poll :meth:`ready`."""
        if self.running:
            return
        self.port = self.port or free_port()
        env = dict(os.environ)
        for key, value in self.env.items():  # None removes a variable (e.g. one Slicer's launcher set)
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        lib_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, env.get("PYTHONPATH", "")) if p)
        env[TOKEN_ENV] = self.token
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [self.python, "-m", "MedDiffusionLib.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--exit-with-parent", str(os.getpid()), *self.extra_args]
        self._log = open(self.log_file, "ab")
        kwargs: dict[str, Any] = {}
        if os.name == "nt":  # no console window for the child on Windows
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self.process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, **kwargs)
        if wait:
            self.wait_ready(timeout)

    def ready(self, timeout: float = 0.05) -> bool:
        """True once the server answers (a quick probe that never blocks long)."""
        if not self.running:
            return False
        try:
            self.client(timeout=timeout).health(timeout=timeout)
            return True
        except ServiceError:
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceUnavailable(f"the local MedDiffusion server exited with code {self.process.returncode}:\n"
                                         f"{self.log_tail()}")
            if self.ready(timeout=1.0):
                return
            time.sleep(0.1)
        raise ServiceUnavailable(f"the local MedDiffusion server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def ensure(self, timeout: float = 120.0) -> Client:
        """A client of a running server: the process is restarted if it died or stopped answering."""
        if self.running and not self.ready(timeout=5.0):
            try:  # dying, or hung: give it a moment, then replace it
                self.process.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        if not self.running or not self.ready(timeout=5.0):
            self.stop(timeout=2.0)
            self.start(wait=True, timeout=timeout)
        return self.client()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (terminate, then kill after ``timeout``)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


__all__ = ["Client", "LocalServer", "ServiceError", "ServiceUnavailable", "JobFailed", "JobCancelled", "free_port"]
