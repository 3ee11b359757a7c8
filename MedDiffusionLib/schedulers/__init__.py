"""Noise schedule and samplers (DDPM ancestral, official DDIM variant)."""
from .gaussian import Cancelled, GaussianDiffusion, cosine_beta_schedule, ddim_timesteps

__all__ = ["Cancelled", "GaussianDiffusion", "cosine_beta_schedule", "ddim_timesteps"]
