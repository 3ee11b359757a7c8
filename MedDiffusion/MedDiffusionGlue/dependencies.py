"""Python packages of the Python that runs the local job service (Slicer's own or one the user
picked). Versions are read from package metadata (nothing is imported, so a broken torch cannot
break the check), in this process for this interpreter and in a short subprocess otherwise.

torch is never installed from here: ``MedDiffusion.py`` installs it into Slicer's Python through
the PyTorch extension's ``PyTorchUtils`` (CUDA build matched to the driver) and only when no
installed torch satisfies :data:`TORCH_REQUIREMENT`; a user-picked Python brings its own torch.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

TORCH_REQUIREMENT = ">=2.6"  # MedDiffusionLib's minimum (pyproject.toml: torch>=2.6,<3)
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


def installed_versions(names: list[str], python: str | None = None, timeout: float = 30.0) -> dict[str, str | None]:
    """{distribution name: installed version or None} in ``python`` (None = this interpreter)."""
    if python is None or os.path.realpath(python) == os.path.realpath(sys.executable):
        import importlib.metadata as metadata

        out: dict[str, str | None] = {}
        for name in names:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
        return out
    try:
        proc = subprocess.run([python, "-c", _PROBE, *names], capture_output=True, text=True, timeout=timeout,
                              env=_clean_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run {python}: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"{python} failed to report its packages: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def missing(python: str | None = None, requirements: list[str] | None = None) -> list[str]:
    """Requirements (torch's included) that ``python`` does not satisfy, as requirement strings."""
    reqs = list(requirements if requirements is not None else read_requirements())
    reqs.append("torch" + TORCH_REQUIREMENT)
    pairs = [split_requirement(r) for r in reqs]
    versions = installed_versions([name for name, _ in pairs], python)
    return [f"{name}{spec}" for name, spec in pairs if not satisfies(versions.get(name), spec)]


def pip_command(python: str, requirements: list[str]) -> list[str]:
    """The pip command that installs ``requirements`` (never torch) into ``python``."""
    reqs = [r for r in requirements if split_requirement(r)[0].lower() != "torch"]
    return [python, "-m", "pip", "install", "--disable-pip-version-check", *reqs]


def _clean_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with ``extra`` laid over it; a ``None`` value removes the variable."""
    env = dict(os.environ)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class PipProcess:
    """pip running in a child process; :meth:`poll` never blocks (output goes to a log file)."""

    def __init__(self, python: str, requirements: list[str], log_file: str, env: dict[str, str] | None = None):
        self.command = pip_command(python, requirements)
        self.log_file = log_file
        self._log = open(log_file, "wb")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=_clean_env(env))

    def poll(self) -> int | None:
        """The exit code once pip has finished, else None."""
        rc = self.process.poll()
        if rc is not None and not self._log.closed:
            self._log.close()
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
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.poll()


__all__ = ["TORCH_REQUIREMENT", "REQUIREMENTS_FILE", "read_requirements", "split_requirement", "parse_version",
           "satisfies", "installed_versions", "missing", "pip_command", "PipProcess"]
