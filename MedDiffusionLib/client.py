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

import atexit
import contextlib
import errno
import http.client
import io
import json
import os
import select
import signal
import socket
import ssl
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
    """The job ended with an error; ``message`` is the server's explanation, ``kind`` its kind
    (``request``: the request or an input is wrong, running it again gives the same error;
    ``setup``: the server lacks the weights the job needs, another server may run it;
    ``resources``, ``time_limit``, ``internal``, ``interrupted``; ``None`` when the server does
    not say)."""

    kind: str | None = None


class JobCancelled(ServiceError):
    """The job was cancelled."""


def _http_error(status: int, raw: bytes) -> ServiceError:
    """The :class:`ServiceError` for an HTTP error answer (the server's ``detail`` as the message)."""
    try:
        detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
    except (ValueError, AttributeError):
        detail = raw.decode(errors="replace")
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    if status == 401:
        detail = f"{detail} (check the service token)"
    return ServiceError(detail, status)


def _multipart(spec: dict, files: dict[str, str | Path] | None) -> tuple[dict[str, str], int, Iterator[bytes]]:
    """(headers, content length, body blocks) of a job submission: the spec as JSON and the input
    files, read in 1 MiB blocks as the body is consumed."""
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
    return headers, length, body()


class Client:
    """One MedDiffusion service at ``url`` (``http://host:port`` or ``https://...`` behind a proxy)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, ca_file: str | Path | None = None):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceError(f"not a service address: {url!r} (expected http://HOST:PORT)")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        # surrounding whitespace (a token pasted with a newline) is no part of a token, here or on the server
        self.token = (token if token is not None else os.environ.get(TOKEN_ENV, "")).strip()
        self.timeout = timeout
        self._netloc = parts.netloc
        self._addr: tuple | None = None  # name lookup results, made once (for the stepwise transfers)
        if ca_file is not None and not Path(ca_file).is_file():
            raise ServiceError(f"{ca_file}: certificate authority file not found")
        self.ca_file = str(ca_file) if ca_file else None
        self._ssl: ssl.SSLContext | None = None
        if self.ca_file and self._scheme == "https":
            self.ssl_context()  # a bad file is reported here, not at the first request

    def ssl_context(self) -> ssl.SSLContext:
        """Certificate checks for https: the system's trusted CAs, or only ``ca_file`` when given
        (a lab's own CA, or the server's self-signed certificate). Made once per client."""
        if self._ssl is None:
            try:
                self._ssl = ssl.create_default_context(cafile=self.ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise ServiceError(f"{self.ca_file}: not a usable certificate authority file (PEM): {exc}") from exc
        return self._ssl

    # -- transport ------------------------------------------------------------------------------------
    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        timeout = self.timeout if timeout is None else timeout
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self.ssl_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None, stream_to: Path | None = None) -> Any:
        hdrs = {"Authorization": f"Bearer {self.token}", "Accept": "application/json", "X-MedDiffusion-API": "1"}
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
                raise _http_error(resp.status, resp.read())
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

    def submit(self, spec: dict, files: dict[str, str | Path] | None = None, timeout: float | None = None,
               job_id: str | None = None) -> dict:
        """Submit a job spec with its input files (``{input name: local path}``); returns its status.
        ``timeout`` bounds each socket operation (default: the client's). ``job_id`` (16-32 hex
        digits, e.g. ``uuid.uuid4().hex``) names the job before the server answers, so that a caller
        interrupted during the upload can still :meth:`delete` it."""
        headers, _length, body = _multipart(spec, files)
        if job_id is not None:
            headers["X-Job-Id"] = job_id
        return self._request("POST", "/jobs", body=body, headers=headers, timeout=timeout)

    def status(self, job_id: str, timeout: float | None = None) -> dict:
        return self._request("GET", f"/jobs/{quote(job_id)}", timeout=timeout)

    def jobs(self) -> list[dict]:
        return self._request("GET", "/jobs")

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/jobs/{quote(job_id)}/cancel")

    @contextlib.contextmanager
    def job(self, spec: dict, files: dict[str, str | Path] | None = None,
            progress: Callable[[dict], None] | None = None) -> Iterator[tuple[str, dict]]:
        """Run a job to its end and keep it while the block reads its results: yields ``(job id,
        final status)``; the job is deleted on the service afterwards, whatever happens (the id is
        ours, so a Ctrl-C before the server's answer can still delete it; a server that is gone
        expires it). :meth:`wait`'s errors pass through."""
        job_id = uuid.uuid4().hex
        refused = False
        try:
            try:
                self.submit(spec, files, job_id=job_id)
            except ServiceError as exc:  # a 4xx (or a local file not found): no job was made. No
                # answer (a timeout after the upload), or a proxy's 502/504, may hide one: it is deleted
                refused = not isinstance(exc, ServiceUnavailable) and (exc.status or 0) < 500
                raise
            yield job_id, self.wait(job_id, progress=progress)
        finally:
            if not refused:
                try:
                    self.delete(job_id, timeout=10)  # a queued or running job is cancelled first
                except Exception:  # noqa: BLE001 - the server may be gone; the job expires there anyway
                    pass

    def delete(self, job_id: str, timeout: float | None = None) -> None:
        """Delete a job: cancelled first if it is queued or running; an upload still in flight
        under this id is dropped, and one that arrives later is refused."""
        self._request("DELETE", f"/jobs/{quote(job_id)}", timeout=timeout)

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
                failed = JobFailed(st.get("error") or "the job failed", None)
                failed.kind = st.get("error_kind")
                raise failed
            if st["state"] == "cancelled":
                raise JobCancelled("the job was cancelled", None)
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(f"job {job_id} did not finish within {timeout} s")
            time.sleep(poll)



    # -- stepwise (non-blocking) forms, for an event loop: see :class:`Transfer` --------------------------------
    def _addresses(self) -> list[tuple]:
        """The service's socket addresses (looked up once; tried in order, as http.client does)."""
        if self._addr is None:
            port = self._port or (443 if self._scheme == "https" else 80)
            self._addr = tuple(socket.getaddrinfo(self._host, port, type=socket.SOCK_STREAM))
        return list(self._addr)

    def start_request(self, method: str, path: str) -> "Transfer":
        """Any JSON request without a body (e.g. ``("GET", "/health")``), stepwise."""
        return Transfer(self, method, path)

    def start_health(self) -> "Transfer":
        """:meth:`health`, stepwise."""
        return Transfer(self, "GET", "/health")

    def start_status(self, job_id: str) -> "Transfer":
        return Transfer(self, "GET", f"/jobs/{quote(job_id)}")

    def start_cancel(self, job_id: str) -> "Transfer":
        return Transfer(self, "POST", f"/jobs/{quote(job_id)}/cancel")

    def start_delete(self, job_id: str) -> "Transfer":
        return Transfer(self, "DELETE", f"/jobs/{quote(job_id)}")

    def start_unload(self) -> "Transfer":
        return Transfer(self, "POST", "/unload")

    def start_submit(self, spec: dict, files: dict[str, str | Path] | None = None) -> "Transfer":
        """:meth:`submit`, stepwise: the input files are read and sent a block at a time."""
        headers, length, body = _multipart(spec, files)
        return Transfer(self, "POST", "/jobs", body=body, length=length, headers=headers)

    def start_download(self, job_id: str, name: str, dest: str | Path) -> "Transfer":
        """:meth:`download`, stepwise (a temporary file renamed onto ``dest`` at the end)."""
        return Transfer(self, "GET", f"/jobs/{quote(job_id)}/results/{quote(name)}", dest=dest)

    def start_preview(self, job_id: str, dest: str | Path) -> "Transfer":
        """:meth:`preview`, stepwise; its result is ``None`` when there is no preview yet."""
        return Transfer(self, "GET", f"/jobs/{quote(job_id)}/preview", dest=dest, missing_ok=True)


class Transfer:
    """One request to the service moved forward in short steps, for a caller that must never block
    (Slicer's GUI thread, driven by a ``QTimer``): each :meth:`step` sends or receives what the
    non-blocking socket takes within ``budget_s`` (``select`` with the remaining time) and returns.

    After the last step ``done`` is true and either ``result`` (the decoded JSON answer, or the
    saved file's path for a download) or ``error`` (:class:`ServiceError` /
    :class:`ServiceUnavailable`, with the messages of the blocking :class:`Client` calls) is set.
    Downloads go to a temporary file (``O_CREAT | O_EXCL``, mode 0o666 less the umask) renamed onto
    ``dest`` at the end and removed on error or :meth:`cancel`. ``sent``/``received`` count body bytes
    (``total``: the size when known), for a progress bar.

    Not done without blocking: the name lookup of a host name (an IP address or ``localhost`` is
    immediate); each lookup is made once per :class:`Client`.
    """

    CHUNK = 1 << 18  # bytes handed to the socket (or read from it) at a time

    def __init__(self, client: "Client", method: str, path: str, body: Iterator[bytes] | None = None,
                 length: int = 0, headers: dict[str, str] | None = None, dest: str | Path | None = None,
                 missing_ok: bool = False):
        self.client = client
        self.dest = Path(dest) if dest is not None else None
        self.missing_ok = missing_ok  # a 404 answer is a result of None (the live preview)
        self.done = False
        self.result: Any = None
        self.error: ServiceError | None = None
        self.cancelled = False
        self.sent = 0
        self.received = 0
        self.total: int | None = length or None
        hdrs = {"Host": client._netloc, "Authorization": f"Bearer {client.token}", "Accept": "application/json",
                "X-MedDiffusion-API": "1", "Connection": "close", "Content-Length": str(length), **(headers or {})}
        head = f"{method} {quote(client._prefix + API + path, safe='/%:@!$&()*+,;=-._~')} HTTP/1.1\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        self._out = memoryview(head.encode("latin-1"))
        self._head_left = len(self._out)
        self._body = body
        self._sock: socket.socket | None = None
        self._addresses: list[tuple] | None = None
        self._phase = "connect"
        self._inbuf = bytearray()
        self._status = 0
        self._headers: Any = None
        self._length: int | None = None
        self._chunked: _ChunkDecoder | None = None
        self._answer = bytearray()
        self._tmp: str | None = None
        self._fh: Any = None
        self._last = time.monotonic()

    # -- public --------------------------------------------------------------------------------------------
    def step(self, budget_s: float = 0.05) -> bool:
        """Move the transfer on for at most about ``budget_s`` seconds; True once it is done."""
        deadline = time.monotonic() + max(0.0, budget_s)
        try:
            while not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._advance(left):
                    self._last = time.monotonic()
                elif time.monotonic() - self._last > self.client.timeout:
                    raise socket.timeout(f"no answer for {self.client.timeout:.0f} s")
        except ServiceError as exc:
            self._finish(error=exc)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._finish(error=self._unavailable(exc))
        return self.done

    def wait(self, budget_s: float = 0.05) -> Any:
        """Step until done (a blocking convenience for scripts); the result, or raise the error."""
        while not self.step(budget_s):
            pass
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        """Stop now: close the connection and remove a partial download."""
        if not self.done:
            self.cancelled = True
            self._finish(error=ServiceError("the transfer was cancelled"))

    # -- internals -------------------------------------------------------------------------------------------
    def _unavailable(self, exc: BaseException) -> ServiceUnavailable:
        url = self.client.url
        if self._phase == "connect":
            return ServiceUnavailable(f"cannot reach the MedDiffusion service at {url} ({type(exc).__name__}: {exc}); "
                                      "is it running?")
        return ServiceUnavailable(f"the MedDiffusion service at {url} stopped answering ({type(exc).__name__}: {exc})")

    def _wait(self, read: bool, write: bool, timeout: float) -> tuple[bool, bool]:
        sock = self._sock
        if read and isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True, False
        r, w, x = select.select([sock] if read else [], [sock] if write else [], [sock], timeout)
        return bool(r or x), bool(w or x)

    def _advance(self, left: float) -> bool:
        """One wait-and-act on the socket; True when something moved."""
        if self._phase == "connect":
            return self._connect(left)
        if self._phase == "handshake":
            try:
                self._sock.do_handshake()
            except ssl.SSLWantReadError:
                return any(self._wait(True, False, left))
            except ssl.SSLWantWriteError:
                return any(self._wait(False, True, left))
            self._phase = "send"
            return True
        if self._phase == "send":
            return self._send(left)
        return self._receive(left)

    def _connect(self, left: float) -> bool:
        if self._sock is None:
            if self._addresses is None:
                self._addresses = self.client._addresses()
            family, kind, proto, _name, addr = self._addresses.pop(0)
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            self._sock = sock
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, 10035):  # 10035: WSAEWOULDBLOCK
                return self._next_address(err)
            return True
        _r, writable = self._wait(False, True, left)
        if not writable:
            return False
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return self._next_address(err)
        if self.client._scheme == "https":
            ctx = self.client.ssl_context()
            self._sock = ctx.wrap_socket(self._sock, server_hostname=self.client._host, do_handshake_on_connect=False)
            self._phase = "handshake"
        else:
            self._phase = "send"
        return True

    def _next_address(self, err: int) -> bool:
        """This address refused: try the next one (IPv6 then IPv4, say), or fail."""
        self._sock.close()
        self._sock = None
        if not self._addresses:
            raise ConnectionRefusedError(err, os.strerror(err))
        return True

    def _send(self, left: float) -> bool:
        if not self._out:
            block = next(self._body, None) if self._body is not None else None
            if block is None:
                self._phase = "head"
                return True
            self._out = memoryview(block)
            return True
        tls = isinstance(self._sock, ssl.SSLSocket)  # TLS may send records (session tickets) at any time
        readable, writable = self._wait(not tls, True, left)
        if readable:  # the server answered before reading everything (e.g. 413 too large): read that
            self._phase = "head"
            return True
        if not writable:
            return False
        try:
            n = self._sock.send(self._out[:self.CHUNK])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return False
        except (BrokenPipeError, ConnectionResetError):
            self._phase = "head"  # the server closed its side: an answer may be waiting
            return True
        head = min(n, self._head_left)  # the request line and headers are not counted
        self._head_left -= head
        self.sent += n - head
        self._out = self._out[n:]
        return n > 0

    def _receive(self, left: float) -> bool:
        readable, _w = self._wait(True, False, left)
        if not readable:
            return False
        try:
            data = self._sock.recv(self.CHUNK)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        if self._phase == "head":
            if not data:
                raise http.client.RemoteDisconnected("the connection closed before an answer")
            self._inbuf += data
            end = self._inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._inbuf) > 65536:
                    raise http.client.HTTPException("answer headers too long")
                return True
            self._parse_head(bytes(self._inbuf[:end + 2]))
            rest, self._inbuf = bytes(self._inbuf[end + 4:]), bytearray()
            self._phase = "body"
            self._take(rest)
            self._maybe_complete(eof=False)
            return True
        if not data:
            self._maybe_complete(eof=True)
            return True
        self._take(data)
        self._maybe_complete(eof=False)
        return True

    def _parse_head(self, raw: bytes) -> None:
        line, _, rest = raw.partition(b"\r\n")
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise http.client.BadStatusLine(line.decode("latin-1"))
        self._status = int(parts[1])
        self._headers = http.client.parse_headers(io.BytesIO(rest + b"\r\n"))
        if "chunked" in (self._headers.get("Transfer-Encoding") or "").lower():
            self._chunked = _ChunkDecoder()
        elif self._headers.get("Content-Length") is not None:
            self._length = int(self._headers["Content-Length"])
        if self._status < 400 and self.dest is not None:
            self.total = self._length
            self.received = 0
            self._tmp = str(self.dest.parent / f".{self.dest.name}.{uuid.uuid4().hex}.part")
            fd = os.open(self._tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
            self._fh = os.fdopen(fd, "wb")

    def _take(self, data: bytes) -> None:
        if self._chunked is not None:
            data = self._chunked.feed(data)
        if self._fh is not None:
            self._fh.write(data)
            self.received += len(data)
        else:
            self._answer += data
            if len(self._answer) > (64 << 20):
                raise http.client.HTTPException("answer too long")

    def _maybe_complete(self, eof: bool) -> None:
        got = self.received if self._fh is not None else len(self._answer)
        if self._chunked is not None:
            complete = self._chunked.finished
        elif self._length is not None:
            complete = got >= self._length
        else:
            complete = eof
        if not complete:
            if eof:
                raise http.client.IncompleteRead(b"", None if self._length is None else self._length - got)
            return
        if self._status >= 400:
            if self.missing_ok and self._status == 404:
                self._finish(result=None)
                return
            raise _http_error(self._status, bytes(self._answer))
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            os.replace(self._tmp, self.dest)
            self._tmp = None
            self._finish(result=self.dest)
        else:
            self._finish(result=json.loads(bytes(self._answer)) if self._answer else None)

    def _finish(self, result: Any = None, error: ServiceError | None = None) -> None:
        self.done = True
        self.result, self.error = result, error
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            try:
                os.remove(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None
        self._body = None


class _ChunkDecoder:
    """Incremental decoder of an HTTP/1.1 chunked body."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # bytes of the current chunk still to come
        self._state = "size"  # size | data | crlf | trailer | end
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while True:
            if self._state == "size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(self._buf[:end]).split(b";", 1)[0].strip() or b"0", 16)
                del self._buf[:end + 2]
                self._left, self._state = size, ("data" if size else "trailer")
            elif self._state == "data":
                take = min(self._left, len(self._buf))
                out += self._buf[:take]
                del self._buf[:take]
                self._left -= take
                if self._left:
                    break
                self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buf) < 2:
                    break
                del self._buf[:2]
                self._state = "size"
            elif self._state == "trailer":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(self._buf[:end])
                del self._buf[:end + 2]
                if not line:
                    self._state, self.finished = "end", True
            else:
                break
        return bytes(out)


def new_token() -> str:
    """A random 256-bit token (URL-safe base64) that does not start with "-", so that it can follow
    ``--token`` on a command line."""
    import secrets

    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


PORT_MOVES = 3  # a server whose chosen port was taken before it bound it starts on another, this often


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _live_member(pgid: int, hint: int | None = None) -> int | None:
    """Linux: the pid of a process of group ``pgid`` that is not a zombie (``hint`` is tried first), or
    None. Where there is no /proc, ``pgid`` itself is returned: the caller's ``killpg(pgid, 0)`` said
    the group has members, and without /proc they cannot be told from zombies."""
    def live(name: str) -> bool:
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        fields = stat[stat.rfind(b")") + 2:].split()  # state, ppid, pgrp, ... (the name may hold spaces)
        return len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X")

    if not os.path.exists("/proc/self/stat"):
        return pgid
    if hint is not None and live(str(hint)):
        return hint
    try:
        names = os.listdir("/proc")
    except OSError:
        return pgid
    for name in names:
        if name.isdigit() and live(name):
            return int(name)
    return None


class _Win:
    """The few kernel32 calls for a Job Object (Windows only; nothing here is used elsewhere)."""
    _api = None

    @classmethod
    def api(cls):
        if cls._api is None:
            import ctypes
            from ctypes import c_int64, c_size_t, c_uint32, c_void_p

            class Basic(ctypes.Structure):  # JOBOBJECT_BASIC_LIMIT_INFORMATION
                _fields_ = [("PerProcessUserTimeLimit", c_int64), ("PerJobUserTimeLimit", c_int64),
                            ("LimitFlags", c_uint32), ("MinimumWorkingSetSize", c_size_t),
                            ("MaximumWorkingSetSize", c_size_t), ("ActiveProcessLimit", c_uint32),
                            ("Affinity", c_size_t), ("PriorityClass", c_uint32), ("SchedulingClass", c_uint32)]

            class Extended(ctypes.Structure):  # JOBOBJECT_EXTENDED_LIMIT_INFORMATION (IO_COUNTERS: 6 x ULONGLONG)
                _fields_ = [("BasicLimitInformation", Basic), ("IoInfo", ctypes.c_uint64 * 6),
                            ("ProcessMemoryLimit", c_size_t), ("JobMemoryLimit", c_size_t),
                            ("PeakProcessMemoryUsed", c_size_t), ("PeakJobMemoryUsed", c_size_t)]

            class Accounting(ctypes.Structure):  # JOBOBJECT_BASIC_ACCOUNTING_INFORMATION
                _fields_ = [("TotalUserTime", c_int64), ("TotalKernelTime", c_int64),
                            ("ThisPeriodTotalUserTime", c_int64), ("ThisPeriodTotalKernelTime", c_int64),
                            ("TotalPageFaultCount", c_uint32), ("TotalProcesses", c_uint32),
                            ("ActiveProcesses", c_uint32), ("TotalTerminatedProcesses", c_uint32)]

            k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
            BOOL, DWORD, HANDLE = ctypes.c_int, c_uint32, c_void_p
            for name, restype, argtypes in (
                    ("CreateJobObjectW", HANDLE, (c_void_p, ctypes.c_wchar_p)),
                    ("SetInformationJobObject", BOOL, (HANDLE, ctypes.c_int, c_void_p, DWORD)),
                    ("QueryInformationJobObject", BOOL, (HANDLE, ctypes.c_int, c_void_p, DWORD, c_void_p)),
                    ("AssignProcessToJobObject", BOOL, (HANDLE, HANDLE)),
                    ("TerminateJobObject", BOOL, (HANDLE, ctypes.c_uint)),
                    ("OpenProcess", HANDLE, (DWORD, BOOL, DWORD)),
                    ("CloseHandle", BOOL, (HANDLE,))):
                fn = getattr(k32, name)
                fn.restype, fn.argtypes = restype, argtypes
            cls._api = (ctypes, k32, Extended, Accounting)
        return cls._api

    @classmethod
    def job_for(cls, pid: int) -> int | None:
        """A new Job Object that holds process ``pid`` and everything it starts from now on, and that
        Windows kills, with all its processes, when its last handle closes (this process exits or
        crashes). None when it cannot be made (the caller falls back to ``taskkill /T``)."""
        try:
            ctypes, k32, Extended, _ = cls.api()
            job = k32.CreateJobObjectW(None, None)
            if not job:
                return None
            info = Extended()
            info.BasicLimitInformation.LimitFlags = 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
            proc = k32.OpenProcess(0x0100 | 0x0001, False, pid)  # PROCESS_SET_QUOTA | PROCESS_TERMINATE
            # 9: JobObjectExtendedLimitInformation
            ok = bool(proc) and bool(k32.SetInformationJobObject(job, 9, ctypes.byref(info), ctypes.sizeof(info)))
            ok = ok and bool(k32.AssignProcessToJobObject(job, proc))
            if proc:
                k32.CloseHandle(proc)
            if not ok:
                k32.CloseHandle(job)
                return None
            return job
        except Exception:  # noqa: BLE001 - no job object: stop() falls back to taskkill /T
            return None

    @classmethod
    def active(cls, job: int) -> int | None:
        """How many processes of the job are alive (None when it cannot be asked)."""
        try:
            ctypes, k32, _, Accounting = cls.api()
            info = Accounting()
            # 1: JobObjectBasicAccountingInformation
            if k32.QueryInformationJobObject(job, 1, ctypes.byref(info), ctypes.sizeof(info), None):
                return info.ActiveProcesses
        except Exception:  # noqa: BLE001
            pass
        return None

    @classmethod
    def terminate(cls, job: int) -> bool:
        try:
            return bool(cls.api()[1].TerminateJobObject(job, 1))
        except Exception:  # noqa: BLE001
            return False

    @classmethod
    def close(cls, job: int) -> None:
        try:
            cls.api()[1].CloseHandle(job)
        except Exception:  # noqa: BLE001
            pass


class _Tree:
    """A started server with everything it started: the child itself may be a launcher (Slicer's
    ``PythonSlicer`` is the CTK app launcher: it runs ``python-real`` as its own child and passes no
    signals on). POSIX: the child leads its own session, so the tree is its process group; Windows:
    a Job Object when one could be made, else the child's process tree as ``taskkill /T`` sees it."""

    def __init__(self, proc: subprocess.Popen, job: int | None = None):
        self.proc = proc
        self.pgid: int | None = proc.pid if os.name != "nt" else None  # start_new_session: pgid == pid
        self.job = job
        self.deadline: float | None = None  # set by terminate(): SIGKILL once it has passed
        self.killed_at: float | None = None  # when kill() was sent
        self._member: int | None = None

    def alive(self) -> bool:
        """Whether any process of the tree still runs (the launcher is reaped on the way)."""
        launcher_alive = self.proc.poll() is None  # reaps it: a zombie still counts as a member of its group
        if os.name == "nt":
            count = _Win.active(self.job) if self.job is not None else None
            return launcher_alive if count is None else count > 0
        if self.pgid is None:
            return False
        if launcher_alive:
            return True
        try:
            os.killpg(self.pgid, 0)  # signal 0: is there any process in the group
        except (ProcessLookupError, PermissionError):  # EPERM: the number is someone else's group now
            self.pgid = None  # empty: never signal this number again (it may be reused)
            return False
        self._member = _live_member(self.pgid, self._member)  # members left may be zombies not yet reaped
        return self._member is not None

    def _signal(self, sig: int) -> None:
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, sig)
            except (ProcessLookupError, PermissionError):
                self.pgid = None

    def terminate(self, timeout: float) -> None:
        """Ask the whole tree to stop now (POSIX: SIGTERM to the group); :meth:`progress` kills it
        after ``timeout`` seconds. Windows has no polite way to stop a windowless child: it is ended."""
        if self.deadline is not None:
            return
        self.deadline = time.monotonic() + max(0.0, timeout)
        if not self.alive():  # already gone (and reaped): nothing to signal
            return
        if os.name != "nt":
            self._signal(signal.SIGTERM)
        else:
            self.kill()

    def kill(self) -> None:
        self.killed_at = time.monotonic()
        if os.name != "nt":
            self._signal(signal.SIGKILL)
        elif self.job is not None and _Win.terminate(self.job):
            pass
        elif self.proc.poll() is None:  # no job object: the tree as far as its parent links reach
            try:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            except (OSError, subprocess.SubprocessError):
                pass
            self.proc.kill()

    def progress(self) -> bool:
        """One non-blocking step of stopping: True once the whole tree is gone."""
        if not self.alive():
            if self.job is not None:
                _Win.close(self.job)
                self.job = None
            return True
        if self.killed_at is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.kill()
        return False


_STOPPING: list[_Tree] = []  # trees sent a stop that may still run, of every LocalServer of this process


def _progress_stopping() -> bool:
    _STOPPING[:] = [tree for tree in _STOPPING if not tree.progress()]
    return not _STOPPING


@atexit.register
def _kill_stopping() -> None:  # the interpreter exits: what was asked to stop and still runs is killed
    for tree in _STOPPING:
        if tree.alive():
            tree.kill()


class LocalServer:
    """A ``meddiffusion serve`` child process on 127.0.0.1 with a free port and a random token.

    ``python``: the interpreter to run it with (default: this one), e.g. a conda env with CUDA torch,
    or a launcher such as Slicer's ``PythonSlicer`` that starts the real interpreter as its own child.
    The child runs in its own process group (POSIX: a new session; Windows: a new process group and a
    Job Object that Windows kills when this process ends), :attr:`running` checks that group, and
    :meth:`stop` ends all of it, so no server is left behind a launcher that passes no signals on.
    The child imports the same ``MedDiffusionLib`` as this process (its folder is put on
    ``PYTHONPATH``) and exits by itself when this process dies. ``env`` is laid over this process's
    environment; a value of ``None`` removes that variable."""

    def __init__(self, python: str | None = None, port: int | None = None, token: str | None = None,
                 env: dict[str, str | None] | None = None, log_file: str | Path | None = None,
                 extra_args: list[str] | None = None):
        self.python = python or sys.executable
        self.port = port
        self._auto_port = port is None
        self.token = token or new_token()
        self.env = dict(env or {})
        if log_file is None:  # a fresh private file (mkstemp: 0600, unpredictable name, no symlink games)
            fd, name = tempfile.mkstemp(prefix="meddiffusion-serve-", suffix=".log")
            os.close(fd)
            log_file = name
        self.log_file = Path(log_file)
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None  # the direct child (maybe a launcher)
        self._moves = 0  # restarts on another port since the last start()
        self._log_start = 0
        self._tree: _Tree | None = None
        self._stopped: _Tree | None = None  # the last tree this server was asked to stop
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The direct child's pid (a launcher's, when ``python`` is one); on POSIX also the group id."""
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        """Whether any process of the server's tree runs: True while the real server lives even when a
        launcher in front of it has exited. (Also moves earlier non-blocking stops along.)"""
        if _STOPPING:
            _progress_stopping()
        return self._tree is not None and self._tree.alive()

    @property
    def stopping(self) -> bool:
        """Whether a tree this server was asked to stop (``stop(wait=False)``) still runs."""
        if self._stopped is not None and self._stopped in _STOPPING:
            _progress_stopping()
        return self._stopped is not None and self._stopped in _STOPPING

    @staticmethod
    def poll_stopped() -> bool:
        """One non-blocking step for every server of this process that was stopped with
        ``wait=False``: reaps what has exited, kills (SIGKILL / job termination) what outlived its
        ``timeout``. True when nothing stopped is left running. Call it from a timer (or call
        :attr:`running`, :meth:`start` or :meth:`stop`, which do it too)."""
        return _progress_stopping()

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.url, self.token, timeout)

    def start(self, wait: bool = True, timeout: float = 120.0) -> None:
        """Start the process (a no-op when it runs). ``wait=False`` returns at once: poll :meth:`ready`
        (and, when the process has exited, :meth:`restart_on_a_free_port`)."""
        if self.running:
            return
        self._moves = 0
        self._start(wait, timeout)

    def port_was_taken(self) -> bool:
        """Whether the process exited because its automatically chosen port was taken by another
        program between the choice (:func:`free_port`) and the server's bind."""
        if not self._auto_port or self.process is None or self.running:
            return False
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(self._log_start)
                told = fh.read().lower()
        except OSError:
            return False
        return b"address already in use" in told or b"10048" in told  # POSIX EADDRINUSE; WSAEADDRINUSE

    def restart_on_a_free_port(self) -> bool:
        """When :meth:`port_was_taken`, start again on another free port without waiting (at most
        :data:`PORT_MOVES` times per :meth:`start`); True when it did."""
        if self._moves >= PORT_MOVES or not self.port_was_taken():
            return False
        self._moves += 1
        self.stop(timeout=0)  # collects the exited process
        self.port = None
        self._start(wait=False)
        return True

    def _start(self, wait: bool, timeout: float = 120.0) -> None:
        if self._auto_port and self.stopping:  # the old server may still hold its port
            self.port = None
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
        if self._log is None:
            self._log = open(self.log_file, "ab")
        self._log.flush()
        self._log_start = os.path.getsize(self.log_file)  # what this process writes comes after
        kwargs: dict[str, Any] = {}
        if os.name == "nt":  # no console window; its own group (no Ctrl+C/Break of ours reaches it)
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NO_WINDOW", 0)
                                       | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
        else:  # its own session and process group: the group is the whole tree, launcher or not
            kwargs["start_new_session"] = True
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                    stderr=subprocess.STDOUT, **kwargs)
        except BaseException:
            self._log.close()
            self._log = None
            raise
        # Windows: the job is made just after the start, so a launcher that starts its child within
        # these microseconds would leave that child outside it (taskkill /T is the fallback then).
        self.process, self._tree = proc, _Tree(proc, _Win.job_for(proc.pid) if os.name == "nt" else None)
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
            if self.process is not None and not self.running:
                if self.restart_on_a_free_port():
                    continue
                raise ServiceUnavailable(f"the local MedDiffusion server exited with code {self.process.returncode}:\n"
                                         f"{self.log_tail()}")
            if self.ready(timeout=1.0):
                return
            time.sleep(0.1)
        raise ServiceUnavailable(f"the local MedDiffusion server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def ensure(self, timeout: float = 120.0) -> Client:
        """A client of a running server: the process is restarted if it died or stopped answering."""
        if self.running and not self.ready(timeout=5.0):
            end = time.monotonic() + 2.0  # dying, or hung: give it a moment, then replace it
            while self.running and time.monotonic() < end:
                time.sleep(0.05)
        if not self.running or not self.ready(timeout=5.0):
            self.stop(timeout=2.0)
            self.start(wait=True, timeout=timeout)
        return self.client()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0, wait: bool = True) -> bool:
        """Stop the server's whole tree: POSIX: SIGTERM to its process group, SIGKILL to the group
        once ``timeout`` has passed; Windows: the Job Object is terminated. ``wait=True`` blocks until
        everything has exited (at most ``timeout`` plus ``max(timeout, 2)`` s after the kill);
        ``wait=False`` returns at once after the signals, and :meth:`poll_stopped` (or a later
        ``running``/``start``/``stop``) reaps the tree and kills it when ``timeout`` has passed.
        Returns True when nothing of the tree runs any more. After it :attr:`running` is False;
        :attr:`stopping` tells whether the old tree still runs (a new :meth:`start` then takes a new
        free port, unless the port was given)."""
        tree, self._tree, self.process = self._tree, None, None
        if tree is not None:
            tree.terminate(timeout)
            _STOPPING.append(tree)
            self._stopped = tree
        if self._log is not None:  # the child writes through its own descriptor
            self._log.close()
            self._log = None
        target = self._stopped  # this call's tree, or the one an earlier stop(wait=False) left running
        _progress_stopping()
        if not wait or target not in _STOPPING:
            return target not in _STOPPING
        end = time.monotonic() + timeout
        while True:
            time.sleep(0.02)
            _progress_stopping()
            if target not in _STOPPING:
                return True
            now = time.monotonic()
            if target.killed_at is None and now >= end:
                target.kill()  # an earlier stop(wait=False) may have allowed longer
            if target.killed_at is not None and now >= target.killed_at + max(timeout, 2.0):
                return False  # unkillable for now (e.g. stuck in the driver): poll_stopped() goes on


__all__ = ["Client", "Transfer", "LocalServer", "ServiceError", "ServiceUnavailable", "JobFailed", "JobCancelled", "free_port"]
