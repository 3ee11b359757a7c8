"""Cosine-schedule Gaussian diffusion (epsilon prediction): the official schedule buffers, the
forward process and the x0 prediction. The steppable samplers built on it are in
:mod:`MedDiffusionLib.schedulers.samplers`.
"""
from __future__ import annotations

import math

import torch

from ..defaults import NUM_TRAIN_TIMESTEPS
from ..errors import UserError


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Betas (float64) of the cosine schedule, clipped to [0, 0.9999]."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    ac = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    betas = 1 - (ac[1:] / ac[:-1])
    return torch.clip(betas, 0, 0.9999)


def ddim_timesteps(steps: int, timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Official DDIM timestep list: ``linspace(0, T-1, steps)`` truncated, descending."""
    if steps < 1:
        raise UserError(f"the number of sampler steps must be positive, got {steps}")
    if steps > timesteps:
        raise UserError(f"at most {timesteps} DDIM steps are possible, got {steps}")
    return torch.linspace(0, timesteps - 1, steps).long().flip(0)


class GaussianDiffusion:
    """Schedule buffers (float64 maths, stored float32, as the official module)."""

    BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2")

    def __init__(self, timesteps: int = NUM_TRAIN_TIMESTEPS, device: torch.device | str = "cpu"):
        self.num_timesteps = int(timesteps)
        betas = cosine_beta_schedule(self.num_timesteps)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        values = dict(
            betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(), sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            log_one_minus_alphas_cumprod=torch.log(1.0 - ac), sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1).sqrt(), posterior_variance=post_var,
            posterior_log_variance_clipped=torch.log(post_var.clamp(min=1e-20)),
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        )
        for name in self.BUFFERS:
            setattr(self, name, values[name].to(torch.float32).to(device))

    def buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.BUFFERS}

    @staticmethod
    def _at(buf: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return buf.to(x.device)[t].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    # -- forward process / training ---------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_start(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_recip_alphas_cumprod, t, x) * x - self._at(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
