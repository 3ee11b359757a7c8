"""The one atomic writer: umask without touching it, unique temporary names, cleanup on every
error, a full disk as ResourceError (a real /dev/full write), and the conversion cache under two
real processes converting at once."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import ROOT
from MedDiffusionLib.data.volumes import Volume, write_volume
from MedDiffusionLib.errors import ResourceError, UserError
from MedDiffusionLib.io import atomic
from MedDiffusionLib.io.atomic import atomic_path, atomic_write_bytes
from test_checkpoints import official_bf_file  # noqa: F401  (fixture)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_permissions_follow_the_umask_without_changing_it(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("the writer must not read or set the umask"))
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        write_volume(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "v.nii.gz").stat().st_mode & 0o777 == 0o640
    assert _leftovers(tmp_path) == []


def test_an_error_removes_the_temporary_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            assert tmp.name.endswith(".pt") and tmp.parent == tmp_path
            1 / 0
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_threads_writing_one_file_never_share_a_temporary_name(tmp_path):
    target, names, errors = tmp_path / "x.json", set(), []

    def write(i):
        try:
            with atomic_path(target) as tmp:
                names.add(tmp.name)
                tmp.write_bytes(str(i).encode() * 1000)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(names) == 8
    assert target.read_bytes() in {str(i).encode() * 1000 for i in range(8)}
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux /dev/full")
def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    # the bytes really go to /dev/full (every write fails with ENOSPC) through the writer's own path
    monkeypatch.setattr(atomic, "_open_for_writing", lambda tmp: os.open("/dev/full", os.O_WRONLY))
    with pytest.raises(ResourceError, match="disk is full") as info:
        atomic_write_bytes(tmp_path / "m.safetensors", b"x" * 100_000)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == 28
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_reading_a_file_that_is_not_a_volume(tmp_path):
    from MedDiffusionLib.data.volumes import read_volume
    bad = tmp_path / "scan.nrrd"
    bad.write_text("this is not an image")
    with pytest.raises(UserError, match=r"scan\.nrrd.*not a readable volume.*\.nii\.gz") as info:
        read_volume(bad)
    assert info.value.__cause__ is not None


CONVERT = """
import os, sys, time
from pathlib import Path
from MedDiffusionLib.weights import converted_path
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
out = converted_path(Path(sys.argv[1]), "biflownet", log=lambda m: print("LOG", m, flush=True))
print("OUT", out, flush=True)
"""


def test_two_processes_convert_one_checkpoint_at_once(tmp_path, official_bf_file):  # noqa: F811
    env = dict(os.environ, MEDDIFFUSION_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(official_bf_file), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    import time
    time.sleep(0.5)
    go.touch()  # both start converting at the same moment (after their imports)
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {line.split(" ", 1)[1] for o in outs for line in o[0].splitlines() if line.startswith("OUT")}
    assert len(paths) == 1
    assert sum("converting" in o[0] for o in outs) == 1  # one converted, the other waited and reused it
    from MedDiffusionLib.io.checkpoints import load_model
    assert load_model(paths.pop(), expect="biflownet") is not None
    folder = next((tmp_path / "cache" / "converted").iterdir())
    assert _leftovers(folder) == []
