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

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ResourceError, UserError

TASKS = ("generate", "synthesize", "reconstruct", "simulate-sparse-view")
MODES = ("fast", "reference")
PRECISIONS = ("fp32", "bf16", "fp16")
TILINGS = ("auto", "exact", "official", "seamless")
# controlled tasks: the ControlNet task(s) each front-door task accepts
CONTROLNET_TASKS = {"synthesize": ("labels",), "reconstruct": ("sparse-view", "mri")}
CONTROLLED_DEFAULTS = {"sampler": "ddim", "steps": 50}
OUTPUT_FORMATS = (".nrrd", ".nii.gz", ".nii", ".mha")

PARAM_DEFAULTS: dict[str, Any] = {
    "class": None, "size": None, "spacing": None, "seed": 0, "sampler": None, "steps": None, "num_volumes": 1,
    "hu": False, "hu_window": None, "device": "auto", "mode": "fast", "precision": "fp32", "tiling": "auto",
    "max_memory_gb": None, "compile": False, "views": 40, "bins": 512, "preview_every": 0, "force": False,
}
INPUT_TASKS = {"synthesize": "a label map", "reconstruct": "an FBP (HU) or zero-filled MRI volume",
               "simulate-sparse-view": "a CT volume in HU"}


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
        """Validate the shape of a JSON spec (unknown keys and wrong types are refused)."""
        if not isinstance(doc, dict):
            raise UserError("the job spec must be a JSON object")
        unknown = sorted(set(doc) - {"task", "model", "weights", "controlnet", "params", "inputs", "output_format"})
        if unknown:
            raise UserError(f"unknown job spec field(s): {', '.join(unknown)}")
        task = doc.get("task")
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        params = doc.get("params") or {}
        inputs = doc.get("inputs") or {}
        if not isinstance(params, dict) or not isinstance(inputs, dict):
            raise UserError("'params' and 'inputs' must be JSON objects")
        bad = sorted(set(params) - set(PARAM_DEFAULTS))
        if bad:
            raise UserError(f"unknown parameter(s): {', '.join(bad)}; known: {', '.join(PARAM_DEFAULTS)}")
        for key in ("model", "weights", "controlnet"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise UserError(f"'{key}' must be a string")
        fmt = doc.get("output_format") or ".nrrd"
        if fmt not in OUTPUT_FORMATS:
            raise UserError(f"unknown output format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
        return cls(task, doc.get("model"), doc.get("weights"), doc.get("controlnet"), dict(params),
                   {str(k): str(v) for k, v in inputs.items()}, fmt)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- defaults: the one resolver ---------------------------------------------------------------------------
def _int(params: dict, key: str, minimum: int | None = None, what: str | None = None) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise UserError(f"{what or key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{what or key} must be {'positive' if minimum == 1 else f'at least {minimum}'}, got {value}")
    return int(value)


def _triple(value: Any, what: str, kind: type) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise UserError(f"{what} must be three numbers X Y Z, got {value!r}")
    try:
        out = [kind(v) for v in value]
    except (TypeError, ValueError):
        raise UserError(f"{what} must be three numbers X Y Z, got {value!r}") from None
    if kind is int and any(o != v for o, v in zip(out, value)):
        raise UserError(f"{what} must be whole numbers, got {value!r}")
    return out


def resolve_sampling(sampler: str | None, steps: int | None, defaults: dict[str, Any] | None = None,
                     num_timesteps: int = 1000) -> tuple[str, int]:
    """Sampler and number of steps actually run (:func:`MedDiffusionLib.schedulers.resolve_sampling`)."""
    from .schedulers.samplers import resolve_sampling as resolve

    return resolve(sampler, steps, defaults, num_timesteps)


def generation_defaults(entry: Any, class_: int | str | None, size: Sequence[int] | None,
                        spacing: Sequence[float] | None, sampler: str | None, steps: int | None,
                        num_timesteps: int = 1000) -> dict[str, Any]:
    """Class, size, spacing, sampler and steps of a generation run, unset ones from the model's
    registry entry (``entry``; ``None`` for a weights folder, which then needs size and spacing).
    Used by :func:`resolve` and by ``GenerationPipeline.generate``."""
    from .registry import parse_class

    defaults = entry.sampling_defaults if entry is not None else {}
    cls = parse_class(class_ if class_ is not None else (entry.default_class if entry is not None else 1), entry)
    size = _triple(size, "size", int) if size is not None else None
    spacing = _triple(spacing, "spacing", float) if spacing is not None else None
    if entry is not None:
        d_size, d_spacing = entry.default_size(cls)
        size, spacing = size or list(d_size), spacing or list(d_spacing)
        check_size(size, entry.compression)
    elif size is None or spacing is None:
        raise UserError("size and spacing are required with a weights folder (the model's trained sizes are unknown)")
    if any(v <= 0 for v in spacing):
        raise UserError(f"spacing must be positive, got {spacing}")
    sampler, steps = resolve_sampling(sampler, steps, defaults, num_timesteps)
    return {"class": cls, "size": size, "spacing": spacing, "sampler": sampler, "steps": steps}


def resolve(spec: JobSpec | dict, service: bool = False) -> JobSpec:
    """Fill every unset parameter and validate the request; return a new, fully resolved spec.

    ``service=True`` (the job service) refuses local paths: ``weights`` folders and ControlNet
    files that are not bundled or registered names."""
    from .registry import class_names, get_model

    spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
    p = dict(PARAM_DEFAULTS)
    p.update({k: v for k, v in spec.params.items() if v is not None or k in ("class", "size", "spacing")})
    for key in ("hu", "force", "compile"):
        if not isinstance(p[key], bool):
            raise UserError(f"{key} must be true or false, got {p[key]!r}")
    p["seed"] = _int(p, "seed", what="the seed")
    p["preview_every"] = _int(p, "preview_every", minimum=0, what="preview_every")
    for key, allowed in (("mode", MODES), ("precision", PRECISIONS), ("tiling", TILINGS)):
        if p[key] not in allowed:
            raise UserError(f"unknown {key} {p[key]!r}; use {', '.join(allowed)}")
    if not isinstance(p["device"], str) or not (p["device"] in ("auto", "cpu") or p["device"].startswith("cuda")):
        raise UserError(f"unknown device {p['device']!r}; use auto, cpu or cuda[:N]")
    if p["max_memory_gb"] is not None and (not isinstance(p["max_memory_gb"], (int, float)) or p["max_memory_gb"] <= 0):
        raise UserError(f"the memory limit must be positive, got {p['max_memory_gb']}")
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
        raise UserError(f"unknown input name(s) {', '.join(map(repr, extra))}; task {spec.task!r} takes one input "
                        "named 'input'")
    out = JobSpec(spec.task, spec.model, spec.weights, spec.controlnet, p, dict(spec.inputs), spec.output_format)

    if spec.task == "simulate-sparse-view":
        p["views"] = _int(p, "views", minimum=2, what="the number of views")
        p["bins"] = _int(p, "bins", minimum=16, what="the number of detector bins")
        if p["device"] == "auto":
            p["device"] = "cpu"
        return out

    if spec.task in CONTROLNET_TASKS:
        meta = controlnet_meta(spec.controlnet, service)
        if meta.get("task") not in CONTROLNET_TASKS[spec.task]:
            raise UserError(f"this ControlNet was trained for {meta.get('task')!r}, not "
                            f"{' or '.join(CONTROLNET_TASKS[spec.task])} ({spec.task})")
        out.model = spec.model or (None if spec.weights else meta.get("base_model"))
        if out.model:
            get_model(out.model)
        sampler = p["sampler"] or CONTROLLED_DEFAULTS["sampler"]
        p["sampler"], p["steps"] = resolve_sampling(sampler, p["steps"], CONTROLLED_DEFAULTS)
        p["class"] = int(meta.get("class", 1))
        for key in ("size", "spacing", "hu_window"):
            if spec.params.get(key) is not None:
                raise UserError(f"{key} is not a parameter of {spec.task}: the result comes back on the input's grid")
        return out

    # generate
    entry = get_model(spec.model) if (spec.model or not spec.weights) else None
    out.model = entry.id if entry else None
    p["num_volumes"] = _int(p, "num_volumes", minimum=1, what="the number of volumes")
    p.update(generation_defaults(entry, p["class"], p["size"], p["spacing"], p["sampler"], p["steps"]))
    window = p["hu_window"]
    if p["hu"] and window is None:
        info = entry.class_info(p["class"]) if entry else {}
        if not info.get("hu_window"):
            raise UserError("this model has no suggested HU window for that class; give one with --hu-window LO HI")
        window = info["hu_window"]
    if window is not None:
        window = [float(v) for v in _pair(window, "the HU window")]
        if not class_names()[p["class"]].startswith("CT"):
            raise UserError(f"an HU window applies to CT classes only; class {p['class']} is "
                            f"{class_names()[p['class']]}")
        if window[1] <= window[0]:
            raise UserError(f"the HU window needs LO < HI, got {window}")
    p["hu_window"] = window
    return out


def _pair(value: Any, what: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise UserError(f"{what} must be two numbers LO HI, got {value!r}")
    return list(value)


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
        raise UserError(f"unknown ControlNet {name!r}; the job service offers "
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
    """Pipelines kept between jobs, keyed by what they were built from. ``loads`` counts weight loads."""

    def __init__(self) -> None:
        self._pipes: dict[tuple, Any] = {}
        self.loads = 0

    def keys(self) -> list[str]:
        return [":".join(str(k) for k in key if k is not None) for key in self._pipes]

    def generation(self, spec: JobSpec, device: str) -> Any:
        from .pipelines.generation import GenerationPipeline

        p = spec.params
        key = ("generate", spec.model, spec.weights, device, p["mode"], p["precision"], p["compile"])
        if key not in self._pipes:
            self.loads += 1
            self._pipes[key] = GenerationPipeline.from_pretrained(spec.model, spec.weights, device=device,
                                                                  precision=p["precision"], mode=p["mode"],
                                                                  compile=p["compile"])
        pipe = self._pipes[key]
        pipe.memory_limit_bytes = _memory_limit(p)
        return pipe

    def controlled(self, spec: JobSpec, device: str) -> Any:
        from .pipelines.conditioned import ControlledPipeline

        p = spec.params
        key = ("controlnet", spec.controlnet, spec.model, spec.weights, device, p["mode"], p["precision"], p["compile"])
        if key not in self._pipes:
            self.loads += 1
            self._pipes[key] = ControlledPipeline.from_files(bundled_controlnet(spec.controlnet) or spec.controlnet,
                                                             spec.model, spec.weights, device=device, mode=p["mode"],
                                                             precision=p["precision"], compile=p["compile"])
        pipe = self._pipes[key]
        pipe.base.memory_limit_bytes = _memory_limit(p)
        return pipe

    def clear(self) -> list[str]:
        """Drop every pipeline and give cached GPU memory back to the driver."""
        import gc

        names = self.keys()
        self._pipes.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        return names


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


def check_memory(spec: JobSpec, device: str, pipe: Any) -> Any:
    """Refuse a run whose estimated peak exceeds the memory available (unless ``force``)."""
    from .estimate import available_memory_bytes

    p = spec.params
    est = pipe.estimate(p["size"], p["steps"], p["num_volumes"])
    avail = available_memory_bytes(device)
    if not p["force"] and avail is not None and est.peak_bytes > avail:
        raise ResourceError(f"this run needs about {est.peak_bytes / 2 ** 30:.1f} GB of "
                            f"{'GPU memory' if device.startswith('cuda') else 'RAM'} but only "
                            f"{avail / 2 ** 30:.1f} GB is available; choose a smaller size or fewer volumes "
                            "(or force it)")
    return est


def check_input(spec: JobSpec, vol: Any) -> list[str]:
    """Refuse unusable inputs (NaN, empty label maps, vector images); return warnings for odd ones."""
    import numpy as np

    from .data.volumes import check_ct_intensities, check_finite

    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise UserError(f"the input must be a single-channel 3-D volume, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise UserError("the input volume is empty")
    check_finite(arr, "the input volume")
    if spec.task == "synthesize":
        if not np.any(np.rint(arr) != 0):
            raise UserError("the label map is empty (no non-zero label)")
        return []
    hu_input = spec.task == "simulate-sparse-view" or (
        spec.task == "reconstruct" and controlnet_meta(spec.controlnet).get("hint", {}).get("normalize") == "hu_window")
    warning = check_ct_intensities(arr) if hu_input else None
    return [warning] if warning else []


def run_job(spec: JobSpec | dict, inputs: dict[str, Any] | None = None, *, cache: ModelCache | None = None,
            progress: Callable[[ProgressEvent], None] | None = None, cancel: Callable[[], bool] | None = None,
            preview: Callable[[int, Any], None] | None = None, resolved: bool = False) -> JobResult:
    """Run one job in this process. ``inputs`` maps input names to :class:`Volume` s (or paths,
    read here). Returns the result volumes; nothing is written. Raises ``UserError`` for bad
    requests, ``ResourceError`` when memory runs out, ``Cancelled`` when ``cancel()`` turned true."""
    from .data.volumes import Volume, read_volume

    t0 = time.monotonic()
    spec = spec if resolved and isinstance(spec, JobSpec) else resolve(spec)
    prog = _Progress(progress)
    vols: dict[str, Volume] = {}
    for name in spec.inputs:
        given = (inputs or {}).get(name, spec.inputs[name])
        vols[name] = given if isinstance(given, Volume) else read_volume(given)
    warnings: list[str] = []
    for vol in vols.values():
        warnings += check_input(spec, vol)
    for w in warnings:
        prog.emit("loading", 0, 0, "checking inputs", notice=f"warning: {w}")
    cache = cache or ModelCache()
    p = spec.params
    try:
        if spec.task == "simulate-sparse-view":
            from .pipelines.conditioned import simulate_sparse_view

            prog.emit("sampling", 0, 0, f"simulating {p['views']} fan-beam views")
            out = simulate_sparse_view(vols["input"], views=p["views"], bins=p["bins"], device=p["device"])
            prog.emit("writing", 0, 0, "writing")
            meta = {"task": spec.task, "views": p["views"], "units": "HU"}
            return JobResult(spec, [ResultVolume(result_names(spec)[0], out, meta)], time.monotonic() - t0, warnings)

        from .pipelines.generation import resolve_device

        device = str(resolve_device(p["device"], warn=False))
        prog.emit("loading", 0, p["steps"], "loading weights")
        if spec.task == "generate":
            pipe = cache.generation(spec, device)
            check_size(p["size"], pipe.compression)
            est = check_memory(spec, device, pipe)
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


__all__ = ["JobSpec", "resolve", "resolve_sampling", "check_size", "run_job", "ModelCache", "ProgressEvent",
           "JobResult", "ResultVolume", "write_results", "write_all", "TASKS", "result_names"]
