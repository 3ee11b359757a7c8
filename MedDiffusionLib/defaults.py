"""Defaults of a request, in one place: what a run uses for every value the user left unset.

Pure: no torch, no files beyond the registry entry it is given, and it imports neither
:mod:`MedDiffusionLib.jobs` nor the pipelines, which both take their defaults from here.

* :func:`resolve_sampling` is the one place that turns (sampler, steps, a registry entry's or the
  ControlNet tasks' defaults) into the (sampler, steps) pair a run really uses. The job resolver
  (:func:`MedDiffusionLib.jobs.resolve`), the Python API (``GenerationPipeline.generate``,
  ``ControlledPipeline.run``) and :func:`MedDiffusionLib.schedulers.make_scheduler` all call it;
  the schedulers and ``GenerationPipeline.sample_latents`` take only resolved values.
* :func:`generation_defaults`: class, size, spacing, sampler and steps of a generation run.
* The value checks those need (:func:`show` quotes a client's value back in a message).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

from .errors import UserError, about
from .registry import parse_class

NUM_TRAIN_TIMESTEPS = 1000  # the official schedule length (every released model)
SAMPLERS = ("ddpm", "ddim", "dpm++")
CONTROLLED_DEFAULTS = {"sampler": "ddim", "steps": 50}  # synthesize and reconstruct (ControlNet tasks)

# absolute limits of the values resolved here (jobs.py holds the others)
MAX_STEPS = 1000              # sampler steps (the released schedules have 1000 timesteps)
MAX_SIDE = 4096               # voxels per side of an output or working grid (legal sizes are checked later)
SPACING_RANGE_MM = (1e-6, 1e6)
MAX_CLASS_CHARS = 64
SHOW_CHARS = 40               # at most this much of a client's value is quoted back in a message

# steps of each sampler when neither the user nor the defaults name them; None: every training timestep
# (DDPM, the authors' ancestral sampler, always runs the whole schedule)
SAMPLER_STEPS: dict[str, int | None] = {"ddpm": None, "ddim": 100, "dpm++": 20}
DEFAULT_SAMPLER = "ddpm"  # the sampler of a model whose registry entry names none (the official one)


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


def check_size(size_xyz: Sequence[int], compression: int) -> tuple[int, int, int]:
    """Legal output size for a model of this compression (:func:`MedDiffusionLib.data.grid.legal_size`)."""
    from .data.grid import legal_size

    return legal_size(size_xyz, compression)


def resolve_sampling(sampler: str | None, steps: int | None, defaults: Mapping[str, Any] | None = None,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[str, int]:
    """The sampler and the number of steps a run really uses (the one place they are defaulted).

    ``sampler=None`` takes ``defaults["sampler"]`` (a model's registry defaults, or
    :data:`CONTROLLED_DEFAULTS`; :data:`DEFAULT_SAMPLER` without). ``steps=None`` takes
    ``defaults["steps"]`` when the sampler is the default one, else the sampler's own default
    (:data:`SAMPLER_STEPS`: DDPM always runs ``num_train_timesteps``; DDIM 100; DPM++ 20). A
    resolved pair comes back unchanged. Bad values raise :class:`UserError`."""
    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        raise UserError(f"unknown sampler {show(sampler)}; use {', '.join(SAMPLERS)}", field="sampler")
    if steps is not None:
        steps = _whole(steps, "the number of sampler steps", 1, MAX_STEPS)
    defaults = defaults or {}
    default_sampler = defaults.get("sampler") or DEFAULT_SAMPLER
    sampler = sampler or default_sampler
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {show(sampler)}; use {', '.join(SAMPLERS)}", field="sampler")
    own = SAMPLER_STEPS[sampler]
    if own is None:
        if steps not in (None, num_train_timesteps):
            raise UserError(f"DDPM always runs {num_train_timesteps} steps; use the ddim or dpm++ sampler for fewer")
        return sampler, num_train_timesteps
    if steps is None:
        steps = int((defaults.get("steps") if sampler == default_sampler else None) or own)
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"the {sampler} sampler takes 1 to {num_train_timesteps} steps, got {steps}")
    return sampler, steps


def generation_defaults(entry: Any, class_: int | str | None, size: Sequence[int] | None,
                        spacing: Sequence[float] | None, sampler: str | None, steps: int | None,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> dict[str, Any]:
    """Class, size, spacing, sampler and steps of a generation run, unset ones from the model's
    registry entry (``entry``; ``None`` for a weights folder, which then needs size and spacing).
    Used by :func:`MedDiffusionLib.jobs.resolve` and by ``GenerationPipeline.generate``."""
    defaults = entry.sampling_defaults if entry is not None else {}
    with about("class"):
        class_ = _class_value(class_)
        cls = parse_class(class_ if class_ is not None else (entry.default_class if entry is not None else 1), entry)
    with about("size"):
        size = _triple(size, "size", int) if size is not None else None
    with about("spacing"):
        spacing = _triple(spacing, "spacing", float) if spacing is not None else None
    if entry is not None:
        d_size, d_spacing = entry.default_size(cls)
        size, spacing = size or list(d_size), spacing or list(d_spacing)
        with about("size"):
            check_size(size, entry.compression)
    elif size is None or spacing is None:
        raise UserError("size and spacing are required with a weights folder (the model's trained sizes are unknown)",
                        field="size" if size is None else "spacing")
    with about("steps"):
        sampler, steps = resolve_sampling(sampler, steps, defaults, num_train_timesteps)
    return {"class": cls, "size": size, "spacing": spacing, "sampler": sampler, "steps": steps}


__all__ = ["NUM_TRAIN_TIMESTEPS", "SAMPLERS", "SAMPLER_STEPS", "DEFAULT_SAMPLER", "CONTROLLED_DEFAULTS", "MAX_STEPS",
           "MAX_SIDE", "SPACING_RANGE_MM", "MAX_CLASS_CHARS", "SHOW_CHARS", "show", "check_size", "resolve_sampling",
           "generation_defaults"]


def sampling_defaults_for(entry: Any) -> dict[str, Any]:
    """What a front end shows before a request is made, resolved here like every request: a
    registry model's class, sampler and steps, the steps each sampler runs by default, and the
    ControlNet tasks' sampler and steps (the service's status answer; the Slicer panel fills its
    controls from it)."""
    sampler, steps = resolve_sampling(None, None, entry.sampling_defaults)
    return {"class": entry.default_class, "sampler": sampler, "steps": steps,
            "sampler_steps": {s: resolve_sampling(s, None, entry.sampling_defaults)[1] for s in SAMPLERS},
            "controlled": dict(zip(("sampler", "steps"), resolve_sampling(None, None, CONTROLLED_DEFAULTS)))}
