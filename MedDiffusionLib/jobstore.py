"""The job service's job table, kept in SQLite in the work folder (``jobs.sqlite3``, mode 0600).

The standard library's ``sqlite3`` is enough here: one table, one writing process, rows written
on state changes only (queued, running, done, failed, cancelled; progress stays in memory), and
no extra dependency on a lab's GPU machine. SQLAlchemy/SQLModel would add a mapping layer and
migrations machinery that one table does not need.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

COLUMNS = ("id", "owner", "task", "state", "spec", "device", "message", "error", "warnings", "results",
           "input_names", "created", "finished", "error_kind")
JSON_COLUMNS = ("spec", "warnings", "results", "input_names")
SCHEMA = f"CREATE TABLE IF NOT EXISTS jobs ({', '.join(c + (' TEXT PRIMARY KEY' if c == 'id' else '') for c in COLUMNS)})"


class JobStore:
    """Rows of the ``jobs`` table as dicts (JSON columns decoded). Thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.execute(SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for column in COLUMNS:  # a table an older version made: the columns added since (NULL in its rows)
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")

    def save(self, row: dict[str, Any]) -> None:
        values = [json.dumps(row[c]) if c in JSON_COLUMNS else row[c] for c in COLUMNS]
        with self._lock:
            if self._closed:  # a worker finishing during shutdown: the next start recovers the job
                return
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(COLUMNS))})", values)

    def delete(self, job_id: str) -> None:
        with self._lock:
            if not self._closed:
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            raw = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY created").fetchall()
        out = []
        for values in raw:
            row = dict(zip(COLUMNS, values))
            for c in JSON_COLUMNS:
                row[c] = json.loads(row[c]) if row[c] is not None else None
            out.append(row)
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()


__all__ = ["JobStore"]
