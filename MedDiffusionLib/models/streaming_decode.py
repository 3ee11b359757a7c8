"""Exact tiled decoding of the Patch-Volume decoder (stage streaming).

The decoder's convolutions and up-sampling are local; its only global operations are the mid-block
attention (at latent resolution, run whole here) and GroupNorm. This module streams the decoder
one operation at a time above the mid-block:

* every stage's activation map ``(B, C, D, H, W)`` but the up-sampled ones (below) lives in
  *store* memory (host RAM by default);
* each pass cuts its output into cubes; a cube's input, with a halo of the operation's receptive
  field (1 voxel for 3x3x3 convolutions, 1 low-resolution voxel for the 4/2/1 transposed
  convolution), is moved to the compute device, normalised and convolved there, and written back;
* GroupNorm statistics of every map (sums and sums of squares per (batch, channel), float32 blocks
  of 256 voxels accumulated in float64) are gathered while the map is written, so the next pass
  normalises each cube with the statistics of the *whole* map.

The result equals the whole-volume decode to float rounding (tests pin max |tiled - whole| <= 1e-4)
and the compute device only ever holds one cube's working set. The price is memory for the stored
maps (:func:`MedDiffusionLib.decoding.exact_decode_bytes`) and the halo overlap. The largest map,
the up-sampled one (the lower level's width at the higher resolution), is never stored: its cubes
are recomputed from the low-resolution map while the residual block after it runs, which costs
the transposed convolution twice and saves 44 % of the stored maps at the released width. The store is host
RAM, the GPU itself (``store_device``), or, when neither holds the maps, memory-mapped files in a
*spill* folder on disk (``spill_dir``): each map is a file whose blocks are reserved first (a full
disk is refused up front with :class:`~MedDiffusionLib.errors.ResourceError`, never a crash while
writing) and unlinked as soon as it is mapped, so nothing is left behind, not even after a crash.
"""
from __future__ import annotations

import errno
import itertools
import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Cancelled, ResourceError
from ..memory import size_text
from .autoencoder import PatchVolumeAE, ResBlockX, ResBlockXY, _Upsample
from .kernels import FastConv3d, channel_moments, group_norm_affine

Region = tuple[slice, slice, slice]
SPILL_PREFIX = "meddiffusion-spill-"


# -- spilling stage maps to disk -----------------------------------------------------------------------
def spill_directory(spill_dir: str | os.PathLike | None = None) -> Path:
    """The folder spilled stage maps go to: ``spill_dir``, else ``<cache root>/spill`` (cache root:
    ``MEDDIFFUSION_CACHE`` or ``~/.cache/meddiffusion``). Not created here."""
    if spill_dir is not None:
        return Path(spill_dir).expanduser()
    from ..paths import cache_root

    return cache_root() / "spill"


def free_disk_bytes(folder: str | os.PathLike) -> float:
    """Free bytes on the file system that holds ``folder`` (or, before it exists, its nearest
    existing parent)."""
    p = Path(folder).expanduser().absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return float(shutil.disk_usage(p).free)


def check_spill_space(folder: str | os.PathLike, need_bytes: float) -> None:
    """A :class:`ResourceError` unless ``folder``'s disk has ``need_bytes`` free."""
    free = free_disk_bytes(folder)
    if need_bytes > free:
        raise ResourceError(f"the exact decode needs {size_text(need_bytes)} of disk for its stage maps in {folder} "
                            f"(they do not fit in memory) but only {size_text(free)} is free there; free some "
                            "space, choose another spill folder, allow more memory (max_memory_gb) or choose a "
                            "smaller size")


def spilled_tensor(shape: tuple[int, ...], folder: str | os.PathLike) -> tuple[torch.Tensor, str | None]:
    """A float32 CPU tensor of ``shape`` backed by a memory-mapped file in ``folder``, and ``None``.
    The file is unlinked as soon as it is made, before its disk blocks are reserved and mapped: it
    has no name while it is used, its space returns to the disk when the tensor is freed, and
    nothing is left behind, not even after a crash. The blocks are reserved before mapping, so a
    full disk is a :class:`ResourceError` here, never a ``SIGBUS`` while writing. (Where an open
    file cannot be unlinked, Windows, its path comes back instead of ``None``, for the caller to
    remove once the tensor is freed.)"""
    n = math.prod(int(v) for v in shape)
    nbytes = 4 * max(n, 1)
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResourceError(f"cannot create the spill folder {folder} for the exact decode's stage maps: "
                            f"{exc.strerror or exc}") from exc
    check_spill_space(folder, nbytes)
    fd, path = tempfile.mkstemp(prefix=SPILL_PREFIX, suffix=".f32", dir=folder)
    leftover: str | None = None
    try:
        try:
            os.unlink(path)  # the open descriptor keeps the file; no name is left to clean up
        except OSError:
            leftover = path
        try:
            os.posix_fallocate(fd, 0, nbytes)  # type: ignore[attr-defined]
        except AttributeError:  # no posix_fallocate (Windows, macOS): a sparse file, space checked above
            os.ftruncate(fd, nbytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceError(f"the disk holding {folder} is full: the exact decode could not reserve "
                                    f"{size_text(nbytes)} for a stage map; free some space or choose another "
                                    "folder (--spill-dir)") from exc
            os.ftruncate(fd, nbytes)  # a file system without fallocate
        buf = mmap.mmap(fd, nbytes)  # shared, read-write; it outlives the descriptor
    except BaseException:
        if leftover is not None:
            os.close(fd)
            fd = -1
            Path(leftover).unlink(missing_ok=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    flat = torch.frombuffer(buf, dtype=torch.float32, count=max(n, 1))  # holds the mapping until freed
    return flat[:n].view(shape), leftover


class _Stats:
    """Running float64 per-(batch, channel) sums and sums of squares of one map
    (:func:`~MedDiffusionLib.models.kernels.channel_moments` per tile)."""

    def __init__(self) -> None:
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a tile ``(B, C, d, h, w)``."""
        s, ss = channel_moments(x.detach().float())
        s, ss = s.cpu(), ss.cpu()
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.count += x.shape[2] * x.shape[3] * x.shape[4]

    def affine(self, norm: nn.GroupNorm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(batch, channel) ``scale, shift`` (float32, shape ``(B, C, 1, 1, 1)``) such that
        ``x * scale + shift`` equals ``norm(x)`` over the whole map."""
        assert self.s is not None and self.ss is not None
        scale, shift = group_norm_affine(norm, self.s, self.ss, self.count)
        shape = (*self.s.shape, 1, 1, 1)
        return scale.float().view(shape).to(device), shift.float().view(shape).to(device)


def _cubes(dhw: tuple[int, int, int], side: int) -> Iterator[Region]:
    """Non-overlapping cubes of ``side`` covering a ``dhw`` box (the last ones may be smaller)."""
    ranges = [[slice(a, min(a + side, n)) for a in range(0, n, side)] for n in dhw]
    return iter(itertools.product(*ranges))  # type: ignore[arg-type]


def _halo_slices(grown: Region, dhw: tuple[int, ...]) -> tuple[list[slice], list[slice], list[int]]:
    """For a ``grown`` cube (which may reach outside a map of ``dhw``): the slices of the map it
    covers (clipped), where they land in the cube, and the cube's sides."""
    src, dst, sides = [], [], []
    for s, n in zip(grown, dhw):
        lo, hi = s.start, s.stop
        src.append(slice(max(lo, 0), min(hi, n)))
        dst.append(slice(max(-lo, 0), (hi - lo) - max(hi - n, 0)))
        sides.append(hi - lo)
    return src, dst, sides


def _halo(store: torch.Tensor, region: Region, halo: int) -> tuple[list[slice], list[slice], list[int]]:
    """:func:`_halo_slices` for ``region`` grown by ``halo`` voxels per side in ``store``."""
    return _halo_slices(tuple(slice(s.start - halo, s.stop + halo) for s in region), tuple(store.shape[2:]))


def _read(store: torch.Tensor, region: Region, halo: int, device: torch.device, memory_format: torch.memory_format,
          scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``store[region]`` grown by ``halo`` voxels per side, on ``device`` in ``memory_format``;
    voxels outside the map are zero. With ``scale``/``shift`` the stored voxels are normalised
    (``x * scale + shift``) while they are copied; the zero border stays zero."""
    src, dst, sides = _halo(store, region, halo)
    part = store[(slice(None), slice(None), *src)]
    if part.device != device:
        part = part.to(device, non_blocking=True)
    buf = torch.empty(store.shape[0], store.shape[1], *sides, dtype=store.dtype, device=device,
                      memory_format=memory_format)
    for axis, (d, n) in enumerate(zip(dst, sides)):  # zero the border outside the map only
        if d.start > 0:
            buf.narrow(2 + axis, 0, d.start).zero_()
        if d.stop < n:
            buf.narrow(2 + axis, d.stop, n - d.stop).zero_()
    inner = buf[(slice(None), slice(None), *dst)]
    if scale is None:
        inner.copy_(part)
    else:
        torch.addcmul(shift, part, scale, out=inner)
    return buf


def _memory_format(conv: nn.Module) -> torch.memory_format:
    channels_last = conv.weight.dim() == 5 and conv.weight.is_contiguous(memory_format=torch.channels_last_3d) \
        and not conv.weight.is_contiguous()
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def _conv_valid(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` without its padding (the caller supplies the halo)."""
    if (type(conv) is FastConv3d and x.device.type == "cpu" and x.dtype == torch.float32
            and conv.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return torch.ops.aten.mkldnn_convolution(x, conv.weight, conv.bias, [0, 0, 0], list(conv.stride),
                                                 list(conv.dilation), conv.groups)
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


class StreamingDecoder:
    """Exact decode of a :class:`PatchVolumeAE` in cubes of ``tile`` latent voxels (``tile * 2**l``
    voxels at decoder level ``l``; image cubes of ``tile * f``).

    ``device`` runs the arithmetic (default: the autoencoder's); ``store_device`` holds the stage
    maps and the output (default CPU). With ``spill_dir`` the stage maps are memory-mapped files
    in that folder instead (:func:`spilled_tensor`; the output stays in RAM). ``cancel()`` is
    asked before every cube of every pass; when it turns true
    :class:`~MedDiffusionLib.errors.Cancelled` is raised."""

    def __init__(self, ae: PatchVolumeAE, tile: int, device: torch.device | str | None = None,
                 store_device: torch.device | str = "cpu", cancel: Callable[[], bool] | None = None,
                 spill_dir: str | os.PathLike | None = None):
        if int(tile) < 1:
            raise ValueError(f"the decode tile must be at least 1 latent voxel, got {tile}")
        self.ae = ae
        self.tile = int(tile)
        self.device = torch.device(device) if device is not None else next(ae.parameters()).device
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.store = torch.device("cpu") if spill_dir is not None else torch.device(store_device)
        self.format = _memory_format(ae.decoder.conv_first)
        self.cancel = cancel
        self._leftover: list[str] = []  # spill files the OS would not unlink while mapped (Windows)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("decoding cancelled")

    # -- passes ------------------------------------------------------------------------------------
    def _new_map(self, like: torch.Tensor, channels: int, dhw: tuple[int, ...], final: bool = False) -> torch.Tensor:
        """A stage map in the store, in the decoder's memory format (cubes copy in and out whole);
        spilled to a memory-mapped file unless it is the ``final`` output."""
        if self.spill_dir is None or final:
            return torch.empty(like.shape[0], channels, *dhw, dtype=torch.float32, device=self.store,
                               memory_format=self.format)
        b = like.shape[0]
        if self.format == torch.channels_last_3d:  # a (B, D, H, W, C) buffer seen as (B, C, D, H, W)
            buf, path = spilled_tensor((b, *dhw, channels), self.spill_dir)
            buf = buf.permute(0, 4, 1, 2, 3)
        else:
            buf, path = spilled_tensor((b, channels, *dhw), self.spill_dir)
        if path is not None:
            self._leftover.append(path)
        return buf

    def _norm_conv(self, x: torch.Tensor, stats: _Stats, norm: nn.GroupNorm, conv: nn.Conv3d, side: int,
                   skip=None, out: torch.Tensor | None = None, want_stats: bool = True,
                   final: bool = False) -> tuple[torch.Tensor, _Stats]:
        """``conv(silu(norm(x))) [+ skip(region)]`` cube by cube; returns the map and its statistics.
        ``skip(region, device)`` gives the residual of a cube; ``out`` may alias ``x`` when the skip
        reads ``x`` only inside the cube (it is read before the cube is written)."""
        scale, shift = stats.affine(norm, self.device)
        fmt = _memory_format(conv)
        halo = conv.kernel_size[0] // 2
        if out is None:
            out = self._new_map(x, conv.out_channels, tuple(x.shape[2:]), final)
        new_stats = _Stats()
        for region in _cubes(tuple(x.shape[2:]), side):
            self._check_cancel()
            # GroupNorm with whole-map statistics, applied while the cube and its halo are copied
            h = _read(x, region, halo, self.device, fmt, scale, shift)
            h = _conv_valid(conv, F.silu(h, inplace=True))
            if skip is not None:
                h = h.add_(skip(region))
            if want_stats:
                new_stats.add(h)
            out[(slice(None), slice(None), *region)] = h
            del h
        return out, new_stats

    def _res_block(self, block: nn.Module, x: torch.Tensor, stats: _Stats, side: int) -> tuple[torch.Tensor, _Stats]:
        h, h_stats = self._norm_conv(x, stats, block.norm1, block.conv1, side)
        if isinstance(block, ResBlockXY):
            fmt = _memory_format(block.resConv)

            def skip(region: Region) -> torch.Tensor:
                return block.resConv(_read(x, region, 0, self.device, fmt))

            out = None
        else:
            assert isinstance(block, ResBlockX)

            def skip(region: Region) -> torch.Tensor:
                return x[(slice(None), slice(None), *region)].to(self.device)

            out = x  # each cube reads its own residual before overwriting it
        return self._norm_conv(h, h_stats, block.norm2, block.conv2, side, skip=skip, out=out)

    def _upsample(self, up: _Upsample, x: torch.Tensor, side: int, keep: bool = True
                  ) -> tuple[torch.Tensor | None, _Stats]:
        """Transposed 4/2/1 convolution, cube by cube: output cube ``[2a, 2b)`` needs input
        ``[a-1, b+1)``. Returns the map (``None`` unless ``keep``: then only its statistics)."""
        conv = up.conv_trans
        fmt = _memory_format(conv)
        out = self._new_map(x, conv.out_channels, tuple(2 * n for n in x.shape[2:])) if keep else None
        stats = _Stats()
        for region in _cubes(tuple(x.shape[2:]), max(1, side // 2)):
            self._check_cancel()
            tile = _read(x, region, 1, self.device, fmt)
            h = conv(tile)  # padding 1 -> output [2(a-1), 2(b+1))
            h = h[..., 2:-2, 2:-2, 2:-2]
            stats.add(h)
            if out is not None:
                out[(slice(None), slice(None), *(slice(2 * s.start, 2 * s.stop) for s in region))] = h
            del h, tile
        return out, stats

    def _upsample_res_block(self, up: _Upsample, block: nn.Module, x: torch.Tensor, stats: _Stats,
                            side: int) -> tuple[torch.Tensor, _Stats]:
        """The up-sampling and the residual block after it, without storing the up-sampled map
        (the largest of all: the lower level's width at the higher resolution). One pass gathers
        the up-sampled map's statistics only; a second recomputes each cube of it, grown by one
        voxel for the 3x3x3 convolution, from the low-resolution map, and writes the block's first
        convolution and its residual (``resConv`` of the cube, or the cube itself); a third runs
        the second convolution onto the residual. The price is the transposed convolution twice."""
        conv_t = up.conv_trans
        _, up_stats = self._upsample(up, x, side, keep=False)
        scale, shift = up_stats.affine(block.norm1, self.device)
        fmt_t, fmt = _memory_format(conv_t), _memory_format(block.conv1)
        dhw = tuple(2 * n for n in x.shape[2:])
        h_map = self._new_map(x, block.conv1.out_channels, dhw)
        res_map = self._new_map(x, block.conv1.out_channels, dhw)
        h_stats = _Stats()
        for region in _cubes(dhw, side):  # cube sides and starts are even: side = tile * 2**level
            self._check_cancel()
            low = tuple(slice(s.start // 2, (s.stop + 1) // 2) for s in region)
            u = conv_t(_read(x, low, 1, self.device, fmt_t))[..., 1:-1, 1:-1, 1:-1]  # the cube grown by 1
            # GroupNorm with whole-map statistics inside the map; zero outside (conv1's padding)
            grown = tuple(slice(s.start - 1, s.stop + 1) for s in region)
            src, dst, sides = _halo_slices(grown, dhw)
            buf = torch.empty(u.shape[0], u.shape[1], *sides, dtype=u.dtype, device=u.device, memory_format=fmt).zero_()
            inner = (slice(None), slice(None), *dst)
            torch.addcmul(shift, u[inner], scale, out=buf[inner])
            h = _conv_valid(block.conv1, F.silu(buf, inplace=True))
            del buf
            h_stats.add(h)
            centre = u[..., 1:-1, 1:-1, 1:-1]
            if isinstance(block, ResBlockXY):
                res = block.resConv(centre.contiguous(memory_format=_memory_format(block.resConv)))
            else:
                assert isinstance(block, ResBlockX)
                res = centre
            cube = (slice(None), slice(None), *region)
            h_map[cube] = h
            res_map[cube] = res
            del h, res, centre, u

        def skip(region: Region) -> torch.Tensor:
            return res_map[(slice(None), slice(None), *region)].to(self.device)

        return self._norm_conv(h_map, h_stats, block.norm2, block.conv2, side, skip=skip, out=res_map)

    # -- the whole decode --------------------------------------------------------------------------
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices ``(B, d, h, w)`` -> image ``(B, 1, f*d, f*h, f*w)`` on the store device
        (in RAM when the maps spill)."""
        try:
            return self._decode(indices)
        finally:
            for path in self._leftover:  # mapped files that could not be unlinked at once (Windows)
                try:
                    os.unlink(path)
                except OSError:
                    pass
            self._leftover = []

    def _decode(self, indices: torch.Tensor) -> torch.Tensor:
        """The decoder's stages (:meth:`~MedDiffusionLib.models.autoencoder.Decoder.stages`): the
        latent-resolution ones whole on the compute device, then every other one streamed."""
        ae = self.ae
        self._check_cancel()
        h = ae.post_vq_conv(ae.codes(indices.to(self.device)))
        x: torch.Tensor | None = None
        stats = _Stats()
        side = self.tile
        stages = ae.decoder.stages()
        fuse = {i for i, (a, b) in enumerate(zip(stages, stages[1:])) if a.kind == "up" and b.kind == "res"}
        for i, stage in enumerate(stages):
            if i - 1 in fuse:
                continue  # the residual block ran together with the up-sampling before it
            if stage.kind == "latent":
                if x is not None:
                    raise ValueError("a latent-resolution stage after a streamed one cannot be streamed")
                h = stage.module(h)
                continue
            if x is None:  # the first streamed stage: the latent-resolution map goes to the store
                stats.add(h)
                x = self._new_map(h, h.shape[1], tuple(h.shape[2:]))
                x.copy_(h)
                del h
            if stage.kind == "res":
                x, stats = self._res_block(stage.module, x, stats, side)
            elif stage.kind == "up":
                side *= 2
                if i in fuse:
                    x, stats = self._upsample_res_block(stage.module, stages[i + 1].module, x, stats, side)
                else:
                    x, stats = self._upsample(stage.module, x, side)
            elif stage.kind == "out":
                norm, _, conv = stage.module
                x, stats = self._norm_conv(x, stats, norm, conv, side, want_stats=False, final=True)
            else:
                raise ValueError(f"the exact decode cannot stream a {stage.kind!r} stage")
        return x
