#!/usr/bin/env python
"""Reference vs fast paths, side by side in one run (ratios on CPU; absolute times count on a GPU).

    python Testing/benchmarks/benchmark.py [--device cpu|cuda] [--json out.json] [--quick] [--no-compile]

Reference = float32, plain PyTorch kernels, the authors' decode rule (what the parity tests pin).
Fast = the pipelines' default: measured CPU convolution kernels (gemm / oneDNN / oneDNN
channels-last, chosen per shape at first use; taps that only read padding dropped), fused
conditioning projections and voxel attention, DiT heads padded for the CPU attention kernel,
channels-last decoder, accurate channels-last GroupNorm, memory-aware exact (stage-streamed)
decoding; optionally torch.compile or the ahead-of-time package of `meddiffusion compile`
(BiFlowNet) and, on CUDA, bf16 autocast. Every fast row prints its error against the reference.

CPU (bundled chest-ct-mini weights, 64^3 volumes = 16^3 latents):
  * BiFlowNet forward; batched forward (2 volumes in one batch vs 2 calls); compiled forward
    (torch.compile, and the AOT package);
  * decode 64^3 whole; decode 128^3: reference whole vs fast seamless tiles (time, peak memory);
  * decode peak memory in fresh processes, both modes, whole and tiled, against the estimator;
  * samplers (DDIM N, DPM-Solver++ N) against a 1000-step DDIM solution of the same ODE;
  * end to end: reference DDPM 1000 vs fast DDPM 1000 (eager, and with the AOT package, i.e. the
    main job) vs fast DPM++ 20 (decoded-volume error).
CPU, released 8x configuration with random weights (a fresh process; ``--no-released`` skips it):
  * BiFlowNet forward at latents 8x16x16 and 16^3, float32 and bf16 autocast;
  * decode 64^3 and 128^3: reference whole vs fast whole vs fast exact tiles at three cube sizes
    (time, peak RSS growth, max error against the reference), bf16 decode, blended tiles.
CUDA additionally: the released 8x/4x shapes with random weights at 256^3 and 512^3 (forward
fp32/bf16, decode whole/seamless with max_memory_allocated, generation DDPM 1000 and DPM++ 20);
  * 8x 256^3 DDPM 1000 steps (fp32, bf16): eager loop vs one step captured in a CUDA graph vs
    torch.compile(mode="reduce-overhead") (steps/s, final-latent error vs eager; gpu_rows.py);
  * SDPA flash / efficient / math, fp32 and bf16, at the DiT and U-Net attention shapes, and the DiT
    heads zero-padded 9 -> 16 (time, error vs math fp32; unavailable backends noted).
  --gpu-rows-on-cpu runs these rows on the CPU at 64^3 (3 DDPM steps; compile backend="eager").
Job service (Testing/benchmarks/service_benchmark.py, skip with --no-service): a 64^3 job through a
local `meddiffusion serve` vs in-process, and loopback upload/download of a 256^3 float32 volume.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2 ** 20


class PeakRSS:
    """Samples the resident set every 2 ms on a thread; ``peak - start`` is the case's own peak."""

    def __enter__(self) -> "PeakRSS":
        import threading
        self.start = self.peak = _current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _current_rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_mb())


def _child(mode: str, side: int, tile: int | None, device: str) -> dict:
    """One decode in a fresh process, so that the peak belongs to it alone. glibc's mmap threshold is
    fixed so that freed blocks go back to the OS and RSS follows live memory (slower, memory only)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", f"{mode},{side},{tile or 0}", "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(spec: str, device: str) -> None:
    import torch

    from MedDiffusionLib.decoding import DecodePlan, decode, decode_peak_bytes
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    mode, side, tile = spec.split(",")
    side, tile = int(side), int(tile) or None
    pipe = GenerationPipeline.from_pretrained("chest-ct-mini", device=device, mode=mode)
    ae = pipe.ae
    lat = torch.randn(1, 8, side, side, side, generator=torch.Generator().manual_seed(0)).to(device) * 0.5
    with torch.inference_mode():
        idx = ae.quantize(ae.denormalize_latent(lat))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with PeakRSS() as rss:
            decode(ae, idx, DecodePlan("whole" if tile is None else "seamless", tile))
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device == "cuda" else rss.peak - rss.start
    est = decode_peak_bytes(ae.config["n_hiddens"], ae.compression, (side,) * 3, tile, mode, device) / 2 ** 20
    print(json.dumps({"mode": mode, "side": side, "tile": tile, "peak_mb": peak, "estimate_mb": est}))


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device: str, repeat: int = 5) -> float:
    """Median wall time of ``repeat`` calls after one warm-up call (robust to a noisy machine)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _timeit_pair(fa, fb, device: str, rounds: int = 5) -> tuple[float, float]:
    """Median wall times of ``fa`` and ``fb`` called alternately (one warm-up each): on a shared,
    noisy machine a burst of load then hits both alike, so their ratio stays meaningful."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(rounds):
        for fn, acc in ((fa, ta), (fb, tb)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    return sorted(ta)[rounds // 2], sorted(tb)[rounds // 2]


def _maxerr(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


class Table:
    def __init__(self, echo: bool = False) -> None:
        self.rows: list[dict] = []
        self.echo = echo

    def add(self, case: str, ref_s: float, fast_s: float | None, err: float | None, ref_mb: float | None = None,
            fast_mb: float | None = None, note: str = "") -> None:
        """One row; ``fast_s=None``: the fast variant did not run here (say why in ``note``)."""
        self.rows.append(dict(case=case, reference_s=ref_s, fast_s=fast_s,
                              speedup=ref_s / fast_s if fast_s else None, max_abs_err=err,
                              reference_peak_mb=ref_mb, fast_peak_mb=fast_mb, note=note))
        if self.echo:  # long GPU runs: each row as soon as it exists, so a run stopped midway keeps them
            print("row", json.dumps(self.rows[-1]), flush=True)

    def print(self) -> None:
        print(f"{'case':<50} {'reference':>10} {'fast':>10} {'speed-up':>9} {'max err':>9} {'ref MB':>8} "
              f"{'fast MB':>8}  note")
        for r in self.rows:
            mb = [f"{v:>8.0f}" if v is not None else f"{'':>8}" for v in (r["reference_peak_mb"], r["fast_peak_mb"])]
            err = f"{r['max_abs_err']:>9.1e}" if r["max_abs_err"] is not None else f"{'':>9}"
            fast = f"{r['fast_s']:>9.3f}s" if r["fast_s"] is not None else f"{'-':>10}"
            speedup = f"{r['speedup']:>8.2f}x" if r["speedup"] is not None else f"{'-':>9}"
            print(f"{r['case']:<50} {r['reference_s']:>9.3f}s {fast} {speedup} {err} {mb[0]} {mb[1]}  {r['note']}")


def cpu_cases(args, table: Table, report: dict) -> None:
    import torch

    from MedDiffusionLib.decoding import decode_official, decode_seamless
    from MedDiffusionLib.models.kernels import CompiledOrEager
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    from MedDiffusionLib.pipelines.loop import denoise
    from MedDiffusionLib.schedulers import make_scheduler
    dev = args.device
    ref = GenerationPipeline.from_pretrained("chest-ct-mini", device=dev, mode="reference")
    fast = GenerationPipeline.from_pretrained("chest-ct-mini", device=dev, mode="fast", precompiled=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 16, 16, 16, generator=g).to(dev)
    t, y, res = torch.tensor([500], device=dev), torch.tensor([1], device=dev), torch.full((3,), 0.25, device=dev)

    # 1. BiFlowNet forward: reference, fast, batched -------------------------------------------------
    with torch.inference_mode():
        e_ref = ref.net(x, t, y, res)
        t_ref = _timeit(lambda: ref.net(x, t, y, res), dev, 10)
        e_fast = fast.net(x, t, y, res)
        t_fast = _timeit(lambda: fast.net(x, t, y, res), dev, 10)
        table.add("BiFlowNet forward, 16^3 latent", t_ref, t_fast, _maxerr(e_fast, e_ref), note="oneDNN convs")
        x2, t2, y2 = x.repeat(2, 1, 1, 1, 1), t.repeat(2), y.repeat(2)
        e_b = fast.net(x2, t2, y2, res)
        t_b = _timeit(lambda: fast.net(x2, t2, y2, res), dev, 5)
        table.add("  2 volumes: 2 calls vs one batch of 2 (fast)", 2 * t_fast, t_b, _maxerr(e_b[1:], e_fast))

    # 2. decode ---------------------------------------------------------------------------------------
    with torch.inference_mode():
        lat = torch.randn(1, 8, 16, 16, 16, generator=g).to(dev) * 0.5
        z = ref.ae.denormalize_latent(lat)
        idx = ref.ae.quantize(z)
        d_ref = ref.ae.decode(idx, quantize=False)
        t_dref = _timeit(lambda: ref.ae.decode(idx, quantize=False), dev, 5)
        d_fast = fast.ae.decode(idx, quantize=False)
        t_dfast = _timeit(lambda: fast.ae.decode(idx, quantize=False), dev, 5)
        table.add("AE decode 64^3, whole", t_dref, t_dfast, _maxerr(d_fast, d_ref), note="oneDNN + channels-last")
        seam = decode_seamless(fast.ae, idx, 8, 2)
        off = decode_official(ref.ae, idx, 8)
        report["tile_error_vs_whole_64"] = {"official_tiles_max": _maxerr(off, d_ref),
                                            "official_tiles_mean": float((off - d_ref).abs().mean()),
                                            "seamless_max": _maxerr(seam, d_ref),
                                            "seamless_mean": float((seam - d_ref).abs().mean())}
        lat32 = torch.randn(1, 8, 32, 32, 32, generator=g).to(dev) * 0.5
        idx32 = ref.ae.quantize(ref.ae.denormalize_latent(lat32))
        t0 = time.perf_counter()
        w32 = ref.ae.decode(idx32, quantize=False)
        t_w32 = time.perf_counter() - t0
        t0 = time.perf_counter()
        s32 = decode_seamless(fast.ae, idx32, 16, 4)
        t_s32 = time.perf_counter() - t0
    with torch.inference_mode():  # compiled BiFlowNet (after the decode rows: compiling leaves worker processes)
        if not args.no_compile:
            comp = CompiledOrEager(fast.net)
            t0 = time.perf_counter()
            e_c = comp(x, t, y, res)
            compile_s = time.perf_counter() - t0
            t_c = _timeit(lambda: comp(x, t, y, res), dev, 10)
            gain = t_fast - t_c
            note = (f"compile {compile_s:.0f} s once; pays off after {compile_s / gain:.0f} steps" if gain > 0
                    else f"compile {compile_s:.0f} s; no gain") if comp.error is None else f"fell back: {comp.error[:40]}"
            table.add("BiFlowNet forward, torch.compile (frozen weights)", t_ref, t_c, _maxerr(e_c, e_ref), note=note)
            report["compile_seconds"] = compile_s
    # the ahead-of-time package (`meddiffusion compile`, built by scripts/setup.sh): built here if missing
    aot = GenerationPipeline(fast.ae, fast.net, fast.entry, dev, mode="fast")
    t0 = time.perf_counter()
    package = None if args.no_compile else aot.precompiled_network((64, 64, 64), 1, build=True)
    aot_s = time.perf_counter() - t0
    if package is not None:
        with torch.inference_mode():
            e_p = package(x, t, y, res)
            t_p = _timeit(lambda: package(x, t, y, res), dev, 10)
        table.add("BiFlowNet forward, AOT-compiled package", t_ref, t_p, _maxerr(e_p, e_ref),
                  note=f"found or built in {aot_s:.1f} s; {t_fast / t_p:.2f}x the eager fast forward")

    mem = {}
    for mode, side, tile in [("reference", 16, None), ("fast", 16, None), ("reference", 24, None), ("fast", 24, None),
                             ("reference", 32, None), ("fast", 32, None), ("reference", 32, 16), ("fast", 32, 16),
                             ("fast", 32, 8), ("fast", 24, 12)]:
        mem[(mode, side, tile)] = _child(mode, side, tile, dev)
    table.add("AE decode 128^3: ref whole vs fast 16^3-latent tiles", t_w32, t_s32, _maxerr(s32, w32),
              mem[("reference", 32, None)]["peak_mb"], mem[("fast", 32, 16)]["peak_mb"],
              note=f"mean err {float((s32 - w32).abs().mean()):.1e}")
    report["decode_memory"] = list(mem.values())

    # 3. samplers against the 1000-step DDIM ODE solution ----------------------------------------------
    # The tiny demo model memorised two volumes; its probability-flow ODE jumps between them under
    # different discretisations, so solver accuracy is measured on data ~ N(mu, s^2) per voxel, whose
    # optimal noise prediction is exact: every sampler then solves the same ODE as 1000-step DDIM.
    gd = fast.diffusion
    mu, s2 = 0.2, 0.3 ** 2

    def exact_eps(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        ab = gd.alphas_cumprod[tt].view(-1, 1, 1, 1, 1)
        return (xx - ab.sqrt() * mu) * (1 - ab).sqrt() / (ab * s2 + 1 - ab)

    zz = torch.randn(1, 8, 16, 16, 16, generator=torch.Generator().manual_seed(7)).to(dev)
    ref_ode = denoise(make_scheduler("ddim", gd, 1000), exact_eps, zz)
    samplers = {}
    for name, steps in [("ddim", (100, 50, 20, 10)), ("dpm++", (50, 20, 10))]:
        for n in steps:
            out = denoise(make_scheduler(name, gd, n), exact_eps, zz)
            samplers[f"{name} {n}"] = {"steps": n, "model_seconds_at_16^3": n * t_fast,
                                       "mean_abs_err_latent": float((out - ref_ode).abs().mean()),
                                       "max_abs_err_latent": _maxerr(out, ref_ode)}
    report["samplers_vs_ddim1000"] = samplers

    # 4. end to end ----------------------------------------------------------------------------------
    ref_sampler = ("ddim", 100) if args.quick else ("ddpm", None)
    name = "DDIM 100" if args.quick else "DDPM 1000"
    t0 = time.perf_counter()
    v_ref = ref.generate(seed=0, sampler=ref_sampler[0], steps=ref_sampler[1])[0].image
    t_e_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    v_fast = fast.generate(seed=0, sampler=ref_sampler[0], steps=ref_sampler[1])[0].image
    t_e_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    v_dpm = fast.generate(seed=0, sampler="dpm++", steps=20)[0].image
    t_e_dpm = time.perf_counter() - t0
    table.add(f"generation 64^3, {name}: reference vs fast", t_e_ref, t_e_fast, float(abs(v_fast - v_ref).max()),
              note="decoded volume, model units")
    if package is not None:  # what `meddiffusion generate` runs after scripts/setup.sh
        t0 = time.perf_counter()
        v_aot = aot.generate(seed=0, sampler=ref_sampler[0], steps=ref_sampler[1])[0].image
        t_e_aot = time.perf_counter() - t0
        table.add(f"generation 64^3, {name}: reference vs fast + AOT package", t_e_ref, t_e_aot,
                  float(abs(v_aot - v_ref).max()), note="decoded volume, model units")
    table.add(f"generation 64^3: reference {name} vs fast DPM++ 20", t_e_ref, t_e_dpm, None,
              note=f"DPM++ 20 ODE error {samplers['dpm++ 20']['mean_abs_err_latent']:.1e} (latent, exact ODE)")
    del v_dpm


def _reset_peak(dev: str) -> None:
    import torch
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(dev: str) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 20 if dev == "cuda" else None


def _released_child(args) -> list[dict]:
    """The released-configuration CPU rows in a fresh process (glibc mmap threshold fixed, so that
    the resident-set growth follows live memory)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="meddiffusion-bench-") as cache:  # packages of random weights
        env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536", MEDDIFFUSION_CACHE=cache)
        cmd = [sys.executable, __file__, "--child-released", "--device", args.device] + \
            (["--quick"] if args.quick else []) + (["--no-compile"] if args.no_compile else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"released-configuration rows failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gemm_peak_flops(dev: str, n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of an ``n``-cube float32 matrix product on ``dev`` (best of ``repeat``): the ceiling
    the efficiency rows divide by (CPU: at the process's thread count)."""
    import torch

    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    torch.mm(a, b)
    best = min(_timeit(lambda: torch.mm(a, b), dev, 1) for _ in range(repeat))
    return 2.0 * n ** 3 / best


def counted_flops(fn) -> float:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them (convolutions,
    matmuls, attention). Run it on the reference module: the fast kernels call oneDNN directly,
    which the counter does not see."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return float(counter.get_total_flops())


def flop_efficiency_rows(dev: str, net, ae, latent: tuple[int, int, int], table: Table, repeat: int = 5) -> list[dict]:
    """Fast eager BiFlowNet forward at ``latent`` and fast whole decode of the same latent, as a share
    of the fp32 GEMM peak: FLOPs counted on the reference modules, time taken on their
    :func:`~MedDiffusionLib.models.kernels.accelerate` forms (the references stay untouched)."""
    import torch

    from MedDiffusionLib.models.kernels import accelerate
    peak = gemm_peak_flops(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, *latent, generator=g).to(dev)
    t, y = torch.tensor([500], device=dev), torch.tensor([0], device=dev)
    res = torch.tensor(latent, dtype=torch.float32, device=dev) / 64
    idx = torch.randint(0, ae.config["n_codes"], (1, *latent), generator=g).to(dev)
    rows = []
    for what, module, call in (("BiFlowNet forward", net, lambda m: m(x, t, y, res)),
                               ("decode", ae, lambda m: m.decode(idx, quantize=False))):
        flops = counted_flops(lambda: call(module))
        fast = accelerate(module).module
        with torch.inference_mode():
            call(fast)
            secs = _timeit(lambda: call(fast), dev, repeat)
        share = flops / secs / peak
        rows.append(dict(case=f"{what} {'x'.join(map(str, latent))} latent", flops=flops, seconds=secs,
                         gemm_peak_gflops=peak / 1e9, share_of_peak=share))
        # reference column: the time at the GEMM peak; "speed-up" then reads as the share of the peak
        table.add(f"FLOP efficiency: {what}, latent {'x'.join(map(str, latent))}", flops / peak, secs, None,
                  note=f"{flops / 1e9:.1f} GFLOP in {secs:.3f} s = {share:.0%} of the fp32 GEMM peak "
                       f"({peak / 1e9:.0f} GFLOP/s)")
    return rows


def released_main(args) -> None:
    """Released 8x configuration, random weights (weights do not change the cost), float32 CPU:
    BiFlowNet forward at latents 8x16x16 and 16^3 (reference vs fast vs fast bf16 autocast); decoder
    at 64^3 and 128^3 output: reference whole vs fast whole vs fast exact tiles (time, peak RSS
    growth, max error against the reference whole decode); bf16 decoded-volume error."""
    import torch

    from MedDiffusionLib.decoding import DecodePlan, decode, decode_peak_bytes, decode_seamless, exact_decode_bytes
    from MedDiffusionLib.models import BiFlowNet, PatchVolumeAE
    from MedDiffusionLib.models import precompiled
    from MedDiffusionLib.models.kernels import accelerate
    dev = args.device
    cfg = json.loads((ROOT / "Testing" / "benchmarks" / "released_configs.json").read_text())["8x"]
    torch.manual_seed(0)
    net = BiFlowNet(**cfg["biflownet"]).eval().to(dev)
    fast_net = accelerate(net).module
    table = Table()
    flop_efficiency_rows(dev, net, PatchVolumeAE(**cfg["autoencoder"]).eval().to(dev), (16, 16, 16), table)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for lat in ((8, 16, 16), (16, 16, 16)):
            x = torch.randn(1, 8, *lat, generator=g).to(dev)
            t, y = torch.tensor([500], device=dev), torch.tensor([1], device=dev)
            res = torch.tensor(lat, dtype=torch.float32, device=dev) / 64
            e_ref = net(x, t, y, res)
            e_fast = fast_net(x, t, y, res)
            t_ref, t_fast = _timeit_pair(lambda: net(x, t, y, res), lambda: fast_net(x, t, y, res), dev, 5)
            name = "x".join(map(str, lat))
            table.add(f"released 8x BiFlowNet forward, latent {name}", t_ref, t_fast, _maxerr(e_fast, e_ref),
                      note="float32, alternating calls")
            if not args.no_compile:  # the ahead-of-time package (random weights: built in a throw-away cache)
                t0 = time.perf_counter()
                package = precompiled.find_or_build(fast_net, (x, t, y, res), build_missing=True)
                build_s = time.perf_counter() - t0
                if package is not None:
                    e_p = package(x, t, y, res)
                    t_ref2, t_p = _timeit_pair(lambda: net(x, t, y, res), lambda: package(x, t, y, res), dev, 5)
                    table.add("  same, fast + AOT-compiled package", t_ref2, t_p, _maxerr(e_p, e_ref),
                              note=f"float32, alternating calls; built in {build_s:.0f} s")
                    del package
            with torch.autocast(dev, dtype=torch.bfloat16):
                e_bf = fast_net(x, t, y, res)
                t_bf = _timeit(lambda: fast_net(x, t, y, res), dev, 3)
            table.add(f"  same, fast + bf16 autocast", t_ref, t_bf, _maxerr(e_bf, e_ref), note="eps error")
    del net, fast_net
    ae = PatchVolumeAE(**cfg["autoencoder"]).eval().to(dev)
    fast_ae = accelerate(ae).module  # fast kernels, channels-last decoder; ae stays the reference
    nh = ae.config["n_hiddens"]
    plans = {8: (2, 3, 4), 16: (8, 5, 4)} if not args.quick else {8: (2, 3, 4)}
    with torch.inference_mode():
        for s_lat, tiles in plans.items():
            side = 8 * s_lat
            idx = torch.randint(0, ae.config["n_codes"], (1, s_lat, s_lat, s_lat), generator=g).to(dev)

            def run(fn):
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    out = fn()
                    secs = time.perf_counter() - t0
                return out, secs, rss.peak - rss.start

            ref_img, t_ref, m_ref = run(lambda: ae.decode(idx, quantize=False))
            fast_img, t_fast, m_fast = run(lambda: fast_ae.decode(idx, quantize=False))
            whole_est = decode_peak_bytes(nh, 8, (s_lat,) * 3) / 2 ** 20
            table.add(f"released decode {side}^3, whole", t_ref, t_fast, _maxerr(fast_img, ref_img), m_ref, m_fast,
                      note=f"estimate {whole_est:.0f} MB")
            del fast_img
            for tile in tiles:
                ex, t_ex, m_ex = run(lambda: decode(fast_ae, idx, DecodePlan("exact", tile)))
                dev_b, store_b = exact_decode_bytes(nh, 8, (s_lat,) * 3, tile)
                table.add(f"  exact tiles {tile}^3 latent: ref whole vs fast exact", t_ref, t_ex, _maxerr(ex, ref_img),
                          m_ref, m_ex, note=f"time {t_ex / t_fast:.2f}x fast whole; est. device {dev_b / 2 ** 20:.0f} MB"
                          f" + maps {store_b / 2 ** 20:.0f} MB; device {dev_b / 2 ** 20 / whole_est:.0%} of whole")
                del ex
            if s_lat == 16:  # the target: exact at 128^3 under a 1 GB cap (stage maps spilled to disk)
                import tempfile

                from MedDiffusionLib.decoding import plan_decode
                plan = plan_decode(nh, 8, (s_lat,) * 3, 1e9, 1e9, "fast", dev)
                with tempfile.TemporaryDirectory() as spill:
                    ex, t_ex, m_ex = run(lambda: decode(fast_ae, idx, plan, spill_dir=spill))
                table.add(f"  1 GB cap: {plan.method} {plan.tile}^3 cubes, maps in {plan.store}", t_ref, t_ex,
                          _maxerr(ex, ref_img), m_ref, m_ex,
                          note=f"planned device {plan.device_bytes / 2 ** 20:.0f} MB, maps {plan.store_bytes / 2 ** 20:.0f}"
                               f" MB ({plan.store})")
                del ex
            if s_lat == 8:
                with torch.autocast(dev, dtype=torch.bfloat16):
                    bf, t_bf, m_bf = run(lambda: fast_ae.decode(idx, quantize=False))
                table.add(f"  bf16 autocast decode {side}^3 (fast)", t_ref, t_bf, _maxerr(bf, ref_img), m_ref, m_bf,
                          note=f"mean err {float((bf.float() - ref_img).abs().mean()):.1e}, output std "
                               f"{float(ref_img.std()):.2f}")
                seam = decode_seamless(fast_ae, idx, 4, 1)
                table.add("  seamless (blended) tiles 4^3 latent, overlap 1", t_ref, t_ref, _maxerr(seam, ref_img),
                          note=f"mean err {float((seam - ref_img).abs().mean()):.1e}; approximate, not exact")
    print(json.dumps(table.rows))


def cuda_cases(args, table: Table, report: dict, dev: str = "cuda", sides: tuple[int, ...] = (256, 512),
               comps: tuple[str, ...] = ("8x", "4x")) -> None:
    """Released 8x/4x shapes with random weights (timing only; weights do not change the cost).
    ``dev``/``sides`` let the same code be smoke-tested on a CPU at a small size."""
    import torch

    from MedDiffusionLib.models import BiFlowNet, PatchVolumeAE
    from MedDiffusionLib.decoding import decode
    from MedDiffusionLib.models.kernels import CompiledOrEager
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    released = json.loads((ROOT / "Testing" / "benchmarks" / "released_configs.json").read_text())
    for comp in comps:
        cfg = released[comp]
        ae = PatchVolumeAE(**cfg["autoencoder"])
        net = BiFlowNet(**cfg["biflownet"])
        f = ae.compression
        for side_img in sides:
            s = side_img // f
            label = f"{comp} {side_img}^3"
            try:
                _reset_peak(dev)
                pipe = GenerationPipeline(ae, net, None, dev, mode="fast")
                x = torch.randn(1, 8, s, s, s, device=dev)
                t, y = torch.tensor([500], device=dev), torch.tensor([1], device=dev)
                res = torch.tensor([s, s, s], dtype=torch.float32, device=dev) / 64
                with torch.inference_mode():
                    e_ref = net(x, t, y, res)
                    t_ref = _timeit(lambda: net(x, t, y, res), dev, 3)
                    with torch.autocast(dev, dtype=torch.bfloat16):
                        e_bf = net(x, t, y, res)
                        t_bf = _timeit(lambda: net(x, t, y, res), dev, 3)
                    table.add(f"{label} BiFlowNet forward fp32 vs bf16", t_ref, t_bf, _maxerr(e_bf, e_ref))
                    if not args.no_compile:
                        cn = CompiledOrEager(net)
                        with torch.autocast(dev, dtype=torch.bfloat16):
                            t0 = time.perf_counter()
                            e_c = cn(x, t, y, res)
                            _sync(dev)
                            c_s = time.perf_counter() - t0
                            t_c = _timeit(lambda: cn(x, t, y, res), dev, 3)
                        table.add(f"{label} forward fp32 vs bf16 + compile", t_ref, t_c, _maxerr(e_c, e_ref),
                                  note=f"compile {c_s:.0f} s")
                    idx = torch.randint(0, ae.config["n_codes"], (1, s, s, s), device=dev)
                    budget = pipe.memory_budget()
                    plan = pipe.decode_plan((s, s, s))
                    _reset_peak(dev)
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        decode(ae, idx, plan)
                    _sync(dev)
                    t_dec = time.perf_counter() - t0
                    peak = _peak_mb(dev)
                    if plan.method == "whole":  # bf16 autocast: its error on the decoded volume
                        with torch.inference_mode():
                            d32 = ae.decode(idx, quantize=False)
                            t_d32 = _timeit(lambda: ae.decode(idx, quantize=False), dev, 1)
                            with torch.autocast(dev, dtype=torch.bfloat16):
                                d16 = ae.decode(idx, quantize=False)
                                t_d16 = _timeit(lambda: ae.decode(idx, quantize=False), dev, 1)
                        table.add(f"{label} decode fp32 vs bf16 autocast", t_d32, t_d16, _maxerr(d16, d32),
                                  note=f"mean err {float((d16.float() - d32).abs().mean()):.1e}")
                        del d32, d16
                    report.setdefault("cuda_decode", []).append(
                        dict(case=label, method=plan.method, tile=plan.tile, store=plan.store, seconds=t_dec,
                             peak_mb=peak, estimate_mb=plan.device_bytes / 2 ** 20,
                             store_estimate_mb=plan.store_bytes / 2 ** 20, budget_mb=(budget or 0) / 2 ** 20))
                    print("cuda_decode", report["cuda_decode"][-1], flush=True)
                    runs = {("8x", 256): (("dpm++", 20), ("ddpm", None)), ("8x", 512): (("dpm++", 20),),
                            ("4x", 256): (("dpm++", 20),)}.get((comp, side_img), ())
                    if dev == "cpu":  # smoke run of the GPU rows: two sampler steps
                        runs = (("dpm++", 2),) if side_img == sides[0] else ()
                    for sampler, steps in runs:
                        pipe.precision = "bf16"
                        _reset_peak(dev)
                        t0 = time.perf_counter()
                        pipe.decode(pipe.sample_latents(1, (side_img,) * 3, 0, sampler, steps))
                        _sync(dev)
                        report.setdefault("cuda_generation", []).append(
                            dict(case=label, sampler=sampler, steps=steps or 1000, seconds=time.perf_counter() - t0,
                                 peak_mb=_peak_mb(dev)))
                        print("cuda_generation", report["cuda_generation"][-1], flush=True)
                    _capped_exact_decode(pipe, ae, idx, s, label, dev, report)
            except Exception as exc:  # report and go on: one failing size must not hide the others
                report.setdefault("cuda_errors", []).append(f"{label}: {type(exc).__name__}: {exc}"[:300])


CAP_GB = 24  # the target for the 512^3 8x exact decode: 24 GB of device memory


def _capped_exact_decode(pipe, ae, idx, s: int, label: str, dev: str, report: dict) -> None:
    """The exact (stage-streamed) decode with the device budget capped at :data:`CAP_GB`: its
    device peak against the plan, host RSS growth, time; the store goes to the CPU unless it would
    not fit in 60 % of the available RAM (then on the device, and said so)."""
    if dev != "cuda" or s < 32:
        return
    try:
        _capped_exact_decode_row(pipe, ae, idx, s, label, dev, report)
    except Exception as exc:  # noqa: BLE001 - report and go on
        report.setdefault("cuda_errors", []).append(f"{label} capped exact decode: {type(exc).__name__}: {exc}"[:300])


def _capped_exact_decode_row(pipe, ae, idx, s: int, label: str, dev: str, report: dict) -> None:
    import torch

    from MedDiffusionLib.decoding import decode
    plan = pipe.decode_plan((s, s, s), memory_limit_bytes=CAP_GB * 1e9)
    avail = int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]) * 1024
    spill = None
    if plan.store == "disk":
        import tempfile
        spill = tempfile.mkdtemp(prefix="meddiffusion-bench-spill-")
    _reset_peak(dev)
    t0 = time.perf_counter()
    with PeakRSS() as rss, torch.inference_mode():
        out = decode(ae, idx, plan, spill_dir=spill)
        _sync(dev)
    row = dict(case=f"{label} exact decode, {CAP_GB} GB cap", method=plan.method, tile=plan.tile,
               seconds=time.perf_counter() - t0, peak_mb=_peak_mb(dev), estimate_mb=plan.device_bytes / 2 ** 20,
               host_estimate_mb=plan.store_bytes / 2 ** 20, host_rss_growth_mb=rss.peak - rss.start, store=plan.store,
               ram_available_mb=avail / 2 ** 20)
    del out
    report.setdefault("cuda_decode", []).append(row)
    print("cuda_decode", row, flush=True)


def graph_and_sdpa_cases(args, table: Table, report: dict, dev: str = "cuda", sides: tuple[int, ...] = (256, 512),
                         steps: int = 1000) -> None:
    """Released 8x configuration, random weights: the DDPM step without per-step Python overhead
    (eager loop vs CUDA graph vs ``torch.compile(mode="reduce-overhead")``, fp32 and, on CUDA, bf16
    autocast; ``steps`` steps at ``sides[0]``) and the SDPA backends at every side's attention
    shapes (Testing/benchmarks/gpu_rows.py). On the CPU a smoke run of the same code."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_rows

    from MedDiffusionLib.models import BiFlowNet, PatchVolumeAE
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    cfg = json.loads((ROOT / "Testing" / "benchmarks" / "released_configs.json").read_text())["8x"]
    s = sides[0] // 8
    try:
        torch.manual_seed(0)
        pipe = GenerationPipeline(PatchVolumeAE(**cfg["autoencoder"]), BiFlowNet(**cfg["biflownet"]), None, dev,
                                  mode="fast")
        for bf16 in ((False, True) if dev == "cuda" else (False,)):
            gpu_rows.sampler_graph_rows(pipe.net, pipe.diffusion, dev, (8, s, s, s), steps, table, report,
                                        label=f"8x {sides[0]}^3 ", bf16=bf16, compile=not args.no_compile)
        del pipe
    except Exception as exc:  # report and go on: the SDPA rows do not depend on these
        report.setdefault("cuda_errors", []).append(f"sampler graph rows: {type(exc).__name__}: {exc}"[:300])
    for side in sides:
        try:
            shapes = gpu_rows.released_attention_shapes(cfg["biflownet"], side // 8)
            gpu_rows.sdpa_rows(dev, [(f"{side}^3 {label}", shape) for label, shape in shapes], table, report,
                               repeat=5 if dev == "cuda" else 3)
        except Exception as exc:
            report.setdefault("cuda_errors", []).append(f"SDPA rows {side}^3: {type(exc).__name__}: {exc}"[:300])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="DDIM 100 instead of DDPM 1000 for the end-to-end rows")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-released", action="store_true",
                    help="skip the released-configuration rows (random weights, 64^3 and 128^3)")
    ap.add_argument("--gpu-rows-on-cpu", action="store_true",
                    help="run the GPU rows on the CPU at 64^3 (a smoke run, so that they do not rot)")
    ap.add_argument("--graph-steps", type=int, help="DDPM steps of the sampler-graph rows (default: 1000 on CUDA, "
                                                    "3 with --gpu-rows-on-cpu)")
    ap.add_argument("--no-service", action="store_true", help="skip the job-service rows (local server overhead, "
                                                                "loopback throughput of a 256^3 volume)")
    ap.add_argument("--gpu-only", action="store_true", help="only the CUDA rows (a short device run: no CPU, "
                                                              "released-CPU or service rows)")
    ap.add_argument("--no-graph", action="store_true", help="skip the sampler-graph and SDPA rows (CUDA)")
    ap.add_argument("--gpu-sides", default="256,512", help="volume sides of the released-shape CUDA rows")
    ap.add_argument("--gpu-comps", default="8x,4x", help="released configurations of the CUDA rows")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-released", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.device)
        return 0
    if args.child_released:
        released_main(args)
        return 0
    import torch
    report: dict = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    table = Table(echo=args.gpu_only)
    if args.gpu_only:
        args.no_released = args.no_service = True
    else:
        cpu_cases(args, table, report)
    if not args.no_released:
        table.rows.extend(_released_child(args))
    if args.device == "cuda":  # the sampler-graph and SDPA rows first: they are the short ones
        if not args.no_graph:
            graph_and_sdpa_cases(args, table, report, steps=args.graph_steps or 1000)
        cuda_cases(args, table, report, sides=tuple(int(v) for v in args.gpu_sides.split(",")),
                   comps=tuple(args.gpu_comps.split(",")))
    elif args.gpu_rows_on_cpu:
        cuda_cases(args, table, report, dev="cpu", sides=(64,))
        graph_and_sdpa_cases(args, table, report, dev="cpu", sides=(64,), steps=args.graph_steps or 3)
    report["rows"] = table.rows

    where = report["gpu"] or f"{report['threads']} CPU threads"
    print(f"\nMedDiffusion benchmark on {args.device} ({where}), torch {report['torch']}")
    table.print()
    print("\ndecode peak memory (MB; CPU: RSS growth of a fresh process) vs the estimator (target within +-25 %)")
    print(f"{'mode':<10} {'latent':>6} {'tile':>5} {'peak MB':>9} {'estimate':>9} {'est/meas':>8}")
    for m in report.get("decode_memory", []):
        ratio = m["estimate_mb"] / max(m["peak_mb"], 1e-9)
        print(f"{m['mode']:<10} {m['side']:>6} {m['tile'] or '-':>5} {m['peak_mb']:>9.1f} {m['estimate_mb']:>9.1f} "
              f"{ratio:>8.2f} {'ok' if 0.75 <= ratio <= 1.25 else 'OFF'}")
    print("\nsamplers vs 1000-step DDIM from the same noise on the exact Gaussian ODE "
          "(latent |error| mean / max; time = steps x one fast bundled-model forward)")
    for k, v in report.get("samplers_vs_ddim1000", {}).items():
        print(f"{k:<10} {v['model_seconds_at_16^3']:>7.2f}s  {v['mean_abs_err_latent']:.5f} / {v['max_abs_err_latent']:.5f}")
    te = report.get("tile_error_vs_whole_64")
    if te:
        print(f"\ntiling error vs whole decode at 64^3 (8^3 latent tiles): official max {te['official_tiles_max']:.4f} "
              f"mean {te['official_tiles_mean']:.4f}; seamless max {te['seamless_max']:.4f} mean {te['seamless_mean']:.4f}")
    for key in ("cuda_decode", "cuda_generation", "sampler_graph", "cuda_errors"):
        for item in report.get(key, []):
            print(key, item, flush=True)
    if not args.no_service:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import service_benchmark

        report["service"] = service_benchmark.rows()
        service_benchmark.print_rows(report["service"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
