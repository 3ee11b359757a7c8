#!/usr/bin/env python
"""Job-service overhead, side by side in one run (also called by benchmark.py's --service rows).

    python Testing/benchmarks/service_benchmark.py [--steps 50] [--repeats 3] [--json out.json]

* a 64^3 generation (bundled model, DDIM --steps) in-process (warm model cache) vs the same job
  through a local `meddiffusion serve` on 127.0.0.1 (warm), medians of --repeats;
* loopback throughput of a 256^3 float32 volume (64 MiB): upload (submit = HTTP upload + the
  server reading the NRRD) and download of a result of the same size, against writing and reading
  the same NRRD file locally.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rows(steps: int = 50, repeats: int = 3) -> list[dict]:
    import numpy as np

    from MedDiffusionLib.client import LocalServer
    from MedDiffusionLib.data.volumes import Volume, read_volume, write_volume
    from MedDiffusionLib.jobs import ModelCache, run_job

    out = []
    spec = {"task": "generate", "params": {"sampler": "ddim", "steps": steps}}
    cache = ModelCache()
    run_job(spec, cache=cache)  # warm
    t_local = _median_time(lambda: run_job(spec, cache=cache), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = LocalServer(log_file=tmp / "serve.log")
        t0 = time.perf_counter()
        server.start()
        t_start = time.perf_counter() - t0
        client = server.client(timeout=300)

        def remote() -> None:
            st = client.submit(spec)
            client.wait(st["id"], poll=0.05)
            client.download(st["id"], "result_0.nrrd", tmp / "r.nrrd")
            client.delete(st["id"])

        remote()  # warm (loads the model in the server)
        t_remote = _median_time(remote, repeats)
        out.append({"case": f"64^3 generate, DDIM {steps} (warm model)", "in_process_s": t_local,
                    "service_s": t_remote, "ratio": t_remote / t_local, "overhead_s": t_remote - t_local,
                    "server_start_s": t_start})

        rng = np.random.default_rng(0)
        vol = Volume(rng.normal(0, 300, (256, 256, 256)).astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
        src = tmp / "in.nrrd"
        t_write = _median_time(lambda: write_volume(vol, src, overwrite=True), 1)
        t_read = _median_time(lambda: read_volume(src), 1)
        mib = vol.array.nbytes / 2 ** 20
        # simulate-sparse-view with 2 views and few bins: the job itself is cheap, the transfers are not
        job = {"task": "simulate-sparse-view", "params": {"views": 2, "bins": 32}, "inputs": {"input": "in.nrrd"}}
        t0 = time.perf_counter()
        st = client.submit(job, {"input": src})
        t_up = time.perf_counter() - t0
        st = client.wait(st["id"], poll=0.05, timeout=600)
        t0 = time.perf_counter()
        client.download(st["id"], st["results"][0]["name"], tmp / "down.nrrd")
        t_down = time.perf_counter() - t0
        server.stop()
        file_mib = src.stat().st_size / 2 ** 20
        out.append({"case": f"256^3 float32 upload ({mib:.0f} MiB, {file_mib:.0f} MiB NRRD)", "local_file_s": t_read,
                    "service_s": t_up, "ratio": t_up / t_read, "MiB_per_s": mib / t_up,
                    "note": "upload + server-side read vs reading the file here"})
        out.append({"case": f"256^3 float32 download ({mib:.0f} MiB)", "local_file_s": t_write, "service_s": t_down,
                    "ratio": t_down / t_write, "MiB_per_s": mib / t_down,
                    "note": "download of a written result vs writing the file here"})
    return out


def print_rows(items: list[dict]) -> None:
    print("\njob service overhead (same machine, loopback)")
    print(f"{'case':<58} {'here (s)':>9} {'service (s)':>12} {'ratio':>7}  extra")
    for r in items:
        here = r.get("in_process_s", r.get("local_file_s"))
        extra = f"+{r['overhead_s']:.2f} s/job, server start {r['server_start_s']:.1f} s" if "overhead_s" in r \
            else f"{r['MiB_per_s']:.0f} MiB/s ({r['note']})"
        print(f"{r['case']:<58} {here:>9.2f} {r['service_s']:>12.2f} {r['ratio']:>6.2f}x  {extra}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    items = rows(args.steps, args.repeats)
    print_rows(items)
    if args.json:
        Path(args.json).write_text(json.dumps(items, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
