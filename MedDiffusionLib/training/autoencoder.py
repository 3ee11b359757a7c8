"""Training a (small) Patch-Volume autoencoder.

Stage 1 trains encoder and decoder on random cubes without quantisation (L1); the codebook is then
fitted by k-means on the latents of the training volumes; stage 2 freezes encoder and codebook
and fine-tunes ``post_vq_conv`` + decoder on quantised whole-volume latents, mirroring the
official stage 2 (patch-wise encode, volume-wise decode). Volumes are ``(1, 1, D, H, W)`` in [-1, 1].
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..models.autoencoder import PatchVolumeAE
from ..models.quantizer import nearest_code_indices

LogFn = Callable[[str], None]


def _optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, losses: list[float], step: int, steps: int,
              log: LogFn | None, log_every: int, label: str) -> None:
    """One optimiser step on ``loss``; records it and logs the running mean every ``log_every`` steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if log and (step % log_every == 0 or step == steps):
        log(f"{label} step {step}/{steps} l1 {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}")


def random_crops(volumes: Sequence[torch.Tensor], size: int, batch: int, generator: torch.Generator,
                 flip_dims: Sequence[int] = (3,)) -> torch.Tensor:
    """``batch`` random ``size``-cubes ``(batch, 1, s, s, s)`` with random flips on ``flip_dims``."""
    out = []
    for _ in range(batch):
        v = volumes[int(torch.randint(len(volumes), (1,), generator=generator))]
        idx = [int(torch.randint(v.shape[d] - size + 1, (1,), generator=generator)) for d in (2, 3, 4)]
        crop = v[..., idx[0]:idx[0] + size, idx[1]:idx[1] + size, idx[2]:idx[2] + size]
        for d in flip_dims:
            if torch.rand(1, generator=generator) < 0.5:
                crop = crop.flip(d)
        out.append(crop)
    return torch.cat(out)


def train_stage1(ae: PatchVolumeAE, volumes: Sequence[torch.Tensor], steps: int, batch: int = 4, lr: float = 1e-3,
                 seed: int = 0, log: LogFn | None = None, log_every: int = 100) -> list[float]:
    """Encoder + decoder on random ``patch_size`` cubes, L1 reconstruction, no quantisation."""
    g = torch.Generator().manual_seed(seed)
    params = [p for n, p in ae.named_parameters() if not n.startswith("codebook")]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    ae.train()
    losses = []
    for step in range(1, steps + 1):
        x = random_crops(volumes, ae.patch_size, batch, g)
        recon = ae.decoder(ae.post_vq_conv(ae.encode(x)))
        _optimise(opt, F.l1_loss(recon, x), losses, step, steps, log, log_every, "ae stage1")
        sched.step()
    ae.eval()
    return losses


@torch.no_grad()
def fit_codebook(ae: PatchVolumeAE, latents: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """k-means on latent vectors ``(N, C, d, h, w)`` -> ``ae.codebook``; returns the mean
    quantisation error. ``N`` / ``z_avg`` are filled as the official EMA codebook keeps them."""
    c = latents.shape[1]
    flat = latents.movedim(1, -1).reshape(-1, c)
    k = ae.codebook.embeddings.shape[0]
    g = torch.Generator().manual_seed(seed)
    centres = flat[torch.randperm(flat.shape[0], generator=g)[:k]].clone()
    if centres.shape[0] < k:
        centres = torch.cat([centres, centres[torch.randint(centres.shape[0], (k - centres.shape[0],), generator=g)]
                             + 0.01 * torch.randn(k - centres.shape[0], c, generator=g)])
    for _ in range(iters):
        idx = nearest_code_indices(flat.t().reshape(1, c, -1, 1, 1), centres).reshape(-1)
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, idx, flat)
        empty = counts == 0
        centres[~empty] = sums[~empty] / counts[~empty, None]
        if empty.any():  # restart unused codes on random data points
            centres[empty] = flat[torch.randint(flat.shape[0], (int(empty.sum()),), generator=g)]
    idx = nearest_code_indices(flat.t().reshape(1, c, -1, 1, 1), centres).reshape(-1)
    ae.codebook.embeddings.copy_(centres)
    ae.codebook.z_avg.copy_(centres)
    ae.codebook.N.copy_(torch.bincount(idx, minlength=k).float())
    return float((flat - centres[idx]).abs().mean())


def train_stage2(ae: PatchVolumeAE, volumes: Sequence[torch.Tensor], steps: int, lr: float = 3e-4, seed: int = 0,
                 log: LogFn | None = None, log_every: int = 50) -> list[float]:
    """Frozen encoder/codebook; ``post_vq_conv`` + decoder on quantised whole volumes (L1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        codes = [ae.codes(ae.quantize(ae.patch_encode(v))) for v in volumes]
    params = list(ae.post_vq_conv.parameters()) + list(ae.decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    ae.decoder.train()
    losses = []
    for step in range(1, steps + 1):
        i = int(torch.randint(len(volumes), (1,), generator=g))
        loss = F.l1_loss(ae.decoder(ae.post_vq_conv(codes[i])), volumes[i])
        _optimise(opt, loss, losses, step, steps, log, log_every, "ae stage2")
    ae.eval()
    return losses
