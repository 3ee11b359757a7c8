"""Shared fixtures. No test may reach the network: the hub is offline unless a test starts
its own loopback server."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# the user's cache (converted checkpoints, compiled packages) stays out of the tests: every test
# process and its children use a fresh one. The compiled-package test may copy from the original.
USER_CACHE = os.environ.get("MEDDIFFUSION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "meddiffusion"))
os.environ["MEDDIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="meddiffusion-test-cache-")
atexit.register(shutil.rmtree, os.environ["MEDDIFFUSION_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "Testing" / "data"
REFERENCE = DATA / "reference"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def parity_ae() -> dict:
    return torch.load(REFERENCE / "parity_patchvolume.pt", weights_only=True)


@pytest.fixture(scope="session")
def parity_bf() -> dict:
    return torch.load(REFERENCE / "parity_biflownet.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
