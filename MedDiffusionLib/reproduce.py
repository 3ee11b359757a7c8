"""``meddiffusion reproduce FILE``: re-run the job a result's provenance records and report how far
the new result is from the file.

The provenance (:mod:`MedDiffusionLib.provenance`) holds the resolved request (``job``: task,
model, ControlNet, every parameter, output format), which result of the job the file is
(``result``) and the sha256 of each condition input. :func:`reproduce` rebuilds the spec, checks
that the input volume given is the one recorded, runs the job in this process, writes the new
result the way the file was written (same format, so NRRD/NIfTI float32 or DICOM's int16
quantisation apply to both) and compares voxel by voxel. On the same device and kernels the two
are equal within the parity tolerance of the authors' DDIM loop (5e-3 in model units [-1, 1];
:data:`MODEL_UNITS_TOLERANCE`), scaled to HU for HU results.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UserError

# the parity tolerance of the authors' DDIM loop (Testing/parity.py, DDIM_LOOP), in model units [-1, 1]
MODEL_UNITS_TOLERANCE = 5e-3
DEFAULT_HU_WINDOW = (-1000.0, 1000.0)  # the paper's CT window, when a result does not record its own
SIMULATION_TOLERANCE_HU = 1e-2  # simulate-sparse-view is a deterministic FBP: float rounding only


@dataclass
class ReproduceReport:
    """How a re-run compares with the file: the largest and mean absolute voxel difference in the
    file's units, the tolerance they are held to, and notes (e.g. different weights)."""

    path: str
    result: str
    task: str
    units: str | None
    max_abs: float
    mean_abs: float
    tolerance: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.max_abs <= self.tolerance

    def text(self) -> str:
        unit = "HU" if self.units == "HU" else "(model units)" if self.units else ""
        verdict = "reproduced" if self.equal else "DIFFERENT"
        lines = [f"{verdict}: {self.path} ({self.task}, result {self.result}) re-run in {self.seconds:.1f} s",
                 f"  max |difference| {self.max_abs:.4g} {unit}, mean {self.mean_abs:.4g}; tolerance "
                 f"{self.tolerance:.4g} {unit}".rstrip()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def is_dicom_folder(path: str | Path) -> bool:
    return Path(path).is_dir()


def provenance_of(path: str | Path) -> dict[str, Any] | None:
    """A result's provenance: a DICOM series folder's private block, else what
    :func:`~MedDiffusionLib.provenance.read_provenance` reads (NIfTI sidecar, NRRD/MHA fields)."""
    path = Path(path)
    if is_dicom_folder(path):
        from .io.dicom import dicom_provenance

        return dicom_provenance(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    from .data.volumes import _suffix
    from .provenance import read_provenance

    _suffix(path)  # a volume format this library reads, else a UserError
    return read_provenance(path)


def read_result(path: str | Path) -> Any:
    """The volume of a result file or DICOM series folder."""
    if is_dicom_folder(path):
        from .io.dicom import read_dicom_series

        return read_dicom_series(path)
    from .data.volumes import read_volume

    return read_volume(path)


def _tolerance(prov: Mapping[str, Any]) -> float:
    if prov.get("task") == "simulate-sparse-view":
        return SIMULATION_TOLERANCE_HU
    if prov.get("units") == "HU":
        lo, hi = prov.get("hu_window") or DEFAULT_HU_WINDOW
        return MODEL_UNITS_TOLERANCE * (float(hi) - float(lo)) / 2.0
    return MODEL_UNITS_TOLERANCE


def recorded_spec(prov: Mapping[str, Any], device: str | None = None) -> Any:
    """The job spec a provenance records (``device`` replaces the recorded device)."""
    from .jobspec import TASK_PARAMS, JobSpec, as_request

    job = prov.get("job")
    if not isinstance(job, dict) or not isinstance(job.get("params"), dict) or job.get("task") not in TASK_PARAMS:
        raise UserError("the provenance records no job to re-run (a file marked by another tool or an older "
                        "MedDiffusion, or a NIfTI without its .json sidecar)")
    # the task's own parameters, as resolved (the others are what resolution filled in for it)
    return JobSpec.from_dict(dict(as_request(job, device), inputs={}))


def reproduce(path: str | Path, inputs: Mapping[str, str | Path] | None = None, device: str | None = None,
              progress: Callable[[Any], None] | None = None, cancel: Callable[[], bool] | None = None,
              keep: str | Path | None = None, client: Any = None) -> ReproduceReport:
    """Re-run the job recorded in ``path``'s provenance and compare the new result with the file.
    ``inputs`` maps input names (``input``) to the condition volumes the job read; each must have
    the recorded sha256. ``device`` overrides the recorded device. ``keep``: also write the new
    result there (same format). ``client``: run it on that job service instead of here. Raises
    ``UserError`` for a file without provenance, a missing or different input, a result the job
    does not make."""
    import time

    import numpy as np

    from .data.volumes import read_volume
    from .jobs import run_job
    from .provenance import sha256_of
    from .results import write_result

    t0 = time.monotonic()
    prov = provenance_of(path)
    if prov is None:
        raise UserError(f"{path}: no MedDiffusion provenance, nothing to reproduce (reproduce needs a result written by "
                        "MedDiffusion; a NIfTI needs its .json sidecar)")
    spec = recorded_spec(prov, device)
    from .jobspec import sample_batch

    if prov.get("sample_batch") is not None and prov["sample_batch"] != sample_batch(spec.params):
        raise UserError(f"this sample was drawn in batches of {prov['sample_batch']}; this MedDiffusion draws "
                        f"{sample_batch(spec.params)} at a time, so it cannot draw the same noise again")
    recorded = prov.get("conditions_sha256") or {}
    given = dict(inputs or {})
    vols: dict[str, Any] = {}
    for name, digest in recorded.items():
        if name not in given:
            raise UserError(f"this {spec.task} result was made from an input volume ({name}, sha256 {str(digest)[:12]}...); "
                            "give it with --input FILE")
        vol = read_volume(given[name])
        if sha256_of(vol.array) != digest:
            raise UserError(f"--input {given[name]} is not the volume this result was made from (its voxels' sha256 is "
                            f"{sha256_of(vol.array)[:12]}..., the provenance records {str(digest)[:12]}...)")
        vols[name] = vol
    extra = sorted(set(given) - set(recorded))
    if extra:
        raise UserError(f"this {spec.task} result was made from no input named {', '.join(extra)}")
    spec = spec.with_inputs({name: name for name in vols})
    wanted = prov.get("result")
    if client is not None:
        from .remote import run_on_service

        new = run_on_service(client, spec.to_dict(), {name: given[name] for name in vols}, wanted,
                             first_only=True)[0]
    else:
        res = run_job(spec, vols, progress=progress, cancel=cancel)
        match = [r for r in res.results if r.name == wanted] if wanted else res.results[:1]
        if not match:
            raise UserError(f"the re-run job made {', '.join(r.name for r in res.results)}, not {wanted!r}")
        new = match[0]
    notes = []
    for key in ("weights_sha256", "device", "torch_version", "generator_version"):
        was, now = prov.get(key), (new.meta.get("provenance") or {}).get(key)
        if was is not None and now is not None and was != now:
            notes.append(f"{key} differs: recorded {was}, now {now}" +
                         (" (the model's weights changed)" if key == "weights_sha256" else ""))
    fmt = "dicom" if is_dicom_folder(path) else None
    name = Path(path).name
    with tempfile.TemporaryDirectory(prefix="meddiffusion-reproduce-") as tmp:
        # written and read back the way the file was: both sides carry the format's rounding
        out = write_result(new, Path(tmp) / (name if fmt is None else "series"), True, fmt)
        fresh = read_result(out).array.astype(np.float64)
        if keep is not None:
            write_result(new, keep, False, fmt)
    old = read_result(path).array.astype(np.float64)
    if old.shape != fresh.shape:
        raise UserError(f"the re-run result has shape {fresh.shape}, the file {old.shape}: not the same result")
    diff = np.abs(old - fresh)
    return ReproduceReport(str(path), new.name, spec.task, prov.get("units"), float(diff.max(initial=0.0)),
                           float(diff.mean()) if diff.size else 0.0, _tolerance(prov), time.monotonic() - t0, notes)
