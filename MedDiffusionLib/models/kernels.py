"""Faster kernels for the same arithmetic: oneDNN for CPU 3-D convolutions, and ``torch.compile``
with a fallback to eager execution.

PyTorch picks oneDNN (mkldnn) for a batch-1 float32 ``Conv3d`` only when ``C x D x H`` of the
input exceeds 20480; below that it runs ``slow_conv3d`` (im2col + GEMM), 2-8x slower for the
small latent maps of BiFlowNet and the decoder's lower levels. :func:`use_fast_kernels` swaps the
class of every ``nn.Conv3d`` with a spatial kernel for :class:`FastConv3d`, which calls oneDNN
directly in inference. Parameters, state-dict keys and results (to float32 rounding, ~1e-6)
stay the same; switching back restores the reference modules.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def fast_kernels_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs oneDNN on CPU float32 inference; anything else takes the usual path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not torch.is_autocast_enabled("cpu")):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, list(self.padding),
                                                     list(self.stride), list(self.dilation), self.groups)
        return super().forward(x)


def use_fast_kernels(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch ``module``'s 3-D convolutions (kernel > 1) to :class:`FastConv3d` or back, in place.
    1x1x1 convolutions stay: PyTorch's own path is faster for them. Returns ``module``."""
    if enabled and not fast_kernels_available():
        return module
    for m in module.modules():
        if enabled and type(m) is nn.Conv3d and max(m.kernel_size) > 1:
            m.__class__ = FastConv3d
        elif not enabled and type(m) is FastConv3d:
            m.__class__ = nn.Conv3d
    return module


def uses_fast_kernels(module: nn.Module) -> bool:
    return any(type(m) is FastConv3d for m in module.modules())


class CompiledOrEager:
    """``torch.compile(module)`` (static shapes; weights frozen as constants, which lets inductor
    pre-pack convolutions and fold the conditioning MLPs). If compiling is impossible here (no C++
    compiler, unsupported platform or Python) the first call warns once and every call runs the
    eager module, so a run never fails because of compilation. Inference only."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.compiled: Any = None
        self.error: str | None = None
        try:
            self.compiled = torch.compile(module, dynamic=False)
        except Exception as exc:  # torch.compile unsupported on this platform / Python
            self._give_up(exc)

    @staticmethod
    def _freezing():
        """Inductor's ``freezing`` switch for this call only (``torch.compile(options=...)`` does not
        reach it); compilation happens lazily inside the call, and again on a new input shape."""
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)

    def _give_up(self, exc: BaseException) -> None:
        self.compiled = None
        self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        warnings.warn(f"torch.compile is not usable here ({self.error[:300]}); running uncompiled",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                with self._freezing():
                    return self.compiled(*args, **kwargs)
            except Exception as exc:  # compile-time failure surfaces at the first call
                self._give_up(exc)
        return self.module(*args, **kwargs)
