"""``meddiffusion generate-dataset --ray [ADDRESS]``: the cases of a dataset on a Ray cluster.

:func:`ray_runner` connects (before anything is written: a missing Ray, a malformed address or
one where no cluster answers is one :class:`~MedDiffusionLib.errors.UserError` line) and returns a
:data:`~MedDiffusionLib.dataset.Runner` for :func:`~MedDiffusionLib.dataset.run_dataset`.

Why actors, not Ray Data: here the unit of work, of failure, of retry and of output is one case.
Each finished case is written atomically with its done-marker as soon as it arrives (so Ctrl-C or a
crash keeps every finished case and a rerun continues), a refused case is recorded with its reason
and a crashed one is sent again on its own, and each worker loads its model once and keeps it. A
pool of long-lived actors (``_CaseWorker``: one :class:`~MedDiffusionLib.model_cache.ModelCache`,
one model replica per GPU with ``num_gpus=1``, else ``--threads`` CPUs each) driven by ``ray.wait``
gives exactly that. Ray Data's ``map_batches`` with an actor pool would keep the models loaded
too, but it streams a table in blocks: a failed task redoes its whole block, an exception fails the
whole run (or, tolerated, drops its rows without a reason), and results reach a datasink or the
driver block by block; a list of cases gains nothing from being a table.

The driver (this process) keeps the plan: it hands a job (one case, or a ``--batch`` of cases: a
:meth:`~MedDiffusionLib.dataset.Plan.units` entry; its resolved spec, plus the label map's voxels
for a pair, read here and sent through the object store) to an idle actor, which runs
:func:`~MedDiffusionLib.dataset.compute_unit` and returns the images; the driver writes them with
:func:`~MedDiffusionLib.dataset.finish_unit`. The workers need no shared file system, but every
node needs this version of MedDiffusion (checked when an actor starts: the voxels depend on it)
and the weights, or a way to download them (a worker without them fails the case with the
weights' own message, as a local run would). A request the library refuses (a ``UserError``: it
would be refused again) fails its cases at once;
any other error, or a worker that died (a node lost, the OOM killer), sends the job again, up to
``retries`` times, and a dead actor is replaced. On CPUs a case's voxels equal a single-process
run's with the same number of threads (one per actor unless ``--threads`` says otherwise).

Ray moves the cases, label maps and images between the processes of the user's own cluster with
pickle, as Ray always does: join only a cluster you run and trust (a Ray cluster runs whatever a
connected driver sends). None of this goes through the job service (``meddiffusion serve``), which
never unpickles what a client sends.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from collections import deque
from typing import Any

from .dataset import Case, Plan, Tracker, compute_unit, fail_unit, failure_reason, finish_unit
from .errors import UserError

CONNECT_TIMEOUT_S = 5.0   # a cluster address must answer within this
WAIT_NOTICE_S = 60.0      # say so when no worker has started for this long
START_TIMEOUT_S = 1800.0  # no worker at all for this long (the cluster lost its nodes): what is left fails
_ADDRESS = re.compile(r"^(?:ray://)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})$")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install meddiffusion[ray]") from None
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port``, ``[v6]:port`` or ``ray://host:port``."""
    m = _ADDRESS.match(address.strip())
    port = int(m.group("port")) if m else 0
    if not m or not 0 < port < 65536:
        raise UserError(f"--ray {address}: not a Ray address; use host:port (the head's GCS port, e.g. 6379), "
                        "ray://host:10001, auto (the cluster this machine is part of) or no address (start Ray here)")
    return m.group("v6") or m.group("host"), port


def _check_answers(address: str) -> None:
    """Refuse, quickly and in one line, an address where nothing answers (``ray.init`` would retry
    for a long time)."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc) or type(exc).__name__)
        raise UserError(f"--ray {address}: no Ray cluster answers at {host}:{port} ({why.lower()})") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def connect(address: str) -> bool:
    """Connect this process to Ray: ``local`` (a Ray already initialised in this process, else a
    new local instance), ``auto`` or a cluster address. True when this call started Ray (the
    caller shuts it down)."""
    ray = _import_ray()
    address = (address or "local").strip()
    if address in ("local", "auto") and ray.is_initialized():
        return False
    if address not in ("local", "auto"):
        _check_answers(address)
        if ray.is_initialized():
            raise UserError(f"--ray {address}: this process is already connected to a Ray cluster; use --ray "
                            "without an address to run on it")
    try:
        ray.init(address=None if address == "local" else address, logging_level=logging.WARNING,
                 log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, gRPC errors of ray:// ...: one line
        raise UserError(f"--ray {address}: cannot {'start' if address == 'local' else 'join'} Ray: "
                        f"{failure_reason(RuntimeError(_first_line(exc)))}") from None
    return True


class _CaseWorker:
    """A Ray actor: one model replica (a :class:`~MedDiffusionLib.model_cache.ModelCache`) that
    runs one job at a time with ``threads`` torch threads. Errors come back as values:
    ``("refused", reason)`` for a ``UserError``, ``("error", reason)`` for anything else."""

    def __init__(self, threads: int):
        import torch

        from .model_cache import ModelCache

        torch.set_num_threads(threads)
        self.cache = ModelCache()

    def ready(self) -> dict[str, Any]:
        import torch

        from . import __version__

        return {"version": __version__, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                "pid": os.getpid(), "threads": torch.get_num_threads()}

    def run(self, spec: Any, members: list[Case], label: Any) -> tuple[str, Any]:
        """One batch's job: ``("done", images)``, one image per member."""
        try:
            return "done", compute_unit(spec, members, self.cache, label=label)
        except UserError as exc:
            return "refused", failure_reason(exc)
        except Exception as exc:  # noqa: BLE001 - sent back, the driver retries the batch
            return "error", f"{type(exc).__name__}: {failure_reason(exc)}"


def _ray_reason(exc: BaseException) -> str:
    """One line for a Ray error: the cause of a task error, else the root error Ray's message ends
    with (``ModuleNotFoundError: ...``), else its first line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return f"{type(cause).__name__}: {failure_reason(cause)}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    root = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", ln)]
    return failure_reason(RuntimeError(root[-1] if root else lines[0] if lines else type(exc).__name__))


class RayRunner:
    """The :data:`~MedDiffusionLib.dataset.Runner` of :func:`ray_runner`. After a call,
    ``retried`` lists ``(ids, reason)`` for every job sent again (``ids``: its cases' ids, comma
    separated; one id unless ``--batch``) and ``started`` counts the actors started (replacements
    included)."""

    def __init__(self, ray: Any, *, workers: int, num_cpus: int, num_gpus: int, device: str | None, retries: int,
                 started_ray: bool):
        self.ray = ray
        self.workers, self.num_cpus, self.num_gpus = workers, num_cpus, num_gpus
        self.device = device if device not in (None, "auto") else None
        self.retries = retries
        self.started_ray = started_ray
        self.retried: list[tuple[str, str]] = []
        self.started = 0

    def _new_actor(self) -> tuple[Any, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "max_restarts": 0, "max_task_retries": 0}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        actor = self.ray.remote(_CaseWorker).options(**opts).remote(self.num_cpus)
        self.started += 1
        return actor, actor.ready.remote()

    def _kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self) -> None:
        """Shut down the Ray instance this runner started (if it did); the runner is spent."""
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_ray = False
        self.closed = True

    def __call__(self, plan: Plan, cases: list[Case], tracker: Tracker) -> None:
        from . import __version__
        from .data.volumes import read_volume

        if getattr(self, "closed", False):
            raise RuntimeError("this Ray runner is closed (its Ray instance was shut down): make a new one")
        ray = self.ray
        errors = ray.exceptions
        pending = {c.id for c in cases}
        units = plan.units(cases)           # (members, spec): one job each, a case alone unless --batch
        queue = deque(range(len(units)))
        tries = [0] * len(units)
        starting: dict[Any, Any] = {}       # ready() ref -> actor
        busy: dict[Any, tuple[Any, int]] = {}  # run() ref -> (actor, unit)
        idle: list[Any] = []
        last_start_error = ""
        since = time.monotonic()
        told = False

        def note(line: str) -> None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)

        def again(u: int, reason: str) -> None:
            members = units[u][0]
            if tries[u] <= self.retries:
                who = ", ".join(c.id for c in members)
                self.retried.append((who, reason))
                note(f"{who}: try {tries[u] + 1} of {self.retries + 1}: {reason}")
                queue.appendleft(u)
            else:
                fail_unit(members, pending, tracker, f"{reason} (tried {tries[u]} times)")

        def dispatch() -> None:
            while queue and idle:
                u = queue.popleft()
                members, spec = units[u]
                if self.device:
                    spec = spec.with_params(device=self.device)
                try:  # the voxels travel, not the path: the workers need no shared file system
                    label = ray.put(read_volume(members[0].labels)) if members[0].paired else None
                except Exception as exc:  # noqa: BLE001 - recorded, the other cases go on
                    fail_unit(members, pending, tracker, failure_reason(exc))
                    continue
                tries[u] += 1
                actor = idle.pop()
                busy[actor.run.remote(spec, members, label)] = (actor, u)

        try:
            for _ in range(min(self.workers, len(units))):
                actor, ref = self._new_actor()
                starting[ref] = actor
            while queue or busy:
                dispatch()
                refs = [*busy, *starting]
                if not refs:
                    raise UserError(f"--ray: no Ray worker could start: {last_start_error}")
                ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
                if not ready:
                    if not busy and not idle and not told and time.monotonic() - since > WAIT_NOTICE_S:
                        told = True
                        what = f"{self.num_gpus} GPU" if self.num_gpus else f"{self.num_cpus} CPU"
                        note(f"waiting for {len(starting)} Ray worker(s) to start: each needs {what} free on the "
                             "cluster")
                    if not busy and not idle and time.monotonic() - since > START_TIMEOUT_S:
                        reason = f"no Ray worker started within {START_TIMEOUT_S:.0f} s"
                        while queue:
                            fail_unit(units[queue.popleft()][0], pending, tracker, reason)
                        break
                    continue
                ref = ready[0]
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                    except errors.RayError as exc:
                        last_start_error = _ray_reason(exc)
                        note(f"a Ray worker did not start: {last_start_error}")
                        self._kill(actor)
                        continue
                    if info.get("version") != __version__:
                        raise UserError(f"--ray: the Ray workers run MedDiffusion {info.get('version')}, this is "
                                        f"{__version__}: install the same version on every node (the voxels depend "
                                        "on it)")
                    idle.append(actor)
                    since = time.monotonic()
                    continue
                actor, u = busy.pop(ref)
                try:
                    status, payload = ray.get(ref)
                except errors.RayActorError as exc:  # the worker died: replace it, send the batch again
                    self._kill(actor)
                    new, start = self._new_actor()
                    starting[start] = new
                    since = time.monotonic()
                    again(u, f"the Ray worker died: {_ray_reason(exc)}")
                    continue
                except errors.RayError as exc:  # a lost object, a crashed task
                    idle.append(actor)
                    again(u, _ray_reason(exc))
                    continue
                idle.append(actor)
                dispatch()  # keep the workers busy while this process writes the cases
                members = units[u][0]
                if status == "done":
                    finish_unit(plan, members, payload, pending, tracker)
                elif status == "refused":  # the request itself: it would be refused again
                    fail_unit(members, pending, tracker, payload)
                else:
                    again(u, payload)
        finally:  # normal end, Ctrl-C (here or in on_case), an error: no worker outlives the run
            for actor in [*idle, *starting.values(), *(a for a, _ in busy.values())]:
                self._kill(actor)
            self.close()


def ray_runner(address: str = "local", *, workers: int | None = None, threads: int | None = None, retries: int = 2,
               device: str | None = None) -> RayRunner:
    """Connect to Ray (:func:`connect`) and size the actor pool: with GPUs on the cluster (and
    ``device`` not ``cpu``) one actor per GPU (``num_gpus=1``), else one per ``threads`` CPUs
    (default 1); ``workers`` overrides the count. ``device`` (not ``None``/``auto``) overrides the
    cases' device (``cuda:N`` is each GPU actor's own ``cuda``); ``auto`` lets each worker take its
    GPU, else its CPU. A job is sent at most
    ``1 + retries`` times."""
    if workers is not None and workers < 1:
        raise UserError("--workers must be positive")
    if threads is not None and threads < 1:
        raise UserError("--threads must be positive")
    if retries < 0:
        raise UserError("--retries must not be negative")
    ray = _import_ray()
    started = connect(address)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpu_only = str(device or "auto").lower().startswith("cpu")
        use_gpu = not cpu_only and (gpus > 0 or str(device or "").lower().startswith("cuda"))
        per = threads or 1
        count = workers or (max(1, gpus) if use_gpu else max(1, int(resources.get("CPU", 1)) // per))
    except BaseException:
        if started:
            ray.shutdown()
        raise
    if use_gpu and str(device or "").lower().startswith("cuda"):
        device = "cuda"  # an actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES): cuda:N means nothing there
    return RayRunner(ray, workers=count, num_cpus=per, num_gpus=1 if use_gpu else 0, device=device, retries=retries,
                     started_ray=started)


__all__ = ["ray_runner", "RayRunner", "connect", "parse_address"]
