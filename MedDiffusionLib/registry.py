"""The model registry: which models exist, their classes, sizes and files.

* The built-in registry is ``resources/models.json``; ``MEDDIFFUSION_REGISTRY=/path/models.json``
  replaces it (e.g. a private mirror of the weights).
* The user registry, ``$MEDDIFFUSION_CACHE/registry.json`` (``{"schema_version": 1, "models": [...]}``),
  holds models a user added (``meddiffusion models add``). Each of its entries is checked against
  ``resources/models.schema.json`` and merged after the built-in ones; an invalid entry, or one that
  reuses a built-in id, is left out with a warning (:func:`registry_problems` lists them).

Both files are re-read when they change on disk (size, mtime or inode), so a running service sees a
model added by another process; :func:`reload` drops every cached read explicitly.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .paths import RESOURCES, SCHEMA_FILE, builtin_registry_path, user_registry_path

log = logging.getLogger(__name__)


class RegistryError(UserError):
    """Unknown model or class, or a request the model cannot serve."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry. Read it through the typed accessors; ``raw`` (the JSON object)
    is kept for printing the entry as JSON. ``origin`` is ``"builtin"`` or ``"user"``."""

    raw: dict[str, Any]
    origin: str = field(default="builtin", compare=False)

    @property
    def title(self) -> str:
        return self.raw.get("title", self.id)

    @property
    def license(self) -> str:
        return self.raw.get("license", "")

    @property
    def source(self) -> dict[str, Any]:
        """Where the files come from: ``kind`` (bundled/hub/local) and, for the hub, ``repo_id``/``revision``."""
        return self.raw["source"]

    @property
    def default_class(self) -> int:
        return int(self.raw["defaults"]["class"])

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """``{"sampler": ..., "steps": ...}`` for :func:`MedDiffusionLib.schedulers.resolve_sampling`."""
        d = self.raw.get("defaults", {})
        return {"sampler": d.get("sampler"), "steps": d.get("steps")}

    @property
    def classes(self) -> list[dict[str, Any]]:
        return list(self.raw["classes"])

    def hu_window(self, class_index: int) -> tuple[float, float] | None:
        w = self.class_info(class_index).get("hu_window")
        return None if w is None else (float(w[0]), float(w[1]))

    @property
    def cpu_seconds(self) -> float | None:
        """Measured CPU seconds of one DDPM run at the base size (``resources.cpu_seconds``)."""
        v = self.raw.get("resources", {}).get("cpu_seconds")
        return None if v is None else float(v)

    @property
    def base_size(self) -> list[int]:
        """Image size (X, Y, Z) of the first class's first trained size (the estimator's reference)."""
        return list(self.raw["classes"][0]["sizes"][0]["image_xyz"])

    @property
    def id(self) -> str:
        return self.raw["id"]

    @property
    def compression(self) -> int:
        return int(self.raw["compression"].rstrip("x"))

    @property
    def bundled(self) -> bool:
        return self.source["kind"] == "bundled"

    @property
    def user(self) -> bool:
        """Added by the user (user registry), not shipped with MedDiffusion."""
        return self.origin == "user"

    @property
    def architecture(self) -> dict[str, dict[str, Any]]:
        """Expected constructor arguments per role (``{"autoencoder": {...}, "biflownet": {...}}``);
        imported weights must match every key given. Empty when the registry does not say."""
        return dict(self.raw.get("architecture") or {})

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.raw["files"]

    def file(self, role: str) -> dict[str, Any]:
        for f in self.files:
            if f["role"] == role:
                return f
        raise RegistryError(f"model {self.id!r} has no {role} file")

    @property
    def class_indices(self) -> list[int]:
        return [c["index"] for c in self.raw["classes"]]

    def class_info(self, index: int) -> dict[str, Any]:
        for c in self.raw["classes"]:
            if c["index"] == index:
                return c
        known = ", ".join(f"{c['index']} ({c['name']})" for c in self.raw["classes"])
        raise RegistryError(f"model {self.id!r} does not know class {index}; it knows: {known}")

    def default_size(self, class_index: int) -> tuple[list[int], list[float]]:
        s = self.class_info(class_index)["sizes"][0]
        return list(s["image_xyz"]), list(s["spacing_xyz"])


# -- reading files, re-read when they change ---------------------------------------------------------
def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (atomic replace gives a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@lru_cache(maxsize=16)
def _read_json(path: str, stamp: tuple[int, int, int] | None) -> Any:
    return json.loads(Path(path).read_text())


def _load(path: str | Path) -> Any:
    path = Path(path)
    return _read_json(str(path), _stamp(path))


def reload() -> None:
    """Forget every cached read of the registry files (they are also re-read when they change)."""
    _read_json.cache_clear()
    _merged.cache_clear()


def registry(path: str | Path | None = None) -> dict[str, Any]:
    """The built-in registry document (or ``MEDDIFFUSION_REGISTRY``'s), without user models."""
    return _load(path or builtin_registry_path())


def schema() -> dict[str, Any]:
    """The registry's JSON schema (``resources/models.schema.json``)."""
    return _load(SCHEMA_FILE)


# -- a small JSON-schema checker (the keywords models.schema.json uses; jsonschema is a test dependency) --
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _where(path: str) -> str:
    return path or "(top level)"


def _check(value: Any, sch: dict[str, Any] | bool, root: dict[str, Any], path: str, out: list[str]) -> None:
    if sch is True:
        return
    if sch is False:
        out.append(f"{_where(path)}: not allowed")
        return
    if "$ref" in sch:
        ref = sch["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        _check(value, target, root, path, out)
    if "type" in sch:
        types = sch["type"] if isinstance(sch["type"], list) else [sch["type"]]
        if not any(_TYPES[t](value) for t in types):
            out.append(f"{_where(path)}: {json.dumps(value)[:60]} is not of type {' or '.join(types)}")
            return
    if "const" in sch and value != sch["const"]:
        out.append(f"{_where(path)}: must be {json.dumps(sch['const'])}")
    if "enum" in sch and value not in sch["enum"]:
        out.append(f"{_where(path)}: {json.dumps(value)[:60]} is not one of {', '.join(map(json.dumps, sch['enum']))}")
    if isinstance(value, str) and "pattern" in sch and not re.search(sch["pattern"], value):
        out.append(f"{_where(path)}: {value!r} does not match {sch['pattern']}")
    if _TYPES["number"](value):
        if "minimum" in sch and value < sch["minimum"]:
            out.append(f"{_where(path)}: {value} is below the minimum {sch['minimum']}")
        if "maximum" in sch and value > sch["maximum"]:
            out.append(f"{_where(path)}: {value} is above the maximum {sch['maximum']}")
        if "exclusiveMinimum" in sch and value <= sch["exclusiveMinimum"]:
            out.append(f"{_where(path)}: {value} must be greater than {sch['exclusiveMinimum']}")
    if isinstance(value, list):
        if "minItems" in sch and len(value) < sch["minItems"]:
            out.append(f"{_where(path)}: needs at least {sch['minItems']} item(s)")
        if "maxItems" in sch and len(value) > sch["maxItems"]:
            out.append(f"{_where(path)}: takes at most {sch['maxItems']} item(s)")
        if "items" in sch:
            for i, item in enumerate(value):
                _check(item, sch["items"], root, f"{path}[{i}]", out)
    if isinstance(value, dict):
        for key in sch.get("required", []):
            if key not in value:
                out.append(f"{_where(path)}: missing required field {key!r}")
        props = sch.get("properties", {})
        patterns = sch.get("patternProperties", {})
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            matched = False
            if key in props:
                matched = True
                _check(item, props[key], root, sub, out)
            for pat, psch in patterns.items():
                if re.search(pat, key):
                    matched = True
                    _check(item, psch, root, sub, out)
            if not matched and "additionalProperties" in sch:
                extra = sch["additionalProperties"]
                if extra is False:
                    out.append(f"{_where(path)}: unknown field {key!r}")
                else:
                    _check(item, extra, root, sub, out)
    for key in ("allOf", "anyOf", "oneOf"):
        if key not in sch:
            continue
        results = []
        for s in sch[key]:
            errs: list[str] = []
            _check(value, s, root, path, errs)
            results.append(errs)
        passing = sum(1 for r in results if not r)
        if key == "allOf":
            out.extend(e for r in results for e in r)
        elif key == "anyOf" and passing == 0:
            out.append(f"{_where(path)}: matches none of the allowed forms ({'; '.join(results[0])})")
        elif key == "oneOf" and passing != 1:
            out.append(f"{_where(path)}: must match exactly one of the allowed forms, matches {passing}"
                       + (f" ({'; '.join(e for r in results for e in r)})" if passing == 0 else ""))


def validate(doc: Any, ref: str = "#") -> list[str]:
    """Problems of ``doc`` against the registry schema (``ref``: ``"#"`` for a whole registry,
    ``"#/$defs/model"`` for one model entry); empty when it is valid."""
    out: list[str] = []
    root = schema()
    _check(doc, root if ref == "#" else {"$ref": ref}, root, "", out)
    return out


def validate_model(raw: Any) -> list[str]:
    """Problems of one model entry against ``$defs/model`` of the schema; empty when valid."""
    return validate(raw, "#/$defs/model")


# -- the user registry and the merged view -------------------------------------------------------------
def read_user_registry(path: Path | None = None) -> dict[str, Any]:
    """The user registry document (``{"schema_version": 1, "models": []}`` when there is none).
    Raises :class:`RegistryError` when the file is not a readable registry."""
    path = path or user_registry_path()
    if _stamp(path) is None:
        return {"schema_version": 1, "models": []}
    try:
        doc = _load(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path}: the user model registry is not readable JSON ({exc}); fix or delete it") from exc
    if not isinstance(doc, dict) or doc.get("schema_version") != 1 or not isinstance(doc.get("models"), list) \
            or set(doc) - {"schema_version", "models"}:
        raise RegistryError(f"{path}: not a user model registry (expected {{\"schema_version\": 1, \"models\": "
                            "[...]}}); fix or delete it")
    return doc


@lru_cache(maxsize=8)
def _merged(builtin: str, builtin_stamp: Any, user: str, user_stamp: Any) -> tuple[tuple[ModelEntry, ...], tuple[str, ...]]:
    base = [ModelEntry(m) for m in _read_json(builtin, builtin_stamp)["models"]]
    ids = {m.id for m in base}
    problems: list[str] = []
    try:
        doc = read_user_registry(Path(user))
    except RegistryError as exc:
        doc, problems = {"models": []}, [str(exc)]
    extra = []
    for i, raw in enumerate(doc["models"]):
        name = raw.get("id") if isinstance(raw, dict) else None
        errs = validate_model(raw)
        if errs:
            problems.append(f"{user}: user model {name or '#' + str(i)} left out: {'; '.join(errs[:3])}")
        elif name in ids:
            problems.append(f"{user}: user model {name!r} left out: the id is taken by a "
                            f"{'built-in' if any(m.id == name for m in base) else 'previous user'} model")
        else:
            ids.add(name)
            extra.append(ModelEntry(raw, origin="user"))
    for p in problems:
        log.warning("%s", p)
    return tuple(base + extra), tuple(problems)


def _merged_now() -> tuple[tuple[ModelEntry, ...], tuple[str, ...]]:
    builtin, user = builtin_registry_path(), user_registry_path()
    return _merged(str(builtin), _stamp(builtin), str(user), _stamp(user))


def class_names() -> dict[int, str]:
    return {int(k): v for k, v in registry()["classes"].items()}


def models() -> list[ModelEntry]:
    """Built-in models, then the valid user models (re-read when either file changed)."""
    return list(_merged_now()[0])


def registry_problems() -> list[str]:
    """User registry entries that were left out, and why (empty when all is well)."""
    return list(_merged_now()[1])


def builtin_ids() -> set[str]:
    return {m["id"] for m in registry()["models"]}


def get_model(model_id: str | None = None) -> ModelEntry:
    model_id = model_id or registry()["default_model"]
    found = models()
    for m in found:
        if m.id == model_id:
            return m
    raise RegistryError(f"unknown model id {model_id!r}; available: {', '.join(m.id for m in found)} "
                        "(or pass a folder with weights)")


def parse_class(value: str | int, entry: ModelEntry | None = None) -> int:
    """Class index from an index or a (case-insensitive, partial) name like 'chest' or 'MR T1'."""
    names = class_names()
    if isinstance(value, int) or str(value).strip().isdigit():
        idx = int(value)
        if idx not in names:
            raise RegistryError(f"unknown class {idx}; classes are " + ", ".join(f"{k} {v}" for k, v in names.items()))
    else:
        key = str(value).strip().lower()
        hits = [k for k, v in names.items() if key in v.lower()]
        if len(hits) != 1:
            raise RegistryError(f"class {value!r} is {'ambiguous' if hits else 'unknown'}; classes are "
                                + ", ".join(f"{k} {v}" for k, v in names.items()))
        idx = hits[0]
    if entry is not None:
        entry.class_info(idx)
    return idx


# RESOURCES and user_registry_path live in paths.py; they stay importable from here
__all__ = ["RESOURCES", "RegistryError", "ModelEntry", "reload", "registry", "schema", "validate", "validate_model",
           "read_user_registry", "user_registry_path", "class_names", "models", "registry_problems", "builtin_ids",
           "get_model", "parse_class"]
