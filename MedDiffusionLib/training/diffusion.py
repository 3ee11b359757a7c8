"""Diffusion training pieces: the official epsilon-prediction loss and EMA weights."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..schedulers.gaussian import GaussianDiffusion
from ..errors import UserError


def diffusion_loss(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], gd: GaussianDiffusion,
                   x0: torch.Tensor, generator: torch.Generator | None = None, loss_type: str = "l1") -> torch.Tensor:
    """t ~ U{0..T-1}, x_t = sqrt(abar) x0 + sqrt(1-abar) eps; loss between eps and the prediction
    (L1 as in the official training, or L2)."""
    b = x0.shape[0]
    t = torch.randint(0, gd.num_timesteps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    pred = model_fn(gd.q_sample(x0, t, noise), t)
    if loss_type == "l1":
        return F.l1_loss(pred, noise)
    if loss_type == "l2":
        return F.mse_loss(pred, noise)
    raise UserError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")


class EMA:
    """Exponential moving average of a module's floating-point state."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for (name, s), (_, p) in zip(self.shadow.state_dict().items(), model.state_dict().items()):
            if s.is_floating_point():
                s.lerp_(p.detach(), 1.0 - self.decay)
            else:
                s.copy_(p)
