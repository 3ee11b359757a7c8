"""ControlNet-conditioned tasks: segmentation -> CT, sparse-view CT and under-sampled MRI reconstruction.

Every task runs the same way: the input volume is re-oriented to RAS, resampled to the model's
working grid (its trained spacing, a legal size covering the input's field of view), turned into a
hint (image -> autoencoder latent; labels -> one-hot latent grid), sampled with the ControlNet on
the frozen base, decoded, and resampled back onto the input's own grid.

A ControlNet file (our format, family ``controlnet``) carries in its ``meta``: ``task``, the hint
recipe (``hint``), the base model's fingerprint and the class it was trained for.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..conditioning import make_hint
from ..data.grid import resample, working_grid
from ..data.volumes import Volume, check_finite, model_to_hu
from ..defaults import CONTROLLED_DEFAULTS, resolve_sampling
from ..errors import UserError
from ..io.checkpoints import CheckpointError, fingerprint, load_model, read_model_config
from ..memory import ffloat, fprod
from ..models.controlnet import ControlledNoise, ControlNet
from ..operators.fanbeam import FanBeamGeometry, simulate_sparse_view_slices
from .generation import GenerationPipeline, KernelModeMixin, check_cancel, tf32_allowed
from .loop import CancelFn, ProgressFn, StepCallback

TASKS = ("sparse-view", "labels", "mri")


class ControlledPipeline(KernelModeMixin):
    """A base :class:`GenerationPipeline` (composed, not subclassed) plus one ControlNet for the
    task recorded in the ControlNet's ``meta``. Every setting of the base (device, precision,
    memory limit, kernel mode) applies; the noise model is :class:`ControlledNoise`
    ``(x, t, y, res, hint) -> eps`` over the base's own network, run eager (``compile`` means the
    generation network's ahead-of-time package, which a ControlNet run has none of)."""

    def __init__(self, base: GenerationPipeline, controlnet: ControlNet, meta: dict[str, Any], mode: str | None = None):
        self.base = base
        self._controlnet_given = controlnet.eval().to(base.device)
        self._forms = {}
        self._noise: dict[str, ControlledNoise] = {}
        self.meta = meta
        self.task = meta.get("task")
        if self.task not in TASKS:
            raise CheckpointError(f"ControlNet meta has no known task (got {self.task!r}; expected one of {TASKS})")
        hint_type = (meta.get("hint") or {}).get("type")
        if hint_type not in ("labels", "image"):
            raise CheckpointError(f"ControlNet meta has no known hint type (got {hint_type!r}; expected labels or image)")
        if controlnet.channels != base.net.channels or controlnet.dim != base.net.dim:
            raise CheckpointError("this ControlNet does not fit the base model (different width or latent channels)")
        base_fp = meta.get("base_fingerprint")
        if base_fp:
            own = fingerprint(base.net)
            if base_fp != own:
                raise CheckpointError(f"this ControlNet was trained for another base model (fingerprint {base_fp}, "
                                      f"this base {own}; trained on {meta.get('base_model')!r})")
        self._scale = meta.get("control_scale", 1.0)
        self.set_mode(mode or base.mode)

    @property
    def mode(self) -> str:
        """The base's kernel mode: a controlled pipeline runs its base (which it owns) in one mode."""
        return self.base.mode

    def set_mode(self, mode: str) -> None:
        """Run ``"fast"`` or ``"reference"`` kernels from now on, here and in the base this
        pipeline is composed of (the modules given to either are never changed)."""
        self.base.set_mode(mode)

    def _noise_for(self, mode: str) -> ControlledNoise:
        """The base's network and the ControlNet in kernel mode ``mode``, as one noise model."""
        if mode not in self._noise:
            self._noise[mode] = ControlledNoise(self.base._form("net", self.base._net_given, mode),
                                                self._form("controlnet", self._controlnet_given, mode), self._scale)
        return self._noise[mode]

    # -- the base's settings and modules (in this pipeline's kernel mode) --------------------------------
    noise_net = property(lambda self: self._noise_for(self.mode))
    controlnet = property(lambda self: self._form("controlnet", self._controlnet_given))
    ae = property(lambda self: self.base._form("ae", self.base._ae_given, self.mode))
    net = property(lambda self: self.base._form("net", self.base._net_given, self.mode))
    device = property(lambda self: self.base.device)
    entry = property(lambda self: self.base.entry)
    compression = property(lambda self: self.base.compression)
    precision = property(lambda self: self.base.precision)
    memory_limit_bytes = property(lambda self: self.base.memory_limit_bytes)

    @property
    def control_scales(self) -> list[float]:
        return self.noise_net.control_scales

    def networks(self) -> list[torch.nn.Module]:
        """The networks this pipeline runs now: the base's and the ControlNet, in this pipeline's
        kernel mode (the base's own mode is its own)."""
        return [self.net, self.ae, self.controlnet]

    def latent_shape(self, size_xyz: Sequence[int]) -> tuple[int, int, int]:
        return self.base.latent_shape(size_xyz)

    def estimate(self, size_xyz: Sequence[int], steps: int, volumes: int = 1, measure: bool = True,
                 memory_limit_bytes: float | None = None, spill_dir: str | Path | None = None):
        """See :meth:`GenerationPipeline.estimate`; ``size_xyz`` is the working grid. Adds the
        ControlNet's weights, its activations next to the base's (counted as a second network) and
        the hint; the measured step times the controlled network with a hint of the run's shape
        (without a measurement the ControlNet doubles the model's step time)."""
        hint = 4.0 * self.controlnet.hint_channel * fprod(self.latent_shape(size_xyz)) * ffloat(volumes)
        weights = sum(p.numel() * p.element_size() for p in self.controlnet.parameters())
        return self.base._estimate(size_xyz, steps, volumes, measure, extra_weight_bytes=weights, extra_bytes=hint,
                                   networks=2.0, step_fn=lambda n: self.measure_step_seconds(size_xyz, volumes, n),
                                   memory_limit_bytes=memory_limit_bytes, spill_dir=spill_dir)

    def measure_step_seconds(self, size_xyz: Sequence[int], volumes: int = 1, max_forwards: int = 10) -> float:
        """Measured seconds of one step's forward of the controlled noise network (base +
        ControlNet) with a zero hint of the run's shape (:meth:`GenerationPipeline.time_forward`)."""
        d, h, w = self.latent_shape(size_xyz)
        hint = torch.zeros(volumes, self.controlnet.hint_channel, d, h, w, device=self.device)
        net = functools.partial(self.noise_model(), hint=hint)
        return self.base.time_forward(net, size_xyz, volumes, ("controlnet", id(self.controlnet)),
                                      max_forwards=max_forwards)

    @classmethod
    def from_files(cls, controlnet_path: str | Path, model: str | None = None, weights: str | Path | None = None,
                   device: str | None = None, mode: str = "fast", local_files_only: bool | None = None,
                   precision: str = "fp32", memory_limit_bytes: float | None = None) -> "ControlledPipeline":
        from ..controlnets import resolve_controlnet

        controlnet_path = resolve_controlnet(controlnet_path)
        doc = read_model_config(controlnet_path)
        meta = doc.get("meta", {})
        base = GenerationPipeline.from_pretrained(model or (None if weights else meta.get("base_model")), weights, device,
                                                  local_files_only=local_files_only, precision=precision, mode=mode,
                                                  memory_limit_bytes=memory_limit_bytes)
        return cls(base, load_model(controlnet_path, expect="controlnet"), meta)

    # -- hints ------------------------------------------------------------------------------------------
    @property
    def class_index(self) -> int:
        return int(self.meta.get("class", 1))

    @property
    def hint_type(self) -> str:
        """``"labels"`` (a label map in) or ``"image"`` (an image in), from the ControlNet's meta."""
        return self.meta["hint"]["type"]

    def working_spacing(self) -> tuple[float, float, float]:
        if "spacing_xyz" in self.meta:
            return tuple(self.meta["spacing_xyz"])
        if self.entry is None:
            raise UserError("the model's trained spacing is unknown; it must be stored in the ControlNet meta")
        return tuple(self.entry.default_size(self.class_index)[1])

    def hu_window(self) -> tuple[float, float]:
        """HU window that maps model units of the *targets* (the one training used)."""
        window = self.meta.get("hu_window") or self.meta["hint"].get("hu_window") or (-1000.0, 1000.0)
        return tuple(float(v) for v in window)

    def make_hint(self, work: torch.Tensor) -> torch.Tensor:
        """Working-grid input ``(D, H, W)`` -> hint ``(1, K, d, h, w)`` per the task recipe, in float32
        (with the base's precision fp32, TF32 stays off on CUDA)."""
        with tf32_allowed(self.device, self.base.precision != "fp32"):
            return make_hint(self.ae, self.meta["hint"], work, self.device)

    def check_hint(self, hint: torch.Tensor) -> None:
        if hint.shape[1] != self.controlnet.hint_channel:
            raise UserError(f"hint has {hint.shape[1]} channels but this ControlNet expects {self.controlnet.hint_channel}")

    # -- running ----------------------------------------------------------------------------------------
    def run(self, vol: Volume, seed: int = 0, sampler: str | None = None, steps: int | None = None,
            progress: ProgressFn | None = None, cancel: CancelFn | None = None,
            callback: StepCallback | None = None, memory_limit_bytes: float | None = None,
            spill_dir: str | Path | None = None) -> Volume:
        """Run this ControlNet's task on ``vol``: a label map (values rounded to integer labels) for
        label tasks, an image (HU for CT, any units for MR) for sparse-view and MRI. Returns the
        output in HU (CT) or model units (MR) on the input's grid. ``sampler``/``steps`` default to
        :data:`~MedDiffusionLib.defaults.CONTROLLED_DEFAULTS` (DDIM 50); ``callback(step_index, t,
        latents, pred_x0)`` sees every sampler step.
        ``memory_limit_bytes`` / ``spill_dir`` are this run's decode cap and spill folder
        (:meth:`GenerationPipeline.decode`)."""
        return self.sample(vol, 1, seed, sampler, steps, progress=progress, cancel=cancel, callback=callback,
                           memory_limit_bytes=memory_limit_bytes, spill_dir=spill_dir)[0]

    def sample(self, vol: Volume, num_samples: int = 1, seed: int = 0, sampler: str | None = None,
               steps: int | None = None, batch_size: int = 1, progress: ProgressFn | None = None,
               cancel: CancelFn | None = None, callback: StepCallback | None = None,
               memory_limit_bytes: float | None = None, spill_dir: str | Path | None = None,
               with_decode: bool = False, tiling: str = "auto") -> list[Volume] | tuple[list[Volume], list[dict[str, Any]]]:
        """``num_samples`` outputs of this ControlNet's task on ``vol`` (see :meth:`run`), drawn in
        batches of ``batch_size``: batch ``k`` starts at sample ``j = k * batch_size`` and is seeded
        with ``seed + j`` (:func:`sample_seeds`), so a run is reproducible from ``seed``,
        ``num_samples`` and ``batch_size`` (a batch's numerics may differ from single runs' in the
        last bits, so record the batch size with the result).
        The input is prepared (resampled, encoded into the hint) once. ``progress(step, total)``
        counts the steps of all batches. ``with_decode``: also return how each sample was decoded
        (:meth:`~MedDiffusionLib.decoding.DecodePlan.meta`, for its provenance). ``tiling``: the
        decode's (:meth:`GenerationPipeline.decode`)."""
        if num_samples < 1 or batch_size < 1:
            raise UserError(f"the number of samples must be at least 1, got {num_samples}")
        sampler, steps = resolve_sampling(sampler, steps, CONTROLLED_DEFAULTS, self.base.diffusion.num_timesteps)
        check_cancel(cancel)
        if self.hint_type == "labels":
            vol = vol.with_array(np.rint(vol.array).astype(np.int64))
        canon, ornt = vol.canonical_with_orientation()
        grid = working_grid(canon, self.working_spacing(), self.compression)
        src = torch.from_numpy(np.ascontiguousarray(canon.to_network()))
        if self.hint_type == "labels":
            if src.numel() == 0 or not bool((src != 0).any()):
                raise UserError("the label map is empty (no non-zero label)")
            work = resample(src, grid.shape_dhw, "labels")
        else:
            check_finite(canon, "the input volume")
            work = resample(src.float(), grid.shape_dhw, "image")
        check_cancel(cancel)
        hint = self.make_hint(work)
        self.check_hint(hint)
        size_xyz = (grid.shape_dhw[1], grid.shape_dhw[2], grid.shape_dhw[0])
        shape_dhw = canon.to_network().shape
        batches = sample_seeds(seed, num_samples, batch_size)
        outs: list[Volume] = []
        decoded: list[dict[str, Any]] = []
        for k, (batch_seed, n) in enumerate(batches):
            def step(i: int, total: int, k: int = k) -> None:
                if progress is not None:
                    progress(k * total + i, len(batches) * total)

            lat = self.base.sample_latents(self.class_index, size_xyz, batch_seed, sampler, steps, n, step, cancel,
                                           noise_net=functools.partial(self.noise_model(), hint=hint.expand(n, *hint.shape[1:])),
                                           callback=callback)
            imgs, plans = self.base.decode_with_plans(lat, tiling, cancel=cancel, memory_limit_bytes=memory_limit_bytes,
                                                      spill_dir=spill_dir)
            decoded += [plan.meta() for plan in plans]
            del lat
            for b in range(n):
                check_cancel(cancel)
                out = resample(imgs[b, 0], shape_dhw, "image").numpy()
                if self.meta.get("output") == "hu" or self.meta["hint"].get("normalize") == "hu_window":
                    lo, hi = self.hu_window()
                    out = model_to_hu(out, lo, hi)
                arr = np.ascontiguousarray(np.transpose(out, (1, 2, 0)))  # network (k, i, j) -> (i, j, k)
                outs.append(Volume.restore(arr.astype(np.float32), ornt, vol))
        return (outs, decoded) if with_decode else outs


def sample_seeds(seed: int, num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """``(seed, size)`` of each batch of an N-sample run: batch ``k`` holds samples ``j .. j+size-1``
    (``j = k * batch_size``) and is seeded with ``seed + j``."""
    return [(seed + j, min(batch_size, num_samples - j)) for j in range(0, num_samples, batch_size)]


def sample_statistics(samples: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-wise mean and standard deviation (``ddof=1``, the sample estimate; 0 for one sample)
    of N arrays of one shape, accumulated in float64 (Welford, one array in memory at a time);
    returned as float32."""
    mean = np.zeros(np.shape(samples[0]), np.float64)
    m2 = np.zeros_like(mean)
    for n, a in enumerate(samples, 1):
        delta = np.asarray(a, np.float64) - mean
        mean += delta / n
        m2 += delta * (np.asarray(a, np.float64) - mean)
    var = m2 / (len(samples) - 1) if len(samples) > 1 else m2
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


# -- task front doors ------------------------------------------------------------------------------------
def simulate_sparse_view(ct_hu: Volume, views: int = 40, arc_degrees: float = 360.0, source_iso: float = 500.0,
                         source_det: float = 1000.0, bins: int = 512, device: str = "cpu",
                         chunk: int = 16, cancel: CancelFn | None = None,
                         progress: ProgressFn | None = None) -> Volume:
    """Full CT (HU) -> FBP of a simulated ``views``-view fan-beam scan (HU), slice by slice in
    the axial plane, on the same grid. ``cancel()`` is asked before every ``chunk`` of axial
    slices (:class:`~MedDiffusionLib.errors.Cancelled` when true); ``progress(done, total)``
    reports axial slices done (0 before the first chunk, then after each)."""
    check_finite(ct_hu, "the CT volume")
    canon, ornt = ct_hu.canonical_with_orientation()
    sp = canon.spacing
    if abs(sp[0] - sp[1]) > 1e-3 * max(sp[:2]):
        raise UserError(f"axial pixels must be square for the fan-beam simulation, got {sp[0]:.4f} x {sp[1]:.4f} mm")
    arr = torch.from_numpy(np.ascontiguousarray(canon.to_network()).astype(np.float32))  # (k, i, j)
    # fan-beam image rows = y (j axis), columns = x (i axis)
    slices = arr.transpose(1, 2)
    geo = FanBeamGeometry(image_size=tuple(slices.shape[1:]), pixel=float(sp[0]), views=views, arc_degrees=arc_degrees,
                          source_iso=source_iso, source_det=source_det, bins=bins)
    fbp = simulate_sparse_view_slices(slices, geo, chunk=chunk, device=device, cancel=cancel,
                                      progress=progress).transpose(1, 2)
    out = np.ascontiguousarray(np.transpose(fbp.numpy(), (1, 2, 0)))
    return Volume.restore(out, ornt, ct_hu)


def _run_expecting(pipeline: ControlledPipeline, task: str, vol: Volume, **kw: Any) -> Volume:
    if pipeline.task != task:
        raise UserError(f"this ControlNet was trained for {pipeline.task!r}, not {task}")
    return pipeline.run(vol, **kw)


def reconstruct_sparse_view(fbp_hu: Volume, pipeline: ControlledPipeline, **kw: Any) -> Volume:
    """``pipeline.run`` after checking the task is sparse-view (kept for existing callers; use ``run``)."""
    return _run_expecting(pipeline, "sparse-view", fbp_hu, **kw)


def synthesize_from_labels(label_map: Volume, pipeline: ControlledPipeline, **kw: Any) -> Volume:
    """``pipeline.run`` after checking the task is labels (kept for existing callers; use ``run``)."""
    return _run_expecting(pipeline, "labels", label_map, **kw)


def ct_labels_from_hu(hu: np.ndarray, tumour: np.ndarray | None = None) -> np.ndarray:
    """Demo label map from HU thresholds: 0 air (< -900), 1 lung (-900..-400), 2 soft tissue
    (-400..300), 3 bone (> 300), 4 tumour (from the given mask)."""
    lab = np.zeros(hu.shape, dtype=np.int64)
    lab[(hu >= -900) & (hu < -400)] = 1
    lab[(hu >= -400) & (hu < 300)] = 2
    lab[hu >= 300] = 3
    if tumour is not None:
        lab[tumour > 0] = 4
    return lab


__all__ = ["ControlledPipeline", "TASKS", "make_hint", "reconstruct_sparse_view", "synthesize_from_labels", "simulate_sparse_view", "ct_labels_from_hu", "working_grid",
           "resample"]
