"""Checks before a job runs: its inputs (:func:`check_input`: finite, a usable geometry, within a
service's caps, a working grid within the limits, a CT that fits the fan-beam simulation) and its
memory (:func:`check_memory`: the pipeline's estimate plus the arrays held in RAM, against what is
available, and the disk an exact decode spills to)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .controlnets import controlnet_meta
from .defaults import MAX_SIDE
from .errors import ResourceError, UserError
from .jobspec import CONTROLNET_TASKS, model_entry, sample_batch

if TYPE_CHECKING:
    from .jobspec import Caps, JobSpec


def job_memory_limit(p: dict[str, Any]) -> float | None:
    """The job's decode memory cap in bytes (``max_memory_gb``), passed to every decode call: never
    stored on a cached pipeline, which the next job shares."""
    return None if p.get("max_memory_gb") is None else float(p["max_memory_gb"]) * 2 ** 30


def check_memory(spec: JobSpec, device: str, pipe: Any, inputs: dict[str, Any] | None = None,
                 spill_dir: str | Path | None = None, max_spill_bytes: float | None = None) -> Any:
    """Refuse a run whose estimated peak memory exceeds what is available (unless ``force``), or
    whose exact decode spills more stage maps to disk (``spill_dir``) than the disk has free or
    than ``max_spill_bytes`` (a server's limit per job).

    Counts the pipeline's estimate (``pipe.estimate(size, steps, volumes)``: weights, sampler and
    decode) plus the arrays held in RAM: the input volume(s) as read and their working copies, and
    the result volume(s) (:func:`array_bytes`). Generation uses the requested size and number of
    volumes, the controlled tasks the model's working grid for the input (:func:`working_size`);
    simulate-sparse-view (``pipe=None``) the fan-beam operator's own peak. On a GPU the device part
    is checked against GPU memory and the arrays against RAM. Returns the pipeline's estimate (on
    the CPU with the arrays added to ``peak_bytes``), ``None`` for simulate-sparse-view."""
    from .memory import available_memory_bytes

    p = spec.params
    vols = [v for v in (inputs or {}).values() if hasattr(v, "array")]
    cuda = device.startswith("cuda")
    est = None
    host = array_bytes(spec, vols)
    if spec.task == "evaluate":  # all on the CPU: the inputs above plus the metrics' working copies
        dev = 0.0
        advice = "crop or downsample the volumes"
    elif spec.task == "simulate-sparse-view":
        from .operators.fanbeam import simulate_peak_bytes

        dev = 0.0
        for vol in vols:
            (rows, cols), _, slices = _axial_geometry(vol)
            dev = max(dev, simulate_peak_bytes((rows, cols), slices, p["views"], p["bins"]))
        advice = "choose fewer views or detector bins, or a smaller input"
    else:
        if spec.task == "generate":
            size, volumes = p["size"], p["num_volumes"]
            advice = "choose a smaller size or fewer volumes"
        else:
            if not vols:
                raise UserError(f"task {spec.task!r} needs its input volume to estimate its memory")
            size, volumes = working_size(vols[0], pipe.working_spacing(), pipe.compression), sample_batch(p)
            advice = "crop or downsample the input"
        # the same cap, spill folder and tiling the decode will get
        kw: dict[str, Any] = {"memory_limit_bytes": job_memory_limit(p), "spill_dir": spill_dir}
        if spec.task == "generate":
            kw["tiling"] = p["tiling"]
        est = pipe.estimate(size, p["steps"], volumes, **kw)
        dev = float(est.peak_bytes)
        if cuda:
            host += float(getattr(est, "host_bytes", 0.0) or 0.0)
        plan = getattr(est, "decode", None)
        if not p["force"] and plan is not None and getattr(plan, "store", None) == "disk":
            from .models.streaming_decode import check_spill_space

            disk = float(getattr(est, "disk_bytes", 0.0))
            if max_spill_bytes is not None and disk > max_spill_bytes:
                raise ResourceError(f"the exact decode would spill {disk / 1e9:.1f} GB of stage maps to disk, more than "
                                    f"the {max_spill_bytes / 1e9:.0f} GB this server allows a job; allow more memory "
                                    "(max_memory_gb) or choose a smaller size")
            check_spill_space(plan.spill_dir, disk)
    checks = [(dev, device), (host, "cpu")] if cuda else [(dev + host, "cpu")]
    for need, where in checks:
        avail = available_memory_bytes(where)
        if not p["force"] and avail is not None and need > avail:
            raise ResourceError(f"this run needs about {need / 2 ** 30:.1f} GB of "
                                f"{'GPU memory' if where.startswith('cuda') else 'RAM'} but only "
                                f"{avail / 2 ** 30:.1f} GB is available; {advice} (or force it: force=true)")
    if est is not None and not cuda and host:
        from dataclasses import is_dataclass

        if is_dataclass(est):
            est = replace(est, peak_bytes=est.peak_bytes + host)
    return est


def array_bytes(spec: JobSpec, vols: Sequence[Any] = ()) -> float:
    """Bytes of the volumes a job holds in RAM besides the pipeline's own memory (approximate):
    each input as read plus three working copies (re-oriented, network order, float32 / int64
    labels), and the results as float32 (generation: two copies per volume, the decoded array and
    the returned volume; the other tasks: three, resampling back onto the input's grid)."""
    p = spec.params
    if spec.task == "generate":
        return 2.0 * 4 * math.prod(p["size"]) * p["num_volumes"]
    if spec.task == "evaluate":
        # both inputs as read, then per volume float32 copies: the network-order array, the windowed
        # one and SSIM's blurred maps (five at once, each the volume's size, for the larger volume)
        n = max((float(v.array.size) for v in vols), default=0.0)
        return sum(float(v.array.nbytes) for v in vols) + 4.0 * n * (2 * 2 + 5 + 2)
    total = 0.0
    for vol in vols:
        arr = vol.array
        n = float(arr.size)
        nbytes = float(arr.nbytes)
        if spec.task == "synthesize":  # labels are rounded to int64 before the copies
            total += nbytes + 3 * 8 * n
        else:
            total += 3 * nbytes + 4 * n
        # results (float32): each sample plus two copies on the way back to the input's grid; an
        # N-sample run keeps its N samples, the mean and std and two float64 accumulators
        samples = int(p.get("num_samples") or 1)
        total += 3 * 4 * n if samples == 1 else (2 * 4 + (samples + 2) * 4 + 2 * 8) * n
    return total


def _canonical_grid(vol: Any) -> tuple[list[int], list[float]]:
    """Shape and spacing of ``vol`` in the closest canonical (RAS) orientation, as the pipelines
    see it, without copying the array."""
    import nibabel as nib
    import numpy as np

    ornt = nib.orientations.io_orientation(np.asarray(vol.affine, dtype=np.float64))
    if not np.isfinite(ornt).all():
        raise UserError("the input's orientation (direction matrix) is degenerate")
    shape, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (out_axis, _) in enumerate(ornt):
        shape[int(out_axis)], spacing[int(out_axis)] = vol.shape[axis], vol.spacing[axis]
    return shape, spacing


def _axial_geometry(vol: Any) -> tuple[tuple[int, int], float, int]:
    """``((rows, cols), pixel_mm, slices)`` of the axial slices simulate-sparse-view projects."""
    shape, spacing = _canonical_grid(vol)
    return (shape[1], shape[0]), spacing[0], shape[2]


def working_size(vol: Any, spacing_xyz: Sequence[float], compression: int) -> list[int]:
    """Size (X, Y, Z) of the model's working grid for an input (:func:`MedDiffusionLib.data.grid.working_grid`),
    refused when a side exceeds :data:`MAX_SIDE`."""
    from types import SimpleNamespace

    from .data.grid import working_grid

    shape, spacing = _canonical_grid(vol)
    ext = [n * s for n, s in zip(shape, spacing)]
    sides = [e / float(sp) for e, sp in zip(ext, spacing_xyz)]
    too_big = UserError(f"the input covers {' x '.join(f'{e:.0f}' for e in ext)} mm: at the model's spacing that "
                        f"needs more than {MAX_SIDE} voxels per side; crop the input")
    if not all(math.isfinite(s) for s in sides) or max(sides) > 2 * MAX_SIDE:
        raise too_big
    grid = working_grid(SimpleNamespace(shape=tuple(shape), spacing=tuple(spacing)), spacing_xyz, compression)
    d, h, w = grid.shape_dhw
    if max(d, h, w) > MAX_SIDE:
        raise too_big
    return [h, w, d]


def check_input_size(shape: Sequence[int], caps: Caps | None = None) -> None:
    """Refuse an input volume of more voxels than ``caps.max_input_voxels`` (the service calls this
    as soon as it knows the shape)."""
    voxels = math.prod(int(s) for s in shape)
    if caps is not None and caps.max_input_voxels is not None and voxels > caps.max_input_voxels:
        raise UserError(f"the input volume has {voxels} voxels ({'x'.join(str(int(s)) for s in shape)}); this server "
                        f"accepts at most {caps.max_input_voxels}")


def _controlled_working_size(spec: JobSpec, vol: Any,
                             controlnet_dirs: Sequence[str | Path] | None = None) -> list[int] | None:
    """The working grid a controlled task will run on, from the ControlNet's meta and the model's
    registry entry (``None`` when they do not tell: a weights folder)."""
    meta = controlnet_meta(spec.controlnet, controlnet_dirs)
    entry = model_entry(spec.model) if spec.model else None
    if entry is None:
        return None
    spacing = meta.get("spacing_xyz") or entry.default_size(int(meta.get("class", 1)))[1]
    return working_size(vol, spacing, entry.compression)


def check_input(spec: JobSpec, vol: Any, caps: Caps | None = None,
                controlnet_dirs: Sequence[str | Path] | None = None) -> list[str]:
    """Refuse unusable inputs (NaN, empty label maps, vector images, broken geometry, too many
    voxels for ``caps``, a working grid beyond the limits, a CT too wide for the fan-beam
    simulation); return warnings for odd ones. ``controlnet_dirs``: where the spec's named
    ControlNet is looked up (default: the bundled ones)."""
    import numpy as np

    from .data.volumes import check_ct_intensities, check_finite

    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise UserError(f"the input must be a single-channel 3-D volume, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise UserError("the input volume is empty")
    check_input_size(arr.shape, caps)
    affine = np.asarray(vol.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise UserError("the input's geometry (spacing, direction or origin) is not finite")
    if not all(s > 0 for s in vol.spacing):
        raise UserError(f"the input's voxel spacing must be positive, got {[round(s, 6) for s in vol.spacing]}")
    check_finite(arr, "the input volume")
    if spec.task == "simulate-sparse-view":
        _check_fan_beam(vol)
    elif spec.task in CONTROLNET_TASKS:
        size = _controlled_working_size(spec, vol, controlnet_dirs)
        if size is not None and caps is not None and caps.max_voxels is not None and math.prod(size) > caps.max_voxels:
            raise UserError(f"at the model's spacing the input needs a {'x'.join(map(str, size))} working grid; this "
                            f"server allows at most {caps.max_voxels} voxels; crop the input")
        batch = sample_batch(spec.params)
        if size is not None and caps is not None and caps.max_batch_voxels is not None and batch > 1 and \
                math.prod(size) * batch > caps.max_batch_voxels:
            raise UserError(f"{spec.params['num_samples']} samples run in batches of {batch} working grids of "
                            f"{'x'.join(map(str, size))} voxels, more than this server allows in one job "
                            f"({caps.max_batch_voxels} voxels); ask for fewer samples or crop the input",
                            field="num_samples")
    if spec.task == "synthesize":
        if not np.any(np.rint(arr) != 0):
            raise UserError("the label map is empty (no non-zero label)")
        return []
    hu_input = spec.task == "simulate-sparse-view" or (
        spec.task == "reconstruct"
        and controlnet_meta(spec.controlnet, controlnet_dirs).get("hint", {}).get("normalize") == "hu_window")
    warning = check_ct_intensities(arr) if hu_input else None
    return [warning] if warning else []


def _check_fan_beam(vol: Any) -> None:
    """simulate-sparse-view's geometry, before it runs: square axial pixels and an axial field of
    view inside the fan-beam source circle (radius ``source_iso`` of :func:`simulate_sparse_view`)."""
    import inspect

    from .operators.fanbeam import image_radius_mm
    from .pipelines.conditioned import simulate_sparse_view

    (rows, cols), pixel, _ = _axial_geometry(vol)
    _, spacing = _canonical_grid(vol)
    if abs(spacing[0] - spacing[1]) > 1e-3 * max(spacing[:2]):
        raise UserError(f"axial pixels must be square for the fan-beam simulation, got {spacing[0]:.4f} x "
                        f"{spacing[1]:.4f} mm")
    iso = float(inspect.signature(simulate_sparse_view).parameters["source_iso"].default)
    radius = image_radius_mm((rows, cols), pixel)
    if radius >= iso:
        raise UserError(f"the CT's axial field of view ({cols * pixel:.0f} x {rows * pixel:.0f} mm, diagonal "
                        f"{2 * radius:.0f} mm) does not fit inside the simulated scanner's source circle (diameter "
                        f"{2 * iso:.0f} mm); crop the volume to an axial diagonal under {2 * iso:.0f} mm")
