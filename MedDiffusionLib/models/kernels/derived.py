"""Tensors derived from parameters for inference (re-laid-out, cropped or padded weights), cached
on their module while the parameters are unchanged."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn


def param_tag(t: torch.Tensor) -> tuple[int, int]:
    """Identity and in-place-update count of a parameter, for caches derived from it. Tensors
    made under ``torch.inference_mode`` have no version counter: their tag is their storage only."""
    return t.data_ptr(), (-1 if t.is_inference() else t._version)


def derived_tensor(module: nn.Module, key: Any, params: Sequence[torch.Tensor],
                   build: Callable[[], Any]) -> Any:
    """``build()`` cached on ``module`` under ``key`` while ``params`` are unchanged (same storage,
    no in-place update): re-laid-out or padded weights for inference."""
    tag = tuple(param_tag(p) for p in params)
    cache = module.__dict__.setdefault("_weight_cache", {})
    hit = cache.get(key)
    if hit is None or hit[0] != tag:
        hit = cache[key] = (tag, build())
    return hit[1]
