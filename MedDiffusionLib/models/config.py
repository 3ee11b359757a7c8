"""Constructor-argument capture for saved models (the diffusers ``register_to_config`` idea, small).

``@register_to_config`` on an ``nn.Module.__init__`` records every argument, defaults included,
as JSON-ready values in ``self.config``; :func:`MedDiffusionLib.io.checkpoints.save_model` writes
it, and ``cls(**config)`` rebuilds the model. A new constructor argument is saved automatically.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, TypeVar

F = TypeVar("F", bound=Callable[..., None])


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    return value


def init_arg_names(cls: type) -> list[str]:
    """The keyword arguments ``cls.__init__`` accepts (wrapped or not)."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def init_args(cls: type, config: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The part of ``config`` that ``cls`` takes, updated by ``overrides`` (e.g. a ControlNet from
    its base BiFlowNet's config)."""
    names = init_arg_names(cls)
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise TypeError(f"{cls.__name__} takes no argument(s) {unknown}")
    return {**{k: v for k, v in config.items() if k in names}, **overrides}


def register_to_config(init: F) -> F:
    """Decorate ``__init__``: afterwards ``self.config`` holds all its arguments by name."""
    sig = inspect.signature(init)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise TypeError(f"{init.__qualname__}: *args/**kwargs cannot be saved in a config")

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        self.config = {k: _plain(v) for k, v in bound.arguments.items() if k != "self"}

    return wrapper  # type: ignore[return-value]


__all__ = ["register_to_config", "init_args", "init_arg_names"]
