"""One long-lived worker thread that runs torch jobs; the GUI thread polls jobs (QTimer) and does
all MRML/Qt work. cuDNN caches and torch state stay on one thread across runs.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Job:
    """State shared between the worker and the GUI thread (plain attributes, read by polling)."""

    name: str
    fn: Callable[["Job"], Any]
    step: int = 0
    total: int = 0
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error: BaseException | None = None
    error_details: str = ""
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)

    # called from the worker thread
    def progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    # called from the GUI thread
    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def done(self) -> bool:
        return self.done_event.is_set()

    def eta_seconds(self) -> float | None:
        if not self.started or self.step <= 0 or self.total <= 0:
            return None
        rate = (time.time() - self.started) / self.step
        return rate * (self.total - self.step)

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done (scripts/tests); re-raise the job's exception."""
        if not self.done_event.wait(timeout):
            raise TimeoutError(f"job {self.name!r} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class Worker:
    """Runs submitted jobs one after another on a single daemon thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="MedDiffusionWorker", daemon=True)
        self._thread.start()
        self.current: Job | None = None

    def submit(self, name: str, fn: Callable[[Job], Any]) -> Job:
        job = Job(name, fn)
        self._queue.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.current = job
            job.started = time.time()
            try:
                if not job.cancelled():
                    job.result = job.fn(job)
            except BaseException as exc:  # reported to the GUI thread, never raised here
                job.error = exc
                job.error_details = traceback.format_exc()
            finally:
                job.finished = time.time()
                self.current = None
                job.done_event.set()

    def stop(self, timeout: float = 5.0) -> None:
        if self.current is not None:
            self.current.cancel()
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
