"""The one sampling loop: a scheduler stepped over a noise model, with progress, cancellation and
a per-step callback (the Slicer live preview)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import Cancelled
from ..schedulers import Scheduler

NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def denoise(scheduler: Scheduler, model_fn: NoiseFn, z: torch.Tensor,
            generator: torch.Generator | Sequence[torch.Generator] | None = None,
            progress: ProgressFn | None = None, cancel: CancelFn | None = None,
            callback: StepCallback | None = None) -> torch.Tensor:
    """Run ``scheduler`` from noise ``z`` ``(B, C, D, H, W)`` over its ``timesteps``.

    ``model_fn(x, t)`` returns the predicted noise (``t`` int64 ``(B,)``). ``generator``: the
    stochastic steps' noise (a list: one generator per sample, :func:`~MedDiffusionLib.schedulers.draw_noise`). Before each step
    ``cancel()`` is asked (True raises :class:`~MedDiffusionLib.errors.Cancelled`); after it
    ``progress(i + 1, n)`` and ``callback(i, t, latents, pred_x0)`` are called with the new latents
    and the step's clamped x0 prediction (read-only views: copy to keep them)."""
    x = z
    n = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        if cancel is not None and cancel():
            raise Cancelled("sampling cancelled")
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x, x0 = scheduler.step(model_fn(x, tt), t, x, generator=generator)
        if progress is not None:
            progress(i + 1, n)
        if callback is not None:
            callback(i, t, x, x0)
    return x


__all__ = ["denoise", "NoiseFn", "ProgressFn", "CancelFn", "StepCallback"]
