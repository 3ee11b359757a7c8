"""Class-conditional generation: noise -> BiFlowNet sampler -> de-normalise -> decode -> volumes.

Sizes are given as image voxels ``(X, Y, Z)`` = NIfTI ``(i, j, k)``; the network works on
``(D, H, W) = (Z, X, Y)`` and latents are ``1/f`` of that per axis (f = 4 or 8).
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..data.grid import legal_size
from ..data.volumes import Volume, model_to_hu
from ..defaults import generation_defaults
from ..devices import resolve_device
from ..errors import Cancelled, UserError
from ..memory import available_memory_bytes
from ..decoding import DecodePlan, decode_retrying, plan_decode, resolve_tiling
from ..models.autoencoder import PatchVolumeAE
from ..models.biflownet import BiFlowNet
from ..models.kernels import KERNEL_MODES, form_for, mode_plan, param_tag
from ..models.precompiled import PrecompiledNoise, find_or_build, package_path, weights_digest
from ..registry import ModelEntry
from ..schedulers import NUM_TRAIN_TIMESTEPS, GaussianDiffusion, draw_noise, scheduler_for
from .loop import CancelFn, ProgressFn, StepCallback, denoise

log = logging.getLogger("meddiffusion")
# time a sampler step for the estimate only when the sampler's memory is below this and free memory is unknown
MEASURE_UNKNOWN_MEMORY_BYTES = 2 * 2 ** 30


_TF32_LOCK = threading.Lock()
_TF32_BLOCKS = {"exact": 0, "tf32": 0, "saved": None}  # open blocks, and the flags before the first one


def _set_tf32(on: bool) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on


@contextmanager
def tf32_allowed(device: torch.device, allowed: bool) -> Iterator[None]:
    """TF32 in CUDA convolutions and matmuls on (``allowed``) or off while the block runs; the
    flags the process had come back when the last open block ends. They are process-wide torch
    flags, and the job service runs one worker thread per GPU: while any block that needs float32
    (``allowed=False``) is open, TF32 stays off for every block, so an exact run is never made
    inexact by a ``tf32`` run on another GPU (the ``tf32`` run is then merely slower)."""
    if device.type != "cuda":
        yield
        return
    kind = "tf32" if allowed else "exact"
    with _TF32_LOCK:
        if _TF32_BLOCKS["exact"] + _TF32_BLOCKS["tf32"] == 0:
            _TF32_BLOCKS["saved"] = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        _TF32_BLOCKS[kind] += 1
        _set_tf32(_TF32_BLOCKS["exact"] == 0)
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32_BLOCKS[kind] -= 1
            if _TF32_BLOCKS["exact"] + _TF32_BLOCKS["tf32"] == 0:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = _TF32_BLOCKS["saved"]
            else:
                _set_tf32(_TF32_BLOCKS["exact"] == 0)


def _check_limit(memory_limit_bytes: float | None) -> None:
    """A :class:`UserError` unless the memory limit is unset or positive."""
    if memory_limit_bytes is not None and not memory_limit_bytes > 0:
        raise UserError(f"the memory limit must be positive, got {memory_limit_bytes}")


def check_cancel(cancel: CancelFn | None, what: str = "cancelled") -> None:
    """Raise :class:`~MedDiffusionLib.errors.Cancelled` when ``cancel()`` is true."""
    if cancel is not None and cancel():
        raise Cancelled(what)


@dataclass
class GeneratedVolume:
    """One result: ``image`` in model units (float32, network order (D, H, W)) and its geometry."""

    image: np.ndarray
    spacing_xyz: tuple[float, float, float]
    class_index: int
    seed: int
    meta: dict = field(default_factory=dict)

    def volume(self, hu_window: Sequence[float] | None = None) -> Volume:
        arr = self.image if hu_window is None else model_to_hu(self.image, float(hu_window[0]), float(hu_window[1]))
        return Volume.from_network(arr.astype(np.float32), self.spacing_xyz)


class KernelModeMixin:
    """The kernel mode of one pipeline (``"fast"`` or ``"reference"``), its own setting: the
    networks it was given stay as they are, and each mode runs their
    :func:`~MedDiffusionLib.models.kernels.form_for` form (built once, sharing the weights).
    ``noise_model()`` is its noise network in that mode (``_noise_for(mode)``)."""

    _mode: str
    _forms: dict[tuple[str, str], torch.nn.Module]

    def networks(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Run ``"fast"`` or ``"reference"`` kernels from now on (this pipeline only; no module changes)."""
        mode_plan(mode)  # refuses an unknown mode
        self._mode = mode

    def _form(self, name: str, module: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
        """``module`` (this pipeline's network ``name``) in kernel mode ``mode`` (default: the
        pipeline's), built on first use."""
        mode = mode or self.mode
        form = self._forms.get((name, mode))
        if form is None:
            form = self._forms[(name, mode)] = form_for(module, mode)
        return form

    def _noise_for(self, mode: str) -> torch.nn.Module:
        raise NotImplementedError

    def noise_model(self) -> Callable[..., torch.Tensor]:
        """The noise network in this pipeline's kernel mode (eager; the ahead-of-time package of a
        generation run is :meth:`GenerationPipeline.precompiled_network`)."""
        return self._noise_for(self.mode)


class GenerationPipeline(KernelModeMixin):
    """Autoencoder + BiFlowNet + sampler on one device.

    ``mode="fast"`` (default) runs the same float32 arithmetic on faster kernels: oneDNN for every
    CPU 3-D convolution and a channels-last decoder (results within ~1e-5 of the reference; see
    Testing/benchmarks). ``mode="reference"`` is the plain path the parity tests pin.
    In fast float32 mode, BiFlowNet runs as an ahead-of-time compiled package (see
    :mod:`~MedDiffusionLib.models.precompiled`) when one exists in the cache for the latent
    shape, weights, device and torch build (``precompiled=False`` never uses one);
    ``compile=True`` builds the missing package first (one-time, ~1.5 min on a 2-core CPU; falls
    back to eager where compiling is impossible).
    ``precision`` bf16/fp16 is autocast on top of either mode (not float32-exact: opt-in).
    ``memory_limit_bytes`` is the default cap on the memory a decode plans for (default: 80 % of
    what is free); a call's own ``memory_limit_bytes`` (:meth:`decode`) replaces it. Nothing a job
    asks for is stored on the pipeline: the job service shares one between jobs.

    The kernel mode (:attr:`mode`) is this pipeline's own setting: the modules it is given are never
    switched in place; each mode runs their :func:`~MedDiffusionLib.models.kernels.form_for` form
    (built once, sharing the weights), so pipelines sharing modules never change each other.
    """

    PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    MODES = KERNEL_MODES

    def __init__(self, autoencoder: PatchVolumeAE, biflownet: BiFlowNet, entry: ModelEntry | None = None,
                 device: str | torch.device | None = "cpu", timesteps: int = NUM_TRAIN_TIMESTEPS, precision: str = "fp32",
                 mode: str = "fast", compile: bool = False, memory_limit_bytes: float | None = None,
                 precompiled: bool = True):
        self.device = resolve_device(None if device is None else str(device))
        self._ae_given = autoencoder.eval().to(self.device)
        self._net_given = biflownet.eval().to(self.device)
        self._forms = {}
        self.entry = entry
        self.diffusion = GaussianDiffusion(timesteps, device=self.device)
        if precision not in self.PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
        self.precision = precision
        self.compile, self.precompiled = bool(compile), bool(precompiled)
        _check_limit(memory_limit_bytes)
        self.memory_limit_bytes = memory_limit_bytes  # default cap on what a decode may plan to use; never set per job
        # ahead-of-time packages replace torch.compile here
        self._packages: dict[Path, PrecompiledNoise] = {}
        self._digest: tuple[list, str] | None = None
        self._warm: set[tuple] = set()  # shapes whose warm-up forward :meth:`time_forward` already ran
        self._decode_warm: set[tuple] = set()  # (mode, precision, device) whose decoder ran a warm-up
        self.set_mode(mode)

    @property
    def ae(self) -> PatchVolumeAE:
        """The autoencoder in this pipeline's kernel mode."""
        return self._form("ae", self._ae_given)

    @property
    def net(self) -> BiFlowNet:
        """The noise network in this pipeline's kernel mode."""
        return self._form("net", self._net_given)

    def _noise_for(self, mode: str) -> torch.nn.Module:
        """BiFlowNet in kernel mode ``mode``."""
        return self._form("net", self._net_given, mode)

    def networks(self) -> list[torch.nn.Module]:
        """The networks this pipeline runs now (its kernel mode's forms)."""
        return [self.net, self.ae]

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The networks' arithmetic for this pipeline's precision (weights stay fp32; samplers and
        codebook in fp32). ``fp32`` on CUDA runs with TF32 off: torch lets cuDNN convolutions use
        TF32 by default, which on an H200 moved the parity outputs by up to 1e-2 (tolerance 1e-4)
        and flipped codebook indices. ``tf32`` allows TF32 in convolutions and matmuls; ``bf16`` /
        ``fp16`` are autocast."""
        dtype = self.PRECISIONS[self.precision]
        with tf32_allowed(self.device, self.precision != "fp32"), \
                torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            yield

    @classmethod
    def from_pretrained(cls, model: str | None = None, weights: str | Path | None = None, device: str | None = None,
                        local_files_only: bool | None = None, precision: str = "fp32", mode: str = "fast",
                        compile: bool = False, memory_limit_bytes: float | None = None,
                        precompiled: bool = True) -> "GenerationPipeline":
        from ..weights import load_models

        entry, ae, net = load_models(model, weights, local_files_only, log=log.info)
        return cls(ae, net, entry, device, precision=precision, mode=mode, compile=compile,
                   memory_limit_bytes=memory_limit_bytes, precompiled=precompiled)

    @property
    def compression(self) -> int:
        return self.ae.compression

    def check_class(self, class_index: int) -> None:
        """A :class:`UserError` unless the network was trained for ``class_index``."""
        emb = self.net.cond_emb
        if emb is None:
            if class_index != 0:
                raise UserError(f"this model is unconditional (trained without classes); class {class_index} "
                                "cannot be generated: pass class 0 or leave the class unset")
            return
        if not 0 <= class_index < emb.num_embeddings:
            raise UserError(f"class {class_index} is outside this network's {emb.num_embeddings} classes")

    def latent_shape(self, size_xyz: Sequence[int]) -> tuple[int, int, int]:
        x, y, z = legal_size(size_xyz, self.compression)
        f = self.compression
        return z // f, x // f, y // f

    # -- compiled noise network ----------------------------------------------------------------------
    def _noise_args(self, size_xyz: Sequence[int], batch: int) -> tuple[torch.Tensor, ...]:
        d, h, w = self.latent_shape(size_xyz)
        dev = self.device
        return (torch.zeros(batch, self.net.channels, d, h, w, device=dev), torch.zeros(batch, dtype=torch.long, device=dev),
                torch.zeros(batch, dtype=torch.long, device=dev), torch.zeros(3, device=dev))

    def _weights_digest(self) -> str:
        tag = [param_tag(p) for p in self.net.state_dict().values()]
        if self._digest is None or self._digest[0] != tag:
            self._digest = (tag, weights_digest(self.net))
        return self._digest[1]

    def precompiled_network(self, size_xyz: Sequence[int], batch: int = 1,
                            build: bool | None = None) -> PrecompiledNoise | None:
        """The compiled BiFlowNet package for this size and batch, if the pipeline may use one
        (fast float32 mode, ``precompiled`` or ``compile`` on): from the cache, or built first when
        ``build`` (default: ``self.compile``). ``None`` means the eager network runs."""
        build = self.compile if build is None else build
        if not (build or self.precompiled) or self.precision != "fp32" or self.mode != "fast":
            return None
        args = self._noise_args(size_xyz, batch)
        path = package_path(self.net, args, self._weights_digest())
        if path not in self._packages:
            package = find_or_build(self.net, args, build, self._weights_digest())
            if package is None:
                return None
            self._packages[path] = package
        return self._packages[path]

    # -- steps ---------------------------------------------------------------------------------------
    def generators(self, seed: int | Sequence[int], batch: int) -> torch.Generator | list[torch.Generator]:
        """The run's noise generator(s) on this device: one seeded with ``seed`` for the whole batch
        (the official stream), or, for a list of ``batch`` seeds, one per volume."""
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise UserError(f"{len(seed)} seeds for {batch} volumes: give one seed per volume")
            return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seed]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def sample_latents(self, class_index: int, size_xyz: Sequence[int], seed: int | Sequence[int] = 0, sampler: str | None = None,
                       steps: int | None = None, batch: int = 1, progress: ProgressFn | None = None,
                       cancel: CancelFn | None = None, noise_net: Callable[..., torch.Tensor] | None = None,
                       callback: StepCallback | None = None) -> torch.Tensor:
        """Diffusion-space latents ``(batch, C, d, h, w)``. With a CPU or CUDA generator seeded
        with ``seed`` the noise sequence equals the official ``torch.manual_seed(seed)`` run.
        ``seed`` a list of ``batch`` seeds: volume i's noise comes from its own generator (seeded
        with ``seed[i]``), as in a one-volume run with that seed (:meth:`generators`).
        ``sampler`` and ``steps`` are required, a resolved pair
        (:func:`MedDiffusionLib.defaults.resolve_sampling`; :meth:`generate` resolves them).

        ``noise_net(x, t, y, res) -> eps`` replaces :meth:`noise_model` (a controlled network);
        ``callback(step_index, t, latents, pred_x0)`` sees every step (see :func:`.loop.denoise`)."""
        if batch < 1:
            raise UserError(f"number of volumes must be positive, got {batch}")
        scheduler = scheduler_for(sampler, self.diffusion, steps)
        d, h, w = self.latent_shape(size_xyz)
        gen = self.generators(seed, batch)
        z = draw_noise((batch, self.net.channels, d, h, w), gen, self.device)
        y = torch.full((batch,), int(class_index), dtype=torch.long, device=self.device)
        res = torch.tensor([d, h, w], dtype=torch.float32, device=self.device) / 64.0
        net = noise_net if noise_net is not None else (self.precompiled_network(size_xyz, batch) or self.noise_model())

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return net(x, t, y, res).float()

        with torch.inference_mode():
            return denoise(scheduler, fn, z, gen if scheduler.stochastic else None, progress, cancel, callback)

    def decode(self, latents: torch.Tensor, tiling: str = "auto", cancel: CancelFn | None = None,
               memory_limit_bytes: float | None = None, spill_dir: str | Path | None = None) -> torch.Tensor:
        """Diffusion-space latents ``(B, 8, d, h, w)`` -> images ``(B, 1, D, H, W)`` in model units,
        one volume at a time (:meth:`decode_with_plans` without the plans).

        Each volume is planned (:meth:`decode_plan`) and run by :mod:`MedDiffusionLib.decoding`
        (:func:`~MedDiffusionLib.decoding.decode_retrying`). ``tiling="exact"`` decodes the whole
        volume when it fits in free memory, else streams the decoder stage by stage in cubes, equal
        to the whole decode to float rounding, with its stage maps in GPU memory, RAM or (RAM short
        too) memory-mapped files in ``spill_dir`` (default ``<cache root>/spill``): exact at any
        memory cap, never a silent fallback to blended tiles. ``"seamless"`` (blended tiles sized
        to the memory) and ``"official"`` (the authors' 32^3 tiles) are approximate and run only
        when asked for; ``"whole"`` decodes whole whatever the memory; ``"auto"`` = exact in fast
        kernel mode, official in reference mode.

        ``memory_limit_bytes`` caps what this call plans for (default: the pipeline's
        ``memory_limit_bytes``, else 80 % of the free memory). ``cancel()`` is asked before every
        volume and between the cubes of a tiled decode; when it turns true
        :class:`~MedDiffusionLib.errors.Cancelled` is raised. The outputs are written into one
        float32 CPU tensor as they are decoded (no second copy at the end)."""
        return self.decode_with_plans(latents, tiling, cancel, memory_limit_bytes, spill_dir)[0]

    def decode_with_plans(self, latents: torch.Tensor, tiling: str = "auto", cancel: CancelFn | None = None,
                          memory_limit_bytes: float | None = None,
                          spill_dir: str | Path | None = None) -> tuple[torch.Tensor, list[DecodePlan]]:
        """:meth:`decode`, and how each volume was decoded (:class:`~MedDiffusionLib.decoding.DecodePlan`:
        ``exact`` false for blended or official tiles; ``describe()`` for a person; ``meta()`` for a
        result's metadata; after an out-of-memory retry, the plan that ran)."""
        tiling = self._tiling(tiling)
        _check_limit(memory_limit_bytes)
        out: torch.Tensor | None = None
        plans: list[DecodePlan] = []
        with torch.inference_mode():
            for i, lat in enumerate(latents.split(1)):
                check_cancel(cancel, "decoding cancelled")
                indices = self.ae.quantize(self.ae.denormalize_latent(lat))  # codes are always chosen in fp32
                plan = self.decode_plan(tuple(indices.shape[1:]), tiling, memory_limit_bytes, spill_dir)
                with self.autocast():
                    img, plan = decode_retrying(self.ae, indices, plan, cancel, spill_dir, tiling)
                plans.append(plan)
                if out is None:
                    out = torch.empty((latents.shape[0], *img.shape[1:]), dtype=torch.float32)
                out[i:i + 1] = img
                del img, indices
        if out is None:
            raise UserError("there are no latents to decode (an empty batch)")
        return out, plans

    def _tiling(self, tiling: str) -> str:
        """:func:`~MedDiffusionLib.decoding.resolve_tiling` in this pipeline's kernel mode; unknown
        names are a :class:`UserError` naming the field."""
        try:
            return resolve_tiling(tiling, self.mode)
        except ValueError as exc:
            raise UserError(str(exc), field="tiling") from None

    def decode_plan(self, latent_dhw: Sequence[int], tiling: str = "exact", memory_limit_bytes: float | None = None,
                    spill_dir: str | Path | None = None) -> DecodePlan:
        """How the decode of ``latent_dhw`` will run (method, tile side in latent voxels, peaks, and
        for the exact decode where its stage maps live: GPU memory, RAM or ``spill_dir`` on disk)
        under ``memory_limit_bytes`` (default: the pipeline's) and the free memory
        (:func:`~MedDiffusionLib.decoding.plan_decode`)."""
        from ..models.streaming_decode import spill_directory

        host = None
        if self.device.type == "cuda":
            avail = available_memory_bytes("cpu")
            host = None if avail is None else 0.8 * avail
        return plan_decode(self.ae.config["n_hiddens"], self.compression, latent_dhw,
                           self.memory_budget(memory_limit_bytes), host, self.mode, self.device.type,
                           str(spill_directory(spill_dir)), tiling=self._tiling(tiling))

    def estimate(self, size_xyz: Sequence[int], steps: int, volumes: int = 1, measure: bool = True,
                 memory_limit_bytes: float | None = None, spill_dir: str | Path | None = None,
                 tiling: str = "auto"):
        """Time, peak memory and decode plan of a run of ``volumes`` volumes, before it starts
        (:class:`MedDiffusionLib.estimate.RunEstimate`). Memory counts the weights, the sampler and
        the noise network's activations for the whole batch, the latents kept while decoding, one
        volume's decode plan and every decoded output.

        Time: with ``measure`` (default) and when the run fits the free memory, the forward of the
        noise network that will run (the compiled package when one is used) is timed at the job's
        real batch and latent shape (:meth:`measure_step_seconds`: a warm-up the first step would
        pay anyway, then about a second of forwards, never more than ``steps``), and the decoder's
        rate on a small latent (:meth:`measure_decode_seconds_per_voxel`); the estimate is then
        ``steps x`` that step plus the decode of every volume, so it follows this machine and its
        present load. Otherwise (``measure=False``, a run that does not fit, or a failed
        measurement) the registry's CPU time or the FLOP model
        (:func:`MedDiffusionLib.estimate.estimate_seconds`). The decode plan is the one
        :meth:`decode` will make with the same ``memory_limit_bytes``, ``spill_dir`` and ``tiling``
        (:meth:`decode_plan`)."""
        return self._estimate(size_xyz, steps, volumes, measure, memory_limit_bytes=memory_limit_bytes,
                              spill_dir=spill_dir, tiling=tiling)

    def _estimate(self, size_xyz: Sequence[int], steps: int, volumes: int, measure: bool,
                  extra_weight_bytes: float = 0.0, extra_bytes: float = 0.0, networks: float = 1.0,
                  step_fn: Callable[[int], float] | None = None, memory_limit_bytes: float | None = None,
                  spill_dir: str | Path | None = None, tiling: str = "auto"):
        """:meth:`estimate` for this pipeline or one built on it (a ControlNet: its weights, the hint,
        ``networks`` noise networks per step, ``step_fn(max_forwards)`` timing its step)."""
        from dataclasses import replace

        from ..estimate import estimate_run

        weight_bytes = sum(p.numel() * p.element_size() for m in (self.ae, self.net) for p in m.parameters())
        weight_bytes += extra_weight_bytes
        x, y, z = (int(s) for s in size_xyz)
        f = self.compression
        plan = self.decode_plan((z // f, x // f, y // f), tiling, memory_limit_bytes, spill_dir)
        kw = dict(n_hiddens=self.ae.config["n_hiddens"], weight_bytes=weight_bytes,
                  budget_bytes=self.memory_budget(memory_limit_bytes), net_dim=getattr(self.net, "dim", None),
                  latent_channels=self.net.channels, networks=networks, plan=plan)
        device = str(self.device)
        est = estimate_run(self.entry, self.compression, size_xyz, steps, device, self.mode, volumes, **kw)
        est = replace(est, peak_bytes=est.peak_bytes + extra_bytes)
        if networks != 1.0 and est.step_seconds is None:
            est = replace(est, seconds=est.seconds * networks)
        if not measure:
            return est
        # time a forward only when the run fits (it is refused otherwise anyway); with free memory
        # unknown, only when the sampler's batch is small
        avail = available_memory_bytes(device)
        fits = est.peak_bytes <= avail if avail is not None else \
            weight_bytes + est.sampling_bytes <= MEASURE_UNKNOWN_MEMORY_BYTES
        if not fits:
            return est
        try:
            forwards = max(1, min(10, int(steps)))  # never time more forwards than the run has steps
            step = step_fn(forwards) if step_fn is not None else self.measure_step_seconds(size_xyz, volumes, forwards)
            rate = self.measure_decode_seconds_per_voxel()
        except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            log.info("could not time a sampler step (%s); the estimate uses the model instead", exc)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return est
        est = estimate_run(self.entry, self.compression, size_xyz, steps, device, self.mode, volumes, step_seconds=step,
                           decode_s_per_voxel=rate, **kw)
        return replace(est, peak_bytes=est.peak_bytes + extra_bytes)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_forward(self, net: Callable[..., torch.Tensor], size_xyz: Sequence[int], batch: int = 1,
                     key: tuple = (), max_forwards: int = 10, min_seconds: float = 1.0) -> float:
        """Mean seconds of one ``net(x, t, y, res)`` forward at ``batch`` latents of ``size_xyz``
        under this pipeline's precision. The first time ``key`` is seen, one untimed warm-up
        forward runs first (kernel choices, lazy loads: what the first sampler step would pay).
        Then forwards are timed until ``min_seconds`` have passed (at least three, unless one
        forward alone takes half of that) or ``max_forwards`` ran: step times on a loaded CPU are
        heavy-tailed (OpenMP threads waiting for a busy core), so a mean over a second is a much
        better guide than one forward."""
        d, h, w = self.latent_shape(size_xyz)
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn((batch, self.net.channels, d, h, w), generator=gen, device=dev)
        t = torch.full((batch,), self.diffusion.num_timesteps // 2, dtype=torch.long, device=dev)
        y = torch.zeros(batch, dtype=torch.long, device=dev)
        res = torch.tensor([d, h, w], dtype=torch.float32, device=dev) / 64.0

        def once() -> None:
            with self.autocast():
                net(x, t, y, res)
            self._sync()

        full_key = (tuple(int(v) for v in (d, h, w)), int(batch), self.mode, self.precision, *key)
        n, total = 0, 0.0
        with torch.inference_mode():
            if full_key not in self._warm:
                once()
                self._warm.add(full_key)
            while n < max(1, int(max_forwards)):
                t0 = time.perf_counter()
                once()
                total += time.perf_counter() - t0
                n += 1
                if total >= min_seconds and (n >= 3 or total >= 0.5 * min_seconds * n):
                    break
        return total / n

    def measure_step_seconds(self, size_xyz: Sequence[int], volumes: int = 1, max_forwards: int = 10) -> float:
        """Measured seconds of one sampler step's network forward for ``volumes`` volumes of
        ``size_xyz`` on the network :meth:`sample_latents` will run (the compiled package when one
        is used, else :meth:`noise_model`); see :meth:`time_forward`. Costs a warm-up forward (the
        first time) and up to ``max_forwards`` timed ones (about a second's worth)."""
        package = self.precompiled_network(size_xyz, volumes)
        net = package or self.noise_model()
        return self.time_forward(net, size_xyz, volumes, ("compiled" if package is not None else "eager",),
                                 max_forwards=max_forwards)

    def measure_decode_seconds_per_voxel(self) -> float:
        """Decoder seconds per output voxel, timed on a small latent (32^3 voxels out) at every
        call, so that it follows the machine's present load (a warm-up decode runs once per kernel
        mode, precision and device)."""
        key = (self.mode, self.precision, str(self.device))
        f = self.compression
        side = max(2, 32 // f)
        n_codes = self.ae.codebook.embeddings.shape[0]
        idx = torch.randint(0, n_codes, (1, side, side, side), generator=torch.Generator().manual_seed(0))
        idx = idx.to(self.device)
        with torch.inference_mode():
            for _ in range(1 if key in self._decode_warm else 2):
                t0 = time.perf_counter()
                with self.autocast():
                    self.ae.decode(idx, quantize=False)
                self._sync()
                dt = time.perf_counter() - t0
        self._decode_warm.add(key)
        # larger maps run ~25 % slower per voxel than this small one (caches; measured 64^3 vs 128^3)
        return 1.25 * dt / (side * f) ** 3

    def memory_budget(self, memory_limit_bytes: float | None = None) -> float | None:
        """Bytes a decode may plan for: 80 % of the free device memory / RAM, capped by
        ``memory_limit_bytes`` (default: the pipeline's); ``None`` when neither is known."""
        cap = self.memory_limit_bytes if memory_limit_bytes is None else memory_limit_bytes
        avail = available_memory_bytes(str(self.device))
        budgets = [b for b in (None if avail is None else 0.8 * avail, cap) if b is not None]
        return min(budgets) if budgets else None

    # -- all together --------------------------------------------------------------------------------
    def generate(self, class_index: int | str | None = None, size_xyz: Sequence[int] | None = None,
                 spacing_xyz: Sequence[float] | None = None, seed: int | Sequence[int] = 0,
                 sampler: str | None = None, steps: int | None = None, num_volumes: int = 1, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, tiling: str = "auto",
                 callback: StepCallback | None = None, memory_limit_bytes: float | None = None,
                 spill_dir: str | Path | None = None) -> list[GeneratedVolume]:
        """Generate ``num_volumes`` volumes in one batch (``seed``: one for the batch, or a list with
        one per volume: see :meth:`sample_latents`). Unset arguments come from the model's
        registry entry (default class, its first trained size and spacing, default sampler), through
        the same resolver as every job (:func:`MedDiffusionLib.defaults.generation_defaults`).
        ``callback(step_index, t, latents, pred_x0)`` is called after every sampler step.
        ``tiling``, ``memory_limit_bytes``, ``spill_dir``: this call's decode (:meth:`decode`); each
        volume's ``meta["decode"]`` says how it was decoded (``exact`` false for blended tiles)."""
        check_cancel(cancel)
        entry = self.entry
        if self.net.cond_emb is None and class_index is None:
            class_index = 0  # an unconditional model ignores the class
        r = generation_defaults(entry, class_index, size_xyz, spacing_xyz, sampler, steps, self.diffusion.num_timesteps)
        class_index = r["class"]
        self.check_class(class_index)
        lat = self.sample_latents(class_index, r["size"], seed, r["sampler"], r["steps"], num_volumes, progress, cancel,
                                  callback=callback)
        images, plans = self.decode_with_plans(lat, tiling=tiling, cancel=cancel, memory_limit_bytes=memory_limit_bytes,
                                               spill_dir=spill_dir)
        meta = {"model": entry.id if entry else None, "sampler": r["sampler"], "steps": r["steps"]}
        spacing_xyz = r["spacing"]
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(images)
        return [GeneratedVolume(img[0].numpy(), tuple(float(s) for s in spacing_xyz), class_index, int(seeds[i]),
                                dict(meta, index=i, decode=plans[i].meta()))
                for i, img in enumerate(images)]
