"""``meddiffusion`` command line: generate volumes, manage weights, convert checkpoints."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .defaults import CONTROLLED_DEFAULTS, SAMPLER_STEPS, SAMPLERS
from .errors import UserError

if TYPE_CHECKING:
    from .client import Client
    from .jobspec import JobSpec

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
                        "float32 results to ~1e-5, exact memory-aware decoding)")
    if compile_option:
        p.add_argument("--compile", action="store_true",
                       help="compile BiFlowNet ahead of time for this size first, if not compiled yet (one-time, about "
                            "1.5 min on a small CPU; kept in the cache and used by later runs; see `meddiffusion "
                            "compile`; falls back to the uncompiled network if compiling fails)")


def _outputs(out: str, names: list[str], fmt: str | None = None) -> list[Path]:
    """Output paths of a job's results (:func:`~MedDiffusionLib.results.result_names`): ``out`` for
    one result; else ``out`` numbered per result (``a_0.nii.gz`` ... for generated volumes,
    ``a_sample_0.nii.gz`` ... ``a_mean.nii.gz``, ``a_std.nii.gz`` for N samples). DICOM
    (``fmt="dicom"``): ``out`` is a folder; several results go into sub-folders of it named so."""
    from .data.volumes import SUFFIXES

    path = Path(out)
    if len(names) == 1:
        return [path]
    tags = []
    for name in names:
        tag = name.split(".", 1)[0]
        tags.append(tag[len("result_"):] if tag.startswith("result_") else tag)
    if fmt == "dicom":
        return [path / tag for tag in tags]
    name = path.name
    suffix = next((s for s in SUFFIXES if name.lower().endswith(s)), path.suffix)
    stem = name[: len(name) - len(suffix)]
    return [path.with_name(f"{stem}_{tag}{suffix}") for tag in tags]


def _check_outputs(outs: list[Path], overwrite: bool, fmt: str | None) -> None:
    """Refuse an existing output (or a DICOM folder that is not empty) unless ``overwrite``,
    before any work starts."""
    from .data.volumes import check_writable

    for o in outs:
        if fmt == "dicom":
            from .io.dicom import check_series_folder

            if o.parent.is_dir():
                check_series_folder(o, overwrite)
            elif o.parent.exists() or not o.parent.parent.is_dir():  # several series: OUT is made for them
                raise FileNotFoundError(f"{o.parent}: not a folder, and it cannot be made here")
        else:
            check_writable(o, overwrite)


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="URL", help="run on a MedDiffusion job service (`meddiffusion serve`) instead of in "
                                                   "this process, e.g. http://gpu-box:8765; same outputs")
    p.add_argument("--token", help="the service's token (default: $MEDDIFFUSION_TOKEN; the variable keeps it out of "
                                   "the process list)")
    p.add_argument("--ca-file", metavar="PEM", help="certificate authority file to trust for an https:// server "
                                                    "(a lab's own CA or a self-signed server certificate)")


def _add_spill_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spill-dir", metavar="FOLDER",
                   help="where the exact decode keeps its stage maps when they do not fit in memory (memory-mapped "
                        "files, removed as they are made; default: MEDDIFFUSION_CACHE/spill, i.e. "
                        "~/.cache/meddiffusion/spill); local runs only: a server uses its own")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """--force, --out, --overwrite, --quiet and the server options of a ControlNet or simulation task."""
    p.add_argument("--force", action="store_true", help="run even when the estimated memory exceeds what is available")
    p.add_argument("--out", required=True, help=OUT_HELP)
    _add_format_arg(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    _add_server_args(p)


OUT_HELP = ("output file (.nii.gz, .nii, .nrrd, .mha; NIfTI gets a .json provenance sidecar), or with --format "
            "dicom a folder for the DICOM series")


def _add_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["dicom"], help="dicom: write a DICOM series (ImageType DERIVED\\SECONDARY, "
                                                       "new UIDs, marked synthetic, provenance in a private block) "
                                                       "into the --out folder")


FLAGS = {"class": "--class", "hu_window": "--hu-window LO HI", "hu": "--hu / --model-units",
         "size": "--size X Y Z", "spacing": "--spacing X Y Z", "force": "--force"}


def _flag(field: str) -> str:
    """The command-line option of a job request field (errors name fields; the CLI words them as flags)."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def _params(args: argparse.Namespace, *names: str) -> dict:
    """Job parameters from the options that are set (unset ones are resolved by jobs.resolve)."""
    out = {}
    for name in names:
        value = getattr(args, name.replace("-", "_") if name != "class" else "class_", None)
        if value is not None and (value is not False or name == "hu"):  # hu=False: model units, asked for
            out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _spec(args: argparse.Namespace, task: str, params: dict, out: str) -> "JobSpec":
    from .data.volumes import SUFFIXES
    from .jobspec import JobSpec

    if getattr(args, "reference", False):
        params["mode"] = "reference"
    name = out.lower()
    fmt = ".nrrd" if getattr(args, "format", None) == "dicom" else next((s for s in SUFFIXES if name.endswith(s)), ".nrrd")
    if getattr(args, "server", None) and getattr(args, "weights", None):
        raise UserError("--weights is a local folder: a server uses the models it has (choose one with --model)")
    if getattr(args, "server", None) and getattr(args, "spill_dir", None):
        raise UserError("--spill-dir is a local folder: a server spills to its own (`meddiffusion serve --spill-dir`)")
    inputs = {"input": args.input} if hasattr(args, "input") else {}
    return JobSpec(task, getattr(args, "model", None), getattr(args, "weights", None),
                   getattr(args, "controlnet", None), params, inputs, fmt)


def _prepare(args: argparse.Namespace, task: str, params: dict, out: str) -> "JobSpec":
    """The job spec; resolved here for a local run, by the server (its models, its ControlNets) with
    ``--server``."""
    from .jobspec import resolve

    spec = _spec(args, task, params, out)
    return spec if getattr(args, "server", None) else resolve(spec)


def _execute(args: argparse.Namespace, spec: "JobSpec", outputs: list[Path], desc: str) -> tuple[list[dict], dict]:
    """Run a job here or on ``--server`` with a progress bar and write ``outputs`` (all or none).
    Returns the results' metadata and the resolved parameters."""
    from tqdm.auto import tqdm

    quiet = getattr(args, "quiet", False)
    bar = tqdm(total=max(1, spec.params.get("steps") or 1), unit="step", desc=desc, disable=quiet)
    printed: set[str] = set()

    def show(step: int, total: int, notices: list[str]) -> None:
        for n in notices:
            if n not in printed:
                printed.add(n)
                bar.write(n, file=sys.stderr) if not quiet else print(n, file=sys.stderr)
        if total and total != bar.total:
            bar.total = total
            bar.refresh()
        if step > bar.n:
            bar.update(step - bar.n)

    try:
        if getattr(args, "server", None):
            return _execute_remote(args, spec, outputs, show)
        from .jobs import run_job
        from .results import write_results

        res = run_job(spec, progress=lambda ev: show(ev.step, ev.total, [ev.notice] if ev.notice else []),
                      spill_dir=getattr(args, "spill_dir", None))
        bar.close()
        write_results(res, outputs, getattr(args, "overwrite", False), getattr(args, "format", None))
        return [r.meta for r in res.results], spec.params
    finally:
        bar.close()


def _execute_remote(args: argparse.Namespace, spec: "JobSpec", outputs: list[Path], show) -> tuple[list[dict], dict]:
    from .client import Client
    from .results import output_folders, write_all

    client = Client(args.server, args.token, ca_file=getattr(args, "ca_file", None))
    fmt = getattr(args, "format", None)
    with client.job(spec.to_dict(), dict(spec.inputs),
                    progress=lambda s: show(s.get("step", 0), s.get("total", 0), s.get("warnings", []))) as (job_id, st):
        _check_outputs(outputs, getattr(args, "overwrite", False), fmt)
        with output_folders(outputs, fmt):
            write_all(outputs, [lambda r=r, o=o: _download_marked(client, job_id, r, o, args)
                                for r, o in zip(st["results"], outputs)])
        return [r["meta"] for r in st["results"]], st["spec"]["params"]


def _download_marked(client: "Client", job_id: str, result: dict, out: Path, args: argparse.Namespace) -> None:
    """Download one result; a NIfTI one gets its provenance sidecar here (the service's file
    carries the ``SYNTHETIC`` descrip; NRRD and MHA carry every field in the file); ``--format
    dicom``: the NRRD is converted here into a DICOM series with the result's provenance."""
    prov = (result.get("meta") or {}).get("provenance")
    if getattr(args, "format", None) == "dicom":
        from .remote import download_result
        from .results import write_result

        write_result(download_result(client, job_id, result), out, args.overwrite, "dicom")
        return
    client.download(job_id, result["name"], out)
    if prov and out.name.lower().endswith((".nii", ".nii.gz")):
        from .provenance import write_sidecar

        try:
            write_sidecar(out, prov)
        except BaseException:
            out.unlink(missing_ok=True)
            raise


def _cmd_generate(args: argparse.Namespace) -> int:
    from .results import result_names

    params = _params(args, "class", "size", "spacing", "seed", "sampler", "steps", "num_volumes", "hu", "hu_window",
                     "device", "precision", "tiling", "max_memory_gb", "compile", "force")
    spec = _prepare(args, "generate", params, args.out)
    outs = _outputs(args.out, result_names(spec), args.format)
    _check_outputs(outs, args.overwrite, args.format)
    t0 = time.time()
    metas, p = _execute(args, spec, outs, f"sampling ({spec.params.get('sampler') or 'default sampler'})")
    units = "HU" if p["hu_window"] else "model units [-1, 1]"
    for meta, out in zip(metas, outs):
        decode = meta.get("decode") or {}
        note = "" if decode.get("exact", True) else f", approximate decode ({decode.get('method')} tiles)"
        print(f"wrote {out}  ({'x'.join(map(str, p['size']))} voxels, spacing {tuple(round(s, 3) for s in p['spacing'])} "
              f"mm, class {p['class']}, seed {p['seed']}, {units}{note})")
    print(f"done in {time.time() - t0:.1f} s" + (f" on {args.server}" if args.server else ""))
    return 0


def _run_controlled(args: argparse.Namespace, kind: str) -> int:
    from .results import result_names

    spec = _prepare(args, kind, _params(args, "seed", "sampler", "steps", "device", "force", "num_samples"), args.out)
    outs = _outputs(args.out, result_names(spec), args.format)
    _check_outputs(outs, args.overwrite, args.format)
    _execute(args, spec, outs, f"{kind} ({spec.params.get('sampler') or CONTROLLED_DEFAULTS['sampler']})")
    if len(outs) == 1:
        print(f"wrote {args.out} (on the input's grid)")
    else:
        print(f"wrote {len(outs) - 2} samples, their mean and standard deviation (on the input's grid): "
              f"{outs[0]} ... {outs[-3]}, {outs[-2]}, {outs[-1]}")
    return 0


def _cmd_synthesize(args: argparse.Namespace) -> int:
    return _run_controlled(args, "synthesize")


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    return _run_controlled(args, "reconstruct")


def _cmd_simulate(args: argparse.Namespace) -> int:
    spec = _prepare(args, "simulate-sparse-view", _params(args, "views", "bins", "device", "force"), args.out)
    _check_outputs([Path(args.out)], args.overwrite, args.format)
    _, p = _execute(args, spec, [Path(args.out)], "simulating")
    print(f"wrote {args.out}: FBP of {p['views']} fan-beam views (HU)")
    return 0


def _serve_token(args: argparse.Namespace) -> tuple[str | None, str]:
    """(the single token or None with --tokens, where it came from)."""
    import os

    from .client import TOKEN_ENV

    if args.tokens:
        if args.token_file:
            raise UserError("give --tokens (users) or --token-file (one token), not both")
        return None, f"users from {args.tokens}"
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise UserError(f"{args.token_file}: cannot read the token file ({exc.strerror})") from exc
        if not token:
            raise UserError(f"{args.token_file}: the token file is empty")
        return token, f"from {args.token_file}"
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), f"from ${TOKEN_ENV}"
    from .client import new_token

    token = new_token()
    print(f"token: {token}\n(clients pass it with --token or ${TOKEN_ENV}; it is not shown again)", flush=True)
    return token, "generated"


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    if getattr(args, "serve_command", None) == "add-user":
        from .auth import add_user

        token = add_user(args.user_tokens, args.name, args.admin)
        print(f"added {'admin' if args.admin else 'user'} {args.name} to {args.user_tokens}; their token (shown "
              f"once, only its hash is stored):\n{token}")
        return 0
    from .auth import WEAK_TOKEN_CHARS
    from .schema import Caps
    from .server import Limits, serve

    token, source = _serve_token(args)
    if token is not None and len(token) < WEAK_TOKEN_CHARS:
        print(f"warning: the token has {len(token)} characters; anyone who can guess it can run jobs and read "
              f"results. Use at least {WEAK_TOKEN_CHARS} random characters (e.g. `python -c \"import secrets; "
              "print(secrets.token_urlsafe(32))\"`).", file=sys.stderr)
    if min(args.max_upload_mb, args.max_queue, args.result_ttl, args.header_timeout, args.body_timeout,
           args.auth_failures) <= 0:
        raise UserError("--max-upload-mb, --max-queue, --result-ttl, --auth-failures and the time-outs must be "
                        "positive")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key, args.tokens):
        if path and not Path(path).is_file():
            raise UserError(f"{path}: file not found")
    if args.tokens:
        from .auth import Users

        Users(tokens_file=args.tokens)  # a bad tokens file stops here, with its line number
    try:
        caps = Caps(max_voxels=args.max_voxels, max_input_voxels=args.max_input_voxels,
                    max_batch_voxels=args.max_batch_voxels, max_volumes=args.max_volumes,
                    max_samples=args.max_samples, max_steps=args.max_steps,
                    max_views=args.max_views, max_bins=args.max_bins,
                    job_time_limit_s=args.job_time_limit if args.job_time_limit > 0 else None)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad server limit: {exc}") from exc
    scheme = "https" if args.tls_cert else "http"
    if args.host not in ("127.0.0.1", "localhost", "::1") and scheme == "http":
        print(f"warning: serving plain HTTP on {args.host}: tokens and patients' volumes cross the network "
              "unencrypted. Use --tls-cert/--tls-key, a TLS reverse proxy, or a trusted network only.",
              file=sys.stderr)
    for d in args.controlnet_dir:
        if not Path(d).is_dir():
            raise UserError(f"--controlnet-dir {d}: not a folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"MedDiffusion job service on {scheme}://{args.host}:{args.port} ({source})", flush=True)
    serve(args.host, args.port, token, args.work_dir,
          Limits(int(args.max_upload_mb * 2 ** 20), args.max_queue, args.result_ttl, caps,
                 header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                 auth_failures=args.auth_failures, spill_dir=args.spill_dir,
                 max_spill_bytes=args.max_spill_gb * 1e9 if args.max_spill_gb > 0 else None,
                 controlnet_dirs=tuple(str(Path(d).resolve()) for d in args.controlnet_dir)),
          args.exit_with_parent, tokens_file=args.tokens, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from .registry import models, registry_problems
    from .weights import status

    for problem in registry_problems():
        print(f"warning: {problem}", file=sys.stderr)
    for m in models():
        st = status(m)
        states = {v["state"] for v in st.values()}
        state = "bundled" if states == {"bundled"} else "downloaded" if states == {"cached"} else \
            "partly downloaded" if "cached" in states else "not downloaded"
        sizes = [v["size"] for v in st.values() if v["size"]]
        size = f"{sum(sizes) / 2**20:.1f} MiB" if sizes else "size unknown"
        print(f"{m.id:<16} {state:<18} {size:<14} {m.compression}x  {m.title}{'  [user model]' if m.user else ''}")
        classes = ", ".join(f"{c['index']} {c['name']}" for c in m.classes)
        print(f"{'':<16} classes: {classes}")
        print(f"{'':<16} licence: {m.license}")
        if any(v.get("imported") for v in st.values()):
            print(f"{'':<16} weights: imported into {Path(next(iter(st.values()))['path']).parent}")
    return 0


def _progress_line(line: str, fraction: float) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_models_import(args: argparse.Namespace) -> int:
    from .weights import import_weights, imported_dir

    entry = import_weights(args.folder, args.as_id, progress=_progress_line)
    print(f"{entry.id}: imported into {imported_dir(entry.id)}; `meddiffusion models list` shows it as downloaded "
          f"and --model {entry.id} uses it")
    return 0


def _cmd_models_add(args: argparse.Namespace) -> int:
    from .weights import add_user_model, imported_dir

    entry = add_user_model(args.id, weights=args.weights, repo=args.repo, title=args.title, license=args.license,
                           compression=args.compression, revision=args.revision, files=args.files,
                           classes=args.classes, size=args.size, spacing=args.spacing, progress=_progress_line)
    where = f"weights imported into {imported_dir(entry.id)}" if args.weights else \
        f"download it with `meddiffusion models download {entry.id}`"
    print(f"{entry.id}: added to the user registry ({entry.compression}x, classes "
          f"{', '.join(str(i) for i in entry.class_indices)}); {where}")
    return 0


def _cmd_models_remove(args: argparse.Namespace) -> int:
    from .registry import builtin_ids
    from .weights import remove_imported, remove_user_model

    if args.id in builtin_ids() and args.files:  # a built-in entry stays; only the files imported for it go
        gone = remove_imported(args.id)
        print(f"{args.id} is built in and stays registered; " + (f"removed its imported files {gone[0]}" if gone
                                                                   else "it has no imported files"))
        return 0
    gone = remove_user_model(args.id, files=args.files)
    print(f"{args.id}: removed from the user registry" + (f"; deleted {', '.join(map(str, gone))}" if gone else
                                                           "" if args.files else
                                                           " (its imported files, if any, stay until --files)"))
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


def _cmd_compile(args: argparse.Namespace) -> int:
    """Build (or find) the ahead-of-time compiled BiFlowNet for one generation size."""
    from .jobspec import resolve
    from .devices import resolve_device
    from .pipelines.generation import GenerationPipeline

    spec = resolve(_spec(args, "generate", _params(args, "size", "num_volumes", "device"), "x.nii.gz"))
    p = spec.params
    pipe = GenerationPipeline.from_pretrained(spec.model, spec.weights, device=str(resolve_device(p["device"], warn=False)),
                                              mode="fast")
    t0 = time.time()
    package = pipe.precompiled_network(p["size"], p["num_volumes"], build=True)
    if package is None:
        print("could not compile here; generation runs the uncompiled network (same results)", file=sys.stderr)
        return 1
    print(f"{package.path}  ({'x'.join(map(str, p['size']))} voxels, {p['num_volumes']} per batch, "
          f"{time.time() - t0:.1f} s)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    if getattr(args, "file", None):
        from .provenance import describe
        from .reproduce import provenance_of

        prov = provenance_of(args.file)
        if prov is None:
            print(f"{args.file}: no MedDiffusion provenance (not marked synthetic by MedDiffusion)")
            return 1
        print(describe(prov))
        return 0
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


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .reproduce import reproduce

    bars: list = []  # made at the first event: a refusal before the run prints one line only

    def show(ev) -> None:
        if not bars:
            bars.append(tqdm(total=max(1, ev.total), unit="step", desc="re-running", disable=args.quiet))
        bar = bars[0]
        if ev.notice and not args.quiet:
            bar.write(ev.notice, file=sys.stderr)
        if ev.total and ev.total != bar.total:
            bar.total = ev.total
        if ev.step > bar.n:
            bar.update(ev.step - bar.n)

    try:
        client = None
        if args.server:
            from .client import Client

            client = Client(args.server, args.token, ca_file=args.ca_file)
        report = reproduce(args.file, {"input": args.input} if args.input else None, args.device, progress=show,
                           keep=args.out, client=client)
    finally:
        for bar in bars:
            bar.close()
    print(report.text())
    return 0 if report.equal else 1


def _cmd_export(args: argparse.Namespace) -> int:
    """A marked MedDiffusion result file -> a marked DICOM series (its provenance carried over)."""
    from .reproduce import provenance_of, read_result
    from .results import ResultVolume, write_result

    if args.format != "dicom":
        raise UserError("--format: export writes dicom")
    prov = provenance_of(args.file)
    if not prov or not prov.get("synthetic") or prov.get("generator") != "MedDiffusion":
        raise UserError(f"{args.file}: no MedDiffusion provenance; export converts MedDiffusion results only (a NIfTI "
                        "needs its .json sidecar)")
    _check_outputs([Path(args.out)], args.overwrite, "dicom")
    vol = read_result(args.file)  # a volume file, or a DICOM series folder
    out = write_result(ResultVolume(Path(args.file).name, vol, {"provenance": prov}), args.out, args.overwrite, "dicom")
    print(f"wrote {out}: DICOM series of {vol.shape[2]} slices, marked synthetic")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .io.checkpoints import load_official, save_model

    src = Path(args.checkpoint)
    family, model = load_official(src)  # the file is unpickled once
    path = save_model(model, Path(args.out_dir) / ("autoencoder" if family == "patchvolume" else "biflownet"),
                      meta={"converted_from": src.name})
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _cmd_train_controlnet(args: argparse.Namespace) -> int:
    from .training.controlnet import ControlNetTrainer, TrainConfig, find_pairs

    if args.steps < 1 or args.batch < 1:
        raise UserError("--steps and --batch must be positive")
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


def _command(sub: argparse._SubParsersAction, name: str, help: str, description: str,
             epilog: str | None = None) -> argparse.ArgumentParser:
    """A sub-command whose description and examples keep their line breaks."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiffusion", description="3D MedDiffusion: generate CT/MR volumes with "
                                     "latent diffusion, manage model weights.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate synthetic volumes", epilog=EXAMPLES_GENERATE,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Generate class-conditional volumes. CT classes are written in HU with the model's "
                                   "window for the class (our convention, recorded in the job metadata), other classes and "
                                   "--model-units in model units [-1, 1] (per-volume normalised intensities, as the "
                                   "authors' model produces); --hu-window LO HI sets the window. Geometry: array axes i, j, k = X, Y, Z with a "
                                   "diagonal affine of the spacing (RAS), like the official writer.")
    _add_model_args(p)
    p.add_argument("--class", dest="class_", help="class index 0-6 or a name such as 'chest' or 'MR T1'")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="output voxels (default: the model's first trained size)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="voxel size in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="ddpm: 1000 ancestral steps (official default); ddim: --steps deterministic steps (official "
                        "variant); dpm++: DPM-Solver++(2M), --steps deterministic steps (ours; 20-50 are enough)")
    p.add_argument("--steps", type=int, help=f"steps for ddim (default {SAMPLER_STEPS['ddim']}) or dpm++ (default "
                                             f"{SAMPLER_STEPS['dpm++']})")
    p.add_argument("--tiling", choices=["auto", "exact", "official", "seamless"], default="auto",
                   help="decoding of large volumes. exact: whole when it fits in free memory, else the decoder "
                        "streamed stage by stage in cubes (equal to the whole decode at any memory cap; stage maps in "
                        "GPU memory or RAM, else spilled to --spill-dir on disk); official: "
                        "the authors' rule (whole up to 32^3 (8x) / 64^3 (4x) latent voxels, else non-overlapping "
                        "tiles with seams); seamless: overlapping blended tiles sized to the memory (approximate); "
                        "auto (default): exact, or official with --reference")
    p.add_argument("--num-volumes", type=int, default=1, help="volumes generated together in one batch")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    _add_speed_args(p)
    p.add_argument("--max-memory-gb", type=float, help="memory (RAM or GPU) the decoder may plan to use; larger "
                                                       "volumes are decoded exactly in cubes that fit, their stage "
                                                       "maps spilled to disk when needed (see --spill-dir)")
    _add_spill_arg(p)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16", "fp16"], default="fp32",
                   help="network precision: fp32 = the reference (TF32 off on CUDA); tf32 = CUDA TF32 convolutions "
                        "and matmuls; bf16/fp16 = autocast (faster on GPUs with tensor cores; codes and samplers "
                        "stay fp32)")
    p.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="CT only: map model units to HU as LO + (v+1)/2*(HI-LO) (our convention, not the authors')")
    units = p.add_mutually_exclusive_group()
    units.add_argument("--hu", action="store_true", default=None,
                       help="CT only: use the model's suggested HU window (the default for CT classes whose model "
                            "publishes one)")
    units.add_argument("--model-units", dest="hu", action="store_false",
                       help="write model units [-1, 1] instead of HU")
    p.add_argument("--out", required=True, help=OUT_HELP + "; with --num-volumes N, files (DICOM: sub-folders) are "
                                                         "numbered _0 ... _N-1")
    _add_format_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="run even when the estimated memory exceeds what is available")
    _add_server_args(p)
    p.set_defaults(func=_cmd_generate)

    pm = sub.add_parser("models", help="list, download, import, add and verify model weights",
                        description="Model weights: list what exists, download to the Hugging Face cache, import files "
                                    "downloaded by hand, register your own models, verify checksums.")
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
    q = _command(msub, "import", help="import weights downloaded by hand (the authors' files or converted ones)",
                 description="Check a folder of weights (the authors' PatchVolume_*.ckpt + BiFlowNet_*.pt from their "
                             "Google Drive, or\nconverted autoencoder/biflownet .safetensors + .json), convert it into "
                             "MEDDIFFUSION_CACHE/models/ID/ and make\nthe registry model read \"downloaded\". Without "
                             "--as, the model the files fit is chosen (compression, architecture,\nchecksums). Nothing "
                             "is left behind on an error; an earlier import stays.",
                 epilog="examples:\n  meddiffusion models import ~/Downloads/3D-MedDiffusion --as official-8x\n"
                        "  meddiffusion models import ~/Downloads/patchvolume-8x")
    q.add_argument("folder", help="folder holding one autoencoder and one BiFlowNet file")
    q.add_argument("--as", dest="as_id", metavar="ID", help="registry model the files are for (default: the one they fit)")
    q.set_defaults(func=_cmd_models_import)
    q = _command(msub, "add", help="register your own model (user registry)",
                 description="Register a model of yours in the user registry (MEDDIFFUSION_CACHE/registry.json), merged "
                             "with the built-in\nregistry. --weights FOLDER imports its files now and reads compression, "
                             "architecture and classes\nfrom them; --repo OWNER/NAME points at a Hugging Face repo for "
                             "`models download`. Built-in ids\ncannot be replaced.",
                 epilog="examples:\n  meddiffusion models add my-ct --weights runs/my-ct --title \"My CT model\" "
                        "--size 256 256 256 --spacing 1 1 1\n"
                        "  meddiffusion models add lab-8x --repo lab/meddiffusion-8x --compression 8x "
                        "--files autoencoder.safetensors biflownet.safetensors")
    q.add_argument("id", help="new model id (lower-case letters, digits, '.', '-')")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", metavar="FOLDER", help="folder with the autoencoder and BiFlowNet files (imported now)")
    src.add_argument("--repo", metavar="HF_REPO", help="Hugging Face repo holding the files")
    q.add_argument("--title")
    q.add_argument("--license")
    q.add_argument("--compression", choices=["8x", "4x"], help="--repo: the autoencoder's compression (required)")
    q.add_argument("--revision", help="--repo: branch, tag or commit (default main)")
    q.add_argument("--files", nargs=2, metavar=("AUTOENCODER", "BIFLOWNET"),
                   help="--repo: file names in the repo (default: listed from the hub)")
    q.add_argument("--classes", nargs="+", type=int, metavar="INDEX",
                   help="class indices the model knows (default: all the network has; with --repo all seven)")
    q.add_argument("--size", nargs=3, type=int, metavar=("X", "Y", "Z"), help="trained size (default 256 256 256)")
    q.add_argument("--spacing", nargs=3, type=float, metavar=("X", "Y", "Z"), help="trained spacing in mm (default 1 1 1)")
    q.set_defaults(func=_cmd_models_add)
    q = _command(msub, "remove", help="remove a user model (built-in ones stay)",
                 description="Remove a model you added from the user registry; --files also deletes its imported files "
                             "(and hub\ndownloads no other model uses). For a built-in id, only --files is accepted: it "
                             "deletes the files\nimported for it and keeps the model.",
                 epilog="examples:\n  meddiffusion models remove my-ct --files\n  meddiffusion models remove official-8x "
                        "--files   # delete an import")
    q.add_argument("id")
    q.add_argument("--files", action="store_true", help="also delete the model's imported / downloaded files")
    q.set_defaults(func=_cmd_models_remove)
    from .feature_weights import add_parser as add_feature_weights_parser

    add_feature_weights_parser(msub)  # models features add / list / verify / remove (evaluate's feature networks)

    for name, kind, helptext in (("synthesize", "labels", "synthesize CT from a label map (ControlNet)"),
                                 ("reconstruct", "sparse-view", "reconstruct a sparse-view FBP volume or an under-sampled MRI (ControlNet; the "
                                                                 "ControlNet says which)")):
        p = sub.add_parser(name, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{helptext[0].upper()}{helptext[1:]}. The input is resampled to the model's "
                                       "working grid and the result comes back on the input's grid.",
                           epilog=("example:\n  meddiffusion synthesize labels.nii.gz --controlnet "
                                   "chest-ct-mini-labels --out synthetic_ct.nii.gz" if name == "synthesize" else
                                   "example:\n  meddiffusion reconstruct fbp40.nii.gz --controlnet "
                                   "chest-ct-mini-sparse-view --out recon.nii.gz"))
        p.add_argument("input", help="label map (integer values)" if name == "synthesize" else
                       "FBP volume in HU (sparse-view ControlNet) or zero-filled MRI magnitude (MRI ControlNet)")
        p.add_argument("--controlnet", required=True, help="ControlNet .safetensors (with its .json), a train-controlnet "
                                                           "run folder, or a bundled name: chest-ct-mini-labels, "
                                                           "chest-ct-mini-sparse-view")
        _add_model_args(p)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--sampler", choices=SAMPLERS, help=f"default {CONTROLLED_DEFAULTS['sampler']}")
        p.add_argument("--steps", type=int, help=f"ddim or dpm++ steps (default {CONTROLLED_DEFAULTS['steps']})")
        p.add_argument("--num-samples", type=int, metavar="N",
                       help="draw N samples (seeds from --seed on, in batches of up to 4) and also write their voxel-wise "
                            "mean and standard deviation: OUT_sample_0 ... OUT_sample_N-1, OUT_mean, OUT_std")
        p.add_argument("--device", default="auto")
        _add_speed_args(p, compile_option=False)
        _add_spill_arg(p)
        _add_output_args(p)
        p.set_defaults(func=_cmd_synthesize if name == "synthesize" else _cmd_reconstruct)

    p = sub.add_parser("simulate-sparse-view", help="full CT -> FBP of a sparse fan-beam scan",
                       description="Simulate a sparse-view CT: forward-project each axial slice of a CT (HU) over "
                                   "--views fan-beam views (flat detector, source-isocentre 500 mm, source-detector "
                                   "1000 mm) and reconstruct it with FBP. Example: meddiffusion simulate-sparse-view "
                                   "ct.nii.gz --views 40 --out fbp40.nii.gz")
    p.add_argument("input")
    p.add_argument("--views", type=int, default=40)
    p.add_argument("--bins", type=int, default=512)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    _add_output_args(p)
    p.set_defaults(func=_cmd_simulate)

    p = _command(sub, "train-controlnet", help="fine-tune a ControlNet on (condition, target) pairs",
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

    p = _command(sub, "serve", help="run the job service (for Slicer, the CLI's --server, or a lab GPU machine)",
                       description="Run the MedDiffusion job service: one job at a time per device (FIFO), models kept "
                                   "loaded between jobs. Every request needs the bearer token. Binds 127.0.0.1 unless "
                                   "--host says otherwise; on a network keep it trusted or behind a TLS reverse proxy.",
                       epilog="examples:\n  meddiffusion serve                                   # this computer only\n"
                              "  MEDDIFFUSION_TOKEN=$(cat ~/.md-token) meddiffusion serve --host 0.0.0.0 --port 8765\n"
                              "  meddiffusion serve add-user alice --tokens users.txt   # prints alice's token once\n"
                              "  meddiffusion serve --host 0.0.0.0 --tokens users.txt --tls-cert cert.pem --tls-key key.pem\n"
                              "  meddiffusion generate --server http://gpu-box:8765 --out sample.nii.gz")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 serves a network)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token-file", help="file holding the token (default: $MEDDIFFUSION_TOKEN, else a new random "
                                        "token printed once)")
    p.add_argument("--work-dir", help="folder for uploads and results (default: a temporary folder, removed at exit)")
    p.add_argument("--spill-dir", metavar="FOLDER",
                   help="where exact decodes keep their stage maps when they do not fit in memory (memory-mapped "
                        "files, removed as they are made; default: MEDDIFFUSION_CACHE/spill); clients cannot choose it")
    p.add_argument("--max-spill-gb", type=float, default=64,
                   help="stage maps one job may spill to disk (default 64; 0 = as much as the disk has free)")
    p.add_argument("--max-upload-mb", type=float, default=2048, help="largest upload accepted (default 2048)")
    p.add_argument("--max-queue", type=int, default=16, help="most jobs waiting (default 16)")
    p.add_argument("--result-ttl", type=float, default=3600, help="seconds finished jobs and results are kept")
    p.add_argument("--controlnet-dir", action="append", default=[], metavar="DIR",
                   help="folder of your own ControlNets (DIR/NAME/controlnet.safetensors + .json, as train-controlnet "
                        "writes them); clients choose them by NAME (repeatable)")
    p.add_argument("--tokens", metavar="FILE", help="users: one 'NAME ROLE sha256:HASH' line each (ROLE user or admin), "
                                                 "re-read when it changes; make lines with `meddiffusion serve add-user`")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain) file")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    from .schema import Caps

    d = Caps()
    p.add_argument("--max-voxels", type=int, default=d.max_voxels, help=f"largest output volume (or model working grid) in "
                                                                         f"voxels (default {d.max_voxels})")
    p.add_argument("--max-input-voxels", type=int, default=d.max_input_voxels,
                   help=f"largest input volume in voxels (default {d.max_input_voxels})")
    p.add_argument("--max-batch-voxels", type=int, default=d.max_batch_voxels,
                   help=f"most output voxels of one job, all volumes together (default {d.max_batch_voxels})")
    p.add_argument("--max-volumes", type=int, default=d.max_volumes, help=f"most volumes per job (default {d.max_volumes})")
    p.add_argument("--max-samples", type=int, default=d.max_samples,
                   help=f"most samples of one synthesize / reconstruct job (num_samples; default {d.max_samples})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"most sampler steps (default {d.max_steps})")
    p.add_argument("--max-views", type=int, default=d.max_views, help=f"most simulated views (default {d.max_views})")
    p.add_argument("--max-bins", type=int, default=d.max_bins, help=f"most detector bins (default {d.max_bins})")
    p.add_argument("--job-time-limit", type=float, default=d.job_time_limit_s or 0,
                   help=f"seconds a job may run before it is stopped; 0 = no limit (default {d.job_time_limit_s or 0:g})")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send a request's "
                                                                      "headers (default 10)")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds an upload may stall before it is "
                                                                    "dropped (default 60)")
    p.add_argument("--auth-failures", type=int, default=10, help="failed sign-ins per client address per minute "
                                                                  "before that address is locked out for the minute "
                                                                  "(default 10)")
    p.add_argument("--exit-with-parent", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_serve)
    ssub = p.add_subparsers(dest="serve_command", metavar="add-user")
    pa = ssub.add_parser("add-user", help="add a user with a new random token to a tokens file",
                         description="Append a user to the tokens file given to `meddiffusion serve --tokens`. The "
                                     "token is printed once; only its SHA-256 is stored. A running server picks the "
                                     "new user up within a second. Example: meddiffusion serve add-user alice "
                                     "--tokens /etc/meddiffusion/tokens")
    pa.add_argument("name", help="user name (letters, digits, _ . @ -)")
    pa.add_argument("--tokens", dest="user_tokens", metavar="FILE", required=True, help="the tokens file (created 0600)")
    pa.add_argument("--admin", action="store_true", help="an admin: lists every job, cancels or deletes any, unloads "
                                                         "models")

    p = _command(sub, "compile", "compile BiFlowNet ahead of time for one size (runs then skip ~1,500 "
                 "small operations per step)",
                 "Compile the model's noise network with torch.export + AOTInductor (weights frozen) for one "
                 "generation size and batch, and keep the package in $MEDDIFFUSION_CACHE/compiled. Later runs in "
                 "fast float32 mode with the same size, weights, device and torch build load it in milliseconds "
                 "(results equal to ~1e-5). One-time cost: about 1-2 minutes on a small CPU. scripts/setup.sh "
                 "runs it for the bundled model.")
    _add_model_args(p)
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="output voxels (default: the model's "
                                                                               "first trained size)")
    p.add_argument("--num-volumes", type=int, default=1, help="volumes per batch")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("export", help="a MedDiffusion result file -> a marked DICOM series",
                       description="Convert a MedDiffusion result (NRRD/MHA with its provenance fields, or NIfTI with "
                                   "its .json sidecar) into a DICOM series in the --out folder: ImageType "
                                   "DERIVED\\SECONDARY, new UIDs, marked synthetic, the provenance in a private block.",
                       epilog="example:\n  meddiffusion export recon_mean.nii.gz --format dicom --out recon_mean_dicom/")
    p.add_argument("file")
    p.add_argument("--format", choices=["dicom"], required=True)
    p.add_argument("--out", required=True, help="the folder for the series")
    p.add_argument("--overwrite", action="store_true", help="replace an existing series in --out")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("reproduce", help="re-run the job a result's provenance records and compare",
                       description="Re-run the job recorded in FILE's provenance (a MedDiffusion result: NIfTI with its "
                                   ".json sidecar, NRRD, MHA or a DICOM series folder) in this process and report the "
                                   "voxel-wise difference. Exit status 0 when equal within the parity tolerance (5e-3 "
                                   "in model units, 5 HU for a 2000 HU window), 1 when not.",
                       epilog="examples:\n  meddiffusion reproduce sample.nii.gz\n  meddiffusion reproduce recon.nrrd "
                              "--input fbp40.nii.gz")
    p.add_argument("file")
    p.add_argument("--input", help="the condition volume the job read (synthesize, reconstruct, simulate-sparse-view); "
                                   "checked against the recorded sha256")
    p.add_argument("--device", help="run on this device instead of the recorded one (results may then differ)")
    p.add_argument("--out", help="also write the re-run result here (same format)")
    p.add_argument("--quiet", action="store_true")
    _add_server_args(p)
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("info", help="a file's provenance; or versions, CUDA devices and free GPU memory",
                       description="With FILE: print its provenance (whether it is a MedDiffusion synthetic volume, "
                                   "and how it was made). Without: library/torch versions and the GPUs torch can use.")
    p.add_argument("file", nargs="?", help="a NIfTI (with its .json sidecar), NRRD or MHA volume, or a DICOM series folder")
    p.set_defaults(func=_cmd_info)

    from .evaluation_cli import add_parser as add_evaluate_parser

    add_evaluate_parser(sub, _add_server_args)
    from .dataset_cli import add_parser as add_dataset_parser

    add_dataset_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for every error (also "
                                                             "MEDDIFFUSION_DEBUG=1)")
    args = parser.parse_args(argv)
    import os

    args.debug = args.debug or os.environ.get("MEDDIFFUSION_DEBUG", "") not in ("", "0")
    if getattr(args, "offline", False):
        os.environ["HF_HUB_OFFLINE"] = "1"
    from .client import ServiceError
    from .errors import MedDiffusionError

    # the library's own errors (UserError, ResourceError, and the loaders' subclasses) and the
    # file checks are the user's to fix: one line. Anything else is a fault of ours: a traceback.
    expected = (MedDiffusionError, ServiceError, FileExistsError, FileNotFoundError, PermissionError, MemoryError)
    try:
        return int(args.func(args) or 0)
    except expected as exc:
        if args.debug:
            raise
        from .errors import message_field

        field = getattr(exc, "field", None)
        if field is None and isinstance(exc, ServiceError):  # a service relays "field: ..."
            from .jobspec import PARAM_DEFAULTS

            field = message_field(str(exc))[0]
            field = field if field in PARAM_DEFAULTS else None
        print(f"error: {exc}" + (f" ({_flag(field)})" if field else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopped cleanly, no output file was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
