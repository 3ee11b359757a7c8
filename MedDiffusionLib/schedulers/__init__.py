"""Noise schedule and steppable samplers (official DDPM, official DDIM variant, DPM-Solver++ 2M)."""
from ..defaults import resolve_sampling  # the one resolver of (sampler, steps); kept importable from here
from ..errors import Cancelled
from .gaussian import NUM_TRAIN_TIMESTEPS, GaussianDiffusion, cosine_beta_schedule, ddim_timesteps
from .samplers import (SCHEDULERS, DDIMScheduler, DDPMScheduler, DPMSolverPlusPlus2MScheduler, Scheduler,
                       SchedulerOutput, draw_noise, make_scheduler, scheduler_for)

__all__ = ["Cancelled", "NUM_TRAIN_TIMESTEPS", "GaussianDiffusion", "cosine_beta_schedule", "ddim_timesteps", "Scheduler", "SchedulerOutput",
           "DDPMScheduler", "DDIMScheduler", "DPMSolverPlusPlus2MScheduler", "SCHEDULERS", "make_scheduler", "scheduler_for",
           "resolve_sampling", "draw_noise"]
