"""Where MedDiffusion's own files are: the bundled resources and the user's cache.

A leaf module (it imports nothing of the library), so that any module can ask for a path without
importing the registry, the weights or the models.

* ``RESOURCES``: the files shipped with the package (``models.json``, its schema, bundled models).
* ``$MEDDIFFUSION_REGISTRY``: a registry file replacing the built-in ``models.json``.
* ``$MEDDIFFUSION_CACHE`` (default ``~/.cache/meddiffusion``): converted official checkpoints
  (``converted/``), imported models (``models/<id>/``), the user registry (``registry.json``),
  compiled noise networks (``compiled/``) and measured kernel choices (``kernels/``).
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MEDDIFFUSION_CACHE"
REGISTRY_ENV = "MEDDIFFUSION_REGISTRY"

RESOURCES = Path(__file__).resolve().parent / "resources"
REGISTRY_FILE = RESOURCES / "models.json"
SCHEMA_FILE = RESOURCES / "models.schema.json"
USER_REGISTRY_NAME = "registry.json"


def cache_root() -> Path:
    """MedDiffusion's own cache: converted and imported weights, the user registry, compiled packages
    (``MEDDIFFUSION_CACHE``, default ``~/.cache/meddiffusion``)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "meddiffusion"))


def builtin_registry_path() -> Path:
    """The built-in registry file: ``$MEDDIFFUSION_REGISTRY``, else ``resources/models.json``."""
    return Path(os.environ.get(REGISTRY_ENV) or REGISTRY_FILE)


def user_registry_path() -> Path:
    """Where user-added models are registered: ``$MEDDIFFUSION_CACHE/registry.json``."""
    return cache_root() / USER_REGISTRY_NAME


def converted_root() -> Path:
    """Our-format copies of official checkpoints: ``$MEDDIFFUSION_CACHE/converted``."""
    return cache_root() / "converted"


def imports_root() -> Path:
    """Folder of imported models: ``MEDDIFFUSION_CACHE/models``."""
    return cache_root() / "models"


def imported_dir(model_id: str) -> Path:
    """Where the imported (converted) files of ``model_id`` live: ``MEDDIFFUSION_CACHE/models/<id>/``."""
    return imports_root() / model_id


def compiled_dir() -> Path:
    """Ahead-of-time compiled noise networks (``meddiffusion compile``): ``$MEDDIFFUSION_CACHE/compiled``."""
    return cache_root() / "compiled"


def kernel_choices_dir() -> Path:
    """Measured kernel choices (one file per torch build and CPU): ``$MEDDIFFUSION_CACHE/kernels``."""
    return cache_root() / "kernels"


__all__ = ["CACHE_ENV", "REGISTRY_ENV", "RESOURCES", "REGISTRY_FILE", "SCHEMA_FILE", "USER_REGISTRY_NAME", "cache_root",
           "builtin_registry_path", "user_registry_path", "converted_root", "imports_root", "imported_dir",
           "compiled_dir", "kernel_choices_dir"]
