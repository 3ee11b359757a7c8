"""``meddiffusion generate-dataset --server URL[,URL...]``: the cases of a dataset sent to job services.

For labs whose GPUs sit behind ``meddiffusion serve``. Each batch (one case, unless ``--batch``
groups several) is one job: the request resolved here, the device left to the server unless
``--device`` names one, a pair's label map uploaded as its input. It runs through
:meth:`MedDiffusionLib.client.Client.job` (our own job id, deleted on the server afterwards, also
on Ctrl-C). The results are downloaded into a temporary folder, read back and written here with
:func:`~MedDiffusionLib.dataset.finish_unit`, so the files, markers and resumption are those of a
local run. The server runs the same :func:`~MedDiffusionLib.jobs.run_job`, so a case's voxels are
those of a local run with the same CPU threads (or the same GPU).

Scheduling: :data:`IN_FLIGHT` threads per server take batches from one shared queue; a service
runs its jobs one at a time per device, so the second job waits on the server while the first runs
and the upload and download of one overlap the sampling of another. A server that stops answering
is dropped and its batch goes back to the queue for the others; when no server is left, the
remaining cases are reported failed. A job that fails on a server is tried again (``retries``
times; a busy answer, 429 or 503, is waited out first); a request the server refuses (an HTTP
400, 401, 403, 404, 413, 415 or 422, or a job failed with ``error_kind`` ``request``: a label map
with values the ControlNet does not know, say; or ``time_limit``) is not. A job failed with
``error_kind`` ``setup`` (that server lacks the weights, say, offline with an empty cache) goes to
the other servers, and fails with each one's reason when none can run it. A server that stops
answering is asked again after 2, 5 and 10 s before it is dropped; its batch goes to the other
servers, never back to it, and a batch that no server left can run fails (a case that crashes
servers does not take them all down one after another). All servers take
the one ``--token``.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

from .errors import UserError

IN_FLIGHT = 2          # jobs per server at a time: one sampling, one uploading / queued / downloading
MAX_SERVERS = 64
CONNECT_TIMEOUT_S = 10.0
PROBES_S = (2.0, 5.0, 10.0)  # a server that stopped answering is asked again after these waits before it is dropped
STOP_WAIT_S = 45.0           # after Ctrl-C: how long the threads get to delete their jobs (a status poll's
                             # 30 s timeout and the delete's 10 s); a second Ctrl-C leaves at once
BUSY_WAIT_S = 5.0            # a busy answer (429, 503: queue full) is waited out this long times the try
# answers that refuse the request itself (running it again gets the same answer)
REFUSALS = (400, 401, 403, 404, 413, 415, 422)
# failed jobs that are not tried again: the request is wrong, or it ran into the server's time limit
FINAL_KINDS = ("request", "time_limit")


class _Stop(Exception):
    """Raised inside a job's progress callback to leave it (the job is deleted on the server)."""


def _clients(urls: str, token: str | None, ca_file: str | None) -> list[Any]:
    from .client import Client, ServiceError

    names = [u.strip().rstrip("/") for u in (urls or "").split(",") if u.strip()]
    if not names:
        raise UserError("--server needs at least one URL (a comma list: http://gpu1:8765,http://gpu2:8765)")
    if len(names) > MAX_SERVERS:
        raise UserError(f"--server: at most {MAX_SERVERS} servers")
    if len(set(names)) != len(names):
        raise UserError("--server names a server twice")
    clients = []
    for url in names:
        try:
            client = Client(url, token, ca_file=ca_file)
            client.health(timeout=CONNECT_TIMEOUT_S)
            client.jobs()  # the token: health answers without it
        except ServiceError as exc:
            raise UserError(f"--server {url}: {exc}") from None
        except ValueError as exc:  # a malformed URL
            raise UserError(f"--server {url}: {exc}") from None
        clients.append(client)
    return clients


def server_runner(urls: str, token: str | None, *, ca_file: str | None = None, retries: int = 2,
                  device: str | None = None) -> "ServerRunner":
    """A :data:`~MedDiffusionLib.dataset.Runner` that runs the cases on the job services ``urls``
    (a comma list). Every server must answer (and accept the token) now: a bad one is a
    :class:`UserError`, before anything is written. ``device``: the device to ask the servers
    for (default: their own choice, ``auto``). A batch is sent at most ``1 + retries`` times."""
    return ServerRunner(_clients(urls, token, ca_file), retries, device)


class ServerRunner:
    """The runner of :func:`server_runner`. After a call, ``retried`` lists ``(ids, reason)`` for
    every batch sent again (``ids``: its cases' ids, comma separated) and ``dropped`` the servers
    that stopped answering (url -> why)."""

    def __init__(self, clients: list[Any], retries: int, device: str | None):
        self.clients, self.retries, self.device = clients, retries, device
        self.retried: list[tuple[str, str]] = []
        self.dropped: dict[str, str] = {}

    def __call__(self, plan: Any, cases: list[Any], tracker: Any) -> None:
        run = _Dispatch(self.clients, plan, tracker, self.retries, self.device, self.retried)
        try:
            run.run(cases)
        finally:
            self.dropped.update({self.clients[i].url: why for i, why in run.gone.items()})


class _Dispatch:
    def __init__(self, clients: list[Any], plan: Any, tracker: Any, retries: int, device: str | None,
                 retried: list[tuple[str, str]]):
        self.clients, self.plan, self.tracker = clients, plan, tracker
        self.retries, self.device, self.retried = retries, device, retried
        self.todo: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.left = 0                           # batches not yet over
        self.pending: set[str] = set()          # the ids of the cases to store
        self.stop = threading.Event()
        self.gone: dict[int, str] = {}          # server index -> why it was dropped
        self.suspect: set[int] = set()          # servers that stopped answering, being asked again
        # id(batch) -> {server index: why it cannot run that batch}: it stopped answering while the
        # batch ran there, or it lacks what the batch needs (error_kind setup)
        self.cannot: dict[int, dict[int, str]] = {}
        self.interrupt: BaseException | None = None  # raised by the tracker's callback in a worker thread

    def run(self, cases: list[Any]) -> None:
        from .dataset import failure_reason

        units = self.plan.units(cases)
        self.pending = {c.id for c in cases}
        self.left = len(units)
        for unit in units:
            self.todo.put((unit, 0))
        self.cannot = {id(unit): {} for unit in units}
        # each thread sets its own event when it ends. Thread.join is not used: on Python 3.11 a
        # Ctrl-C that lands inside join() marks a thread that still runs as ended (CPython's
        # _wait_for_tstate_lock releases the lock the live thread holds), and the process would
        # then exit before that thread deleted its job on its server
        ended = [threading.Event() for _ in range(len(self.clients) * IN_FLIGHT)]
        try:
            for n, event in enumerate(ended):
                i = n // IN_FLIGHT
                threading.Thread(target=self._work, args=(i, event), name=f"meddiffusion-dataset-{i}-{n % IN_FLIGHT}",
                                 daemon=True).start()
            for event in ended:
                while not event.wait(0.2):
                    pass
        except KeyboardInterrupt:
            self.stop.set()
            deadline = time.monotonic() + STOP_WAIT_S
            for event in ended:  # each thread deletes its job on its server
                event.wait(max(0.0, deadline - time.monotonic()))
            raise
        if self.interrupt is not None:
            raise self.interrupt
        why = self._whys(self.gone)
        while True:  # every server was dropped: what is left fails
            try:
                unit, _ = self.todo.get_nowait()
            except queue.Empty:
                break
            self._over(unit, None, failure_reason(RuntimeError(f"no server left ({why})")))

    def _over(self, unit: tuple, images: list | None, reason: str = "") -> None:
        """A batch is over: its images stored (``images``) or its pending cases failed (``reason``)."""
        from .dataset import fail_unit, finish_unit

        with self.lock:
            self.left -= 1
        try:
            if images is None:
                fail_unit(unit[0], self.pending, self.tracker, reason)
            else:
                finish_unit(self.plan, unit[0], images, self.pending, self.tracker)
        except BaseException as exc:  # noqa: BLE001 - the callback's Ctrl-C (or error) ends the run
            self.interrupt = self.interrupt or exc
            self.stop.set()

    def _work(self, index: int, ended: threading.Event) -> None:
        try:
            self._take_work(index)
        finally:
            ended.set()

    def _take_work(self, index: int) -> None:
        from .client import JobCancelled, JobFailed, ServiceError, ServiceUnavailable
        from .dataset import failure_reason

        client = self.clients[index]
        while not self.stop.is_set() and index not in self.gone:
            if index in self.suspect:  # another thread asks whether this server answers again
                self.stop.wait(0.2)
                continue
            try:
                unit, tries = self.todo.get(timeout=0.2)
            except queue.Empty:
                with self.lock:
                    if self.left <= 0 or len(self.gone) == len(self.clients):
                        return
                continue
            if self.stop.is_set():
                return
            if index in self.cannot[id(unit)]:  # this server cannot run it: left to the others
                self._elsewhere(unit, tries)
                continue
            try:
                images = self._compute(client, unit)
            except _Stop:
                return
            except ServiceUnavailable as exc:  # no answer: the batch goes to the other servers (never
                # to this one again: it may be what crashes it), and the server is asked again a few
                # times before it is dropped
                with self.lock:
                    self.suspect.add(index)  # its other threads take no work until it answers again
                    self.cannot[id(unit)][index] = f"stopped answering while it ran ({failure_reason(exc)})"
                self._elsewhere(unit, tries, f"{client.url}: {failure_reason(exc)}")
                answers = self._answers_again(client)
                with self.lock:
                    self.suspect.discard(index)
                    if not answers:
                        self.gone.setdefault(index, failure_reason(exc))
                if not answers:
                    return
            except JobCancelled as exc:  # cancelled on the server by someone else: tried again
                self._again(unit, tries, failure_reason(exc))
            except JobFailed as exc:  # a refused request (or one over the time limit) fails again: recorded
                if exc.kind == "setup":  # this server lacks the weights: another may have them
                    with self.lock:
                        self.cannot[id(unit)][index] = failure_reason(exc)
                    self._elsewhere(unit, tries, f"{client.url}: {failure_reason(exc)}")
                elif exc.kind in FINAL_KINDS:
                    self._over(unit, None, failure_reason(exc))
                else:
                    self._again(unit, tries, failure_reason(exc))
            except ServiceError as exc:
                if exc.status in REFUSALS:  # the server refuses this request: trying again cannot help
                    self._over(unit, None, failure_reason(exc))
                else:  # busy (429, 503: the queue is full), a conflict, an internal error: later
                    self.stop.wait(BUSY_WAIT_S * (tries + 1))
                    self._again(unit, tries, failure_reason(exc))
            except Exception as exc:  # noqa: BLE001 - reading the download failed: recorded
                self._over(unit, None, failure_reason(exc))
            else:
                self._over(unit, images)

    def _answers_again(self, client: Any) -> bool:
        """Whether a server that stopped answering answers again within :data:`PROBES_S`."""
        for wait in PROBES_S:
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if self.stop.wait(0.2) or self.left <= 0:  # stopped, or nothing left to do
                    return False
            try:
                client.health(timeout=CONNECT_TIMEOUT_S)
                return True
            except Exception:  # noqa: BLE001 - still no answer
                continue
        return False

    def _elsewhere(self, unit: tuple, tries: int, handed: str = "") -> None:
        """A batch some servers cannot run (:attr:`cannot`) goes back to the queue for the others
        (``handed``: why it left this one, recorded in ``retried``); it fails, with every server's
        reason, when no server left can run it (dropped servers count)."""
        with self.lock:
            why_not = {**self.gone, **self.cannot[id(unit)]}
        if len(why_not) == len(self.clients):
            self._over(unit, None, f"no server can run it ({self._whys(why_not)})")
            return
        if handed:
            self._note(unit, handed)
        self.todo.put((unit, tries))
        self.stop.wait(0.2)  # the other servers' threads take it

    def _whys(self, whys: dict[int, str]) -> str:
        """``url: why; ...`` of server index -> why."""
        return "; ".join(f"{self.clients[i].url}: {msg}" for i, msg in sorted(whys.items()))

    def _note(self, unit: tuple, reason: str) -> None:
        """Record a batch sent again in ``retried``."""
        with self.lock:
            self.retried.append((", ".join(c.id for c in unit[0]), reason))

    def _again(self, unit: tuple, tries: int, reason: str) -> None:
        if tries < self.retries:
            self._note(unit, reason)
            self.todo.put((unit, tries + 1))
        else:
            self._over(unit, None, reason + (f" (tried {tries + 1} times)" if tries else ""))

    def _compute(self, client: Any, unit: tuple) -> list:
        """One batch as one job on ``client``'s server: its images as ResultVolumes, in order."""
        from .jobspec import as_request
        from .remote import run_on_service

        members, spec = unit

        def check(_status: dict) -> None:
            if self.stop.is_set():
                raise _Stop

        images = run_on_service(client, as_request(spec, self.device or "auto"),
                                {"input": members[0].labels} if members[0].paired else None, progress=check)
        if len(images) != len(members):
            raise RuntimeError(f"the server made {len(images)} volumes for a batch of {len(members)}")
        return images


__all__ = ["server_runner", "ServerRunner", "IN_FLIGHT"]
