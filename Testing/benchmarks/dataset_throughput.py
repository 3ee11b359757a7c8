"""Throughput of `meddiffusion generate-dataset`, every way of running it side by side in one run.

The same manifest (N images-only cases of the bundled model) is generated into fresh folders:
one process with all the CPU threads (the baseline); torchrun with W processes (cases sharded by
rank) and cores // W threads each; one process with `--batch 4` (four cases per job); W local
job services (`--server`, cores // W threads each; their start-up is counted); Ray with W
workers (`--ray`, a local instance started by the command: its start-up is counted; skipped
without Ray). Printed: seconds, cases per hour and the ratio to the baseline of each.

    .venv/bin/python Testing/benchmarks/dataset_throughput.py [--cases 16] [--steps 200] [--workers 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200, help="DDIM steps per case")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from MedDiffusionLib.client import LocalServer, new_token

    cores = os.cpu_count() or 1
    each = max(1, cores // args.workers)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    common = ["--sampler", "ddim", "--steps", str(args.steps), "--device", args.device, "--quiet"]
    cli = [sys.executable, "-m", "MedDiffusionLib.cli", "generate-dataset"]
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="meddiffusion-throughput-") as tmp:
        man = Path(tmp) / "cases.jsonl"
        man.write_text("".join(json.dumps({"id": f"c{i:03d}"}) + "\n" for i in range(args.cases)))

        def out(name: str) -> list[str]:
            return [str(man), "--out", str(Path(tmp) / name)]

        rows.append((f"1 process, {cores} threads", run([*cli, *out("one"), "--threads", str(cores), *common], env)))
        rows.append((f"torchrun {args.workers} x {each} threads",
                     run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(args.workers), "-m", "MedDiffusionLib.cli", "generate-dataset", *out("ranks"),
                          "--threads", str(each), *common], env)))
        rows.append((f"1 process, {cores} threads, --batch 4",
                     run([*cli, *out("batch"), "--threads", str(cores), "--batch", "4", *common], env)))
        token = new_token()
        servers = [LocalServer(token=token, env={"OMP_NUM_THREADS": str(each)}) for _ in range(args.workers)]
        t0 = time.monotonic()
        try:
            for srv in servers:
                srv.start(timeout=120)
            run([*cli, *out("served"), "--server", ",".join(s.url for s in servers), "--token", token,
                 *[a for a in common if a != args.device and a != "--device"]], env)
        finally:
            for srv in servers:
                srv.stop()
        rows.append((f"{args.workers} servers x {each} threads", time.monotonic() - t0))
        if importlib.util.find_spec("ray") is not None:
            rows.append((f"Ray {args.workers} workers x {each} threads",
                         run([*cli, *out("ray"), "--ray", "--workers", str(args.workers), "--threads", str(each),
                              *common], env)))
    base = args.cases / rows[0][1] * 3600
    print(f"{args.cases} cases of the bundled model (64^3, DDIM {args.steps}) on {args.device}, {cores} cores")
    print(f"{'how':<34} {'seconds':>8} {'cases/hour':>11} {'ratio':>6}")
    for name, sec in rows:
        rate = args.cases / sec * 3600
        print(f"{name:<34} {sec:>8.1f} {rate:>11.0f} {rate / base:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
