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

The fast-mode recipe (oneDNN convolutions plus a channels-last decoder) is :func:`accelerate`,
which makes a new module in that form and never changes the one it is given; :func:`form_for`
gives a module's form for a kernel mode, and :func:`kernel_mode` reads back which mode a module
runs.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..paths import kernel_choices_dir
from .dit import Attention
from .unet_blocks import PreNorm, Residual, SpatialAttention

KERNEL_MODES = ("fast", "reference")
log = logging.getLogger(__name__)


def fast_kernels_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


_ONEDNN = fast_kernels_available()


_CHOICES: dict[tuple, str] = {}
TUNE_ROUNDS = 4  # the first round also warms oneDNN's primitive cache
# Larger convolutions are not timed: oneDNN in the input's layout wins there, and timing three
# kernels four times would cost more than it saves (a decoder runs each of its convolutions once).
TUNE_MAX_FLOP = 2e9
TUNE_MAX_VOXELS = 4096  # 16^3


def kernel_choices() -> dict[tuple, str]:
    """The kernels measured and chosen in this process, by call signature (operation, shapes,
    layout, threads). A cache of measurements, not a setting: every choice computes the same
    result to float32 rounding."""
    return dict(_CHOICES)


def measured_choice(key: tuple, candidates: dict[str, Callable[[], Any]]) -> str:
    """The fastest of ``candidates`` (name -> call) for ``key``, measured once per machine.

    Candidates run round-robin (a burst of load hits all of them alike) and keep their best time;
    the first candidate within 10 % of the fastest wins, so list the preferred one first. The
    choice is recorded in ``$MEDDIFFUSION_CACHE/kernels`` (per torch build, CPU capability and
    machine; the first process to record a key wins), so every later process, the job service
    included, runs the same kernels: the choices differ in float rounding, and a flipped rounding
    can flip a nearest codebook entry, so the same seed must meet the same kernels."""
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    stored = _stored_choices().get(repr(key))
    if stored in candidates:
        _CHOICES[key] = stored
        return stored
    times = dict.fromkeys(candidates, float("inf"))
    for _ in range(TUNE_ROUNDS):
        for name, call in candidates.items():
            t0 = time.perf_counter()
            call()
            times[name] = min(times[name], time.perf_counter() - t0)
    fastest = min(times.values())
    measured = next(n for n, t in times.items() if t <= 1.1 * fastest)
    log.debug("%s: %s -> %s", key, {n: f"{t * 1e3:.2f} ms" for n, t in times.items()}, measured)
    recorded = _record_choice(repr(key), measured)
    choice = _CHOICES[key] = recorded if recorded in candidates else measured
    return choice


def _choices_file() -> Path:
    name = f"{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-{platform.machine()}"
    return kernel_choices_dir() / f"choices-{name.replace('/', '_')}.json"


def kernel_choices_recorded() -> bool:
    """Whether this machine and torch build have recorded kernel choices (else the first fast CPU
    run times the candidates, :func:`measured_choice`); choices made in this process count too."""
    return bool(_CHOICES) or _choices_file().exists()


def _read_choices(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=8)
def _stored_choices_at(path: Path) -> dict[str, str]:
    return _read_choices(path)


def _stored_choices() -> dict[str, str]:
    """The recorded choices of this machine (read once per process and cache location)."""
    return _stored_choices_at(_choices_file())


def _record_choice(key: str, choice: str) -> str:
    """Record ``choice`` for ``key`` unless another process recorded one first; return the
    recorded choice. A cache that cannot be written keeps the choice for this process only."""
    from filelock import FileLock

    path = _choices_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            data = _read_choices(path)
            choice = data.setdefault(key, choice)
            _stored_choices().update(data)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
            os.replace(tmp, path)
    except OSError as exc:  # read-only or full cache: this process still runs its measured choice
        log.debug("kernel choices not recorded (%s)", exc)
    return choice


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


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose CPU float32 inference runs the fastest of three kernels, measured once
    per call signature in this process (:func:`measured_choice`):

    * ``gemm``: PyTorch's ``slow_conv3d`` (im2col + one matrix product) on contiguous maps;
    * ``onednn``: oneDNN on contiguous maps;
    * ``onednn-cl``: oneDNN on channels-last maps, with a cached channels-last copy of the weight
      (the output is channels-last).

    Which wins depends on the torch build, the CPU and the shape, not on one version's size rule:
    oneDNN is 2-8x faster than ``slow_conv3d`` on BiFlowNet's 16^3 maps, and channels-last often
    another 1.2-1.8x, while on the released model's 2^3 bottom maps oneDNN spends 20-40 ms
    re-ordering a 36 MB weight that ``slow_conv3d`` reads once (~7 ms). Taps that can only read
    zero padding (an axis of one voxel) are dropped first. Convolutions over
    :data:`TUNE_MAX_FLOP` or on maps over :data:`TUNE_MAX_VOXELS` are not timed (oneDNN in the
    input's layout). Anything else (autograd,
    autocast, CUDA, compile) takes the usual path."""

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


ACCURATE_GROUP_NORM_VOXELS = 16384  # below this PyTorch's channels-last statistics are accurate (<1e-6) and faster
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
        if x[0, 0].numel() < ACCURATE_GROUP_NORM_VOXELS:
            return super().forward(x)
        b, c = x.shape[:2]
        scale, shift = group_norm_affine(self, *channel_moments(x), x[0, 0].numel())
        return torch.addcmul(shift.float().view(b, c, 1, 1, 1), x, scale.float().view(b, c, 1, 1, 1))


class FastAttention(Attention):
    """DiT attention whose inference pads each head to a width the CPU kernels handle well.

    PyTorch's CPU flash-attention kernel is ~2x slower for the released model's 9-channel heads
    than for 16-channel ones; zero channels change no dot product and no output, so the ``qkv``
    projection is run with zero rows appended per head (cached weights) and the padding sliced
    off. The head width (as is, or rounded up to 8 or 16) is measured once per shape."""

    def _padded(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self.qkv.weight, self.qkv.bias
        hd = w.shape[1] // self.num_heads

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            pw = w.new_zeros(3, self.num_heads, width, w.shape[1])
            pw[:, :, :hd] = w.detach().view(3, self.num_heads, hd, -1)
            pb = b.new_zeros(3, self.num_heads, width)
            pb[:, :, :hd] = b.detach().view(3, self.num_heads, hd)
            return pw.view(-1, w.shape[1]), pb.view(-1)

        return derived_tensor(self, width, (w, b), build)

    def _attend(self, x: torch.Tensor, width: int) -> torch.Tensor:
        n, t, c = x.shape
        hd = c // self.num_heads
        if width == hd:
            return super().forward(x)
        qkv = F.linear(x, *self._padded(width)).view(n, t, 3, self.num_heads, width).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=hd ** -0.5)[..., :hd]
        return self.proj(out.transpose(1, 2).reshape(n, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hd = x.shape[-1] // self.num_heads
        if torch.is_grad_enabled() or x.device.type != "cpu" or hd % 8 == 0 or torch.compiler.is_compiling():
            return super().forward(x)
        widths = dict.fromkeys((hd, -(-hd // 8) * 8, -(-hd // 16) * 16))
        key = ("dit-attention", tuple(x.shape), self.num_heads, x.dtype, torch.get_num_threads())
        width = int(measured_choice(key, {str(wd): functools.partial(self._attend, x, wd) for wd in widths}))
        return self._attend(x, width)


class FastAttentionResidual(Residual):
    """``x + attention(layer_norm(x))`` over voxels, computed on the channels-last token view: one
    ``layer_norm``, the ``qkv`` product, SDPA and the output projection plus residual as one
    ``addmm`` (the reference runs ~25 operations). The output is channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        norm, attn = self.fn.norm, self.fn.fn
        b, c, d, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)  # a view when x is channels-last
        n = tokens.shape[1]
        normed = F.layer_norm(tokens, (c,), norm.gamma.view(c), None, norm.eps)
        qkv = attn.to_qkv(normed).view(b, n, 3, attn.heads, attn.dim_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b * n, -1)
        proj = attn.to_out.weight.view(c, -1)
        res = torch.addmm(tokens.reshape(b * n, c), out, proj.t())
        if attn.to_out.bias is not None:
            res += attn.to_out.bias
        return res.view(b, d, h, w, c).permute(0, 4, 1, 2, 3)


def use_fast_kernels(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch ``module``'s 3-D convolutions to :class:`FastConv3d`, GroupNorms to
    :class:`FastGroupNorm`, DiT attention to :class:`FastAttention` and voxel attention blocks to
    :class:`FastAttentionResidual`, or back, in place (same parameters and state-dict keys).
    Without oneDNN the swapped modules take PyTorch's usual path (the swap still records the
    mode). Returns ``module``."""
    swaps = {nn.Conv3d: FastConv3d, nn.GroupNorm: FastGroupNorm, Attention: FastAttention}
    back = {fast: plain for plain, fast in swaps.items()}
    back[FastAttentionResidual] = Residual
    for m in module.modules():
        if enabled and type(m) in swaps:
            m.__class__ = swaps[type(m)]
        elif enabled and type(m) is Residual and isinstance(m.fn, PreNorm) and isinstance(m.fn.fn, SpatialAttention):
            m.__class__ = FastAttentionResidual
        elif not enabled and type(m) in back:
            m.__class__ = back[type(m)]
            m.__dict__.pop("_weight_cache", None)
            m.__dict__.pop("_plans", None)
    return module


def uses_fast_kernels(module: nn.Module) -> bool:
    return any(type(m) is FastConv3d for m in module.modules())


@dataclass(frozen=True)
class AccelerationPlan:
    """The form :func:`accelerate` makes: ``kernels`` (the fast convolution / GroupNorm / attention
    subclasses; False: the plain reference classes), ``channels_last_decoder`` (a ``decoder``
    sub-module in channels-last weights; False: contiguous) and ``compile`` (``torch.compile``
    through :class:`CompiledOrEager`)."""

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
    import copy

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
