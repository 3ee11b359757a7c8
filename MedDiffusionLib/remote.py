"""One job run on a job service and its result read back here (for ``reproduce --server`` and
``generate-dataset --server``): :func:`run_on_service`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UserError


def run_on_service(client: Any, spec: Mapping[str, Any], inputs: Mapping[str, str | Path] | None = None,
                   wanted: str | None = None, progress: Callable[[dict], None] | None = None,
                   first_only: bool = False) -> list[Any]:
    """Run ``spec`` (a request dict) as a job on ``client``'s service
    (:meth:`~MedDiffusionLib.client.Client.job`: our own id, deleted afterwards) with ``inputs``
    (input name -> local file, uploaded) and return its results (only the one named ``wanted``,
    when given; only the first with ``first_only``) as :class:`~MedDiffusionLib.results.ResultVolume` s read from temporary
    downloads. ``progress(status)`` after each poll (it may raise to leave; the job is deleted)."""
    doc = dict(spec)
    inputs = dict(inputs or {})
    doc["inputs"] = {name: Path(path).name for name, path in inputs.items()}
    with client.job(doc, inputs or None, progress=progress) as (job_id, st):
        match = [r for r in st["results"] if r["name"] == wanted] if wanted else st["results"]
        match = match[:1] if first_only else match
        if not match:
            raise UserError(f"the job made {', '.join(r['name'] for r in st['results'])}, not {wanted!r}")
        return [download_result(client, job_id, r) for r in match]


def download_result(client: Any, job_id: str, result: Mapping[str, Any]) -> Any:
    """One result of a finished job (its status entry ``result``: name and meta) as a
    :class:`~MedDiffusionLib.results.ResultVolume`, read from a temporary download."""
    from .data.volumes import read_volume
    from .results import ResultVolume

    with tempfile.TemporaryDirectory(prefix="meddiffusion-job-") as tmp:
        local = client.download(job_id, result["name"], Path(tmp) / Path(result["name"]).name)
        return ResultVolume(result["name"], read_volume(local), dict(result.get("meta") or {}))


__all__ = ["run_on_service", "download_result"]
