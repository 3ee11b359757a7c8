"""Measured kernel choices: the fastest of several equivalent kernels per call signature, timed once
per machine and torch build and recorded in ``$MEDDIFFUSION_CACHE/kernels`` so that every process
runs the same kernels."""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ...paths import kernel_choices_dir

log = logging.getLogger(__name__)

_CHOICES: dict[tuple, str] = {}
TUNE_ROUNDS = 4  # the first round also warms oneDNN's primitive cache
# Larger convolutions are not timed: oneDNN in the input's layout wins there, and timing three
# kernels four times would cost more than it saves (a decoder runs each of its convolutions once).
TUNE_MAX_FLOP = 2e9
TUNE_MAX_VOXELS = 4096  # 16^3


def kernel_choices() -> dict[tuple, str]:
    """The kernels measured and chosen in this process, by call signature (operation, shapes,
    layout, threads). A cache of measurements, not a setting: every choice computes the same
    result to float32 rounding."""
    return dict(_CHOICES)


def measured_choice(key: tuple, candidates: dict[str, Callable[[], Any]]) -> str:
    """The fastest of ``candidates`` (name -> call) for ``key``, measured once per machine.

    Candidates run round-robin (a burst of load hits all of them alike) and keep their best time;
    the first candidate within 10 % of the fastest wins, so list the preferred one first. The
    choice is recorded in ``$MEDDIFFUSION_CACHE/kernels`` (per torch build, CPU capability and
    machine; the first process to record a key wins), so every later process, the job service
    included, runs the same kernels: the choices differ in float rounding, and a flipped rounding
    can flip a nearest codebook entry, so the same seed must meet the same kernels."""
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    stored = _stored_choices().get(repr(key))
    if stored in candidates:
        _CHOICES[key] = stored
        return stored
    times = dict.fromkeys(candidates, float("inf"))
    for _ in range(TUNE_ROUNDS):
        for name, call in candidates.items():
            t0 = time.perf_counter()
            call()
            times[name] = min(times[name], time.perf_counter() - t0)
    fastest = min(times.values())
    measured = next(n for n, t in times.items() if t <= 1.1 * fastest)
    log.debug("%s: %s -> %s", key, {n: f"{t * 1e3:.2f} ms" for n, t in times.items()}, measured)
    recorded = _record_choice(repr(key), measured)
    choice = _CHOICES[key] = recorded if recorded in candidates else measured
    return choice


def _choices_file() -> Path:
    name = f"{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-{platform.machine()}"
    return kernel_choices_dir() / f"choices-{name.replace('/', '_')}.json"


def kernel_choices_recorded() -> bool:
    """Whether this machine and torch build have recorded kernel choices (else the first fast CPU
    run times the candidates, :func:`measured_choice`); choices made in this process count too."""
    return bool(_CHOICES) or _choices_file().exists()


def _read_choices(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=8)
def _stored_choices_at(path: Path) -> dict[str, str]:
    return _read_choices(path)


def _stored_choices() -> dict[str, str]:
    """The recorded choices of this machine (read once per process and cache location)."""
    return _stored_choices_at(_choices_file())


def _record_choice(key: str, choice: str) -> str:
    """Record ``choice`` for ``key`` unless another process recorded one first; return the
    recorded choice. A cache that cannot be written keeps the choice for this process only."""
    from filelock import FileLock

    path = _choices_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            data = _read_choices(path)
            choice = data.setdefault(key, choice)
            _stored_choices().update(data)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
            os.replace(tmp, path)
    except OSError as exc:  # read-only or full cache: this process still runs its measured choice
        log.debug("kernel choices not recorded (%s)", exc)
    return choice
