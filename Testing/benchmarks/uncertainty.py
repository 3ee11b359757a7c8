"""Does the voxel-wise std of N samples flag the voxels whose error is high?

Sparse-view CT on real chest CT: each CT (default: the bundled test crop) is forward-projected
over 40 fan-beam views and reconstructed with FBP (`simulate-sparse-view`), then reconstructed with
the bundled sparse-view ControlNet `--num-samples N` times (the job API, as every front end runs
it). Printed per CT, over all voxels and over the body (CT > -900 HU): Pearson and Spearman
correlation of the std map with |mean - CT|, and how many of the 10 % highest-error voxels are
among the 10 % highest-std voxels (chance: 10 %).

    .venv/bin/python Testing/benchmarks/uncertainty.py [CT ...] [--samples 8] [--steps 50]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def ranks(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size, np.float64)
    out[np.argsort(x, kind="stable")] = np.arange(x.size)
    return out


def scores(std: np.ndarray, err: np.ndarray) -> dict[str, float]:
    s, e = std.ravel().astype(np.float64), err.ravel().astype(np.float64)
    top = max(1, s.size // 10)
    hi_err = set(np.argsort(e)[-top:].tolist())
    hi_std = set(np.argsort(s)[-top:].tolist())
    return {"pearson": float(np.corrcoef(s, e)[0, 1]), "spearman": float(np.corrcoef(ranks(s), ranks(e))[0, 1]),
            "top10_overlap": len(hi_err & hi_std) / top, "voxels": s.size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ct", nargs="*", default=[str(ROOT / "Testing" / "data" / "lung2_crop.nii.gz")])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the ControlNet default, 50)")
    ap.add_argument("--views", type=int, default=40)
    args = ap.parse_args()

    from MedDiffusionLib.data.volumes import read_volume
    from MedDiffusionLib.jobs import ModelCache, run_job

    cache = ModelCache()
    print(f"{'CT':<28} {'region':<6} {'voxels':>8} {'pearson':>8} {'spearman':>9} {'top10%':>7}  "
          f"{'MAE mean':>9} {'MAE FBP':>8} {'mean std':>9}")
    for path in args.ct:
        ct = read_volume(path)
        fbp = run_job({"task": "simulate-sparse-view", "params": {"views": args.views}, "inputs": {"input": path}},
                      cache=cache).results[0].volume
        t0 = time.monotonic()
        params = {"num_samples": args.samples, "seed": 0, "device": "cpu"}
        if args.steps:
            params["steps"] = args.steps
        res = run_job({"task": "reconstruct", "controlnet": "chest-ct-mini-sparse-view", "params": params,
                       "inputs": {"input": "fbp"}}, {"input": fbp}, cache=cache)
        seconds = time.monotonic() - t0
        by = {r.meta.get("statistic"): r.volume.array for r in res.results if r.meta.get("statistic") != "sample"}
        truth = ct.array.astype(np.float64)
        err = np.abs(by["mean"] - truth)
        body = truth > -900
        for region, mask in (("all", np.ones_like(body)), ("body", body)):
            sc = scores(by["std"][mask], err[mask])
            print(f"{Path(path).name[:28]:<28} {region:<6} {sc['voxels']:>8} {sc['pearson']:>8.3f} {sc['spearman']:>9.3f} "
                  f"{sc['top10_overlap']:>7.1%}  {err[mask].mean():>9.1f} {np.abs(fbp.array - truth)[mask].mean():>8.1f} "
                  f"{by['std'][mask].mean():>9.1f}")
        print(f"  ({args.samples} samples, {res.spec.params['sampler']} {res.spec.params['steps']} steps, "
              f"{seconds:.1f} s on the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
