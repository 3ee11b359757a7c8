"""Memory, as the planners see it: what a run may still use on a device, products of sizes that
never overflow (a client may ask for any size), and sizes worded for a person."""
from __future__ import annotations

import math
import os
from typing import Sequence


def available_memory_bytes(device: str = "cpu") -> float | None:
    """Memory a run may still use on ``device``: CUDA free + cached-but-unused, or the OS's
    MemAvailable (Linux) / available physical pages; ``None`` when unknown."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def ffloat(n: float | int) -> float:
    """``float(n)``, ``inf`` when an integer is too large for a float (absurd sizes)."""
    try:
        return float(n)
    except OverflowError:
        return math.inf


def fprod(values: Sequence[int]) -> float:
    """The product of whole numbers as a float, ``inf`` when too large (no ``OverflowError``)."""
    return ffloat(math.prod(int(v) for v in values))


def gb_text(n: float) -> str:
    """Bytes in GB for a person ("1.5 GB"); unbounded sizes say so."""
    if not math.isfinite(n):
        return "an unbounded amount of"
    return f"{n / 2 ** 30:.1f} GB" if n < 1e5 * 2 ** 30 else f"{n / 2 ** 30:.3g} GB"


def size_text(n: float) -> str:
    """Bytes for a person: MB below a GB, else :func:`gb_text`."""
    if not math.isfinite(n) or n >= 2 ** 30:
        return gb_text(n)
    return f"{max(n, 1) / 2 ** 20:.0f} MB"
