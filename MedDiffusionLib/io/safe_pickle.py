"""Loading official PyTorch checkpoints without executing pickled code.

Everything goes through ``torch.load(weights_only=True)``. The only non-tensor classes the
official files contain (an ``argparse.Namespace`` in the BiFlowNet ``.pt``; an OmegaConf
``DictConfig`` and its node classes, plus ``typing.Any``, in the autoencoder ``.ckpt``) are
allow-listed as inert stand-ins that only store their pickled state; :func:`to_plain` turns
them into dicts, lists and scalars. Any other class makes the load fail.
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any

import torch


class PickledState:
    """Inert stand-in for an allow-listed foreign class: keeps the pickled state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state!r:.80}>"


class OmegaConfNode(PickledState):
    """Stand-in for ``omegaconf`` containers, nodes and metadata."""


class TypingMarker(PickledState):
    """Stand-in for ``typing.Any`` (referenced by OmegaConf metadata)."""


_OMEGACONF_NAMES = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode", "omegaconf.nodes.PathNode", "omegaconf.nodes.EnumNode",
    "omegaconf.nodes.InterpolationResultNode",
)


def _allow_list() -> list[Any]:
    # Builtin types appear as *references* in OmegaConf metadata (object_type=dict, key_type=str ...).
    allowed: list[Any] = [argparse.Namespace, collections.defaultdict, collections.OrderedDict,
                          dict, list, int, float, str, bool, bytes]
    allowed += [(OmegaConfNode, name) for name in _OMEGACONF_NAMES]
    allowed += [(TypingMarker, "typing.Any"), (TypingMarker, "pytorch_lightning.utilities.parsing.AttributeDict"),
                (TypingMarker, "lightning.pytorch.utilities.parsing.AttributeDict")]
    return allowed


def safe_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with the official files' plain classes allow-listed."""
    with torch.serialization.safe_globals(_allow_list()):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def to_plain(obj: Any) -> Any:
    """Recursively turn Namespaces, OmegaConf stand-ins and containers into plain Python data."""
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, OmegaConfNode):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:
            return to_plain(state["_content"])
        if "_val" in state:
            return to_plain(state["_val"])
        return None
    if isinstance(obj, PickledState):
        return to_plain(obj.state) if isinstance(obj.state, (dict, list)) else None
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
