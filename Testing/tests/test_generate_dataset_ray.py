"""``meddiffusion generate-dataset --ray`` (MedDiffusionLib.dataset_ray) on a local Ray instance
(``ray.init(num_cpus=2)``, started once for the module): outputs equal a single-process run case for
case, Ctrl-C keeps finished cases and a rerun ends with the same files, a refused case is not
retried, a killed worker's case is, and a bad address or a missing Ray is one line."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedDiffusionLib import dataset as ds
from MedDiffusionLib.data.volumes import Volume, write_volume
from MedDiffusionLib.provenance import read_provenance

from test_generate_dataset import FAST, IDS, ROWS, _gen, _manifest, same_voxels

NAME = "Dataset501_Synth"


def _plan(rows, out: Path, **kw):
    return ds.plan_dataset(rows, out, seed=5, sampler="ddim", steps=2, **kw)


def _worker_pids() -> list[int]:
    """The processes of live ``_CaseWorker`` actors (Ray titles them ``ray::_CaseWorker[.method]``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::_CaseWorker"):
                pids.append(int(entry.name))
    return pids


def _no_workers_left(timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while _worker_pids():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def ray_local():
    import ray  # installed by scripts/setup.sh (the "ray" extra); the worker checks read Linux's /proc

    assert not ray.is_initialized()
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 3-case images-only dataset, made once in this process with one torch thread."""
    tmp = tmp_path_factory.mktemp("single")
    man = _manifest(tmp / "cases.jsonl", ROWS)
    out = tmp / NAME
    assert _gen(man, "--out", out, "--seed", 5, "--threads", 1, *FAST) == 0
    return man, out


def test_ray_run_equals_a_single_process_run(ray_local, reference, tmp_path, capsys):
    man, one = reference
    out = tmp_path / NAME
    capsys.readouterr()
    assert _gen(man, "--out", out, "--seed", 5, "--ray", "--threads", 1, *FAST) == 0
    assert "3 done, 0 skipped (already finished), 0 failed" in capsys.readouterr().err
    assert json.loads((out / "datalist.json").read_text()) == json.loads((one / "datalist.json").read_text())
    same_voxels(one, out, IDS)
    for i in IDS:
        prov = read_provenance(out / f"{i}.nii.gz")
        assert prov and prov["task"] == "generate" and (out / f"{i}.json").is_file()
    assert ray_local.is_initialized()  # the test's Ray is used, and left running
    assert _no_workers_left()


def test_ctrl_c_keeps_finished_cases_and_a_rerun_ends_with_the_same_files(ray_local, reference, tmp_path):
    from MedDiffusionLib.dataset_ray import ray_runner

    _, one = reference
    out = tmp_path / NAME
    plan = _plan(ROWS, out)

    def interrupt(case, status):
        if status == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ds.run_dataset(plan, progress=False, on_case=interrupt,
                       runner=ray_runner("local", workers=2, threads=1, retries=1, device="cpu"))
    finished = [c.id for c in plan.cases if plan.finished(c)]
    assert len(finished) == 1
    assert not (out / "datalist.json").exists()
    assert _no_workers_left()  # the workers were stopped with the run
    plan = _plan(ROWS, out)
    summary = ds.run_dataset(plan, progress=False, runner=ray_runner("local", workers=2, threads=1, retries=1,
                                                                      device="cpu"))
    assert summary.skipped == finished and sorted(summary.done) == sorted(set(IDS) - set(finished))
    assert summary.failed == [] and summary.dataset_written
    assert json.loads((out / "datalist.json").read_text()) == json.loads((one / "datalist.json").read_text())
    same_voxels(one, out, IDS)
    assert not [p for p in out.rglob("*.tmp*")]


def test_a_refused_case_fails_once_and_a_killed_workers_case_is_retried(ray_local, reference, tmp_path):
    from MedDiffusionLib.dataset_ray import ray_runner

    _, one = reference
    bad = tmp_path / "seven.nii.gz"  # 7 is not a label value of the ControlNet: refused, every time
    write_volume(Volume(np.full((32, 32, 16), 7, np.int16), np.diag([4.8, 4.8, 4.3, 1.0])), bad)
    rows = ROWS + [{"id": "bad", "labels": str(bad), "controlnet": "chest-ct-mini-labels"}]
    out = tmp_path / NAME
    plan = _plan(rows + [{"id": "gpu99"}], out, layout="flat")
    # a worker error that is not a refusal (ResourceError: no such GPU) is sent again, then fails
    u = next(i for i, (members, _) in enumerate(plan.batches) if members[0].id == "gpu99")
    plan.batches[u] = (plan.batches[u][0], plan.batches[u][1].with_params(device="cuda:99"))
    killed: list[int] = []

    def kill_the_workers(case, status):  # SIGKILL every worker once, as the OOM killer would
        if status == "done" and not killed:
            end = time.monotonic() + 60  # the second worker may still be starting (titled ray::IDLE)
            while len(_worker_pids()) < 2 and time.monotonic() < end:
                time.sleep(0.1)
            killed.extend(_worker_pids())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    runner = ray_runner("local", workers=2, threads=1, retries=2, device=None)
    summary = ds.run_dataset(plan, progress=False, on_case=kill_the_workers, runner=runner)
    assert len(killed) == 2
    assert sorted(summary.done) == sorted(IDS) and summary.skipped == []
    failed = dict(summary.failed)
    assert sorted(failed) == ["bad", "gpu99"] and "[7]" in failed["bad"], failed
    assert "cuda:99" in failed["gpu99"] and failed["gpu99"].endswith("(tried 3 times)"), failed
    retried = [cid for cid, _ in runner.retried]
    # a refused request is not sent again (it may have been on a killed worker: that one is)
    assert all("the Ray worker died" in why for cid, why in runner.retried if cid == "bad"), runner.retried
    assert retried.count("gpu99") == 2, runner.retried
    died = [cid for cid, why in runner.retried if "the Ray worker died" in why]
    assert died and set(died) <= set(IDS) | {"gpu99", "bad"}, runner.retried  # the cases in flight at the kill
    assert runner.started > 2  # the dead workers were replaced
    same_voxels(one, out, IDS)
    assert not (out / "bad.nii.gz").exists() and not (out / "datalist.json").exists()
    assert _no_workers_left()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("form", ["{}", "ray://{}", "nonsense"])
def test_a_ray_address_that_does_not_answer_is_one_line_and_writes_nothing(form, tmp_path, capsys):
    port = _closed_port()
    address = form.format(f"127.0.0.1:{port}")
    man = _manifest(tmp_path / "m.jsonl", ROWS)
    out = tmp_path / "out"
    t0 = time.monotonic()
    assert _gen(man, "--out", out, "--ray", address, *FAST) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--ray {address}: " in err[0], err
    assert ("no Ray cluster answers at" if form != "nonsense" else "not a Ray address") in err[0]
    assert not out.exists()


def test_without_ray_the_option_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    man = _manifest(tmp_path / "m.jsonl", ROWS)
    assert _gen(man, "--out", tmp_path / "out", "--ray", *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --ray needs Ray: pip install meddiffusion[ray]"] or \
        (len(err) == 1 and "pip install meddiffusion[ray]" in err[0]), err
    assert not (tmp_path / "out").exists()
