"""Weights manager against a real HTTP server on 127.0.0.1 (huggingface_hub with HF_ENDPOINT):
first download, cache hit, offline with/without cache, checksum mismatch, server gone
mid-download, then conversion of official-layout files and generation from them."""
import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from hub_server import FakeHub

REPO = "test-org/meddiffusion-tiny"


def _official_files(parity_ae, parity_bf) -> dict[str, bytes]:
    import io
    ae = io.BytesIO()
    c = parity_ae["config"]
    torch.save({"state_dict": parity_ae["state_dict"], "hyper_parameters": {
        "cfg": {"model": {k: c[k] for k in ("n_hiddens", "downsample", "num_groups", "embedding_dim", "n_codes")},
                "dataset": {"patch_size": c["patch_size"], "image_channels": 1}}}}, ae)
    bf = io.BytesIO()
    b = parity_bf["config"]
    torch.save({"ema": parity_bf["state_dict"], "model": parity_bf["state_dict"],
                "args": argparse.Namespace(model_dim=b["dim"], patch_size=b["patch_size"], DiT_num_heads=b["DiT_num_heads"],
                                           resnet_groups=b["resnet_groups"])}, bf)
    return {"PatchVolume_tiny.ckpt": ae.getvalue(), "BiFlowNet_tiny.pt": bf.getvalue()}


@pytest.fixture(scope="module")
def files(parity_ae, parity_bf):
    return _official_files(parity_ae, parity_bf)


def _registry(tmp: Path, files: dict[str, bytes], corrupt_sha: bool = False) -> Path:
    base = json.loads((ROOT / "MedDiffusionLib" / "resources" / "models.json").read_text())
    entry = {
        "id": "tiny-hub", "title": "tiny test model", "description": "test", "license": "test", "compression": "8x",
        "source": {"kind": "hub", "repo_id": REPO, "revision": "main"},
        "classes": [{"index": 1, "name": "CT chest-abdomen", "modality": "CT",
                     "sizes": [{"image_xyz": [64, 64, 64], "spacing_xyz": [2.0, 2.0, 2.0]}]}],
        "files": [{"role": role, "format": "official", "filename": name,
                   "sha256": ("0" * 64) if corrupt_sha else hashlib.sha256(data).hexdigest(), "size": len(data)}
                  for role, (name, data) in zip(("autoencoder", "biflownet"), files.items())],
        "defaults": {"class": 1, "sampler": "ddim", "steps": 2}, "resources": {},
    }
    base["models"].append(entry)
    path = tmp / "registry.json"
    path.write_text(json.dumps(base))
    return path


def _cli(args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", "MedDiffusionLib.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=cwd or ROOT)


@pytest.fixture()
def env(tmp_path, files):
    e = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
             HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3", MEDDIFFUSION_CACHE=str(tmp_path / "md"),
             MEDDIFFUSION_REGISTRY=str(_registry(tmp_path, files)), PYTHONPATH=str(ROOT))
    return e


def _snapshot_files(env) -> list[Path]:
    return sorted(p for p in Path(env["HF_HOME"]).rglob("snapshots/*/*"))


def test_download_cache_and_offline(env, files):
    with FakeHub(REPO, files) as hub:
        env = dict(env, HF_ENDPOINT=hub.url)
        r = _cli(["models", "download", "tiny-hub"], env)
        assert r.returncode == 0, r.stderr
        assert hub.gets() == 2
        assert {p.name for p in _snapshot_files(env)} == set(files)
        for p in _snapshot_files(env):
            assert p.read_bytes() == files[p.name]
        # cache hit: nothing downloaded again
        r = _cli(["models", "download", "tiny-hub"], env)
        assert r.returncode == 0, r.stderr
        assert hub.gets() == 2
        n_requests = len(hub.requests)
        # offline with cache: works without any request
        r = _cli(["models", "verify", "tiny-hub"], dict(env, HF_HUB_OFFLINE="1"))
        assert r.returncode == 0 and r.stdout.count(" ok ") == 2, r.stdout + r.stderr
        r = _cli(["models", "download", "tiny-hub", "--offline"], dict(env, HF_HUB_OFFLINE="1"))
        assert r.returncode == 0, r.stderr
        assert len(hub.requests) == n_requests
        r = _cli(["models", "list"], env)
        assert "tiny-hub" in r.stdout and "downloaded" in r.stdout


def test_offline_without_cache_explains_what_to_do(env):
    r = _cli(["models", "download", "tiny-hub", "--offline"], dict(env, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2
    assert "offline" in r.stderr and "meddiffusion models download tiny-hub" in r.stderr and "--weights" in r.stderr
    assert "Traceback" not in r.stderr


def test_checksum_mismatch_removes_file(env, files, tmp_path):
    bad = dict(env, MEDDIFFUSION_REGISTRY=str(_registry(tmp_path / "bad", files, corrupt_sha=True))
               if (tmp_path / "bad").mkdir() is None else "")
    with FakeHub(REPO, files) as hub:
        r = _cli(["models", "download", "tiny-hub"], dict(bad, HF_ENDPOINT=hub.url))
    assert r.returncode == 2 and "checksum" in r.stderr
    assert _snapshot_files(env) == []
    assert not [p for p in Path(env["HF_HOME"]).rglob("blobs/*") if p.stat().st_size == len(files["PatchVolume_tiny.ckpt"])]


def test_server_gone_mid_download_then_recovery(env, files):
    with FakeHub(REPO, files) as hub:
        hub.drop_after = 100
        e = dict(env, HF_ENDPOINT=hub.url)
        r = _cli(["models", "download", "tiny-hub"], e)
        assert r.returncode == 2 and "download failed" in r.stderr, r.stderr
        assert _snapshot_files(env) == []  # nothing half-written where a complete file would be
        hub.drop_after = None
        r = _cli(["models", "download", "tiny-hub"], e)
        assert r.returncode == 0, r.stderr
        for p in _snapshot_files(env):
            assert p.read_bytes() == files[p.name]


def test_generate_from_hub_converts_once(env, files, tmp_path):
    with FakeHub(REPO, files) as hub:
        e = dict(env, HF_ENDPOINT=hub.url)
        out = tmp_path / "gen.nii.gz"
        r = _cli(["generate", "--model", "tiny-hub", "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--out", str(out),
                  "--quiet"], e)
        assert r.returncode == 0, r.stderr
        assert out.exists()
        converted = sorted(Path(env["MEDDIFFUSION_CACHE"]).rglob("*.safetensors"))
        assert len(converted) == 2
        stamp = [p.stat().st_mtime_ns for p in converted]
        r = _cli(["generate", "--model", "tiny-hub", "--device", "cpu", "--out", str(out), "--overwrite", "--quiet",
                  "--offline"], dict(e, HF_HUB_OFFLINE="1"))  # registry default sampler: ddim, 2 steps
        assert r.returncode == 0, r.stderr
        assert [p.stat().st_mtime_ns for p in converted] == stamp  # reused, not converted again
