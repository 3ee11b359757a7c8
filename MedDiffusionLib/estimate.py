"""Rough time estimates shown before long runs (CPU warnings, Slicer panel).

Sampling cost scales with latent voxels x steps. Per-model CPU seconds come from the registry
when measured; otherwise forward cost is taken from the measured FLOPs of the released networks
(BiFlowNet 8x: 0.34 TFLOP per step at a 32^3 latent; 4x: 2.46 TFLOP at 64^3; decoder 23 / 54
TFLOP for a 256^3 output) and an effective device throughput.
"""
from __future__ import annotations

from typing import Sequence

# effective throughput of the 3-D convolutions, TFLOP/s (2-core CPU measured ~0.15; A100/H100 fp32+TF32 ~60)
THROUGHPUT = {"cpu": 0.15, "cuda": 60.0}
STEP_TFLOP_PER_LATENT_VOXEL = {8: 0.34 / 32 ** 3, 4: 2.46 / 64 ** 3}
DECODE_TFLOP_PER_IMAGE_VOXEL = {8: 23.0 / 256 ** 3, 4: 53.9 / 256 ** 3}


def estimate_seconds(entry_raw: dict | None, compression: int, size_xyz: Sequence[int], steps: int, device: str,
                     volumes: int = 1) -> float:
    """Estimated wall time of sampling + decoding."""
    x, y, z = (int(s) for s in size_xyz)
    vox = x * y * z
    lat = vox / compression ** 3
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if entry_raw is not None and kind == "cpu" and entry_raw.get("resources", {}).get("cpu_seconds"):
        base = entry_raw["classes"][0]["sizes"][0]["image_xyz"]
        base_vox = base[0] * base[1] * base[2]
        return float(entry_raw["resources"]["cpu_seconds"]) * vox / base_vox * (0.1 + 0.9 * steps / 1000) * volumes
    tflop = steps * lat * STEP_TFLOP_PER_LATENT_VOXEL.get(compression, 0.0) + vox * DECODE_TFLOP_PER_IMAGE_VOXEL.get(compression, 0.0)
    return tflop * volumes / THROUGHPUT[kind]


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# Live full-resolution feature maps during a decode, in units of (n_hiddens x image voxels) floats,
# plus a fixed overhead; fitted on the CPU to whole-volume decodes of the bundled autoencoder at
# 64^3-128^3 (Testing/benchmarks/benchmark.py: 112 / 391 / 672 MB measured).
DECODE_LIVE_MAPS = 11.0
DECODE_OVERHEAD_BYTES = 30 * 2 ** 20


def decode_peak_bytes(n_hiddens: int, compression: int, image_voxels: int, tile_image_voxels: int | None = None) -> float:
    """Peak extra memory of a decode (float32): live full-resolution maps of one tile (or of the
    whole volume), plus the output and blending weights when tiled."""
    active = image_voxels if tile_image_voxels is None else min(tile_image_voxels, image_voxels)
    peak = DECODE_OVERHEAD_BYTES + DECODE_LIVE_MAPS * n_hiddens * active * 4
    if tile_image_voxels is not None:
        peak += 2 * image_voxels * 4
    return float(peak)
