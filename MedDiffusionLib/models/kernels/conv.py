""":class:`FastConv3d`: CPU float32 3-D convolutions on the measured fastest kernel (``slow_conv3d``,
oneDNN, oneDNN channels-last or a matrix product), same parameters and results."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .choices import TUNE_MAX_FLOP, TUNE_MAX_VOXELS, measured_choice
from .derived import derived_tensor


def fast_kernels_available() -> bool:
    """Whether this torch build has oneDNN (mkldnn); without it the fast modules run PyTorch's path."""
    return bool(torch.backends.mkldnn.is_available())


_ONEDNN = fast_kernels_available()


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is channels-last 3-D and not also plain contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose CPU float32 inference runs the fastest of three kernels, measured once
    per call signature (:func:`~.choices.measured_choice`):

    * ``gemm``: PyTorch's ``slow_conv3d`` (im2col + one matrix product) on contiguous maps;
    * ``onednn``: oneDNN on contiguous maps;
    * ``onednn-cl``: oneDNN on channels-last maps, with a cached channels-last copy of the weight
      (the output is channels-last).

    Which wins depends on the torch build, the CPU and the shape, not on one version's size rule:
    oneDNN is 2-8x faster than ``slow_conv3d`` on BiFlowNet's 16^3 maps, and channels-last often
    another 1.2-1.8x, while on the released model's 2^3 bottom maps oneDNN spends 20-40 ms
    re-ordering a 36 MB weight that ``slow_conv3d`` reads once (~7 ms). Taps that can only read
    zero padding (an axis of one voxel) are dropped first. Convolutions over
    :data:`~.choices.TUNE_MAX_FLOP` or on maps over :data:`~.choices.TUNE_MAX_VOXELS` are not
    timed (oneDNN in the input's layout). Anything else (autograd, autocast, CUDA, compile) takes
    the usual path."""

    def _eligible(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5 and _ONEDNN
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and self.weight.dtype == torch.float32 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling())

    def _weight(self, crop: tuple[bool, ...], channels_last: bool) -> torch.Tensor:
        """The weight without the taps that only read padding, in the asked layout (cached while the
        parameter is unchanged)."""
        w = self.weight
        if not any(crop) and (not channels_last or w.is_contiguous(memory_format=torch.channels_last_3d)):
            return w

        def build() -> torch.Tensor:
            v = w.detach()
            for i, c in enumerate(crop):
                if c:
                    v = v.narrow(2 + i, self.kernel_size[i] // 2, 1)
            return v.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)

        return derived_tensor(self, (crop, channels_last), (w,), build)

    def _plan(self, x: torch.Tensor, choice: str) -> tuple:
        # axes where the input has one voxel and the kernel is centred (odd, padding k//2, stride 1):
        # every tap but the centre reads zero padding there, so those taps are dropped
        crop = tuple(x.shape[2 + i] == 1 and self.kernel_size[i] % 2 == 1 and self.stride[i] == 1
                     and self.dilation[i] == 1 and self.padding[i] == self.kernel_size[i] // 2 for i in range(3))
        pad = [0 if c else p for c, p in zip(crop, self.padding)]
        return choice, crop, pad, list(self.stride), list(self.dilation)

    def _run(self, plan: tuple, x: torch.Tensor) -> torch.Tensor:
        choice, crop, pad, stride, dilation = plan
        if choice == "matmul":  # 1x1x1: a matrix product over the channels, in the input's layout
            return self._pointwise(x)
        cl = choice == "onednn-cl"
        x = x.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
        w = self._weight(crop, cl)
        if choice == "gemm":
            return torch.ops.aten.slow_conv3d(x, w, w.shape[2:], self.bias, stride, pad)
        return torch.ops.aten.mkldnn_convolution(x, w, self.bias, pad, stride, dilation, self.groups)

    def _pointwise(self, x: torch.Tensor) -> torch.Tensor:
        b, cin, d, h, w = x.shape
        weight = self.weight.view(self.out_channels, cin)
        bias = self.bias if self.bias is not None else weight.new_zeros(self.out_channels)
        if _is_channels_last(x):
            out = torch.addmm(bias, x.permute(0, 2, 3, 4, 1).reshape(-1, cin), weight.t())
            return out.view(b, d, h, w, -1).permute(0, 4, 1, 2, 3)
        out = torch.baddbmm(bias.view(1, -1, 1), weight.expand(b, -1, -1), x.reshape(b, cin, -1))
        return out.view(b, -1, d, h, w)

    def _choose(self, x: torch.Tensor, cl: bool) -> str:
        pointwise = self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.groups == 1
        flop = 2.0 * x.shape[0] * math.prod(x.shape[2:]) * self.weight.numel() / math.prod(self.stride)
        if flop > TUNE_MAX_FLOP or math.prod(x.shape[2:]) > TUNE_MAX_VOXELS:
            return "matmul" if pointwise else "onednn-cl" if cl else "onednn"
        order = ("onednn-cl", "onednn") if cl else ("onednn", "onednn-cl")
        if self.groups == 1 and self.dilation == (1, 1, 1):
            order = (order[0], order[1], "gemm") if cl else ("gemm",) + order
        if pointwise:
            order = ("matmul",) + order
        key = ("conv3d", tuple(x.shape), cl, tuple(self.weight.shape), self.stride, self.padding, self.dilation,
               self.groups, torch.get_num_threads())
        return measured_choice(key, {c: functools.partial(self._run, self._plan(x, c), x) for c in order})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._eligible(x):
            return super().forward(x)
        cl = _is_channels_last(x)
        key = (x.shape, cl, torch.get_num_threads())
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = self._plan(x, self._choose(x, cl))
        return self._run(plan, x)
