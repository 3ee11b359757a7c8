#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the CPU build of
# PyTorch, the MedDiffusion library (editable) and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: this version's CPU build is what CI uses; a looser spec could pull a CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test,evaluate,nnunet-check,ray]"
# nnU-Net v2, for the test that runs its own dataset integrity check on a generated dataset: only
# what nnunetv2.experiment_planning.verify_dataset_integrity imports. nnunetv2 and its two DKFZ
# helpers go in without their dependencies (their full set pulls timm and torchvision, and with them
# another, CUDA, torch); the plain packages those modules import come with the "nnunet-check" extra above.
.venv/bin/python -m pip install --quiet --no-deps "nnunetv2>=2.8,<3" "acvl-utils>=0.2.6,<0.3" \
    "batchgenerators>=0.25.1,<0.26"
# Compile the bundled model's noise network ahead of time for its default size (one-time, about a
# minute; kept in ~/.cache/meddiffusion/compiled and reused). Generation works without it, only
# slower, so a failure here (no C++ compiler, say) is a warning. MEDDIFFUSION_NO_COMPILE=1 skips it.
if [ "${MEDDIFFUSION_NO_COMPILE:-0}" = "0" ]; then
    .venv/bin/meddiffusion compile --device cpu >/dev/null \
        || echo "warning: could not compile the bundled model ahead of time; generation runs uncompiled" >&2
fi
