"""GPU rows of the benchmark that also run on the CPU at small shapes (so that they do not rot).

* :func:`sampler_graph_rows`: DDPM steps without per-step Python overhead. The eager loop (the
  project's :class:`~MedDiffusionLib.schedulers.DDPMScheduler`, noise from a seeded generator) is
  compared with one step written as a pure function of tensors (network forward + the DDPM
  posterior arithmetic, the noise of every step drawn beforehand from the same seeded stream),
  run (a) captured once in a ``torch.cuda.CUDAGraph`` and replayed per step and (b) through
  ``torch.compile(mode="reduce-overhead")``. On the CPU the capture is skipped (the same
  static-buffer step runs eagerly) and the compiled variant uses ``backend="eager"``.
* :func:`sdpa_rows`: ``F.scaled_dot_product_attention`` per SDPA backend (flash, memory-efficient,
  math), float32 and bfloat16, at the released model's attention shapes, plus the 9 -> 16 channel
  zero-padded heads of the library's CPU fast path (:class:`MedDiffusionLib.models.kernels.FastAttention`).

Both add rows to the benchmark's :class:`benchmark.Table` and details to its JSON report.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from benchmark import _maxerr, _sync, _timeit

DDPM_BUFFERS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                "posterior_mean_coef2", "posterior_log_variance_clipped")

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- DDPM step as a pure tensor function ----------------------------------------------------------------
def ddpm_coefficients(diffusion, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The schedule buffers one DDPM step reads, on ``device`` (float32, indexed by timestep)."""
    return {name: getattr(diffusion, name).to(device) for name in DDPM_BUFFERS}


def ddpm_step_with_noise(coefs: dict[str, torch.Tensor], eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                         noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official DDPM ancestral step with given ``noise``: ``(x_prev, x0)``, the same arithmetic
    as :meth:`DDPMScheduler.step` (x0 clamped to [-1, 1], fixed-small log-variance, no noise at
    t = 0) but with ``t`` a device tensor ``(B,)`` and no host synchronisation, so that it can be
    captured in a CUDA graph or compiled."""
    shape = (-1,) + (1,) * (x.dim() - 1)

    def at(name: str) -> torch.Tensor:
        return coefs[name].index_select(0, t).view(shape).to(x.dtype)

    x0 = (at("sqrt_recip_alphas_cumprod") * x - at("sqrt_recipm1_alphas_cumprod") * eps).clamp(-1.0, 1.0)
    mean = at("posterior_mean_coef1") * x0 + at("posterior_mean_coef2") * x
    nonzero = (t != 0).to(x.dtype).view(shape)
    return mean + nonzero * (0.5 * at("posterior_log_variance_clipped")).exp() * noise, x0


def check_ddpm_step(diffusion, device: torch.device | str, shape: Sequence[int] = (1, 8, 4, 4, 4),
                    timesteps: Sequence[int] = (999, 500, 1, 0), tol: float = 1e-6) -> float:
    """Max difference between :func:`ddpm_step_with_noise` and ``DDPMScheduler.step`` fed the same
    noise (one seeded stream each) over ``timesteps``; raises ``AssertionError`` above ``tol``."""
    from MedDiffusionLib.schedulers import make_scheduler

    scheduler = make_scheduler("ddpm", diffusion)
    coefs = ddpm_coefficients(diffusion, device)
    g = torch.Generator(device=device).manual_seed(1)
    worst = 0.0
    for t in timesteps:
        x = torch.randn(tuple(shape), generator=g, device=device)
        eps = torch.randn(tuple(shape), generator=g, device=device)
        seed = 100 + int(t)
        ref, ref_x0 = scheduler.step(eps, t, x, generator=torch.Generator(device=device).manual_seed(seed))
        noise = torch.randn(x.shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
        out, out_x0 = ddpm_step_with_noise(coefs, eps, tt, x, noise)
        worst = max(worst, _maxerr(out, ref), _maxerr(out_x0, ref_x0))
    assert worst <= tol, f"the benchmark's DDPM step differs from DDPMScheduler.step by {worst:.2e}"
    return worst


def make_step(net: torch.nn.Module, coefs: dict[str, torch.Tensor], timesteps: torch.Tensor, noise: torch.Tensor,
              y: torch.Tensor, res: torch.Tensor, bf16: bool = False) -> StepFn:
    """``step(x, i) -> x_next``: step ``i`` (a 0-dim int64 device tensor) of the run whose timesteps
    are ``timesteps`` and whose pre-drawn noise is ``noise[i]``. Autocast runs without its weight
    cache, as CUDA graph capture requires."""
    dev_type = timesteps.device.type

    def step(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        idx = i.view(1)
        t = timesteps.index_select(0, idx).expand(x.shape[0])
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            eps = net(x, t, y, res)
        return ddpm_step_with_noise(coefs, eps.float(), t, x, noise.index_select(0, idx)[0])[0]

    return step


# -- the three loops ------------------------------------------------------------------------------------
def eager_loop(net: torch.nn.Module, scheduler, z: torch.Tensor, timesteps: Sequence[int], y: torch.Tensor,
               res: torch.Tensor, generator: torch.Generator, bf16: bool = False) -> torch.Tensor:
    """The pipeline's loop: network forward, then ``scheduler.step`` drawing its noise from ``generator``."""
    x = z
    for t in timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = net(x, tt, y, res)
        x, _ = scheduler.step(eps.float(), t, x, generator=generator)
    return x


class StaticStep:
    """One step on static buffers (latents and a step counter), updated in place: what a CUDA graph
    captures. ``run(steps)`` replays the captured graph, or (CPU) calls the step eagerly."""

    def __init__(self, step: StepFn, z: torch.Tensor):
        self.step, self.z = step, z
        self.x = z.clone()
        self.counter = torch.zeros((), dtype=torch.long, device=z.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def body(self) -> None:
        self.x.copy_(self.step(self.x, self.counter))
        self.counter.add_(1)

    def reset(self) -> None:
        self.x.copy_(self.z)
        self.counter.zero_()

    def capture(self, warmup: int = 3) -> None:
        """Warm up on a side stream (allocator and kernel selection), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.body()
        self.reset()

    def run(self, steps: int) -> torch.Tensor:
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.body()
        return self.x


def compiled_loop(compiled: StepFn, z: torch.Tensor, indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x = compiled(x, i)`` per step; the output is cloned so that a CUDA-graph replay never
    overwrites the latents the next step reads."""
    cuda = z.device.type == "cuda"
    x = z.clone()
    for i in indices:
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        x = compiled(x, i).clone()
    return x


def sampler_graph_rows(net: torch.nn.Module, diffusion, dev: str, latent_shape: Sequence[int], steps: int, table,
                       report: dict, label: str = "", bf16: bool = False, compile: bool = True,
                       seed: int = 0) -> list[dict]:
    """Eager DDPM loop vs the captured step (CUDA graph) vs ``torch.compile`` of the step, on the same
    latents and noise, over the last ``steps`` timesteps of the 1000-step DDPM list (all 1000 for
    ``steps=1000``; ending at t = 0). Adds one table row per variant (time eager, time variant, max
    error of the final latents vs eager; steps/s in the note) and returns the variants' records
    (also appended to ``report["sampler_graph"]``). The variants' times include drawing the noise
    beforehand; capture and compilation are not timed (the compile note gives their cost). A
    variant that fails is reported in ``report["cuda_errors"]`` and skipped."""
    from MedDiffusionLib.schedulers import make_scheduler

    device = torch.device(dev)
    cuda = device.type == "cuda"
    step_err = check_ddpm_step(diffusion, device)
    scheduler = make_scheduler("ddpm", diffusion)
    ts = scheduler.timesteps[-steps:]
    shape = (1, *latent_shape)
    y = torch.ones(1, dtype=torch.long, device=device)
    res = torch.tensor(shape[2:], dtype=torch.float32, device=device) / 64
    prec = "bf16" if bf16 else "fp32"
    name = f"{label}DDPM {steps} {prec}"
    records: list[dict] = []

    def record(variant: str, secs: float, err: float | None, note: str) -> None:
        rec = dict(case=name, variant=variant, steps=steps, seconds=secs, steps_per_s=steps / secs,
                   max_abs_err_vs_eager=err, ddpm_step_check_err=step_err, note=note)
        records.append(rec)
        report.setdefault("sampler_graph", []).append(rec)

    with torch.inference_mode():
        gen = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn(shape, generator=gen, device=device)
        warm = torch.full((1,), int(ts[0]), dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(z, warm, y, res)  # kernel selection and caches, outside every timing
        _sync(dev)
        t0 = time.perf_counter()
        x_eager = eager_loop(net, scheduler, z, ts.tolist(), y, res, gen, bf16)
        _sync(dev)
        t_eager = time.perf_counter() - t0
        record("eager", t_eager, 0.0, "DDPMScheduler.step, noise from the seeded generator")

        # the same noise stream, drawn before the loop: z first, then one draw per step
        t0 = time.perf_counter()
        g2 = torch.Generator(device=device).manual_seed(seed)
        torch.randn(shape, generator=g2, device=device)
        noise = torch.stack([torch.randn(shape, generator=g2, device=device) for _ in range(steps)])
        _sync(dev)
        t_noise = time.perf_counter() - t0
        coefs, ts_dev = ddpm_coefficients(diffusion, device), ts.to(device)
        step = make_step(net, coefs, ts_dev, noise, y, res, bf16)

        static = StaticStep(step, z)
        try:
            if cuda:
                static.capture()
                note = "CUDA graph of one whole step, replayed"
            else:
                note = "no CUDA: capture skipped, the static-buffer step runs eagerly"
            _sync(dev)
            t0 = time.perf_counter()
            x_graph = static.run(steps)
            _sync(dev)
            t_graph = time.perf_counter() - t0 + t_noise
            err = _maxerr(x_graph, x_eager)
            table.add(f"{name}: eager vs {'CUDA graph' if cuda else 'static step'}", t_eager, t_graph, err,
                      note=f"{steps / t_eager:.1f} -> {steps / t_graph:.1f} steps/s; {note}")
            record("cuda_graph" if cuda else "static_step", t_graph, err, note)
        except Exception as exc:  # report and go on to the compiled variant
            report.setdefault("cuda_errors", []).append(f"{name} CUDA graph: {type(exc).__name__}: {exc}"[:300])
        del static

        if compile:
            try:
                compiled = (torch.compile(step, mode="reduce-overhead", dynamic=False) if cuda
                            else torch.compile(step, backend="eager", dynamic=False))
                # the step's captured tensors keep their addresses: CUDA graphs read them in place
                # instead of copying them (the pre-drawn noise of every step) into the graph each replay
                for tensor in (noise, ts_dev, y, res, *coefs.values()):
                    torch._dynamo.mark_static_address(tensor)
                indices = [torch.tensor(k, device=device) for k in range(steps)]
                t0 = time.perf_counter()
                compiled_loop(compiled, z, indices[:3])  # compile, record the graph, first replay
                _sync(dev)
                compile_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                x_comp = compiled_loop(compiled, z, indices)
                _sync(dev)
                t_comp = time.perf_counter() - t0 + t_noise
                err = _maxerr(x_comp, x_eager)
                how = 'mode="reduce-overhead"' if cuda else 'backend="eager" (no CUDA graphs on the CPU)'
                note = f"torch.compile {how}; compile + warm-up {compile_s:.1f} s"
                table.add(f"{name}: eager vs compile", t_eager, t_comp, err,
                          note=f"{steps / t_eager:.1f} -> {steps / t_comp:.1f} steps/s; {note}")
                record("compile", t_comp, err, note)
            except Exception as exc:
                report.setdefault("cuda_errors", []).append(f"{name} torch.compile: {type(exc).__name__}: {exc}"[:300])
    return records


# -- SDPA kernels -----------------------------------------------------------------------------------------
def released_attention_shapes(cfg: dict, latent_side: int, batch: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """``(label, (B, heads, tokens, head_dim))`` of BiFlowNet's attentions for a cubic latent of side
    ``latent_side``: the DiT tokens (batch x sub-volumes sequences) and the U-Net voxel attention at
    the levels that have it (level ``i`` runs at ``side / 2**max(0, i - 1)``; the middle block at
    the last level's size). ``cfg``: BiFlowNet's constructor arguments."""
    sub, patch, dim = cfg["sub_volume_size"][0], cfg["patch_size"], cfg["dim"]
    heads = cfg["DiT_num_heads"]
    seqs = batch * (latent_side // sub) ** 3
    tokens = (sub // patch) ** 3
    shapes = [(f"DiT {seqs}x{tokens}x{dim}", (seqs, heads, tokens, dim // heads))]
    flags = list(cfg["use_sparse_linear_attn"])
    sides = sorted({max(1, latent_side // 2 ** max(0, i - 1)) for i, f in enumerate(flags) if f}
                   | {max(1, latent_side // 2 ** max(0, len(flags) - 2))}, reverse=True)
    for s in sides:
        shapes.append((f"U-Net attention {s}^3", (batch, cfg["attn_heads"], s ** 3, 32)))
    return shapes


def _backends() -> list:
    from torch.nn.attention import SDPBackend
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_rows(dev: str, shapes: Sequence[tuple[str, tuple[int, ...]]], table, report: dict, repeat: int = 5,
              pad_to: int = 16) -> list[dict]:
    """``F.scaled_dot_product_attention`` under ``sdpa_kernel(backend)`` for the flash,
    memory-efficient and math backends, float32 and bfloat16, per shape; the reference (time and
    values) is the math backend in float32. Heads narrower than ``pad_to`` that are not a multiple
    of 8 also run zero-padded to ``pad_to`` channels (``scale = head_dim ** -0.5``, output sliced
    back): zero channels change no dot product. A backend that cannot run here gets a row with
    no time and the note "not available on this device". Returns the records (also appended to
    ``report["sdpa"]``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    records: list[dict] = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for label, shape in shapes:
            q, k, v = (torch.randn(shape, generator=g).to(dev) for _ in range(3))
            hd = shape[-1]
            with sdpa_kernel(SDPBackend.MATH):
                ref = F.scaled_dot_product_attention(q, k, v)
                t_ref = _timeit(lambda: F.scaled_dot_product_attention(q, k, v), dev, repeat)
            variants = [(False, hd)]
            if hd % 8 and hd < pad_to:
                variants.append((True, pad_to))
            for padded, width in variants:
                ins32 = [F.pad(a, (0, width - hd)) for a in (q, k, v)] if padded else [q, k, v]
                for dtype in (torch.float32, torch.bfloat16):
                    ins = [a.to(dtype) for a in ins32]
                    for backend in _backends():
                        short = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient"}
                        case = (f"SDPA {label} {short.get(backend.name, backend.name.lower())} "
                                f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
                                + (f" pad{width}" if padded else ""))

                        def call() -> torch.Tensor:
                            out = F.scaled_dot_product_attention(*ins, scale=hd ** -0.5)
                            return out[..., :hd] if padded else out

                        rec = dict(case=label, shape=list(shape), backend=backend.name, dtype=str(dtype)[6:],
                                   padded_to=width if padded else None)
                        try:
                            with sdpa_kernel(backend):
                                out = call()
                                secs = _timeit(call, dev, repeat)
                        except RuntimeError as exc:
                            first = str(exc).strip().splitlines()[0][:60] if str(exc).strip() else type(exc).__name__
                            rec.update(available=False, seconds=None, max_abs_err=None, error=first)
                            table.add(case, t_ref, None, None, note="not available on this device")
                        else:
                            err = _maxerr(out, ref)
                            rec.update(available=True, seconds=secs, max_abs_err=err)
                            table.add(case, t_ref, secs, err, note="reference: math fp32" +
                                      (f"; heads zero-padded {hd}->{width}, scale {hd}^-0.5" if padded else ""))
                        records.append(rec)
                        report.setdefault("sdpa", []).append(rec)
    return records
