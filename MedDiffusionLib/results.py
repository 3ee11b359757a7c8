"""What a job returns (:class:`JobResult`: the :class:`ResultVolume` s with their metadata) and how
results are written: atomically, all or none (:func:`write_results`, :func:`write_all`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from .jobspec import JobSpec


@dataclass
class ResultVolume:
    name: str
    volume: Any  # data.volumes.Volume
    meta: dict[str, Any]


@dataclass
class JobResult:
    spec: JobSpec
    results: list[ResultVolume]
    seconds: float
    warnings: list[str] = field(default_factory=list)


def result_names(spec: JobSpec) -> list[str]:
    n = spec.params.get("num_volumes", 1) if spec.task == "generate" else 1
    return [f"result_{i}{spec.output_format}" for i in range(n)]


def write_all(outputs: Sequence[str | Path], writers: Sequence[Callable[[], Any]]) -> list[Path]:
    """Run each writer (one per output); if one fails, remove what the earlier ones wrote: all or none."""
    done: list[Path] = []
    try:
        for out, write in zip(outputs, writers):
            write()
            done.append(Path(out))
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
    return done


def write_results(result: JobResult, outputs: Sequence[str | Path], overwrite: bool = False) -> list[Path]:
    """Write each result volume to its output path, atomically and all or none, marked with its
    provenance (:mod:`MedDiffusionLib.provenance`)."""
    from .data.volumes import write_volume

    return write_all(outputs, [lambda r=r, o=o: write_volume(r.volume, o, overwrite, r.meta.get("provenance"))
                               for r, o in zip(result.results, outputs)])
