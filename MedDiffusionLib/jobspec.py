"""The job spec and its resolver: what every front end (CLI, Python API, job service) asks for.

A job is a JSON-serialisable :class:`JobSpec`: a task, a model (and ControlNet), parameters and
named input volumes. :func:`resolve` is the *one* place where unset parameters get their defaults
(class, size, spacing, sampler, steps, HU window, ...) and where a bad request is refused with a
:class:`~MedDiffusionLib.errors.UserError`; the result is read-only (:class:`FrozenDict` params
and inputs). The absolute limits (``MAX_*``) bound every front end; a job service's :class:`Caps`
come on top. :mod:`MedDiffusionLib.jobs` runs a resolved spec.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .controlnets import controlnet_meta
from .defaults import (CONTROLLED_DEFAULTS, MAX_STEPS, SAMPLERS, _class_value, _is_number, _triple, _whole,
                       generation_defaults, resolve_sampling, show)
from .errors import UserError, about

TASKS = ("generate", "synthesize", "reconstruct", "simulate-sparse-view", "evaluate")
MODES = ("fast", "reference")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TILINGS = ("auto", "exact", "official", "seamless")
# controlled tasks: the ControlNet task(s) each front-door task accepts
CONTROLNET_TASKS = {"synthesize": ("labels",), "reconstruct": ("sparse-view", "mri")}
OUTPUT_FORMATS = (".nrrd", ".nii.gz", ".nii", ".mha")
SPEC_FIELDS = ("task", "model", "weights", "controlnet", "params", "inputs", "output_format")

PARAM_DEFAULTS: dict[str, Any] = {
    "class": None, "size": None, "spacing": None, "seed": 0, "seeds": None, "sampler": None, "steps": None, "num_volumes": 1,
    "hu": None, "hu_window": None, "device": "auto", "mode": "fast", "precision": "fp32", "tiling": "auto",
    "max_memory_gb": None, "compile": False, "views": 40, "bins": 512, "preview_every": 0, "force": False, "num_samples": 1,
    "labels": False, "resample": False,
}
# the parameters each task takes (one pydantic model per task at the service's door, MedDiffusionLib.schema)
_SAMPLING_PARAMS = ("seed", "sampler", "steps", "device", "mode", "precision", "tiling", "max_memory_gb",
                    "preview_every", "force")
TASK_PARAMS: dict[str, tuple[str, ...]] = {
    "generate": ("class", "size", "spacing", "num_volumes", "seeds", "hu", "hu_window", "compile", *_SAMPLING_PARAMS),
    "synthesize": ("num_samples", *_SAMPLING_PARAMS),
    "reconstruct": ("num_samples", *_SAMPLING_PARAMS),
    "simulate-sparse-view": ("views", "bins", "device", "force"),
    "evaluate": ("labels", "resample"),
}
# why a parameter is not one of a task's, where a plain "not a parameter" would not say enough
_NOT_A_PARAMETER = {
    "compile": "compile builds the generation network's ahead-of-time package; it applies to generate only",
    **{k: f"{k} is not a parameter of {{task}}: the result comes back on the input's grid"
       for k in ("size", "spacing", "hu_window")},
}
INPUT_TASKS = {"synthesize": "a label map", "reconstruct": "an FBP (HU) or zero-filled MRI volume",
               "simulate-sparse-view": "a CT volume in HU",
               "evaluate": "the prediction and the reference volume (label maps with labels=true)"}
# the input volumes each task reads, by name (the service's upload fields)
TASK_INPUTS: dict[str, tuple[str, ...]] = {"generate": (), "synthesize": ("input",), "reconstruct": ("input",),
                                           "simulate-sparse-view": ("input",), "evaluate": ("prediction", "reference")}
INPUT_NAMES = tuple(sorted({n for names in TASK_INPUTS.values() for n in names}))

# -- absolute limits: every front end (CLI, Python API, job service); a service's Caps come on top ------------
MAX_SEED = 2 ** 62            # seed + volume index must fit torch.manual_seed
MAX_VOLUMES = 64              # volumes of one batch
MAX_SAMPLES = 16              # samples of one synthesize / reconstruct job (num_samples)
SAMPLE_BATCH = 4              # samples drawn per batch (the provenance records it; reproduce needs it)
VIEWS_RANGE = (2, 3600)       # fan-beam views of simulate-sparse-view
BINS_RANGE = (16, 8192)       # detector bins of simulate-sparse-view
MAX_PREVIEW_EVERY = 1000
MAX_ABS_HU = 1e6              # HU window bounds
MAX_MEMORY_GB = 1e6
MAX_ID_CHARS = 128            # model and ControlNet ids
MAX_WEIGHTS_CHARS = 4096      # a local weights folder (in-process runs only)
MAX_DEVICE_CHARS = 16
MAX_CUDA_INDEX = 31
MAX_INPUTS = 4
MAX_NAME_CHARS = 255          # input names and input file names
DEVICE_PATTERN = r"^(auto|cpu|cuda(:([0-9]|[12][0-9]|3[01]))?)$"
_DEVICE_RE = re.compile(DEVICE_PATTERN)


@dataclass(frozen=True)
class Caps:
    """Limits a job service's admin sets, on top of the absolute limits above (``None``: no cap).

    Defaults: ``max_voxels`` 512**3 (134 M) voxels per output volume or model working grid (every
    trained size of the released models fits, 512^3 included); ``max_batch_voxels`` 512**3 voxels
    per job (size voxels x num_volumes: one 512^3 volume or eight 256^3); ``max_input_voxels``
    512*512*1024 (268 M) voxels per input volume (1 GiB as float32: a thin-slice clinical CT);
    ``max_volumes`` 8 per job; ``max_samples`` 16 samples of one synthesize / reconstruct job (they
    run in batches of :data:`SAMPLE_BATCH`, and a batch's working grids together must fit
    ``max_batch_voxels``: checked with the input, :func:`~MedDiffusionLib.checks.check_input`);
    ``max_steps`` 1000 (the released models' DDPM default runs 1000);
    ``max_views`` 720 and ``max_bins`` 2048 for simulate-sparse-view; ``job_time_limit_s`` 6 h
    (enforced by the service, not by :func:`resolve`)."""

    max_voxels: int | None = 512 ** 3
    max_batch_voxels: int | None = 512 ** 3
    max_input_voxels: int | None = 512 * 512 * 1024
    max_volumes: int | None = 8
    max_samples: int | None = MAX_SAMPLES
    max_steps: int | None = 1000
    max_views: int | None = 720
    max_bins: int | None = 2048
    job_time_limit_s: float | None = 6 * 3600.0

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_batch_voxels", "max_input_voxels", "max_volumes", "max_samples", "max_steps",
                     "max_views", "max_bins"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Caps.{name} must be a positive integer or None, got {value!r}")
        t = self.job_time_limit_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise ValueError(f"Caps.job_time_limit_s must be a positive number of seconds or None, got {t!r}")


def _names(values: Sequence[Any], limit: int = 5) -> str:
    items = [show(v, 30) for v in list(values)[:limit]]
    return ", ".join(items) + (f" and {len(values) - limit} more" if len(values) > limit else "")


class FrozenDict(dict):
    """A dict that refuses changes (the params and inputs of a resolved :class:`JobSpec`). It stays a
    ``dict`` for JSON and ``asdict``; copies (``dict(d)``, ``copy.deepcopy``) are ordinary dicts."""

    def _refuse(self, *_args: Any, **_kw: Any) -> None:
        raise TypeError("a resolved job spec is read-only; make a new one with JobSpec.with_params")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __deepcopy__(self, memo: dict) -> dict:
        import copy

        return copy.deepcopy(dict(self), memo)

    def __copy__(self) -> dict:
        return dict(self)

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


@dataclass(frozen=True)
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

    @property
    def resolved(self) -> bool:
        """Whether this spec came out of :func:`resolve` (read-only, every default filled in)."""
        return isinstance(self.params, FrozenDict)

    def with_params(self, **changes: Any) -> "JobSpec":
        """A copy with ``changes`` to the params (read-only again when this spec was resolved)."""
        params = dict(self.params, **changes)
        return replace(self, params=FrozenDict(params) if self.resolved else params)

    def as_stored_resolution(self) -> "JobSpec":
        """This spec, read back from where a resolved one was stored (the service's job table), as
        read-only as it was when stored."""
        return replace(self, params=FrozenDict(self.params), inputs=FrozenDict(self.inputs))

    def with_inputs(self, inputs: dict[str, str]) -> "JobSpec":
        """A copy with other inputs (read-only again when this spec was resolved)."""
        return replace(self, inputs=FrozenDict(inputs) if self.resolved else dict(inputs))


# -- value checks (the ones the defaults need live in defaults.py) ---------------------------------------
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


def as_request(spec: JobSpec | dict[str, Any], device: str | None = None, **params: Any) -> dict[str, Any]:
    """A resolved spec (or its dict, as a provenance records it) as a request again, to resolve
    anew, here or on a service: the task's own parameters only (what resolution filled in for the
    others is left to the resolver), with ``params`` laid over them and ``device`` replacing the
    spec's (``None``: kept)."""
    doc = spec.to_dict() if isinstance(spec, JobSpec) else spec
    p = {k: v for k, v in doc["params"].items() if k in TASK_PARAMS[doc["task"]]}
    p.update(params)
    if device is not None:
        p["device"] = device
    return dict({k: doc.get(k) for k in ("task", "model", "weights", "controlnet", "output_format")}, params=p,
                inputs=dict(doc.get("inputs") or {}))


def _seeds(seeds: Any, num_volumes: int, seed: int) -> list[int]:
    """One seed per volume (generate): a list of ``num_volumes`` whole numbers, the first of them
    ``seed`` (left out, ``seed`` and ``num_volumes`` follow ``seeds``: :func:`resolve`)."""
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise UserError(f"seeds must be a list of whole numbers, one per volume, got {show(seeds)}")
    if len(seeds) > MAX_VOLUMES:
        raise UserError(f"seeds: at most {MAX_VOLUMES} (one per volume), got {len(seeds)}")
    out = [_whole(v, "a seed", -MAX_SEED, MAX_SEED) for v in seeds]
    if len(out) != num_volumes:
        raise UserError(f"seeds gives {len(out)} seeds for num_volumes {num_volumes}: give one seed per volume")
    if out[0] != seed:
        raise UserError(f"seed {seed} and seeds {out[0]}, ...: with seeds, seed is the first of them (or leave it out)")
    return out


def _check_params(p: dict[str, Any]) -> None:
    """Types and absolute ranges of every parameter, whatever the task (in place: whole floats
    become ints). An error names its field (:attr:`UserError.field`)."""
    for key in ("hu", "force", "compile", "labels", "resample"):
        if not isinstance(p[key], bool) and not (key == "hu" and p[key] is None):
            raise UserError(f"{key} must be true or false, got {show(p[key])}", field=key)
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("seed", lambda: _whole(p["seed"], "the seed", -MAX_SEED, MAX_SEED)),
        ("preview_every", lambda: _whole(p["preview_every"], "preview_every", 0, MAX_PREVIEW_EVERY)),
        ("num_volumes", lambda: _whole(p["num_volumes"], "the number of volumes", 1, MAX_VOLUMES)),
        ("num_samples", lambda: _whole(p["num_samples"], "the number of samples", 1, MAX_SAMPLES)),
        ("views", lambda: _whole(p["views"], "the number of views", *VIEWS_RANGE)),
        ("bins", lambda: _whole(p["bins"], "the number of detector bins", *BINS_RANGE)),
        ("steps", lambda: _whole(p["steps"], "the number of sampler steps", 1, MAX_STEPS)),
        ("max_memory_gb", lambda: _finite(p["max_memory_gb"], "the memory limit", 0, MAX_MEMORY_GB, lo_open=True)),
        ("size", lambda: _triple(p["size"], "size", int)),
        ("spacing", lambda: _triple(p["spacing"], "spacing", float)),
        ("hu_window", lambda: _pair(p["hu_window"], "the HU window")),
    ]
    optional = ("steps", "max_memory_gb", "size", "spacing", "hu_window", "seeds")
    checks.append(("seeds", lambda: _seeds(p["seeds"], p["num_volumes"], p["seed"])))
    for key, check in checks:
        if p[key] is not None or key not in optional:
            with about(key):
                p[key] = check()
    if p["sampler"] is not None and (not isinstance(p["sampler"], str) or p["sampler"] not in SAMPLERS):
        raise UserError(f"unknown sampler {show(p['sampler'])}; use {', '.join(SAMPLERS)}", field="sampler")
    for key, allowed in (("mode", MODES), ("precision", PRECISIONS), ("tiling", TILINGS)):
        if not isinstance(p[key], str) or p[key] not in allowed:
            raise UserError(f"unknown {key} {show(p[key])}; use {', '.join(allowed)}", field=key)
    dev = p["device"]
    if not isinstance(dev, str) or len(dev) > MAX_DEVICE_CHARS or not _DEVICE_RE.match(dev):
        raise UserError(f"unknown device {show(dev)}; use auto, cpu, cuda or cuda:N (N from 0 to {MAX_CUDA_INDEX})",
                        field="device")
    with about("class"):
        _class_value(p["class"])


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


def model_entry(model_id: str | None) -> Any:
    """The registry entry of ``model_id`` (``None``: the default model); an unknown id is refused
    with the known ones."""
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
    if spec.task in CONTROLNET_TASKS and caps.max_samples is not None and p["num_samples"] > caps.max_samples:
        raise UserError(f"this server draws at most {caps.max_samples} samples per job, got {p['num_samples']}",
                        field="num_samples")
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


def sample_batch(p: Mapping[str, Any]) -> int:
    """Samples per batch of an N-sample run (:data:`SAMPLE_BATCH`, at most N): fixed, so a recorded
    job draws the same noise again."""
    return min(int(p.get("num_samples") or 1), SAMPLE_BATCH)


def _check_task_params(spec: JobSpec) -> None:
    """Every parameter given (not ``null``) is one the task takes (:data:`TASK_PARAMS`)."""
    allowed = TASK_PARAMS.get(spec.task, ())
    for key, value in spec.params.items():
        if value is not None and key in PARAM_DEFAULTS and key not in allowed:
            why = _NOT_A_PARAMETER.get(key, "{key} is not a parameter of {task}; it takes {allowed}")
            raise UserError(why.format(key=key, task=spec.task, allowed=", ".join(allowed)), field=key)


def resolve(spec: JobSpec | dict, service: bool = False, caps: Caps | None = None,
            controlnet_dirs: Sequence[str | Path] | None = None) -> JobSpec:
    """Fill every unset parameter and validate the request; return a new, fully resolved spec.

    Every parameter is checked for type and absolute range (finite numbers, bounded integers,
    known names; see the ``MAX_*`` limits) before anything else runs. ``service=True`` (the job
    service) refuses local paths: ``weights`` folders and ControlNet files that are not bundled or
    registered names. ``caps`` (a service's :class:`Caps`) bounds steps, volumes, voxels, views
    and bins on top. ``controlnet_dirs`` is where named ControlNets are looked up
    (:func:`~MedDiffusionLib.controlnets.controlnet_search_path`; default: the bundled ones). The
    result is read-only (:class:`FrozenDict` params and inputs): the one resolution every front
    end shares; a runner that changes a value makes a new spec (:meth:`JobSpec.with_params`)."""
    from .registry import class_names

    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    _check_spec_strings(spec)
    _check_task_params(spec)
    p = dict(PARAM_DEFAULTS)
    p.update({k: v for k, v in spec.params.items() if v is not None or k in ("class", "size", "spacing")})
    seeds = p["seeds"]
    if isinstance(seeds, (list, tuple)) and seeds:  # one seed per volume: the count and the first seed follow
        if spec.params.get("num_volumes") is None:
            p["num_volumes"] = min(len(seeds), MAX_VOLUMES)  # too many: the seeds check says so
        if spec.params.get("seed") is None:
            p["seed"] = seeds[0]
    _check_params(p)
    if service and spec.weights:
        raise UserError("the job service does not open local paths: choose a model by its registry id, not a "
                        "weights folder")
    wanted = TASK_INPUTS[spec.task]
    missing = [n for n in wanted if n not in spec.inputs]
    if missing:
        names = " and ".join(repr(n) for n in wanted)
        raise UserError(f"task {spec.task!r} needs {'an input volume' if len(wanted) == 1 else 'input volumes'} "
                        f"({INPUT_TASKS[spec.task]}) named {names}")
    if not wanted and spec.inputs:
        raise UserError(f"task {spec.task!r} takes no input volumes")
    extra = sorted(set(spec.inputs) - set(wanted))
    if extra:
        raise UserError(f"unknown input name(s) {_names(extra)}; task {spec.task!r} takes "
                        f"{' and '.join(repr(n) for n in wanted)}")
    if spec.task == "evaluate":  # no model: metrics on the CPU
        p["device"] = "cpu"
        return _final(spec, None, p, caps)
    model = spec.model

    if spec.task == "simulate-sparse-view":
        if p["device"] == "auto":
            p["device"] = "cpu"
        return _final(spec, model, p, caps)

    if spec.task in CONTROLNET_TASKS:
        meta = controlnet_meta(spec.controlnet, controlnet_dirs, service)
        if meta.get("task") not in CONTROLNET_TASKS[spec.task]:
            raise UserError(f"this ControlNet was trained for {show(meta.get('task'))}, not "
                            f"{' or '.join(CONTROLNET_TASKS[spec.task])} ({spec.task})")
        model = spec.model or (None if spec.weights else meta.get("base_model"))
        if model:
            model_entry(model)
        p["sampler"], p["steps"] = resolve_sampling(p["sampler"], p["steps"], CONTROLLED_DEFAULTS)
        p["class"] = int(meta.get("class", 1))
        return _final(spec, model, p, caps)

    # generate
    entry = model_entry(spec.model) if (spec.model or not spec.weights) else None
    model = entry.id if entry else None
    p.update(generation_defaults(entry, p["class"], p["size"], p["spacing"], p["sampler"], p["steps"]))
    # CT classes come out in HU by default (the model's window for the class); hu=False keeps
    # model units [-1, 1]; an explicit window always applies
    window = p["hu_window"]
    ct = class_names()[p["class"]].startswith("CT")
    if p["hu"] and not ct:
        raise UserError(f"hu: HU applies to CT classes only; class {p['class']} is {class_names()[p['class']]}",
                        field="hu")
    if window is None and p["hu"] is not False:
        info = entry.class_info(p["class"]) if entry else {}
        if info.get("hu_window") and ct:
            window = info["hu_window"]
        elif p["hu"]:
            raise UserError("hu_window: this model has no suggested HU window for that class; give one",
                            field="hu_window")
    if window is not None:
        window = _pair(window, "the HU window")
        if not ct:
            raise UserError(f"hu_window: an HU window applies to CT classes only; class {p['class']} is "
                            f"{class_names()[p['class']]}", field="hu_window")
        if window[1] <= window[0]:
            raise UserError(f"hu_window: the HU window needs LO < HI, got {window}", field="hu_window")
    p["hu"] = window is not None
    p["hu_window"] = window
    return _final(spec, model, p, caps)


def _final(spec: JobSpec, model: str | None, p: dict[str, Any], caps: Caps | None) -> JobSpec:
    """The resolved, read-only spec, checked against the service's caps."""
    out = JobSpec(spec.task, model, spec.weights, spec.controlnet, FrozenDict(p), FrozenDict(spec.inputs),
                  spec.output_format)
    _check_caps(out, caps)
    return out


def _pair(value: Any, what: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise UserError(f"{what} must be two numbers LO HI, got {show(value)}")
    return [_finite(v, what, -MAX_ABS_HU, MAX_ABS_HU) for v in value]
