"""``meddiffusion generate-dataset``: the sub-command (:func:`add_parser`) and its handler (:func:`run`).

A manifest (or ``--from-labels FOLDER --controlnet NAME``) -> a folder of synthetic, marked volumes
(:mod:`MedDiffusionLib.dataset`). Bad input raises :class:`~MedDiffusionLib.errors.UserError`
before anything is written (``meddiffusion``'s ``main``: one line, exit 2). Exit 0 when every case
is finished, 1 when a case failed (the summary names it and why), 130 on Ctrl-C (finished cases
stay; the same command continues). Under ``torchrun --nproc_per_node N -m MedDiffusionLib.cli
generate-dataset ...`` case i runs on rank ``i % N``; the ranks meet at a gloo barrier and rank 0
writes ``dataset.json`` / ``datalist.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .dataset import Runner

EXAMPLES = """examples:
  meddiffusion generate-dataset pairs.jsonl --out Dataset501_SynthChest     # pairs: nnU-Net v2 raw layout
  meddiffusion generate-dataset cases.csv --out synth --layout flat --seed 100
  meddiffusion generate-dataset --from-labels masks/ --controlnet chest-ct-mini-labels --out Dataset502_Pairs
  torchrun --nproc_per_node 4 -m MedDiffusionLib.cli generate-dataset cases.jsonl --out Dataset501_SynthChest

manifest: JSON lines, or CSV with the same columns; one row per case:
  {"id": "c1", "class": 1, "size": [64, 64, 64], "spacing": [4.8, 4.8, 4.3], "seed": 7}
  {"id": "p1", "labels": "masks/p1.nii.gz", "controlnet": "chest-ct-mini-labels"}   # image + mask pair
  columns: id (default case_<row:04d>), class, size (64x64x64 in CSV), spacing, seed (default --seed + row
  number, rows counted from 1), model, sampler, steps, labels (relative to the manifest), controlnet.
A rerun of the same command skips finished cases and redoes partial ones."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``generate-dataset`` to the ``meddiffusion`` sub-commands; its handler is ``args.func``."""
    p = sub.add_parser("generate-dataset", help="a manifest -> a synthetic training dataset (nnU-Net v2 / MONAI)",
                       description="Generate one synthetic, provenance-marked volume per manifest row (image+mask "
                                   "pairs with a labels ControlNet) into an nnU-Net v2 raw folder or a flat one.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", nargs="?", help="JSON lines (.jsonl) or CSV (.csv), one row per case")
    p.add_argument("--out", required=True, help="the dataset folder (new, empty, or this dataset's from an earlier run)")
    p.add_argument("--from-labels", metavar="FOLDER", help="one pair per label map of FOLDER (instead of a manifest)")
    p.add_argument("--controlnet", help="the labels ControlNet for --from-labels")
    p.add_argument("--layout", choices=("auto", "nnunet", "flat"), default="auto",
                   help="nnunet: imagesTr/labelsTr/dataset.json (image+mask pairs: nnU-Net trains on pairs); flat: one "
                        "folder; auto (default): nnunet for pairs, flat for images only. Both get datalist.json")
    p.add_argument("--name", help="the dataset's name (default: the --out folder's name)")
    p.add_argument("--seed", type=int, default=0, help="base seed: a row without a seed gets this + its row number")
    p.add_argument("--model", help="the model of rows that name none (default chest-ct-mini)")
    p.add_argument("--sampler", help="sampler of rows that name none (ddpm, ddim, dpm++)")
    p.add_argument("--steps", type=int, help="sampler steps of rows that name none")
    p.add_argument("--device", default=None, help="auto (default: cuda:LOCAL_RANK when CUDA, else cpu), cpu, cuda:N")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="images-only rows that differ only in the seed run up to N at a time as one job (faster; each "
                        "volume keeps its own seed, but a batch's voxels differ from one-case runs: the VQ decoder "
                        "turns float-level differences into other codes). Default 1: a case is exactly what "
                        "`meddiffusion generate --seed S` makes. Fixed in the plan, so any number of workers gives "
                        "the same voxels (with the same device and threads per process)")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: CPU cores // processes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("scale-out (one of them; or run the command under torchrun)")
    g.add_argument("--server", metavar="URL[,URL...]",
                   help="send the cases to these job services (`meddiffusion serve`), a comma list; two jobs in "
                        "flight per server (each server runs one at a time per device), files are written here")
    g.add_argument("--token", help="the services' token (default: $MEDDIFFUSION_TOKEN)")
    g.add_argument("--ca-file", metavar="PEM", help="certificate authority file for https:// servers")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the cases on Ray: a running cluster's ADDRESS (host:port, ray://host:10001 or auto), or "
                        "without one a Ray instance started here; one model replica per GPU (pip install "
                        "meddiffusion[ray])")
    g.add_argument("--workers", type=int, help="--ray: model replicas (default: one per GPU of the cluster; on CPUs, "
                                               "cluster CPUs // --threads)")
    g.add_argument("--retries", type=int, default=2, help="--ray / --server: times a failed case is tried again "
                                                          "(default 2; a refused request is not retried)")
    p.set_defaults(func=run)
    return p


def _device(arg: str | None, local_rank: int) -> str:
    if arg not in (None, "auto"):
        return arg
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    from . import dataset as ds

    if (args.manifest is None) == (args.from_labels is None):
        raise UserError("give a manifest or --from-labels FOLDER (one of them)")
    if args.from_labels is not None and not args.controlnet:
        raise UserError("--from-labels needs --controlnet NAME (a labels ControlNet)")
    if args.manifest is not None and args.controlnet:
        raise UserError("--controlnet goes with --from-labels; a manifest names its ControlNet per row")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be positive")
    if args.server and args.ray:
        raise UserError("--server and --ray are two ways to run the cases: choose one")
    if args.server and (args.workers is not None or args.threads is not None):
        raise UserError("--workers and --threads size Ray workers and local processes; a server runs with its own "
                        "threads (`meddiffusion serve` under OMP_NUM_THREADS)")
    if args.workers is not None and not args.ray:
        raise UserError("--workers goes with --ray (torchrun's --nproc_per_node sets the local processes)")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be positive")
    if args.retries < 0 or args.retries > 10:
        raise UserError("--retries must be from 0 to 10")
    remote = bool(args.server or args.ray)
    rank, world, local_rank = ds.dist_env()
    if remote and world > 1:
        raise UserError("--server / --ray send the cases out from one process: do not run them under torchrun")
    # remote workers choose their own device (auto: their GPU, else their CPU) unless --device says
    device = (args.device or "auto") if remote else _device(args.device, local_rank)
    if args.manifest is not None:
        rows, base = ds.read_manifest(args.manifest), Path(args.manifest).resolve().parent
    else:
        rows, base = ds.rows_from_labels(args.from_labels, args.controlnet), Path(".")
    plan = ds.plan_dataset(rows, args.out, base=base, name=args.name, layout=args.layout, seed=args.seed,
                           model=args.model, sampler=args.sampler, steps=args.steps, device=device,
                           batch=args.batch)
    runner = _runner(args, device) if remote else None
    import torch

    threads = None if remote else args.threads or (max(1, _cores() // world) if world > 1 else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    group = _init_group(world)
    try:
        summary = ds.run_dataset(plan, rank=rank, world_size=world, progress=not args.quiet, runner=runner,
                                 barrier=(lambda: torch.distributed.barrier()) if group else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished cases are kept in {plan.out}; run the same command again to continue",
              file=sys.stderr)
        return 130
    finally:
        if threads:
            torch.set_num_threads(before)
        if group:
            torch.distributed.destroy_process_group()
        if hasattr(runner, "close"):  # a Ray instance the command started (also when no case was left to run)
            runner.close()
    who = f"rank {rank}: " if world > 1 else ""
    for line in summary.lines():
        print(who + line, file=sys.stderr)
    if rank == 0:
        if summary.dataset_written:
            print(f"dataset: {plan.out} ({len(plan.cases)} cases, layout {plan.layout})", file=sys.stderr)
        else:
            print("dataset files not written: not every case is finished; run the same command again",
                  file=sys.stderr)
    return 1 if summary.failed else 0


def _runner(args: argparse.Namespace, device: str) -> "Runner":
    """The runner of ``--server`` or ``--ray``; both check that their workers answer before
    anything is written (a bad address is one line, exit 2)."""
    if args.server:
        from .dataset_remote import server_runner

        return server_runner(args.server, args.token or os.environ.get("MEDDIFFUSION_TOKEN"), ca_file=args.ca_file,
                             retries=args.retries, device=args.device)
    from .dataset_ray import ray_runner

    return ray_runner(args.ray, workers=args.workers, threads=args.threads, retries=args.retries, device=device)


def _init_group(world: int) -> bool:
    """Under torchrun (WORLD_SIZE > 1 and MASTER_ADDR set): a gloo process group, for the barrier
    before rank 0 writes the dataset files. A long timeout: ranks finish their cases at different times."""
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    import datetime

    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return True


__all__ = ["add_parser", "run"]
