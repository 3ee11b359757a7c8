#!/bin/bash
# One short run on a lent GPU (about 8 minutes): the CUDA tests, the parity files on CUDA (float32
# with TF32 off, both kernel modes; fast with TF32 on, to show what TF32 costs), and the
# benchmark's GPU rows. Every part has its own time limit and writes to $OUT as it goes.
#   OUT=/tmp/gpu bash Testing/benchmarks/gpu_check.sh
# BENCH_ARGS adds benchmark options, e.g. BENCH_ARGS='--gpu-sides 512 --gpu-comps 8x --no-graph'.
set -u
OUT=${OUT:-/tmp/meddiffusion-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; nproc; free -g; } 2>&1 | tee "$OUT/env.txt"
timeout ${PYTEST_S:-100} $PY -m pytest -q -p no:cacheprovider Testing/tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt"
for args in "--mode reference" "--mode fast" "--mode fast --tf32"; do
  timeout ${PARITY_S:-60} $PY Testing/parity.py --device cuda $args Testing/data/reference/parity_*.pt
done > "$OUT/parity.txt" 2>&1
grep -v '^ok' "$OUT/parity.txt"
timeout ${BENCH_S:-300} $PY Testing/benchmarks/benchmark.py --device cuda --gpu-only --no-compile \
  --graph-steps ${GRAPH_STEPS:-200} ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
