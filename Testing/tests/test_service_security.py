"""The job service as an attacker and a lab admin see it: real `meddiffusion serve` subprocesses on
127.0.0.1, raw HTTP where the standard client would refuse to send the request, real files.
Each test covers a defect of shared/notes/service-attack-test.md (named in its docstring)."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from sockets_util import shut
from MedDiffusionLib.auth import add_user
from MedDiffusionLib.client import Client, LocalServer, ServiceError, ServiceUnavailable
from MedDiffusionLib.data.volumes import Volume, read_volume, write_volume

CT = DATA / "lung2_crop.nii.gz"
QUICK = {"sampler": "ddim", "steps": 2}
SECRET = b"MRN=123456 DOE^JOHN"


def _start(tmp_path, name, *args, env=None, token=None, wait=True):
    srv = LocalServer(log_file=tmp_path / f"{name}.log", token=token, env=env,
                      extra_args=["--work-dir", str(tmp_path / f"{name}-work"), *args])
    srv.start(timeout=120, wait=wait)
    return srv


def _raw(port, method, path, token=None, body=None, headers=None, timeout=30, tls=None):
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls) if tls else
            http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, dict(resp.getheaders())


def _multipart(spec_text, filename=None, payload=b""):
    boundary = "md-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{spec_text}\r\n').encode()
    if filename is not None:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="input"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + payload + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _until(condition, timeout=120, what="the condition", poll=0.1):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def _proc_counts(pid):
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmRSS:"))
    return fds, threads, rss


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    path = tmp_path_factory.mktemp("users") / "tokens"
    return path, {"alice": add_user(path, "alice"), "bob": add_user(path, "bob"),
                  "root": add_user(path, "root", admin=True)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, users):
    """A server with users, small caps and a private temporary folder (to see what it leaves there)."""
    tmp = tmp_path_factory.mktemp("lab")
    (tmp / "tmp").mkdir()
    path, tokens = users
    srv = _start(tmp, "lab", "--tokens", str(path), "--max-upload-mb", "64", "--max-volumes", "2",
                 "--auth-failures", "1000",  # tests here try tokens on purpose; the limit has its own test
                 "--max-voxels", str(96 ** 3), token=tokens["alice"], env={"TMPDIR": str(tmp / "tmp")})
    srv.tmp = tmp
    srv.work = tmp / "lab-work"
    srv.tokens = tokens
    yield srv
    srv.stop()


def _client(srv, who):
    return Client(srv.url, srv.tokens[who])


def _planted(tmp_path):
    secret = tmp_path / "planted_secret.txt"
    secret.write_bytes(SECRET)
    return secret


def test_headers_naming_other_files_are_refused_and_leak_nothing(lab, tmp_path):
    """A1: MHA ElementDataFile / NRRD data file pointing at a server file; detached headers."""
    secret = _planted(tmp_path)
    spec = json.dumps({"task": "simulate-sparse-view", "params": {"views": 2, "bins": 16}, "inputs": {"input": "x"}})
    mha = ("ObjectType = Image\nNDims = 3\nDimSize = 1 1 1\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
           f"HeaderSize = 4\nElementDataFile = {secret}\n").encode()
    nrrd = (f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 19 1 1\nencoding: raw\ndata file: {secret}\n\n").encode()
    nrrd2 = nrrd.replace(b"data file:", b"datafile:")
    for fname, payload in (("p.mha", mha), ("p.nrrd", nrrd), ("q.nrrd", nrrd2), ("p.nhdr", nrrd), ("p.mhd", mha)):
        body, headers = _multipart(spec, fname, payload)
        before = {j["id"] for j in _client(lab, "alice").jobs()}
        status, data, _ = _raw(lab.port, "POST", "/v1/jobs", lab.tokens["alice"], body, headers)
        assert status == 415, (fname, status, data)
        text = data.decode()
        assert "percentile" not in text and "49" not in text and str(tmp_path) not in text and len(data) < 400
        assert {j["id"] for j in _client(lab, "alice").jobs()} == before
    assert not [p for p in lab.work.iterdir() if p.is_dir()]


def test_caps_and_absurd_values_are_refused_at_the_door(lab):
    """A2, A3, A6, A7: huge size, huge volume count, NaN/Infinity, deep JSON, 2**70 seed, NaN
    spacing and HU window: each a short 400, nothing queued, the server still answers."""
    alice = lab.tokens["alice"]
    bad = ['{"task":"generate","params":{"size":[1000000000000000000000000000000,64,64]}}',
           '{"task":"generate","params":{"sampler":"dpm++","steps":3,"num_volumes":10000}}',
           '{"task":"generate","params":{"num_volumes":3}}',  # over this server's --max-volumes 2
           '{"task":"generate","params":{"size":[128,128,128]}}',  # over --max-voxels 96^3
           '{"task":"generate","params":{"seed":NaN}}',
           '{"task":"generate","params":{"size":[Infinity,64,64]}}',
           '{"task":"generate","params":{"seed":1180591620717411303424}}',
           '{"task":"generate","params":{"spacing":[NaN,1,1]}}',
           '{"task":"generate","params":{"spacing":["nan",1,1]}}',
           '{"task":"generate","params":{"hu_window":[NaN,100]}}',
           '{"task":"generate","params":{"max_memory_gb":NaN}}',
           '{"task":"generate","params":{"device":"cuda-x1"}}',
           '[' * 20000 + ']' * 20000,  # deep, but under the 64 KiB spec limit: the depth check answers
           '{"task":"generate","params":{"class":"' + "x" * 50000 + '"}}',
           '{"task":"generate","params":{"force":true}}',  # alice is no admin
           '{"task":"generate","params":{"compile":true}}']
    for text in bad:
        status, data, _ = _raw(lab.port, "POST", "/v1/jobs", alice, text.encode(),
                               {"Content-Type": "application/json"})
        assert status == 400, (text[:80], status, data[:200])
        assert len(data) < 500 and b"internal error" not in data and b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" \
            not in data, (text[:80], data[:200])
    assert _client(lab, "alice").jobs() == [] or all(j["state"] != "queued" for j in _client(lab, "alice").jobs())
    assert _client(lab, "alice").health()["version"]


def test_nan_voxels_in_nifti_are_refused(lab, tmp_path):
    """A10: NaN in a NIfTI input no longer becomes 0."""
    ct = read_volume(CT)
    arr = ct.array.astype(np.float32)
    arr[3, 4, 5] = np.nan
    path = tmp_path / "nan.nii.gz"
    write_volume(ct.with_array(arr), path)
    with pytest.raises(ServiceError) as err:
        _client(lab, "alice").submit({"task": "simulate-sparse-view", "inputs": {"input": "nan.nii.gz"}},
                                     {"input": path})
    assert err.value.status == 400 and "NaN" in err.value.message


def test_refused_uploads_leave_no_files_threads_or_descriptors(lab, tmp_path):
    """A4, A5, B (stored twice, unpacked size): nothing in the temporary folder, no extra open
    files after refused uploads, no thread per made-up device, a gzip bomb refused by its size."""
    alice = lab.tokens["alice"]
    c = _client(lab, "alice")
    c.wait(c.submit({"task": "generate", "params": {"device": "cpu", **QUICK}})["id"], timeout=120)  # warm
    fds0, threads0, _ = _proc_counts(lab.pid)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(os.urandom(3 * 2 ** 20))
    spec = {"task": "simulate-sparse-view", "inputs": {"input": "junk.nrrd"}}
    for _ in range(5):
        with pytest.raises(ServiceError) as err:
            c.submit(spec, {"input": junk})
        assert err.value.status == 415
    bomb = tmp_path / "bomb.nii.gz"  # 512x512x256 int16 zeros: 128 MiB unpacked, well under 1 MiB on the wire
    write_volume(Volume(np.zeros((512, 512, 256), np.int16), np.eye(4)), bomb)
    assert bomb.stat().st_size < 2 ** 20
    with pytest.raises(ServiceError) as err:
        c.submit(spec, {"input": bomb})
    assert err.value.status == 413 and str(lab.work) not in err.value.message
    for i in range(20):
        status, _, _ = _raw(lab.port, "POST", "/v1/jobs", alice,
                            json.dumps({"task": "generate", "params": {"device": f"cuda:{i + 7}"}}).encode(),
                            {"Content-Type": "application/json"})
        assert status == 400
    fds1, threads1, _ = _proc_counts(lab.pid)
    assert threads1 <= threads0 + 1 and fds1 <= fds0 + 2, (threads0, threads1, fds0, fds1)
    # torch unpacks the compiled network there (aotinductor_*); no upload is ever spooled there
    assert [p for p in (lab.tmp / "tmp").iterdir() if not p.name.startswith("aotinductor_")] == []
    assert not [f for f in os.listdir(f"/proc/{lab.pid}/fd")
                if os.readlink(f"/proc/{lab.pid}/fd/{f}").endswith("(deleted)")]
    assert not any(p.name.startswith("input") for p in lab.work.rglob("*") if p.is_file())


def test_jobs_belong_to_their_owner(lab, tmp_path):
    """7: a second user's 404; an admin lists, cancels and deletes every job and unloads; only the
    owner downloads; client file names are the owner's to see."""
    alice, bob, root = (_client(lab, n) for n in ("alice", "bob", "root"))
    path = tmp_path / "DOE_JOHN_MRN123456.nii.gz"
    write_volume(read_volume(CT), path)
    st = alice.submit({"task": "simulate-sparse-view", "params": {"views": 8, "bins": 64},
                       "inputs": {"input": path.name}}, {"input": path})
    alice.wait(st["id"], timeout=120)
    assert alice.status(st["id"])["spec"]["inputs"]["input"] == path.name
    for call in (lambda: bob.status(st["id"]), lambda: bob.cancel(st["id"]), lambda: bob.delete(st["id"]),
                 lambda: bob.download(st["id"], "result_0.nrrd", tmp_path / "stolen.nrrd"),
                 lambda: root.download(st["id"], "result_0.nrrd", tmp_path / "stolen.nrrd")):
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.status == 404
    assert st["id"] not in {j["id"] for j in bob.jobs()}
    listed = {j["id"]: j for j in root.jobs()}
    assert listed[st["id"]]["owner"] == "alice" and "DOE_JOHN" not in json.dumps(listed[st["id"]])
    with pytest.raises(ServiceError) as err:
        bob.unload()
    assert err.value.status == 403
    assert "unloaded" in root.unload()
    alice.download(st["id"], "result_0.nrrd", tmp_path / "mine.nrrd")
    root.delete(st["id"])
    with pytest.raises(ServiceError):
        alice.status(st["id"])
    audit = (lab.work / "audit.log").read_text()
    assert "user=alice action=submit" in audit and "user=alice action=download" in audit
    assert "user=root action=delete" in audit and "user=bob action=unload" in audit and "status=403" in audit
    assert not any(t in audit for t in lab.tokens.values()) and "DOE_JOHN" not in audit


def test_tokens_file_is_reloaded_and_trailing_slash_is_not_redirected(lab, users):
    """7 (token change without restart), 8 (redirect before auth to the client's Host)."""
    path, _ = users
    status, _, headers = _raw(lab.port, "GET", "/v1/health/", headers={"Host": "evil.example.com"})
    assert status == 401 and "location" not in {k.lower() for k in headers}
    status, _, headers = _raw(lab.port, "GET", "/v1/health/", lab.tokens["alice"], headers={"Host": "evil.example.com"})
    assert status == 404 and "location" not in {k.lower() for k in headers}
    token = add_user(path, "carol")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert Client(lab.url, token).health()["user"] == "carol"
            break
        except ServiceError:
            time.sleep(0.3)
    else:
        pytest.fail("a user added to the tokens file was not picked up")


def test_failed_sign_ins_are_rate_limited(tmp_path):
    """7: 300 wrong tokens in 0.2 s, then the right one worked. Now the address is locked out."""
    srv = _start(tmp_path, "rate")
    try:
        # a forged audit line through a percent-encoded newline in the path (the first failure)
        codes = [_raw(srv.port, "GET", "/v1/jobs/abc%0a2026-01-01T00:00:00%20addr=1.2.3.4%20user=root%20action=delete",
                      "x")[0]]
        codes += [_raw(srv.port, "GET", "/v1/health", "wrong-token", headers={"X-Forwarded-For": f"10.0.0.{i}"})[0]
                  for i in range(14)]  # a forwarded-for header changes nothing: the TCP peer counts
        assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}
        status, data, headers = _raw(srv.port, "GET", "/v1/health", srv.token)
        assert status == 429 and int(headers["retry-after"]) >= 1
        audit = (tmp_path / "rate-work" / "audit.log").read_text().splitlines()
        assert not any(line.startswith("2026-01-01") for line in audit)
        assert sum("status=429" in line for line in audit) == 1 and sum("status=401" in line for line in audit) == 10
        assert all("10.0.0." not in line for line in audit)
    finally:
        srv.stop()


def test_restart_keeps_finished_and_queued_jobs(tmp_path):
    """A9: finished jobs listed and downloadable after a kill -9; the running one failed with a
    clear message, the queued one runs; old folders and uploads removed; 0700 / 0600."""
    srv = _start(tmp_path, "persist")
    work = tmp_path / "persist-work"
    c = srv.client()
    done = c.submit({"task": "generate", "params": QUICK})
    c.wait(done["id"], timeout=120)
    long = c.submit({"task": "generate", "params": {"sampler": "ddpm"}})
    queued = c.submit({"task": "simulate-sparse-view", "params": {"views": 8, "bins": 64},
                       "inputs": {"input": CT.name}}, {"input": CT})
    _until(lambda: c.status(long["id"])["state"] == "running", what="the long job to run")
    assert any(p.name.startswith("input") for p in (work / queued["id"]).iterdir())
    srv.process.kill()
    srv.process.wait(30)
    (work / "0123456789abcdef").mkdir()  # a folder no job owns
    assert (os.stat(work).st_mode & 0o777) == 0o700
    for p in work.rglob("*"):
        if p.is_file():
            assert (p.stat().st_mode & 0o077) == 0, p
    srv.start(timeout=120)
    try:
        c = srv.client()
        states = {j["id"]: j for j in c.jobs()}
        assert states[done["id"]]["state"] == "done"
        assert states[long["id"]]["state"] == "failed" and "restarted" in states[long["id"]]["error"]
        assert c.wait(queued["id"], timeout=120)["state"] == "done"
        c.download(done["id"], "result_0.nrrd", tmp_path / "after_restart.nrrd")
        assert read_volume(tmp_path / "after_restart.nrrd").shape == (64, 64, 64)
        assert not (work / "0123456789abcdef").exists()
        assert not any(p.name.startswith("input") for p in work.rglob("*"))
    finally:
        srv.stop()


class _HoldingProxy:
    """A TCP proxy on 127.0.0.1 that forwards every connection but the first one (the submit)
    whole. Of that one it either holds the server's answer (``stall_upload_after=None``: the whole
    upload went through, the 202 does not come back), or stops reading the upload after its first
    bytes, so that the client blocks in the middle of sending. Tests interrupt a client at exactly
    those two moments with it; ``close()`` cuts every connection."""

    def __init__(self, target_port, stall_upload_after=None):
        self.target = target_port
        self.stall_after = stall_upload_after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.holding = threading.Event()
        self.closed = threading.Event()
        self.held = bytearray()
        self.count = 0
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(120)
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=120)
            self.sockets += [client, upstream]
            first = self.count == 1
            up_limit = self.stall_after if first else None
            threading.Thread(target=self._pipe, args=(client, upstream, up_limit, False), daemon=True).start()
            hold_answer = first and self.stall_after is None
            threading.Thread(target=self._pipe, args=(upstream, client, None, hold_answer), daemon=True).start()

    def _pipe(self, src, dst, limit, hold):
        sent = 0
        try:
            while data := src.recv(65536 if limit is None else min(65536, max(1, limit - sent))):
                if hold:
                    self.held += data
                    self.holding.set()
                    continue
                dst.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:  # stop reading: the sender blocks once buffers fill
                    self.holding.set()
                    self.closed.wait(120)
                    break
        except OSError:
            pass
        finally:
            shut(src, dst)

    def close(self):
        self.closed.set()
        self.sock.close()
        shut(*self.sockets)


@pytest.mark.parametrize("moment", ["during the upload", "before the answer"])
def test_ctrl_c_deletes_the_remote_job(lab, tmp_path, moment):
    """A8: SIGINT to `meddiffusion ... --server` while it is still sending its upload, or after
    it but before the 202 arrived: no job is left on the server."""
    during = moment == "during the upload"
    proxy = _HoldingProxy(lab.port, 200_000 if during else None)
    out = tmp_path / "never.nrrd"
    big = tmp_path / "ct.nii"  # 25 MB uncompressed: more than the socket buffers hold, so the send blocks
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 300, (256, 256, 96)) - 500).astype(np.float32)
    write_volume(Volume(arr, np.diag([1.5, 1.5, 2.5, 1.0])), big)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    before = {p.name for p in lab.work.iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "MedDiffusionLib.cli", "simulate-sparse-view", str(big), "--views",
                             "8", "--bins", "64", "--server", f"http://127.0.0.1:{proxy.port}", "--token",
                             lab.tokens["alice"], "--out", str(out), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proxy.holding.wait(120), "the proxy never held anything"
        time.sleep(1.0)  # the client is blocked in send (upload) or in recv (answer)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert proxy.count >= 2  # the CLI's delete went to the server
    if not during:
        job_id = json.loads(bytes(proxy.held).split(b"\r\n\r\n", 1)[1])["id"]
        with pytest.raises(ServiceError) as exc:
            _client(lab, "alice").status(job_id)
        assert exc.value.status == 404
    _until(lambda: {p.name for p in lab.work.iterdir()} == before, 30, "the job folder to go")
    assert not out.exists()
    assert all(j["state"] in ("done", "failed", "cancelled") for j in _client(lab, "alice").jobs())


def test_a_submit_whose_answer_never_comes_leaves_no_job(lab):
    """Client.job: the upload reached the server (which made the job) but the answer did not come
    back before the client's timeout. The job is deleted, not left running for nobody."""
    proxy = _HoldingProxy(lab.port)  # holds the server's answer to the first connection, the submit
    before = {p.name for p in lab.work.iterdir()}
    try:
        client = Client(f"http://127.0.0.1:{proxy.port}", lab.tokens["alice"], timeout=5.0)
        with pytest.raises(ServiceUnavailable):
            with client.job({"task": "generate", "params": QUICK}):
                pass
        assert proxy.holding.wait(30) and proxy.count >= 2  # the answer was held; a second connection: the delete
    finally:
        proxy.close()
    # the job the upload made (or, had the delete come first, its folder) is gone
    _until(lambda: {p.name for p in lab.work.iterdir()} <= before, 30, "the job folder to go")


def test_queue_full_is_answered_before_the_body(tmp_path):
    """8: the 503 came after the whole upload and had no Retry-After."""
    srv = _start(tmp_path, "queue", "--max-queue", "1")
    try:
        c = srv.client()
        first = c.submit({"task": "generate", "params": {"sampler": "ddpm"}})
        _until(lambda: c.status(first["id"])["state"] == "running", what="the first job to run")
        c.submit({"task": "generate", "params": QUICK})
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        s.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.token}\r\n"
                   "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000000\r\n\r\n").encode())
        answer = s.recv(65536).decode()  # no body byte was sent
        s.close()
        assert answer.startswith("HTTP/1.1 503") and "retry-after: 30" in answer.lower(), answer
        c.cancel(first["id"])
    finally:
        srv.stop()


def test_slow_clients_are_cut_off_and_time_limit_stops_jobs(tmp_path):
    """B (slow-request exposure), 2 (a per-job time limit)."""
    srv = _start(tmp_path, "slow", "--header-timeout", "1", "--body-timeout", "1", "--job-time-limit", "1")
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # half a request head
        t0 = time.monotonic()
        assert s.recv(1024) == b"" and time.monotonic() - t0 < 8  # closed by the server
        s.close()
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.token}\r\n"
                   "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{").encode())
        answer = s.recv(65536).decode()
        s.close()
        assert answer.startswith("HTTP/1.1 408"), answer
        c = srv.client()
        st = c.submit({"task": "generate", "params": {"sampler": "ddpm"}})
        with pytest.raises(ServiceError) as err:
            c.wait(st["id"], timeout=120)
        assert "limit" in err.value.message and c.status(st["id"])["step"] < 1000
    finally:
        srv.stop()


def test_token_whitespace_weak_token_and_internal_error_ids(tmp_path):
    """A11 (spaces around $MEDDIFFUSION_TOKEN lock everyone out), 7 (weak tokens accepted
    silently), A6 (500 with an id the log has)."""
    srv = LocalServer(log_file=tmp_path / "ws.log", token="  spaced-but-long-enough-token  ",
                      extra_args=["--work-dir", str(tmp_path / "ws-work")])
    srv.start(timeout=120)
    try:
        assert Client(srv.url, "spaced-but-long-enough-token").health()["admin"] is True
    finally:
        srv.stop()
    weak = LocalServer(log_file=tmp_path / "weak.log", token="abc", extra_args=["--work-dir", str(tmp_path / "w")])
    weak.start(timeout=120)
    weak.stop()
    assert "the token has 3 characters" in weak.log_tail(50)


def test_metrics_and_openapi_describe_the_service(lab):
    """5: Prometheus metrics; the schema has the request body, security scheme and error answers."""
    c = _client(lab, "alice")
    st = c.submit({"task": "generate", "params": QUICK})
    c.wait(st["id"], timeout=120)
    status, data, headers = _raw(lab.port, "GET", "/v1/metrics", lab.tokens["alice"])
    text = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("meddiffusion_queue_length", "meddiffusion_running_jobs", "meddiffusion_job_duration_seconds_count",
                 "meddiffusion_jobs_finished_total", "meddiffusion_auth_failures_total"):
        assert name in text, name
    assert 'meddiffusion_job_duration_seconds_count{task="generate"}' in text
    status, data, _ = _raw(lab.port, "GET", "/v1/openapi.json", lab.tokens["alice"])
    doc = json.loads(data)
    post = doc["paths"]["/v1/jobs"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert {"400", "401", "413", "415", "503"} <= set(post["responses"])
    assert "retry-after" in {h.lower() for h in post["responses"]["503"]["headers"]}
    result = doc["paths"]["/v1/jobs/{job_id}/results/{name}"]["get"]["responses"]["200"]["content"]
    assert list(result) == ["application/octet-stream"]
    assert "403" in doc["paths"]["/v1/unload"]["post"]["responses"]
    schemas = doc["components"]["schemas"]
    assert len(schemas["JobRequest"]["oneOf"]) == 5  # one request model per task, told apart by "task"
    assert "views" in schemas["SimulateSparseViewParams"]["properties"]
    assert set(schemas["EvaluateParams"]["properties"]) == {"labels", "resample"}
    assert "num_samples" in schemas["ReconstructParams"]["properties"]
    upload = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"spec", "input", "prediction", "reference"} <= set(upload)
    assert "views" not in schemas["GenerateParams"]["properties"] and "params" in schemas["GenerateRequest"]["properties"]


def test_https_with_a_ca_file(tmp_path, capsys):
    """5: --tls-cert/--tls-key on the server, --ca-file in the client and the CLI."""
    import ssl

    from tls_server import write_cert

    from MedDiffusionLib.cli import main

    write_cert(tmp_path)
    srv = LocalServer(log_file=tmp_path / "tls.log", extra_args=[
        "--work-dir", str(tmp_path / "tls-work"), "--tls-cert", str(tmp_path / "cert.pem"),
        "--tls-key", str(tmp_path / "key.pem")])
    srv.start(wait=False)
    url = f"https://127.0.0.1:{srv.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                assert Client(url, srv.token, ca_file=tmp_path / "cert.pem").health()["version"]
                break
            except ServiceError:
                assert time.monotonic() < deadline and srv.running, srv.log_tail()
                time.sleep(0.3)
        with pytest.raises(ServiceError) as err:
            Client(url, srv.token).health()
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
        status, _, _ = _raw(srv.port, "GET", "/v1/health", srv.token,
                            tls=ssl.create_default_context(cafile=str(tmp_path / "cert.pem")))
        assert status == 200
        out = tmp_path / "over_tls.nrrd"
        assert main(["generate", "--sampler", "ddim", "--steps", "2", "--out", str(out), "--quiet", "--server", url,
                     "--token", srv.token, "--ca-file", str(tmp_path / "cert.pem")]) == 0, capsys.readouterr().err
        assert read_volume(out).shape == (64, 64, 64)
    finally:
        srv.stop()


def test_load_four_clients_five_jobs_each(lab, tmp_path):
    """A bounded load test on loopback: 4 clients x 5 small jobs; the server's RSS, threads and
    open files come back to where they were."""
    c = _client(lab, "alice")
    for spec, files in (({"task": "generate", "params": QUICK}, None),
                        ({"task": "simulate-sparse-view", "params": {"views": 8, "bins": 64},
                          "inputs": {"input": CT.name}}, {"input": CT})):
        c.wait(c.submit(spec, files)["id"], timeout=120)  # warm: models loaded, kernels chosen
    time.sleep(0.5)
    fds0, threads0, rss0 = _proc_counts(lab.pid)
    errors = []

    def client_run(i):
        cl = _client(lab, ("alice", "bob", "root", "alice")[i])
        try:
            for k in range(5):
                if k % 2:
                    st = cl.submit({"task": "simulate-sparse-view", "params": {"views": 8, "bins": 64},
                                    "inputs": {"input": CT.name}}, {"input": CT})
                else:
                    st = cl.submit({"task": "generate", "params": {**QUICK, "seed": 10 * i + k}})
                done = cl.wait(st["id"], timeout=300)
                cl.download(st["id"], done["results"][0]["name"], tmp_path / f"{i}_{k}.nrrd")
                cl.delete(st["id"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client_run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert len(list(tmp_path.glob("*.nrrd"))) == 20
    # the four concurrent clients made the ASGI thread pool grow; anyio retires a worker idle for
    # 10 s when the next call comes
    time.sleep(11)
    # a retired worker is told to exit by a queued sentinel: it leaves /proc a moment later
    _until(lambda: c.health() and _proc_counts(lab.pid)[1] <= threads0 + 1, 30, "the idle workers to exit", poll=0.5)
    fds1, threads1, rss1 = _proc_counts(lab.pid)
    assert threads1 <= threads0 + 1 and fds1 <= fds0 + 2, (threads0, threads1, fds0, fds1)
    assert rss1 < rss0 * 1.15 + 64 * 2 ** 20, (rss0, rss1)


def test_removed_user_is_locked_out_without_a_restart(lab, users):
    """7: tokens change without a restart, both ways."""
    path, _ = users
    token = add_user(path, "dave")
    _until(lambda: _raw(lab.port, "GET", "/v1/health", token)[0] == 200, 10, "dave to be added")
    path.write_text("".join(ln + "\n" for ln in path.read_text().splitlines() if not ln.startswith("dave ")))
    _until(lambda: _raw(lab.port, "GET", "/v1/health", token)[0] == 401, 10, "dave to be removed")
    assert _raw(lab.port, "GET", "/v1/health", lab.tokens["alice"])[0] == 200


def test_work_folder_is_the_servers_alone(tmp_path):
    """A folder holding other files is refused; two servers never share one work folder."""
    from MedDiffusionLib.errors import UserError
    from MedDiffusionLib.server import JobService, Limits

    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    mode = os.stat(other).st_mode
    with pytest.raises(UserError, match="must be empty"):
        JobService(other, Limits())
    assert (other / "thesis.tex").read_text() == "mine" and os.stat(other).st_mode == mode
    first = JobService(tmp_path / "work", Limits())
    try:
        with pytest.raises(UserError, match="another MedDiffusion server"):
            JobService(tmp_path / "work", Limits())
    finally:
        first.close()
    JobService(tmp_path / "work", Limits()).close()  # free again once the first one closed


def test_internal_fault_gets_an_id_the_log_has(tmp_path, monkeypatch, caplog):
    """A6: a fault of ours ends the job with 'internal error (id X)', and the log has X with the
    traceback; the client sees neither the exception text nor a path."""
    import logging
    import re

    from MedDiffusionLib.jobs import ModelCache, resolve
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    from MedDiffusionLib.server import Job, JobService, Limits

    def bug(*a, **k):
        raise RuntimeError(f"an internal fault in {tmp_path}")

    monkeypatch.setattr(GenerationPipeline, "generate", bug)
    service = JobService(tmp_path / "work", Limits())
    try:
        job = Job("0123456789abcdef", resolve({"task": "generate", "params": QUICK}), "cpu",
                  service.work_dir / "0123456789abcdef")
        job.folder.mkdir()
        with caplog.at_level(logging.ERROR, logger="meddiffusion.server"):
            service._run(job, ModelCache())
        eid = re.fullmatch(r"internal error \(id ([0-9a-f]{12})\); the server log has the details", job.error).group(1)
        assert f"error id {eid}" in caplog.text and "an internal fault" in caplog.text
        assert str(tmp_path) not in job.error and job.state == "failed"
    finally:
        service.close()
