"""``LocalServer`` behind a launcher (issue 19, item 1): Slicer's default Python, ``PythonSlicer``, is
the CTK app launcher, which starts the real interpreter as its own child and passes no signals on.

A stand-in launcher does the same (real processes, no mocks): it starts ``sys.executable`` with the
arguments it got, ignores SIGTERM and SIGINT, and waits for its child. The tests check that
``stop()`` ends the whole tree (no group member, the port closed), that ``running`` follows the real
server even when the launcher is gone, and that a stop that does not wait still kills a member that
ignores SIGTERM once its time is up.

On the code before this change (``stop()`` = ``terminate()`` of the launcher, ``running`` = the
launcher's ``poll()``), the first test fails at "the real server outlived stop()", the second at
``assert srv.running`` after the launcher is killed, the third at the stubborn helper's process
group (the child had no group of its own).

The last two run the module's self-test (``MedDiffusionTest`` of MedDiffusion.py, its class body on
stand-ins for Slicer's test base and the module logic): missing packages give "skipped", and a job
that fails leaves no server behind the stand-in launcher."""
from __future__ import annotations

import ast
import logging
import os
import shlex
import signal
import socket
import stat
import sys
import time
import unittest
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT
from MedDiffusionLib.client import LocalServer

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX (Windows uses a Job Object)")

LAUNCHER = r'''
import os, signal, subprocess, sys

def note(path, text):  # atomically, so the test never reads half a number
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

child = subprocess.Popen([sys.executable, *sys.argv[1:]])  # the "real interpreter", arguments passed on
note(os.environ["STANDIN_PIDFILE"], str(child.pid))
if os.environ.get("STANDIN_STUBBORN"):  # a helper of the tree that ignores SIGTERM (needs the SIGKILL)
    subprocess.Popen([sys.executable, "-c", "import os, signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "p = sys.argv[1]\n"
                      "open(p + '.tmp', 'w').write(str(os.getpid())); os.replace(p + '.tmp', p)\n"
                      "time.sleep(600)\n", os.environ["STANDIN_STUBBORN"]])
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like the CTK launcher: nothing is passed on
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(child.wait())
'''


def standin(tmp_path: Path, stubborn: bool = False) -> tuple[LocalServer, Path, Path]:
    """A LocalServer whose ``python`` is a launcher executable; returns it and the pid files of the
    real server and of the stubborn helper."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    wrapper = tmp_path / "PythonStandIn"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(launcher))} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    real, helper = tmp_path / "real.pid", tmp_path / "stubborn.pid"
    env = {"STANDIN_PIDFILE": str(real), "STANDIN_STUBBORN": str(helper) if stubborn else None}
    return LocalServer(python=str(wrapper), env=env, log_file=tmp_path / "serve.log"), real, helper


def read_pid(path: Path, timeout: float = 30.0) -> int:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path.name} was not written"
        time.sleep(0.02)
    return int(path.read_text())


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2:][:1] not in (b"Z", b"X")
    except OSError:
        return not Path("/proc/self/stat").exists()


def group_empty(pgid: int, within: float = 2.0) -> bool:
    """``killpg(pgid, 0)`` finds no process (``within``: time for init to reap an orphan's zombie)."""
    end = time.monotonic() + within
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.02)


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def cleanup(srv: LocalServer, *pid_files: Path) -> None:
    """Whatever a failing assertion left behind (on the old code the real server is orphaned)."""
    srv.stop(timeout=1)
    for path in pid_files:
        if path.exists():
            try:
                os.kill(int(path.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_stop_ends_the_server_behind_a_launcher_that_ignores_signals(tmp_path):
    srv, real_file, _ = standin(tmp_path)
    try:
        srv.start(timeout=60)
        assert srv.client(timeout=10).health()["version"]
        launcher, real, port = srv.pid, read_pid(real_file), srv.port
        assert real != launcher and alive(real) and srv.running
        pgid = os.getpgid(launcher)
        assert os.getpgid(real) == pgid

        t0 = time.monotonic()
        done = srv.stop(timeout=3)
        took = time.monotonic() - t0
        assert not alive(real), "the real server outlived stop()"
        assert done is True
        assert port_closed(port)
        assert pgid == launcher, "the server's tree must be a process group of its own"
        assert group_empty(pgid), "a process of the server's group outlived stop()"
        assert not srv.running and srv.process is None
        assert took < 3, f"SIGTERM to the group should end it at once (took {took:.1f} s)"
    finally:
        cleanup(srv, real_file)


def test_running_follows_the_real_server_when_the_launcher_dies(tmp_path):
    srv, real_file, _ = standin(tmp_path)
    try:
        srv.start(timeout=60)
        launcher, real, port = srv.pid, read_pid(real_file), srv.port
        proc = srv.process
        os.kill(launcher, signal.SIGKILL)
        proc.wait(timeout=10)
        assert alive(real)
        assert srv.running, "running must follow the real server, not the launcher"
        assert srv.ready(timeout=5.0)
        assert srv.client(timeout=10).health()["version"]

        done = srv.stop(timeout=5)
        assert not alive(real), "stop() must reach the real server after the launcher is gone"
        assert done is True
        assert port_closed(port)
        assert group_empty(launcher)
        assert not srv.running
    finally:
        cleanup(srv, real_file)


def test_stop_without_waiting_then_kills_what_ignores_sigterm(tmp_path):
    srv, real_file, helper_file = standin(tmp_path, stubborn=True)
    real2_file, helper2_file = tmp_path / "real2.pid", tmp_path / "stubborn2.pid"
    try:
        srv.start(timeout=60)
        launcher, real, helper, port = srv.pid, read_pid(real_file), read_pid(helper_file), srv.port
        assert os.getpgid(helper) == launcher

        t0 = time.monotonic()
        assert srv.stop(timeout=1.0, wait=False) is False  # returns at once: the helper ignores SIGTERM
        assert time.monotonic() - t0 < 0.5
        assert not srv.running and srv.stopping and alive(helper)

        # a new start while the old tree still holds its port takes another free port
        srv.env.update(STANDIN_PIDFILE=str(real2_file), STANDIN_STUBBORN=str(helper2_file))
        srv.start(timeout=60)
        assert srv.port != port and srv.client(timeout=10).health()["version"]
        second_launcher = srv.pid

        end = time.monotonic() + 15
        while not LocalServer.poll_stopped():  # what the panel's timer does
            assert time.monotonic() < end, "the stopped tree was not killed after its timeout"
            time.sleep(0.05)
        assert time.monotonic() - t0 >= 1.0, "SIGKILL before the timeout"
        assert not alive(real) and not alive(helper) and group_empty(launcher) and port_closed(port)
        assert not srv.stopping and srv.running  # the second server is untouched

        # the blocking stop escalates too, within timeout + a moment
        second_helper = read_pid(helper2_file)
        t0 = time.monotonic()
        assert srv.stop(timeout=0.5) is True
        assert 0.5 <= time.monotonic() - t0 < 5  # the helper ignored SIGTERM: killed at the timeout
        assert not alive(second_helper) and group_empty(second_launcher) and not srv.running
    finally:
        cleanup(srv, real_file, helper_file, real2_file, helper2_file)


# -- the module's self-test -----------------------------------------------------------------------------------
def self_test_class(logic_class):
    """MedDiffusion.py's ``MedDiffusionTest`` as written, on ``unittest.TestCase`` (what Slicer's
    ScriptedLoadableModuleTest derives from) with ``delayDisplay`` recorded, and ``logic_class`` as
    the module logic."""
    path = ROOT / "MedDiffusion" / "MedDiffusion.py"
    source = path.read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "MedDiffusionTest")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            self.__dict__.setdefault("shown", []).append(message)

    ns = {"ScriptedLoadableModuleTest": ScriptedLoadableModuleTest, "MedDiffusionLogic": logic_class,
          "slicer": SimpleNamespace(mrmlScene=SimpleNamespace(Clear=lambda: None)),
          "logging": logging, "os": os, "time": time}
    exec(compile(ast.Module([node], []), str(path), "exec"), ns)
    return ns["MedDiffusionTest"]


def run_job_test(cls) -> unittest.TestResult:
    result = unittest.TestResult()
    cls("test_generate_with_local_service").run(result)
    return result


def test_module_self_test_is_skipped_without_packages():
    class Logic:
        server = None

        def missingDependencies(self):
            return ["torch>=2.6"]

        def generate(self, **kwargs):
            raise AssertionError("the job must not run without the packages")

        def stopServer(self):
            pass

    cls = self_test_class(Logic)
    result = run_job_test(cls)
    assert len(result.skipped) == 1 and "torch>=2.6" in result.skipped[0][1]
    assert not result.failures and not result.errors and result.testsRun == 1
    # Slicer's "Reload and Test" calls runTest directly: the skip is shown, neither raised nor hidden
    test = cls()
    test.test_mapping_and_refusals = lambda: None
    test.runTest()
    assert any("skipped" in m and "torch>=2.6" in m for m in test.shown)


def test_module_self_test_leaves_no_server_when_the_job_fails(tmp_path):
    started: list[tuple[LocalServer, int, int]] = []

    class Logic:
        def __init__(self):
            self.server = None

        def missingDependencies(self):
            return []

        def generate(self, **kwargs):  # the server starts behind the launcher, then the job fails
            self.server, real_file, _ = standin(tmp_path)
            self.server.start(timeout=60)
            started.append((self.server, self.server.pid, read_pid(real_file)))
            raise RuntimeError("the job failed")

        def stopServer(self):  # as the panel should: no waiting on the main thread
            if self.server is not None:
                self.server.stop(timeout=2.0, wait=False)
            self.server = None

    try:
        result = run_job_test(self_test_class(Logic))
        assert len(result.errors) == 1 and "the job failed" in result.errors[0][1], result.errors
        (srv, launcher, real), = started
        assert not alive(real), "the self-test left its server running"
        assert group_empty(launcher) and not srv.running and not srv.stopping
    finally:
        for srv, _, real in started:
            cleanup(srv)
            try:
                os.kill(real, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_port_taken_before_the_server_bound_it_is_left_for_another(tmp_path, monkeypatch):
    """The port is chosen free, then another program binds it before the server does (the race of
    two servers starting at once): the server exits on EADDRINUSE and is started on another port."""
    from MedDiffusionLib import client as client_mod

    blocker = socket.create_server(("127.0.0.1", 0))  # listening: nobody else can bind it
    taken = blocker.getsockname()[1]
    picks = [taken, taken]  # chosen twice in a row, then free ones
    real = client_mod.free_port
    monkeypatch.setattr(client_mod, "free_port", lambda host="127.0.0.1": picks.pop(0) if picks else real(host))
    srv = LocalServer(log_file=tmp_path / "serve.log")
    try:
        srv.start(timeout=120)
        assert srv.port != taken and srv.client().health()["version"]
        assert (tmp_path / "serve.log").read_text().lower().count("address already in use") == 2
        assert picks == []
    finally:
        srv.stop()
        blocker.close()
    # a port given by the caller is not changed: its server's exit is the error
    blocker = socket.create_server(("127.0.0.1", 0))
    fixed = LocalServer(port=blocker.getsockname()[1], log_file=tmp_path / "fixed.log")
    try:
        with pytest.raises(Exception, match="exited"):
            fixed.start(timeout=120)
        assert fixed.port == blocker.getsockname()[1]
    finally:
        fixed.stop()
        blocker.close()
