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
Everything that scales with the batch counts too: the sampler's latents and state and the noise
network's activations for all ``volumes`` at once (:func:`sampling_peak_bytes`), the latents kept
while decoding and every decoded output (:func:`estimate_run`).

Decode plans are exact unless blended tiles are asked for (:func:`plan_decode`): when the exact
decode's stage maps fit neither the device nor RAM they spill to disk, and the plan says how much
and where (:class:`DecodePlan`, :attr:`RunEstimate.disk_bytes`).

Every planner here is bounded whatever the size a client asks for: tile searches are binary
searches over monotone pieces of the cost (O(log n) evaluations), and sizes too large for a float
give ``inf`` bytes / seconds instead of an ``OverflowError``.
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
# the decoder at a small width is bound by memory traffic, not FLOPs: CPU seconds per output voxel
# and full-resolution channel (bundled 4x decoder, n_hiddens 8: ~4 us per voxel at 64^3 and 128^3)
CPU_DECODE_S_PER_VOXEL_CHANNEL = 0.45e-6
# one sampler step besides the network's forward (scheduler arithmetic, RNG): a small fraction
SAMPLER_STEP_OVERHEAD = 1.05


def _float(n: float | int) -> float:
    """``float(n)``, ``inf`` when an integer is too large for a float (absurd sizes)."""
    try:
        return float(n)
    except OverflowError:
        return math.inf


def _fprod(values: Sequence[int]) -> float:
    """The product of whole numbers as a float, ``inf`` when too large (no ``OverflowError``)."""
    return _float(math.prod(int(v) for v in values))


def _largest_fitting(fits, lo: int, hi: int, breaks: Sequence[int] = ()) -> int | None:
    """The largest ``t`` in ``[lo, hi]`` with ``fits(t)``, or ``None``; ``fits`` must be monotone
    (true up to some ``t``, then false) on each piece ``[lo, b1], (b1, b2], ..., (bk, hi]`` cut at
    ``breaks``. Binary search per piece, from the top: O(pieces * log(hi - lo)) calls, the same
    answer as scanning ``t = hi, hi - 1, ...``."""
    cuts = sorted({int(b) for b in breaks if lo <= b < hi})
    pieces = []
    start = lo
    for b in cuts:
        pieces.append((start, b))
        start = b + 1
    pieces.append((start, hi))
    for a, b in reversed(pieces):
        if a > b or not fits(a):
            continue
        while a < b:  # invariant: fits(a)
            mid = (a + b + 1) // 2
            if fits(mid):
                a = mid
            else:
                b = mid - 1
        return a
    return None


def estimate_seconds(entry: "ModelEntry | None", compression: int, size_xyz: Sequence[int], steps: int, device: str,
                     volumes: int = 1, mode: str = "fast") -> float:
    """Estimated wall time of sampling + decoding (``entry``: the registry model, for its measured
    CPU time; ``None`` falls back to the FLOP model)."""
    vox = _fprod(size_xyz)
    lat = vox / compression ** 3
    kind = "cuda" if device.startswith("cuda") else "cpu"
    slow = CPU_REFERENCE_SLOWDOWN if (kind == "cpu" and mode == "reference") else 1.0
    if entry is not None and kind == "cpu" and entry.cpu_seconds:
        base_vox = _fprod(entry.base_size)
        # measured for 1000 DDPM steps; the decode is ~1 % of that at the base size
        return entry.cpu_seconds * vox / base_vox * (0.01 + 0.99 * steps / 1000) * _float(volumes) * slow
    tflop = steps * lat * STEP_TFLOP_PER_LATENT_VOXEL.get(compression, 0.0) + vox * DECODE_TFLOP_PER_IMAGE_VOXEL.get(compression, 0.0)
    return tflop * _float(volumes) / THROUGHPUT[kind] * slow


def decode_seconds(compression: int, size_xyz: Sequence[int], device: str, n_hiddens: int | None = None,
                   volumes: int = 1, method: str = "whole") -> float:
    """Estimated decode time of ``volumes`` outputs of ``size_xyz`` voxels: the decoder's FLOPs
    (scaled by its width ``n_hiddens`` squared) at :data:`THROUGHPUT`, plus, on the CPU, the memory
    traffic that dominates narrow decoders (:data:`CPU_DECODE_S_PER_VOXEL_CHANNEL`). The stage-
    streamed exact decode pays ~30 % for its halos and copies."""
    nh = n_hiddens or RELEASED_AE_N_HIDDENS
    kind = "cuda" if device.startswith("cuda") else "cpu"
    vox = _fprod(size_xyz)
    per_voxel = DECODE_TFLOP_PER_IMAGE_VOXEL.get(compression, DECODE_TFLOP_PER_IMAGE_VOXEL[8]) \
        * (nh / RELEASED_AE_N_HIDDENS) ** 2 / THROUGHPUT[kind]
    if kind == "cpu":
        per_voxel += CPU_DECODE_S_PER_VOXEL_CHANNEL * nh
    return per_voxel * vox * _float(volumes) * (1.3 if method == "exact" else 1.0)


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
    live = maps * n_hiddens * _fprod(block) * f3 * 4
    peak = live
    if mode == "reference" and device == "cpu":
        for width, (d, h, w) in _decoder_levels(n_hiddens, compression, block):
            if width * d * h <= SLOW_CONV3D_LIMIT:  # im2col columns next to that level's live maps
                level_live = maps * width * _fprod((d, h, w)) * 4
                peak = max(peak, level_live + width * 27 * _fprod((d, h, w)) * 4)
    if tile is not None:
        peak += 2 * _fprod(full) * f3 * 4  # output + blending weights
    return float(DECODE_OVERHEAD_BYTES + peak)


def _slow_conv3d_breaks(n_hiddens: int, compression: int, latent_dhw: Sequence[int], hi: int) -> list[int]:
    """For each decoder level: the largest tile side ``t <= hi`` at which that level still runs
    PyTorch's ``slow_conv3d`` (width * d * h <= :data:`SLOW_CONV3D_LIMIT` on a ``t``-cube); the
    reference-mode CPU peak is monotone in ``t`` between these points."""
    full = [int(v) for v in latent_dhw]
    breaks = []
    for lev, (width, _) in enumerate(_decoder_levels(n_hiddens, compression, [1, 1, 1])):

        def active(t: int, lev: int = lev, width: int = width) -> bool:
            return width * (min(t, full[0]) << lev) * (min(t, full[1]) << lev) <= SLOW_CONV3D_LIMIT

        t = _largest_fitting(active, 1, hi)
        if t is not None:
            breaks.append(t)
    return breaks


def choose_decode_tile(n_hiddens: int, compression: int, latent_dhw: Sequence[int], budget_bytes: float | None,
                       mode: str = "fast", device: str = "cpu", min_tile: int = 8) -> int | None:
    """``None`` when the whole latent decodes within ``budget_bytes`` (or the budget is unknown),
    else the largest tile side (latent voxels, >= ``min_tile``, below the longest side) whose
    *seamless* (blended) tiled decode fits; ``min_tile`` when none does. O(log n) evaluations: the
    peak is monotone in the tile side except where the reference kernels switch (cut there)."""
    if budget_bytes is None or decode_peak_bytes(n_hiddens, compression, latent_dhw, None, mode, device) <= budget_bytes:
        return None
    hi = max(int(v) for v in latent_dhw) - 1
    breaks = _slow_conv3d_breaks(n_hiddens, compression, latent_dhw, hi) \
        if mode == "reference" and device == "cpu" else []
    t = _largest_fitting(
        lambda t: decode_peak_bytes(n_hiddens, compression, latent_dhw, t, mode, device) <= budget_bytes,
        min_tile, hi, breaks)
    return min_tile if t is None else t


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
    n_lat = _fprod(lat)
    device = EXACT_MID_MAPS * widths[0] * n_lat * 4
    store = 0.0
    for lev in range(levels + 1):
        cin, cout = (widths[0] if lev == 0 else widths[lev - 1]), widths[lev]
        dims = [v << lev for v in lat]
        cube = [min(int(tile) << lev, v) for v in dims]
        inner, halo = _fprod(cube), _fprod([c + 2 for c in cube])
        n = _fprod(dims)
        out_cube = (EXACT_TILE_MAPS + EXACT_STATS_MAPS) * inner
        for c_in in (cin, cout, cout, cout):  # res1.conv1, res1.conv2 (+skip), res2.conv1, res2.conv2
            device = max(device, 4 * (EXACT_TILE_MAPS * c_in * halo + cout * out_cube + cin * inner))
        store = max(store, 4 * n * (cin + 2 * cout) if cin != cout else 4 * n * 2 * cout)
        if lev < levels:  # transposed convolution to the next level
            up = _fprod([2 * c + 4 for c in cube])
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
    with ``shared`` (CPU: one memory) their sum must fit ``device_budget``. ``None`` if none fits.
    Binary search (the device peak grows with the cube, the store peak does not depend on it)."""

    def fits(t: int) -> bool:
        dev, store = exact_decode_bytes(n_hiddens, compression, latent_dhw, t)
        if shared:
            return device_budget is None or dev + store <= device_budget
        return (device_budget is None or dev <= device_budget) and (store_budget is None or store <= store_budget)

    return _largest_fitting(fits, min_tile, max(int(v) for v in latent_dhw))


# The official pipeline decodes a latent whole up to these many voxels, else in 32^3 tiles.
OFFICIAL_WHOLE_MAX = {8: 32 ** 3, 4: 64 ** 3}
OFFICIAL_TILE = 32


@dataclass
class DecodePlan:
    """How a latent is decoded: ``method`` "whole", "exact" (stage-streamed cubes, equal to whole),
    "seamless" (blended cubes, approximate) or "official" (the authors' 32^3 tiles); ``tile`` in
    latent voxels (None for whole); ``device_bytes`` / ``store_bytes`` the estimated peaks. For
    "exact", ``store`` says where the stage maps live: "ram" (host RAM), "device" (GPU memory) or
    "disk" (memory-mapped files in ``spill_dir``)."""

    method: str
    tile: int | None
    device_bytes: float
    store_bytes: float = 0.0
    store: str = "ram"
    spill_dir: str | None = None

    @property
    def exact(self) -> bool:
        """True when the result equals the whole-volume decode (to float rounding)."""
        return self.method in ("whole", "exact") or self.tile is None

    def describe(self) -> str:
        """One line for a person, e.g. "exact decode in 6^3-latent tiles, 2.1 GB of stage maps
        spilled to disk"; approximate decodes say so. No paths: it may go to a client."""
        if self.tile is None or self.method == "whole":
            return "whole-volume decode"
        if self.method == "exact":
            where = {"ram": "in RAM", "device": "in GPU memory"}.get(self.store)
            maps = f"{_size(self.store_bytes)} of stage maps {where or 'spilled to disk'}"
            return f"exact decode in {self.tile}^3-latent tiles, {maps}"
        if self.method == "official":
            return f"approximate decode in the authors' {self.tile}^3-latent tiles (official tiling: seams)"
        return f"approximate decode in blended {self.tile}^3-latent tiles (seamless tiling)"

    def meta(self) -> dict:
        """What a result's metadata records about its decode (no paths: it may go to a client)."""
        out = {"method": self.method, "exact": self.exact, "tile": self.tile}
        if self.method == "exact":
            out["store"] = self.store
        return out


def official_plan(n_hiddens: int, compression: int, latent_dhw: Sequence[int], mode: str = "reference",
                  device: str = "cpu") -> DecodePlan:
    """The authors' rule: whole up to :data:`OFFICIAL_WHOLE_MAX` latent voxels, else 32^3 tiles."""
    big = math.prod(int(v) for v in latent_dhw) > OFFICIAL_WHOLE_MAX.get(compression, 32 ** 3)
    block = [min(OFFICIAL_TILE, int(v)) for v in latent_dhw] if big else latent_dhw
    peak = decode_peak_bytes(n_hiddens, compression, block, None, mode, device)
    if big:
        peak += 4 * _fprod(latent_dhw) * compression ** 3  # the pasted output
    return DecodePlan("official" if big else "whole", OFFICIAL_TILE if big else None, peak)


def plan_decode(n_hiddens: int, compression: int, latent_dhw: Sequence[int], budget_bytes: float | None,
                host_budget_bytes: float | None = None, mode: str = "fast", device: str = "cpu",
                spill_dir: str | None = None) -> DecodePlan:
    """Whole when it fits ``budget_bytes`` (or the budget is unknown); else the exact tiled decode,
    never an approximate one. Its stage maps go, in this order of preference, to: GPU memory (on
    CUDA, when ``budget_bytes`` holds them and a cube's working set), RAM (the CPU: when working
    set and maps together fit ``budget_bytes``; CUDA: when the maps fit ``host_budget_bytes``),
    else memory-mapped files in ``spill_dir`` on disk, with the largest cube whose working set fits
    the budget (the smallest, 1, when none does: still exact). Each step is one binary search
    (:func:`choose_exact_tile`), O(log n) evaluations."""
    whole = decode_peak_bytes(n_hiddens, compression, latent_dhw, None, mode, device)
    if budget_bytes is None or whole <= budget_bytes:
        return DecodePlan("whole", None, whole)

    def plan(tile: int, store: str) -> DecodePlan:
        dev, maps = exact_decode_bytes(n_hiddens, compression, latent_dhw, tile)
        return DecodePlan("exact", tile, dev, maps, store, spill_dir if store == "disk" else None)

    cuda = device.startswith("cuda")
    # working set and stage maps in one memory: the CPU's RAM, or the GPU's memory on CUDA
    tile = choose_exact_tile(n_hiddens, compression, latent_dhw, budget_bytes, None, True)
    if tile is not None:
        return plan(tile, "device" if cuda else "ram")
    if cuda and host_budget_bytes is not None:
        tile = choose_exact_tile(n_hiddens, compression, latent_dhw, budget_bytes, host_budget_bytes, False)
        if tile is not None:
            return plan(tile, "ram")
    tile = choose_exact_tile(n_hiddens, compression, latent_dhw, budget_bytes, None, False)
    if cuda and host_budget_bytes is None:  # host RAM unknown: the maps go there, as before
        return plan(tile or 1, "ram")
    return plan(tile or 1, "disk")


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
    n = _fprod(latent_dhw) * _float(volumes) * 4
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
            host = f" + {_approx(self.host_bytes, _gb)} RAM for {what}"
        step = "" if self.step_seconds is None else f" ({_step_text(self.step_seconds)} per sampler step, measured)"
        return (f"{_approx(self.seconds, human_seconds)} on {device}{step}, {_approx(self.peak_bytes, _gb)} {where} "
                f"for weights, sampling and decoding ({tiles}){host}")


def _approx(n: float, fmt) -> str:
    return f"~{fmt(n)}" if math.isfinite(n) else fmt(n)


def _gb(n: float) -> str:
    if not math.isfinite(n):
        return "an unbounded amount of"
    return f"{n / 2 ** 30:.1f} GB" if n < 1e5 * 2 ** 30 else f"{n / 2 ** 30:.3g} GB"


def _size(n: float) -> str:
    """Bytes for a person: MB below a GB."""
    if not math.isfinite(n) or n >= 2 ** 30:
        return _gb(n)
    return f"{max(n, 1) / 2 ** 20:.0f} MB"


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
    out_one = 4 * _fprod((x, y, z))
    outputs = out_one * _float(volumes)
    latents = 4 * latent_channels * _fprod(latent) * _float(volumes)
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
