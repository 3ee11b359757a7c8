"""ControlNet-conditioned tasks: segmentation -> CT, sparse-view CT and under-sampled MRI reconstruction.

Every task runs the same way: the input volume is re-oriented to RAS, resampled to the model's
working grid (its trained spacing, a legal size covering the input's field of view), turned into a
hint (image -> autoencoder latent; labels -> one-hot latent grid), sampled with the ControlNet on
the frozen base, decoded, and resampled back onto the input's own grid.

A ControlNet file (our format, family ``controlnet``) carries in its ``meta``: ``task``, the hint
recipe (``hint``), the base model's fingerprint and the class it was trained for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..conditioning import image_hint, label_hint
from ..data.volumes import Volume, hu_to_model, model_to_hu, percentile_normalize
from ..io.checkpoints import CheckpointError, fingerprint, load_model, read_model_config
from ..models.controlnet import ControlNet
from ..operators.fanbeam import FanBeamGeometry, simulate_sparse_view_slices
from .generation import GenerationPipeline, legal_size

TASKS = ("sparse-view", "labels", "mri")


@dataclass
class WorkingGrid:
    """How an input volume maps onto the model's grid (network order (D, H, W))."""

    shape_dhw: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]


def working_grid(vol: Volume, spacing_xyz: Sequence[float], compression: int) -> WorkingGrid:
    """Legal size nearest to the input's extent at the model's trained spacing."""
    step = 8 * compression
    ext = [n * s for n, s in zip(vol.shape, vol.spacing)]  # (i, j, k) mm
    size_xyz = [max(step, int(round(e / sp / step)) * step) for e, sp in zip(ext, spacing_xyz)]
    legal_size(size_xyz, compression)
    spacing = tuple(e / n for e, n in zip(ext, size_xyz))
    return WorkingGrid((size_xyz[2], size_xyz[0], size_xyz[1]), spacing)


def resample(arr: torch.Tensor, shape: Sequence[int], kind: str) -> torch.Tensor:
    """``(D, H, W)`` -> ``shape``; ``image``: area-averaged where shrinking, then trilinear; ``labels``: nearest."""
    x = arr[None, None].float()
    if kind == "labels":
        return F.interpolate(x, size=tuple(shape), mode="nearest")[0, 0].to(arr.dtype)
    shrink = tuple(min(a, b) for a, b in zip(x.shape[2:], shape))
    if shrink != tuple(x.shape[2:]):
        x = F.adaptive_avg_pool3d(x, shrink)
    return F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]


def make_hint(ae, hint_meta: dict[str, Any], work: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Working-grid condition ``(D, H, W)`` -> hint ``(1, K, d, h, w)`` following a ControlNet's
    recorded recipe: label values (one-hot on the latent grid) or an image (HU window or
    percentile normalisation, then the autoencoder)."""
    if hint_meta["type"] == "labels":
        latent_shape = [s // ae.compression for s in work.shape]
        return label_hint(work[None].long(), hint_meta["values"], latent_shape,
                          hint_meta.get("mode", "nearest")).to(device)
    if hint_meta.get("normalize") == "hu_window":
        lo, hi = hint_meta.get("hu_window", (-1000.0, 1000.0))
        img = torch.from_numpy(hu_to_model(work.numpy(), lo, hi))
    else:
        img = torch.from_numpy(percentile_normalize(work.numpy())[0])
    return image_hint(ae, img[None, None].to(device))


class ControlledPipeline(GenerationPipeline):
    """Base generation pipeline + one ControlNet for one task."""

    def __init__(self, base: GenerationPipeline, controlnet: ControlNet, meta: dict[str, Any]):
        self.controlnet = controlnet.eval().to(base.device)
        super().__init__(base.ae, base.net, base.entry, base.device, precision=base.precision, mode=base.mode,
                         compile=base.compile)
        self.meta = meta
        self.task = meta.get("task")
        if self.task not in TASKS:
            raise CheckpointError(f"ControlNet meta has no known task (got {self.task!r}; expected one of {TASKS})")
        if controlnet.channels != self.net.channels or controlnet.dim != self.net.dim:
            raise CheckpointError("this ControlNet does not fit the base model (different width or latent channels)")
        base_fp = meta.get("base_fingerprint")
        if base_fp and base_fp != fingerprint(self.net):
            raise CheckpointError(f"this ControlNet was trained for another base model (fingerprint {base_fp}, "
                                  f"this base {fingerprint(self.net)}; trained on {meta.get('base_model')!r})")
        scale = meta.get("control_scale", 1.0)
        self.control_scales = [float(scale)] * (len(controlnet.downs) + 1)

    def networks(self) -> list[torch.nn.Module]:
        return [*super().networks(), self.controlnet]

    @classmethod
    def from_files(cls, controlnet_path: str | Path, model: str | None = None, weights: str | Path | None = None,
                   device: str | None = None, mode: str = "fast") -> "ControlledPipeline":
        from ..weights import resolve_controlnet

        controlnet_path = resolve_controlnet(controlnet_path)
        doc = read_model_config(controlnet_path)
        meta = doc.get("meta", {})
        base = GenerationPipeline.from_pretrained(model or (None if weights else meta.get("base_model")), weights, device,
                                                  mode=mode)
        return cls(base, load_model(controlnet_path, expect="controlnet"), meta)

    # -- hints ------------------------------------------------------------------------------------------
    @property
    def class_index(self) -> int:
        return int(self.meta.get("class", 1))

    def working_spacing(self) -> tuple[float, float, float]:
        if "spacing_xyz" in self.meta:
            return tuple(self.meta["spacing_xyz"])
        if self.entry is None:
            raise ValueError("the model's trained spacing is unknown; it must be stored in the ControlNet meta")
        return tuple(self.entry.default_size(self.class_index)[1])

    def hu_window(self) -> tuple[float, float]:
        """HU window that maps model units of the *targets* (the one training used)."""
        window = self.meta.get("hu_window") or self.meta["hint"].get("hu_window") or (-1000.0, 1000.0)
        return tuple(float(v) for v in window)

    def make_hint(self, work: torch.Tensor) -> torch.Tensor:
        """Working-grid input ``(D, H, W)`` -> hint ``(1, K, d, h, w)`` per the task recipe."""
        return make_hint(self.ae, self.meta["hint"], work, self.device)

    def check_hint(self, hint: torch.Tensor) -> None:
        if hint.shape[1] != self.controlnet.hint_channel:
            raise ValueError(f"hint has {hint.shape[1]} channels but this ControlNet expects {self.controlnet.hint_channel}")

    # -- running ----------------------------------------------------------------------------------------
    def run(self, vol: Volume, seed: int = 0, sampler: str = "ddim", steps: int | None = 50,
            progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
            kind: str = "image") -> Volume:
        """Input volume (HU for CT image tasks, label values for label tasks) -> output in HU (CT) or
        model units (MR), on the input's grid."""
        canon, ornt = vol.canonical_with_orientation()
        grid = working_grid(canon, self.working_spacing(), self.compression)
        src = torch.from_numpy(np.ascontiguousarray(canon.to_network()))
        if kind == "labels":
            if src.numel() == 0 or not bool((src != 0).any()):
                raise ValueError("the label map is empty (no non-zero label)")
            work = resample(src, grid.shape_dhw, "labels")
        else:
            if not torch.isfinite(src.float()).all():
                raise ValueError("the input volume contains NaN or infinite values")
            work = resample(src.float(), grid.shape_dhw, "image")
        hint = self.make_hint(work)
        self.check_hint(hint)
        size_xyz = (grid.shape_dhw[1], grid.shape_dhw[2], grid.shape_dhw[0])
        d, h, w = self.latent_shape(size_xyz)
        y = torch.full((1,), self.class_index, dtype=torch.long, device=self.device)
        res = torch.tensor([d, h, w], dtype=torch.float32, device=self.device) / 64.0

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            controls = [c * s for c, s in zip(self.controlnet(x, hint, t, y, res), self.control_scales)]
            return self.net(x, t, y, res, controls=controls)

        lat = self.sample_latents(self.class_index, size_xyz, seed, sampler, steps, 1, progress, cancel, model_fn=fn)
        out = self.decode(lat)[0, 0]
        out = resample(out, canon.to_network().shape, "image").numpy()
        if self.meta.get("output") == "hu" or self.meta["hint"].get("normalize") == "hu_window":
            lo, hi = self.hu_window()
            out = model_to_hu(out, lo, hi)
        arr = np.ascontiguousarray(np.transpose(out, (1, 2, 0)))  # network (k, i, j) -> (i, j, k)
        return Volume.restore(arr.astype(np.float32), ornt, vol)


# -- task front doors ------------------------------------------------------------------------------------
def simulate_sparse_view(ct_hu: Volume, views: int = 40, arc_degrees: float = 360.0, source_iso: float = 500.0,
                         source_det: float = 1000.0, bins: int = 512, device: str = "cpu",
                         chunk: int = 16) -> Volume:
    """Full CT (HU) -> FBP of a simulated ``views``-view fan-beam scan (HU), slice by slice in
    the axial plane, on the same grid."""
    canon, ornt = ct_hu.canonical_with_orientation()
    sp = canon.spacing
    if abs(sp[0] - sp[1]) > 1e-3 * max(sp[:2]):
        raise ValueError(f"axial pixels must be square for the fan-beam simulation, got {sp[0]:.4f} x {sp[1]:.4f} mm")
    arr = torch.from_numpy(np.ascontiguousarray(canon.to_network()).astype(np.float32))  # (k, i, j)
    if not torch.isfinite(arr).all():
        raise ValueError("the CT volume contains NaN or infinite values")
    # fan-beam image rows = y (j axis), columns = x (i axis)
    slices = arr.transpose(1, 2)
    geo = FanBeamGeometry(image_size=tuple(slices.shape[1:]), pixel=float(sp[0]), views=views, arc_degrees=arc_degrees,
                          source_iso=source_iso, source_det=source_det, bins=bins)
    fbp = simulate_sparse_view_slices(slices, geo, chunk=chunk, device=device).transpose(1, 2)
    out = np.ascontiguousarray(np.transpose(fbp.numpy(), (1, 2, 0)))
    return Volume.restore(out, ornt, ct_hu)


def reconstruct_sparse_view(fbp_hu: Volume, pipeline: ControlledPipeline, **kw: Any) -> Volume:
    if pipeline.task != "sparse-view":
        raise ValueError(f"this ControlNet was trained for {pipeline.task!r}, not sparse-view reconstruction")
    return pipeline.run(fbp_hu, kind="image", **kw)


def reconstruct_undersampled_mri(zero_filled: Volume, pipeline: ControlledPipeline, **kw: Any) -> Volume:
    if pipeline.task != "mri":
        raise ValueError(f"this ControlNet was trained for {pipeline.task!r}, not MRI reconstruction")
    return pipeline.run(zero_filled, kind="image", **kw)


def synthesize_from_labels(label_map: Volume, pipeline: ControlledPipeline, **kw: Any) -> Volume:
    if pipeline.task != "labels":
        raise ValueError(f"this ControlNet was trained for {pipeline.task!r}, not label-map synthesis")
    return pipeline.run(label_map.with_array(np.rint(label_map.array).astype(np.int64)), kind="labels", **kw)


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


__all__ = ["ControlledPipeline", "make_hint", "simulate_sparse_view", "reconstruct_sparse_view", "reconstruct_undersampled_mri",
           "synthesize_from_labels", "ct_labels_from_hu", "working_grid", "resample"]
