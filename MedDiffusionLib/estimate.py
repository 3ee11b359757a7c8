"""Time and memory estimates shown before a run (CLI warnings, Slicer panel).

Time: sampling cost scales with latent voxels x steps. Per-model CPU seconds come from the
registry when measured (fast mode); otherwise forward cost is taken from the measured FLOPs of the
released networks (BiFlowNet 8x: 0.34 TFLOP per step at a 32^3 latent; 4x: 2.46 TFLOP at 64^3;
decoder 23 / 54 TFLOP for a 256^3 output) and an effective device throughput.

Memory: the decode usually dominates; its plan and memory model live with the decoding itself
(:mod:`MedDiffusionLib.decoding`), and a run's estimate counts the plan's stage maps where they
live: the device, RAM, or disk when they spill (:attr:`RunEstimate.disk_bytes`). Everything that
scales with the batch counts too: the sampler's latents and state and the noise network's
activations for all ``volumes`` at once (:func:`sampling_peak_bytes`), the latents kept while
decoding and every decoded output (:func:`estimate_run`).

Sizes too large for a float give ``inf`` bytes / seconds instead of an ``OverflowError``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .decoding import RELEASED_AE_N_HIDDENS, DecodePlan, official_plan, plan_decode
from .memory import ffloat, fprod, gb_text

if TYPE_CHECKING:
    from .registry import ModelEntry

# effective throughput of the 3-D convolutions in fast mode, TFLOP/s (2-core CPU ~0.15; A100/H100 ~60)
THROUGHPUT = {"cpu": 0.15, "cuda": 60.0}
# reference kernels on the CPU (slow_conv3d for small maps) are this much slower per step (benchmark)
CPU_REFERENCE_SLOWDOWN = 1.8
STEP_TFLOP_PER_LATENT_VOXEL = {8: 0.34 / 32 ** 3, 4: 2.46 / 64 ** 3}
DECODE_TFLOP_PER_IMAGE_VOXEL = {8: 23.0 / 256 ** 3, 4: 53.9 / 256 ** 3}
# the decoder at a small width is bound by memory traffic, not FLOPs: CPU seconds per output voxel
# and full-resolution channel (bundled 4x decoder, n_hiddens 8: ~4 us per voxel at 64^3 and 128^3)
CPU_DECODE_S_PER_VOXEL_CHANNEL = 0.45e-6
# one sampler step besides the network's forward (scheduler arithmetic, RNG): a small fraction
SAMPLER_STEP_OVERHEAD = 1.05



def estimate_seconds(entry: "ModelEntry | None", compression: int, size_xyz: Sequence[int], steps: int, device: str,
                     volumes: int = 1, mode: str = "fast") -> float:
    """Estimated wall time of sampling + decoding (``entry``: the registry model, for its measured
    CPU time; ``None`` falls back to the FLOP model)."""
    vox = fprod(size_xyz)
    lat = vox / compression ** 3
    kind = "cuda" if device.startswith("cuda") else "cpu"
    slow = CPU_REFERENCE_SLOWDOWN if (kind == "cpu" and mode == "reference") else 1.0
    if entry is not None and kind == "cpu" and entry.cpu_seconds:
        base_vox = fprod(entry.base_size)
        # measured for 1000 DDPM steps; the decode is ~1 % of that at the base size
        return entry.cpu_seconds * vox / base_vox * (0.01 + 0.99 * steps / 1000) * ffloat(volumes) * slow
    tflop = steps * lat * STEP_TFLOP_PER_LATENT_VOXEL.get(compression, 0.0) + vox * DECODE_TFLOP_PER_IMAGE_VOXEL.get(compression, 0.0)
    return tflop * ffloat(volumes) / THROUGHPUT[kind] * slow


def decode_seconds(compression: int, size_xyz: Sequence[int], device: str, n_hiddens: int | None = None,
                   volumes: int = 1, method: str = "whole") -> float:
    """Estimated decode time of ``volumes`` outputs of ``size_xyz`` voxels: the decoder's FLOPs
    (scaled by its width ``n_hiddens`` squared) at :data:`THROUGHPUT`, plus, on the CPU, the memory
    traffic that dominates narrow decoders (:data:`CPU_DECODE_S_PER_VOXEL_CHANNEL`). The stage-
    streamed exact decode pays ~30 % for its halos and copies."""
    nh = n_hiddens or RELEASED_AE_N_HIDDENS
    kind = "cuda" if device.startswith("cuda") else "cpu"
    vox = fprod(size_xyz)
    per_voxel = DECODE_TFLOP_PER_IMAGE_VOXEL.get(compression, DECODE_TFLOP_PER_IMAGE_VOXEL[8]) \
        * (nh / RELEASED_AE_N_HIDDENS) ** 2 / THROUGHPUT[kind]
    if kind == "cpu":
        per_voxel += CPU_DECODE_S_PER_VOXEL_CHANNEL * nh
    return per_voxel * vox * ffloat(volumes) * (1.3 if method == "exact" else 1.0)


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "forever"
    if s >= 3 * 365 * 86400:
        return f"{s / (365 * 86400):.3g} years"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"

# -- sampling memory: everything the sampler holds for the whole batch at once ------------------------------
# Calibrated on the CPU with the bundled model (BiFlowNet dim 12, 8 latent channels, 16^3 latent),
# dpm++ 2 steps, fresh processes with glibc's mmap threshold at 64 KiB so that RSS follows live
# memory: the sampling peak over the loaded model was 2.3, 10.7, 42.5 and 182 MB for 1, 4, 16 and
# 64 volumes (2.3-2.85 MB per volume); the model below gives 2.95 MB per volume.
SAMPLER_STATE_COPIES = 6.0  # latent-sized float32 tensors per volume: x, noise, eps, x0, solver history
SAMPLER_ACT_MAPS = 11.0  # live float32 maps of the noise network's width (``dim``) at latent resolution
RELEASED_NET_DIM = 72  # BiFlowNet width of the released models (official config)
LATENT_CHANNELS = 8


def sampling_peak_bytes(latent_dhw: Sequence[int], volumes: int = 1, net_dim: int | None = None,
                        latent_channels: int = LATENT_CHANNELS, networks: float = 1.0) -> float:
    """Peak extra memory (bytes) of the sampler for ``volumes`` latents of ``latent_dhw`` run as one
    batch: its latents and state plus the noise network's activations (``networks`` > 1 for a
    ControlNet run next to the base). float32; ``inf`` for absurd sizes."""
    n = fprod(latent_dhw) * ffloat(volumes) * 4
    dim = net_dim or RELEASED_NET_DIM
    return n * (SAMPLER_STATE_COPIES * latent_channels + SAMPLER_ACT_MAPS * dim * networks)


@dataclass
class RunEstimate:
    seconds: float
    peak_bytes: float  # weights + the larger of the sampling and the decoding peak on the run device (CPU: + outputs)
    tile: int | None  # decode tile side in latent voxels, None = whole volume
    method: str = "whole"  # decode method (:class:`DecodePlan`)
    host_bytes: float = 0.0  # host RAM besides the run device: the exact decode's stage maps, and on a GPU the outputs
    step_seconds: float | None = None  # measured seconds of one sampler step for the whole batch (None: model-based)
    sampling_bytes: float = 0.0  # the sampler's peak for the whole batch (included in peak_bytes)
    output_bytes: float = 0.0  # the decoded outputs kept in RAM, all volumes (float32)
    decode: DecodePlan | None = None  # one volume's decode plan
    disk_bytes: float = 0.0  # disk for the exact decode's stage maps when they spill (``decode.spill_dir``)

    def text(self, device: str) -> str:
        where = "GPU memory" if device.startswith("cuda") else "RAM"
        plan = self.decode or DecodePlan(self.method, self.tile, 0.0)
        tiles = plan.describe()
        host = ""
        if device.startswith("cuda") and self.host_bytes > 0:
            what = "decoder maps and outputs" if self.method == "exact" and plan.store == "ram" else "outputs"
            host = f" + {_approx(self.host_bytes, gb_text)} RAM for {what}"
        step = "" if self.step_seconds is None else f" ({_step_text(self.step_seconds)} per sampler step, measured)"
        return (f"{_approx(self.seconds, human_seconds)} on {device}{step}, {_approx(self.peak_bytes, gb_text)} {where} "
                f"for weights, sampling and decoding ({tiles}){host}")


def _approx(n: float, fmt) -> str:
    return f"~{fmt(n)}" if math.isfinite(n) else fmt(n)






def _step_text(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else human_seconds(s)


def estimate_run(entry: "ModelEntry | None", compression: int, size_xyz: Sequence[int], steps: int, device: str = "cpu",
                 mode: str = "fast", volumes: int = 1, n_hiddens: int | None = None, weight_bytes: float = 0.0,
                 budget_bytes: float | None = None, host_budget_bytes: float | None = None,
                 net_dim: int | None = None, latent_channels: int = LATENT_CHANNELS,
                 step_seconds: float | None = None, decode_s_per_voxel: float | None = None,
                 networks: float = 1.0, plan: DecodePlan | None = None, spill_dir: str | None = None) -> RunEstimate:
    """Time, peak memory and decode plan of one generation run of ``volumes`` volumes of
    ``size_xyz`` image voxels (X, Y, Z). ``budget_bytes`` is what the run device may use,
    ``host_budget_bytes`` the RAM for the exact decode's stage maps when the device is a GPU.
    ``plan`` is one volume's decode plan when the caller made it (the pipeline's
    :meth:`~MedDiffusionLib.pipelines.generation.GenerationPipeline.decode_plan`), else it is made
    here (the authors' rule in reference mode, else :func:`plan_decode` spilling to ``spill_dir``).
    Stage maps spilled to disk count as ``disk_bytes``, not memory.

    Memory: weights plus the larger of (a) the sampler's peak for the whole batch
    (:func:`sampling_peak_bytes`, ``net_dim`` the noise network's width, ``networks`` how many such
    networks run per step) and (b) the decode: all latents, one volume's decode plan and the outputs
    of every volume (float32, kept in RAM until the run returns; on a GPU they go to
    ``host_bytes``). Time: ``steps * step_seconds`` when a sampler step was measured (for the
    whole batch), else :func:`estimate_seconds`; plus the decode of every volume at
    ``decode_s_per_voxel`` (measured) or :func:`decode_seconds`."""
    x, y, z = (int(s) for s in size_xyz)
    latent = (z // compression, x // compression, y // compression)
    nh = n_hiddens or RELEASED_AE_N_HIDDENS
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if plan is None and mode == "reference":
        plan = official_plan(nh, compression, latent, mode, kind)
    elif plan is None:
        plan = plan_decode(nh, compression, latent, budget_bytes, host_budget_bytes, mode, kind, spill_dir)
    out_one = 4 * fprod((x, y, z))
    outputs = out_one * ffloat(volumes)
    latents = 4 * latent_channels * fprod(latent) * ffloat(volumes)
    sampling = sampling_peak_bytes(latent, volumes, net_dim, latent_channels, networks)
    # decoding one volume at a time: its plan (tiled plans count their output already; the exact
    # decode writes it to the store), next to every latent and the outputs decoded so far
    decode_dev = plan.device_bytes + latents + (out_one if plan.method == "whole" else 0.0)
    exact_store = plan.store_bytes if plan.method == "exact" else 0.0
    # where the stage maps live: RAM, the GPU, or disk (then only the decoded volume stays in RAM)
    disk = exact_store if plan.store == "disk" else 0.0
    ram_store = out_one if disk else (0.0 if plan.store == "device" else exact_store)
    if plan.store == "device":
        decode_dev += exact_store
    if kind == "cpu":
        dev = max(sampling, decode_dev + ram_store + outputs)
        host = ram_store
    else:
        dev = max(sampling, decode_dev)
        host = ram_store + outputs
    if step_seconds is not None:
        sample_s = steps * step_seconds * SAMPLER_STEP_OVERHEAD
        if decode_s_per_voxel is not None:
            dec_s = decode_s_per_voxel * outputs / 4 * (1.3 if plan.method == "exact" else 1.0)
        else:
            dec_s = decode_seconds(compression, (x, y, z), device, nh, volumes, plan.method)
        seconds = sample_s + dec_s
    else:
        seconds = estimate_seconds(entry, compression, size_xyz, steps, device, volumes, mode)
    return RunEstimate(seconds, weight_bytes + dev, plan.tile, plan.method, host, step_seconds, sampling, outputs,
                       plan, disk)
