"""Provenance and a machine-readable synthetic mark on every output (EU AI Act Art. 50(2)).

Every result a job writes carries :func:`job_provenance`: what made it (generator and version,
model id, revision and a sha256 of the weights), how (task, seed, sampler and steps, class, size
and spacing, the sha256 of each condition input, device, torch version, time, whether the decode
was exact) and ``"synthetic": true``. The one writer every front end uses
(:func:`MedDiffusionLib.data.volumes.write_volume`) puts it into the file:

* NIfTI: ``descrip`` starts with ``SYNTHETIC`` and names the generator and model; a BIDS-style
  JSON sidecar ``<name>.json`` next to it holds every field;
* NRRD / MHA: one key/value field per provenance field, with the same names (values JSON).

:func:`read_provenance` reads it back from any of them (``meddiffusion info FILE``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from . import __version__

GENERATOR = "MedDiffusion"
MARK = "SYNTHETIC"
NIFTI_DESCRIP_BYTES = 79  # the NIfTI-1 descrip field holds 80 bytes, the last one a NUL
KEY_PREFIX = "meddiffusion_"  # NRRD / MHA key names: KEY_PREFIX + field (no clash with the format's own)
MAX_PROVENANCE_BYTES = 64 * 1024  # what a reader accepts from a file (sidecars are small)


def sha256_of(array: Any) -> str:
    """sha256 of an array's bytes (C order) with its shape and dtype: the fingerprint of a
    condition input (the voxels a job read, whatever file they came from)."""
    import numpy as np

    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.shape}:{a.dtype};".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def job_provenance(spec: Any, meta: Mapping[str, Any], *, device: str, weights_sha256: str | None = None,
                   revision: str | None = None, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance of one result of ``spec`` (a resolved :class:`~MedDiffusionLib.jobspec.JobSpec`),
    from its ``meta`` (what the run recorded), the device it ran on, the weights' sha256 and the
    input volumes (``{name: Volume}``, hashed here). JSON-safe values only."""
    import torch

    p = spec.params
    decode = meta.get("decode") or {}
    out: dict[str, Any] = {
        "synthetic": True,
        "generator": GENERATOR,
        "generator_version": __version__,
        "model": meta.get("model") or spec.model,
        "model_revision": revision,
        "weights_sha256": weights_sha256,
        "controlnet": spec.controlnet,
        "task": spec.task,
        "seed": meta.get("seed", p.get("seed")),
        "sampler": meta.get("sampler", p.get("sampler")) if spec.task != "simulate-sparse-view" else None,
        "steps": meta.get("steps", p.get("steps")) if spec.task != "simulate-sparse-view" else None,
        "class": meta.get("class_index", p.get("class")),
        "size": list(p["size"]) if spec.task == "generate" and p.get("size") else None,
        "spacing": [float(v) for v in meta["spacing"]] if meta.get("spacing") else None,
        "units": meta.get("units"),
        "hu_window": list(meta["hu_window"]) if meta.get("hu_window") else None,
        "conditions_sha256": {name: sha256_of(vol.array) for name, vol in (inputs or {}).items()},
        "device": device,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "decode_exact": bool(decode["exact"]) if "exact" in decode else None,  # None: not recorded
        "decode_method": decode.get("method"),
        # the resolved request, for `meddiffusion reproduce` (inputs by name: their sha256 is above)
        "job": {"task": spec.task, "model": spec.model, "weights": spec.weights, "controlnet": spec.controlnet,
                "params": _plain(spec.params), "output_format": spec.output_format},
    }
    if spec.task == "simulate-sparse-view":
        out.update(views=p.get("views"), bins=p.get("bins"), seed=None)
    return out


def _plain(value: Any) -> Any:
    """A JSON-ready copy of nested mappings and sequences (the spec's read-only containers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def nifti_descrip(prov: Mapping[str, Any]) -> bytes:
    """The NIfTI ``descrip``: ``SYNTHETIC <generator> <version> <model> <task>``, at most 79 bytes."""
    words = [MARK, str(prov.get("generator", GENERATOR)), str(prov.get("generator_version", "")),
             str(prov.get("model") or prov.get("controlnet") or ""), str(prov.get("task") or "")]
    text = " ".join(w for w in words if w)
    return text.encode("ascii", "replace")[:NIFTI_DESCRIP_BYTES]


def sidecar_path(path: str | Path) -> Path:
    """The BIDS-style JSON sidecar of a volume file: ``a/b.nii.gz`` -> ``a/b.json``."""
    path = Path(path)
    name = path.name
    # data.volumes.SUFFIXES + DETACHED_SUFFIXES, written out: that module imports this one
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd"):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_name(name + ".json")


def write_sidecar(path: str | Path, prov: Mapping[str, Any]) -> Path:
    """Write the JSON sidecar of volume file ``path`` atomically; returns the sidecar's path."""
    from .io.atomic import atomic_write_text

    return atomic_write_text(sidecar_path(path), json.dumps(dict(prov), indent=1))


def metadata_fields(prov: Mapping[str, Any]) -> dict[str, str]:
    """NRRD / MHA key/value fields: one per provenance field, ``KEY_PREFIX + name`` -> JSON value."""
    return {KEY_PREFIX + k: json.dumps(v, separators=(",", ":")) for k, v in prov.items()}


def from_metadata_fields(fields: Mapping[str, str]) -> dict[str, Any] | None:
    """The inverse of :func:`metadata_fields` (``None`` when no field is there)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key.startswith(KEY_PREFIX):
            try:
                out[key[len(KEY_PREFIX):]] = json.loads(value)
            except (ValueError, TypeError):
                out[key[len(KEY_PREFIX):]] = value
    return out or None


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """A file's provenance: its JSON sidecar (NIfTI), its key/value fields (NRRD, MHA), else what
    the NIfTI ``descrip`` says (``{"synthetic": True, "descrip": ...}`` when it is marked);
    ``None`` for a file with no mark. Reads headers only, never follows a path in the file."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        side = sidecar_path(path)
        if side.is_file() and side.stat().st_size <= MAX_PROVENANCE_BYTES:
            doc = json.loads(side.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("generator") == GENERATOR:
                return doc
        import nibabel as nib

        descrip = bytes(nib.load(str(path)).header["descrip"]).split(b"\0")[0].decode("ascii", "replace")
        return {"synthetic": True, "descrip": descrip} if descrip.startswith(MARK) else None
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return from_metadata_fields({k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()})


def describe(prov: Mapping[str, Any]) -> str:
    """Lines for a person (``meddiffusion info``)."""
    lines = [f"{'SYNTHETIC' if prov.get('synthetic') else 'not marked synthetic'}: made by "
             f"{prov.get('generator', '?')} {prov.get('generator_version', '')}".rstrip()]
    for key, value in prov.items():
        if key not in ("synthetic", "generator", "generator_version") and value not in (None, {}, []):
            lines.append(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return "\n".join(lines)
