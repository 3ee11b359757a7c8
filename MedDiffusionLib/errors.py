"""Error types shared by the library, the CLI and the job service.

``UserError`` (and its subclasses) means the request or an input was wrong: front ends show its
message as one line (the CLI) or return it as a 4xx (the job service). Any other exception is an
internal fault: the CLI prints a traceback, the service logs it and answers 500 with a short text.
"""
from __future__ import annotations


class MedDiffusionError(Exception):
    """Base class of every error the library raises on purpose."""


class UserError(MedDiffusionError, ValueError):
    """Bad input or a request that cannot be served; the message is written for the user."""


class ResourceError(MedDiffusionError, RuntimeError):
    """The machine cannot do what was asked (out of memory, disk full, no CUDA); message for the user."""


class Cancelled(MedDiffusionError, RuntimeError):
    """A job was cancelled between sampler steps."""


__all__ = ["MedDiffusionError", "UserError", "ResourceError", "Cancelled"]
