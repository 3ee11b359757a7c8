"""Throughput of `meddiffusion generate-dataset` with 1 and 2 workers, side by side in one run.

The same manifest (N images-only cases of the bundled model) is generated twice into fresh
folders: once in one process with all the CPU threads, once under torchrun with 2 processes
(cases sharded by rank) and half the threads each. Printed: cases per hour of each and their
ratio, and whether the two runs wrote equal voxels (they do only with equal threads per process;
see the README's dataset section). On a GPU machine pass `--device cuda` and `--workers` per GPU.

    .venv/bin/python Testing/benchmarks/dataset_throughput.py [--cases 8] [--steps 50] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps per case")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    common = ["--sampler", "ddim", "--steps", str(args.steps), "--device", args.device, "--quiet"]
    with tempfile.TemporaryDirectory(prefix="meddiffusion-throughput-") as tmp:
        man = Path(tmp) / "cases.jsonl"
        man.write_text("".join(json.dumps({"id": f"c{i:03d}"}) + "\n" for i in range(args.cases)))
        one = run([sys.executable, "-m", "MedDiffusionLib.cli", "generate-dataset", str(man), "--out",
                   str(Path(tmp) / "one"), "--threads", str(cores), *common], env)
        many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(args.workers), "-m", "MedDiffusionLib.cli", "generate-dataset", str(man), "--out",
                    str(Path(tmp) / "many"), "--threads", str(max(1, cores // args.workers)), *common], env)
        sys.path.insert(0, str(ROOT))
        import numpy as np

        from MedDiffusionLib.data.volumes import read_volume

        equal = all(np.array_equal(read_volume(Path(tmp) / "one" / f"c{i:03d}.nii.gz").array,
                                   read_volume(Path(tmp) / "many" / f"c{i:03d}.nii.gz").array)
                    for i in range(args.cases))
    rate1, rate2 = args.cases / one * 3600, args.cases / many * 3600
    print(f"{args.cases} cases of the bundled model (64^3, DDIM {args.steps}) on {args.device}, {cores} cores")
    print(f"{'workers':>8} {'threads each':>13} {'seconds':>8} {'cases/hour':>11}")
    print(f"{1:>8} {cores:>13} {one:>8.1f} {rate1:>11.0f}")
    print(f"{args.workers:>8} {max(1, cores // args.workers):>13} {many:>8.1f} {rate2:>11.0f}")
    print(f"ratio {args.workers} vs 1 workers: {rate2 / rate1:.2f}x; voxels equal case for case: {equal} "
          "(equal only with equal threads per process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
