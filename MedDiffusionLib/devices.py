"""The device a job runs on, resolved once, where it runs: ``auto``, ``cpu``, ``cuda`` or
``cuda:N`` -> a device this machine has (CUDA devices always with their index, so that one GPU
has one name)."""
from __future__ import annotations

import warnings

import torch

from .defaults import show
from .errors import ResourceError, UserError


def _current() -> int:
    """The current CUDA device's index, without starting CUDA here when it has not started (a
    server resolves devices on request threads): 0 then."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def resolve_device(requested: str | None = None, warn: bool = True) -> torch.device:
    """``"auto"``/``None`` -> the current CUDA device when there is one, else the CPU (with a
    warning unless ``warn=False``: front ends that print their own CPU notice pass False).
    ``"cuda[:N]"`` needs that device (:class:`ResourceError` about field ``device`` otherwise);
    unknown names are a :class:`UserError`."""
    req = (requested or "auto").lower()
    if req == "cpu":
        return torch.device("cpu")
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _current())
        if warn:
            warnings.warn("no CUDA GPU available: running on the CPU, which is slow for the released models",
                          RuntimeWarning, stacklevel=2)
        return torch.device("cpu")
    try:
        dev = torch.device(req)
    except RuntimeError:
        dev = None
    if dev is None or dev.type != "cuda":
        raise UserError(f"unknown device {show(requested)}; use auto, cpu or cuda[:N]", field="device")
    if not torch.cuda.is_available():
        raise ResourceError(f"{show(req)} was asked for, but torch {torch.__version__} here sees no CUDA GPU (a CPU-only "
                            "build or no driver); use the CPU or a CUDA build of torch", field="device")
    count = torch.cuda.device_count()
    index = _current() if dev.index is None else dev.index
    if index >= count:
        raise ResourceError(f"{show(req)} was asked for, but this machine has {count} CUDA device(s) "
                            f"(cuda:0 to cuda:{count - 1})", field="device")
    return torch.device("cuda", index)
