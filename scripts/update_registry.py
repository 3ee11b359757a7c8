#!/usr/bin/env python
"""Write the sha256 and size of every bundled weights file into the model registry.

Usage: python scripts/update_registry.py [--cpu-seconds MODEL_ID SECONDS]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffusionLib.registry import REGISTRY_FILE, RESOURCES  # noqa: E402
from MedDiffusionLib.weights import sha256_file  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-seconds", nargs=2, action="append", default=[], metavar=("MODEL_ID", "SECONDS"))
    args = ap.parse_args()
    reg = json.loads(REGISTRY_FILE.read_text())
    for model in reg["models"]:
        for f in model["files"]:
            if "path" in f:
                p = (RESOURCES / f["path"]).with_suffix(".safetensors")
                f["sha256"], f["size"] = sha256_file(p), p.stat().st_size
                print(f"{model['id']:<16} {f['role']:<12} {f['size']:>10} {f['sha256']}")
        for mid, secs in args.cpu_seconds:
            if model["id"] == mid:
                model["resources"]["cpu_seconds"] = round(float(secs))
    REGISTRY_FILE.write_text(json.dumps(reg, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
