"""The model registry (``resources/models.json``): which models exist, their classes, sizes and files.

``MEDDIFFUSION_REGISTRY=/path/models.json`` replaces it (e.g. a private mirror of the weights).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import UserError

RESOURCES = Path(__file__).resolve().parent / "resources"
REGISTRY_FILE = RESOURCES / "models.json"


class RegistryError(UserError):
    """Unknown model or class, or a request the model cannot serve."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry. Read it through the typed accessors; ``raw`` (the JSON object)
    is kept for printing the entry as JSON."""

    raw: dict[str, Any]

    @property
    def title(self) -> str:
        return self.raw.get("title", self.id)

    @property
    def license(self) -> str:
        return self.raw.get("license", "")

    @property
    def source(self) -> dict[str, Any]:
        """Where the files come from: ``kind`` (bundled/hub) and, for the hub, ``repo_id``/``revision``."""
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


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def registry(path: str | Path | None = None) -> dict[str, Any]:
    return _load(str(path or os.environ.get("MEDDIFFUSION_REGISTRY") or REGISTRY_FILE))


def class_names() -> dict[int, str]:
    return {int(k): v for k, v in registry()["classes"].items()}


def models() -> list[ModelEntry]:
    return [ModelEntry(m) for m in registry()["models"]]


def get_model(model_id: str | None = None) -> ModelEntry:
    model_id = model_id or registry()["default_model"]
    for m in models():
        if m.id == model_id:
            return m
    raise RegistryError(f"unknown model id {model_id!r}; available: {', '.join(m.id for m in models())} "
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
