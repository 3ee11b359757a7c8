"""Decoding codebook indices to a volume, in one place: how (the plan), how much memory each way
needs (the estimate), the ways themselves (strategies) and what happens when the GPU runs out of
memory (the retry). ``plan_decode(...)`` makes a :class:`DecodePlan`; ``decode(ae, indices, plan)``
runs it. Every way iterates the decoder's one stage list (:meth:`Decoder.stages
<MedDiffusionLib.models.autoencoder.Decoder.stages>`):

* ``whole``: the stages on the whole volume (the autoencoder's own ``decode``);
* ``exact``: the stages streamed in cubes with whole-map GroupNorm statistics, equal to the whole
  decode to float rounding (:mod:`MedDiffusionLib.models.streaming_decode`); its stage maps live
  in GPU memory, RAM or memory-mapped files on disk (``store``), so it runs at any memory cap;
* ``seamless``: overlapping cubes, each decoded whole and blended with linear ramps (approximate:
  every cube sees its own GroupNorm statistics and attention); only when asked for;
* ``official``: the authors' rule, whole up to 32^3 (8x) / 64^3 (4x) latent voxels, else
  non-overlapping 32^3 cubes pasted side by side (seams; approximate).

Memory model: the whole decode's peak is a fixed overhead plus a number of live float32 maps of
the full-resolution width (``n_hiddens`` channels) over the decoded block, plus, in reference mode
on the CPU, the im2col buffer of PyTorch's ``slow_conv3d`` (small maps), plus the output and
blending weights when tiled; calibrated on the CPU (the benchmark checks it against measured
peaks) and used on CUDA too, with the out-of-memory retry behind it. The exact decode's device
working set and stage maps: :func:`exact_decode_bytes`.

Every planner here is bounded whatever size a client asks for: tile searches are binary searches
over monotone pieces of the cost (O(log n) evaluations) and absurd sizes give ``inf`` bytes.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .defaults import show
from .errors import Cancelled
from .memory import available_memory_bytes, fprod, size_text

log = logging.getLogger(__name__)

CancelFn = Callable[[], bool]
TILINGS = ("auto", "exact", "seamless", "official", "whole")


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
    live = maps * n_hiddens * fprod(block) * f3 * 4
    peak = live
    if mode == "reference" and device == "cpu":
        for width, (d, h, w) in _decoder_levels(n_hiddens, compression, block):
            if width * d * h <= SLOW_CONV3D_LIMIT:  # im2col columns next to that level's live maps
                level_live = maps * width * fprod((d, h, w)) * 4
                peak = max(peak, level_live + width * 27 * fprod((d, h, w)) * 4)
    if tile is not None:
        peak += 2 * fprod(full) * f3 * 4  # output + blending weights
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
    n_lat = fprod(lat)
    device = EXACT_MID_MAPS * widths[0] * n_lat * 4
    store = 0.0
    for lev in range(levels + 1):
        cin, cout = (widths[0] if lev == 0 else widths[lev - 1]), widths[lev]
        dims = [v << lev for v in lat]
        cube = [min(int(tile) << lev, v) for v in dims]
        inner, halo = fprod(cube), fprod([c + 2 for c in cube])
        n = fprod(dims)
        out_cube = (EXACT_TILE_MAPS + EXACT_STATS_MAPS) * inner
        for c_in in (cin, cout, cout, cout):  # res1.conv1, res1.conv2 (+skip), res2.conv1, res2.conv2
            device = max(device, 4 * (EXACT_TILE_MAPS * c_in * halo + cout * out_cube + cin * inner))
        if lev == 0:  # equal widths: the block's first convolution next to its input
            store = max(store, 4 * n * 2 * cout)
        else:  # up-sampling + res1 in one pass: the low-resolution input, res1's convolution and residual
            low_halo, up = fprod([(c + 1) // 2 + 2 for c in cube]), fprod([c + 4 for c in cube])
            device = max(device, 4 * (EXACT_TILE_MAPS * cin * low_halo + 2 * cin * up + cout * (out_cube + inner)))
            store = max(store, 4 * (cin * n / 8 + 2 * cout * n))
        if lev < levels:  # the statistics pass of the transposed convolution to the next level
            up = fprod([2 * c + 4 for c in cube])
            device = max(device, 4 * cout * (2 * halo + up + EXACT_STATS_MAPS * 8 * inner))
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
    device_bytes: float = 0.0
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
            maps = f"{size_text(self.store_bytes)} of stage maps {where or 'spilled to disk'}"
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
    """The authors' rule: whole up to :data:`OFFICIAL_WHOLE_MAX` latent voxels, else 32^3 tiles.
    Their tiles need every side divisible by 32; a larger latent that is not gets blended 32^3
    tiles instead (bounded memory, approximate, and said so in the plan)."""
    big = math.prod(int(v) for v in latent_dhw) > OFFICIAL_WHOLE_MAX.get(compression, 32 ** 3)
    if big and any(int(v) % OFFICIAL_TILE for v in latent_dhw):
        return DecodePlan("seamless", OFFICIAL_TILE,
                          decode_peak_bytes(n_hiddens, compression, latent_dhw, OFFICIAL_TILE, mode, device))
    block = [min(OFFICIAL_TILE, int(v)) for v in latent_dhw] if big else latent_dhw
    peak = decode_peak_bytes(n_hiddens, compression, block, None, mode, device)
    if big:
        peak += 4 * fprod(latent_dhw) * compression ** 3  # the pasted output
    return DecodePlan("official" if big else "whole", OFFICIAL_TILE if big else None, peak)


def resolve_tiling(tiling: str, mode: str = "fast") -> str:
    """``"auto"`` -> ``"exact"`` in fast kernel mode, ``"official"`` (the authors' rule) in
    reference mode; other names of :data:`TILINGS` pass; unknown names are a ``ValueError``."""
    if tiling == "auto":
        return "exact" if mode == "fast" else "official"
    if tiling not in TILINGS:
        raise ValueError(f"unknown tiling {show(tiling)}; use {', '.join(TILINGS)}")
    return tiling


def plan_decode(n_hiddens: int, compression: int, latent_dhw: Sequence[int], budget_bytes: float | None,
                host_budget_bytes: float | None = None, mode: str = "fast", device: str = "cpu",
                spill_dir: str | None = None, tiling: str = "exact") -> DecodePlan:
    """How a latent of ``latent_dhw`` voxels decodes under ``budget_bytes`` of the run device's
    memory (``None``: unknown, decode whole) and, on a GPU, ``host_budget_bytes`` of RAM.

    ``tiling="exact"`` (the default): whole when it fits, else the exact streamed decode, never an
    approximate one. Its stage maps go, in this order of preference, to: GPU memory (on CUDA,
    when ``budget_bytes`` holds them and a cube's working set), RAM (the CPU: when working set and
    maps together fit ``budget_bytes``; CUDA: when the maps fit ``host_budget_bytes``), else
    memory-mapped files in ``spill_dir`` on disk, with the largest cube whose working set fits
    the budget (the smallest, 1, when none does: still exact). ``"seamless"``: the largest blended
    cube that fits (approximate); ``"official"``: the authors' rule; ``"whole"``: whole, whatever
    the budget; ``"auto"``: :func:`resolve_tiling`. Each search is O(log n) evaluations."""
    tiling = resolve_tiling(tiling, mode)
    if tiling == "official":
        return official_plan(n_hiddens, compression, latent_dhw, mode, device)
    whole = decode_peak_bytes(n_hiddens, compression, latent_dhw, None, mode, device)
    if tiling == "whole" or budget_bytes is None or whole <= budget_bytes:
        return DecodePlan("whole", None, whole)
    if tiling == "seamless":
        tile = choose_decode_tile(n_hiddens, compression, latent_dhw, budget_bytes, mode, device)
        if tile is None or tile >= max(int(v) for v in latent_dhw):
            return DecodePlan("whole", None, whole)  # one cube covers the latent
        return DecodePlan("seamless", tile, decode_peak_bytes(n_hiddens, compression, latent_dhw, tile, mode, device))

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
    if cuda and host_budget_bytes is None:  # host RAM unknown: the maps go there
        return plan(tile or 1, "ram")
    return plan(tile or 1, "disk")


def host_store_plan(n_hiddens: int, compression: int, latent_dhw: Sequence[int], tile: int,
                    spill_dir: str | None) -> DecodePlan:
    """The exact decode in ``tile``-cubes with its stage maps in RAM, or on disk in ``spill_dir``
    when they do not fit 80 % of the free RAM (the retry after a GPU out-of-memory error)."""
    dev, maps = exact_decode_bytes(n_hiddens, compression, latent_dhw, tile)
    avail = available_memory_bytes("cpu")
    if avail is None or maps <= 0.8 * avail:
        return DecodePlan("exact", tile, dev, maps, "ram")
    return DecodePlan("exact", tile, dev, maps, "disk", spill_dir)


# -- the ways to decode -------------------------------------------------------------------------------
def _check_cancel(cancel: CancelFn | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("decoding cancelled")


def _cubes_3d(dhw: Sequence[int], starts_of: Callable[[int], list[int]]) -> Iterator[tuple[int, int, int]]:
    for i in starts_of(dhw[0]):
        for j in starts_of(dhw[1]):
            for k in starts_of(dhw[2]):
                yield i, j, k


def decode_official(ae, indices: torch.Tensor, tile: int = OFFICIAL_TILE, cancel: CancelFn | None = None) -> torch.Tensor:
    """The authors' ``decode_sliding``: codebook indices ``(B, d, h, w)`` cut into non-overlapping
    ``tile``-cubes, each decoded whole and pasted back -> ``(B, 1, f*d, f*h, f*w)`` (visible seams;
    kept as the reference mode). ``cancel()`` is asked before every cube."""
    t = int(tile)
    b, d, h, w = indices.shape
    if d % t or h % t or w % t:
        raise ValueError(f"tiled decoding needs latent sides divisible by {t}; got {d}x{h}x{w}")
    f = ae.compression
    out = None
    for i, j, k in _cubes_3d((d, h, w), lambda n: list(range(0, n, t))):
        _check_cancel(cancel)
        dec = ae.decode(indices[:, i:i + t, j:j + t, k:k + t], quantize=False)
        if out is None:
            out = dec.new_empty(b, dec.shape[1], d * f, h * f, w * f)
        out[..., i * f:(i + t) * f, j * f:(j + t) * f, k * f:(k + t) * f] = dec
    return out


def _ramp(length: int, at_start: bool, at_end: bool, blend: int) -> torch.Tensor:
    """Blending weights along one axis of a cube: linear ramps over ``blend`` voxels at the sides
    that overlap a neighbour, 1 elsewhere."""
    wgt = torch.ones(length)
    if blend > 0:
        up = (torch.arange(blend, dtype=torch.float32) + 0.5) / blend
        if not at_start:
            wgt[:blend] = up
        if not at_end:
            wgt[-blend:] = torch.minimum(wgt[-blend:], up.flip(0))
    return wgt


def decode_seamless(ae, indices: torch.Tensor, tile: int = 32, overlap: int = 8,
                    out_device: torch.device | str | None = None, cancel: CancelFn | None = None) -> torch.Tensor:
    """Blended tiles: codebook indices ``(B, d, h, w)`` cut into overlapping ``tile``-cubes
    (``overlap`` latent voxels shared with each neighbour), each decoded whole and blended with
    linear ramps, so no seams show -> ``(B, 1, f*d, f*h, f*w)`` float32 on ``out_device``
    (default: the indices'). Approximate (per-cube statistics). Peak memory: one cube's
    activations plus the output. ``cancel()`` is asked before every cube."""
    b, d, h, w = indices.shape
    f = ae.compression
    tile = int(tile)
    overlap = max(0, min(int(overlap), tile - 1))
    dev = torch.device(out_device) if out_device is not None else indices.device

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        s = list(range(0, n - tile + 1, tile - overlap))
        return s if s[-1] == n - tile else s + [n - tile]

    out = wsum = None
    blend = overlap * f
    for i, j, k in _cubes_3d((d, h, w), starts):
        _check_cancel(cancel)
        sl = indices[:, i:i + tile, j:j + tile, k:k + tile]
        dec = ae.decode(sl, quantize=False).to(dev, torch.float32)  # blended in fp32 whatever the precision
        td, th, tw = sl.shape[1:]
        if out is None:
            out = torch.zeros(b, dec.shape[1], d * f, h * f, w * f, device=dev)
            wsum = torch.zeros(1, 1, d * f, h * f, w * f, device=dev)
        wz = _ramp(td * f, i == 0, i + td >= d, blend)
        wy = _ramp(th * f, j == 0, j + th >= h, blend)
        wx = _ramp(tw * f, k == 0, k + tw >= w, blend)
        wgt = (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).to(dev, dec.dtype)
        region = (..., slice(i * f, (i + td) * f), slice(j * f, (j + th) * f), slice(k * f, (k + tw) * f))
        out[region] += dec * wgt
        wsum[region] += wgt
    return out / wsum


def decode(ae, indices: torch.Tensor, plan: DecodePlan, cancel: CancelFn | None = None,
           spill_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Codebook indices ``(B, d, h, w)`` -> image ``(B, 1, f*d, f*h, f*w)``, the way ``plan`` says.
    The exact decode keeps its stage maps where ``plan.store`` says (``"disk"``: ``plan.spill_dir``,
    else ``spill_dir``, else the cache's spill folder; the free disk is checked first, one clear
    :class:`~MedDiffusionLib.errors.ResourceError` before any pass). ``cancel()`` is asked between
    cubes (:class:`~MedDiffusionLib.errors.Cancelled` when true). No gradients are recorded."""
    from .models.streaming_decode import StreamingDecoder, check_spill_space, spill_directory

    dhw, tile = tuple(indices.shape[1:]), plan.tile
    with torch.no_grad():
        if tile is None or plan.method == "whole" or tile >= max(dhw) and plan.method == "seamless":
            return ae.decode(indices, quantize=False)
        if plan.method == "exact":
            if plan.store == "disk":
                folder = plan.spill_dir or spill_directory(spill_dir)
                check_spill_space(folder, plan.store_bytes)
                dec = StreamingDecoder(ae, tile, cancel=cancel, spill_dir=folder)
            else:
                store = next(ae.parameters()).device if plan.store == "device" else torch.device("cpu")
                dec = StreamingDecoder(ae, tile, cancel=cancel, store_device=store)
            return dec.decode_indices(indices)
        if plan.method == "official":  # official_plan gives blended tiles where these do not divide
            return decode_official(ae, indices, tile, cancel)
        if plan.method == "seamless":
            return decode_seamless(ae, indices, tile, max(1, tile // 4), cancel=cancel)
    raise ValueError(f"unknown decode method {plan.method!r}")


def decode_retrying(ae, indices: torch.Tensor, plan: DecodePlan, cancel: CancelFn | None = None,
                    spill_dir: str | os.PathLike | None = None,
                    tiling: str = "exact") -> tuple[torch.Tensor, DecodePlan]:
    """:func:`decode`, and on a CUDA out-of-memory error the retry, which keeps what ``tiling``
    (the resolved request: exact, seamless, official or whole) promised: an exact decode, or a
    whole one planned under ``"exact"``, goes on exactly, first moving GPU-held stage maps off the
    GPU (RAM, else disk), then in cubes a quarter smaller each time; a blended one shrinks its
    tiles; ``"whole"`` and the authors' tiling are not changed (the error is raised). Returns the
    image and the plan that made it."""
    dhw = tuple(int(v) for v in indices.shape[1:])
    nh, f = ae.config["n_hiddens"], ae.compression
    spill = None if spill_dir is None else str(spill_dir)
    while True:
        _check_cancel(cancel)
        try:
            return decode(ae, indices, plan, cancel, spill_dir), plan
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            tile = plan.tile
            exact = plan.method == "exact" or (plan.method == "whole" and tiling == "exact")
            if plan.method == "exact" and plan.store == "device":
                log.warning("decode ran out of GPU memory; retrying with the stage maps off the GPU")
                plan = host_store_plan(nh, f, dhw, tile, plan.spill_dir or spill)
                continue
            blended = plan.method == "seamless" or (plan.method == "whole" and tiling == "seamless")
            smaller = max(1 if exact else 8, (tile or max(dhw)) * 3 // 4)
            if not (exact or blended) or smaller == tile:
                raise
            log.warning("decode ran out of GPU memory; retrying with %d^3 latent tiles", smaller)
            plan = host_store_plan(nh, f, dhw, smaller, plan.spill_dir or spill) if exact \
                else DecodePlan("seamless", smaller, 0.0)
