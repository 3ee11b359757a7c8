"""Steppable samplers (diffusers/MONAI shape) over the official cosine schedule.

Each scheduler exposes ``timesteps`` (int64, descending), ``set_timesteps(n)`` and
``step(model_output, t, sample, generator=None) -> SchedulerOutput(prev_sample, pred_original_sample)``;
``model_output`` is the predicted noise and ``sample`` the latents ``(B, C, D, H, W)``. The caller
owns the loop (:func:`MedDiffusionLib.pipelines.loop.denoise`), so progress, cancellation and a
per-step preview live in one place.

Why not diffusers' schedulers (not a dependency): the parity targets need the authors' arithmetic,
which diffusers does not reproduce (``Testing/tests/test_samplers.py`` shows each point):
- the schedule is computed in float64 with betas clipped at 0.9999 and stored in float32
  (diffusers clips at 0.999 and computes in float32);
- the official DDIM list is a *truncated* ``linspace(0, T-1, n)`` whose next element is the
  previous timestep, ending with a step from t=0 to abar_0; diffusers' ``DDIMScheduler`` rounds the
  linspace and computes ``prev = t - T // n``;
- DPM-Solver++(2M) here runs over that same list and ends with the official DDIM jump to abar_0
  with the raw noise (ours: it has no parity target, and the final step differs from diffusers'
  ``final_sigmas_type`` options), so it compares directly with DDIM.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from ..defaults import SAMPLERS, resolve_sampling
from .gaussian import NUM_TRAIN_TIMESTEPS, GaussianDiffusion, ddim_timesteps


def draw_noise(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None,
               device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` ``(B, ...)`` from ``generator`` (``None``: the global
    RNG). A list of B generators draws sample i from generator i alone, exactly what a batch of one
    seeded with it would draw (diffusers' per-sample generators): a volume's noise then does not
    depend on the batch it runs in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


class SchedulerOutput(NamedTuple):
    """Result of one :meth:`Scheduler.step`; unpacks as ``(prev_sample, pred_original_sample)``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class Scheduler:
    """Base: holds the schedule (:class:`GaussianDiffusion`) and the timestep list of one run.

    The number of steps is always a resolved one (:func:`MedDiffusionLib.defaults.resolve_sampling`
    picks the defaults); call :meth:`set_timesteps` before stepping, or build with
    :func:`make_scheduler` / :func:`scheduler_for`."""

    name = ""
    stochastic = False  # True: step() draws noise (pass the run's generator)

    def __init__(self, diffusion: GaussianDiffusion | None = None, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        self.diffusion = diffusion if diffusion is not None else GaussianDiffusion(num_train_timesteps)
        self.timesteps = torch.empty(0, dtype=torch.long)
        self._index = 0

    @property
    def num_train_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The timestep list of a run of ``num_inference_steps`` (resolved) steps."""
        self.timesteps = ddim_timesteps(num_inference_steps, self.num_train_timesteps)
        self._index = 0

    def _begin(self, t: int | torch.Tensor, sample: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """Position of ``t`` in this run, ``t`` as int and as a ``(B,)`` int64 tensor."""
        t = int(t)
        i = self._index
        if i >= len(self.timesteps) or int(self.timesteps[i]) != t:
            hits = (self.timesteps == t).nonzero()
            if not len(hits):
                raise ValueError(f"timestep {t} is not in this run's list (call set_timesteps first)")
            i = int(hits[0])
        self._index = i + 1
        return i, t, torch.full((sample.shape[0],), t, dtype=torch.long, device=sample.device)

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | Sequence[torch.Generator] | None = None) -> SchedulerOutput:
        raise NotImplementedError


class DDPMScheduler(Scheduler):
    """The official ancestral sampler: every step t = T-1 ... 0, x0 clamped to [-1, 1], fixed-small
    log-variance. Each step draws exactly one ``randn_like(sample)`` (also at t=0, where it is
    multiplied by 0) from ``generator`` or the global RNG, so the seeded stream is the official one."""

    name = "ddpm"
    stochastic = True

    def set_timesteps(self, num_inference_steps: int) -> None:
        if num_inference_steps != self.num_train_timesteps:
            raise ValueError(f"DDPM runs all {self.num_train_timesteps} timesteps, got {num_inference_steps} "
                             "(resolve the steps with MedDiffusionLib.defaults.resolve_sampling)")
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._index = 0

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | Sequence[torch.Generator] | None = None) -> SchedulerOutput:
        _, t, tt = self._begin(t, sample)
        gd, x = self.diffusion, sample
        x0 = gd.predict_start(x, tt, model_output).clamp(-1.0, 1.0)
        mean = gd._at(gd.posterior_mean_coef1, tt, x) * x0 + gd._at(gd.posterior_mean_coef2, tt, x) * x
        log_var = gd._at(gd.posterior_log_variance_clipped, tt, x)
        if generator is None:
            noise = torch.randn_like(x)
        else:
            noise = draw_noise(x.shape, generator, x.device, x.dtype)
        nonzero = 0.0 if t == 0 else 1.0
        return SchedulerOutput(mean + nonzero * (0.5 * log_var).exp() * noise, x0)


class DDIMScheduler(Scheduler):
    """The official deterministic DDIM (eta = 0) over :func:`ddim_timesteps`: each update uses the
    raw predicted noise, and the last step goes from t=0 to abar_0."""

    name = "ddim"

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | Sequence[torch.Generator] | None = None) -> SchedulerOutput:
        i, t, tt = self._begin(t, sample)
        gd, x = self.diffusion, sample
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        x0 = gd.predict_start(x, tt, model_output).clamp(-1.0, 1.0)
        a_prev = gd._at(gd.alphas_cumprod, torch.full_like(tt, t_prev), x)
        return SchedulerOutput(a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * model_output, x0)


class DPMSolverPlusPlus2MScheduler(Scheduler):
    """Second-order multistep DPM-Solver++ (data prediction, clamped to [-1, 1] like the official
    samplers) on the probability-flow ODE over the official DDIM list. First order on the first
    and on the last solver step (lambda jumps there and the extrapolation would overshoot); the
    final update is the official DDIM jump to abar_0 with the raw noise."""

    name = "dpm++"

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        ac = self.diffusion.alphas_cumprod.double().cpu()
        self._alpha, self._sigma = ac.sqrt(), (1 - ac).sqrt()
        self._lam = torch.log(self._alpha / self._sigma)
        self._prev: tuple[torch.Tensor, float] | None = None  # (x0, h) of the previous step

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | Sequence[torch.Generator] | None = None) -> SchedulerOutput:
        i, t, tt = self._begin(t, sample)
        if i == 0:
            self._prev = None
        gd, x, eps, ts = self.diffusion, sample, model_output, self.timesteps
        x0 = gd.predict_start(x, tt, eps).clamp(-1.0, 1.0)
        if i + 1 == len(ts):
            a0 = gd._at(gd.alphas_cumprod, torch.zeros_like(tt), x)
            return SchedulerOutput(a0.sqrt() * x0 + (1.0 - a0).sqrt() * eps, x0)
        s = int(ts[i + 1])
        h = float(self._lam[s] - self._lam[t])
        if self._prev is None or i + 2 == len(ts):
            d = x0
        else:
            r = self._prev[1] / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._prev[0]
        self._prev = (x0, h)
        prev = float(self._sigma[s] / self._sigma[t]) * x - float(self._alpha[s] * math.expm1(-h)) * d
        return SchedulerOutput(prev, x0)


SCHEDULERS: dict[str, type[Scheduler]] = {c.name: c for c in (DDPMScheduler, DDIMScheduler, DPMSolverPlusPlus2MScheduler)}
assert tuple(SCHEDULERS) == SAMPLERS


def scheduler_for(sampler: str, diffusion: GaussianDiffusion | None, steps: int) -> Scheduler:
    """The scheduler of a resolved (sampler, steps) pair (:func:`MedDiffusionLib.defaults.resolve_sampling`)
    on ``diffusion``'s schedule; nothing is defaulted here."""
    if sampler not in SCHEDULERS or isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"scheduler_for takes a resolved sampler and number of steps, got {sampler!r} and {steps!r} "
                        "(see MedDiffusionLib.defaults.resolve_sampling)")
    sch = SCHEDULERS[sampler](diffusion)
    sch.set_timesteps(steps)
    return sch


def make_scheduler(name: str, diffusion: GaussianDiffusion | None = None, steps: int | None = None) -> Scheduler:
    """Scheduler ``name`` (ddpm, ddim, dpm++) on ``diffusion``'s schedule, timesteps set for ``steps``
    (``None``: the sampler's default), both resolved by :func:`MedDiffusionLib.defaults.resolve_sampling`."""
    diffusion = diffusion if diffusion is not None else GaussianDiffusion()
    name, steps = resolve_sampling(name, steps, None, diffusion.num_timesteps)
    return scheduler_for(name, diffusion, steps)


__all__ = ["Scheduler", "SchedulerOutput", "DDPMScheduler", "DDIMScheduler", "DPMSolverPlusPlus2MScheduler",
           "SCHEDULERS", "scheduler_for", "make_scheduler"]
