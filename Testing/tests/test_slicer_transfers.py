"""Stepwise (non-blocking) transfers of the standard-library client, used from Slicer's GUI thread:
a real job service (``LocalServer``, bundled model not needed: simulate-sparse-view), a 256^3 float32
volume (64 MiB) uploaded and its result downloaded in steps of a small budget, errors with the
blocking calls' messages, and no file left behind by a failed or cancelled download."""
import socket
import threading
import time

import numpy as np
import pytest

from MedDiffusionLib.client import Client, LocalServer, ServiceError, ServiceUnavailable

BUDGET = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(log_file=tmp_path_factory.mktemp("log") / "serve.log",
                      env={"OMP_NUM_THREADS": "1"})  # a core stays free for the timed steps
    srv.start(timeout=120)
    yield srv
    srv.stop()


def _drive(transfer, budget=BUDGET):
    """Step to the end; (number of steps, longest step in seconds)."""
    steps, longest = 0, 0.0
    while True:
        t0 = time.monotonic()
        done = transfer.step(budget)
        longest = max(longest, time.monotonic() - t0)
        steps += 1
        if done:
            return steps, longest


def test_a_64_mib_upload_and_download_move_in_short_steps(server, tmp_path):
    src = tmp_path / "ct.nrrd"  # raw (uncompressed) NRRD: 64 MiB on the wire
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 256 256 256\n"
              "space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
              "encoding: raw\nspace origin: (0,0,0)\n\n")
    data = np.random.default_rng(0).uniform(-1000, 1000, 256 ** 3).astype("<f4")
    src.write_bytes(header.encode() + data.tobytes())
    client = server.client()
    up = client.start_submit({"task": "simulate-sparse-view", "params": {"views": 2, "bins": 16},
                              "inputs": {"input": "ct.nrrd"}}, {"input": src})
    steps, longest = _drive(up)
    assert up.error is None and up.result["state"] in ("queued", "running")
    assert up.sent == up.total > 64 * 2 ** 20  # the whole body went through step()
    assert steps > 1 and longest < BUDGET + 0.45, (steps, longest)  # never one long block

    st = client.wait(up.result["id"], poll=0.1)
    name = st["results"][0]["name"]
    down = client.start_download(st["id"], name, tmp_path / "fbp.nrrd")
    steps, longest = _drive(down)
    assert down.error is None and down.result == tmp_path / "fbp.nrrd"
    assert down.received == down.total > 50e6 and steps > 1 and longest < BUDGET + 0.45, (steps, longest)
    client.download(st["id"], name, tmp_path / "blocking.nrrd")
    assert (tmp_path / "fbp.nrrd").read_bytes() == (tmp_path / "blocking.nrrd").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocking.nrrd", "ct.nrrd", "fbp.nrrd"]  # no temp file

    # errors carry the blocking calls' messages, and a failed download leaves no file
    bad = client.start_download(st["id"], "nope.nrrd", tmp_path / "nope.nrrd")
    _drive(bad)
    with pytest.raises(ServiceError) as blocking:
        client.download(st["id"], "nope.nrrd", tmp_path / "nope.nrrd")
    assert type(bad.error) is ServiceError and bad.error.status == 404 == blocking.value.status
    assert str(bad.error) == str(blocking.value)
    refused = client.start_submit({"task": "generate", "params": {"steps": 0}})
    _drive(refused)
    with pytest.raises(ServiceError) as blocking:
        client.submit({"task": "generate", "params": {"steps": 0}})
    assert refused.error.status == 400 and str(refused.error) == str(blocking.value)
    preview = client.start_preview(st["id"], tmp_path / "preview.nrrd")
    _drive(preview)
    assert preview.error is None and preview.result is None  # no preview: not an error
    cancelled = client.start_download(st["id"], name, tmp_path / "cancelled.nrrd")
    while cancelled.received == 0:
        cancelled.step(0.01)
    cancelled.cancel()
    assert cancelled.done and cancelled.error is not None
    client.delete(st["id"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocking.nrrd", "ct.nrrd", "fbp.nrrd"]


def test_a_download_cut_midway_or_an_absent_server_leave_no_file(tmp_path):
    """A server on 127.0.0.1 that promises 1 MiB, sends 64 KiB and closes the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 65536)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    client = Client(f"http://127.0.0.1:{port}", "token", timeout=10)
    cut = client.start_download("job", "result_0.nrrd", tmp_path / "result.nrrd")
    _drive(cut)
    thread.join(10)
    listener.close()
    assert isinstance(cut.error, ServiceUnavailable) and "stopped answering" in str(cut.error)
    assert list(tmp_path.iterdir()) == []

    absent = client.start_health()  # the port is closed now
    _drive(absent)
    with pytest.raises(ServiceUnavailable) as blocking:
        client.health()
    assert str(absent.error) == str(blocking.value)


def test_https_behind_a_proxy_is_stepped_too(tmp_path, monkeypatch):
    """A TLS server on 127.0.0.1 (as a reverse proxy in front of a lab server would be): the TLS
    handshake, a JSON answer and a chunked download all go through step(); an untrusted
    certificate is refused."""
    import http.server
    import json

    from tls_server import https_server

    payload = bytes(range(256)) * 4096  # 1 MiB

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/v1/health":
                body = json.dumps({"version": "test", "auth": self.headers["Authorization"]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(payload), 100_000):
                part = payload[i:i + 100_000]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    with https_server(tmp_path, Handler) as url:
        untrusted = Client(url, "secret").start_health()
        _drive(untrusted)
        assert isinstance(untrusted.error, ServiceUnavailable) and "CERTIFICATE_VERIFY_FAILED" in str(untrusted.error)
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))  # trusted from here on
        client = Client(url, "secret")
        health = client.start_health()
        _drive(health)
        assert health.error is None and health.result == {"version": "test", "auth": "Bearer secret"}
        down = client.start_download("job", "result_0.nrrd", tmp_path / "out.nrrd")
        steps, _longest = _drive(down, 0.001)
        assert down.error is None and (tmp_path / "out.nrrd").read_bytes() == payload and steps > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem", "out.nrrd"]
