#!/usr/bin/env python
"""Reference vs fast paths, side by side in one run (ratios on CPU; absolute times count on a GPU).

    python Testing/benchmarks/benchmark.py [--device cpu|cuda] [--json out.json] [--quick]

Cases (bundled chest-ct-mini weights on CPU; on CUDA also the released 8x/4x shapes at 256^3 with
random weights):
  * BiFlowNet forward: reference = fp32; fast = channels_last_3d (+ bf16 autocast on CUDA);
  * autoencoder decode: whole volume (reference) vs seamless tiles, official tiles for comparison;
    time, peak memory (own subprocess per case: CPU peak RSS / CUDA max_memory_allocated) and the
    decode-memory estimator's prediction;
  * samplers: DDPM 1000 (reference), DDIM N and DPM-Solver++ N, each compared with a 1000-step DDIM
    solution from the same noise (all approximate the same probability-flow ODE);
  * end to end: official defaults (DDPM 1000, whole decode) vs DPM++ 20.
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


def _child(case: str, device: str, arg: str) -> dict:
    """Run one memory case in a fresh process so that peak memory belongs to it alone."""
    out = subprocess.run([sys.executable, __file__, "--child", case, "--device", device, "--arg", arg],
                         capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timeit(fn, device: str, repeat: int = 3) -> float:
    import torch
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def child_main(case: str, device: str, arg: str) -> None:
    import torch
    from MedDiffusionLib.estimate import decode_peak_bytes
    from MedDiffusionLib.weights import load_models
    _, ae, _ = load_models("chest-ct-mini")
    ae = ae.to(device)
    side = int(arg)
    lat = torch.randn(1, 8, side, side, side, generator=torch.Generator().manual_seed(0)).to(device) * 0.5
    z = ae.denormalize_latent(lat)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tile = None
    with torch.inference_mode(), PeakRSS() as rss:
        t0 = time.perf_counter()
        if case == "whole":
            ae.decode(z)
        elif case == "seamless":
            tile = max(4, side // 2)
            ae.decode_tiled(z, tile=tile, overlap=max(1, tile // 4))
        else:
            tile = max(4, side // 2)
            ae.decode_tiled_official(z, tile)
        secs = time.perf_counter() - t0
    f = ae.compression
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20) if device == "cuda" else (rss.peak - rss.start)
    est = decode_peak_bytes(ae.config["n_hiddens"], f, (side * f) ** 3, None if tile is None else (tile * f) ** 3) / 2 ** 20
    print(json.dumps({"case": case, "side": side, "seconds": secs, "peak_mb": peak, "estimate_mb": est}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--arg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.device, args.arg)
        return 0
    import torch
    from MedDiffusionLib.pipelines.generation import GenerationPipeline
    dev = args.device
    report: dict = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if dev == "cuda" else None}
    rows = []
    pipe = GenerationPipeline.from_pretrained("chest-ct-mini", device=dev)
    net, ae = pipe.net, pipe.ae
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 16, 16, 16, generator=g).to(dev)
    t, y, res = torch.tensor([500], device=dev), torch.tensor([1], device=dev), torch.full((3,), 0.25, device=dev)

    # 1. BiFlowNet forward -------------------------------------------------------------------------
    with torch.inference_mode():
        ref = net(x, t, y, res)
        t_ref = _timeit(lambda: net(x, t, y, res), dev, 5)
        net_cl = net.to(memory_format=torch.channels_last_3d)
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            fast = net_cl(x_cl, t, y, res).float()
            t_fast = _timeit(lambda: net_cl(x_cl, t, y, res), dev, 5)
        net.to(memory_format=torch.contiguous_format)
    rows.append(("BiFlowNet forward 16^3 latent", t_ref, t_fast, float((fast - ref).abs().max())))

    # 2. decode: time, memory, estimator ------------------------------------------------------------
    with torch.inference_mode():
        z = ae.denormalize_latent(torch.randn(1, 8, 16, 16, 16, generator=g).to(dev) * 0.5)
        whole = ae.decode(z)
        t_whole = _timeit(lambda: ae.decode(z), dev, 2)
        ae_cl = ae.to(memory_format=torch.channels_last_3d)
        cl = ae_cl.decode(z)
        t_cl = _timeit(lambda: ae_cl.decode(z), dev, 2)
        ae.to(memory_format=torch.contiguous_format)
        seam = ae.decode_tiled(z, tile=8, overlap=2)
        off = ae.decode_tiled_official(z, 8)
    rows.append(("AE decode 64^3 (fp32 vs channels_last_3d)", t_whole, t_cl, float((cl - whole).abs().max())))
    if dev == "cuda":  # mixed precision only pays on GPUs (this CPU kind has no bf16 units)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            half = ae.decode(z).float()
            t_half = _timeit(lambda: ae.decode(z), dev, 2)
        rows.append(("AE decode 64^3 (fp32 vs bf16 autocast)", t_whole, t_half, float((half - whole).abs().max())))
    report["tile_error_vs_whole_64"] = {"official_tiles_max": float((off - whole).abs().max()),
                                        "official_tiles_mean": float((off - whole).abs().mean()),
                                        "seamless_max": float((seam - whole).abs().max()),
                                        "seamless_mean": float((seam - whole).abs().mean())}
    mem = []
    for side in (16, 24, 32):
        for case in ("whole", "seamless", "official"):
            mem.append(_child(case, dev, str(side)))
    report["decode_memory"] = mem

    # 3. samplers against the 1000-step DDIM ODE solution ------------------------------------------------
    # The tiny demo model memorised two volumes; its probability-flow ODE jumps between them under
    # different discretisations, so solver accuracy is measured on data ~ N(mu, s^2) per voxel, whose
    # optimal noise prediction is exact: every sampler then solves the same ODE as 1000-step DDIM.
    gd = pipe.diffusion
    mu, s2 = 0.2, 0.3 ** 2

    def exact_eps(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        ab = gd.alphas_cumprod[tt].view(-1, 1, 1, 1, 1)
        return (xx - ab.sqrt() * mu) * (1 - ab).sqrt() / (ab * s2 + 1 - ab)

    zz = torch.randn(1, 8, 16, 16, 16, generator=torch.Generator().manual_seed(7)).to(dev)
    ref_ode = gd.sample_ddim(exact_eps, zz, 1000)
    step_s = t_ref  # one BiFlowNet forward of the bundled model at 16^3
    samplers = {}
    for name, solve, steps in [("ddim", gd.sample_ddim, (100, 50, 20, 10)), ("dpm++", gd.sample_dpmpp_2m, (50, 20, 10))]:
        for n in steps:
            out = solve(exact_eps, zz, n)
            samplers[f"{name} {n}"] = {"model_seconds_at_16^3": n * step_s,
                                       "mean_abs_err_latent": float((out - ref_ode).abs().mean()),
                                       "max_abs_err_latent": float((out - ref_ode).abs().max())}
    report["samplers_vs_ddim1000"] = samplers

    # 4. end to end -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    pipe.generate(seed=0, sampler="ddpm")
    t_ref_e2e = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.generate(seed=0, sampler="dpm++", steps=20)
    t_fast_e2e = time.perf_counter() - t0
    rows.append(("generation 64^3 (DDPM 1000 vs DPM++ 20)", t_ref_e2e, t_fast_e2e,
                 samplers["dpm++ 20"]["mean_abs_err_latent"]))

    report["rows"] = [dict(case=c, reference_s=a, fast_s=b, speedup=a / b, max_abs_err=e) for c, a, b, e in rows]
    where = report["gpu"] or f"{report['threads']} CPU threads"
    print(f"\nMedDiffusion benchmark on {dev} ({where}), torch {report['torch']}")
    print(f"{'case':<44} {'reference':>10} {'fast':>10} {'speed-up':>9} {'error':>10}")
    for c, a, b, e in rows:
        print(f"{c:<44} {a:>9.3f}s {b:>9.3f}s {a / b:>8.2f}x {e:>10.2e}")
    print("\ndecode peak memory (MB; CPU: peak RSS growth of a fresh process) and the estimator's prediction")
    print(f"{'latent':<8} {'mode':<10} {'seconds':>8} {'peak MB':>9} {'estimate':>9} {'est/meas':>8}")
    for m in mem:
        print(f"{m['side']:<8} {m['case']:<10} {m['seconds']:>8.2f} {m['peak_mb']:>9.1f} {m['estimate_mb']:>9.1f} "
              f"{m['estimate_mb'] / max(m['peak_mb'], 1e-9):>8.2f}")
    print("\nsamplers vs 1000-step DDIM from the same noise on the exact Gaussian ODE (latent |error| mean / max;"
          " time = steps x one bundled-model forward)")
    for k, v in samplers.items():
        print(f"{k:<10} {v['model_seconds_at_16^3']:>7.2f}s  {v['mean_abs_err_latent']:.5f} / {v['max_abs_err_latent']:.5f}")
    te = report["tile_error_vs_whole_64"]
    print(f"\ntiling error vs whole decode at 64^3 (8^3 latent tiles): official max {te['official_tiles_max']:.4f} "
          f"mean {te['official_tiles_mean']:.4f}; seamless max {te['seamless_max']:.4f} mean {te['seamless_mean']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
