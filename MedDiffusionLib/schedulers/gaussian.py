"""Cosine-schedule Gaussian diffusion with the official DDPM and DDIM samplers (epsilon prediction).

Samplers take ``model_fn(x, t) -> eps`` where ``x`` is ``(B, C, D, H, W)`` and ``t`` int64 ``(B,)``;
class, resolution and ControlNet hint are bound into ``model_fn`` by the caller and stay
constant over all steps.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised between sampler steps when the caller's cancel check returns True."""


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Betas (float64) of the cosine schedule, clipped to [0, 0.9999]."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    ac = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    betas = 1 - (ac[1:] / ac[:-1])
    return torch.clip(betas, 0, 0.9999)


def ddim_timesteps(steps: int, timesteps: int = 1000) -> torch.Tensor:
    """Official DDIM timestep list: ``linspace(0, T-1, steps)`` truncated, descending."""
    if steps < 1:
        raise ValueError(f"the number of sampler steps must be positive, got {steps}")
    if steps > timesteps:
        raise ValueError(f"at most {timesteps} DDIM steps are possible, got {steps}")
    return torch.linspace(0, timesteps - 1, steps).long().flip(0)


class GaussianDiffusion:
    """Schedule buffers (float64 maths, stored float32, as the official module) and samplers."""

    BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2")

    def __init__(self, timesteps: int = 1000, device: torch.device | str = "cpu"):
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

    def to(self, device: torch.device | str) -> "GaussianDiffusion":
        for name in self.BUFFERS:
            setattr(self, name, getattr(self, name).to(device))
        return self

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

    # -- DDPM -------------------------------------------------------------------------------
    def ddpm_step(self, model_fn: ModelFn, x: torch.Tensor, t: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One ancestral step from ``t`` to ``t-1``; draws one ``randn_like(x)`` (also at t=0)."""
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = model_fn(x, tt)
        x0 = self.predict_start(x, tt, eps).clamp(-1.0, 1.0)
        mean = self._at(self.posterior_mean_coef1, tt, x) * x0 + self._at(self.posterior_mean_coef2, tt, x) * x
        log_var = self._at(self.posterior_log_variance_clipped, tt, x)
        if generator is None:
            noise = torch.randn_like(x)
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = 0.0 if t == 0 else 1.0
        return mean + nonzero * (0.5 * log_var).exp() * noise

    def sample_ddpm(self, model_fn: ModelFn, z: torch.Tensor, progress: ProgressFn | None = None,
                    cancel: CancelFn | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Full ancestral loop t = T-1 ... 0 starting from noise ``z`` ``(B, C, D, H, W)``."""
        x = z
        total = self.num_timesteps
        for n, t in enumerate(reversed(range(total))):
            if cancel is not None and cancel():
                raise Cancelled("sampling cancelled")
            x = self.ddpm_step(model_fn, x, t, generator)
            if progress is not None:
                progress(n + 1, total)
        return x

    # -- DDIM (official deterministic variant, eta = 0) --------------------------------------
    def sample_ddim(self, model_fn: ModelFn, z: torch.Tensor, steps: int = 100, progress: ProgressFn | None = None,
                    cancel: CancelFn | None = None) -> torch.Tensor:
        """Deterministic DDIM over :func:`ddim_timesteps`; the last step goes from t=0 to t=0,
        as in the official code, and each update uses the raw predicted noise."""
        ts = ddim_timesteps(steps, self.num_timesteps).tolist()
        x = z
        for n, t in enumerate(ts):
            if cancel is not None and cancel():
                raise Cancelled("sampling cancelled")
            t_prev = ts[n + 1] if n + 1 < len(ts) else 0
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = model_fn(x, tt)
            x0 = self.predict_start(x, tt, eps).clamp(-1.0, 1.0)
            tp = torch.full_like(tt, t_prev)
            a_prev = self._at(self.alphas_cumprod, tp, x)
            x = a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps
            if progress is not None:
                progress(n + 1, len(ts))
        return x

    # -- DPM-Solver++ (2M), same ODE as DDIM -------------------------------------------------------
    def sample_dpmpp_2m(self, model_fn: ModelFn, z: torch.Tensor, steps: int = 20, progress: ProgressFn | None = None,
                        cancel: CancelFn | None = None) -> torch.Tensor:
        """Second-order multistep DPM-Solver++ on the probability-flow ODE (data prediction, clamped
        to [-1, 1] like the official samplers), over the official DDIM timestep list. The last step
        follows the official DDIM convention (ends at noise level abar_0), so results compare
        directly with :meth:`sample_ddim`."""
        ts = ddim_timesteps(steps, self.num_timesteps).tolist()
        ac = self.alphas_cumprod.double().cpu()
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        lam = torch.log(alpha / sigma)
        x = z
        prev_x0, prev_h = None, None
        for n, t in enumerate(ts):
            if cancel is not None and cancel():
                raise Cancelled("sampling cancelled")
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps = model_fn(x, tt)
            x0 = self.predict_start(x, tt, eps).clamp(-1.0, 1.0)
            if n + 1 == len(ts):  # final update as the official DDIM: t -> abar_0 with the raw eps
                a0 = self._at(self.alphas_cumprod, torch.zeros_like(tt), x)
                x = a0.sqrt() * x0 + (1.0 - a0).sqrt() * eps
            else:
                s = ts[n + 1]
                h = float(lam[s] - lam[t])
                # first order on the first step and on the last solver step (lambda jumps there,
                # and the multistep extrapolation would overshoot), second order in between
                if prev_x0 is None or n + 2 == len(ts):
                    d = x0
                else:
                    r = prev_h / h
                    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
                x = float(sigma[s] / sigma[t]) * x - float(alpha[s] * math.expm1(-h)) * d
                prev_x0, prev_h = x0, h
            if progress is not None:
                progress(n + 1, len(ts))
        return x
