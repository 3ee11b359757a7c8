"""Python packages of the Python that runs the local job service (Slicer's own or one the user
picked). Versions are read from package metadata (nothing is imported, so a broken torch cannot
break the check), in this process for this interpreter and in a short subprocess otherwise, which
:class:`DependencyCheck` polls so that Slicer's GUI thread never waits for it.

torch, like the reference extensions (TotalSegmentator, MONAIAuto3DSeg), is installed only where
none is installed: an installed torch older than :data:`TORCH_REQUIREMENT` is never replaced (it may
be loaded, and a working CUDA build would be lost); :func:`torch_plan` refuses with a message that
points to the *PyTorch Utils* module instead. A missing torch is installed into the server's Python
by a child process (:class:`InstallProcess`) running ``light-the-torch`` (``python -m
light_the_torch install torch>=2.6``, which picks the CUDA build matching the driver, as PyTorch
Utils does), so Slicer neither waits for it nor imports torch. Intel Macs get no torch >= 2.6
wheels: :func:`torch_plan` says that *This computer* needs a server there.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time

TORCH_REQUIREMENT = ">=2.6"  # MedDiffusionLib's minimum (pyproject.toml: torch>=2.6,<3)
LIGHT_THE_TORCH_REQUIREMENT = "light-the-torch>=0.5"  # what PyTorch Utils installs (PyTorchUtils.py:247)
PYTORCH_UTILS = "PyTorch Utils"  # the PyTorch extension's module as Slicer lists it (PyTorchUtils.py:16-17)
REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources",
                                 "requirements.txt")

_PROBE = ("import json, sys, importlib.metadata as m\n"
          "out = {}\n"
          "for n in sys.argv[1:]:\n"
          "    try: out[n] = m.version(n)\n"
          "    except m.PackageNotFoundError: out[n] = None\n"
          "print(json.dumps(out))\n")


def read_requirements(path: str = REQUIREMENTS_FILE) -> list[str]:
    """The requirement lines (``name>=x,<y``) of a requirements file."""
    with open(path, encoding="utf-8") as fh:
        return [line.split("#", 1)[0].strip() for line in fh if line.split("#", 1)[0].strip()]


def split_requirement(req: str) -> tuple[str, str]:
    """``"numpy>=1.24,<3"`` -> ``("numpy", ">=1.24,<3")``."""
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    if not m:
        raise ValueError(f"not a requirement: {req!r}")
    return m.group(1), m.group(2).strip()


def parse_version(text: str) -> tuple[int, ...]:
    """Leading release numbers of a version (``"2.13.0+cu128"`` -> ``(2, 13, 0)``)."""
    parts = []
    for piece in re.split(r"[.+\-]", text):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.group() != piece:
            break
    return tuple(parts)


def satisfies(version: str | None, spec: str) -> bool:
    """Does ``version`` meet ``spec`` (comma-separated ``>=, >, <=, <, ==, !=`` clauses)?"""
    if version is None:
        return False
    have = parse_version(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.match(r"(>=|<=|==|!=|>|<|~=)\s*(.+)$", clause)
        if not m:
            raise ValueError(f"unsupported version clause {clause!r}")
        op, want = m.group(1), parse_version(m.group(2))
        n = max(len(have), len(want))
        a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b,
              "~=": a >= b and a[:len(want) - 1] == b[:len(want) - 1]}[op]
        if not ok:
            return False
    return True


def _versions_here(names: list[str]) -> dict[str, str | None]:
    import importlib.metadata as metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _is_this_python(python: str | None) -> bool:
    return python is None or os.path.realpath(python) == os.path.realpath(sys.executable)


class DependencyCheck:
    """Which requirements (torch's included) ``python`` lacks, found without blocking the caller:
    at once for this interpreter (package metadata), else by a short child process started with
    ``env`` (laid over this environment; ``None`` removes a variable: the environment the local
    service will run with) and polled with :meth:`poll` (from a ``QTimer`` in Slicer).

    After ``poll()`` returns True: ``versions`` ({name: version or None}) and ``missing``
    (requirement strings), or ``error`` (a message) when the interpreter could not be asked."""

    def __init__(self, python: str | None = None, requirements: list[str] | None = None,
                 env: dict[str, str | None] | None = None, timeout: float = 30.0):
        reqs = list(requirements if requirements is not None else read_requirements())
        reqs.append("torch" + TORCH_REQUIREMENT)
        self.python = python
        self.pairs = [split_requirement(r) for r in reqs]
        self.versions: dict[str, str | None] | None = None
        self.missing: list[str] | None = None
        self.error: str | None = None
        self.process: subprocess.Popen | None = None
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        names = [name for name, _ in self.pairs]
        if _is_this_python(python):
            self._finish(_versions_here(names))
            return
        try:
            self.process = subprocess.Popen([python, "-c", _PROBE, *names], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            env=_clean_env(env))
        except OSError as exc:
            self.error = f"cannot run {python}: {exc}"

    @property
    def done(self) -> bool:
        return self.missing is not None or self.error is not None

    def poll(self) -> bool:
        """True once the answer (or an error) is in; never blocks (the output is a few bytes)."""
        if self.done:
            return True
        rc = self.process.poll()
        if rc is None:
            if time.monotonic() < self._deadline:
                return False
            self.kill()
            self.error = f"{self.python} did not report its packages within {self._timeout:.0f} s"
            return True
        out, err = self.process.communicate()
        if rc != 0:
            self.error = f"{self.python} failed to report its packages: {err.strip()[-500:]}"
            return True
        try:
            self._finish(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            self.error = f"{self.python} gave no package list: {out.strip()[-200:]!r}"
        return True

    def wait(self) -> "DependencyCheck":
        """Block until done (scripts and tests)."""
        while not self.poll():
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate()

    def _finish(self, versions: dict[str, str | None]) -> None:
        self.versions = versions
        self.missing = [f"{name}{spec}" for name, spec in self.pairs if not satisfies(versions.get(name), spec)]


def installed_versions(names: list[str], python: str | None = None, timeout: float = 30.0,
                       env: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """{distribution name: installed version or None} in ``python`` (None = this interpreter); blocking."""
    if _is_this_python(python):
        return _versions_here(names)
    check = DependencyCheck(python, [f"{n}" for n in names], env=env, timeout=timeout).wait()
    if check.error is not None:
        raise RuntimeError(check.error)
    return {n: check.versions.get(n) for n in names}


def missing(python: str | None = None, requirements: list[str] | None = None,
            env: dict[str, str | None] | None = None) -> list[str]:
    """Requirements (torch's included) that ``python`` does not satisfy, as requirement strings; blocking."""
    check = DependencyCheck(python, requirements, env=env).wait()
    if check.error is not None:
        raise RuntimeError(check.error)
    return check.missing


def pip_command(python: str, requirements: list[str]) -> list[str]:
    """The pip command that installs ``requirements`` (never torch) into ``python``."""
    reqs = [r for r in requirements if split_requirement(r)[0].lower() != "torch"]
    return [python, "-m", "pip", "install", "--disable-pip-version-check", *reqs]


def is_intel_mac(system: str | None = None, machine: str | None = None) -> bool:
    """macOS on x86_64, where PyTorch publishes no wheels of torch >= 2.6 (2.2 was the last)."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    return system == "Darwin" and machine.lower() in ("x86_64", "amd64")


def intel_mac_message(requirement: str = TORCH_REQUIREMENT) -> str:
    return (f"This Mac has an Intel processor: PyTorch publishes no torch{requirement} for Intel Macs "
            "(torch 2.2 was the last), so MedDiffusion cannot run on this computer. Choose Run on: Server "
            "and use a MedDiffusion service on a machine with a GPU (see the README).")


def old_torch_message(python: str, installed: str, requirement: str = TORCH_REQUIREMENT,
                      slicer_python: bool = True) -> str:
    """Why an older torch is not replaced, and where to update it (PyTorch Utils for Slicer's Python)."""
    head = (f"{python} has torch {installed}, but MedDiffusion needs torch{requirement}. An installed torch is "
            "never replaced from here (it may already be loaded, and a working CUDA build would be lost). ")
    if slicer_python:
        how = (f"Update it in the {PYTORCH_UTILS} module (Utilities > {PYTORCH_UTILS}: Uninstall PyTorch, restart "
               f"Slicer, set the torch version requirement to {requirement}, Install PyTorch), ")
    else:
        how = "Update torch in that Python yourself (https://pytorch.org/get-started), "
    return head + how + (f"or pick a Python that has torch{requirement} (Run on: This computer, Python), "
                         "or use Run on: Server.")


def light_the_torch_commands(python: str, requirement: str = TORCH_REQUIREMENT) -> list[list[str]]:
    """The child-process commands that install torch (CUDA build matched to the driver) into
    ``python``: light-the-torch, then ``ltt install torch<requirement>`` (torch only: no torchvision)."""
    return [[python, "-m", "pip", "install", "--disable-pip-version-check", LIGHT_THE_TORCH_REQUIREMENT],
            [python, "-m", "light_the_torch", "install", "--disable-pip-version-check", "torch" + requirement]]


class TorchPlan:
    """What to do about torch in the server's Python: ``action`` is ``"ok"`` (nothing to do),
    ``"install"`` (run ``commands`` in a child process) or ``"refuse"`` (show ``message``)."""

    def __init__(self, action: str, message: str = "", commands: list[list[str]] | None = None):
        self.action, self.message, self.commands = action, message, commands or []

    def __repr__(self) -> str:
        return f"TorchPlan({self.action!r}, {self.message!r}, {self.commands!r})"


def torch_plan(python: str, installed: str | None, requirement: str = TORCH_REQUIREMENT,
               system: str | None = None, machine: str | None = None, slicer_python: bool = True) -> TorchPlan:
    """The decision for a server Python whose torch is ``installed`` (a version, or None when absent):
    satisfied -> ok; Intel Mac -> refuse (no wheels); older torch -> refuse, pointing to PyTorch Utils
    (never replaced); absent -> install with light-the-torch in a child process."""
    if satisfies(installed, requirement):
        return TorchPlan("ok")
    if is_intel_mac(system, machine):
        return TorchPlan("refuse", intel_mac_message(requirement))
    if installed is not None:
        return TorchPlan("refuse", old_torch_message(python, installed, requirement, slicer_python))
    return TorchPlan("install", f"torch{requirement} (light-the-torch picks the build for this computer's GPU)",
                     light_the_torch_commands(python, requirement))


def _clean_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with ``extra`` laid over it; a ``None`` value removes the variable."""
    env = dict(os.environ)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class InstallProcess:
    """Commands run one after the other in child processes (the first failure stops them);
    :meth:`poll` never blocks (output goes to one log file)."""

    def __init__(self, commands: list[list[str]], log_file: str, env: dict[str, str | None] | None = None):
        if not commands:
            raise ValueError("nothing to run")
        self.commands = [list(c) for c in commands]
        self.command = self.commands[-1]
        self.log_file = log_file
        self.step = 0
        self._env = _clean_env(env)
        self._log = open(log_file, "wb")
        self._rc: int | None = None
        self.process = self._start(0)

    def _start(self, step: int) -> subprocess.Popen:
        self.step = step
        self._log.write(("$ " + " ".join(self.commands[step]) + "\n").encode())
        self._log.flush()
        # Its own process group (POSIX: session), so that kill() reaches the whole tree: Slicer's PythonSlicer
        # is a launcher that runs python-real as its child and passes no signals on.
        kwargs = ({"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)} if os.name == "nt"
                  else {"start_new_session": True})
        return subprocess.Popen(self.commands[step], stdout=self._log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self._env, **kwargs)

    def poll(self) -> int | None:
        """The exit code once every command has finished (or one failed), else None."""
        if self._rc is not None:
            return self._rc
        rc = self.process.poll()
        if rc is None:
            return None
        if rc == 0 and self.step + 1 < len(self.commands):
            try:
                self.process = self._start(self.step + 1)
            except OSError as exc:
                self._log.write(f"cannot run {self.commands[self.step + 1][0]}: {exc}\n".encode())
                self._rc = 127
                self._log.close()
            return self._rc
        self._rc = rc
        if not self._log.closed:
            self._log.close()
        return rc

    def wait(self, timeout: float | None = None) -> int:
        """Block until done (scripts and tests)."""
        end = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if end is not None and time.monotonic() > end:
                self.kill()
                raise TimeoutError(f"{self.commands[self.step]} did not finish within {timeout} s")
            time.sleep(0.02)
        return rc

    def last_line(self) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_file) - 4096))
                lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
            return lines[-1].strip() if lines else ""
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as fh:
                return "\n".join(fh.read().splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """Stop the running command and whatever it started (its process group; Windows: ``taskkill /T``)."""
        if os.name != "nt":
            if self.process.returncode is None:  # not reaped yet: its pid (the group's id) cannot be anyone else's
                try:
                    os.killpg(self.process.pid, 9)
                except (ProcessLookupError, PermissionError):
                    pass
        elif self.process.poll() is None:
            subprocess.Popen(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # not waited for
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self._rc is None:
            self._rc = self.process.returncode
        if not self._log.closed:
            self._log.close()


class PipProcess(InstallProcess):
    """pip (never torch) running in a child process; :meth:`poll` never blocks."""

    def __init__(self, python: str, requirements: list[str], log_file: str, env: dict[str, str | None] | None = None):
        super().__init__([pip_command(python, requirements)], log_file, env)


__all__ = ["TORCH_REQUIREMENT", "REQUIREMENTS_FILE", "read_requirements", "split_requirement", "parse_version",
           "satisfies", "DependencyCheck", "installed_versions", "missing", "pip_command", "PipProcess",
           "InstallProcess", "LIGHT_THE_TORCH_REQUIREMENT", "PYTORCH_UTILS", "TorchPlan", "torch_plan",
           "is_intel_mac", "intel_mac_message", "old_torch_message", "light_the_torch_commands"]
