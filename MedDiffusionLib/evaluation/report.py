"""The result of an evaluation: rows of (metric, where, value, unit, context), written as JSON or CSV.

``where`` says what a value is about: a HU window (``"paper"``), a label (``"label 3"``, ``"mean"``)
or a set (``"generated"``, ``"real"``, ``"generated vs real"``). The report's ``context`` holds what
is common to every row (the grids, whether the prediction was resampled, which files were read).
JSON and CSV are written atomically (:mod:`MedDiffusionLib.io.atomic`); strict JSON has no infinity
or NaN, so a non-finite value (PSNR of identical volumes is ``inf``) is written as the string
``"inf"``, ``"-inf"`` or ``"nan"`` in both formats.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError

# how the table prints each metric: format and unit
_FORMATS = {"psnr": "{:.2f}", "ssim": "{:.4f}", "mae": "{:.1f}", "dice": "{:.4f}", "frd": "{:.3f}",
            "mmd": "{:.3g}", "ms_ssim": "{:.4f}"}


@dataclass(frozen=True)
class Row:
    """One number: ``metric`` (``psnr``, ``ssim``, ``mae``, ``dice``, ``frd``, ``mmd``, ``ms_ssim``,
    ``fd_<network>``), ``where`` (window, label or set), ``value``, ``unit`` and row ``context``."""

    metric: str
    where: str
    value: float
    unit: str = ""
    context: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "where": self.where, "value": float(self.value), "unit": self.unit,
                "context": dict(self.context)}


def _jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings, tuples as lists, paths as strings (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


class EvaluationReport(Mapping):
    """Rows of one evaluation (``kind``: ``"paired"`` or ``"sets"``) with their common ``context``.

    Reads like a dict of values keyed ``"metric/where"`` (``report["psnr/paper"]``,
    ``report["dice/mean"]``, ``report["frd/generated vs real"]``)."""

    def __init__(self, kind: str, rows: list[Row] | None = None, context: Mapping[str, Any] | None = None):
        self.kind = kind
        self.rows: list[Row] = list(rows or [])
        self.context: dict[str, Any] = dict(context or {})

    # -- reading ----------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> float:
        for r in self.rows:
            if f"{r.metric}/{r.where}" == key:
                return r.value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter([f"{r.metric}/{r.where}" for r in self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"EvaluationReport({self.kind!r}, {dict(self)!r})"

    def add(self, metric: str, where: str, value: float, unit: str = "", **context: Any) -> None:
        self.rows.append(Row(metric, where, float(value), unit, context))

    # -- writing ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"kind", "context", "rows": [{"metric", "where", "value", "unit", "context"}]}``
        (non-finite values kept as floats; :meth:`to_json` writes them as strings)."""
        return {"kind": self.kind, "context": dict(self.context), "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "EvaluationReport":
        """The inverse of :meth:`to_dict` / :meth:`to_json_dict` (``"inf"``/``"nan"`` strings are
        numbers again): a report a job service returned."""
        def number(v: Any) -> float:
            return float(v) if isinstance(v, (int, float, str)) else float("nan")

        rows = [Row(str(r["metric"]), str(r["where"]), number(r["value"]), str(r.get("unit", "")),
                    dict(r.get("context") or {})) for r in doc.get("rows", [])]
        return cls(str(doc.get("kind", "paired")), rows, doc.get("context") or {})

    def to_json_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as strict JSON values (non-finite numbers as the strings ``"inf"``,
        ``"-inf"``, ``"nan"``): what the job service returns."""
        return _jsonable(self.to_dict())

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as strict JSON, atomically."""
        from ..io.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(_jsonable(self.to_dict()), indent=2) + "\n")

    def to_csv(self, path: str | Path) -> Path:
        """Write one line per row, atomically: ``metric,where,value,unit,context``; ``context`` is
        the row's context merged over the report's, as compact JSON (each line stands alone)."""
        from ..io.atomic import atomic_write_text

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["metric", "where", "value", "unit", "context"])
        for r in self.rows:
            ctx = _jsonable({**self.context, **r.context})
            w.writerow([r.metric, r.where, _jsonable(r.value), r.unit, json.dumps(ctx, separators=(",", ":"))])
        return atomic_write_text(path, buf.getvalue())

    def table(self) -> str:
        """The rows as an aligned text table (metric, where, value, unit)."""
        cells = [("metric", "where", "value", "unit")]
        for r in self.rows:
            fmt = _FORMATS.get(r.metric, "{:.4g}")
            cells.append((r.metric, r.where, fmt.format(r.value) if math.isfinite(r.value) else str(r.value), r.unit))
        widths = [max(len(c[i]) for c in cells) for i in range(4)]
        lines = ["  ".join(c[i].rjust(widths[i]) if i == 2 else c[i].ljust(widths[i]) for i in range(4)).rstrip()
                 for c in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def check_report_path(path: str | Path, overwrite: bool = False) -> Path:
    """Validate an output path for a report before any computation: one line for each problem
    (a :class:`UserError`)."""
    from ..io.atomic import check_output_path

    try:
        return check_output_path(path, overwrite)
    except OSError as exc:
        raise UserError(str(exc)) from None


__all__ = ["Row", "EvaluationReport", "check_report_path"]
