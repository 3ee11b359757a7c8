"""Shared fixtures. No test may reach the network: the hub is offline unless a test starts
its own loopback server."""
import atexit
import os
import re
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

pytest_plugins = ["pytester"]  # test_slow_marks.py runs the marking hook on a tiny suite

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


# ---- the `slow` marker -------------------------------------------------------------------------
# `pytest -m "not slow"` is the inner loop (unit tests, well under 2 minutes on 2 cores); CI runs
# everything. The slow tests are listed in one place, slow_tests.txt next to this file, rather than
# decorated in their modules. An entry names, relative to this directory, a module
# ("test_x.py": every test in it, e.g. modules that start real servers or subprocesses), a class or
# a test function ("test_x.py::test_y": every parametrization of it) or one parametrization
# ("test_x.py::test_y[case]"). An entry that matches nothing in a module that was collected, or
# whose module does not exist, is an error: the list cannot rot.
SLOW_LIST = Path(__file__).with_name("slow_tests.txt")


def read_slow_list(path: Path = SLOW_LIST) -> list[str]:
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if line:
            entries.append(line)
    return entries


def _slow_key(item, base: Path):
    """'test_x.py::Class::test_y[case]' relative to `base`, or None for an item outside it."""
    try:
        rel = item.path.resolve().relative_to(base).as_posix()
    except ValueError:
        return None
    _, _, inner = item.nodeid.partition("::")
    return f"{rel}::{inner}" if inner else rel


def _matches(key: str, entry: str) -> bool:
    return key == entry or key.startswith(entry + "::") or key.startswith(entry + "[")


def pytest_collection_modifyitems(config, items):
    base = SLOW_LIST.parent.resolve()
    entries = read_slow_list()
    used = set()
    modules = set()
    for item in items:
        key = _slow_key(item, base)
        if key is None:
            continue
        modules.add(key.split("::", 1)[0])
        hits = [e for e in entries if _matches(key, e)]
        if hits:
            used.update(hits)
            item.add_marker(pytest.mark.slow)
    # a module collected only in part (a node id on the command line, --lf) cannot show an entry stale
    partial = set()
    for arg in config.args:
        if "::" in arg:
            path = (config.invocation_params.dir / arg.split("::", 1)[0]).resolve()
            if path.is_relative_to(base):
                partial.add(path.relative_to(base).as_posix())
    whole = set() if config.getoption("lf", False) else modules - partial
    stale = []
    for entry in entries:
        module = entry.split("::", 1)[0]
        if not (base / module).is_file():
            stale.append(f"{entry} (no such module)")
        elif module in whole and entry not in used:
            stale.append(f"{entry} (no such test)")
    if stale:
        raise pytest.UsageError(
            f"{SLOW_LIST.name} lists tests that do not exist; remove or rename them:\n  "
            + "\n  ".join(stale))
