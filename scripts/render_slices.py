#!/usr/bin/env python
"""Render the central axial, coronal and sagittal slices of a volume to a PNG (grayscale, HU window).

Usage: python scripts/render_slices.py VOLUME OUT.png [--window LO HI] [--scale N]
"""
from __future__ import annotations

import argparse
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffusionLib.data.volumes import read_volume  # noqa: E402


def write_png(path: Path, gray: np.ndarray) -> None:
    h, w = gray.shape
    raw = b"".join(b"\x00" + gray[r].astype(np.uint8).tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volume")
    ap.add_argument("out", type=Path)
    ap.add_argument("--window", type=float, nargs=2, default=(-1000.0, 400.0))
    ap.add_argument("--scale", type=int, default=4, help="pixel repetition (nearest) for small volumes")
    args = ap.parse_args()
    vol = read_volume(args.volume).canonical()
    a = vol.array.astype(np.float32)  # (i=R, j=A, k=S)
    sx, sy, sz = vol.spacing
    i, j, k = (s // 2 for s in a.shape)
    # radiological display: patient right on the image left, anterior up, superior up
    # i increases towards the patient's right, so image columns run R..L when i increases to the left
    axial = np.flipud(a[:, :, k].T)[:, ::-1]        # rows: A (top) .. P; cols: patient R (left) .. L
    coronal = np.flipud(a[:, j, :].T)[:, ::-1]      # rows: S (top) .. I;  cols: patient R (left) .. L
    sagittal = np.flipud(a[i, :, :].T)[:, ::-1]     # rows: S (top) .. I;  cols: A (left) .. P
    lo, hi = args.window

    def gray(x: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
        g = np.clip((x - lo) / (hi - lo), 0, 1) * 255
        r = max(1, round(args.scale * row_mm / min(sx, sy, sz)))
        c = max(1, round(args.scale * col_mm / min(sx, sy, sz)))
        return np.repeat(np.repeat(g, r, 0), c, 1)

    panels = [gray(axial, sy, sx), gray(coronal, sz, sx), gray(sagittal, sz, sy)]
    h = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, h - p.shape[0]), (0, 4)), constant_values=0) for p in panels]
    write_png(args.out, np.concatenate(panels, axis=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
