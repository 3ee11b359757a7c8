"""``meddiffusion generate-dataset --server URL,URL``: the cases sent to two real ``meddiffusion serve``
subprocesses on 127.0.0.1 (one CPU thread each), compared case for case with a one-process run;
a run killed midway, a server that goes away, refused requests and bad addresses."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from sockets_util import pipe, shut
from MedDiffusionLib import cli
from MedDiffusionLib import dataset as ds
from MedDiffusionLib.client import LocalServer, free_port, new_token
from MedDiffusionLib.data.volumes import read_volume, write_volume
from MedDiffusionLib.dataset_remote import server_runner
from MedDiffusionLib.provenance import read_provenance
from test_generate_dataset import FAST, _label_map, _manifest, same_voxels

ROWS = [{"id": f"c{i}", "seed": 20 + i} for i in range(5)]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    token = new_token()  # one token for both: --token is given once
    srvs = [LocalServer(log_file=logs / f"serve{i}.log", token=token, env={"OMP_NUM_THREADS": "1"}) for i in range(2)]
    try:
        for s in srvs:
            s.start(timeout=120)
        yield srvs
    finally:
        for s in srvs:
            s.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The images-only dataset made in this process with one thread (the servers' count)."""
    tmp = tmp_path_factory.mktemp("ref")
    man = _manifest(tmp / "cases.jsonl", ROWS)
    out = tmp / "one"
    assert cli.main(["generate-dataset", str(man), "--out", str(out), "--threads", "1", *FAST]) == 0
    return man, out


def _urls(servers) -> str:
    return ",".join(s.url for s in servers)


def _jobs_done(server) -> float:
    """The server's count of generate jobs that ended done (its Prometheus metrics)."""
    req = urllib.request.Request(server.url + "/v1/metrics", headers={"Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("meddiffusion_jobs_finished_total{") and 'state="done"' in line
               and 'task="generate"' in line)


def _same(a: Path, b: Path, ids) -> None:
    assert json.loads((a / "datalist.json").read_text())["training"] == \
        json.loads((b / "datalist.json").read_text())["training"]
    same_voxels(a, b, ids)
    for i in ids:
        assert np.allclose(read_volume(a / f"{i}.nii.gz").affine, read_volume(b / f"{i}.nii.gz").affine, atol=1e-5), i
        assert read_provenance(b / f"{i}.nii.gz")["seed"] == read_provenance(a / f"{i}.nii.gz")["seed"]


def test_two_servers_match_one_process_and_share_the_cases(servers, reference, tmp_path, capsys):
    man, one = reference
    out = tmp_path / "served"
    before = [_jobs_done(s) for s in servers]
    assert cli.main(["generate-dataset", str(man), "--out", str(out), "--server", _urls(servers),
                     "--token", servers[0].token, *FAST]) == 0, capsys.readouterr().err
    assert "5 done, 0 skipped (already finished), 0 failed" in capsys.readouterr().err
    _same(one, out, [r["id"] for r in ROWS])
    # both servers worked, one job per case in all, and no job is left on either
    ran = [_jobs_done(s) - b for s, b in zip(servers, before)]
    assert sum(ran) == len(ROWS) and min(ran) >= 1, ran
    assert all(s.client().jobs() == [] for s in servers)


def test_pairs_through_a_server_give_the_nnunet_folder(servers, tmp_path, capsys):
    lab = _label_map(tmp_path)
    rows = [{"id": "p1", "labels": "masks/p1.nii.gz", "controlnet": "chest-ct-mini-labels", "seed": 3}]
    man = _manifest(tmp_path / "pairs.jsonl", rows)
    local, served = tmp_path / "Dataset601_Local", tmp_path / "Dataset601_Served"
    assert cli.main(["generate-dataset", str(man), "--out", str(local), "--name", "D601", "--threads", "1",
                     *FAST]) == 0
    assert cli.main(["generate-dataset", str(man), "--out", str(served), "--name", "D601", "--server",
                     servers[1].url, "--token", servers[1].token, *FAST]) == 0, capsys.readouterr().err
    assert json.loads((served / "dataset.json").read_text()) == json.loads((local / "dataset.json").read_text())
    for rel in ("imagesTr/p1_0000.nii.gz", "labelsTr/p1.nii.gz"):
        assert np.array_equal(read_volume(local / rel).array, read_volume(served / rel).array), rel
    assert np.array_equal(read_volume(served / "labelsTr/p1.nii.gz").array, read_volume(lab).array)
    assert read_provenance(served / "imagesTr/p1_0000.nii.gz")["task"] == "synthesize"


def _markers(done: Path) -> list[str]:
    """The finished cases' ids: their done-markers (not a marker's hidden temporary file)."""
    return sorted(p.stem for p in done.glob("[!.]*.json")) if done.is_dir() else []


def test_killed_midway_then_rerun_ends_with_the_same_files(servers, reference, tmp_path):
    man, one = reference
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEDDIFFUSION_TOKEN=servers[0].token)
    cmd = [sys.executable, "-m", "MedDiffusionLib.cli", "generate-dataset", str(man), "--out", str(out),
           "--server", servers[0].url, *FAST]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = out / ".meddiffusion" / "done"
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _markers(done) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no clean-up at all: the rerun must cope
    proc.communicate(timeout=30)
    finished = _markers(done)
    assert 1 <= len(finished) < len(ROWS) and not (out / "datalist.json").exists()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} skipped" in rerun.stderr
    _same(one, out, [r["id"] for r in ROWS])
    assert not [p for p in out.rglob("*.tmp*")]


def test_ctrl_c_deletes_the_jobs_keeps_finished_cases_and_the_rerun_continues(servers, reference, tmp_path):
    man, one = reference
    out = tmp_path / "interrupted"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEDDIFFUSION_TOKEN=servers[0].token)
    cmd = [sys.executable, "-m", "MedDiffusionLib.cli", "generate-dataset", str(man), "--out", str(out),
           "--server", _urls(servers), *FAST]
    earlier = {j["id"] for s in servers for j in s.client().jobs()}  # a killed client's jobs stay (test above)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = out / ".meddiffusion" / "done"
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _markers(done) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again to continue" in err
    finished = _markers(done)
    assert 1 <= len(finished) < len(ROWS) and not (out / "datalist.json").exists()
    # the jobs in flight were deleted on the servers
    assert {j["id"] for s in servers for j in s.client().jobs()} <= earlier
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} skipped" in rerun.stderr
    _same(one, out, [r["id"] for r in ROWS])


def test_a_server_that_goes_away_leaves_its_cases_to_the_other(tmp_path, reference):
    man, one = reference
    logs = tmp_path / "logs"
    logs.mkdir()
    token = new_token()
    pair = [LocalServer(log_file=logs / f"s{i}.log", token=token, env={"OMP_NUM_THREADS": "1"}) for i in range(2)]
    try:
        for s in pair:
            s.start(timeout=120)
        plan = ds.plan_dataset(ds.read_manifest(man), tmp_path / "gone", base=man.parent, sampler="ddim", steps=2,
                               device="auto")
        # a long job (DDPM, 1000 steps) ahead on the second server: the dataset's jobs there are
        # still queued when the first case is done (on the first server) and the second one stops
        pair[1].client().submit({"task": "generate", "params": {"sampler": "ddpm"}})

        once = threading.Lock()

        def stop_second(case, status):  # called from the runner's threads: stop the second server once
            if once.acquire(blocking=False):
                pair[1].stop()

        runner = server_runner(",".join(s.url for s in pair), token, retries=0)
        summary = ds.run_dataset(plan, progress=False, on_case=stop_second, runner=runner)
    finally:
        for s in pair:
            s.stop()
    assert summary.failed == [] and sorted(summary.done) == sorted(r["id"] for r in ROWS)
    # the second server had jobs when it stopped: they went to the first (retries=0: a hand-off is no retry)
    assert list(runner.dropped) == [pair[1].url] and runner.retried, (runner.dropped, runner.retried)
    assert all(pair[1].url in why for _, why in runner.retried)
    _same(one, tmp_path / "gone", [r["id"] for r in ROWS])


def test_a_refused_case_fails_once_and_the_others_finish(servers, tmp_path, capsys):
    lab = _label_map(tmp_path)
    lv = read_volume(lab)
    write_volume(lv.with_array(np.full(lv.shape, 7, np.int16)), tmp_path / "masks" / "seven.nii.gz")
    rows = [{"id": "bad", "labels": "masks/seven.nii.gz", "controlnet": "chest-ct-mini-labels"},
            {"id": "good", "labels": "masks/p1.nii.gz", "controlnet": "chest-ct-mini-labels"}]
    man = _manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "Dataset602_Refused"
    assert cli.main(["generate-dataset", str(man), "--out", str(out), "--server", _urls(servers), "--token",
                     servers[0].token, *FAST]) == 1
    err = capsys.readouterr().err
    assert "1 done, 0 skipped (already finished), 1 failed" in err and "failed: bad: " in err and "[7]" in err
    assert "tried" not in err  # a refusal is not retried
    assert (out / "imagesTr" / "good_0000.nii.gz").is_file() and not (out / "dataset.json").exists()


@pytest.mark.parametrize("what", ["closed port", "bad token", "twice", "with ray", "with workers"])
def test_bad_servers_are_one_line_and_nothing_is_written(what, servers, tmp_path, capsys):
    man = _manifest(tmp_path / "m.jsonl", [{"id": "x"}])
    out = tmp_path / "out"
    url, token = servers[0].url, servers[0].token
    args = {"closed port": ["--server", f"{url},http://127.0.0.1:{free_port()}", "--token", token],
            "bad token": ["--server", url, "--token", "not-the-token"],
            "twice": ["--server", f"{url},{url}", "--token", token],
            "with ray": ["--server", url, "--token", token, "--ray"],
            "with workers": ["--server", url, "--token", token, "--workers", "2"]}[what]
    assert cli.main(["generate-dataset", str(man), "--out", str(out), *args, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not out.exists()


def _hub_model(tmp_path, parity_ae, parity_bf):
    """(hub files, a model registry with the hub model ``tiny-hub``, a server env that knows it)."""
    from test_weights_hub import _official_files, _registry

    files = _official_files(parity_ae, parity_bf)
    reg = _registry(tmp_path, files)
    return files, reg, {"OMP_NUM_THREADS": "1", "MEDDIFFUSION_REGISTRY": str(reg), "HF_HUB_DISABLE_TELEMETRY": "1"}


def _offline_server(tmp_path, name, token, env) -> LocalServer:
    """A server offline with an empty cache: it cannot have a hub model's weights."""
    return LocalServer(log_file=tmp_path / f"{name}.log", token=token,
                       env={**env, "HF_HOME": str(tmp_path / f"hf-{name}"), "MEDDIFFUSION_CACHE": str(tmp_path / f"md-{name}"),
                            "HF_HUB_OFFLINE": "1"})


def test_a_server_without_the_weights_leaves_its_cases_to_one_that_has_them(tmp_path, monkeypatch, parity_ae,
                                                                             parity_bf):
    """error_kind "setup": the first server is offline with an empty cache (the hub model's weights
    cannot be had there), the second downloads them from a hub on 127.0.0.1. Every case ends on the
    second; with the first alone, every case fails with its reason, at once."""
    from hub_server import FakeHub
    from test_weights_hub import REPO

    files, reg, common = _hub_model(tmp_path, parity_ae, parity_bf)
    monkeypatch.setenv("MEDDIFFUSION_REGISTRY", str(reg))  # the plan made here knows the hub model
    ids = [f"h{i}" for i in range(4)]
    man = _manifest(tmp_path / "hub.jsonl", [{"id": i, "seed": n} for n, i in enumerate(ids)])
    token = new_token()

    def plan(name):
        return ds.plan_dataset(ds.read_manifest(man), tmp_path / name, base=man.parent, model="tiny-hub",
                               sampler="ddim", steps=2, device="auto")

    with FakeHub(REPO, files) as hub:
        offline = _offline_server(tmp_path, "offline", token, common)
        online = LocalServer(log_file=tmp_path / "online.log", token=token,
                             env={**common, "HF_HOME": str(tmp_path / "hf1"), "MEDDIFFUSION_CACHE": str(tmp_path / "md1"),
                                  "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url})
        try:
            for s in (offline, online):
                s.start(timeout=120)
            both = plan("both")
            runner = server_runner(f"{offline.url},{online.url}", token, retries=0)
            summary = ds.run_dataset(both, progress=False, runner=runner)
            alone = plan("alone")
            lone_runner = server_runner(offline.url, token, retries=2)
            lone = ds.run_dataset(alone, progress=False, runner=lone_runner)
        finally:
            for s in (offline, online):
                s.stop()
    assert summary.failed == [] and sorted(summary.done) == ids, summary.failed
    # the offline server's threads took cases first (4 cases, 2 in flight per server): handed over, not retried
    assert runner.retried and runner.dropped == {}, (runner.retried, runner.dropped)
    assert all(offline.url in why and "offline" in why for _, why in runner.retried), runner.retried
    assert all(read_provenance(both.files(c)["image"])["model"] == "tiny-hub" for c in both.cases)
    assert sorted(i for i, _ in lone.failed) == ids and lone.done == []
    assert all(why.startswith(f"no server can run it ({offline.url}: ") and "offline" in why
               for _, why in lone.failed), lone.failed
    assert lone_runner.retried == []  # not sent to the same server again


class _AnswerDroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of a server: every job submission (``POST /v1/jobs``)
    reaches the server, which makes the job, but its answer is dropped and the connection closed,
    as a server that crashes on that job would look; every other request goes through."""

    def __init__(self, port: int):
        self.target = port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target), timeout=60)
        first = client.recv(65536)
        upstream.sendall(first)
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        if first.startswith(b"POST /v1/jobs "):
            try:
                upstream.recv(65536)  # the server answered: the job exists; the client never hears of it
                self.dropped += 1
            finally:
                shut(client, upstream)  # not only close(): the pipe thread is still reading them
        else:
            pipe(upstream, client)

    def close(self):
        self.sock.close()


def test_a_batch_no_server_can_run_fails_instead_of_going_round(tmp_path, parity_ae, parity_bf):
    """One server lacks the weights (setup); the other keeps answering but loses every job of the
    batch (its answer never comes). Each server is left out for that batch once: it fails with both
    reasons instead of going between them for ever, and the job the lost answer made is deleted."""
    _, reg, common = _hub_model(tmp_path, parity_ae, parity_bf)
    man = _manifest(tmp_path / "one.jsonl", [{"id": "lost", "seed": 1}])
    token = new_token()
    servers = [_offline_server(tmp_path, name, token, common) for name in ("nos", "drops")]
    proxy = None
    try:
        for s in servers:
            s.start(timeout=120)
        proxy = _AnswerDroppingProxy(servers[1].port)
        env = dict(os.environ, PYTHONPATH=str(ROOT), MEDDIFFUSION_TOKEN=token, MEDDIFFUSION_REGISTRY=str(reg))
        run = subprocess.run([sys.executable, "-m", "MedDiffusionLib.cli", "generate-dataset", str(man), "--out",
                              str(tmp_path / "out"), "--model", "tiny-hub", "--server", f"{servers[0].url},{proxy.url}",
                              *FAST], env=env, capture_output=True, text=True, timeout=180)
        left = servers[1].client().jobs()
    finally:
        if proxy is not None:
            proxy.close()
        for s in servers:
            s.stop()
    assert run.returncode == 1, run.stderr[-2000:]
    assert "failed: lost: no server can run it (" in run.stderr, run.stderr[-2000:]
    assert f"{servers[0].url}: " in run.stderr and "offline" in run.stderr
    assert f"{proxy.url}: stopped answering while it ran" in run.stderr
    assert proxy.dropped == 1 and left == []  # sent there once; the job it made was deleted
