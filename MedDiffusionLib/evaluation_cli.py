"""``meddiffusion evaluate``: the sub-command (:func:`add_parser`) and its handler (:func:`run`).

Two files: a paired evaluation (:func:`MedDiffusionLib.evaluation.paired_metrics`); two folders:
a set evaluation (:func:`MedDiffusionLib.evaluation.set_metrics`). The handler prints a table and
writes ``--csv`` / ``--json``; bad input raises :class:`~MedDiffusionLib.errors.UserError` (or
``FileNotFoundError``), which ``meddiffusion``'s ``main`` prints as one line with exit status 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

EXAMPLES = """examples:
  meddiffusion evaluate recon.nii.gz ct.nii.gz                        # PSNR/SSIM/MAE in four HU windows
  meddiffusion evaluate recon.nii.gz ct.nii.gz --window paper -1000 1000 --window liver -40 160 --csv m.csv
  meddiffusion evaluate seg_pred.nrrd seg_ref.nrrd --labels --resample  # Dice per label
  meddiffusion evaluate generated/ real/ --json sets.json                # FRD, MMD, MS-SSIM diversity
  meddiffusion evaluate generated/ real/ --no-frd --feature-network resnet10 --feature-weights r10.safetensors
  meddiffusion models features add medicalnet-r10 --network resnet10 --weights resnet_10.pth   # once
  meddiffusion evaluate generated/ real/ --feature-weights medicalnet-r10   # sha256-checked, network recorded

paired (two files): PSNR (dB), SSIM and MAE (HU) with both volumes clipped to each HU window
  (default: paper -1000..1000, soft_tissue -160..240, lung -1350..150, bone -500..1300; --window
  replaces them); the reference must be CT in HU. --labels: Dice per label value and their mean.
  The volumes must share a grid unless --resample (prediction resampled onto the reference grid).
sets (two folders, generated then real; at most 64 volumes each, in name order):
  frd      Frechet Radiomics Distance (frd_score v1, log d^2; whole-volume masks); lower is closer
  mmd      MONAI's unbiased MMD^2 with a linear kernel, per voxel; about 0 when alike, lower is closer
  ms_ssim  mean pairwise MS-SSIM within each set: diversity; lower is more diverse (compare the two)
  fd_NAME  Frechet distance on a 3-D feature network (--feature-weights: weights added with `meddiffusion
           models features add`, or a .safetensors file with --feature-network)
  MMD, MS-SSIM and the feature network see each volume resampled to --grid (default 64^3)."""


def add_parser(sub: argparse._SubParsersAction,
               server_args: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """Add ``evaluate`` to the ``meddiffusion`` sub-commands; its handler is ``args.func``.
    ``server_args(parser)`` adds the front end's ``--server`` / ``--token`` / ``--ca-file``
    options (paired evaluation as a job on a service)."""
    p = sub.add_parser("evaluate", help="metrics of a prediction against its reference, or of a generated set "
                                        "against a real one",
                       description="Evaluate offline. Two files: paired metrics of PRED against REF.\nTwo folders: "
                                   "distribution metrics of the generated volumes in PRED against the real\nones in REF.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred", metavar="PRED", help="prediction volume, or folder of generated volumes")
    p.add_argument("ref", metavar="REF", help="reference volume, or folder of real volumes")
    p.add_argument("--labels", action="store_true", help="paired: the volumes are label maps (Dice per label)")
    p.add_argument("--resample", action="store_true", help="paired: resample the prediction onto the reference grid "
                                                           "when the grids differ (linear; nearest for --labels)")
    p.add_argument("--window", nargs=3, action="append", metavar=("NAME", "LO", "HI"),
                   help="paired: a named HU window (repeat for more; replaces the default four)")
    p.add_argument("--frd", action=argparse.BooleanOptionalAction, default=True, help="sets: Frechet Radiomics Distance")
    p.add_argument("--frd-features", choices=("paper", "original"), default="paper",
                   help="sets: radiomics of the original, LoG and wavelet images (paper, default) or of the original "
                        "image only (about 15x faster)")
    p.add_argument("--mmd", action=argparse.BooleanOptionalAction, default=True, help="sets: MMD")
    p.add_argument("--ms-ssim", action=argparse.BooleanOptionalAction, default=True, help="sets: MS-SSIM diversity")
    p.add_argument("--grid", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="sets: evaluation grid for MMD, MS-SSIM and the feature network (default 64 64 64)")
    p.add_argument("--feature-network", metavar="NAME", help="sets: Frechet distance on this feature network "
                                                             "(built in: resnet10, MedicalNet-style; not needed with "
                                                             "added --feature-weights, which record theirs)")
    p.add_argument("--feature-weights", metavar="NAME|FILE",
                   help="sets: the feature network's weights: a NAME added with `meddiffusion models features add` "
                        "(checked against its recorded sha256) or a .safetensors file")
    p.add_argument("--max-files", type=int, metavar="N", help="sets: volumes read per folder (default and limit 64)")
    p.add_argument("--csv", metavar="FILE", help="also write the rows as CSV")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing --csv / --json files")
    if server_args is not None:
        server_args(p)
    p.set_defaults(func=run)
    return p


def _windows(items: list[list[str]] | None) -> dict[str, tuple[float, float]] | None:
    if not items:
        return None
    out: dict[str, tuple[float, float]] = {}
    for name, lo, hi in items:
        try:
            bounds = (float(lo), float(hi))
        except ValueError:
            raise UserError(f"--window {name} {lo} {hi}: LO and HI must be numbers (HU)") from None
        if name in out:
            raise UserError(f"--window {name}: given twice")
        out[name] = bounds
    return out


def _kind(path: str, what: str) -> str:
    p = Path(path)
    if p.is_dir():
        return "folder"
    if p.is_file():
        return "file"
    raise FileNotFoundError(f"{path}: no such file or folder ({what})")


def _refuse_options(args: argparse.Namespace, mode: str) -> None:
    """One line for an option that does not apply to ``mode``."""
    if mode == "paired":
        given = [flag for flag, on in (("--no-frd", not args.frd), ("--no-mmd", not args.mmd),
                                       ("--no-ms-ssim", not args.ms_ssim), ("--grid", args.grid is not None),
                                       ("--frd-features", args.frd_features != "paper"),
                                       ("--feature-network", args.feature_network is not None),
                                       ("--feature-weights", args.feature_weights is not None),
                                       ("--max-files", args.max_files is not None)) if on]
        if given:
            raise UserError(f"{given[0]} applies to two folders (set evaluation); PRED and REF are files")
        if args.labels and args.window:
            raise UserError("--window applies to images; --labels compares label maps with Dice")
        if getattr(args, "server", None) and args.window:
            raise UserError("--window: a service evaluates in the standard windows (paper, soft_tissue, lung, bone); "
                            "run without --server for your own")
    else:
        given = [flag for flag, on in (("--labels", args.labels), ("--resample", args.resample),
                                       ("--window", bool(args.window))) if on]
        if given:
            raise UserError(f"{given[0]} applies to two files (paired evaluation); PRED and REF are folders")
        if getattr(args, "server", None):
            raise UserError("--server: a service evaluates pairs of volumes (two files); set metrics of two folders run "
                            "here")


def _describe(report: Any, args: argparse.Namespace) -> list[str]:
    """Header lines above the table."""
    ctx = report.context
    if report.kind == "paired":
        g = ctx["reference_grid"]
        lines = [f"paired evaluation: {args.pred} against {args.ref} "
                 f"({'x'.join(map(str, g['shape']))} voxels, spacing {'x'.join(f'{s:.4g}' for s in g['spacing'])} mm)"]
        if ctx.get("resampled"):
            pg = ctx["prediction_grid"]
            lines.append(f"the prediction ({'x'.join(map(str, pg['shape']))} voxels, spacing "
                         f"{'x'.join(f'{s:.4g}' for s in pg['spacing'])} mm) was resampled onto the reference grid "
                         f"({ctx['interpolation']}; it covers {100 * ctx['coverage']:.1f}% of it)")
        return lines
    gen, real = ctx["generated"], ctx["real"]
    lines = [f"set evaluation: {gen['used']} generated volumes ({args.pred}) against {real['used']} real volumes "
             f"({args.ref})",
             f"evaluation grid {'x'.join(map(str, ctx['grid_xyz']))} (MMD, MS-SSIM, feature network); intensities: "
             f"{ctx['intensity']}"]
    lines += [f"note: {w}" for w in ctx.get("warnings", [])]
    return lines


def _paired_on_service(args: argparse.Namespace) -> Any:
    """Paired evaluation as an ``evaluate`` job on ``--server`` (the two files uploaded; the job is
    deleted there afterwards, also on Ctrl-C: :meth:`~MedDiffusionLib.client.Client.job`)."""
    from .client import Client
    from .evaluation.report import EvaluationReport

    client = Client(args.server, args.token, ca_file=getattr(args, "ca_file", None))
    spec = {"task": "evaluate", "params": {"labels": bool(args.labels), "resample": bool(args.resample)},
            "inputs": {"prediction": Path(args.pred).name, "reference": Path(args.ref).name}}
    with client.job(spec, {"prediction": args.pred, "reference": args.ref}) as (_, st):
        return EvaluationReport.from_dict(st["results"][0]["meta"]["metrics"])


def run(args: argparse.Namespace) -> int:
    """The ``evaluate`` handler: paired or set evaluation, a table on stdout, optional CSV / JSON."""
    from .evaluation.report import check_report_path

    kinds = (_kind(args.pred, "PRED"), _kind(args.ref, "REF"))
    if kinds[0] != kinds[1]:
        raise UserError(f"PRED is a {kinds[0]} and REF a {kinds[1]}: give two files (paired evaluation) or two "
                        "folders (generated set, then real set)")
    mode = "paired" if kinds[0] == "file" else "sets"
    _refuse_options(args, mode)
    outputs = [(check_report_path(path, args.overwrite), kind) for path, kind in ((args.csv, "csv"), (args.json, "json"))
               if path]
    if len({p.resolve() for p, _ in outputs}) < len(outputs):
        raise UserError("--csv and --json name the same file")
    if mode == "paired" and getattr(args, "server", None):
        report = _paired_on_service(args)
    elif mode == "paired":
        from .data.volumes import read_volume
        from .evaluation.paired import MAX_VOLUME_VOXELS, paired_metrics

        windows = _windows(args.window)
        pred = read_volume(args.pred, max_voxels=MAX_VOLUME_VOXELS)
        ref = read_volume(args.ref, max_voxels=MAX_VOLUME_VOXELS)
        report = paired_metrics(pred, ref, windows=windows, labels=args.labels, resample=args.resample)
    else:
        from .evaluation.sets import MAX_SET_FILES, set_metrics

        metrics = [m for m, on in (("frd", args.frd), ("mmd", args.mmd), ("ms_ssim", args.ms_ssim)) if on]
        if not metrics and not (args.feature_network or args.feature_weights):
            raise UserError("every set metric is off (--no-frd --no-mmd --no-ms-ssim) and no --feature-weights given")
        # --feature-weights without --feature-network: set_metrics takes an added NAME's network, refuses a file
        if args.feature_network and not args.feature_weights:
            raise UserError(f"--feature-network {args.feature_network} needs --feature-weights NAME (added with "
                            "`meddiffusion models features add`) or FILE (.safetensors)")
        max_files = MAX_SET_FILES if args.max_files is None else args.max_files
        if not 2 <= max_files <= MAX_SET_FILES:
            raise UserError(f"--max-files must be between 2 and {MAX_SET_FILES}")
        report = set_metrics(args.pred, args.ref, metrics=metrics, feature_network=args.feature_network,
                             feature_weights=args.feature_weights, grid=args.grid, frd_features=args.frd_features,
                             max_files=max_files)
    for line in _describe(report, args):
        print(line)
    print(report.table())
    from .results import write_all

    # all or none: a failed second report takes the first one with it
    write_all([p for p, _ in outputs], [lambda p=p, k=k: (report.to_csv if k == "csv" else report.to_json)(p)
                                        for p, k in outputs])
    for path, _ in outputs:
        print(f"wrote {path}")
    return 0


__all__ = ["add_parser", "run", "EXAMPLES"]
