"""Progress of a job: the phases and the :class:`ProgressEvent` s a runner reports (step, total, ETA,
a one-off notice for the user), and :class:`ProgressReporter`, which turns sampler callbacks into them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

PHASES = ("queued", "loading", "sampling", "decoding", "writing", "done")


@dataclass
class ProgressEvent:
    phase: str
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    message: str = ""
    notice: str | None = None  # a one-off line for the user (estimate, warning), printed by front ends


class ProgressReporter:
    """Turns sampler callbacks into :class:`ProgressEvent` s with an ETA from the mean step time."""

    def __init__(self, sink: Callable[[ProgressEvent], None] | None):
        self.sink = sink
        self.t0: float | None = None
        self.phase = "loading"

    def emit(self, phase: str, step: int = 0, total: int = 0, message: str = "", eta: float | None = None,
             notice: str | None = None) -> None:
        self.phase = phase
        if self.sink is not None:
            self.sink(ProgressEvent(phase, step, total, eta, message, notice))

    def step(self, i: int, n: int) -> None:
        now = time.monotonic()
        if self.t0 is None or i <= 0:
            self.t0 = now
            self.emit("sampling", i, n, f"sampling step {i} of {n}")
            return
        eta = (now - self.t0) / i * (n - i)
        self.emit("decoding" if i >= n else "sampling", i, n,
                  "decoding" if i >= n else f"sampling step {i} of {n}", eta)
