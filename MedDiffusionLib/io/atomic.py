"""The one atomic file writer: a temporary file beside the target, renamed over it when complete.

- The temporary file is created with ``os.open(..., O_CREAT | O_EXCL | O_WRONLY, 0o666)``, so the
  process umask applies without being read or changed (``os.umask`` is process-wide, unsafe with threads).
- Its name is unique per process, thread and call, so concurrent writers never share it.
- It is removed on every error path (and on ``KeyboardInterrupt``).
- A full disk (ENOSPC/EDQUOT) becomes :class:`~MedDiffusionLib.errors.ResourceError` with one clear line.
"""
from __future__ import annotations

import errno
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ResourceError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _suffix(path: Path) -> str:
    """Everything from the first dot of the name (``.nii.gz``), so writers that pick the format by
    extension still see it on the temporary name."""
    name = path.name
    dot = name.find(".", 1)
    return name[dot:] if dot > 0 else ""


def _temp_name(path: Path) -> Path:
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")


def _open_for_writing(tmp: Path) -> int:
    return os.open(tmp, os.O_WRONLY | getattr(os, "O_BINARY", 0))


def is_disk_full(err: BaseException) -> bool:
    """An OSError for a full disk or quota, or a library error whose text says so (SimpleITK)."""
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return True
    return "no space left on device" in str(err).lower()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary file beside ``path`` for a writer that takes a file name; when the
    block ends without error it replaces ``path`` (``os.replace``), else it is removed."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666))
    except OSError as err:
        if is_disk_full(err):
            raise ResourceError(f"{path}: the disk is full; nothing was written") from err
        raise
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        if is_disk_full(err):
            raise ResourceError(f"{path}: the disk is full (free some space or write elsewhere); nothing was "
                                "written") from err
        raise


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any long computation, an output file that exists (unless ``overwrite``), a
    folder in its place, or a missing or read-only parent folder: one line each."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (use --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{path}: folder {parent} is not writable")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fd = _open_for_writing(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "is_disk_full"]
