"""The job service end to end: a real `meddiffusion serve` subprocess on 127.0.0.1, real HTTP
through the standard-library client, the bundled model and real CT, few sampler steps."""
import threading
import time

import numpy as np
import pytest

from conftest import DATA
from MedDiffusionLib.client import Client, JobCancelled, LocalServer, ServiceError, ServiceUnavailable
from MedDiffusionLib.cli import main
from MedDiffusionLib.data.volumes import Volume, read_volume, write_volume
from MedDiffusionLib.errors import Cancelled
from MedDiffusionLib.jobs import ModelCache, resolve, run_job
from MedDiffusionLib.pipelines.conditioned import ct_labels_from_hu

CT = DATA / "lung2_crop.nii.gz"
QUICK = {"sampler": "ddim", "steps": 2}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(tmp_path_factory, work_dir):
    srv = LocalServer(log_file=tmp_path_factory.mktemp("log") / "serve.log",
                      extra_args=["--max-upload-mb", "4", "--work-dir", str(work_dir)])
    srv.start(timeout=120)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def oblique_ct(tmp_path_factory):
    """The CT crop on an oblique grid (rotated 20 degrees about two axes), as NRRD."""
    ct = read_volume(CT)
    a, b = np.deg2rad(20), np.deg2rad(-15)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = ct.affine.copy()
    aff[:3, :3] = rot @ aff[:3, :3]
    path = tmp_path_factory.mktemp("ct") / "oblique.nrrd"
    write_volume(Volume(ct.array.astype(np.float32), aff), path)
    return path


def run_remote(client, spec, files=None, dest=None):
    st = client.submit(spec, files)
    seen = []
    st = client.wait(st["id"], progress=lambda s: seen.append((s["phase"], s["step"], s["total"], s["eta_s"])))
    paths = []
    for r in st["results"]:
        paths.append(client.download(st["id"], r["name"], dest / r["name"]))
    return st, seen, paths


def test_generate_matches_in_process(client, tmp_path):
    spec = {"task": "generate", "params": {**QUICK, "seed": 3, "num_volumes": 2, "hu": False}}
    st, seen, paths = run_remote(client, spec, dest=tmp_path)
    assert st["state"] == "done" and len(paths) == 2
    assert st["spec"]["params"]["size"] == [64, 64, 64] and st["spec"]["params"]["steps"] == 2
    order = ["queued", "loading", "sampling", "decoding", "writing", "done"]
    ranks = [order.index(p) for p, *_ in seen]  # polling sees some phases, always in order
    assert ranks == sorted(ranks) and seen[-1][0] == "done"
    events = []
    local = run_job(spec, progress=events.append)
    phases = [e.phase for e in events]
    assert phases[0] == "loading" and {"sampling", "decoding", "writing"} <= set(phases)
    assert [e.step for e in events if e.phase == "sampling"][-1] == 1 and events[-1].total == 2
    assert any(e.eta_s is not None for e in events)
    for path, res in zip(paths, local.results):
        got = read_volume(path)
        np.testing.assert_allclose(got.affine, res.volume.affine, atol=1e-6)
        np.testing.assert_allclose(got.array, res.volume.array, atol=1e-4)
    assert not np.allclose(read_volume(paths[0]).array, read_volume(paths[1]).array)


@pytest.mark.parametrize("task, controlnet", [("synthesize", "chest-ct-mini-labels"),
                                              ("reconstruct", "chest-ct-mini-sparse-view")])
def test_conditioned_tasks_on_oblique_grid(client, oblique_ct, tmp_path, task, controlnet):
    src = read_volume(oblique_ct)
    if task == "synthesize":
        path = tmp_path / "labels.nrrd"
        write_volume(src.with_array(ct_labels_from_hu(src.array).astype(np.int16)), path)
    else:
        path = oblique_ct
    spec = {"task": task, "controlnet": controlnet, "params": {**QUICK, "seed": 1}, "inputs": {"input": path.name}}
    st, _, paths = run_remote(client, spec, {"input": path}, tmp_path)
    out = read_volume(paths[0])
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    local = run_job(dict(spec, inputs={"input": str(path)}))
    np.testing.assert_allclose(out.array, local.results[0].volume.array, atol=1e-2)
    assert st["results"][0]["meta"]["units"] == "HU"


def test_simulate_then_reconstruct_chain(client, tmp_path):
    st, _, paths = run_remote(client, {"task": "simulate-sparse-view", "params": {"views": 20, "bins": 128},
                                       "inputs": {"input": CT.name}}, {"input": CT}, tmp_path)
    fbp = read_volume(paths[0])
    assert fbp.shape == read_volume(CT).shape


def _raw(server, method, path, token=None, body=None, headers=None, chunked=False):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=hdrs, encode_chunked=chunked)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_auth_required_and_nothing_runs(server, tmp_path):
    import json

    for path in ("/docs", "/openapi.json", "/redoc"):  # FastAPI's own token-less routes are off
        assert _raw(server, "GET", path)[0] == 401  # no route, not even a 404, without the token
        assert _raw(server, "GET", path, server.token)[0] == 404
    assert _raw(server, "GET", "/v1/openapi.json")[0] == 401
    status, body = _raw(server, "GET", "/v1/openapi.json", server.token)
    assert status == 200 and "/v1/jobs" in json.loads(body)["paths"]
    before = len(server.client().jobs())
    for token in ("", "wrong-token"):
        bad = Client(server.url, token)
        with pytest.raises(ServiceError) as err:
            bad.submit({"task": "generate", "params": QUICK})
        assert err.value.status == 401
        with pytest.raises(ServiceError) as err:
            bad.health()
        assert err.value.status == 401
    assert len(server.client().jobs()) == before


def _bad_files(tmp_path):
    ct = read_volume(CT)
    nan = ct.array.astype(np.float32)
    nan[3, 4, 5] = np.nan
    write_volume(ct.with_array(nan), tmp_path / "nan.nrrd")
    write_volume(ct.with_array(np.zeros(ct.shape, np.int16)), tmp_path / "empty.nrrd")
    (tmp_path / "text.nrrd").write_text("this is not a volume\n")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "huge.nrrd").write_bytes(b"\0" * (5 * 2 ** 20))
    return tmp_path


BAD = [
    ({"task": "paint"}, None, 400, "unknown task"),
    ({"task": "generate", "model": "nope"}, None, 400, "unknown model id"),
    ({"task": "generate", "params": {"class": 9}}, None, 400, "unknown class"),
    ({"task": "generate", "params": {"class": "MR T1"}}, None, 400, "does not know class 3"),
    ({"task": "generate", "params": {"size": [100, 64, 64]}}, None, 400, "nearest legal sizes"),
    ({"task": "generate", "params": {"steps": 0, "sampler": "ddim"}}, None, 400, "must be positive"),
    ({"task": "generate", "params": {"colour": "red"}}, None, 400, "unknown parameter"),
    ({"task": "generate", "weights": "/etc"}, None, 400, "does not open local paths"),
    ({"task": "synthesize", "controlnet": "/etc/passwd", "inputs": {"input": "x.nrrd"}}, "empty.nrrd", 400,
     "never opens local paths"),
    ({"task": "reconstruct", "controlnet": "chest-ct-mini-labels", "inputs": {"input": "x"}}, "nan.nrrd", 400,
     "not sparse-view or mri"),
    ({"task": "reconstruct", "controlnet": "chest-ct-mini-sparse-view", "inputs": {"input": "x"}}, "nan.nrrd", 400,
     "NaN"),
    ({"task": "synthesize", "controlnet": "chest-ct-mini-labels", "inputs": {"input": "x"}}, "empty.nrrd", 400,
     "label map is empty"),
    ({"task": "synthesize", "controlnet": "chest-ct-mini-labels", "inputs": {"input": "x"}}, "text.nrrd", 415,
     "could not be read as a volume"),
    ({"task": "synthesize", "controlnet": "chest-ct-mini-labels", "inputs": {"input": "x"}}, "notes.txt", 415,
     "not a volume file"),
    ({"task": "synthesize", "controlnet": "chest-ct-mini-labels", "inputs": {"input": "x"}}, "huge.nrrd", 413,
     "upload too large"),
    ({"task": "synthesize", "controlnet": "chest-ct-mini-labels"}, None, 400, "needs an input volume"),
    ({"task": "synthesize", "controlnet": "chest-ct-mini-labels", "inputs": {"input": "x", "/tmp/escape": "y"}},
     "empty.nrrd", 400, "unknown input name"),
]


def test_bad_requests_get_clear_4xx_and_server_stays_up(client, tmp_path):
    files = _bad_files(tmp_path)
    for spec, fname, status, message in BAD:
        with pytest.raises(ServiceError) as err:
            client.submit(spec, {"input": files / fname} if fname else None)
        assert err.value.status == status and message in err.value.message, (spec, err.value.status, err.value.message)
        assert "Traceback" not in err.value.message
    # an upload without Content-Length (chunked) is cut off at the limit as well
    boundary = "b0undary"

    def chunks():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n'
               '{"task": "simulate-sparse-view", "inputs": {"input": "x"}}\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="input"; filename="big.nrrd"\r\n\r\n').encode()
        for _ in range(6):
            yield b"\0" * 2 ** 20
        yield f"\r\n--{boundary}--\r\n".encode()

    server = LocalServer.__new__(LocalServer)  # only .port is needed by _raw
    server.port = int(client.url.rsplit(":", 1)[1])
    status, body = _raw(server, "POST", "/v1/jobs", client.token, chunks(),
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"}, chunked=True)
    assert status == 413 and b"upload too large" in body
    st, _, paths = run_remote(client, {"task": "generate", "params": QUICK}, dest=tmp_path)
    assert st["state"] == "done" and paths[0].exists()


def test_cancel_mid_run_leaves_no_result(client, work_dir):
    st = client.submit({"task": "generate", "params": {"sampler": "ddpm"}})
    deadline = time.monotonic() + 60
    while client.status(st["id"])["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.cancel(st["id"])
    with pytest.raises(JobCancelled):
        client.wait(st["id"], timeout=60)
    final = client.status(st["id"])
    assert final["state"] == "cancelled" and final["results"] == [] and final["step"] < 1000
    folder = work_dir / st["id"]
    assert folder.is_dir() and not (folder / "results").exists() and not (folder / "preview.nrrd").exists()
    with pytest.raises(ServiceError) as err:
        client.download(st["id"], "result_0.nrrd", "/tmp/never-written.nrrd")
    assert err.value.status == 409


def test_two_clients_are_queued_and_both_complete(server, tmp_path):
    loads_before = server.client().health()["model_loads"]
    results, states = {}, {}

    def one(i, steps):
        c = server.client()
        st = c.submit({"task": "generate", "params": {"sampler": "ddim", "steps": steps, "seed": i}})
        states[i] = st
        results[i] = c.wait(st["id"], timeout=300)

    first = threading.Thread(target=one, args=(0, 40))
    first.start()
    while not (states.get(0) and server.client().status(states[0]["id"])["state"] == "running"):
        time.sleep(0.02)
    second = threading.Thread(target=one, args=(1, 2))  # submitted while the first one runs
    second.start()
    for t in (first, second):
        t.join(300)
    assert all(r["state"] == "done" for r in results.values()) and len(results) == 2
    assert states[1]["state"] == "queued" and states[1]["position"] == 1, states[1]
    # the model was already loaded by the earlier jobs of this module: no new weight loads
    assert server.client().health()["model_loads"] == loads_before


def test_model_cache_and_unload(tmp_path):
    srv = LocalServer(log_file=tmp_path / "serve.log")
    srv.start()
    try:
        c = srv.client()
        for seed in (0, 1):
            st = c.submit({"task": "generate", "params": {**QUICK, "seed": seed}})
            c.wait(st["id"], timeout=120)
        health = c.health()
        assert health["model_loads"] == 1 and len(health["loaded"]) == 1
        assert c.unload()["unloaded"] and c.health()["loaded"] == []
    finally:
        srv.stop()


def test_server_killed_mid_job_then_restarted(tmp_path):
    srv = LocalServer(log_file=tmp_path / "serve.log")
    srv.start()
    c = srv.client()
    st = c.submit({"task": "generate", "params": {"sampler": "ddpm"}})
    while c.status(st["id"])["state"] != "running":
        time.sleep(0.05)
    pid = srv.pid
    srv.process.kill()
    with pytest.raises(ServiceUnavailable) as err:
        c.wait(st["id"], timeout=30)
    assert "cannot reach" in str(err.value) or "stopped answering" in str(err.value)
    c2 = srv.ensure()
    assert srv.pid != pid
    st = c2.submit({"task": "generate", "params": QUICK})
    assert c2.wait(st["id"], timeout=120)["state"] == "done"
    proc = srv.process
    srv.stop()
    assert proc.poll() is not None and not srv.running
    with pytest.raises(ServiceUnavailable):
        srv.client(timeout=2).health()


def test_cli_server_option_matches_local(server, tmp_path, capsys):
    local, remote = tmp_path / "local.nii.gz", tmp_path / "remote.nii.gz"
    common = ["generate", "--sampler", "dpm++", "--steps", "2", "--seed", "5", "--hu", "--quiet"]
    assert main(common + ["--out", str(local)]) == 0
    assert main(common + ["--out", str(remote), "--server", server.url, "--token", server.token]) == 0, \
        capsys.readouterr().err
    a, b = read_volume(local), read_volume(remote)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    np.testing.assert_allclose(a.array, b.array, atol=0.5)  # HU; float32 rounding across processes
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "x.nii.gz"), "--server", server.url, "--token", "bad"]) == 2
    assert "check the service token" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_in_process_resolver_is_the_one_source_of_defaults():
    spec = resolve({"task": "generate", "params": {"sampler": "dpm++"}})
    assert spec.params["steps"] == 20 and spec.params["size"] == [64, 64, 64]
    res = run_job(spec, cache=ModelCache())
    assert res.results[0].meta["steps"] == 20
    assert resolve({"task": "generate"}).params["steps"] == 1000
    from MedDiffusionLib.pipelines.generation import GenerationPipeline

    gen = GenerationPipeline.from_pretrained(device="cpu").generate(sampler="dpm++", steps=None)
    assert gen[0].meta["steps"] == 20 and gen[0].meta["sampler"] == "dpm++"


def test_every_front_end_gets_the_same_resolved_request(client, tmp_path, monkeypatch, capsys):
    """The Python API (resolve), the CLI and the service turn the same request into the same
    resolved, read-only parameters (the service fills in the device it runs on)."""
    from MedDiffusionLib import jobs

    params = {"seed": 3, "sampler": "ddim", "steps": 2, "class": 1}
    api = resolve({"task": "generate", "params": params})
    assert api.resolved
    with pytest.raises(TypeError, match="read-only"):
        api.params["steps"] = 5

    seen = []

    def capture(spec, *args, **kwargs):
        seen.append(spec)
        raise Cancelled("captured")

    monkeypatch.setattr(jobs, "run_job", capture)
    main(["generate", "--seed", "3", "--sampler", "ddim", "--steps", "2", "--class", "1", "--quiet",
          "--out", str(tmp_path / "cli.nii.gz")])
    capsys.readouterr()
    assert len(seen) == 1 and seen[0].resolved
    monkeypatch.undo()

    st = client.wait(client.submit({"task": "generate", "params": params})["id"])
    served = st["spec"]["params"]

    def comparable(p):
        return {k: v for k, v in dict(p).items() if k != "device"}

    assert comparable(seen[0].params) == comparable(api.params) == comparable(served)
    assert served["steps"] == 2 and served["hu"] is True and served["size"] == [64, 64, 64]


def test_size_beyond_memory_is_refused_before_starting(client, tmp_path, capsys):
    out = tmp_path / "big.nii.gz"
    assert main(["generate", "--size", "4096", "4096", "4096", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    # refused before anything runs: RAM (with the force advice) or, as the decode spills, the disk
    assert ("needs about" in err and "force" in err or "of disk" in err) and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ServiceError) as exc:  # over the server's default voxel cap: refused at the door
        client.submit({"task": "generate", "params": {"size": [4096, 4096, 4096]}})
    assert exc.value.status == 400 and "allows" in exc.value.message
    assert client.jobs() == [] or all(j["spec"]["params"]["size"] != [4096, 4096, 4096] for j in client.jobs())


@pytest.fixture(scope="module")
def mri_controlnets(tmp_path_factory):
    """A folder with an MRI ControlNet ("mri-demo"): the bundled sparse-view weights relabelled as an
    MRI task (percentile-normalised image hint, output in model units). It exercises the MRI path;
    it was not trained for MRI."""
    import json
    import shutil

    from MedDiffusionLib.registry import RESOURCES

    root = tmp_path_factory.mktemp("controlnets")
    dst = root / "mri-demo"
    dst.mkdir()
    src = RESOURCES / "models" / "chest-ct-mini-sparse-view"
    shutil.copy(src / "controlnet.safetensors", dst / "controlnet.safetensors")
    doc = json.loads((src / "controlnet.json").read_text())
    doc["meta"].update(task="mri", output="model", hint={"type": "image", "normalize": "percentile"})
    doc["meta"].pop("hu_window", None)
    (dst / "controlnet.json").write_text(json.dumps(doc))
    return root


def test_mri_reconstruction_from_cli_and_server(mri_controlnets, tmp_path, capsys):
    import torch

    from MedDiffusionLib.operators.mri import gaussian_column_mask, zero_filled_recon

    ct = read_volume(CT)
    img = torch.from_numpy(ct.array.astype(np.float32)).permute(2, 0, 1)  # slices (k, i, j)
    zf = zero_filled_recon(img, gaussian_column_mask(tuple(img.shape[1:]), 4.0)).permute(1, 2, 0).numpy()
    path = tmp_path / "zero_filled.nrrd"
    write_volume(ct.with_array(np.ascontiguousarray(zf, dtype=np.float32)), path)
    local = tmp_path / "local.nrrd"
    assert main(["reconstruct", str(path), "--controlnet", str(mri_controlnets / "mri-demo"), "--steps", "2",
                 "--out", str(local), "--quiet"]) == 0, capsys.readouterr().err
    out = read_volume(local)
    assert out.shape == ct.shape and -1.01 <= out.array.min() and out.array.max() <= 1.01
    srv = LocalServer(log_file=tmp_path / "serve.log", extra_args=["--controlnet-dir", str(mri_controlnets)])
    srv.start()
    try:
        c = srv.client()
        assert "mri-demo" in {n["name"] for n in c.health()["controlnets"]}
        st, _, paths = run_remote(c, {"task": "reconstruct", "controlnet": "mri-demo", "params": {"steps": 2},
                                      "inputs": {"input": path.name}}, {"input": path}, tmp_path)
        assert st["results"][0]["meta"]["controlnet_task"] == "mri"
        np.testing.assert_allclose(read_volume(paths[0]).array, out.array, atol=1e-3)
        # the CLI leaves the choice of ControlNet to the server: a name only the server knows works
        via_cli = tmp_path / "via_cli.nrrd"
        assert main(["reconstruct", str(path), "--controlnet", "mri-demo", "--steps", "2", "--server", srv.url,
                     "--token", srv.token, "--out", str(via_cli), "--quiet"]) == 0, capsys.readouterr().err
        np.testing.assert_allclose(read_volume(via_cli).array, out.array, atol=1e-3)
    finally:
        srv.stop()


def test_cli_prints_one_cpu_warning_and_warns_on_non_ct_input(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "s.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "MedDiffusionLib.cli", "generate", "--sampler", "ddim", "--steps", "2",
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr and proc.stderr.count("running on the CPU") == 1, proc.stderr
    ct = read_volume(CT)
    mr = tmp_path / "t1.nrrd"
    write_volume(ct.with_array(np.clip(ct.array / 8 + 128, 0, 255).astype(np.uint8)), mr)
    proc = subprocess.run([sys.executable, "-m", "MedDiffusionLib.cli", "simulate-sparse-view", str(mr), "--views",
                           "8", "--bins", "64", "--out", str(tmp_path / "fbp.nrrd"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "does not look like CT in Hounsfield units" in proc.stderr, proc.stderr


def test_queue_limit_and_result_lifetime(tmp_path):
    # results kept 3 s: long enough for wait() to see the job done on a loaded machine, short for the test
    srv = LocalServer(log_file=tmp_path / "serve.log", extra_args=["--max-queue", "1", "--result-ttl", "3"])
    srv.start()
    try:
        c = srv.client()
        first = c.submit({"task": "generate", "params": {"sampler": "ddpm"}})
        while c.status(first["id"])["state"] == "queued":
            time.sleep(0.05)
        second = c.submit({"task": "generate", "params": QUICK})
        with pytest.raises(ServiceError) as err:
            c.submit({"task": "generate", "params": QUICK})
        assert err.value.status == 503 and "queue is full" in err.value.message
        c.cancel(first["id"])
        assert c.wait(second["id"], timeout=120)["state"] == "done"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                c.status(second["id"])
            except ServiceError as exc:
                assert exc.status == 404
                break
            time.sleep(0.2)
        else:
            pytest.fail("a finished job outlived --result-ttl")
    finally:
        srv.stop()


def test_live_preview_every_n_steps(client, tmp_path):
    st = client.submit({"task": "generate", "params": {"sampler": "ddim", "steps": 4, "preview_every": 2}})
    done = client.wait(st["id"], timeout=120)
    assert done["preview_step"] == 4
    prev = read_volume(client.preview(st["id"], tmp_path / "preview.nrrd"))
    final = read_volume(client.download(st["id"], "result_0.nrrd", tmp_path / "final.nrrd"))
    assert prev.shape == final.shape and np.allclose(prev.affine, final.affine)
    # the last preview decodes the last step's predicted clean latent, which the sampler's final
    # update (to alpha-bar at t=0, the authors' DDIM) moves only slightly
    window = done["spec"]["params"]["hu_window"]  # the preview comes in the result's units (HU here)
    assert window and np.abs(prev.array - final.array).mean() < 0.02 * (window[1] - window[0]) / 2
    assert np.abs(prev.array - final.array).mean() < 0.2 * np.abs(final.array - final.array.mean()).mean()


def test_cli_user_errors_one_line_internal_errors_traceback(tmp_path, capsys, monkeypatch):
    from MedDiffusionLib.errors import UserError
    from MedDiffusionLib.pipelines.generation import GenerationPipeline

    out = str(tmp_path / "x.nii.gz")
    assert main(["generate", "--class", "9", "--out", out]) == 2
    assert capsys.readouterr().err.startswith("error: unknown class")
    with pytest.raises(UserError):
        main(["--debug", "generate", "--class", "9", "--out", out])

    def bug(*a, **k):
        raise RuntimeError("an internal fault")

    monkeypatch.setattr(GenerationPipeline, "generate", bug)
    with pytest.raises(RuntimeError, match="an internal fault"):  # not turned into a one-line user error
        main(["generate", "--sampler", "ddim", "--steps", "2", "--out", out, "--quiet"])
    assert not (tmp_path / "x.nii.gz").exists()


def test_gpu_out_of_memory_ends_the_job_with_advice(tmp_path, monkeypatch):
    import torch

    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    from MedDiffusionLib.server import Job, JobService, Limits

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(GenerationPipeline, "generate", oom)
    service = JobService(tmp_path, Limits())
    spec = resolve({"task": "generate", "params": QUICK})
    job = Job("j1", spec, "cpu", tmp_path / "j1")
    job.folder.mkdir()
    service._run(job, ModelCache())
    assert job.state == "failed" and "ran out of memory" in job.error and "smaller size" in job.error
    assert "Tried to allocate" not in job.error and not (job.folder / "results").exists()
    service.close()


def test_outputs_are_written_all_or_none(tmp_path):
    from MedDiffusionLib.jobs import write_all

    a, b = tmp_path / "a.nrrd", tmp_path / "b.nrrd"

    def fail():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_all([a, b], [lambda: a.write_bytes(b"first"), fail])
    assert not a.exists() and not b.exists()


def test_every_result_is_marked_synthetic_here_and_through_the_service(server, tmp_path, capsys):
    """Provenance and the synthetic mark (MedDiffusionLib.provenance) on every output: NIfTI
    (``descrip`` + JSON sidecar) and NRRD (key/value fields), written here and through the
    service; ``meddiffusion info FILE`` prints it; a condition input is fingerprinted."""
    import json

    import nibabel as nib

    from MedDiffusionLib.provenance import read_provenance, sha256_of, sidecar_path

    common = ["generate", "--sampler", "dpm++", "--steps", "2", "--seed", "7", "--quiet"]
    remote = ["--server", server.url, "--token", server.token]
    outs = {"local": tmp_path / "l.nii.gz", "remote": tmp_path / "r.nii.gz", "nrrd": tmp_path / "r.nrrd"}
    for key, out in outs.items():
        assert main(common + ["--out", str(out)] + (remote if key != "local" else [])) == 0, capsys.readouterr().err
    provs = {k: read_provenance(p) for k, p in outs.items()}
    for prov in provs.values():
        assert prov["synthetic"] is True and prov["generator"] == "MedDiffusion" and prov["task"] == "generate"
        assert (prov["model"], prov["seed"], prov["sampler"], prov["steps"]) == ("chest-ct-mini", 7, "dpm++", 2)
        assert len(prov["weights_sha256"]) == 64 and prov["decode_exact"] is True and prov["torch_version"]
        assert prov["size"] == [64, 64, 64] and prov["units"] == "HU" and prov["hu_window"]
    assert len({p["weights_sha256"] for p in provs.values()}) == 1  # the same weights, here and there
    for key in ("local", "remote"):
        descrip = bytes(nib.load(str(outs[key])).header["descrip"])
        assert descrip.startswith(b"SYNTHETIC MedDiffusion") and b"chest-ct-mini" in descrip
        assert json.loads(sidecar_path(outs[key]).read_text()) == provs[key]
    capsys.readouterr()
    assert main(["info", str(outs["nrrd"])]) == 0 and "SYNTHETIC" in capsys.readouterr().out
    assert main(["info", str(CT)]) == 1 and "no MedDiffusion provenance" in capsys.readouterr().out
    # a condition input is fingerprinted (the voxels the job read)
    res = run_job({"task": "simulate-sparse-view", "params": {"views": 8, "bins": 64}, "inputs": {"input": str(CT)}},
                  cache=ModelCache())
    prov = res.results[0].meta["provenance"]
    assert prov["conditions_sha256"] == {"input": sha256_of(read_volume(CT).array)} and prov["views"] == 8
    # the sidecar is part of the output: an existing one is not replaced without --overwrite
    sidecar_path(tmp_path / "x.nii.gz").write_text("{}")
    with pytest.raises(FileExistsError):
        write_volume(read_volume(CT), tmp_path / "x.nii.gz", provenance=prov)
    assert not (tmp_path / "x.nii.gz").exists()


def test_n_samples_through_the_service_and_reproduced_here(server, tmp_path, capsys):
    """num_samples through the service: the samples, their mean and std come back, each marked,
    and the service's std re-runs here (same CPU, same kernels) to the same voxels."""
    from MedDiffusionLib.provenance import read_provenance

    fbp = tmp_path / "fbp.nrrd"
    assert main(["simulate-sparse-view", str(CT), "--views", "8", "--bins", "64", "--quiet", "--out", str(fbp)]) == 0
    out = tmp_path / "rec.nii.gz"
    assert main(["reconstruct", str(fbp), "--controlnet", "chest-ct-mini-sparse-view", "--num-samples", "3",
                 "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--quiet", "--out", str(out),
                 "--server", server.url, "--token", server.token]) == 0, capsys.readouterr().err
    names = ["rec_sample_0", "rec_sample_1", "rec_sample_2", "rec_mean", "rec_std"]
    for name in names:
        prov = read_provenance(tmp_path / f"{name}.nii.gz")
        assert prov["synthetic"] is True and prov["job"]["params"]["num_samples"] == 3
        assert prov["result"].split(".")[0] == name[4:]
    samples = np.stack([read_volume(tmp_path / f"{n}.nii.gz").array for n in names[:3]]).astype(np.float64)
    np.testing.assert_allclose(read_volume(tmp_path / "rec_std.nii.gz").array, samples.std(0, ddof=1), atol=1e-3)
    capsys.readouterr()
    assert main(["reproduce", str(tmp_path / "rec_std.nii.gz"), "--input", str(fbp), "--quiet"]) == 0
    assert "reproduced" in capsys.readouterr().out
    # ... and on the service again (the recorded job submitted there, the result compared here)
    assert main(["reproduce", str(tmp_path / "rec_sample_1.nii.gz"), "--input", str(fbp), "--quiet",
                 "--server", server.url, "--token", server.token]) == 0, capsys.readouterr().err
    assert "max |difference| 0 HU" in capsys.readouterr().out


def test_dicom_export_here_and_through_the_service(server, tmp_path, capsys):
    """--format dicom: a marked DICOM series with the same voxels and geometry as the volume file,
    written here and through the service (the client converts the download); info and reproduce
    read the folder back."""
    import SimpleITK as sitk

    from MedDiffusionLib.io.dicom import dicom_provenance, read_dicom_series

    common = ["generate", "--sampler", "ddim", "--steps", "2", "--seed", "5", "--quiet"]
    remote = ["--server", server.url, "--token", server.token]
    assert main(common + ["--out", str(tmp_path / "ref.nrrd")]) == 0
    assert main(common + ["--format", "dicom", "--out", str(tmp_path / "here")]) == 0
    assert main(common + ["--format", "dicom", "--out", str(tmp_path / "there")] + remote) == 0
    ref = read_volume(tmp_path / "ref.nrrd")
    for name in ("here", "there"):
        vol = read_dicom_series(tmp_path / name)
        np.testing.assert_allclose(vol.array, ref.array, atol=0.5)  # HU rounded to integers
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
        prov = dicom_provenance(tmp_path / name)
        assert prov["synthetic"] is True and prov["seed"] == 5 and prov["job"]["params"]["steps"] == 2
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / name)))
        assert reader.Execute().GetSize() == ref.shape
    capsys.readouterr()
    assert main(["info", str(tmp_path / "there")]) == 0 and "SYNTHETIC" in capsys.readouterr().out
    assert main(["reproduce", str(tmp_path / "there"), "--quiet"]) == 0
    assert "max |difference| 0 HU" in capsys.readouterr().out
    # an existing series is not replaced without --overwrite, before anything runs
    assert main(common + ["--format", "dicom", "--out", str(tmp_path / "here")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_evaluate_job_through_the_service(client, work_dir, tmp_path, capsys):
    """evaluate as a job: two uploads, metrics in the result's meta (strict JSON: a perfect PSNR is
    "inf") and as a downloadable metrics.json; the same numbers as in this process; bad input 4xx."""
    import json

    from MedDiffusionLib.evaluation import paired_metrics

    noisy = read_volume(CT)
    noisy = noisy.with_array(noisy.array + np.random.default_rng(0).integers(-30, 31, noisy.array.shape).astype(np.int16))
    write_volume(noisy, tmp_path / "noisy.nrrd")
    spec = {"task": "evaluate", "inputs": {"prediction": "noisy.nrrd", "reference": "ct.nii.gz"}}
    st, _, paths = run_remote(client, spec, {"prediction": tmp_path / "noisy.nrrd", "reference": CT}, tmp_path)
    assert [r["name"] for r in st["results"]] == ["metrics.json"]
    rows = st["results"][0]["meta"]["metrics"]["rows"]
    assert json.loads(paths[0].read_text()) == st["results"][0]["meta"]["metrics"]
    here = paired_metrics(noisy, read_volume(CT))
    assert {(r["metric"], r["where"]): r["value"] for r in rows} == pytest.approx(dict(
        ((k.split("/")[0], k.split("/")[1]), v) for k, v in here.items()))
    (tmp_path / "same").mkdir()
    same, _, _ = run_remote(client, spec, {"prediction": CT, "reference": CT}, tmp_path / "same")
    assert same["results"][0]["meta"]["metrics"]["rows"][0]["value"] == "inf"
    with pytest.raises(ServiceError, match="prediction"):  # an evaluate job needs both inputs
        client.submit({"task": "evaluate", "inputs": {"reference": "ct.nii.gz"}}, {"reference": CT})
    # refused at the door, before queueing: different grids without resample, a reference that is not CT
    small = read_volume(CT)
    write_volume(Volume(np.ascontiguousarray(small.array[:64]), small.affine), tmp_path / "half.nrrd")
    with pytest.raises(ServiceError, match="different grids"):
        client.submit(spec, {"prediction": tmp_path / "half.nrrd", "reference": CT})
    write_volume(small.with_array(np.full(small.shape, 7, np.int16)), tmp_path / "flat.nrrd")
    with pytest.raises(ServiceError, match="does not look like CT"):
        client.submit(spec, {"prediction": CT, "reference": tmp_path / "flat.nrrd"})
    # the CLI: the same table here and with --server; --window is the local run's only
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "noisy.nrrd"), str(CT)]) == 0
    here_text = capsys.readouterr().out.splitlines()[1:]
    assert main(["evaluate", str(tmp_path / "noisy.nrrd"), str(CT), "--server", client.url, "--token", client.token]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == here_text and len(here_text) == 14
    assert main(["evaluate", str(tmp_path / "noisy.nrrd"), str(CT), "--window", "w", "0", "100",
                 "--server", client.url, "--token", client.token]) == 2
    assert "--window" in capsys.readouterr().err
    # the uploads (patient data, perhaps) do not outlive their jobs
    assert not [p for n in ("prediction", "reference") for p in work_dir.glob(f"*/{n}.*")]


def test_job_table_of_an_older_version_gains_the_error_kind_column(tmp_path):
    """A jobs.sqlite3 written before `error_kind` existed opens, keeps its rows (kind unknown),
    and stores the kind from then on (a restarted server still tells a refused request apart)."""
    import sqlite3

    from MedDiffusionLib.jobstore import COLUMNS, JobStore

    old = [c for c in COLUMNS if c != "error_kind"]
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE jobs ({', '.join(c + (' TEXT PRIMARY KEY' if c == 'id' else '') for c in old)})")
    db.execute(f"INSERT INTO jobs ({', '.join(old)}) VALUES ({', '.join('?' * len(old))})",
               ["a", "owner", "generate", "failed", "{}", "cpu", "m", "e", "[]", "[]", "{}", 1.0, 2.0])
    db.commit()
    db.close()
    store = JobStore(path)
    try:
        assert store.rows()[0]["error_kind"] is None and store.rows()[0]["error"] == "e"
        row = dict(store.rows()[0], id="b", spec={}, error_kind="request")
        store.save(row)
        assert {r["id"]: r["error_kind"] for r in store.rows()} == {"a": None, "b": "request"}
    finally:
        store.close()
