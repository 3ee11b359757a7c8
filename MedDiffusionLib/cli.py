"""``meddiffusion`` command line: generate volumes, manage weights, convert checkpoints."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXAMPLES_GENERATE = """examples:
  meddiffusion generate --out sample.nii.gz                      # bundled demo model, CPU is fine
  meddiffusion generate --model official-8x --class 1 --size 256 256 256 --spacing 1.25 1.25 1.25 --out chest.nii.gz
  meddiffusion generate --model official-4x --class "MR T1" --sampler ddim --steps 100 --num-volumes 4 --out t1.nrrd
  meddiffusion generate --weights ~/Downloads/meddiffusion --class 0 --hu-window -1000 1500 --out head.nii.gz
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registry model id (see `meddiffusion models list`); default: the bundled model")
    p.add_argument("--weights", help="folder with weights downloaded by hand (official PatchVolume_*.ckpt + "
                                     "BiFlowNet_*.pt, or converted autoencoder/biflownet .safetensors)")
    p.add_argument("--offline", action="store_true", help="never contact the hub; use cached files only "
                                                          "(same as HF_HUB_OFFLINE=1)")


def _add_speed_args(p: argparse.ArgumentParser, compile_option: bool = True) -> None:
    p.add_argument("--reference", action="store_true",
                   help="run the plain reference kernels the parity tests pin (default: fast kernels with the same "
                        "float32 results to ~1e-5, seamless memory-aware decoding)")
    if compile_option:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile BiFlowNet before sampling (one-time cost, about 1.5 min on a small CPU; pays "
                            "off for long samplers such as DDPM 1000; falls back to eager if compiling fails)")


def _outputs(out: str, n: int) -> list[Path]:
    from .data.volumes import SUFFIXES

    path = Path(out)
    if n == 1:
        return [path]
    name = path.name
    suffix = next((s for s in SUFFIXES if name.lower().endswith(s)), path.suffix)
    stem = name[: len(name) - len(suffix)]
    return [path.with_name(f"{stem}_{i}{suffix}") for i in range(n)]


def _cmd_generate(args: argparse.Namespace) -> int:
    from .data.volumes import check_writable, write_volume
    from .registry import get_model, parse_class

    if args.num_volumes < 1:
        raise ValueError(f"--num-volumes must be positive, got {args.num_volumes}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    outs = _outputs(args.out, args.num_volumes)
    for o in outs:
        check_writable(o, args.overwrite)
    entry = get_model(args.model) if (args.model or not args.weights) else None
    cls = parse_class(args.class_ if args.class_ is not None else entry.raw["defaults"]["class"] if entry else 1, entry)
    hu_window = args.hu_window
    if args.hu and hu_window is None:
        info = entry.class_info(cls) if entry else {}
        if "hu_window" not in info:
            raise ValueError("this model has no suggested HU window for that class; give one with --hu-window LO HI")
        hu_window = info["hu_window"]
    if hu_window is not None:
        from .registry import class_names
        if not class_names()[cls].startswith("CT"):
            raise ValueError(f"--hu-window applies to CT classes only; class {cls} is {class_names()[cls]}")
        if hu_window[1] <= hu_window[0]:
            raise ValueError(f"--hu-window needs LO < HI, got {hu_window}")

    import torch

    from .pipelines.generation import GenerationPipeline, legal_size, resolve_device

    device = resolve_device(args.device)
    if entry is not None and args.size is not None:
        legal_size(args.size, entry.compression)
    t0 = time.time()
    mode = "reference" if args.reference else "fast"
    pipe = GenerationPipeline.from_pretrained(args.model, args.weights, device=str(device),
                                              local_files_only=True if args.offline else None, precision=args.precision,
                                              mode=mode, compile=args.compile,
                                              memory_limit_bytes=None if args.max_memory_gb is None
                                              else args.max_memory_gb * 2 ** 30)
    size = args.size or (pipe.entry.default_size(cls)[0] if pipe.entry else None)
    if size is None:
        raise ValueError("--size X Y Z is required with --weights")
    legal_size(size, pipe.compression)
    sampler = args.sampler or (pipe.entry.raw["defaults"]["sampler"] if pipe.entry else "ddpm")
    steps = args.steps if sampler != "ddpm" else 1000
    if sampler != "ddpm" and steps is None:
        defaults = pipe.entry.raw["defaults"] if pipe.entry else {}
        steps = defaults["steps"] if defaults.get("sampler") == sampler else (100 if sampler == "ddim" else 20)
    if sampler == "ddpm" and args.steps not in (None, 1000):
        raise ValueError("DDPM always runs 1000 steps; use --sampler ddim or dpm++ with --steps N for fewer")
    est = pipe.estimate(size, steps, args.num_volumes)
    if device.type == "cpu":
        print(f"warning: running on the CPU; expected {est.text('cpu')}", file=sys.stderr)
    elif not args.quiet:
        print(f"expected {est.text(str(device))}", file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, unit="step", desc=f"sampling ({sampler})", disable=args.quiet)

    def progress(i: int, n: int) -> None:
        bar.update(i - bar.n)

    try:
        results = pipe.generate(cls, size, args.spacing, args.seed, sampler, steps if sampler != "ddpm" else None,
                                args.num_volumes, progress, tiling=args.tiling)
    except torch.cuda.OutOfMemoryError:
        raise MemoryError(f"the GPU ran out of memory for {'x'.join(map(str, size))}; try a smaller --size, fewer "
                          "--num-volumes, or --device cpu") from None
    finally:
        bar.close()
    for res, out in zip(results, outs):
        write_volume(res.volume(hu_window), out, args.overwrite)
        print(f"wrote {out}  ({'x'.join(map(str, size))} voxels, spacing {tuple(round(s, 3) for s in res.spacing_xyz)} "
              f"mm, class {cls}, seed {args.seed}, {'HU' if hu_window else 'model units [-1, 1]'})")
    print(f"done in {time.time() - t0:.1f} s on {device}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from .registry import models
    from .weights import status

    for m in models():
        st = status(m)
        states = {v["state"] for v in st.values()}
        state = "bundled" if states == {"bundled"} else "downloaded" if states == {"cached"} else \
            "partly downloaded" if "cached" in states else "not downloaded"
        sizes = [v["size"] for v in st.values() if v["size"]]
        size = f"{sum(sizes) / 2**20:.1f} MiB" if sizes else "size unknown"
        print(f"{m.id:<16} {state:<18} {size:<14} {m.raw['compression']}  {m.raw['title']}")
        classes = ", ".join(f"{c['index']} {c['name']}" for c in m.raw["classes"])
        print(f"{'':<16} classes: {classes}")
        print(f"{'':<16} licence: {m.raw['license']}")
    return 0


def _cmd_models_download(args: argparse.Namespace) -> int:
    from .registry import get_model
    from .weights import download_file

    entry = get_model(args.id)
    if entry.bundled:
        print(f"{entry.id} is bundled with MedDiffusion; nothing to download")
        return 0
    for spec in entry.files:
        path = download_file(entry, spec, local_files_only=False if not args.offline else True)
        print(f"{spec['role']:<12} {path}")
    return 0


def _cmd_models_verify(args: argparse.Namespace) -> int:
    from .registry import get_model
    from .weights import verify

    rows = verify(get_model(args.id))
    for role, state, detail in rows:
        print(f"{role:<12} {state:<10} {detail}")
    return 0 if all(s in ("ok", "unverified") for _, s, _ in rows) else 1


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__

    print(f"meddiffusion {__version__}")
    print(f"torch        {torch.__version__} (CPU threads: {torch.get_num_threads()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            print(f"cuda:{i}       {torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    else:
        print("cuda         not available: generation runs on the CPU (fine for the bundled model, hours for the "
              "released 256^3 models)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .io.checkpoints import load_official, save_model

    src = Path(args.checkpoint)
    family, model = load_official(src)  # the file is unpickled once
    path = save_model(model, Path(args.out_dir) / ("autoencoder" if family == "patchvolume" else "biflownet"),
                      meta={"converted_from": src.name})
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _progress_bar(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="step", desc=desc, disable=quiet)

    def update(i: int, n: int) -> None:
        bar.update(i - bar.n)

    return bar, update


def _run_controlled(args: argparse.Namespace, kind: str) -> int:
    from .data.volumes import check_writable, read_volume, write_volume
    from .pipelines.conditioned import ControlledPipeline, reconstruct_sparse_view, synthesize_from_labels

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    check_writable(args.out, args.overwrite)
    vol = read_volume(args.input)
    pipe = ControlledPipeline.from_files(args.controlnet, args.model, args.weights, device=args.device,
                                         mode="reference" if args.reference else "fast")
    steps = args.steps if args.sampler != "ddpm" else 1000
    bar, update = _progress_bar(steps or 50, f"{kind} ({args.sampler})", args.quiet)
    try:
        run = synthesize_from_labels if kind == "synthesize" else reconstruct_sparse_view
        out = run(vol, pipe, seed=args.seed, sampler=args.sampler, steps=steps if args.sampler != "ddpm" else None,
                  progress=update)
    finally:
        bar.close()
    write_volume(out, args.out, args.overwrite)
    print(f"wrote {args.out} ({'x'.join(map(str, out.shape))} voxels, on the input's grid)")
    return 0


def _cmd_synthesize(args: argparse.Namespace) -> int:
    return _run_controlled(args, "synthesize")


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    return _run_controlled(args, "reconstruct")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .data.volumes import check_writable, read_volume, write_volume
    from .pipelines.conditioned import simulate_sparse_view

    if args.views < 2:
        raise ValueError(f"--views must be at least 2, got {args.views}")
    check_writable(args.out, args.overwrite)
    out = simulate_sparse_view(read_volume(args.input), views=args.views, bins=args.bins, device=args.device)
    write_volume(out, args.out, args.overwrite)
    print(f"wrote {args.out}: FBP of {args.views} fan-beam views (HU)")
    return 0


def _cmd_train_controlnet(args: argparse.Namespace) -> int:
    from .training.controlnet import ControlNetTrainer, TrainConfig, find_pairs

    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be positive")
    pairs = find_pairs(args.pairs)
    val = find_pairs(args.val_pairs) if args.val_pairs else None
    cfg = TrainConfig(task=args.task, out=args.out, model=args.model, weights=args.weights, class_index=args.class_index,
                      spacing_xyz=args.spacing, label_values=args.label_values, label_mode=args.label_mode,
                      hu_window=args.hu_window, steps=args.steps, batch=args.batch, lr=args.lr,
                      optimizer=args.optimizer, loss=args.loss, ema_decay=args.ema_decay, seed=args.seed,
                      ckpt_every=args.ckpt_every, val_every=args.val_every, augment=args.augment,
                      stop_after=args.stop_after)
    trainer = ControlNetTrainer(cfg, log=lambda m: print(m, file=sys.stderr))
    result = trainer.fit(pairs, val, resume=not args.restart)
    if trainer.rank == 0:
        print(f"trained {result['steps']} steps in {result['seconds']:.0f} s; final loss {result['final_loss']}; "
              f"weights: {Path(args.out) / 'controlnet.safetensors'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiffusion", description="3D MedDiffusion: generate CT/MR volumes with "
                                     "latent diffusion, manage model weights.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate synthetic volumes", epilog=EXAMPLES_GENERATE,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Generate class-conditional volumes. Output is float32 in model units [-1, 1] "
                                   "(per-volume normalised intensities, as the authors' model produces), or HU with "
                                   "--hu-window/--hu (our convention). Geometry: array axes i, j, k = X, Y, Z with a "
                                   "diagonal affine of the spacing (RAS), like the official writer.")
    _add_model_args(p)
    p.add_argument("--class", dest="class_", help="class index 0-6 or a name such as 'chest' or 'MR T1'")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="output voxels (default: the model's first trained size)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="voxel size in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"],
                   help="ddpm: 1000 ancestral steps (official default); ddim: --steps deterministic steps (official "
                        "variant); dpm++: DPM-Solver++(2M), --steps deterministic steps (ours; 20-50 are enough)")
    p.add_argument("--steps", type=int, help="steps for ddim (default 100) or dpm++ (default 20)")
    p.add_argument("--tiling", choices=["auto", "official", "seamless"], default="auto",
                   help="decoding of large volumes. official: the authors' rule (whole up to 32^3 (8x) / 64^3 (4x) "
                        "latent voxels, else non-overlapping tiles with seams); seamless: whole when it fits in free "
                        "memory, else overlapping blended tiles sized to the memory; auto (default): seamless, or "
                        "official with --reference")
    p.add_argument("--num-volumes", type=int, default=1, help="volumes generated together in one batch")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    _add_speed_args(p)
    p.add_argument("--max-memory-gb", type=float, help="memory (RAM or GPU) the decoder may plan to use; larger "
                                                       "volumes are decoded in seamless tiles that fit")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="network precision: fp32 = the reference; bf16/fp16 = autocast (faster on GPUs with tensor "
                        "cores; codes and samplers stay fp32)")
    p.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="CT only: map model units to HU as LO + (v+1)/2*(HI-LO) (our convention, not the authors')")
    p.add_argument("--hu", action="store_true", help="CT only: use the model's suggested HU window")
    p.add_argument("--out", required=True, help="output file (.nii.gz, .nii, .nrrd, .mha); with --num-volumes N, "
                                                "files are numbered _0 ... _N-1")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    pm = sub.add_parser("models", help="list, download and verify model weights",
                        description="Model weights: list what exists, download to the Hugging Face cache, verify checksums.")
    msub = pm.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("list", help="models, download state, sizes, licences", description="List registry models.")
    q.set_defaults(func=_cmd_models_list)
    q = msub.add_parser("download", help="download a model's files", description="Download a model's files into the "
                        "Hugging Face cache (HF_HOME). Example: meddiffusion models download official-8x")
    q.add_argument("id")
    q.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    q.set_defaults(func=_cmd_models_download)
    q = msub.add_parser("verify", help="check downloaded files against their sha256",
                        description="Check a model's cached files against the registry's sha256 (exit 1 on mismatch "
                                    "or missing files). Example: meddiffusion models verify official-8x")
    q.add_argument("id")
    q.set_defaults(func=_cmd_models_verify)

    for name, kind, helptext in (("synthesize", "labels", "synthesize CT from a label map (ControlNet)"),
                                 ("reconstruct", "sparse-view", "reconstruct a sparse-view FBP volume (ControlNet)")):
        p = sub.add_parser(name, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{helptext[0].upper()}{helptext[1:]}. The input is resampled to the model's "
                                       "working grid and the result comes back on the input's grid.",
                           epilog=("example:\n  meddiffusion synthesize labels.nii.gz --controlnet "
                                   "chest-ct-mini-labels --out synthetic_ct.nii.gz" if name == "synthesize" else
                                   "example:\n  meddiffusion reconstruct fbp40.nii.gz --controlnet "
                                   "chest-ct-mini-sparse-view --out recon.nii.gz"))
        p.add_argument("input", help="label map (integer values)" if name == "synthesize" else "FBP volume in HU")
        p.add_argument("--controlnet", required=True, help="ControlNet .safetensors (with its .json), or a bundled "
                                                           "name: chest-ct-mini-labels, chest-ct-mini-sparse-view")
        _add_model_args(p)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default="ddim")
        p.add_argument("--steps", type=int, default=50, help="ddim or dpm++ steps (default 50)")
        p.add_argument("--device", default="auto")
        _add_speed_args(p, compile_option=False)
        p.add_argument("--out", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(func=_cmd_synthesize if name == "synthesize" else _cmd_reconstruct)

    p = sub.add_parser("simulate-sparse-view", help="full CT -> FBP of a sparse fan-beam scan",
                       description="Simulate a sparse-view CT: forward-project each axial slice of a CT (HU) over "
                                   "--views fan-beam views (flat detector, source-isocentre 500 mm, source-detector "
                                   "1000 mm) and reconstruct it with FBP. Example: meddiffusion simulate-sparse-view "
                                   "ct.nii.gz --views 40 --out fbp40.nii.gz")
    p.add_argument("input")
    p.add_argument("--views", type=int, default=40)
    p.add_argument("--bins", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("train-controlnet", help="fine-tune a ControlNet on (condition, target) pairs",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a ControlNet on a frozen base model. PAIRS is a folder with condition/ "
                                   "and target/ sub-folders (same file names) or a CSV with condition,target columns. "
                                   "Several GPUs or machines: run it under torchrun.",
                       epilog="examples:\n  meddiffusion train-controlnet pairs/ --task sparse-view --out runs/sv "
                              "--steps 5000\n  torchrun --nproc_per_node 4 -m MedDiffusionLib.cli train-controlnet "
                              "pairs/ --task labels --label-values 0 1 2 3 4 --model official-8x --out runs/seg")
    p.add_argument("pairs")
    p.add_argument("--task", required=True, choices=["sparse-view", "labels", "mri"])
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt (resume) and controlnet.safetensors")
    _add_model_args(p)
    p.add_argument("--val-pairs", help="held-out pairs (same layout) for the validation loss")
    p.add_argument("--class", dest="class_index", type=int)
    p.add_argument("--spacing", type=float, nargs=3, help="working spacing (default: the base model's trained spacing)")
    p.add_argument("--label-values", type=int, nargs="+", help="labels task: label values, background first")
    p.add_argument("--label-mode", choices=["nearest", "area"], default="nearest")
    p.add_argument("--hu-window", type=float, nargs=2, help="CT: HU window that maps to model units [-1, 1]")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4, help="global batch, split over processes")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=["adam", "adamw"], default="adamw")
    p.add_argument("--loss", choices=["l1", "l2"], default="l1")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--augment", type=int, default=0, help="random affine copies per training pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train_controlnet)

    p = sub.add_parser("convert", help="convert an official checkpoint to safetensors + JSON",
                       description="Convert an official PatchVolume_*.ckpt or BiFlowNet_*.pt to our safetensors + JSON "
                                   "format without executing pickled code. Example: meddiffusion convert "
                                   "checkpoints/PatchVolume_8x_s2.ckpt models/official-8x")
    p.add_argument("checkpoint", help="official .ckpt / .pt file")
    p.add_argument("out_dir", help="folder for autoencoder.* or biflownet.*")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("info", help="versions, CUDA devices and free GPU memory",
                       description="Print library/torch versions and the GPUs torch can use.")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "offline", False):
        import os
        os.environ["HF_HUB_OFFLINE"] = "1"
    from .io.checkpoints import CheckpointError
    from .registry import RegistryError
    from .weights import WeightsError

    try:
        return int(args.func(args) or 0)
    except (CheckpointError, RegistryError, WeightsError, ValueError, FileExistsError, FileNotFoundError,
            PermissionError, MemoryError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopped cleanly, no output file was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
