"""Error types shared by the library, the CLI and the job service.

``UserError`` (and its subclasses) means the request or an input was wrong: front ends show its
message as one line (the CLI) or return it as a 4xx (the job service). Any other exception is an
internal fault: the CLI prints a traceback, the service logs it and answers 500 with a short text.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator


class MedDiffusionError(Exception):
    """Base class of every error the library raises on purpose. ``field`` names the request field
    it is about when there is one (``"steps"``, ``"device"``); each front end words it its own way
    (the CLI as its flag, the job service as a leading ``"steps: "``, the Slicer panel as its
    control)."""

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


FIELD_PREFIX = re.compile(r"^([a-z][a-z_]*): ")


class UserError(MedDiffusionError, ValueError):
    """Bad input or a request that cannot be served; the message is written for the user, its
    ``field`` set by the raiser or by :func:`about`."""


@contextmanager
def about(field: str) -> Iterator[None]:
    """A :class:`UserError` raised inside is about request field ``field`` (unless it already names one)."""
    try:
        yield
    except UserError as exc:
        if exc.field is None:
            exc.field = field
        raise


def fielded(exc: BaseException) -> str:
    """The message of ``exc`` led by the request field it is about (``"steps: ..."``), as the job
    service relays it: a client words the field its own way (:func:`message_field`)."""
    text = str(exc)
    field = getattr(exc, "field", None)
    return text if not field or text.startswith(f"{field}: ") else f"{field}: {text}"


def message_field(message: str) -> tuple[str | None, str]:
    """``(field, rest)`` of a message that starts with ``"field: "`` (as the job service relays
    library messages), else ``(None, message)``."""
    m = FIELD_PREFIX.match(message or "")
    return (m.group(1), message[m.end():]) if m else (None, message)


class SetupError(UserError):
    """What the request needs is missing or broken in this installation (weights not downloaded
    and no way to download them, corrupt weights, a ControlNet removed since the request was
    accepted): the same request may run on another installation. The job service reports it as
    ``error_kind`` ``setup``; a ControlNet a server does not know at all is refused at its door."""


class ResourceError(MedDiffusionError, RuntimeError):
    """The machine cannot do what was asked (out of memory, disk full, no CUDA); message for the
    user, with the ``field`` that would change it when there is one (``"device"``)."""


class Cancelled(MedDiffusionError, RuntimeError):
    """A job was cancelled between sampler steps."""


__all__ = ["MedDiffusionError", "UserError", "SetupError", "ResourceError", "Cancelled", "about", "fielded", "message_field"]
