"""The optional dependencies of the set metrics (the ``evaluate`` extra): one clear line when missing."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UserError

EXTRA = "pip install 'meddiffusion[evaluate]'"


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or a :class:`UserError` saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"{purpose} needs the optional package {module.split('.')[0]} ({EXTRA}); "
                        f"{type(err).__name__}: {err}") from err


__all__ = ["require", "EXTRA"]
