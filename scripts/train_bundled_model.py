#!/usr/bin/env python
"""Train the bundled demo model ("chest-ct-mini") on the two public chest CTs of pyradiomics 3.0.1.

Same architecture as the released 3D MedDiffusion at a small width: a 4x Patch-Volume autoencoder
(n_hiddens 8, 1024 codes) and a BiFlowNet (dim 12, dim_mults 1,1,2,3,4, patch 2), trained on CPU.
Each CT is re-oriented to RAS, its whole field of view resampled to 64^3 voxels (network order
D=S, H=R, W=A) and normalised per volume between its 0.5th/99.5th percentiles to [-1, 1] (the
paper's normalisation). Writes ``autoencoder.*``, ``biflownet.*`` and ``PROVENANCE.json`` to OUT.

Usage: python scripts/train_bundled_model.py DATA_DIR OUT [--ae-steps N] [--diffusion-steps N]
DATA_DIR holds lung1_image.nrrd and lung2_image.nrrd (pyradiomics 3.0.1 sdist, data/ folder).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffusionLib.data.grid import apply_affine, random_affine_theta  # noqa: E402
from MedDiffusionLib.data.volumes import percentile_normalize, read_volume  # noqa: E402
from MedDiffusionLib.io.checkpoints import save_model  # noqa: E402
from MedDiffusionLib.models import BiFlowNet, PatchVolumeAE  # noqa: E402
from MedDiffusionLib.schedulers import GaussianDiffusion  # noqa: E402
from MedDiffusionLib.training.autoencoder import fit_codebook, train_stage1, train_stage2  # noqa: E402
from MedDiffusionLib.training.diffusion import EMA, diffusion_loss  # noqa: E402

SIZE = (64, 64, 64)
CLASS_CT_CHEST = 1
AE_CONFIG = dict(n_hiddens=8, downsample=[4, 4, 4], image_channels=1, norm_type="group", num_groups=4,
                 embedding_dim=8, n_codes=1024, patch_size=32)
BF_CONFIG = dict(dim=12, learn_sigma=False, cond_classes=7, dim_mults=[1, 1, 2, 3, 4], sub_volume_size=[8, 8, 8],
                 patch_size=2, channels=8, attn_heads=1, init_dim=None, init_kernel_size=3,
                 use_sparse_linear_attn=[0, 0, 0, 1, 1], resnet_groups=4, DiT_num_heads=2, mlp_ratio=4, vq_size=64,
                 res_condition=True, num_mid_DiT=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_ct(path: Path) -> tuple[torch.Tensor, dict]:
    """CT file -> (1, 1, 64, 64, 64) tensor in [-1, 1] (network order) and its provenance."""
    vol = read_volume(path).canonical()
    arr = vol.to_network().astype(np.float32)  # (D, H, W) = (S, R, A)
    norm, lo, hi = percentile_normalize(arr)
    x = torch.from_numpy(norm)[None, None]
    d, h, w = x.shape[2:]
    x = F.interpolate(x, size=(d, SIZE[1], SIZE[2]), mode="area")  # anti-aliased in-plane reduction
    x = F.interpolate(x, size=SIZE, mode="trilinear", align_corners=False)
    sp = vol.spacing  # (i, j, k) = (H, W, D) axes
    spacing_out = [sp[0] * h / SIZE[1], sp[1] * w / SIZE[2], sp[2] * d / SIZE[0]]
    return x.clamp(-1, 1), {"file": path.name, "shape_ijk": list(vol.shape), "spacing_ijk": list(sp),
                            "hu_p0.5": lo, "hu_p99.5": hi, "spacing_out_ijk": spacing_out}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small random scale (+-8 %), axial rotation (+-6 deg) and shift (+-4 voxels); no flips."""
    return apply_affine(x, random_affine_theta(g, shift=0.12))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--ae-steps", type=int, default=1200)
    ap.add_argument("--ae-stage2-steps", type=int, default=400)
    ap.add_argument("--diffusion-steps", type=int, default=3000)
    ap.add_argument("--augmented", type=int, default=48, help="augmented copies per volume for the diffusion latents")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ae", action="store_true", help="reuse OUT/autoencoder.* from an earlier run")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t_start = time.time()
    vols, prov = zip(*[load_ct(args.data_dir / f"lung{i}_image.nrrd") for i in (1, 2)])
    log(f"loaded {[p['file'] for p in prov]}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"data": list(prov), "source": "pyradiomics 3.0.1 sdist data/ (BSD-3-Clause, (c) 2017 Harvard Medical School)",
              "command": " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads()}

    if args.skip_ae:
        from MedDiffusionLib.io.checkpoints import load_model
        ae = load_model(args.out / "autoencoder", expect="patchvolume")
        record["autoencoder"] = json.loads((args.out / "PROVENANCE.json").read_text())["autoencoder"]
    else:
        ae = PatchVolumeAE(**AE_CONFIG)
        t0 = time.time()
        l1 = train_stage1(ae, vols, args.ae_steps, batch=4, lr=2e-3, seed=args.seed, log=log)
        with torch.no_grad():
            aug_g = torch.Generator().manual_seed(args.seed + 1)
            lat = torch.cat([ae.patch_encode(augment(v, aug_g)) for v in vols for _ in range(8)] +
                            [ae.patch_encode(v) for v in vols])
        qerr = fit_codebook(ae, lat, seed=args.seed)
        log(f"codebook fitted: mean |z - code| {qerr:.4f}")
        l2 = train_stage2(ae, vols, args.ae_stage2_steps, lr=5e-4, seed=args.seed, log=log)
        with torch.no_grad():
            recon_l1 = [float((ae(v) - v).abs().mean()) for v in vols]
        record["autoencoder"] = {"config": AE_CONFIG, "stage1_steps": args.ae_steps, "stage2_steps": args.ae_stage2_steps,
                                 "stage1_l1_first_last": [l1[0], float(np.mean(l1[-50:]))],
                                 "stage2_l1_first_last": [l2[0], float(np.mean(l2[-50:]))],
                                 "codebook_kmeans_abs_err": qerr, "reconstruction_l1_per_volume": recon_l1,
                                 "seconds": time.time() - t0}
        save_model(ae, args.out / "autoencoder", meta={"name": "chest-ct-mini autoencoder"})
        (args.out / "PROVENANCE.json").write_text(json.dumps(record, indent=2))
        log(f"autoencoder done: reconstruction L1 {recon_l1}")

    # -- latents for diffusion training ------------------------------------------------------------
    g = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        lat = [ae.normalize_latent(ae.patch_encode(v)) for v in vols]
        lat += [ae.normalize_latent(ae.patch_encode(augment(v, g))) for v in vols for _ in range(args.augmented)]
    lat = torch.cat(lat)
    log(f"{lat.shape[0]} training latents {tuple(lat.shape[1:])}, range [{lat.min():.2f}, {lat.max():.2f}]")

    net = BiFlowNet(**BF_CONFIG)
    ema = EMA(net, decay=0.995)
    gd = GaussianDiffusion(1000)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.diffusion_steps, pct_start=0.05)
    res = torch.tensor(lat.shape[2:], dtype=torch.float32) / 64.0
    batch = 4
    losses = []
    t0 = time.time()
    net.train()
    for step in range(1, args.diffusion_steps + 1):
        idx = torch.randint(lat.shape[0], (batch,), generator=g)
        y = torch.full((batch,), CLASS_CT_CHEST, dtype=torch.long)
        loss = diffusion_loss(lambda x, t: net(x, t, y, res), gd, lat[idx], generator=g, loss_type="l1")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(net)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.diffusion_steps:
            log(f"biflownet step {step}/{args.diffusion_steps} l1 {np.mean(losses[-100:]):.4f} "
                f"({(time.time() - t0) / step:.2f} s/step)")
        if step % 1000 == 0:
            save_model(ema.shadow, args.out / "biflownet", meta={"name": "chest-ct-mini biflownet (EMA)", "step": step})
    save_model(ema.shadow, args.out / "biflownet", meta={"name": "chest-ct-mini biflownet (EMA)",
                                                          "step": args.diffusion_steps})
    curve = [float(np.mean(losses[i:i + 250])) for i in range(0, len(losses), 250)]
    record["biflownet"] = {"config": BF_CONFIG, "steps": args.diffusion_steps, "batch": batch, "optimizer": "Adam, one-cycle lr 1e-3",
                           "ema_decay": 0.995, "loss": "L1 epsilon", "class": CLASS_CT_CHEST,
                           "training_latents": int(lat.shape[0]), "loss_curve_per_250_steps": curve,
                           "seconds": time.time() - t0}
    record["total_seconds"] = time.time() - t_start
    (args.out / "PROVENANCE.json").write_text(json.dumps(record, indent=2))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
