#!/usr/bin/env python
"""Train and evaluate the two demo ControlNets of the bundled chest-ct-mini model.

* sparse-view: condition = FBP of a simulated 40-view fan-beam scan (HU), target = the CT;
* labels: condition = label map from HU thresholds (0 air, 1 lung, 2 soft tissue, 3 bone) plus the
  tumour mask that ships with the data (4), target = the CT.

Trained on lung1 (with random affine augmentation), evaluated on lung2 (held out): PSNR/SSIM in
the HU window [-1000, 1000] of FBP and of our reconstruction against the full-view CT, and Dice of
a threshold segmentation of the synthesized CT against the conditioning labels. Writes
OUT/chest-ct-mini-{sparse-view,labels}/controlnet.* and OUT/DEMO_RESULTS.json.

Usage: python scripts/train_demo_controlnets.py DATA_DIR OUT [--steps N]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffusionLib.data.volumes import read_volume, write_volume  # noqa: E402
from MedDiffusionLib.metrics import dice, psnr, ssim  # noqa: E402
from MedDiffusionLib.pipelines.conditioned import ControlledPipeline, ct_labels_from_hu, simulate_sparse_view  # noqa: E402
from MedDiffusionLib.training.controlnet import ControlNetTrainer, TrainConfig  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def at_model_grid(arr: np.ndarray, shape=(64, 64, 64)) -> torch.Tensor:
    """(i, j, k) array -> area-averaged (D, H, W) grid, for metrics at the model's resolution."""
    x = torch.from_numpy(np.transpose(arr, (2, 0, 1)).astype(np.float32))[None, None]
    x = F.interpolate(x, size=(x.shape[2], shape[1], shape[2]), mode="area")
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--augment", type=int, default=24)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--tasks", nargs="+", default=["sparse-view", "labels"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="meddiffusion-demo-"))
    results: dict = {"data": "pyradiomics 3.0.1 lung1 (train) / lung2 (held out), BSD-3", "steps": args.steps,
                     "augment": args.augment, "sampler": f"ddim {args.sample_steps}"}
    ct = {i: read_volume(args.data_dir / f"lung{i}_image.nrrd") for i in (1, 2)}
    tumour = {i: read_volume(args.data_dir / f"lung{i}_label.nrrd").array for i in (1, 2)}
    ct = {i: v.with_array(v.array.astype(np.float32)) for i, v in ct.items()}

    for task in args.tasks:
        pairs = work / task / "train"
        (pairs / "condition").mkdir(parents=True)
        (pairs / "target").mkdir(parents=True)
        t0 = time.time()
        if task == "sparse-view":
            cond = {i: simulate_sparse_view(ct[i], views=40, chunk=4) for i in (1, 2)}
        else:
            cond = {i: ct[i].with_array(ct_labels_from_hu(ct[i].array, tumour[i]).astype(np.int16)) for i in (1, 2)}
        log(f"{task}: conditions built in {time.time() - t0:.0f} s")
        write_volume(cond[1], pairs / "condition" / "lung1.nrrd")
        write_volume(ct[1], pairs / "target" / "lung1.nrrd")
        cfg = TrainConfig(task=task, out=str(work / task / "run"), model="chest-ct-mini", steps=args.steps, batch=2,
                          lr=5e-4, optimizer="adamw", loss="l1", ema_decay=0.99, seed=0, ckpt_every=200,
                          val_every=10 ** 9, augment=args.augment,
                          label_values=[0, 1, 2, 3, 4] if task == "labels" else None, label_mode="area")
        t0 = time.time()
        trainer = ControlNetTrainer(cfg, log=log)
        res = trainer.fit([(pairs / "condition" / "lung1.nrrd", pairs / "target" / "lung1.nrrd")], resume=False)
        train_s = time.time() - t0
        dest = args.out / f"chest-ct-mini-{task}"
        dest.mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json"):
            shutil.copy(work / task / "run" / f"controlnet{suffix}", dest / f"controlnet{suffix}")
        log(f"{task}: trained {res['steps']} steps in {train_s:.0f} s, final loss {res['final_loss']:.4f}")

        pipe = ControlledPipeline.from_files(dest / "controlnet.safetensors", device="cpu")
        t0 = time.time()
        out = pipe.run(cond[2], seed=0, sampler="ddim", steps=args.sample_steps)
        if task == "sparse-view":
            gt = ct[2].array
            r = {"fbp_full_grid": {"psnr": psnr(torch.from_numpy(cond[2].array), torch.from_numpy(gt)),
                                   "ssim": ssim(torch.from_numpy(cond[2].array), torch.from_numpy(gt))},
                 "ours_full_grid": {"psnr": psnr(torch.from_numpy(out.array), torch.from_numpy(gt)),
                                    "ssim": ssim(torch.from_numpy(out.array), torch.from_numpy(gt))}}
            g64, f64, o64 = at_model_grid(gt), at_model_grid(cond[2].array), at_model_grid(out.array)
            r["fbp_model_grid_64"] = {"psnr": psnr(f64, g64), "ssim": ssim(f64, g64)}
            r["ours_model_grid_64"] = {"psnr": psnr(o64, g64), "ssim": ssim(o64, g64)}
        else:
            seg = ct_labels_from_hu(out.array)
            ref = cond[2].array
            names = {0: "air", 1: "lung", 2: "soft tissue", 3: "bone"}
            ref_hu_classes = np.where(ref == 4, 2, ref)  # the tumour is soft tissue by HU
            r = {"dice": {names[k]: dice(torch.from_numpy(seg == k), torch.from_numpy(ref_hu_classes == k))
                          for k in range(4)},
                 "tumour_voxels_synthesized_as_soft_tissue": float((seg[ref == 4] == 2).mean())}
            ref64 = torch.from_numpy(np.transpose(ref, (2, 0, 1)))[None, None].float()
            ref64 = F.interpolate(ref64, size=(64, 64, 64), mode="nearest")[0, 0].long().numpy()
            seg64 = ct_labels_from_hu(at_model_grid(out.array).numpy())
            ref64 = np.where(ref64 == 4, 2, ref64)
            r["dice_model_grid_64"] = {names[k]: dice(torch.from_numpy(seg64 == k), torch.from_numpy(ref64 == k))
                                       for k in range(4)}
        r["train_seconds"] = train_s
        r["inference_seconds"] = time.time() - t0
        r["final_train_loss"] = res["final_loss"]
        results[task] = r
        write_volume(out, work / f"{task}_lung2_out.nrrd")
        log(f"{task}: held-out results {json.dumps(r)}")
        (args.out / "DEMO_RESULTS.json").write_text(json.dumps(results, indent=2))
    log(f"outputs for inspection in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
