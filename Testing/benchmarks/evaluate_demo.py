#!/usr/bin/env python
"""Evaluation numbers of the bundled demo model and its two ControlNets on the chest CT test data.

    python Testing/benchmarks/evaluate_demo.py [--gen-steps 50] [--num-volumes 4] [--frd-features paper|original]
                                               [--steps 50] [--json out.json]

1. Generation (set metrics, ``MedDiffusionLib.evaluation.set_metrics``): ``--num-volumes`` 64^3
   volumes of the bundled chest-ct-mini model (DDIM ``--gen-steps``) against real chest CT: crops of
   32x32x16 voxels (about 150x150x65 mm) at fixed positions, from ``Testing/data/lung1_64.nii.gz``
   (lung1 at the model's 64^3) and ``lung2_crop.nii.gz`` (lung2, a mid-chest slab, averaged to
   about 5 mm voxels); the generated crops are cut at the lung1 positions. For scale, the same
   metrics for two reference sets against the real crops: the real crops flipped left-right and
   shifted by 1-2 voxels (near 0), and uniform noise in [-1000, 1000] HU (far). MMD and MS-SSIM on
   the crops' own 32x32x16 grid.
2. Sparse-view CT (paired): ``simulate-sparse-view`` (40 fan-beam views, FBP) of lung2_crop, then
   ``reconstruct`` with the bundled ``chest-ct-mini-sparse-view`` ControlNet (DDIM ``--steps``);
   PSNR/SSIM/MAE of the FBP input (the baseline) and of the reconstruction against the CT, on the
   CT's grid, in the four standard HU windows. lung2 was held out of the ControlNet's training.
3. Label -> CT (paired): labels of lung2_crop from HU thresholds (``ct_labels_from_hu``: air, lung,
   soft tissue, bone), ``synthesize`` with ``chest-ct-mini-labels``; image metrics of the
   synthetic CT against the real one, and Dice of the same thresholds applied to the synthetic CT
   against the input labels.

Everything runs offline on the CPU (a few minutes on 2 cores; ``--frd-features original`` is much
faster). The tasks run in process through ``MedDiffusionLib.jobs.run_job``, the code path of the
``meddiffusion`` sub-commands of the same names.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from MedDiffusionLib.data.volumes import Volume, read_volume, write_volume  # noqa: E402
from MedDiffusionLib.evaluation import paired_metrics, set_metrics  # noqa: E402
from MedDiffusionLib.jobs import run_job  # noqa: E402
from MedDiffusionLib.pipelines.conditioned import ct_labels_from_hu  # noqa: E402

DATA = ROOT / "Testing" / "data"
CROP = (32, 32, 16)
LUNG1_AT = [(8, 12, 16), (24, 20, 32), (8, 20, 40), (24, 12, 24), (16, 16, 28), (16, 8, 36)]  # (i, j, k) corners
LUNG2_AT = [(8, 12, 4), (24, 20, 4), (16, 16, 6)]


def crop(vol: Volume, x: int, y: int, z: int, flip: bool = False) -> Volume:
    """A CROP-sized block of ``vol`` at voxel (x, y, z) (left-right flipped with ``flip``); the
    affine is kept (set metrics do not use positions)."""
    a = np.asarray(vol.array, np.float32)[x:x + CROP[0], y:y + CROP[1], z:z + CROP[2]]
    assert a.shape == CROP, (a.shape, (x, y, z))
    return Volume(np.ascontiguousarray(a[::-1] if flip else a), vol.affine.copy())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def show(title: str, report) -> None:
    print(f"\n== {title}")
    for key in ("warnings",):
        for w in report.context.get(key, []):
            print(f"note: {w}")
    print(report.table())


def generation(args: argparse.Namespace, out: dict) -> None:
    t0 = time.time()
    res = run_job({"task": "generate", "params": {"sampler": "ddim", "steps": args.gen_steps, "seed": args.seed,
                                                  "num_volumes": args.num_volumes, "device": "cpu"}})
    gen = [r.volume for r in res.results]
    log(f"generated {len(gen)} volumes {gen[0].shape} at {gen[0].spacing} mm in {time.time() - t0:.0f} s")
    lung1 = read_volume(DATA / "lung1_64.nii.gz")
    ct = read_volume(DATA / "lung2_crop.nii.gz")
    lung2 = Volume(ct.array.astype(np.float32).reshape(64, 2, 64, 2, 24).mean((1, 3)), ct.affine @ np.diag([2, 2, 1, 1.]))
    real = [crop(lung1, *p) for p in LUNG1_AT] + [crop(lung2, *p) for p in LUNG2_AT]
    sets = {
        "generated (bundled model)": [crop(g, *p) for g in gen for p in LUNG1_AT],
        "real, flipped + shifted": [crop(lung1, x + 2, y + 1, z + 1, True) for x, y, z in LUNG1_AT]
                                   + [crop(lung2, x + 2, y + 1, z + 1, True) for x, y, z in LUNG2_AT],
        "uniform noise": [Volume(np.random.default_rng(i).uniform(-1000, 1000, CROP).astype(np.float32), lung1.affine)
                          for i in range(len(real))],
    }
    print(f"\n# 1. generation: set metrics against {len(real)} real chest CT crops of {'x'.join(map(str, CROP))} voxels "
          f"(FRD features: {args.frd_features})")
    for name, vols in sets.items():
        t0 = time.time()
        rep = set_metrics(vols, real, grid=CROP, frd_features=args.frd_features)
        show(f"{name} ({len(vols)} crops) vs real ({len(real)} crops)  [{time.time() - t0:.0f} s]", rep)
        out["generation"][name] = rep.to_dict()


def controlled(args: argparse.Namespace, task: str, controlnet: str, path: Path) -> Volume:
    """One ControlNet job on the CPU (DDIM ``--steps``, ``--seed``) from the volume at ``path``."""
    t0 = time.time()
    vol = run_job({"task": task, "controlnet": controlnet,
                   "params": {"sampler": "ddim", "steps": args.steps, "seed": args.seed, "device": "cpu"},
                   "inputs": {"input": str(path)}}).results[0].volume
    log(f"{task} ({controlnet}) in {time.time() - t0:.0f} s")
    return vol


def sparse_view(args: argparse.Namespace, work: Path, out: dict) -> None:
    ct_path = DATA / "lung2_crop.nii.gz"
    ct = read_volume(ct_path)
    t0 = time.time()
    fbp = run_job({"task": "simulate-sparse-view", "params": {"views": 40, "device": "cpu"},
                   "inputs": {"input": str(ct_path)}}).results[0].volume
    write_volume(fbp, work / "fbp40.nrrd")
    log(f"simulated 40-view FBP in {time.time() - t0:.0f} s")
    rec = controlled(args, "reconstruct", "chest-ct-mini-sparse-view", work / "fbp40.nrrd")
    print(f"\n# 2. sparse-view CT: lung2_crop ({'x'.join(map(str, ct.shape))} voxels), 40 views, FBP vs "
          f"chest-ct-mini-sparse-view (DDIM {args.steps}), against the full-view CT on its grid")
    for name, vol in (("FBP 40 views (input, baseline)", fbp), ("ControlNet reconstruction", rec)):
        rep = paired_metrics(vol, ct)
        show(name, rep)
        out["sparse_view"][name] = rep.to_dict()


def labels_to_ct(args: argparse.Namespace, work: Path, out: dict) -> None:
    ct = read_volume(DATA / "lung2_crop.nii.gz")
    labels = ct.with_array(ct_labels_from_hu(ct.array.astype(np.float32)).astype(np.int16))
    write_volume(labels, work / "labels.nrrd")
    syn = controlled(args, "synthesize", "chest-ct-mini-labels", work / "labels.nrrd")
    print(f"\n# 3. label -> CT: labels of lung2_crop (1 lung, 2 soft tissue, 3 bone; 0 air), chest-ct-mini-labels "
          f"(DDIM {args.steps})")
    rep = paired_metrics(syn, ct)
    show("synthetic CT against the real CT", rep)
    out["labels"]["image"] = rep.to_dict()
    seg = syn.with_array(ct_labels_from_hu(syn.array).astype(np.int16))
    rep = paired_metrics(seg, labels, labels=True)
    show("Dice: HU thresholds of the synthetic CT against the input labels", rep)
    out["labels"]["dice"] = rep.to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-volumes", type=int, default=4, help="generated volumes (default 4)")
    ap.add_argument("--gen-steps", type=int, default=50, help="DDIM steps of generation (default 50)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the ControlNet tasks (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frd-features", choices=("paper", "original"), default="paper")
    ap.add_argument("--parts", nargs="+", choices=("generation", "sparse-view", "labels"),
                    default=["generation", "sparse-view", "labels"])
    ap.add_argument("--json", type=Path, help="write every report here")
    args = ap.parse_args()
    out: dict = {"generation": {}, "sparse_view": {}, "labels": {}, "args": vars(args) | {"json": str(args.json)}}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="meddiffusion-evaluate-") as tmp:
        if "generation" in args.parts:
            generation(args, out)
        if "sparse-view" in args.parts:
            sparse_view(args, Path(tmp), out)
        if "labels" in args.parts:
            labels_to_ct(args, Path(tmp), out)
    print(f"\n(total {time.time() - t0:.0f} s)")
    if args.json:
        from MedDiffusionLib.evaluation.report import _jsonable
        from MedDiffusionLib.io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(_jsonable(out), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
