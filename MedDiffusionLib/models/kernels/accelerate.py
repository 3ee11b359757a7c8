"""The one seam between reference and fast modules: :func:`accelerate` makes a module's fast (or
reference) form as a new module and never changes the one it is given; :func:`form_for` gives a
module's form for a kernel mode and :func:`kernel_mode` reads back the mode a module runs."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ..dit import Attention
from ..unet_blocks import PreNorm, Residual, SpatialAttention
from .attention import FastAttention, FastAttentionResidual
from .compiled import CompiledOrEager
from .conditioning import FAST_CONDITIONING
from .conv import FastConv3d, fast_kernels_available
from .norm import FastGroupNorm

KERNEL_MODES = ("fast", "reference")

_SWAPS: dict[type, type] = {nn.Conv3d: FastConv3d, nn.GroupNorm: FastGroupNorm, Attention: FastAttention,
                            **FAST_CONDITIONING}
_BACK: dict[type, type] = {fast: plain for plain, fast in _SWAPS.items()} | {FastAttentionResidual: Residual}
_DERIVED_CACHES = ("_weight_cache", "_plans", "_fused_projection_cache")


def _is_voxel_attention(m: nn.Module) -> bool:
    return type(m) is Residual and isinstance(m.fn, PreNorm) and isinstance(m.fn.fn, SpatialAttention)


def use_fast_kernels(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch, in place, ``module``'s 3-D convolutions to :class:`FastConv3d`, GroupNorms to
    :class:`FastGroupNorm`, DiT attention to :class:`FastAttention`, voxel attention blocks to
    :class:`FastAttentionResidual` and BiFlowNet / ControlNet with their conditioned blocks to the
    fused-conditioning classes of :mod:`.conditioning`, or back (same parameters and state-dict
    keys). Without oneDNN the swapped modules take PyTorch's usual path (the swap still records the
    mode). Returns ``module``. :func:`accelerate` does this on a copy."""
    for m in module.modules():
        if enabled and type(m) in _SWAPS:
            m.__class__ = _SWAPS[type(m)]
        elif enabled and _is_voxel_attention(m):
            m.__class__ = FastAttentionResidual
        elif not enabled and type(m) in _BACK:
            m.__class__ = _BACK[type(m)]
            for name in _DERIVED_CACHES:
                m.__dict__.pop(name, None)
    return module


def uses_fast_kernels(module: nn.Module) -> bool:
    """Whether ``module`` holds a fast convolution (the mark of the fast form)."""
    return any(type(m) is FastConv3d for m in module.modules())


@dataclass(frozen=True)
class AccelerationPlan:
    """The form :func:`accelerate` makes: ``kernels`` (the fast convolution / GroupNorm / attention /
    fused-conditioning subclasses; False: the plain reference classes), ``channels_last_decoder`` (a
    ``decoder`` sub-module in channels-last weights; False: contiguous) and ``compile``
    (``torch.compile`` through :class:`~.compiled.CompiledOrEager`)."""

    kernels: bool = True
    channels_last_decoder: bool = True
    compile: bool = False


def mode_plan(mode: str) -> AccelerationPlan:
    """The plan of a kernel mode: ``"fast"`` (the pipelines' default) or ``"reference"``."""
    if mode not in KERNEL_MODES:
        raise UserError(f"unknown mode {mode!r}; use fast or reference")
    return AccelerationPlan() if mode == "fast" else AccelerationPlan(kernels=False, channels_last_decoder=False)


@dataclass
class Accelerated:
    """A module in the form a plan asked for, and what was applied to make it (in order)."""

    module: Any
    applied: tuple[str, ...]


def _channels_last(module: nn.Module) -> bool:
    w = next((p for p in module.parameters() if p.dim() == 5), None)
    return w is not None and w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()


def accelerate(module: nn.Module, plan: AccelerationPlan = AccelerationPlan()) -> Accelerated:
    """``module`` in the form ``plan`` asks for, as a new module; ``module`` itself is never changed
    (its classes, weights and weight layouts stay as they are). The new module shares the parameter
    tensors, except where a layout changes (a decoder switched to or from channels-last gets its own
    copies). ``applied`` names what changed: ``"kernels"`` / ``"reference_kernels"``,
    ``"channels_last_decoder"`` / ``"contiguous_decoder"``, ``"compile"``."""
    decoder = getattr(module, "decoder", None)
    relayout = isinstance(decoder, nn.Module) and _channels_last(decoder) != plan.channels_last_decoder
    own = {id(t) for t in (*decoder.parameters(), *decoder.buffers())} if relayout else set()
    shared = {id(t): t for t in (*module.parameters(), *module.buffers()) if id(t) not in own}
    form = copy.deepcopy(module, memo=dict(shared))
    applied: list[str] = []
    if plan.kernels or uses_fast_kernels(form):
        use_fast_kernels(form, plan.kernels)
        applied.append("kernels" if plan.kernels else "reference_kernels")
    if relayout:
        form.decoder.to(memory_format=torch.channels_last_3d if plan.channels_last_decoder else torch.contiguous_format)
        applied.append("channels_last_decoder" if plan.channels_last_decoder else "contiguous_decoder")
    if plan.compile:
        return Accelerated(CompiledOrEager(form), (*applied, "compile"))
    return Accelerated(form, tuple(applied))


def form_for(module: nn.Module, mode: str) -> nn.Module:
    """``module`` in kernel mode ``mode``: itself when it already is, else its :func:`accelerate`
    form (the module passed in is never switched in place)."""
    plan = mode_plan(mode)
    decoder = getattr(module, "decoder", None)
    layout_ok = not isinstance(decoder, nn.Module) or _channels_last(decoder) == plan.channels_last_decoder
    if kernel_mode(module) == mode and layout_ok:
        return module
    return accelerate(module, plan).module


def kernel_mode(module: nn.Module) -> str:
    """``"fast"`` or ``"reference"``: the kernels ``module`` runs now (read from the module)."""
    return "fast" if uses_fast_kernels(module) else "reference"


__all__ = ["KERNEL_MODES", "AccelerationPlan", "Accelerated", "accelerate", "fast_kernels_available", "form_for",
           "kernel_mode", "mode_plan", "use_fast_kernels", "uses_fast_kernels"]
