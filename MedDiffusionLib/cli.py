"""``meddiffusion`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__

    print(f"meddiffusion {__version__}")
    print(f"torch        {torch.__version__} (threads: {torch.get_num_threads()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            print(f"cuda:{i}       {torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    else:
        print("cuda         not available (generation runs on the CPU, which is slow for released models)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .io.checkpoints import CheckpointError, load_official_autoencoder, load_official_biflownet, read_checkpoint, save_model

    src = Path(args.checkpoint)
    out = Path(args.out_dir)
    ckpt = read_checkpoint(src)
    is_ae = isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)
    del ckpt
    try:
        model = load_official_autoencoder(src) if is_ae else load_official_biflownet(src)
    except CheckpointError:
        raise
    name = "autoencoder" if is_ae else "biflownet"
    path = save_model(model, out / name, meta={"converted_from": src.name})
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiffusion", description="3D MedDiffusion: generate and reconstruct "
                                     "CT/MR volumes with latent diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, CUDA devices and free GPU memory",
                       description="Print library/torch versions and the GPUs torch can use.")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("convert", help="convert an official checkpoint to safetensors + JSON",
                       description="Convert an official PatchVolume_*.ckpt or BiFlowNet_*.pt to our safetensors + JSON "
                                   "format (no pickled code is executed). Example: meddiffusion convert "
                                   "checkpoints/PatchVolume_8x_s2.ckpt models/official-8x")
    p.add_argument("checkpoint", help="official .ckpt / .pt file")
    p.add_argument("out_dir", help="folder for autoencoder.* or biflownet.*")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .io.checkpoints import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
