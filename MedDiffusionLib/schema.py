"""The job spec as a pydantic model: one schema for the job service's door and its OpenAPI page.

:class:`JobRequest` mirrors :class:`MedDiffusionLib.jobspec.JobSpec` field for field and
:class:`JobParams` mirrors :data:`MedDiffusionLib.jobspec.PARAM_DEFAULTS` name for name (every
parameter optional; ``null`` = the default); each task has its own model with only its parameters
(:data:`TASK_PARAM_MODELS`, :data:`TASK_REQUEST_MODELS`), made from :data:`jobspec.TASK_PARAMS`,
the one table the resolver checks every request against (:func:`parse_spec` runs it at the door),
so the OpenAPI page shows exactly what is accepted. Unknown fields are refused, numbers must be finite,
integers whole (``3.0`` counts as 3, ``3.5`` and ``"3"`` do not), booleans are JSON ``true`` /
``false`` only, and every number, string and list is bounded by the absolute limits in
:mod:`MedDiffusionLib.jobspec` (``MAX_*``). :func:`parse_spec` is the whole door: size and nesting
limits on the raw text, JSON without NaN/Infinity, this model, then :func:`jobspec.resolve` with the
server's :class:`Caps`. Every refusal is a :class:`~MedDiffusionLib.errors.UserError` with one
short line that quotes at most a few dozen characters of what the client sent.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

from annotated_types import Ge, Gt, Le, Len, MaxLen
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints, TypeAdapter,
                      ValidationError, WithJsonSchema, create_model)

from . import jobspec
from .defaults import MAX_CLASS_CHARS, MAX_SIDE, MAX_STEPS, SPACING_RANGE_MM, show
from .errors import UserError
from .jobspec import Caps, JobSpec

MAX_SPEC_BYTES = 64 * 1024   # the raw JSON of one job spec
MAX_SPEC_DEPTH = 6           # nested arrays/objects (a valid spec needs 3: spec -> params -> size)
MAX_INT_DIGITS = 40          # longer integer literals are refused while parsing
MAX_MESSAGE_CHARS = 300

# -- value types ------------------------------------------------------------------------------------------


def _whole(value: Any) -> Any:
    """Integers and whole floats (3.0 -> 3); no booleans, strings, fractions, NaN or infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be an integer, got {show(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"must be an integer, got {show(value)}")
        return int(value)
    return value


def _finite(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {show(value)}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError("must be a finite number") from None
    if not math.isfinite(out):
        raise ValueError("must be a finite number")
    return out


def _class(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) > MAX_CLASS_CHARS:
            raise ValueError(f"is too long ({len(value)} characters; at most {MAX_CLASS_CHARS})")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a class index or name, got {show(value)}")
    if abs(value) > 2 ** 31:
        raise ValueError(f"is not a class, got {show(value)}")
    return value


def _int(lo: int, hi: int) -> Any:
    return Annotated[int, Ge(lo), Le(hi), BeforeValidator(_whole)]  # constraints first: they reach the schema


def _float(lo: float, hi: float, gt: bool = False) -> Any:
    return Annotated[float, Gt(lo) if gt else Ge(lo), Le(hi), BeforeValidator(_finite)]


Side = _int(1, MAX_SIDE)
Seed = _int(-jobspec.MAX_SEED, jobspec.MAX_SEED)
Steps = _int(1, MAX_STEPS)
Volumes = _int(1, jobspec.MAX_VOLUMES)
Samples = _int(1, jobspec.MAX_SAMPLES)
Views = _int(*jobspec.VIEWS_RANGE)
Bins = _int(*jobspec.BINS_RANGE)
PreviewEvery = _int(0, jobspec.MAX_PREVIEW_EVERY)
MemoryGB = _float(0.0, jobspec.MAX_MEMORY_GB, gt=True)
SpacingMM = _float(SPACING_RANGE_MM[0], SPACING_RANGE_MM[1])
HU = _float(-jobspec.MAX_ABS_HU, jobspec.MAX_ABS_HU)
ClassValue = Annotated[
    Union[int, str], BeforeValidator(_class),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": -2 ** 31, "maximum": 2 ** 31},
                              {"type": "string", "maxLength": MAX_CLASS_CHARS}],
                    "description": "class index or (partial, case-insensitive) class name"})]
Name = Annotated[str, StringConstraints(max_length=jobspec.MAX_NAME_CHARS)]
Device = Annotated[str, StringConstraints(max_length=jobspec.MAX_DEVICE_CHARS, pattern=jobspec.DEVICE_PATTERN)]


class JobParams(BaseModel):
    """Every job parameter (:data:`MedDiffusionLib.jobspec.PARAM_DEFAULTS`); unset or ``null`` = the default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: Optional[ClassValue] = Field(None, alias="class", description="class index or name (generate)")
    size: Optional[Annotated[list[Side], Len(3, 3)]] = Field(
        None, description="output size X Y Z in voxels (generate); legal sizes depend on the model")
    spacing: Optional[Annotated[list[SpacingMM], Len(3, 3)]] = Field(
        None, description="voxel size X Y Z in mm (generate)")
    seed: Optional[Seed] = None
    sampler: Optional[Literal["ddpm", "ddim", "dpm++"]] = None
    steps: Optional[Steps] = Field(None, description="sampler steps (ddim, dpm++; DDPM runs its full schedule)")
    num_volumes: Optional[Volumes] = None
    seeds: Optional[Annotated[list[Seed], Len(1, jobspec.MAX_VOLUMES)]] = Field(
        None, description="generate: one seed per volume (as many as num_volumes): volume i's noise comes from its own "
                          "generator, as in a one-volume run with seeds[i] (default: seed, one stream for the batch)")
    num_samples: Optional[Samples] = Field(
        None, description="synthesize / reconstruct: draw N samples (seeds seed..seed+N-1 in batches) and return "
                          "them with their voxel-wise mean and standard deviation")
    hu: Optional[StrictBool] = Field(None, description="generate: write HU with the model's suggested window")
    hu_window: Optional[Annotated[list[HU], Len(2, 2)]] = Field(
        None, description="generate: HU window LO HI that maps to model units [-1, 1]")
    device: Optional[Device] = Field(None, description="auto, cpu, cuda or cuda:N")
    mode: Optional[Literal["fast", "reference"]] = None
    precision: Optional[Literal["fp32", "tf32", "bf16", "fp16"]] = None
    tiling: Optional[Literal["auto", "exact", "official", "seamless"]] = None
    max_memory_gb: Optional[MemoryGB] = None
    compile: Optional[StrictBool] = Field(
        None, description="generate: build the ahead-of-time compiled BiFlowNet for this size first")
    views: Optional[Views] = Field(None, description="simulate-sparse-view: fan-beam views")
    bins: Optional[Bins] = Field(None, description="simulate-sparse-view: detector bins")
    preview_every: Optional[PreviewEvery] = Field(
        None, description="decode a preview every N sampler steps (0: never)")
    force: Optional[StrictBool] = Field(None, description="run even when the memory estimate says it does not fit")
    labels: Optional[StrictBool] = Field(None, description="evaluate: the volumes are label maps (Dice per label)")
    resample: Optional[StrictBool] = Field(
        None, description="evaluate: resample the prediction onto the reference's grid when the grids differ")


class JobRequest(BaseModel):
    """One job (:class:`MedDiffusionLib.jobspec.JobSpec`): the task, the model and ControlNet by name,
    parameters, and the names of the uploaded input volumes."""

    model_config = ConfigDict(extra="forbid", title="JobSpec")

    task: Literal["generate", "synthesize", "reconstruct", "simulate-sparse-view", "evaluate"]
    model: Optional[Annotated[str, StringConstraints(max_length=jobspec.MAX_ID_CHARS)]] = Field(
        None, description="registry model id (default: the base model of the ControlNet, or the default model)")
    weights: Optional[Annotated[str, StringConstraints(max_length=jobspec.MAX_WEIGHTS_CHARS)]] = Field(
        None, description="a local weights folder: in-process runs only, refused by the job service")
    controlnet: Optional[Annotated[str, StringConstraints(max_length=jobspec.MAX_ID_CHARS)]] = Field(
        None, description="named ControlNet (synthesize, reconstruct)")
    params: Optional[JobParams] = None
    inputs: Optional[Annotated[dict[Name, Name], MaxLen(jobspec.MAX_INPUTS)]] = Field(
        None, description="input name ('input'; evaluate: 'prediction' and 'reference') -> uploaded file name")
    output_format: Optional[Literal[".nrrd", ".nii.gz", ".nii", ".mha"]] = None

    def to_spec(self) -> JobSpec:
        """The :class:`JobSpec` (parameters the client set, defaults not yet filled in)."""
        params = self.params.model_dump(by_alias=True, exclude_unset=True) if self.params is not None else {}
        return JobSpec(self.task, self.model, self.weights, self.controlnet, params, dict(self.inputs or {}),
                       self.output_format or ".nrrd")


# -- one model per task: the parameters each task takes (jobspec.TASK_PARAMS), made from JobParams's fields --
def _title(task: str) -> str:
    return "".join(w.capitalize() for w in task.split("-"))


def _params_model(task: str) -> type[BaseModel]:
    names = jobspec.TASK_PARAMS[task]
    fields: dict[str, Any] = {attr: (f.annotation, f) for attr, f in JobParams.model_fields.items()
                              if (f.alias or attr) in names}
    model = create_model(f"{_title(task)}Params", __config__=ConfigDict(extra="forbid", populate_by_name=True),
                         **fields)
    model.__doc__ = f"The parameters of a {task} job; unset or ``null`` = the default."
    return model


TASK_PARAM_MODELS: dict[str, type[BaseModel]] = {task: _params_model(task) for task in jobspec.TASK_PARAMS}
TASK_REQUEST_MODELS: dict[str, type[BaseModel]] = {
    task: create_model(f"{_title(task)}Request", __base__=JobRequest, task=(Literal[task], ...),  # type: ignore[valid-type]
                       params=(Optional[model], None))
    for task, model in TASK_PARAM_MODELS.items()}


# -- the door -------------------------------------------------------------------------------------------------
_SCAN = re.compile(r'[\\"\[\]{}]')


def check_depth(text: str, limit: int = MAX_SPEC_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` (brackets outside strings), before any parser recurses."""
    depth, in_str, escaped = 0, False, -2
    for m in _SCAN.finditer(text):
        ch, at = m.group(), m.start()
        if in_str:
            if ch == "\\":
                if escaped != at - 1:
                    escaped = at
                else:
                    escaped = -2  # an escaped backslash
            elif ch == '"' and escaped != at - 1:
                in_str = False
            continue
        if ch == '"':
            in_str, escaped = True, -2
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise UserError(f"the job spec is nested too deeply (more than {limit} levels)")
        elif ch in "]}":
            depth -= 1


def _no_constant(name: str) -> Any:
    raise UserError(f"the job spec contains {name}; numbers must be finite")


def _float_literal(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UserError(f"the job spec contains a number out of range ({text[:20]}); numbers must be finite")
    return value


def _int_literal(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise UserError(f"the job spec contains an integer of {len(text.lstrip('-'))} digits (at most "
                        f"{MAX_INT_DIGITS})")
    return int(text)


def load_json(raw: bytes | str) -> Any:
    """The JSON document of a spec: at most :data:`MAX_SPEC_BYTES` bytes, :data:`MAX_SPEC_DEPTH`
    levels, no NaN or Infinity, no overlong integer literals."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if len(raw) > MAX_SPEC_BYTES:
            raise UserError(f"the job spec is too large ({len(raw)} bytes; at most {MAX_SPEC_BYTES})")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("the job spec is not UTF-8 text") from None
    elif isinstance(raw, str):
        text = raw
        size = len(text) if len(text) > MAX_SPEC_BYTES else len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_SPEC_BYTES:
            raise UserError(f"the job spec is too large ({size} bytes or more; at most {MAX_SPEC_BYTES})")
    else:
        raise UserError("the job spec must be JSON text")
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise UserError("the job spec is empty")
    check_depth(text)
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_float_literal, parse_int=_int_literal)
    except json.JSONDecodeError as exc:
        raise UserError(f"the job spec is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") \
            from None
    except RecursionError:  # pragma: no cover - check_depth comes first
        raise UserError("the job spec is nested too deeply") from None
    except ValueError as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError("the job spec is not valid JSON") from None


def validate(doc: Any) -> JobRequest:
    """The :class:`JobRequest` of a decoded JSON document (a one-line :class:`UserError` if invalid)."""
    try:
        request = JobRequest.model_validate(doc)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        loc = errors[0].get("loc", ()) if errors else ()
        field = str(loc[1]) if len(loc) >= 2 and loc[0] == "params" else None
        raise UserError(one_line(validation_message(exc)), field=field) from None
    return request


def parse_spec(raw: bytes | str, caps: Caps | None = None,
               controlnet_dirs: Sequence[str | Path] | None = None) -> JobSpec:
    """The whole door of the job service: raw JSON -> a resolved :class:`JobSpec`.

    Refuses (with a one-line :class:`UserError`) a spec over :data:`MAX_SPEC_BYTES`, nested over
    :data:`MAX_SPEC_DEPTH`, with NaN/Infinity, not matching :class:`JobRequest`, or refused by
    :func:`jobspec.resolve` (``service=True``, with ``caps``; named ControlNets are looked up in
    ``controlnet_dirs``, default the bundled ones)."""
    request = validate(load_json(raw))
    try:
        return jobspec.resolve(request.to_spec(), service=True, caps=caps, controlnet_dirs=controlnet_dirs)
    except UserError as exc:
        try:
            short = type(exc)(one_line(str(exc)))
        except TypeError:  # a subclass with its own constructor
            short = UserError(one_line(str(exc)))
        short.field = exc.field
        raise short from None


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_KIND = {"bool_type": "true or false", "string_type": "a string", "int_type": "an integer",
         "float_type": "a number", "list_type": "a list", "tuple_type": "a list", "dict_type": "a JSON object",
         "model_type": "a JSON object", "model_attributes_type": "a JSON object", "int_parsing": "an integer",
         "float_parsing": "a number", "bool_parsing": "true or false"}
_UNKNOWN = {"task": "task", "sampler": "sampler", "mode": "mode", "precision": "precision", "tiling": "tiling",
            "output_format": "output format"}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + show(str(part), 30).strip("'\"")
    return out


def _error_text(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-")))
    kind, ctx, given = err.get("type", ""), err.get("ctx") or {}, err.get("input")
    where = _where(loc)
    if kind == "extra_forbidden":
        name = show(str(loc[-1]), 30) if loc else "?"
        if loc[:1] == ("params",):
            return f"unknown parameter {name}; known: {', '.join(jobspec.PARAM_DEFAULTS)}"
        return f"unknown job spec field {name}; known: {', '.join(jobspec.SPEC_FIELDS)}"
    if kind == "missing":
        return f"{where} is required"
    if kind == "literal_error" and loc:
        what = _UNKNOWN.get(str(loc[-1]), where)
        return f"unknown {what} {show(given)}; use one of {ctx.get('expected', '')}"
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        return "the job spec must be a JSON object"
    if kind == "value_error":
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return f"{where} {msg}"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "device":
        return (f"unknown device {show(given)}; use auto, cpu, cuda or cuda:N (N from 0 to "
                f"{jobspec.MAX_CUDA_INDEX})")
    if kind == "string_too_long":
        return f"{where} is too long (at most {ctx.get('max_length')} characters)"
    if kind == "greater_than_equal":
        bound = ctx.get("ge")
        return f"{where} must be {'positive' if bound == 1 else f'at least {bound}'}, got {show(given)}"
    if kind == "greater_than":
        bound = ctx.get("gt")
        return f"{where} must be {'positive' if bound == 0 else f'greater than {bound}'}, got {show(given)}"
    if kind in ("less_than_equal", "less_than"):
        return f"{where} must be at most {ctx.get('le', ctx.get('lt'))}, got {show(given)}"
    if kind in ("too_short", "too_long"):
        if loc and loc[-1] in ("size", "spacing"):
            return f"{where} must be three numbers X Y Z"
        if loc and loc[-1] == "hu_window":
            return f"{where} must be two numbers LO HI"
        if loc and loc[-1] == "inputs":
            return f"a job takes at most {jobspec.MAX_INPUTS} inputs"
        return f"{where} has the wrong number of items"
    if kind in _KIND:
        return f"{where or 'the job spec'} must be {_KIND[kind]}, got {show(given)}"
    return f"{where or 'the job spec'}: {one_line(str(err.get('msg', 'invalid')), 80)}"


def validation_message(exc: ValidationError, count: int = 2) -> str:
    """The first ``count`` errors of a pydantic validation, as one line."""
    errors = exc.errors(include_url=False)
    text = "; ".join(_error_text(e) for e in errors[:count])
    if len(errors) > count:
        text += f" (and {len(errors) - count} more)"
    return text


def request_schema(ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """The JSON schema of a job spec (the OpenAPI request body): one request model per task
    (``GenerateRequest``, ``SynthesizeRequest``, ...), each with its task's parameters only,
    told apart by ``task``."""
    union = Annotated[Union[tuple(TASK_REQUEST_MODELS.values())], Field(discriminator="task")]  # type: ignore[misc]
    return TypeAdapter(union).json_schema(ref_template=ref_template)


__all__ = ["JobRequest", "JobParams", "TASK_PARAM_MODELS", "TASK_REQUEST_MODELS", "Caps", "parse_spec", "load_json", "validate", "check_depth", "request_schema",
           "validation_message", "MAX_SPEC_BYTES", "MAX_SPEC_DEPTH"]
