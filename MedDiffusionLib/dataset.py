"""Synthetic training datasets: a manifest (one row per case) -> a folder of marked volumes.

:func:`read_manifest` reads the rows (JSON lines, or CSV with the same column names) or
:func:`rows_from_labels` makes one row per label map of a folder; :func:`plan_dataset` checks every
row (each one through :func:`MedDiffusionLib.jobspec.resolve`, all of them before anything runs)
and the output folder, and returns a :class:`Plan`; :func:`run_dataset` runs the cases of this
process (all of them, or under torchrun every ``WORLD_SIZE``-th batch) with a :data:`Runner` (in
this process, on job services: :mod:`.dataset_remote`, on Ray: :mod:`.dataset_ray`) and, on rank
0, writes the dataset files once every case is finished.

Rows (columns): ``id`` (default ``case_<row:04d>``; row numbers start at 1), ``class``, ``size``
(``[x, y, z]``; ``64x64x64`` in CSV), ``spacing``, ``seed`` (default ``--seed`` + row number),
``model``, ``sampler``, ``steps``; an image+mask pair has ``labels`` (a label map, relative to the
manifest) and ``controlnet`` (task synthesize: the label map -> CT; the label map is copied to the
labels folder). On a pair row ``size`` / ``spacing``, when given, must be the label map's grid.

Layouts: ``nnunet`` (nnU-Net v2 raw: ``imagesTr/<id>_0000.nii.gz``, ``labelsTr/<id>.nii.gz``,
``dataset.json``) plus a MONAI datalist ``datalist.json``; ``flat`` (``<id>.nii.gz``,
``<id>_label.nii.gz``, ``datalist.json``). Every image is marked as synthetic by
:func:`~MedDiffusionLib.results.write_result`: its NIfTI ``descrip`` and a JSON sidecar
``<name>.json`` beside it (nnU-Net v2 lists a case's files by ``file_ending``, ``.nii.gz``, so
the sidecars in ``imagesTr`` are ignored by it: nnunetv2 2.8.1 ``utilities/utils.py:26,36-37,47``;
a test runs its ``verify_dataset_integrity`` on a generated folder).

State: ``<DIR>/.meddiffusion/state.json`` records the dataset's name, layout and the plan's hash
(another dataset in the same folder is refused); ``<DIR>/.meddiffusion/done/<id>.json`` is written
(atomically) after a case's files: a case is finished when its marker and all its files exist, so a
rerun skips finished cases and redoes partial ones.

Batches: by default every case runs as its own job (``num_volumes`` 1) with its own seed, the
volume ``meddiffusion generate --seed S`` makes. With ``batch`` > 1 images-only rows that differ
only in the seed run that many at a time as one job with one seed per volume (``seeds``); a batch
gives other voxels than one-case runs (the VQ decoder turns float-level differences of a batched
forward into other codes), so the batches are fixed in the plan (and its hash): whatever the number
of workers, and on a rerun (a lost case is redone inside its whole batch), a case's voxels are the
same (with the same device and threads per process), and ``meddiffusion reproduce`` re-runs the
recorded batch.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import UserError

MAX_ROWS = 10_000                      # cases of one dataset
MAX_BATCH = 16                         # cases of one job (--batch)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # the manifest file
LAYOUTS = ("nnunet", "flat")
COLUMNS = ("id", "class", "size", "spacing", "seed", "model", "sampler", "steps", "labels", "controlnet")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
STATE_DIR = ".meddiffusion"
FILE_ENDING = ".nii.gz"
DEFAULT_MODEL = "chest-ct-mini"


@dataclass(frozen=True)
class Case:
    """One planned case: its row number (from 1), id, resolved job spec and, for a pair, the label
    map it is synthesised from."""

    row: int
    id: str
    spec: Any  # a resolved JobSpec (this case alone)
    labels: Path | None = None
    batch: int = 0  # the index of the batch (Plan.batches) it runs in

    @property
    def paired(self) -> bool:
        return self.labels is not None


@dataclass
class Plan:
    out: Path
    name: str
    layout: str
    cases: list[Case]
    digest: str
    label_names: dict[str, int] = field(default_factory=dict)
    # the batches, each one job: (its cases, its resolved spec); one case each unless --batch > 1
    batches: list[tuple[list[Case], Any]] = field(default_factory=list)

    def files(self, case: Case) -> dict[str, Path]:
        """The files of a case: ``image`` (+ its provenance sidecar ``sidecar``) and ``label`` for a pair."""
        from .provenance import sidecar_path

        if self.layout == "nnunet":
            image = self.out / "imagesTr" / f"{case.id}_0000{FILE_ENDING}"
            label = self.out / "labelsTr" / f"{case.id}{FILE_ENDING}"
        else:
            image = self.out / f"{case.id}{FILE_ENDING}"
            label = self.out / f"{case.id}_label{FILE_ENDING}"
        out = {"image": image, "sidecar": sidecar_path(image)}
        if case.paired:
            out["label"] = label
        return out

    def marker(self, case: Case) -> Path:
        return self.out / STATE_DIR / "done" / f"{case.id}.json"

    def finished(self, case: Case) -> bool:
        return self.marker(case).is_file() and all(p.is_file() for p in self.files(case).values())

    def units(self, cases: Iterable[Case]) -> list[tuple[list[Case], Any]]:
        """The batches ``cases`` belong to (plan order), each whole: a batch runs as planned even
        when some of its cases are finished, so every case's voxels are those of the planned job."""
        wanted = sorted({c.batch for c in cases})
        return [self.batches[b] for b in wanted]


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    dataset_written: bool = False
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"{len(self.done)} done, {len(self.skipped)} skipped (already finished), {len(self.failed)} failed "
               f"in {self.seconds:.1f} s"]
        out += [f"failed: {cid}: {why}" for cid, why in self.failed]
        return out


# -- manifests ------------------------------------------------------------------------------------------
def _row_error(row: int, rid: Any, message: str) -> UserError:
    who = f"row {row}" + (f" (id {rid})" if rid not in (None, "") else "")
    return UserError(f"manifest {who}: {message}")


def _csv_value(key: str, text: str) -> Any:
    text = text.strip()
    if text == "":
        return None
    if key in ("size", "spacing"):
        parts = [p.strip() for p in re.split(r"[x,\s]+", text.strip("[]() ")) if p.strip()]
        try:
            return [int(p) if key == "size" and re.fullmatch(r"[+-]?\d+", p) else float(p) for p in parts]
        except ValueError:
            return text  # resolve refuses it with a clear message
    if key in ("seed", "steps", "class") and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return text


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a manifest: JSON lines (``.jsonl`` / ``.json``: one object a line, blank lines
    skipped) or CSV (``.csv``, a header of column names). Unknown columns are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{path}: the manifest is over {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB")
    text = path.read_text(encoding="utf-8-sig")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        unknown = [c for c in (reader.fieldnames or []) if c is not None and c.strip() not in COLUMNS]
        if unknown:
            raise UserError(f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; known: {', '.join(COLUMNS)}")
        for rec in reader:
            if len(rows) >= MAX_ROWS:
                raise UserError(f"{path}: more than {MAX_ROWS} rows; split the dataset")
            if None in rec:
                raise _row_error(len(rows) + 1, None, "more values than columns")
            rows.append({k.strip(): _csv_value(k.strip(), v or "") for k, v in rec.items()})
        return rows
    for line in text.splitlines():
        if not line.strip():
            continue
        row = len(rows) + 1
        if row > MAX_ROWS:
            raise UserError(f"{path}: more than {MAX_ROWS} rows; split the dataset")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _row_error(row, None, f"not JSON ({exc.msg}); a manifest has one JSON object a line") from None
        if not isinstance(rec, dict):
            raise _row_error(row, None, "not a JSON object")
        unknown = sorted(set(rec) - set(COLUMNS), key=str)
        if unknown:
            raise _row_error(row, rec.get("id"), f"unknown field(s) {', '.join(map(repr, unknown))}; known: "
                                                 f"{', '.join(COLUMNS)}")
        rows.append(rec)
    return rows


def rows_from_labels(folder: str | Path, controlnet: str) -> list[dict[str, Any]]:
    """One pair row per label map in ``folder`` (name order; the id is the file name without suffix)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--from-labels {folder}: not a folder")
    rows = []
    for p in sorted(folder.iterdir()):
        suffix = next((s for s in LABEL_SUFFIXES if p.name.lower().endswith(s)), None)
        if suffix and p.is_file():
            rows.append({"id": p.name[: -len(suffix)], "labels": str(p.resolve()), "controlnet": controlnet})
            if len(rows) > MAX_ROWS:
                raise UserError(f"--from-labels {folder}: more than {MAX_ROWS} label maps; split the dataset")
    if not rows:
        raise UserError(f"--from-labels {folder}: no label maps ({', '.join(LABEL_SUFFIXES)})")
    return rows


# -- planning -------------------------------------------------------------------------------------------
def _check_grid(row: int, rid: str, path: Path, size: Any, spacing: Any) -> None:
    from .data.volumes import read_volume

    vol = read_volume(path)
    if size is not None:
        if not isinstance(size, (list, tuple)) or [int(v) if isinstance(v, (int, float)) else v for v in size] != \
                list(vol.shape):
            raise _row_error(row, rid, f"label map {path.name} is {'x'.join(map(str, vol.shape))}, not size "
                                       f"{size}")
    if spacing is not None:
        try:
            ok = len(spacing) == 3 and all(abs(float(a) - b) <= 1e-3 * max(1.0, b) for a, b in zip(spacing, vol.spacing))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise _row_error(row, rid, f"label map {path.name} has spacing "
                                       f"{'x'.join(f'{s:g}' for s in vol.spacing)}, not {spacing}")


def plan_dataset(rows: Sequence[dict[str, Any]], out: str | Path, *, base: str | Path = ".", name: str | None = None,
                 layout: str = "auto", seed: int = 0, model: str | None = None, sampler: str | None = None,
                 steps: int | None = None, device: str = "cpu", batch: int = 1) -> Plan:
    """Check every row and the output folder; nothing is written. ``base``: the folder label paths
    are relative to (the manifest's). A bad row is one :class:`UserError` naming the row.
    ``batch``: images-only rows asking for the same volume but for the seed (same model, class,
    size, spacing, sampler, steps) run up to this many at a time as one job (plan order), each
    volume with its own seed (:meth:`~MedDiffusionLib.pipelines.generation.GenerationPipeline.generators`)."""
    from .controlnets import controlnet_meta
    from .jobspec import resolve

    if layout not in (*LAYOUTS, "auto"):
        raise UserError(f"unknown layout {layout!r}; use {', '.join(LAYOUTS)} or auto")
    if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise UserError(f"--batch must be from 1 to {MAX_BATCH}")
    if not rows:
        raise UserError("the manifest has no rows")
    if len(rows) > MAX_ROWS:
        raise UserError(f"the manifest has {len(rows)} rows; at most {MAX_ROWS}")
    out = Path(out)
    base = Path(base)
    name = name or out.resolve().name
    cases: list[Case] = []
    seen: dict[str, int] = {}
    label_names: dict[str, int] = {"background": 0}
    for i, rec in enumerate(rows):
        row = i + 1
        rid = rec.get("id")
        if rid is None:
            rid = f"case_{row:04d}"
        if not isinstance(rid, str) or not ID_PATTERN.match(rid):
            raise _row_error(row, rid if isinstance(rid, str) else None,
                             "id must be 1-100 characters: letters, digits, '.', '_', '-' (not first)")
        if rid.lower() in seen:
            raise _row_error(row, rid, f"duplicate id (also row {seen[rid.lower()]})")
        seen[rid.lower()] = row
        row_seed = rec.get("seed")
        params: dict[str, Any] = {"seed": seed + row if row_seed is None else row_seed,
                                  "sampler": rec.get("sampler") or sampler, "steps": rec.get("steps") or steps,
                                  "device": device}
        labels = rec.get("labels")
        try:
            if labels is not None or rec.get("controlnet") is not None:
                if labels is None or rec.get("controlnet") is None:
                    raise UserError("an image+mask pair needs both 'labels' (a label map) and 'controlnet'")
                if not isinstance(labels, str):
                    raise UserError("'labels' must be a file path")
                lpath = Path(labels) if Path(labels).is_absolute() else base / labels
                if not lpath.is_file():
                    raise UserError(f"label map {labels} not found")
                if rec.get("class") is not None:
                    params["class"] = rec["class"]  # resolve refuses it: the ControlNet fixes the class
                spec = resolve({"task": "synthesize", "model": rec.get("model") or model,
                                "controlnet": rec["controlnet"], "params": params, "inputs": {"input": str(lpath)},
                                "output_format": FILE_ENDING})
                _check_grid(row, rid, lpath, rec.get("size"), rec.get("spacing"))
                meta = controlnet_meta(rec["controlnet"], None)
                names = meta.get("hint", {}).get("names") or meta.get("label_names") or {}
                for v in meta.get("hint", {}).get("values") or []:
                    if int(v) != 0:
                        nm = names.get(str(v)) if isinstance(names, dict) else None
                        label_names.setdefault(nm or f"label_{int(v)}", int(v))
                cases.append(Case(row, rid, spec, lpath))
            else:
                params.update({k: rec.get(k) for k in ("class", "size", "spacing")})
                spec = resolve({"task": "generate", "model": rec.get("model") or model or DEFAULT_MODEL,
                                "params": params, "output_format": FILE_ENDING})
                cases.append(Case(row, rid, spec))
        except UserError as exc:
            if str(exc).startswith("manifest row"):
                raise
            raise _row_error(row, rid, str(exc)) from None
        except (FileNotFoundError, ValueError) as exc:
            raise _row_error(row, rid, str(exc)) from None
    if layout == "auto":
        layout = "nnunet" if any(c.paired for c in cases) else "flat"
    if layout == "nnunet" and not any(c.paired for c in cases):
        raise UserError("nnU-Net v2 trains on image+mask pairs: every case needs 'labels' and 'controlnet' (or use "
                        "--layout flat for images only)")
    if layout == "nnunet" and len({c.paired for c in cases}) > 1:
        odd = next(c for c in cases if c.paired != cases[0].paired)
        raise _row_error(odd.row, odd.id, "nnU-Net needs a label map for every case or for none; this row "
                                          f"{'has' if odd.paired else 'has no'} labels but row {cases[0].row} "
                                          f"{'has' if cases[0].paired else 'has none'}")
    same: dict[str, Case] = {}
    for c in cases:  # two rows asking for the same volume (a default seed can meet another row's seed)
        spec = c.spec.to_dict()
        spec["inputs"] = {}
        key = json.dumps([spec, str(c.labels) if c.labels else None], sort_keys=True, default=str)
        if key in same:
            raise _row_error(c.row, c.id, f"asks for the same volume as row {same[key].row} (id {same[key].id}): the "
                                          "same request and seed; give one of them another seed")
        same[key] = c
    cases, batches = _batches(cases, batch)
    digest = _digest(name, layout, cases)
    plan = Plan(out, name, layout, cases, digest, label_names if any(c.paired for c in cases) else {"background": 0},
                batches)
    owners: dict[Path, Case | None] = {plan.out / n: None for n in DATASET_FILES}
    for c in cases:  # a file name must belong to one case (flat: id "x_label" vs the label of "x")
        for path in plan.files(c).values():
            if path in owners:
                other = owners[path]
                raise _row_error(c.row, c.id, f"its file {path.name} is also "
                                              + (f"a file of row {other.row} (id {other.id})" if other else
                                                 "one of the dataset's own files") + "; choose another id")
            owners[path] = c
    _check_out(plan)
    return plan


def _batches(cases: list[Case], size: int) -> tuple[list[Case], list[tuple[list[Case], Any]]]:
    """Group the cases into batches (plan order): images-only cases whose requests differ only in
    the seed, ``size`` at a time; a pair (its own label map) runs alone. Each batch's spec is
    resolved here: ``num_volumes`` and one seed per volume (``seeds``)."""
    from .jobspec import as_request, resolve

    groups: dict[str, list[Case]] = {}
    order: list[list[Case]] = []
    for c in cases:
        if c.paired or size == 1:
            order.append([c])
            continue
        spec = c.spec.to_dict()
        spec["params"] = {k: v for k, v in spec["params"].items() if k != "seed"}
        key = json.dumps(spec, sort_keys=True, default=str)
        group = groups.get(key)
        if group is None or len(group) == size:
            group = groups[key] = []
            order.append(group)
        group.append(c)
    out: list[Case] = []
    batches: list[tuple[list[Case], Any]] = []
    for b, group in enumerate(order):
        members = [replace(c, batch=b) for c in group]
        out += members
        if len(members) == 1:
            spec = members[0].spec
        else:
            first = members[0]
            try:
                spec = resolve(as_request(first.spec, num_volumes=len(members),
                                          seeds=[m.spec.params["seed"] for m in members]))
            except UserError as exc:
                raise _row_error(first.row, first.id, f"a batch of {len(members)} from this row: {exc}; use a "
                                                      "smaller --batch") from None
        batches.append((members, spec))
    out.sort(key=lambda c: c.row)
    return out, batches


def _digest(name: str, layout: str, cases: Sequence[Case]) -> str:
    """The plan's hash: what decides every case's voxels (the device excluded), the batches too."""
    from .weights import sha256_file

    doc = []
    for c in cases:
        spec = c.spec.to_dict()
        spec["params"] = {k: v for k, v in spec["params"].items() if k != "device"}
        spec["inputs"] = {}
        lab = sha256_file(c.labels) if c.labels else None
        doc.append([c.row, c.id, spec, lab])
    # the batches of more than one case (what --batch changes); none: the hash of one-case jobs
    extra = [[c.id for c in cases if c.batch == b] for b in sorted({c.batch for c in cases})]
    extra = [extra] if any(len(group) > 1 for group in extra) else []
    blob = json.dumps([name, layout, doc, *extra], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _state_path(out: Path) -> Path:
    return out / STATE_DIR / "state.json"


def _check_out(plan: Plan) -> None:
    """Refuse an output folder that holds another dataset (or anything that is not ours)."""
    out = plan.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: not a folder")
    state = _state_path(out)
    if state.is_file():
        try:
            doc = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"--out {out}: its dataset state {state} is unreadable; use another folder") from None
        for key, mine in (("name", plan.name), ("layout", plan.layout), ("plan_sha256", plan.digest)):
            if doc.get(key) != mine:
                what = {"plan_sha256": "manifest or options"}.get(key, key)
                raise UserError(f"--out {out}: holds another dataset (its {what} differ: {doc.get(key)!s:.24} vs "
                                f"{mine!s:.24}); use another folder")
        return
    # a folder with nothing but our state folder is ours, stopped (or, under torchrun, another rank
    # starting) before the state file was in place
    if out.is_dir() and any(p.name != STATE_DIR for p in out.iterdir()):
        raise UserError(f"--out {out}: not empty and not a MedDiffusion dataset folder; use an empty or new folder")


# -- running --------------------------------------------------------------------------------------------
def _write_json(path: Path, doc: Any) -> None:
    from .io.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1))


def _prepare(plan: Plan) -> None:
    """The state file first (every rank writes the same content, atomically), then the folders."""
    state = {"name": plan.name, "layout": plan.layout, "plan_sha256": plan.digest, "cases": len(plan.cases)}
    path = _state_path(plan.out)
    if not path.is_file():
        _write_json(path, state)
    (plan.out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    if plan.layout == "nnunet":
        (plan.out / "imagesTr").mkdir(exist_ok=True)
        if plan.cases[0].paired:
            (plan.out / "labelsTr").mkdir(exist_ok=True)


def compute_unit(spec: Any, members: Sequence[Case], cache: Any = None, label: Any = None) -> list[Any]:
    """Run one batch's job (``spec``, from :attr:`Plan.batches`) in this process: its images
    (:class:`~MedDiffusionLib.results.ResultVolume`), one per member in order. ``label``: a pair's
    label map as a :class:`~MedDiffusionLib.data.volumes.Volume` (read from ``case.labels`` when
    not given: a worker on another machine gets the voxels, not the path)."""
    from .jobs import run_job

    inputs = {"input": label} if members[0].paired and label is not None else None
    images = run_job(spec, inputs, cache=cache).results
    if len(images) != len(members):
        raise RuntimeError(f"the job made {len(images)} volumes for a batch of {len(members)}")
    return images


def finish_unit(plan: Plan, members: Sequence[Case], images: Sequence[Any], pending: Any, tracker: "Tracker") -> None:
    """Store the batch's images of the ``pending`` members (:func:`store_case`) and record each."""
    for case, image in zip(members, images):
        if case.id not in pending:
            continue
        try:
            store_case(plan, case, image)
        except Exception as exc:  # noqa: BLE001 - writing here failed (disk full, ...): recorded
            tracker.record(case, "failed", failure_reason(exc))
            continue
        tracker.record(case, "done")


def fail_unit(members: Sequence[Case], pending: Any, tracker: "Tracker", reason: str) -> None:
    """Record every ``pending`` member of a batch as failed with ``reason``."""
    for case in members:
        if case.id in pending:
            tracker.record(case, "failed", reason)


def store_case(plan: Plan, case: Case, image: Any) -> None:
    """Write a computed case: its label map (a pair; copied from ``case.labels``, as uint8 when its
    values fit), its image (marked, with its provenance sidecar), each atomically, then its
    completion marker. Where the image was computed (here, a service, a Ray worker) does not matter."""
    import numpy as np

    from .provenance import sha256_of
    from .results import write_result

    files = plan.files(case)
    plan.marker(case).unlink(missing_ok=True)
    if case.paired:
        from .data.volumes import read_volume, write_volume

        lab = read_volume(case.labels)
        arr = np.asarray(lab.array)
        if np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        write_volume(lab.with_array(arr), files["label"], overwrite=True)
    write_result(image, files["image"], overwrite=True)
    _write_json(plan.marker(case), {"id": case.id, "row": case.row, "seed": case.spec.params["seed"],
                                    "image_sha256": sha256_of(np.asarray(image.volume.array)),
                                    "files": [str(p.relative_to(plan.out)) for p in files.values()]})


def failure_reason(exc: BaseException) -> str:
    """A failed case's reason: the error's message on one line (at most 300 characters)."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


class Tracker:
    """The cases' summary, progress bar (cases done / total, ETA) and ``on_case`` callback, shared
    by every way of running cases; :meth:`record` may be called from several threads."""

    def __init__(self, total: int, *, progress: bool = True, desc: str = "cases", position: int | None = None,
                 on_case: Callable[[Case, str], None] | None = None):
        import threading

        self.summary = Summary()
        self.on_case = on_case
        self._lock = threading.Lock()
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", desc=desc, position=position, leave=True)

    def record(self, case: Case, status: str, reason: str = "") -> None:
        """``status``: done, skipped or failed (with its ``reason``)."""
        with self._lock:
            if status == "failed":
                self.summary.failed.append((case.id, reason))
            else:
                getattr(self.summary, status).append(case.id)
            if self.bar is not None:
                self.bar.update(1)
        if self.on_case:
            self.on_case(case, status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


#: How a list of unfinished cases is run: ``runner(plan, cases, tracker)`` runs the batches they
#: belong to (:meth:`Plan.units`), stores the unfinished members (:func:`finish_unit`) and records
#: each (``tracker.record``). :func:`run_here` runs them in this process;
#: :mod:`MedDiffusionLib.dataset_remote` sends them to job services, :mod:`MedDiffusionLib.dataset_ray`
#: to a Ray cluster.
Runner = Callable[[Plan, list[Case], Tracker], None]


def run_here(cache: Any = None) -> Runner:
    """A runner that computes the batches one after another in this process (one model cache)."""
    def runner(plan: Plan, cases: list[Case], tracker: Tracker) -> None:
        from .model_cache import ModelCache

        nonlocal cache
        cache = cache or ModelCache()
        pending = {c.id for c in cases}
        for members, spec in plan.units(cases):
            try:
                images = compute_unit(spec, members, cache)
            except Exception as exc:  # noqa: BLE001 - recorded, the other cases go on
                fail_unit(members, pending, tracker, failure_reason(exc))
                continue
            finish_unit(plan, members, images, pending, tracker)

    return runner


DATASET_FILES = ("dataset.json", "datalist.json")


def _sweep_temporaries(plan: Plan) -> None:
    """Remove the hidden temporary files of writes that a killed worker left (``.<name>.<pid>-...``
    beside each output, :func:`MedDiffusionLib.io.atomic.atomic_path`): nnU-Net lists a folder's
    files by their ending and would take them for cases; a done-marker's and the state file's are
    swept too. Runs after every worker is done."""
    folders = ({p.parent for c in plan.cases for p in plan.files(c).values()}
               | {plan.out, plan.out / STATE_DIR, plan.out / STATE_DIR / "done"})
    for folder in folders:
        if folder.is_dir():
            for left in folder.glob(".*.tmp*"):
                if left.is_file():
                    left.unlink(missing_ok=True)


def write_dataset_files(plan: Plan) -> None:
    """``dataset.json`` (nnU-Net v2) and the MONAI datalist ``datalist.json``, atomically."""
    from . import __version__ as version

    training = []
    for c in plan.cases:
        files = plan.files(c)
        item = {"image": str(files["image"].relative_to(plan.out))}
        if c.paired:
            item["label"] = str(files["label"].relative_to(plan.out))
        training.append(item)
    _write_json(plan.out / "datalist.json", {"name": plan.name, "synthetic": True, "training": training})
    if plan.layout == "nnunet":
        _write_json(plan.out / "dataset.json", {
            "name": plan.name, "description": f"synthetic CT generated by MedDiffusion {version} (every image is "
                                              "marked: NIfTI descrip and a .json provenance sidecar)",
            "channel_names": {"0": "CT"}, "labels": dict(sorted(plan.label_names.items(), key=lambda kv: kv[1])),
            "numTraining": len(plan.cases), "file_ending": FILE_ENDING, "synthetic": True})


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None


def run_dataset(plan: Plan, *, rank: int = 0, world_size: int = 1, cache: Any = None,
                barrier: Callable[[], None] | None = None, progress: bool = True,
                on_case: Callable[[Case, str], None] | None = None, runner: Runner | None = None) -> Summary:
    """Run this rank's cases (batch i, counted from 0, goes to rank i % world_size; a batch is one
    case unless --batch > 1), skipping the finished ones, with ``runner`` (default
    :func:`run_here`: in this process); a failing case is recorded with its reason and the others
    go on. Then ``barrier()`` (all ranks' cases over) and, on rank 0, the dataset files when every
    case is finished. ``KeyboardInterrupt`` propagates:
    finished cases stay, a rerun continues."""
    t0 = time.monotonic()
    _prepare(plan)
    mine = [c for c in plan.cases if c.batch % world_size == rank]
    tracker = Tracker(len(mine), progress=progress, desc=f"rank {rank}" if world_size > 1 else "cases",
                      position=rank if world_size > 1 else None, on_case=on_case)
    try:
        pending = []
        for case in mine:
            if plan.finished(case):
                tracker.record(case, "skipped")
            else:
                pending.append(case)
        if pending:
            (runner or run_here(cache))(plan, pending, tracker)
    finally:
        tracker.close()
    summary = tracker.summary
    if barrier is not None:
        barrier()
    if rank == 0:
        _sweep_temporaries(plan)
        if all(plan.finished(c) for c in plan.cases):
            write_dataset_files(plan)
            summary.dataset_written = True
        else:  # an older complete run's files would list cases that are missing now
            for name in DATASET_FILES:
                (plan.out / name).unlink(missing_ok=True)
    summary.seconds = time.monotonic() - t0
    return summary


__all__ = ["MAX_ROWS", "LAYOUTS", "COLUMNS", "Case", "Plan", "Summary", "Tracker", "Runner", "read_manifest",
           "rows_from_labels", "plan_dataset", "compute_unit", "store_case", "finish_unit", "fail_unit", "run_here",
           "run_dataset", "write_dataset_files", "dist_env", "failure_reason"]
