"""The job API shared by every front end: the CLI, the Python API, the job service and Slicer.

A job is a JSON-serialisable :class:`JobSpec`: a task, a model (and ControlNet), parameters and
named input volumes. :func:`resolve` is the *one* place where unset parameters get their defaults
(class, size, spacing, sampler, steps, HU window, ...) and where a bad request is refused with a
:class:`~MedDiffusionLib.errors.UserError`. :func:`run_job` runs a resolved spec in this process,
reporting :class:`ProgressEvent` s (loading weights / sampling / decoding / writing, with step,
total and ETA) and stopping between sampler steps when ``cancel()`` turns true. It returns the
result volumes with their geometry and metadata; writing them is the caller's business
(:func:`write_results` writes atomically).

This module is the job API's front door and its runner; the parts live by concern:
:mod:`~MedDiffusionLib.jobspec` (the spec, the limits, :func:`resolve`),
:mod:`~MedDiffusionLib.controlnets` (named ControlNets and their search path),
:mod:`~MedDiffusionLib.checks` (input and memory checks), :mod:`~MedDiffusionLib.progress`,
:mod:`~MedDiffusionLib.model_cache` and :mod:`~MedDiffusionLib.results` (result types, writers).

Tasks:

* ``generate``: class-conditional volumes from noise (no inputs).
* ``synthesize``: a label map (input ``input``) -> CT, with a ``labels`` ControlNet.
* ``reconstruct``: a sparse-view FBP volume (HU) or a zero-filled under-sampled MRI (input
  ``input``) with a ``sparse-view`` or ``mri`` ControlNet; the ControlNet's own metadata says which.
* ``simulate-sparse-view``: full CT (HU) -> FBP of a sparse fan-beam scan.
* ``evaluate``: a prediction vs a reference volume (inputs ``prediction`` and ``reference``):
  PSNR / SSIM / MAE in HU windows, or Dice per label (``labels``); one ``metrics.json`` result
  (:mod:`MedDiffusionLib.evaluation`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .checks import array_bytes, check_input, check_input_size, check_memory, job_memory_limit, working_size
from .defaults import check_size
from .errors import ResourceError
from .jobspec import (MAX_SEED, PARAM_DEFAULTS, SPEC_FIELDS, TASK_PARAMS, TASKS, Caps, JobSpec, resolve,
                      sample_batch)
from .model_cache import ModelCache
from .progress import ProgressEvent, ProgressReporter
from .provenance import job_provenance
from .results import JobResult, ResultVolume, result_names, write_all, write_results


def run_job(spec: JobSpec | dict, inputs: dict[str, Any] | None = None, *, cache: ModelCache | None = None,
            progress: Callable[[ProgressEvent], None] | None = None, cancel: Callable[[], bool] | None = None,
            preview: Callable[[int, Any], None] | None = None,
            caps: Caps | None = None, spill_dir: str | Path | None = None, max_spill_bytes: float | None = None,
            controlnet_dirs: Sequence[str | Path] | None = None) -> JobResult:
    """Run one job in this process. ``inputs`` maps input names to :class:`Volume` s (or paths,
    read here). Returns the result volumes; nothing is written. Raises ``UserError`` for bad
    requests, ``ResourceError`` when memory runs out (checked before every task runs, see
    :func:`check_memory`), ``Cancelled`` when ``cancel()`` turned true. ``caps`` bounds the inputs
    (:func:`check_input`) and, unless ``spec`` is already resolved, the request (:func:`resolve`).
    ``spill_dir`` is where an exact decode whose stage maps do not fit in memory spills them (the
    runner's choice, never the request's: default ``<cache root>/spill``). The job's memory cap
    and spill folder are passed to each decode call; each result's ``meta["decode"]`` says how it
    was decoded (``exact`` false for blended or official tiles). ``controlnet_dirs`` is where a
    named ControlNet is looked up (:func:`~MedDiffusionLib.controlnets.controlnet_search_path`;
    default: the bundled ones)."""
    from .data.volumes import Volume, read_volume

    t0 = time.monotonic()
    if not (isinstance(spec, JobSpec) and spec.resolved):
        spec = resolve(spec, caps=caps, controlnet_dirs=controlnet_dirs)
    prog = ProgressReporter(progress)
    vols: dict[str, Volume] = {}
    for name in spec.inputs:
        given = (inputs or {}).get(name, spec.inputs[name])
        vols[name] = given if isinstance(given, Volume) else read_volume(given)
    warnings: list[str] = []
    for vol in vols.values():
        warnings += check_input(spec, vol, caps, controlnet_dirs)
    for w in warnings:
        prog.emit("loading", 0, 0, "checking inputs", notice=f"warning: {w}")
    cache = cache or ModelCache()
    p = spec.params
    try:
        from .devices import resolve_device

        # the device, resolved once where the job runs; from here on the request carries it
        device = str(resolve_device(p["device"], warn=False))
        if p["device"] != device:
            spec = spec.with_params(device=device)
            p = spec.params
        if spec.task == "evaluate":
            from .evaluation import paired_metrics

            check_memory(spec, device, None, vols)
            prog.emit("sampling", 0, 0, "computing the metrics")
            report = paired_metrics(vols["prediction"], vols["reference"], labels=p["labels"], resample=p["resample"],
                                    cancel=cancel)
            metrics = report.to_json_dict()  # strict JSON: a perfect PSNR is "inf"
            prog.emit("writing", 0, 0, "writing")
            return JobResult(spec, [ResultVolume(result_names(spec)[0], None, {"task": spec.task, "metrics": metrics})],
                             time.monotonic() - t0, warnings)
        if spec.task == "simulate-sparse-view":
            from .pipelines.conditioned import simulate_sparse_view

            check_memory(spec, device, None, vols)
            prog.emit("sampling", 0, 0, f"simulating {p['views']} fan-beam views")
            started: list[float] = []

            def slices_done(done: int, total: int) -> None:
                now = time.monotonic()
                if not started:
                    started.append(now)
                eta = (now - started[0]) / done * (total - done) if done > 0 else None
                prog.emit("sampling", done, total, f"simulated {done} of {total} slices", eta)

            out = simulate_sparse_view(vols["input"], views=p["views"], bins=p["bins"], device=device,
                                       cancel=cancel, progress=slices_done)
            prog.emit("writing", 0, 0, "writing")
            meta = {"task": spec.task, "views": p["views"], "units": "HU"}
            meta["provenance"] = job_provenance(spec, meta, device=device, inputs=vols)
            return JobResult(spec, [ResultVolume(result_names(spec)[0], out, meta)], time.monotonic() - t0, warnings)

        prog.emit("loading", 0, p["steps"], "loading weights")
        if device == "cpu" and p["mode"] == "fast":
            from .models.kernels import kernel_choices_recorded

            if not kernel_choices_recorded():  # the first run must not look hung while it times kernels
                prog.emit("loading", 0, p["steps"], "timing convolution kernels",
                          notice="note: first run with this torch build on this machine: the convolution kernels "
                                 "are timed once (seconds; recorded for later runs)")
        if spec.task == "generate":
            pipe = cache.generation(spec, device)
            check_size(p["size"], pipe.compression)
            est = check_memory(spec, device, pipe, vols, spill_dir, max_spill_bytes)
            where = "warning: running on the CPU; expected " if device == "cpu" else "expected "
            prog.emit("sampling", 0, p["steps"], "sampling", notice=where + est.text(device))
            if pipe.precompiled_network(p["size"], p["num_volumes"]) is not None:
                prog.emit("sampling", 0, p["steps"], "sampling", notice="using the compiled noise network "
                          "(`meddiffusion compile`)")
            seed = p["seed"] if p["seeds"] is None else p["seeds"]
            gen = pipe.generate(p["class"], p["size"], p["spacing"], seed, p["sampler"], p["steps"],
                                p["num_volumes"], prog.step, cancel, tiling=p["tiling"],
                                memory_limit_bytes=job_memory_limit(p), spill_dir=spill_dir,
                                **_preview_kw(pipe, p, preview, spill_dir))
            approximate = {_decode_text(g.meta.get("decode")) for g in gen
                           if not (g.meta.get("decode") or {}).get("exact", True)}
            for text in sorted(approximate):
                prog.emit("decoding", p["steps"], p["steps"], "decoding",
                          notice=f"note: {text}; the result differs from the whole-volume decode")
            prog.emit("writing", p["steps"], p["steps"], "writing")
            results = []
            for name, g in zip(result_names(spec), gen):
                meta = dict(g.meta, task=spec.task, model=spec.model, class_index=g.class_index, seed=g.seed,
                            sampler=p["sampler"], steps=p["steps"], spacing=list(g.spacing_xyz),
                            units="HU" if p["hu_window"] else "model units [-1, 1]", hu_window=p["hu_window"])
                meta["provenance"] = job_provenance(spec, meta, device=device, **_weights_of(pipe))
                results.append(ResultVolume(name, g.volume(p["hu_window"]), meta))
            return JobResult(spec, results, time.monotonic() - t0, warnings)

        pipe = cache.controlled(spec, device, controlnet_dirs)
        check_memory(spec, device, pipe, vols, spill_dir, max_spill_bytes)
        prog.emit("sampling", 0, p["steps"], "sampling")
        kw = _preview_kw(pipe, p, preview, spill_dir)
        n = p["num_samples"]
        outs, decoded = pipe.sample(vols["input"], n, seed=p["seed"], sampler=p["sampler"], steps=p["steps"],
                                    batch_size=sample_batch(p), progress=prog.step, cancel=cancel,
                                    memory_limit_bytes=job_memory_limit(p), spill_dir=spill_dir, with_decode=True,
                                    tiling=p["tiling"], **kw)
        prog.emit("writing", p["steps"], p["steps"], "writing")
        hu = _controlled_output_in_hu(pipe)
        meta = {"task": spec.task, "controlnet_task": pipe.task, "model": spec.model, "seed": p["seed"],
                "sampler": p["sampler"], "steps": p["steps"], "units": "HU" if hu else "model units [-1, 1]",
                "class_index": pipe.class_index, "hu_window": list(pipe.hu_window()) if hu else None,
                # exact when every sample's decode was (the statistics mix them all)
                "decode": min(decoded, key=lambda d: bool(d.get("exact", True)))}
        prov = job_provenance(spec, meta, device=device, inputs=vols, **_weights_of(pipe.base))
        names = result_names(spec)
        if n == 1:
            return JobResult(spec, [ResultVolume(names[0], outs[0], dict(meta, provenance=prov))],
                             time.monotonic() - t0, warnings)
        from .pipelines.conditioned import sample_statistics

        results = [ResultVolume(names[i], vol, dict(meta, statistic="sample", sample_index=i,
                                                    provenance=dict(prov, statistic="sample",
                                                                    sample_index=i, sample_batch=sample_batch(p))))
                   for i, vol in enumerate(outs)]
        mean, std = sample_statistics([v.array for v in outs])
        for name, stat, arr in ((names[-2], "mean", mean), (names[-1], "std", std)):
            what = {"statistic": stat, "samples": n}
            results.append(ResultVolume(name, outs[0].with_array(arr),
                                        dict(meta, **what, provenance=dict(prov, **what))))
        return JobResult(spec, results, time.monotonic() - t0, warnings)
    except MemoryError as exc:
        raise ResourceError(f"out of memory: {exc or 'the run needs more RAM'}; try a smaller size or fewer volumes") \
            from exc
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError without importing torch here
            raise ResourceError(oom_advice(p)) from exc
        raise


def _weights_of(pipe: Any) -> dict[str, Any]:
    """The provenance of a generation pipeline's weights: the sha256 of the noise network's tensors
    (computed once per pipeline) and the registry revision they came from."""
    entry = pipe.entry
    return {"weights_sha256": pipe._weights_digest(),
            "revision": (entry.source.get("revision") if entry is not None else None)}


def _decode_text(meta: dict[str, Any] | None) -> str:
    """A person's words for a result's ``meta["decode"]``."""
    from .decoding import DecodePlan

    meta = meta or {}
    return DecodePlan(meta.get("method", "whole"), meta.get("tile"), 0.0, store=meta.get("store", "ram")).describe()


def oom_advice(p: dict[str, Any]) -> str:
    size = "x".join(map(str, p["size"])) if p.get("size") else "this input"
    return (f"the GPU ran out of memory for {size}; try a smaller size, fewer volumes, a lower "
            "memory limit (tiles), or the CPU device")


def _controlled_output_in_hu(pipe: Any) -> bool:
    """Whether a ControlNet pipeline's result is written in HU (else model units)."""
    return pipe.meta.get("output") == "hu" or pipe.meta["hint"].get("normalize") == "hu_window"


def _preview_kw(pipe: Any, p: dict[str, Any], preview: Callable[[int, Any], None] | None,
                spill_dir: str | Path | None = None) -> dict[str, Any]:
    """``callback=`` for the pipeline when a live preview is wanted: every ``preview_every`` steps
    the predicted clean latent is decoded (whole, cheap at demo sizes) and handed to ``preview``,
    in the units of the result (HU or model units), under the job's memory cap and spill folder."""
    from .data.volumes import model_to_hu

    every = int(p.get("preview_every") or 0)
    if preview is None or every <= 0:
        return {}
    base = getattr(pipe, "base", pipe)
    if base is pipe:
        window = p.get("hu_window")
    else:
        window = pipe.hu_window() if _controlled_output_in_hu(pipe) else None

    def callback(i: int, t: Any, latents: Any, pred_x0: Any) -> None:
        if (i + 1) % every:
            return
        img = base.decode(pred_x0[:1], memory_limit_bytes=job_memory_limit(p), spill_dir=spill_dir)[0, 0].numpy()
        if window is not None:
            img = model_to_hu(img, float(window[0]), float(window[1]))
        from .data.volumes import Volume

        # generation: the output grid; conditioned tasks: the model's working grid (resampling the
        # preview onto the input's grid each time would cost more than the decode)
        spacing = p["spacing"] or (pipe.working_spacing() if hasattr(pipe, "working_spacing") else (1.0, 1.0, 1.0))
        preview(i + 1, Volume.from_network(img, spacing))

    return {"callback": callback}


# the job API: what front ends and scripts import from here (each name lives in its module above)
__all__ = ["JobSpec", "Caps", "resolve", "TASKS", "PARAM_DEFAULTS", "SPEC_FIELDS", "TASK_PARAMS", "MAX_SEED", "run_job", "oom_advice",
           "check_input", "check_input_size", "check_memory", "array_bytes", "working_size", "ModelCache",
           "ProgressEvent", "JobResult", "ResultVolume", "result_names", "write_results", "write_all"]
