"""One job run on a job service and its result read back here (for ``reproduce --server`` and
``generate-dataset --server``): :func:`run_on_service`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UserError


def service_spec(spec: Any, device: str | None = None) -> dict[str, Any]:
    """A resolved :class:`~MedDiffusionLib.jobspec.JobSpec` as a service request: the task's own
    parameters only (the service resolves the rest, as it would have here), ``device`` replacing
    the spec's (``None``: kept)."""
    from .jobspec import TASK_PARAMS

    doc = spec.to_dict()
    params = {k: v for k, v in doc["params"].items() if k in TASK_PARAMS[doc["task"]]}
    if device is not None:
        params["device"] = device
    return dict({k: doc.get(k) for k in ("task", "model", "weights", "controlnet", "output_format")}, params=params)


def run_on_service(client: Any, spec: Mapping[str, Any], inputs: Mapping[str, str | Path] | None = None,
                   wanted: str | None = None, progress: Callable[[dict], None] | None = None) -> Any:
    """Run ``spec`` (a request dict) as a job on ``client``'s service
    (:meth:`~MedDiffusionLib.client.Client.job`: our own id, deleted afterwards) with ``inputs``
    (input name -> local file, uploaded) and return its result ``wanted`` (default: the first) as
    a :class:`~MedDiffusionLib.results.ResultVolume` read from a temporary download.
    ``progress(status)`` after each poll (it may raise to leave; the job is deleted)."""
    from .data.volumes import read_volume
    from .results import ResultVolume

    doc = dict(spec)
    inputs = dict(inputs or {})
    doc["inputs"] = {name: Path(path).name for name, path in inputs.items()}
    with client.job(doc, inputs or None, progress=progress) as (job_id, st):
        match = [r for r in st["results"] if r["name"] == wanted] if wanted else st["results"][:1]
        if not match:
            raise UserError(f"the job made {', '.join(r['name'] for r in st['results'])}, not {wanted!r}")
        with tempfile.TemporaryDirectory(prefix="meddiffusion-job-") as tmp:
            local = client.download(job_id, match[0]["name"], Path(tmp) / Path(match[0]["name"]).name)
            return ResultVolume(match[0]["name"], read_volume(local), dict(match[0].get("meta") or {}))


__all__ = ["run_on_service", "service_spec"]
