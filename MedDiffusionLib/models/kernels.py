"""Faster kernels for the same arithmetic: oneDNN for CPU 3-D convolutions, and ``torch.compile``
with a fallback to eager execution.

PyTorch picks oneDNN (mkldnn) for a batch-1 float32 ``Conv3d`` only when ``C x D x H`` of the
input exceeds 20480; below that it runs ``slow_conv3d`` (im2col + GEMM), 2-8x slower for the
small latent maps of BiFlowNet and the decoder's lower levels. :func:`use_fast_kernels` swaps the
class of every ``nn.Conv3d`` with a spatial kernel for :class:`FastConv3d`, which calls oneDNN
directly in inference. GroupNorms become :class:`FastGroupNorm`, whose channels-last statistics
stay accurate over millions of voxels (PyTorch's channels-last kernel does not). Parameters,
state-dict keys and results (to float32 rounding, ~1e-6) stay the same; switching back restores
the reference modules.

The fast-mode recipe (oneDNN convolutions plus a channels-last decoder) is
:func:`apply_kernel_mode`; which mode a module runs is read back from the module itself with
:func:`kernel_mode`, so two pipelines sharing a network cannot disagree about it.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import UserError

KERNEL_MODES = ("fast", "reference")


def fast_kernels_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs oneDNN on CPU float32 inference; anything else takes the usual path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
                and fast_kernels_available()
                and self.weight.dtype == torch.float32 and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not torch.is_autocast_enabled("cpu")):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, list(self.padding),
                                                     list(self.stride), list(self.dilation), self.groups)
        return super().forward(x)


GROUP_NORM_BLOCK = 256  # voxels summed in float32 (one BLAS product) before float64 accumulation


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, channel) sums of ``x`` and of ``x**2`` (float64, shape ``(B, C)``) of a
    ``(B, C, D, H, W)`` map, channels-last or contiguous: blocks of :data:`GROUP_NORM_BLOCK`
    voxels are summed in float32 by matrix products, the blocks in float64 (relative error
    ~1e-8 over millions of voxels, several times faster than ``var_mean`` on channels-last maps)."""
    b, c = x.shape[:2]
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    # (B, N, C) for channels-last input, else (B, C, N): a view either way when x is dense
    flat = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c) if channels_last else x.reshape(b, c, -1)
    n = x[0, 0].numel()
    k = min(GROUP_NORM_BLOCK, n)
    nb = n // k
    if channels_last:
        ones = flat.new_ones(1, k)
        main = flat[:, :nb * k].reshape(b, nb, k, c)
        s = (ones @ main).double().sum((1, 2))
        ss = (ones @ main.square()).double().sum((1, 2))
        rest = flat[:, nb * k:].double()
        dim = 1
    else:
        ones = flat.new_ones(k, 1)
        main = flat[..., :nb * k].reshape(b, c, nb, k)
        s = (main @ ones).double().sum((2, 3))
        ss = (main.square() @ ones).double().sum((2, 3))
        rest = flat[..., nb * k:].double()
        dim = 2
    if rest.numel():
        s += rest.sum(dim)
        ss += rest.square().sum(dim)
    return s, ss


def group_norm_affine(norm: nn.GroupNorm, s: torch.Tensor, ss: torch.Tensor, count: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, channel) ``scale, shift`` (float64, ``(B, C)``, on the sums' device) such that
    ``x * scale + shift == norm(x)``, from the map's channel sums ``s``, ``ss`` over ``count`` voxels."""
    b, c = s.shape
    g = norm.num_groups
    n = count * (c // g)
    mean = s.view(b, g, -1).sum(-1) / n
    var = (ss.view(b, g, -1).sum(-1) / n - mean * mean).clamp_min(0.0)
    scale = (var + norm.eps).rsqrt().repeat_interleave(c // g, dim=1)
    if norm.affine:
        scale = scale * norm.weight.detach().to(s.device, torch.float64)
    shift = -mean.repeat_interleave(c // g, dim=1) * scale
    if norm.affine:
        shift = shift + norm.bias.detach().to(s.device, torch.float64)
    return scale, shift


class FastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose channels-last inference computes its statistics accurately.

    PyTorch's channels-last GroupNorm kernel accumulates the statistics of millions of voxels in
    a way that loses ~5e-4 (relative) on maps with a non-zero mean; the decoder at 128^3 then
    drifts 1.7e-3 from the reference. Here the sums come from :func:`channel_moments` (float32
    blocks, float64 totals) and the normalisation is one ``addcmul``. Contiguous input, autograd
    and autocast take the usual path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 5 or x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last_3d)
                or x.is_contiguous() or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)
                or (torch.is_grad_enabled() and (x.requires_grad or (self.weight is not None and self.weight.requires_grad)))):
            return super().forward(x)
        b, c = x.shape[:2]
        scale, shift = group_norm_affine(self, *channel_moments(x), x[0, 0].numel())
        return torch.addcmul(shift.float().view(b, c, 1, 1, 1), x, scale.float().view(b, c, 1, 1, 1))


def use_fast_kernels(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch ``module``'s 3-D convolutions (kernel > 1) to :class:`FastConv3d` and its GroupNorms
    to :class:`FastGroupNorm`, or back, in place. 1x1x1 convolutions stay: PyTorch's own path is
    faster for them. Without oneDNN the swapped modules take PyTorch's usual path (the swap still
    records the mode). Returns ``module``."""
    for m in module.modules():
        if enabled and type(m) is nn.Conv3d and max(m.kernel_size) > 1:
            m.__class__ = FastConv3d
        elif enabled and type(m) is nn.GroupNorm:
            m.__class__ = FastGroupNorm
        elif not enabled and type(m) in (FastConv3d, FastGroupNorm):
            m.__class__ = nn.Conv3d if type(m) is FastConv3d else nn.GroupNorm
    return module


def uses_fast_kernels(module: nn.Module) -> bool:
    return any(type(m) is FastConv3d for m in module.modules())


def apply_kernel_mode(module: nn.Module, mode: str) -> nn.Module:
    """The fast-mode recipe, in place: ``"fast"`` = :class:`FastConv3d` for every spatial 3-D
    convolution plus channels-last weights for a ``decoder`` sub-module (oneDNN/cuDNN prefer it at
    the decoder's full-resolution levels; BiFlowNet's small maps run faster contiguous);
    ``"reference"`` undoes both. Every pipeline and caller sharing ``module`` sees the switch."""
    if mode not in KERNEL_MODES:
        raise UserError(f"unknown mode {mode!r}; use fast or reference")
    fast = mode == "fast"
    use_fast_kernels(module, fast)
    decoder = getattr(module, "decoder", None)
    if isinstance(decoder, nn.Module):
        decoder.to(memory_format=torch.channels_last_3d if fast else torch.contiguous_format)
    return module


def kernel_mode(module: nn.Module) -> str:
    """``"fast"`` or ``"reference"``: the kernels ``module`` runs now (read from the module)."""
    return "fast" if uses_fast_kernels(module) else "reference"


def _compile_failures() -> tuple[type[BaseException], ...]:
    """Exception types that mean "torch.compile cannot compile this here" (not errors of the run)."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    names = [(dynamo_exc, "BackendCompilerFailed"), (dynamo_exc, "Unsupported"), (dynamo_exc, "InvalidBackend"),
             (dynamo_exc, "InternalTorchDynamoError"), (inductor_exc, "InductorError"),
             (inductor_exc, "CppCompileError"), (inductor_exc, "InvalidCxxCompiler"), (inductor_exc, "OperatorIssue")]
    return tuple(getattr(mod, name) for mod, name in names if isinstance(getattr(mod, name, None), type))


class CompiledOrEager:
    """``torch.compile(module)`` (static shapes; weights frozen as constants, which lets inductor
    pre-pack convolutions and fold the conditioning MLPs). If compiling is impossible here (no C++
    compiler, unsupported platform or Python) the first call warns once and every call runs the
    eager module, so a run never fails because of compilation. Only compilation failures are caught:
    an error of the run itself (out of memory, a shape error, cancellation) propagates and leaves
    compilation on. Inference only."""

    def __init__(self, module: nn.Module, backend: str = "inductor"):
        self.module = module
        self.compiled: Any = None
        self.error: str | None = None
        try:
            self.compiled = torch.compile(module, dynamic=False, backend=backend)
        except Exception as exc:  # noqa: BLE001 - torch.compile unsupported on this platform / Python
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
            except _compile_failures() as exc:  # compile-time failure surfaces at the first call
                self._give_up(exc)
        return self.module(*args, **kwargs)
