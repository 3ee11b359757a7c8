"""How the Slicer module gets torch (issue 19, item 6), without network and without Slicer: an
installed older torch is never replaced (the refusal points to PyTorch Utils), a missing torch is
installed by light-the-torch into the server's Python in child processes (nothing in Slicer's
process imports torch or calls PyTorchUtils), and Intel Macs are told up front that This computer
needs a server. The decisions run on real child Pythons (a bare venv, with a stand-in torch
dist-info on its path where an old torch is needed); the install commands are built and checked,
never run against a package index."""
import ast
import os
import sys
import time
import venv
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT

MODULE = ROOT / "MedDiffusion"
sys.path.insert(0, str(MODULE))

from MedDiffusionGlue import dependencies  # noqa: E402
from MedDiffusionGlue.nodes import InputError  # noqa: E402

REQ = dependencies.TORCH_REQUIREMENT


# -- pure decisions ---------------------------------------------------------------------------------------------
def test_an_older_torch_is_refused_with_a_message_naming_pytorch_utils():
    plan = dependencies.torch_plan("/opt/Slicer/bin/PythonSlicer", "2.5.1+cu124", system="Linux", machine="x86_64")
    assert plan.action == "refuse" and plan.commands == []
    for words in ("torch 2.5.1+cu124", "torch>=2.6", "never replaced", "PyTorch Utils", "Utilities > PyTorch Utils",
                  "Uninstall PyTorch", "Install PyTorch", "Run on: Server", "Run on: This computer, Python"):
        assert words in plan.message, words
    # a Python the user picked is not managed by PyTorch Utils: the message says to update it there
    picked = dependencies.torch_plan("/envs/gpu/bin/python", "2.4.0", system="Windows", machine="AMD64",
                                     slicer_python=False)
    assert picked.action == "refuse" and "PyTorch Utils" not in picked.message
    assert "https://pytorch.org/get-started" in picked.message and "Run on: Server" in picked.message


def test_a_missing_torch_is_installed_with_light_the_torch_into_the_servers_python():
    plan = dependencies.torch_plan("/srv/python3", None, system="Linux", machine="x86_64")
    assert plan.action == "install"
    assert plan.commands == [
        ["/srv/python3", "-m", "pip", "install", "--disable-pip-version-check", "light-the-torch>=0.5"],
        ["/srv/python3", "-m", "light_the_torch", "install", "--disable-pip-version-check", "torch>=2.6"]]
    flat = " ".join(" ".join(c) for c in plan.commands)
    assert "torchvision" not in flat  # torch only: no unpinned torchvision
    # the requirement travels: a stricter one is passed through unchanged
    assert dependencies.light_the_torch_commands("py", ">=2.7,<3")[1][-1] == "torch>=2.7,<3"


def test_a_satisfying_torch_needs_nothing_and_local_builds_are_compared_by_release():
    for version in ("2.6.0", "2.13.0+cpu", "2.7.1+cu128"):
        plan = dependencies.torch_plan("py", version, system="Darwin", machine="x86_64")
        assert plan.action == "ok" and plan.commands == [] and plan.message == ""
    assert dependencies.torch_plan("py", "2.5.99", system="Linux", machine="aarch64").action == "refuse"


def test_intel_macs_are_told_that_this_computer_needs_a_server():
    assert dependencies.is_intel_mac("Darwin", "x86_64")
    assert not dependencies.is_intel_mac("Darwin", "arm64")
    assert not dependencies.is_intel_mac("Linux", "x86_64") and not dependencies.is_intel_mac("Windows", "AMD64")
    for installed in (None, "2.2.2"):  # nothing to install and nothing to update: no wheels exist
        plan = dependencies.torch_plan("py", installed, system="Darwin", machine="x86_64")
        assert plan.action == "refuse" and plan.commands == []
        assert "Intel" in plan.message and "Run on: Server" in plan.message and "torch>=2.6" in plan.message
    assert dependencies.torch_plan("py", None, system="Darwin", machine="arm64").action == "install"
    # the platform check itself reads this machine when nothing is passed
    import platform
    assert dependencies.is_intel_mac() == (platform.system() == "Darwin" and platform.machine() == "x86_64")


# -- real child Pythons ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python without torch (a venv without pip: created in about a second, no network)."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False, symlinks=False).create(root)  # a copy: another executable
    exe = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    assert exe.exists() and os.path.realpath(exe) != os.path.realpath(sys.executable)  # probed in a child
    return str(exe)


@pytest.fixture(scope="module")
def old_torch_path(tmp_path_factory) -> str:
    """A folder whose only content is the metadata of torch 2.5.1 (what the version probe reads)."""
    site = tmp_path_factory.mktemp("old-torch-site")
    info = site / "torch-2.5.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1\n")
    return str(site)


def test_the_version_probe_on_this_python_finds_its_torch_without_importing_it():
    import importlib.metadata

    here = dependencies.DependencyCheck(None, requirements=[])
    assert here.done and here.versions["torch"] == importlib.metadata.version("torch")
    assert dependencies.torch_plan(sys.executable, here.versions["torch"]).action == "ok"
    # a path that does not exist: an error, not a crash
    child = dependencies.DependencyCheck(os.path.realpath(sys.executable) + "-not-there", requirements=[])
    assert child.error is not None and child.versions is None


def test_decisions_on_real_child_pythons(bare_python, old_torch_path):
    missing = dependencies.DependencyCheck(bare_python, requirements=[]).wait()
    assert missing.error is None and missing.versions["torch"] is None and missing.missing == ["torch>=2.6"]
    plan = dependencies.torch_plan(bare_python, missing.versions["torch"], system="Linux", machine="x86_64")
    assert plan.action == "install" and all(c[0] == bare_python for c in plan.commands)

    old = dependencies.DependencyCheck(bare_python, requirements=[], env={"PYTHONPATH": old_torch_path}).wait()
    assert old.error is None and old.versions["torch"] == "2.5.1" and old.missing == ["torch>=2.6"]
    plan = dependencies.torch_plan(bare_python, old.versions["torch"], system="Linux", machine="x86_64")
    assert plan.action == "refuse" and "torch 2.5.1" in plan.message and "PyTorch Utils" in plan.message


def test_install_process_runs_its_commands_in_order_and_stops_at_the_first_failure(tmp_path):
    py = sys.executable
    marker = tmp_path / "third-ran"
    log = tmp_path / "install.log"
    proc = dependencies.InstallProcess([[py, "-c", "print('step one')"],
                                        [py, "-c", "import sys; print('step two'); sys.exit(3)"],
                                        [py, "-c", f"open({str(marker)!r}, 'w')"]], str(log))
    t0 = time.monotonic()
    first = proc.poll()  # never blocks
    assert time.monotonic() - t0 < 0.1 and first in (None, 3)
    assert proc.wait(timeout=60) == 3 and proc.step == 1 and not marker.exists()
    text = log.read_text()
    assert "step one" in text and "step two" in text and text.count("$ ") == 2
    assert proc.last_line() == "step two" and proc.poll() == 3

    ok = dependencies.InstallProcess([[py, "-c", "print(1)"], [py, "-c", "print(2)"]], str(tmp_path / "ok.log"))
    assert ok.wait(timeout=60) == 0 and ok.step == 1
    slow = dependencies.InstallProcess([[py, "-c", "import time; time.sleep(60)"]], str(tmp_path / "slow.log"))
    assert slow.poll() is None
    slow.kill()
    assert slow.poll() not in (None, 0)
    pip = dependencies.PipProcess(py, ["torch>=2.6", "numpy>=1.24"], str(tmp_path / "pip.log"))
    pip.kill()
    assert pip.command == [py, "-m", "pip", "install", "--disable-pip-version-check", "numpy>=1.24"]


# -- the module's own code (MedDiffusionLogic's install methods, run without Qt) --------------------------------
def _logic_class(python: str, env: dict | None, tmp_path: Path, slicer_python: bool = False):
    """MedDiffusionLogic's ``torchPlan``, ``installTorch`` and ``startInstall`` as written, on a
    stand-in with the real dependency check; ``python`` is the server's Python."""
    path = MODULE / "MedDiffusion.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedDiffusionLogic")
    wanted = {"torchPlan", "installTorch", "startInstall"}
    funcs = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {f.name for f in funcs} == wanted
    ns = {"dependencies": dependencies, "InputError": InputError, "os": os, "_": lambda s: s,
          "default_python": lambda: python, "_isSlicerPython": lambda p: slicer_python,
          "slicer": SimpleNamespace(app=SimpleNamespace(temporaryPath=str(tmp_path)))}
    body = ast.ClassDef(name="Logic", bases=[], keywords=[], body=funcs, decorator_list=[])
    if sys.version_info >= (3, 12):
        body.type_params = []
    exec(compile(ast.fix_missing_locations(ast.Module([body], [])), str(path), "exec"), ns)

    class Logic(ns["Logic"]):
        serverPython = python

        def startDependencyCheck(self, p=None):
            return dependencies.DependencyCheck(p, env=env)

        def missingDependencies(self, p=None):
            return self.startDependencyCheck(p).wait().missing

        def _dependencyEnvironment(self, p):
            return env

        def _idle(self, seconds):
            time.sleep(seconds)

    return Logic


def test_the_module_refuses_an_older_torch_and_starts_nothing(bare_python, old_torch_path, tmp_path):
    logic = _logic_class(bare_python, {"PYTHONPATH": old_torch_path}, tmp_path, slicer_python=True)()
    if dependencies.is_intel_mac():
        pytest.skip("on an Intel Mac the refusal is the Intel Mac one")
    assert logic.torchPlan().action == "refuse"
    picked = _logic_class(bare_python, {"PYTHONPATH": old_torch_path}, tmp_path, slicer_python=False)()
    with pytest.raises(InputError, match="torch 2.5.1.*update torch in that Python|Update torch in that Python"):
        picked.startInstall(missing=["torch>=2.6"])
    with pytest.raises(InputError, match="PyTorch Utils"):
        logic.startInstall(missing=["torch>=2.6", "numpy>=1.24"])
    with pytest.raises(InputError, match="PyTorch Utils"):
        logic.installTorch()
    assert not list(tmp_path.glob("*.log"))  # nothing was started


def test_the_module_installs_a_missing_torch_with_light_the_torch_in_a_child(bare_python, tmp_path):
    logic = _logic_class(bare_python, None, tmp_path)()
    if dependencies.is_intel_mac():
        pytest.skip("no torch >= 2.6 for Intel Macs")
    proc = logic.startInstall(missing=["torch>=2.6", "numpy>=1.24,<3"])
    try:
        assert proc.commands == [
            [bare_python, "-m", "pip", "install", "--disable-pip-version-check", "light-the-torch>=0.5"],
            [bare_python, "-m", "light_the_torch", "install", "--disable-pip-version-check", "torch>=2.6"],
            [bare_python, "-m", "pip", "install", "--disable-pip-version-check", "numpy>=1.24,<3"]]
        assert proc.poll() is None or proc.poll() != 0  # a child process; the bare venv has no pip
        assert proc.wait(timeout=60) != 0 and proc.step == 0  # the first failure stops the rest
        assert "No module named pip" in Path(proc.log_file).read_text()
    finally:
        proc.kill()
    # a satisfied torch: only the other packages go to pip; nothing at all: None
    here = _logic_class(sys.executable, None, tmp_path)()
    assert here.torchPlan().action == "ok"
    pip = here.startInstall(missing=["torch>=2.6", "einops>=0.6"])
    pip.kill()
    assert pip.commands == [[sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "einops>=0.6"]]
    assert here.startInstall(missing=[]) is None
    here.installTorch()  # satisfied: returns at once, runs nothing


# -- Slicer's process: no torch, no PyTorchUtils ---------------------------------------------------------------
def _module_source() -> str:
    return (MODULE / "MedDiffusion.py").read_text()


def test_the_module_never_imports_torch_or_calls_pytorch_utils():
    tree = ast.parse(_module_source())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] in ("torch", "PyTorchUtils", "light_the_torch") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in ("torch", "PyTorchUtils", "light_the_torch")
        elif isinstance(node, ast.Name):
            assert node.id not in ("PyTorchUtils", "PyTorchUtilsLogic"), f"line {node.lineno}"
        elif isinstance(node, ast.Attribute):
            assert node.attr not in ("PyTorchUtilsLogic", "_executePythonModule", "pip_install"), \
                f"line {node.lineno}: {node.attr}"
    src = _module_source()
    for bad in ("import torch", "PyTorchUtils.", "slicer.util.pip_install", "__import__(\"torch\")"):
        assert bad not in src, bad
    # the install button goes through the child-process path and the panel's timer
    install = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_onInstall")
    calls = {n.func.attr for n in ast.walk(install) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "startInstall" in calls and "torchPlan" in calls and "installTorch" not in calls
    assert "WaitCursor" not in ast.unparse(install)


def test_the_glue_only_starts_children_for_torch():
    src = (MODULE / "MedDiffusionGlue" / "dependencies.py").read_text()
    tree = ast.parse(src)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"torch", "light_the_torch", "PyTorchUtils", "pip"} & {m.split(".")[0] for m in imported}


def test_readme_documents_light_the_torch_pytorch_utils_and_intel_macs():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## 3D Slicer extension")
    section = readme[start:readme.index("\n## ", start + 5)]
    for words in ("light-the-torch", "PyTorch Utils", "never replaced", "Intel Mac", "Run on: Server",
                  "never imports torch"):
        assert words in section, words
    assert "freezes Slicer" not in section and "imports torch into Slicer's process" not in section
