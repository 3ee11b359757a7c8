"""The job API shared by every front end: the CLI, the Python API, the job service and Slicer.

A job is a JSON-serialisable :class:`JobSpec`: a task, a model (and ControlNet), parameters and
named input volumes. :func:`resolve` is the *one* place where unset parameters get their defaults
(class, size, spacing, sampler, steps, HU window, ...) and where a bad request is refused with a
:class:`~MedDiffusionLib.errors.UserError`. :func:`run_job` runs a resolved spec in this process,
reporting :class:`ProgressEvent` s (loading weights / sampling / decoding / writing, with step,
total and ETA) and stopping between sampler steps when ``cancel()`` turns true. It returns the
result volumes with their geometry and metadata; writing them is the caller's business
(:func:`write_results` writes atomically).

Tasks:

* ``generate``: class-conditional volumes from noise (no inputs).
* ``synthesize``: a label map (input ``input``) -> CT, with a ``labels`` ControlNet.
* ``reconstruct``: a sparse-view FBP volume (HU) or a zero-filled under-sampled MRI (input
  ``input``) with a ``sparse-view`` or ``mri`` ControlNet; the ControlNet's own metadata says which.
* ``simulate-sparse-view``: full CT (HU) -> FBP of a sparse fan-beam scan.
"""
from __future__ import annotations

import math
import numbers
import os
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ResourceError, UserError

TASKS = ("generate", "synthesize", "reconstruct", "simulate-sparse-view")
MODES = ("fast", "reference")
PRECISIONS = ("fp32", "bf16", "fp16")
TILINGS = ("auto", "exact", "official", "seamless")
SAMPLERS = ("ddpm", "ddim", "dpm++")
# controlled tasks: the ControlNet task(s) each front-door task accepts
CONTROLNET_TASKS = {"synthesize": ("labels",), "reconstruct": ("sparse-view", "mri")}
CONTROLLED_DEFAULTS = {"sampler": "ddim", "steps": 50}
OUTPUT_FORMATS = (".nrrd", ".nii.gz", ".nii", ".mha")
SPEC_FIELDS = ("task", "model", "weights", "controlnet", "params", "inputs", "output_format")

PARAM_DEFAULTS: dict[str, Any] = {
    "class": None, "size": None, "spacing": None, "seed": 0, "sampler": None, "steps": None, "num_volumes": 1,
    "hu": False, "hu_window": None, "device": "auto", "mode": "fast", "precision": "fp32", "tiling": "auto",
    "max_memory_gb": None, "compile": False, "views": 40, "bins": 512, "preview_every": 0, "force": False,
}
INPUT_TASKS = {"synthesize": "a label map", "reconstruct": "an FBP (HU) or zero-filled MRI volume",
               "simulate-sparse-view": "a CT volume in HU"}

# -- absolute limits: every front end (CLI, Python API, job service); a service's Caps come on top ------------
MAX_SEED = 2 ** 62            # seed + volume index must fit torch.manual_seed
MAX_VOLUMES = 64              # volumes of one batch
MAX_STEPS = 1000              # sampler steps (the released schedules have 1000 timesteps)
VIEWS_RANGE = (2, 3600)       # fan-beam views of simulate-sparse-view
BINS_RANGE = (16, 8192)       # detector bins of simulate-sparse-view
MAX_PREVIEW_EVERY = 1000
MAX_SIDE = 4096               # voxels per side of an output or working grid (legal sizes are checked later)
SPACING_RANGE_MM = (1e-6, 1e6)
MAX_ABS_HU = 1e6              # HU window bounds
MAX_MEMORY_GB = 1e6
MAX_CLASS_CHARS = 64
MAX_ID_CHARS = 128            # model and ControlNet ids
MAX_WEIGHTS_CHARS = 4096      # a local weights folder (in-process runs only)
MAX_DEVICE_CHARS = 16
MAX_CUDA_INDEX = 31
MAX_INPUTS = 4
MAX_NAME_CHARS = 255          # input names and input file names
DEVICE_PATTERN = r"^(auto|cpu|cuda(:([0-9]|[12][0-9]|3[01]))?)$"
_DEVICE_RE = re.compile(DEVICE_PATTERN)
SHOW_CHARS = 40               # at most this much of a client's value is quoted back in a message


@dataclass(frozen=True)
class Caps:
    """Limits a job service's admin sets, on top of the absolute limits above (``None``: no cap).

    Defaults: ``max_voxels`` 512**3 (134 M) voxels per output volume or model working grid (every
    trained size of the released models fits, 512^3 included); ``max_batch_voxels`` 512**3 voxels
    per job (size voxels x num_volumes: one 512^3 volume or eight 256^3); ``max_input_voxels``
    512*512*1024 (268 M) voxels per input volume (1 GiB as float32: a thin-slice clinical CT);
    ``max_volumes`` 8 per job; ``max_steps`` 1000 (the released models' DDPM default runs 1000);
    ``max_views`` 720 and ``max_bins`` 2048 for simulate-sparse-view; ``job_time_limit_s`` 6 h
    (enforced by the service, not by :func:`resolve`)."""

    max_voxels: int | None = 512 ** 3
    max_batch_voxels: int | None = 512 ** 3
    max_input_voxels: int | None = 512 * 512 * 1024
    max_volumes: int | None = 8
    max_steps: int | None = 1000
    max_views: int | None = 720
    max_bins: int | None = 2048
    job_time_limit_s: float | None = 6 * 3600.0

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_batch_voxels", "max_input_voxels", "max_volumes", "max_steps", "max_views",
                     "max_bins"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Caps.{name} must be a positive integer or None, got {value!r}")
        t = self.job_time_limit_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise ValueError(f"Caps.job_time_limit_s must be a positive number of seconds or None, got {t!r}")


def show(value: Any, limit: int = SHOW_CHARS) -> str:
    """A short, one-line repr of a client's value for a message (never more than ``limit`` + 1 characters)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit integer"
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
        text = repr(value)[:-1] + "…" + repr(value)[-1]
    else:
        import reprlib

        r = reprlib.Repr()
        r.maxstring, r.maxother, r.maxlist, r.maxtuple, r.maxdict, r.maxlevel = limit, limit, 4, 4, 4, 2
        text = r.repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _names(values: Sequence[Any], limit: int = 5) -> str:
    items = [show(v, 30) for v in list(values)[:limit]]
    return ", ".join(items) + (f" and {len(values) - limit} more" if len(values) > limit else "")


@dataclass
class JobSpec:
    """What to run. ``inputs`` maps input names (``"input"``) to file names (uploads) or paths
    (in-process runs only); ``weights`` (a local folder) is accepted only in-process, never by the
    job service."""

    task: str
    model: str | None = None
    weights: str | None = None
    controlnet: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    output_format: str = ".nrrd"

    @classmethod
    def from_dict(cls, doc: Any) -> "JobSpec":
        """Validate the shape of a JSON spec (unknown keys and wrong types are refused). The job
        service validates with :mod:`MedDiffusionLib.schema` first; this is the in-process door."""
        if not isinstance(doc, dict):
            raise UserError("the job spec must be a JSON object")
        unknown = sorted(set(doc) - set(SPEC_FIELDS), key=str)
        if unknown:
            raise UserError(f"unknown job spec field(s): {_names(unknown)}; known: {', '.join(SPEC_FIELDS)}")
        task = doc.get("task")
        if task not in TASKS:
            raise UserError(f"unknown task {show(task)}; use one of {', '.join(TASKS)}")
        params = doc.get("params") or {}
        inputs = doc.get("inputs") or {}
        if not isinstance(params, dict) or not isinstance(inputs, dict):
            raise UserError("'params' and 'inputs' must be JSON objects")
        bad = sorted(set(params) - set(PARAM_DEFAULTS), key=str)
        if bad:
            raise UserError(f"unknown parameter(s): {_names(bad)}; known: {', '.join(PARAM_DEFAULTS)}")
        for key in ("model", "weights", "controlnet"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise UserError(f"'{key}' must be a string")
        fmt = doc.get("output_format") or ".nrrd"
        if fmt not in OUTPUT_FORMATS:
            raise UserError(f"unknown output format {show(fmt)}; use one of {', '.join(OUTPUT_FORMATS)}")
        if len(inputs) > MAX_INPUTS:
            raise UserError(f"a job takes at most {MAX_INPUTS} inputs, got {len(inputs)}")
        for k, v in inputs.items():  # file names (uploads) or, in-process, paths
            if not isinstance(k, str) or len(k) > MAX_NAME_CHARS or not isinstance(v, (str, os.PathLike)) or \
                    len(os.fspath(v)) > MAX_WEIGHTS_CHARS:
                raise UserError(f"'inputs' maps input names (at most {MAX_NAME_CHARS} characters) to file names")
        return cls(task, doc.get("model"), doc.get("weights"), doc.get("controlnet"), dict(params),
                   {k: str(os.fspath(v)) for k, v in inputs.items()}, fmt)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- defaults: the one resolver ---------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    """A real number that is not a boolean (numpy scalars count)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _is_whole(value: Any) -> bool:
    """An integer, or a finite float with no fraction (3.0); not a boolean, string, 3.5 or NaN."""
    if not _is_number(value):
        return False
    if isinstance(value, numbers.Integral):
        return True
    try:
        f = float(value)
    except OverflowError:
        return False
    return math.isfinite(f) and f.is_integer()


def _whole(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (a whole float such as 3.0 counts; booleans, strings, 3.5, NaN do not) within [lo, hi]."""
    if not _is_whole(value):
        raise UserError(f"{what} must be an integer, got {show(value)}")
    value = int(value)
    if lo is not None and value < lo:
        raise UserError(f"{what} must be {'positive' if lo == 1 else f'at least {lo}'}, got {show(value)}")
    if hi is not None and value > hi:
        raise UserError(f"{what} must be at most {hi}, got {show(value)}")
    return value


def _finite(value: Any, what: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite number (not a boolean, not NaN or infinite) within [lo, hi] (``lo_open``: above lo)."""
    if not _is_number(value):
        raise UserError(f"{what} must be a number, got {show(value)}")
    try:
        out = float(value)
    except OverflowError:  # an int beyond the float range
        raise UserError(f"{what} is out of range, got {show(value)}") from None
    if not math.isfinite(out):
        raise UserError(f"{what} must be a finite number, got {out}")
    if lo is not None and (out <= lo if lo_open else out < lo):
        raise UserError(f"{what} must be {'positive' if lo_open and lo == 0 else f'at least {lo:g}'}, got {out:g}")
    if hi is not None and out > hi:
        raise UserError(f"{what} must be at most {hi:g}, got {out:g}")
    return out


def _triple(value: Any, what: str, kind: type) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise UserError(f"{what} must be three numbers X Y Z, got {show(value)}")
    if kind is int:
        if not all(_is_whole(v) for v in value):
            raise UserError(f"{what} must be whole numbers, got {show(value)}")
        out = [int(v) for v in value]
        if any(v < 1 for v in out):
            raise UserError(f"{what} must be three positive integers X Y Z, got {show(out)}")
        if any(v > MAX_SIDE for v in out):
            raise UserError(f"{what} must be at most {MAX_SIDE} voxels per side, got {show(out)}")
        return out
    lo, hi = SPACING_RANGE_MM
    out = []
    for v in value:
        if not _is_number(v):
            raise UserError(f"{what} must be three numbers X Y Z, got {show(value)}")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            raise UserError(f"{what} must be finite numbers, got {show(value)}")
        out.append(f)
    if any(v <= 0 for v in out):
        raise UserError(f"{what} must be positive, got {show(out)}")
    if any(v < lo or v > hi for v in out):
        raise UserError(f"{what} must be between {lo:g} and {hi:g} mm, got {show(out)}")
    return out


def resolve_sampling(sampler: str | None, steps: int | None, defaults: dict[str, Any] | None = None,
                     num_timesteps: int = 1000) -> tuple[str, int]:
    """Sampler and number of steps actually run (:func:`MedDiffusionLib.schedulers.resolve_sampling`)."""
    from .schedulers.samplers import resolve_sampling as resolve

    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        raise UserError(f"unknown sampler {show(sampler)}; use {', '.join(SAMPLERS)}")
    if steps is not None:
        steps = _whole(steps, "the number of sampler steps", 1, MAX_STEPS)
    return resolve(sampler, steps, defaults, num_timesteps)


def _class_value(value: Any) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_CLASS_CHARS:
            raise UserError(f"the class name is too long ({len(value)} characters; at most {MAX_CLASS_CHARS})")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"the class must be an index or a name, got {show(value)}")
    if abs(int(value)) > 2 ** 31:
        raise UserError(f"unknown class {show(int(value))}")
    return int(value)


def generation_defaults(entry: Any, class_: int | str | None, size: Sequence[int] | None,
                        spacing: Sequence[float] | None, sampler: str | None, steps: int | None,
                        num_timesteps: int = 1000) -> dict[str, Any]:
    """Class, size, spacing, sampler and steps of a generation run, unset ones from the model's
    registry entry (``entry``; ``None`` for a weights folder, which then needs size and spacing).
    Used by :func:`resolve` and by ``GenerationPipeline.generate``."""
    from .registry import parse_class

    defaults = entry.sampling_defaults if entry is not None else {}
    class_ = _class_value(class_)
    size = _triple(size, "size", int) if size is not None else None
    spacing = _triple(spacing, "spacing", float) if spacing is not None else None
    cls = parse_class(class_ if class_ is not None else (entry.default_class if entry is not None else 1), entry)
    if entry is not None:
        d_size, d_spacing = entry.default_size(cls)
        size, spacing = size or list(d_size), spacing or list(d_spacing)
        check_size(size, entry.compression)
    elif size is None or spacing is None:
        raise UserError("size and spacing are required with a weights folder (the model's trained sizes are unknown)")
    sampler, steps = resolve_sampling(sampler, steps, defaults, num_timesteps)
    return {"class": cls, "size": size, "spacing": spacing, "sampler": sampler, "steps": steps}


def _check_params(p: dict[str, Any]) -> None:
    """Types and absolute ranges of every parameter, whatever the task (in place: whole floats
    become ints)."""
    for key in ("hu", "force", "compile"):
        if not isinstance(p[key], bool):
            raise UserError(f"{key} must be true or false, got {show(p[key])}")
    p["seed"] = _whole(p["seed"], "the seed", -MAX_SEED, MAX_SEED)
    p["preview_every"] = _whole(p["preview_every"], "preview_every", 0, MAX_PREVIEW_EVERY)
    p["num_volumes"] = _whole(p["num_volumes"], "the number of volumes", 1, MAX_VOLUMES)
    p["views"] = _whole(p["views"], "the number of views", *VIEWS_RANGE)
    p["bins"] = _whole(p["bins"], "the number of detector bins", *BINS_RANGE)
    if p["steps"] is not None:
        p["steps"] = _whole(p["steps"], "the number of sampler steps", 1, MAX_STEPS)
    if p["sampler"] is not None and (not isinstance(p["sampler"], str) or p["sampler"] not in SAMPLERS):
        raise UserError(f"unknown sampler {show(p['sampler'])}; use {', '.join(SAMPLERS)}")
    for key, allowed in (("mode", MODES), ("precision", PRECISIONS), ("tiling", TILINGS)):
        if not isinstance(p[key], str) or p[key] not in allowed:
            raise UserError(f"unknown {key} {show(p[key])}; use {', '.join(allowed)}")
    dev = p["device"]
    if not isinstance(dev, str) or len(dev) > MAX_DEVICE_CHARS or not _DEVICE_RE.match(dev):
        raise UserError(f"unknown device {show(dev)}; use auto, cpu, cuda or cuda:N (N from 0 to {MAX_CUDA_INDEX})")
    if p["max_memory_gb"] is not None:
        p["max_memory_gb"] = _finite(p["max_memory_gb"], "the memory limit", 0, MAX_MEMORY_GB,
                                     lo_open=True)
    _class_value(p["class"])
    if p["size"] is not None:
        p["size"] = _triple(p["size"], "size", int)
    if p["spacing"] is not None:
        p["spacing"] = _triple(p["spacing"], "spacing", float)
    if p["hu_window"] is not None:
        p["hu_window"] = _pair(p["hu_window"], "the HU window")


def _check_spec_strings(spec: JobSpec) -> None:
    for key, limit in (("model", MAX_ID_CHARS), ("controlnet", MAX_ID_CHARS), ("weights", MAX_WEIGHTS_CHARS)):
        value = getattr(spec, key)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise UserError(f"'{key}' must be a string of at most {limit} characters")
    if spec.task not in TASKS:
        raise UserError(f"unknown task {show(spec.task)}; use one of {', '.join(TASKS)}")
    if spec.output_format not in OUTPUT_FORMATS:
        raise UserError(f"unknown output format {show(spec.output_format)}; use one of {', '.join(OUTPUT_FORMATS)}")
    if not isinstance(spec.params, dict) or not isinstance(spec.inputs, dict):
        raise UserError("'params' and 'inputs' must be JSON objects")
    bad = sorted(set(spec.params) - set(PARAM_DEFAULTS), key=str)
    if bad:
        raise UserError(f"unknown parameter(s): {_names(bad)}; known: {', '.join(PARAM_DEFAULTS)}")
    if len(spec.inputs) > MAX_INPUTS:
        raise UserError(f"a job takes at most {MAX_INPUTS} inputs, got {len(spec.inputs)}")
    for k, v in spec.inputs.items():
        if not isinstance(k, str) or len(k) > MAX_NAME_CHARS or len(str(v)) > MAX_WEIGHTS_CHARS:
            raise UserError(f"input names are strings of at most {MAX_NAME_CHARS} characters")


def _model_entry(model_id: str | None) -> Any:
    from .registry import RegistryError, get_model, models

    try:
        return get_model(model_id)
    except RegistryError:
        if model_id is None:
            raise
        raise UserError(f"unknown model id {show(model_id)}; available: {', '.join(m.id for m in models())}") from None


def _check_caps(spec: JobSpec, caps: "Caps | None") -> None:
    """The service admin's caps on a resolved spec."""
    if caps is None:
        return
    p = spec.params
    if caps.max_steps is not None and p.get("steps") and spec.task != "simulate-sparse-view" \
            and p["steps"] > caps.max_steps:
        if p["sampler"] == "ddpm":
            raise UserError(f"the DDPM sampler runs {p['steps']} steps but this server allows at most {caps.max_steps} "
                            f"per job; choose the ddim or dpm++ sampler with at most {caps.max_steps} steps")
        raise UserError(f"this server allows at most {caps.max_steps} sampler steps per job, got {p['steps']}")
    if spec.task == "simulate-sparse-view":
        if caps.max_views is not None and p["views"] > caps.max_views:
            raise UserError(f"this server simulates at most {caps.max_views} views, got {p['views']}")
        if caps.max_bins is not None and p["bins"] > caps.max_bins:
            raise UserError(f"this server simulates at most {caps.max_bins} detector bins, got {p['bins']}")
    if spec.task != "generate":
        return
    voxels = math.prod(p["size"])
    if caps.max_volumes is not None and p["num_volumes"] > caps.max_volumes:
        raise UserError(f"this server generates at most {caps.max_volumes} volumes per job, got {p['num_volumes']}")
    if caps.max_voxels is not None and voxels > caps.max_voxels:
        raise UserError(f"size {'x'.join(map(str, p['size']))} ({voxels} voxels) is larger than this server allows "
                        f"({caps.max_voxels} voxels per volume)")
    if caps.max_batch_voxels is not None and voxels * p["num_volumes"] > caps.max_batch_voxels:
        raise UserError(f"{p['num_volumes']} volumes of {'x'.join(map(str, p['size']))} ({voxels * p['num_volumes']} "
                        f"voxels) are more than this server allows in one job ({caps.max_batch_voxels} voxels); "
                        "ask for fewer volumes or a smaller size")


def resolve(spec: JobSpec | dict, service: bool = False, caps: Caps | None = None) -> JobSpec:
    """Fill every unset parameter and validate the request; return a new, fully resolved spec.

    Every parameter is checked for type and absolute range (finite numbers, bounded integers,
    known names; see the ``MAX_*`` limits) before anything else runs. ``service=True`` (the job
    service) refuses local paths: ``weights`` folders and ControlNet files that are not bundled or
    registered names. ``caps`` (a service's :class:`Caps`) bounds steps, volumes, voxels, views
    and bins on top."""
    from .registry import class_names

    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    _check_spec_strings(spec)
    p = dict(PARAM_DEFAULTS)
    p.update({k: v for k, v in spec.params.items() if v is not None or k in ("class", "size", "spacing")})
    _check_params(p)
    if service and spec.weights:
        raise UserError("the job service does not open local paths: choose a model by its registry id, not a "
                        "weights folder")
    needed = INPUT_TASKS.get(spec.task)
    if needed and "input" not in spec.inputs:
        raise UserError(f"task {spec.task!r} needs an input volume ({needed}) named 'input'")
    if not needed and spec.inputs:
        raise UserError(f"task {spec.task!r} takes no input volumes")
    extra = sorted(set(spec.inputs) - {"input"})
    if extra:
        raise UserError(f"unknown input name(s) {_names(extra)}; task {spec.task!r} takes one input named 'input'")
    out = JobSpec(spec.task, spec.model, spec.weights, spec.controlnet, p, dict(spec.inputs), spec.output_format)

    if spec.task == "simulate-sparse-view":
        if p["device"] == "auto":
            p["device"] = "cpu"
        _check_caps(out, caps)
        return out

    if spec.task in CONTROLNET_TASKS:
        meta = controlnet_meta(spec.controlnet, service)
        if meta.get("task") not in CONTROLNET_TASKS[spec.task]:
            raise UserError(f"this ControlNet was trained for {show(meta.get('task'))}, not "
                            f"{' or '.join(CONTROLNET_TASKS[spec.task])} ({spec.task})")
        out.model = spec.model or (None if spec.weights else meta.get("base_model"))
        if out.model:
            _model_entry(out.model)
        sampler = p["sampler"] or CONTROLLED_DEFAULTS["sampler"]
        p["sampler"], p["steps"] = resolve_sampling(sampler, p["steps"], CONTROLLED_DEFAULTS)
        p["class"] = int(meta.get("class", 1))
        for key in ("size", "spacing", "hu_window"):
            if spec.params.get(key) is not None:
                raise UserError(f"{key} is not a parameter of {spec.task}: the result comes back on the input's grid")
        _check_caps(out, caps)
        return out

    # generate
    entry = _model_entry(spec.model) if (spec.model or not spec.weights) else None
    out.model = entry.id if entry else None
    p.update(generation_defaults(entry, p["class"], p["size"], p["spacing"], p["sampler"], p["steps"]))
    window = p["hu_window"]
    if p["hu"] and window is None:
        info = entry.class_info(p["class"]) if entry else {}
        if not info.get("hu_window"):
            raise UserError("this model has no suggested HU window for that class; give one (hu_window LO HI; "
                            "--hu-window LO HI on the command line)")
        window = info["hu_window"]
    if window is not None:
        window = _pair(window, "the HU window")
        if not class_names()[p["class"]].startswith("CT"):
            raise UserError(f"an HU window applies to CT classes only; class {p['class']} is "
                            f"{class_names()[p['class']]}")
        if window[1] <= window[0]:
            raise UserError(f"the HU window needs LO < HI, got {window}")
    p["hu_window"] = window
    _check_caps(out, caps)
    return out


def _pair(value: Any, what: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise UserError(f"{what} must be two numbers LO HI, got {show(value)}")
    return [_finite(v, what, -MAX_ABS_HU, MAX_ABS_HU) for v in value]


def check_size(size_xyz: Sequence[int], compression: int) -> tuple[int, int, int]:
    """Legal output size for a model of this compression (:func:`MedDiffusionLib.data.grid.legal_size`)."""
    from .data.grid import legal_size

    return legal_size(size_xyz, compression)


def controlnet_meta(name: str | None, service: bool = False) -> dict[str, Any]:
    """The ``meta`` of a ControlNet (bundled name, or a file path in-process)."""
    from .io.checkpoints import read_model_config
    from .weights import resolve_controlnet

    if not name:
        raise UserError("this task needs a ControlNet (e.g. chest-ct-mini-labels or chest-ct-mini-sparse-view)")
    path = bundled_controlnet(name)
    if path is None and service:
        raise UserError(f"unknown ControlNet {show(name)}; the job service offers "
                        f"{', '.join(c['name'] for c in named_controlnets()) or 'none'} (it never opens local paths)")
    return read_model_config(path or resolve_controlnet(name)).get("meta", {})


CONTROLNET_DIRS_ENV = "MEDDIFFUSION_CONTROLNET_DIRS"


def controlnet_dirs() -> list[Path]:
    """Folders whose sub-folders hold named ControlNets (``NAME/controlnet.safetensors``): the bundled
    ones, then those in ``$MEDDIFFUSION_CONTROLNET_DIRS`` (``meddiffusion serve --controlnet-dir``)."""
    import os

    from .registry import RESOURCES

    extra = [Path(d).expanduser() for d in os.environ.get(CONTROLNET_DIRS_ENV, "").split(os.pathsep) if d]
    return [RESOURCES / "models", *extra]


def bundled_controlnet(name: str) -> Path | None:
    """The file of the named ControlNet (bundled or in a configured folder), else ``None``. Never
    looks at the working folder or at paths: names only."""
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        return None
    for folder in controlnet_dirs():
        path = folder / name / "controlnet.safetensors"
        if path.exists():
            return path
    return None


def named_controlnets() -> list[dict[str, Any]]:
    """Every named ControlNet with its task, base model, class and hint (for health and the Slicer panel)."""
    import json

    out, seen = [], set()
    for folder in controlnet_dirs():
        if not folder.is_dir():
            continue
        for d in sorted(folder.iterdir()):
            cfg = d / "controlnet.json"
            if d.name in seen or not cfg.exists():
                continue
            seen.add(d.name)
            meta = json.loads(cfg.read_text()).get("meta", {})
            item = {"name": d.name, "task": meta.get("task"), "base_model": meta.get("base_model"),
                    "class": meta.get("class")}
            if meta.get("hint", {}).get("type") == "labels":
                item["label_values"] = meta["hint"].get("values")
            if meta.get("hu_window"):
                item["hu_window"] = meta["hu_window"]
            out.append(item)
    return out


# -- progress ---------------------------------------------------------------------------------------------
PHASES = ("queued", "loading", "sampling", "decoding", "writing", "done")


@dataclass
class ProgressEvent:
    phase: str
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    message: str = ""
    notice: str | None = None  # a one-off line for the user (estimate, warning), printed by front ends


class _Progress:
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


# -- models kept loaded between jobs --------------------------------------------------------------------------
def _memory_limit(p: dict[str, Any]) -> float | None:
    return None if p["max_memory_gb"] is None else float(p["max_memory_gb"]) * 2 ** 30


class ModelCache:
    """Pipelines kept between jobs, keyed by what they were built from, at most ``max_pipelines``
    of them: using a key makes it the most recently used; loading one more than that drops the
    least recently used first (and gives its memory back, as :meth:`clear` does), so no more than
    ``max_pipelines`` are ever held. ``loads`` counts weight loads."""

    def __init__(self, max_pipelines: int = 2) -> None:
        if int(max_pipelines) < 1:
            raise ValueError(f"max_pipelines must be at least 1, got {max_pipelines}")
        self.max_pipelines = int(max_pipelines)
        self._pipes: OrderedDict[tuple, Any] = OrderedDict()
        self.loads = 0

    def keys(self) -> list[str]:
        return [":".join(str(k) for k in key if k is not None) for key in self._pipes]

    def _get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        if len(self._pipes) >= self.max_pipelines:
            # drop the least recently used before loading, so at most max_pipelines are ever held
            while len(self._pipes) >= self.max_pipelines:
                self._pipes.popitem(last=False)
            self._release_memory()
        self.loads += 1
        pipe = load()
        self._pipes[key] = pipe
        return pipe

    def generation(self, spec: JobSpec, device: str) -> Any:
        from .pipelines.generation import GenerationPipeline

        p = spec.params
        key = ("generate", spec.model, spec.weights, device, p["mode"], p["precision"], p["compile"])
        pipe = self._get(key, lambda: GenerationPipeline.from_pretrained(spec.model, spec.weights, device=device,
                                                                         precision=p["precision"], mode=p["mode"],
                                                                         compile=p["compile"]))
        pipe.memory_limit_bytes = _memory_limit(p)
        return pipe

    def controlled(self, spec: JobSpec, device: str) -> Any:
        from .pipelines.conditioned import ControlledPipeline

        p = spec.params
        key = ("controlnet", spec.controlnet, spec.model, spec.weights, device, p["mode"], p["precision"], p["compile"])
        pipe = self._get(key, lambda: ControlledPipeline.from_files(
            bundled_controlnet(spec.controlnet) or spec.controlnet, spec.model, spec.weights, device=device,
            mode=p["mode"], precision=p["precision"], compile=p["compile"]))
        pipe.base.memory_limit_bytes = _memory_limit(p)
        return pipe

    def clear(self) -> list[str]:
        """Drop every pipeline and give cached GPU memory back to the driver."""
        names = self.keys()
        self._pipes.clear()
        self._release_memory()
        return names

    @staticmethod
    def _release_memory() -> None:
        """``gc.collect()`` and, with CUDA, hand the allocator's cached blocks back to the driver."""
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


# -- running ------------------------------------------------------------------------------------------------
@dataclass
class ResultVolume:
    name: str
    volume: Any  # data.volumes.Volume
    meta: dict[str, Any]


@dataclass
class JobResult:
    spec: JobSpec
    results: list[ResultVolume]
    seconds: float
    warnings: list[str] = field(default_factory=list)


def result_names(spec: JobSpec) -> list[str]:
    n = spec.params.get("num_volumes", 1) if spec.task == "generate" else 1
    return [f"result_{i}{spec.output_format}" for i in range(n)]


def check_memory(spec: JobSpec, device: str, pipe: Any, inputs: dict[str, Any] | None = None) -> Any:
    """Refuse a run whose estimated peak memory exceeds what is available (unless ``force``).

    Counts the pipeline's estimate (``pipe.estimate(size, steps, volumes)``: weights, sampler and
    decode) plus the arrays held in RAM: the input volume(s) as read and their working copies, and
    the result volume(s) (:func:`array_bytes`). Generation uses the requested size and number of
    volumes, the controlled tasks the model's working grid for the input (:func:`working_size`);
    simulate-sparse-view (``pipe=None``) the fan-beam operator's own peak. On a GPU the device part
    is checked against GPU memory and the arrays against RAM. Returns the pipeline's estimate (on
    the CPU with the arrays added to ``peak_bytes``), ``None`` for simulate-sparse-view."""
    from .estimate import available_memory_bytes

    p = spec.params
    vols = [v for v in (inputs or {}).values() if hasattr(v, "array")]
    cuda = device.startswith("cuda")
    est = None
    host = array_bytes(spec, vols)
    if spec.task == "simulate-sparse-view":
        from .operators.fanbeam import simulate_peak_bytes

        dev = 0.0
        for vol in vols:
            (rows, cols), _, slices = _axial_geometry(vol)
            dev = max(dev, simulate_peak_bytes((rows, cols), slices, p["views"], p["bins"]))
        advice = "choose fewer views or detector bins, or a smaller input"
    else:
        if spec.task == "generate":
            size, volumes = p["size"], p["num_volumes"]
            advice = "choose a smaller size or fewer volumes"
        else:
            if not vols:
                raise UserError(f"task {spec.task!r} needs its input volume to estimate its memory")
            size, volumes = working_size(vols[0], pipe.working_spacing(), pipe.compression), 1
            advice = "crop or downsample the input"
        est = pipe.estimate(size, p["steps"], volumes)
        dev = float(est.peak_bytes)
        if cuda:
            host += float(getattr(est, "host_bytes", 0.0) or 0.0)
    checks = [(dev, device), (host, "cpu")] if cuda else [(dev + host, "cpu")]
    for need, where in checks:
        avail = available_memory_bytes(where)
        if not p["force"] and avail is not None and need > avail:
            raise ResourceError(f"this run needs about {need / 2 ** 30:.1f} GB of "
                                f"{'GPU memory' if where.startswith('cuda') else 'RAM'} but only "
                                f"{avail / 2 ** 30:.1f} GB is available; {advice} (or force it: force=true, "
                                "--force on the command line)")
    if est is not None and not cuda and host:
        from dataclasses import is_dataclass

        if is_dataclass(est):
            est = replace(est, peak_bytes=est.peak_bytes + host)
    return est


def array_bytes(spec: JobSpec, vols: Sequence[Any] = ()) -> float:
    """Bytes of the volumes a job holds in RAM besides the pipeline's own memory (approximate):
    each input as read plus three working copies (re-oriented, network order, float32 / int64
    labels), and the results as float32 (generation: two copies per volume, the decoded array and
    the returned volume; the other tasks: three, resampling back onto the input's grid)."""
    p = spec.params
    if spec.task == "generate":
        return 2.0 * 4 * math.prod(p["size"]) * p["num_volumes"]
    total = 0.0
    for vol in vols:
        arr = vol.array
        n = float(arr.size)
        nbytes = float(arr.nbytes)
        if spec.task == "synthesize":  # labels are rounded to int64 before the copies
            total += nbytes + 3 * 8 * n
        else:
            total += 3 * nbytes + 4 * n
        total += 3 * 4 * n  # result (float32) and its copies on the way back to the input's grid
    return total


def _canonical_grid(vol: Any) -> tuple[list[int], list[float]]:
    """Shape and spacing of ``vol`` in the closest canonical (RAS) orientation, as the pipelines
    see it, without copying the array."""
    import nibabel as nib
    import numpy as np

    ornt = nib.orientations.io_orientation(np.asarray(vol.affine, dtype=np.float64))
    if not np.isfinite(ornt).all():
        raise UserError("the input's orientation (direction matrix) is degenerate")
    shape, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (out_axis, _) in enumerate(ornt):
        shape[int(out_axis)], spacing[int(out_axis)] = vol.shape[axis], vol.spacing[axis]
    return shape, spacing


def _axial_geometry(vol: Any) -> tuple[tuple[int, int], float, int]:
    """``((rows, cols), pixel_mm, slices)`` of the axial slices simulate-sparse-view projects."""
    shape, spacing = _canonical_grid(vol)
    return (shape[1], shape[0]), spacing[0], shape[2]


def working_size(vol: Any, spacing_xyz: Sequence[float], compression: int) -> list[int]:
    """Size (X, Y, Z) of the model's working grid for an input (:func:`MedDiffusionLib.data.grid.working_grid`),
    refused when a side exceeds :data:`MAX_SIDE`."""
    from types import SimpleNamespace

    from .data.grid import working_grid

    shape, spacing = _canonical_grid(vol)
    ext = [n * s for n, s in zip(shape, spacing)]
    sides = [e / float(sp) for e, sp in zip(ext, spacing_xyz)]
    too_big = UserError(f"the input covers {' x '.join(f'{e:.0f}' for e in ext)} mm: at the model's spacing that "
                        f"needs more than {MAX_SIDE} voxels per side; crop the input")
    if not all(math.isfinite(s) for s in sides) or max(sides) > 2 * MAX_SIDE:
        raise too_big
    grid = working_grid(SimpleNamespace(shape=tuple(shape), spacing=tuple(spacing)), spacing_xyz, compression)
    d, h, w = grid.shape_dhw
    if max(d, h, w) > MAX_SIDE:
        raise too_big
    return [h, w, d]


def check_input_size(shape: Sequence[int], caps: Caps | None = None) -> None:
    """Refuse an input volume of more voxels than ``caps.max_input_voxels`` (the service calls this
    as soon as it knows the shape)."""
    voxels = math.prod(int(s) for s in shape)
    if caps is not None and caps.max_input_voxels is not None and voxels > caps.max_input_voxels:
        raise UserError(f"the input volume has {voxels} voxels ({'x'.join(str(int(s)) for s in shape)}); this server "
                        f"accepts at most {caps.max_input_voxels}")


def _controlled_working_size(spec: JobSpec, vol: Any) -> list[int] | None:
    """The working grid a controlled task will run on, from the ControlNet's meta and the model's
    registry entry (``None`` when they do not tell: a weights folder)."""
    meta = controlnet_meta(spec.controlnet)
    entry = _model_entry(spec.model) if spec.model else None
    if entry is None:
        return None
    spacing = meta.get("spacing_xyz") or entry.default_size(int(meta.get("class", 1)))[1]
    return working_size(vol, spacing, entry.compression)


def check_input(spec: JobSpec, vol: Any, caps: Caps | None = None) -> list[str]:
    """Refuse unusable inputs (NaN, empty label maps, vector images, broken geometry, too many
    voxels for ``caps``, a working grid beyond the limits, a CT too wide for the fan-beam
    simulation); return warnings for odd ones."""
    import numpy as np

    from .data.volumes import check_ct_intensities, check_finite

    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise UserError(f"the input must be a single-channel 3-D volume, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise UserError("the input volume is empty")
    check_input_size(arr.shape, caps)
    affine = np.asarray(vol.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise UserError("the input's geometry (spacing, direction or origin) is not finite")
    if not all(s > 0 for s in vol.spacing):
        raise UserError(f"the input's voxel spacing must be positive, got {[round(s, 6) for s in vol.spacing]}")
    check_finite(arr, "the input volume")
    if spec.task == "simulate-sparse-view":
        _check_fan_beam(vol)
    elif spec.task in CONTROLNET_TASKS:
        size = _controlled_working_size(spec, vol)
        if size is not None and caps is not None and caps.max_voxels is not None and math.prod(size) > caps.max_voxels:
            raise UserError(f"at the model's spacing the input needs a {'x'.join(map(str, size))} working grid; this "
                            f"server allows at most {caps.max_voxels} voxels; crop the input")
    if spec.task == "synthesize":
        if not np.any(np.rint(arr) != 0):
            raise UserError("the label map is empty (no non-zero label)")
        return []
    hu_input = spec.task == "simulate-sparse-view" or (
        spec.task == "reconstruct" and controlnet_meta(spec.controlnet).get("hint", {}).get("normalize") == "hu_window")
    warning = check_ct_intensities(arr) if hu_input else None
    return [warning] if warning else []


def _check_fan_beam(vol: Any) -> None:
    """simulate-sparse-view's geometry, before it runs: square axial pixels and an axial field of
    view inside the fan-beam source circle (radius ``source_iso`` of :func:`simulate_sparse_view`)."""
    import inspect

    from .operators.fanbeam import image_radius_mm
    from .pipelines.conditioned import simulate_sparse_view

    (rows, cols), pixel, _ = _axial_geometry(vol)
    _, spacing = _canonical_grid(vol)
    if abs(spacing[0] - spacing[1]) > 1e-3 * max(spacing[:2]):
        raise UserError(f"axial pixels must be square for the fan-beam simulation, got {spacing[0]:.4f} x "
                        f"{spacing[1]:.4f} mm")
    iso = float(inspect.signature(simulate_sparse_view).parameters["source_iso"].default)
    radius = image_radius_mm((rows, cols), pixel)
    if radius >= iso:
        raise UserError(f"the CT's axial field of view ({cols * pixel:.0f} x {rows * pixel:.0f} mm, diagonal "
                        f"{2 * radius:.0f} mm) does not fit inside the simulated scanner's source circle (diameter "
                        f"{2 * iso:.0f} mm); crop the volume to an axial diagonal under {2 * iso:.0f} mm")


def run_job(spec: JobSpec | dict, inputs: dict[str, Any] | None = None, *, cache: ModelCache | None = None,
            progress: Callable[[ProgressEvent], None] | None = None, cancel: Callable[[], bool] | None = None,
            preview: Callable[[int, Any], None] | None = None, resolved: bool = False,
            caps: Caps | None = None) -> JobResult:
    """Run one job in this process. ``inputs`` maps input names to :class:`Volume` s (or paths,
    read here). Returns the result volumes; nothing is written. Raises ``UserError`` for bad
    requests, ``ResourceError`` when memory runs out (checked before every task runs, see
    :func:`check_memory`), ``Cancelled`` when ``cancel()`` turned true. ``caps`` bounds the inputs
    (:func:`check_input`) and, when ``resolved`` is false, the request (:func:`resolve`)."""
    from .data.volumes import Volume, read_volume

    t0 = time.monotonic()
    spec = spec if resolved and isinstance(spec, JobSpec) else resolve(spec, caps=caps)
    prog = _Progress(progress)
    vols: dict[str, Volume] = {}
    for name in spec.inputs:
        given = (inputs or {}).get(name, spec.inputs[name])
        vols[name] = given if isinstance(given, Volume) else read_volume(given)
    warnings: list[str] = []
    for vol in vols.values():
        warnings += check_input(spec, vol, caps)
    for w in warnings:
        prog.emit("loading", 0, 0, "checking inputs", notice=f"warning: {w}")
    cache = cache or ModelCache()
    p = spec.params
    try:
        from .pipelines.generation import resolve_device

        if spec.task == "simulate-sparse-view":
            from .pipelines.conditioned import simulate_sparse_view

            device = "cpu" if p["device"] == "cpu" else str(resolve_device(p["device"], warn=False))
            check_memory(spec, device, None, vols)
            prog.emit("sampling", 0, 0, f"simulating {p['views']} fan-beam views")
            started: list[float] = []

            def slices_done(done: int, total: int) -> None:
                now = time.monotonic()
                if not started:
                    started.append(now)
                eta = (now - started[0]) / done * (total - done) if done > 0 else None
                prog.emit("sampling", done, total, f"simulated {done} of {total} slices", eta)

            out = simulate_sparse_view(vols["input"], views=p["views"], bins=p["bins"], device=device,
                                       cancel=cancel, progress=slices_done)
            prog.emit("writing", 0, 0, "writing")
            meta = {"task": spec.task, "views": p["views"], "units": "HU"}
            return JobResult(spec, [ResultVolume(result_names(spec)[0], out, meta)], time.monotonic() - t0, warnings)

        device = str(resolve_device(p["device"], warn=False))
        prog.emit("loading", 0, p["steps"], "loading weights")
        if spec.task == "generate":
            pipe = cache.generation(spec, device)
            check_size(p["size"], pipe.compression)
            est = check_memory(spec, device, pipe, vols)
            where = "warning: running on the CPU; expected " if device == "cpu" else "expected "
            prog.emit("sampling", 0, p["steps"], "sampling", notice=where + est.text(device))
            if pipe.precompiled_network(p["size"], p["num_volumes"]) is not None:
                prog.emit("sampling", 0, p["steps"], "sampling", notice="using the compiled noise network "
                          "(`meddiffusion compile`)")
            gen = pipe.generate(p["class"], p["size"], p["spacing"], p["seed"], p["sampler"],
                                None if p["sampler"] == "ddpm" else p["steps"], p["num_volumes"], prog.step, cancel,
                                tiling=p["tiling"], **_preview_kw(pipe, p, preview))
            prog.emit("writing", p["steps"], p["steps"], "writing")
            results = []
            for name, g in zip(result_names(spec), gen):
                meta = dict(g.meta, task=spec.task, model=spec.model, class_index=g.class_index, seed=g.seed,
                            sampler=p["sampler"], steps=p["steps"], spacing=list(g.spacing_xyz),
                            units="HU" if p["hu_window"] else "model units [-1, 1]", hu_window=p["hu_window"])
                results.append(ResultVolume(name, g.volume(p["hu_window"]), meta))
            return JobResult(spec, results, time.monotonic() - t0, warnings)

        pipe = cache.controlled(spec, device)
        check_memory(spec, device, pipe, vols)
        prog.emit("sampling", 0, p["steps"], "sampling")
        kw = _preview_kw(pipe, p, preview)
        out = pipe.run(vols["input"], seed=p["seed"], sampler=p["sampler"],
                       steps=None if p["sampler"] == "ddpm" else p["steps"], progress=prog.step, cancel=cancel, **kw)
        prog.emit("writing", p["steps"], p["steps"], "writing")
        hu = pipe.meta.get("output") == "hu" or pipe.meta["hint"].get("normalize") == "hu_window"
        meta = {"task": spec.task, "controlnet_task": pipe.task, "model": spec.model, "seed": p["seed"],
                "sampler": p["sampler"], "steps": p["steps"], "units": "HU" if hu else "model units [-1, 1]"}
        return JobResult(spec, [ResultVolume(result_names(spec)[0], out, meta)], time.monotonic() - t0, warnings)
    except MemoryError as exc:
        raise ResourceError(f"out of memory: {exc or 'the run needs more RAM'}; try a smaller size or fewer volumes") \
            from exc
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError without importing torch here
            raise ResourceError(oom_advice(p)) from exc
        raise


def oom_advice(p: dict[str, Any]) -> str:
    size = "x".join(map(str, p["size"])) if p.get("size") else "this input"
    return (f"the GPU ran out of memory for {size}; try a smaller size, fewer volumes, a lower "
            "memory limit (tiles), or the CPU device")


def _preview_kw(pipe: Any, p: dict[str, Any], preview: Callable[[int, Any], None] | None) -> dict[str, Any]:
    """``callback=`` for the pipeline when a live preview is wanted: every ``preview_every`` steps
    the predicted clean latent is decoded (whole, cheap at demo sizes) and handed to ``preview``."""
    every = int(p.get("preview_every") or 0)
    if preview is None or every <= 0:
        return {}
    base = getattr(pipe, "base", pipe)

    def callback(i: int, t: Any, latents: Any, pred_x0: Any) -> None:
        if (i + 1) % every:
            return
        img = base.decode(pred_x0[:1])[0, 0].numpy()
        from .data.volumes import Volume

        # generation: the output grid; conditioned tasks: the model's working grid (resampling the
        # preview onto the input's grid each time would cost more than the decode)
        spacing = p["spacing"] or (pipe.working_spacing() if hasattr(pipe, "working_spacing") else (1.0, 1.0, 1.0))
        preview(i + 1, Volume.from_network(img, spacing))

    return {"callback": callback}


def write_all(outputs: Sequence[str | Path], writers: Sequence[Callable[[], Any]]) -> list[Path]:
    """Run each writer (one per output); if one fails, remove what the earlier ones wrote: all or none."""
    done: list[Path] = []
    try:
        for out, write in zip(outputs, writers):
            write()
            done.append(Path(out))
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
    return done


def write_results(result: JobResult, outputs: Sequence[str | Path], overwrite: bool = False) -> list[Path]:
    """Write each result volume to its output path, atomically and all or none."""
    from .data.volumes import write_volume

    return write_all(outputs, [lambda r=r, o=o: write_volume(r.volume, o, overwrite)
                               for r, o in zip(result.results, outputs)])


__all__ = ["JobSpec", "Caps", "resolve", "resolve_sampling", "check_size", "check_input", "check_input_size",
           "check_memory", "array_bytes", "working_size", "run_job", "ModelCache", "ProgressEvent", "JobResult",
           "ResultVolume", "write_results", "write_all", "TASKS", "result_names"]
