"""What a job returns (:class:`JobResult`: the :class:`ResultVolume` s with their metadata) and how
results are written: atomically, all or none (:func:`write_results`, :func:`write_all`)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from .jobspec import JobSpec


@dataclass
class ResultVolume:
    """One result: a volume (``data.volumes.Volume``) or, for ``evaluate``, ``None`` with the
    numbers in ``meta["metrics"]`` (written as JSON)."""

    name: str
    volume: Any
    meta: dict[str, Any]


@dataclass
class JobResult:
    """A job's results, in order. Each result's provenance names the result it belongs to
    (``result``: ``meddiffusion reproduce`` re-runs the recorded job and compares this one)."""

    spec: JobSpec
    results: list[ResultVolume]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for r in self.results:
            if isinstance(r.meta.get("provenance"), dict):
                r.meta["provenance"] = dict(r.meta["provenance"], result=r.name)


def result_names(spec: JobSpec) -> list[str]:
    """The names of a job's results, in order: ``result_<i>`` (one per generated volume, or the one
    result of a task); an N-sample run (``num_samples`` > 1): ``sample_<i>`` then ``mean`` and ``std``."""
    fmt = spec.output_format
    if spec.task == "evaluate":
        return ["metrics.json"]
    samples = spec.params.get("num_samples") or 1
    if spec.task != "generate" and samples > 1:
        return [f"sample_{i}{fmt}" for i in range(samples)] + [f"mean{fmt}", f"std{fmt}"]
    n = spec.params.get("num_volumes", 1) if spec.task == "generate" else 1
    return [f"result_{i}{fmt}" for i in range(n)]


def write_all(outputs: Sequence[str | Path], writers: Sequence[Callable[[], Any]]) -> list[Path]:
    """Run each writer (one per output); if one fails, remove what the earlier ones wrote (the
    output, a folder with everything in it, and a NIfTI's provenance sidecar): all or none."""
    done: list[Path] = []
    try:
        for out, write in zip(outputs, writers):
            write()
            done.append(Path(out))
    except BaseException:
        for path in done:
            _remove_output(path)
        raise
    return done


def _remove_output(path: Path) -> None:
    import shutil

    from .provenance import sidecar_path

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    path.unlink(missing_ok=True)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        sidecar_path(path).unlink(missing_ok=True)


def write_result(r: ResultVolume, out: str | Path, overwrite: bool = False, fmt: str | None = None) -> Path:
    """Write one result volume, marked with its provenance (:mod:`MedDiffusionLib.provenance`):
    to a volume file (its suffix says the format), or with ``fmt="dicom"`` to a DICOM series in
    the folder ``out`` (:func:`MedDiffusionLib.io.dicom.write_dicom_series`)."""
    if r.volume is None:  # evaluate: the metrics, as JSON
        import json

        from .io.atomic import atomic_write_text, check_output_path

        return atomic_write_text(check_output_path(out, overwrite), json.dumps(r.meta.get("metrics") or {}, indent=1))
    if fmt == "dicom":
        from .io.dicom import write_dicom_series

        return write_dicom_series(r.volume, out, r.meta.get("provenance") or {}, overwrite=overwrite)
    from .data.volumes import write_volume

    return write_volume(r.volume, out, overwrite, r.meta.get("provenance"))


@contextlib.contextmanager
def output_folders(outputs: Sequence[str | Path], fmt: str | None) -> Iterator[None]:
    """DICOM series of several results go into sub-folders of one folder: made here when missing
    (its own parent must exist), removed again when the block fails and left it empty."""
    made: list[Path] = []
    if fmt == "dicom":
        for parent in sorted({Path(o).parent for o in outputs}):
            if not parent.exists() and parent.parent.is_dir():
                parent.mkdir()
                made.append(parent)
    try:
        yield
    except BaseException:
        for parent in made:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def write_results(result: JobResult, outputs: Sequence[str | Path], overwrite: bool = False,
                  fmt: str | None = None) -> list[Path]:
    """Write each result volume to its output (:func:`write_result`), atomically and all or none
    (:func:`output_folders` for DICOM)."""
    with output_folders(outputs, fmt):
        return write_all(outputs, [lambda r=r, o=o: write_result(r, o, overwrite, fmt)
                                   for r, o in zip(result.results, outputs)])
