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
    from .data.volumes import read_volume
    from .results import ResultVolume

    doc = dict(spec)
    inputs = dict(inputs or {})
    doc["inputs"] = {name: Path(path).name for name, path in inputs.items()}
    with client.job(doc, inputs or None, progress=progress) as (job_id, st):
        match = [r for r in st["results"] if r["name"] == wanted] if wanted else st["results"]
        match = match[:1] if first_only else match
        if not match:
            raise UserError(f"the job made {', '.join(r['name'] for r in st['results'])}, not {wanted!r}")
        out = []
        with tempfile.TemporaryDirectory(prefix="meddiffusion-job-") as tmp:
            for r in match:
                local = client.download(job_id, r["name"], Path(tmp) / Path(r["name"]).name)
                out.append(ResultVolume(r["name"], read_volume(local), dict(r.get("meta") or {})))
        return out


__all__ = ["run_on_service"]
