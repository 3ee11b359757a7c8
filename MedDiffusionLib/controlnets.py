"""Finding ControlNets: one lookup, with the search path as an argument.

A *named* ControlNet is a folder ``NAME/controlnet.safetensors`` (+ ``controlnet.json``, as
``train-controlnet`` writes them) inside one of the folders of a search path:
:func:`controlnet_search_path` gives the bundled folder, then any extra folders in order (a job
service's ``--controlnet-dir`` folders, passed to it explicitly). :func:`find_controlnet` looks a
name up in a search path (names only: never a path, never the working folder);
:func:`resolve_controlnet` also takes a file or a run folder (in-process runs only);
:func:`named_controlnets` lists what a search path offers and :func:`controlnet_meta` reads one's
metadata. Every function takes the search path as ``search_dirs`` (``None``: the bundled folder
only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .defaults import show
from .errors import UserError
from .paths import RESOURCES


def controlnet_search_path(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The folders searched for named ControlNets, in order: the bundled ones, then ``extra``."""
    return [RESOURCES / "models", *(Path(d).expanduser() for d in extra)]


def _folders(search_dirs: Sequence[str | Path] | None) -> list[Path]:
    return controlnet_search_path() if search_dirs is None else [Path(d) for d in search_dirs]


def find_controlnet(name: str | None, search_dirs: Sequence[str | Path] | None) -> Path | None:
    """The file of the ControlNet named ``name`` in the first folder of ``search_dirs`` that has it
    (``None``: the bundled folder only), else ``None``. Names only: a name with a path separator or
    a colon, or starting with a dot, is never looked up."""
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        return None
    for folder in _folders(search_dirs):
        path = folder / name / "controlnet.safetensors"
        if path.exists():
            return path
    return None


def resolve_controlnet(name_or_path: str | Path, search_dirs: Sequence[str | Path] | None = None) -> Path:
    """A ControlNet file path, a run folder holding ``controlnet.safetensors``, or the name of one
    in ``search_dirs`` (default: the bundled ones, ``chest-ct-mini-labels`` ...)."""
    from .weights import WeightsError

    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "controlnet.safetensors").exists():  # a train-controlnet run folder
        return p / "controlnet.safetensors"
    if p.is_file() or p.with_suffix(".safetensors").exists():
        return p
    found = find_controlnet(str(name_or_path), search_dirs)
    if found is not None:
        return found
    known = sorted({d.name for folder in _folders(search_dirs) if folder.is_dir() for d in folder.iterdir()
                    if (d / "controlnet.safetensors").exists()})
    raise WeightsError(f"ControlNet {name_or_path!r} not found: not a file, and not a bundled ControlNet "
                       f"({', '.join(known) or 'none bundled'})")


def named_controlnets(search_dirs: Sequence[str | Path] | None) -> list[dict[str, Any]]:
    """Every named ControlNet of ``search_dirs`` (the first of a name wins) with its task, base model,
    class and hint (for health and the Slicer panel)."""
    out, seen = [], set()
    for folder in _folders(search_dirs):
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


def controlnet_meta(name: str | None, search_dirs: Sequence[str | Path] | None,
                    service: bool = False) -> dict[str, Any]:
    """The ``meta`` of a ControlNet: a name in ``search_dirs``, or (in-process, not ``service``) a
    file path."""
    from .io.checkpoints import read_model_config

    if not name:
        raise UserError("this task needs a ControlNet (e.g. chest-ct-mini-labels or chest-ct-mini-sparse-view)")
    path = find_controlnet(name, search_dirs)
    if path is None and service:
        raise UserError(f"unknown ControlNet {show(name)}; the job service offers "
                        f"{', '.join(c['name'] for c in named_controlnets(search_dirs)) or 'none'} "
                        "(it never opens local paths)")
    return read_model_config(path or resolve_controlnet(name, search_dirs)).get("meta", {})


__all__ = ["controlnet_search_path", "find_controlnet", "resolve_controlnet", "named_controlnets", "controlnet_meta"]
