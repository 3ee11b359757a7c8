"""Time and memory estimates shown before a run (CLI warnings, Slicer panel) and used to pick
decode tiles.

Time: sampling cost scales with latent voxels x steps. Per-model CPU seconds come from the
registry when measured (fast mode); otherwise forward cost is taken from the measured FLOPs of the
released networks (BiFlowNet 8x: 0.34 TFLOP per step at a 32^3 latent; 4x: 2.46 TFLOP at 64^3;
decoder 23 / 54 TFLOP for a 256^3 output) and an effective device throughput.

Memory: the decoder dominates. Its peak is a fixed overhead plus a number of live float32 maps of
the full-resolution width (``n_hiddens`` channels) over the decoded block, plus, in reference mode
on the CPU, the im2col buffer of PyTorch's ``slow_conv3d`` (used for small maps), plus the output
and blending weights when tiled. Calibrated on the CPU (Testing/benchmarks/benchmark.py validates
it against measured peaks); on CUDA the same model is used for tile choice, with an OOM retry.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .registry import ModelEntry

# effective throughput of the 3-D convolutions in fast mode, TFLOP/s (2-core CPU ~0.15; A100/H100 ~60)
THROUGHPUT = {"cpu": 0.15, "cuda": 60.0}
# reference kernels on the CPU (slow_conv3d for small maps) are this much slower per step (benchmark)
CPU_REFERENCE_SLOWDOWN = 1.8
STEP_TFLOP_PER_LATENT_VOXEL = {8: 0.34 / 32 ** 3, 4: 2.46 / 64 ** 3}
DECODE_TFLOP_PER_IMAGE_VOXEL = {8: 23.0 / 256 ** 3, 4: 53.9 / 256 ** 3}


def estimate_seconds(entry: "ModelEntry | None", compression: int, size_xyz: Sequence[int], steps: int, device: str,
                     volumes: int = 1, mode: str = "fast") -> float:
    """Estimated wall time of sampling + decoding (``entry``: the registry model, for its measured
    CPU time; ``None`` falls back to the FLOP model)."""
    x, y, z = (int(s) for s in size_xyz)
    vox = x * y * z
    lat = vox / compression ** 3
    kind = "cuda" if device.startswith("cuda") else "cpu"
    slow = CPU_REFERENCE_SLOWDOWN if (kind == "cpu" and mode == "reference") else 1.0
    if entry is not None and kind == "cpu" and entry.cpu_seconds:
        base = entry.base_size
        base_vox = base[0] * base[1] * base[2]
        # measured for 1000 DDPM steps; the decode is ~1 % of that at the base size
        return entry.cpu_seconds * vox / base_vox * (0.01 + 0.99 * steps / 1000) * volumes * slow
    tflop = steps * lat * STEP_TFLOP_PER_LATENT_VOXEL.get(compression, 0.0) + vox * DECODE_TFLOP_PER_IMAGE_VOXEL.get(compression, 0.0)
    return tflop * volumes / THROUGHPUT[kind] * slow


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# -- decode memory ------------------------------------------------------------------------------------
# Fitted on the CPU to whole-volume decodes of the bundled autoencoder at 96^3 and 128^3 output
# (fresh processes, glibc mmap threshold fixed so that RSS follows live memory).
DECODE_OVERHEAD_BYTES = 14 * 2 ** 20
DECODE_LIVE_MAPS = {"fast": 5.75, "reference": 7.6}
SLOW_CONV3D_LIMIT = 20480  # PyTorch runs batch-1 k3 float32 convs as slow_conv3d when C*D*H <= this
RELEASED_AE_N_HIDDENS = 48  # both released autoencoders (official config)


def _decoder_levels(n_hiddens: int, compression: int, latent_dhw: Sequence[int]) -> list[tuple[int, tuple[int, int, int]]]:
    """(input width, (D, H, W)) of the decoder's 3x3x3 convolutions at each level, lowest first."""
    levels = int(round(math.log2(compression)))
    widths = [n_hiddens * 2 ** i for i in range(levels)]
    widths = (widths + [widths[-1]])[::-1]
    d, h, w = (int(v) for v in latent_dhw)
    return [(widths[max(i - 1, 0)], (d << i, h << i, w << i)) for i in range(levels + 1)]


def decode_peak_bytes(n_hiddens: int, compression: int, latent_dhw: Sequence[int], tile: int | None = None,
                      mode: str = "fast", device: str = "cpu") -> float:
    """Peak extra memory (bytes) of decoding a latent of ``latent_dhw`` voxels, whole (``tile``
    None) or in overlapping ``tile``-cubes; float32."""
    full = [int(v) for v in latent_dhw]
    block = full if tile is None else [min(int(tile), v) for v in full]
    maps = DECODE_LIVE_MAPS["reference" if mode == "reference" else "fast"]
    f3 = compression ** 3
    live = maps * n_hiddens * math.prod(block) * f3 * 4
    peak = live
    if mode == "reference" and device == "cpu":
        for width, (d, h, w) in _decoder_levels(n_hiddens, compression, block):
            if width * d * h <= SLOW_CONV3D_LIMIT:  # im2col columns next to that level's live maps
                level_live = maps * width * d * h * w * 4
                peak = max(peak, level_live + width * 27 * d * h * w * 4)
    if tile is not None:
        peak += 2 * math.prod(full) * f3 * 4  # output + blending weights
    return float(DECODE_OVERHEAD_BYTES + peak)


def choose_decode_tile(n_hiddens: int, compression: int, latent_dhw: Sequence[int], budget_bytes: float | None,
                       mode: str = "fast", device: str = "cpu", min_tile: int = 8) -> int | None:
    """``None`` when the whole latent decodes within ``budget_bytes`` (or the budget is unknown),
    else the largest tile side (latent voxels, >= ``min_tile``) whose *seamless* (blended) tiled
    decode fits."""
    if budget_bytes is None or decode_peak_bytes(n_hiddens, compression, latent_dhw, None, mode, device) <= budget_bytes:
        return None
    for t in range(max(latent_dhw) - 1, min_tile - 1, -1):
        if decode_peak_bytes(n_hiddens, compression, latent_dhw, t, mode, device) <= budget_bytes:
            return t
    return min_tile


# -- exact (stage-streamed) tiled decode: MedDiffusionLib.models.streaming_decode ---------------------
EXACT_TILE_MAPS = 3.0  # float32 copies of a cube's input (read, normalised, padded) and of its output
EXACT_STATS_MAPS = 2.0  # the float64 copy of an output cube for the GroupNorm sums
EXACT_MID_MAPS = 6.0  # live latent-resolution maps of conv_first + mid-block (run whole)


def exact_decode_bytes(n_hiddens: int, compression: int, latent_dhw: Sequence[int], tile: int,
                       batch: int = 1) -> tuple[float, float]:
    """``(device_bytes, store_bytes)`` of the exact tiled decode with ``tile``-cubes (latent voxels):
    the compute device's peak working set (whole mid-block at latent resolution, then one cube with
    its halo per pass) and the peak of the stage maps kept in the store (host RAM), output included.
    On the CPU both live in RAM: add them."""
    levels = int(round(math.log2(compression)))
    widths = [n_hiddens * 2 ** i for i in range(levels)]
    widths = (widths + [widths[-1]])[::-1]
    lat = [int(v) for v in latent_dhw]
    n_lat = math.prod(lat)
    device = EXACT_MID_MAPS * widths[0] * n_lat * 4
    store = 0.0
    for lev in range(levels + 1):
        cin, cout = (widths[0] if lev == 0 else widths[lev - 1]), widths[lev]
        dims = [v << lev for v in lat]
        cube = [min(int(tile) << lev, v) for v in dims]
        inner, halo = math.prod(cube), math.prod(c + 2 for c in cube)
        n = math.prod(dims)
        out_cube = (EXACT_TILE_MAPS + EXACT_STATS_MAPS) * inner
        for c_in in (cin, cout, cout, cout):  # res1.conv1, res1.conv2 (+skip), res2.conv1, res2.conv2
            device = max(device, 4 * (EXACT_TILE_MAPS * c_in * halo + cout * out_cube + cin * inner))
        store = max(store, 4 * n * (cin + 2 * cout) if cin != cout else 4 * n * 2 * cout)
        if lev < levels:  # transposed convolution to the next level
            up = math.prod(2 * c + 4 for c in cube)
            device = max(device, 4 * cout * (2 * halo + up + EXACT_STATS_MAPS * 8 * inner))
            store = max(store, 4 * n * cout * 9)
        else:  # final GroupNorm + SiLU + conv to one channel, next to the output
            device = max(device, 4 * (EXACT_TILE_MAPS * cout * halo + 2 * inner))
            store = max(store, 4 * n * (cout + 1))
    return float(DECODE_OVERHEAD_BYTES + batch * device), float(batch * store)


def choose_exact_tile(n_hiddens: int, compression: int, latent_dhw: Sequence[int], device_budget: float | None,
                      store_budget: float | None, shared: bool, min_tile: int = 1) -> int | None:
    """Largest cube side (latent voxels, a divisor-free choice up to the longest side) whose exact
    tiled decode fits: device peak within ``device_budget`` and store peak within ``store_budget``;
    with ``shared`` (CPU: one memory) their sum must fit ``device_budget``. ``None`` if none fits."""
    for t in range(max(int(v) for v in latent_dhw), min_tile - 1, -1):
        dev, store = exact_decode_bytes(n_hiddens, compression, latent_dhw, t)
        if shared:
            if device_budget is None or dev + store <= device_budget:
                return t
        elif (device_budget is None or dev <= device_budget) and (store_budget is None or store <= store_budget):
            return t
    return None


# The official pipeline decodes a latent whole up to these many voxels, else in 32^3 tiles.
OFFICIAL_WHOLE_MAX = {8: 32 ** 3, 4: 64 ** 3}
OFFICIAL_TILE = 32


@dataclass
class DecodePlan:
    """How a latent is decoded: ``method`` "whole", "exact" (stage-streamed cubes, equal to whole),
    "seamless" (blended cubes, approximate) or "official" (the authors' 32^3 tiles); ``tile`` in
    latent voxels (None for whole); ``device_bytes`` / ``store_bytes`` the estimated peaks."""

    method: str
    tile: int | None
    device_bytes: float
    store_bytes: float = 0.0


def official_plan(n_hiddens: int, compression: int, latent_dhw: Sequence[int], mode: str = "reference",
                  device: str = "cpu") -> DecodePlan:
    """The authors' rule: whole up to :data:`OFFICIAL_WHOLE_MAX` latent voxels, else 32^3 tiles."""
    big = math.prod(latent_dhw) > OFFICIAL_WHOLE_MAX.get(compression, 32 ** 3)
    block = [min(OFFICIAL_TILE, int(v)) for v in latent_dhw] if big else latent_dhw
    peak = decode_peak_bytes(n_hiddens, compression, block, None, mode, device)
    if big:
        peak += 4 * math.prod(latent_dhw) * compression ** 3  # the pasted output
    return DecodePlan("official" if big else "whole", OFFICIAL_TILE if big else None, peak)


def plan_decode(n_hiddens: int, compression: int, latent_dhw: Sequence[int], budget_bytes: float | None,
                host_budget_bytes: float | None = None, mode: str = "fast", device: str = "cpu") -> DecodePlan:
    """Whole when it fits ``budget_bytes`` (or the budget is unknown); else the exact tiled decode with
    the largest cube that fits device and host memory; else (host memory short too) blended tiles."""
    whole = decode_peak_bytes(n_hiddens, compression, latent_dhw, None, mode, device)
    if budget_bytes is None or whole <= budget_bytes:
        return DecodePlan("whole", None, whole)
    shared = not device.startswith("cuda")
    tile = choose_exact_tile(n_hiddens, compression, latent_dhw, budget_bytes, host_budget_bytes, shared)
    if tile is not None:
        dev, store = exact_decode_bytes(n_hiddens, compression, latent_dhw, tile)
        return DecodePlan("exact", tile, dev, store)
    tile = choose_decode_tile(n_hiddens, compression, latent_dhw, budget_bytes, mode, device)
    return DecodePlan("seamless", tile, decode_peak_bytes(n_hiddens, compression, latent_dhw, tile, mode, device))


def available_memory_bytes(device: str = "cpu") -> float | None:
    """Memory a run may still use on ``device``: CUDA free + cached-but-unused, or the OS's
    MemAvailable (Linux) / available physical pages; ``None`` when unknown."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class RunEstimate:
    seconds: float
    peak_bytes: float  # weights + decode peak on the run device (the decoder dominates the sampler)
    tile: int | None  # decode tile side in latent voxels, None = whole volume
    method: str = "whole"  # decode method (:class:`DecodePlan`)
    host_bytes: float = 0.0  # stage maps the exact tiled decode keeps in host RAM (on the CPU: in peak_bytes)

    def text(self, device: str) -> str:
        where = "GPU memory" if device.startswith("cuda") else "RAM"
        if self.tile is None:
            tiles = "whole-volume decode"
        elif self.method == "exact":
            tiles = f"exact decode in {self.tile}^3-latent tiles"
        else:
            tiles = f"decoded in {self.tile}^3-latent tiles"
        host = (f" + ~{self.host_bytes / 2 ** 30:.1f} GB RAM for decoder maps"
                if self.method == "exact" and device.startswith("cuda") else "")
        return (f"~{human_seconds(self.seconds)} on {device}, ~{self.peak_bytes / 2 ** 30:.1f} GB {where} for weights "
                f"and decoding ({tiles}){host}")


def estimate_run(entry: "ModelEntry | None", compression: int, size_xyz: Sequence[int], steps: int, device: str = "cpu",
                 mode: str = "fast", volumes: int = 1, n_hiddens: int | None = None, weight_bytes: float = 0.0,
                 budget_bytes: float | None = None, host_budget_bytes: float | None = None) -> RunEstimate:
    """Time, peak memory and decode plan of one generation run (``size_xyz`` image voxels X, Y, Z).
    ``budget_bytes`` is what the run device may use, ``host_budget_bytes`` the RAM for the exact
    decode's stage maps when the device is a GPU."""
    x, y, z = (int(s) for s in size_xyz)
    latent = (z // compression, x // compression, y // compression)
    nh = n_hiddens or RELEASED_AE_N_HIDDENS
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if mode == "reference":
        plan = official_plan(nh, compression, latent, mode, kind)
    else:
        plan = plan_decode(nh, compression, latent, budget_bytes, host_budget_bytes, mode, kind)
    dev = plan.device_bytes + (plan.store_bytes if kind == "cpu" else 0.0)
    return RunEstimate(estimate_seconds(entry, compression, size_xyz, steps, device, volumes, mode),
                       weight_bytes + dev, plan.tile, plan.method, plan.store_bytes)
