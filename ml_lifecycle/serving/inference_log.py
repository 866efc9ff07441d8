"""Append-only inference and label logs: JSON lines, one file set per worker, read with DuckDB.

Each worker appends to its own files (`predictions-<worker>.jsonl`, `labels-<worker>.jsonl`,
`rejected-<worker>.jsonl`) with an O_APPEND descriptor and one write per batch, so workers never
contend and a killed worker loses nothing the OS already accepted (well under a second).
Read them all with `read_json('<dir>/predictions-*.jsonl')`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class JsonLinesWriter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        payload = "".join(json.dumps(r, default=_default, separators=(",", ":")) + "\n"
                          for r in records).encode()
        with self._lock:
            os.write(self._fd, payload)

    def close(self) -> None:
        os.close(self._fd)


class InferenceLog:
    """The worker's prediction, label and rejection logs under `directory`."""

    def __init__(self, directory: Path, worker: str | None = None) -> None:
        self.directory = Path(directory)
        self.worker = worker or worker_id()
        self.predictions = JsonLinesWriter(self.directory / f"predictions-{self.worker}.jsonl")
        self.labels = JsonLinesWriter(self.directory / f"labels-{self.worker}.jsonl")
        self.rejected = JsonLinesWriter(self.directory / f"rejected-{self.worker}.jsonl")

    @staticmethod
    def now() -> str:
        return datetime.now(UTC).isoformat(timespec="microseconds")

    def close(self) -> None:
        for writer in (self.predictions, self.labels, self.rejected):
            writer.close()


def read_predictions(directory: Path, conn: duckdb.DuckDBPyConnection | None = None):
    """All logged predictions as a DuckDB relation (empty folder -> None)."""
    files = sorted(Path(directory).glob("predictions-*.jsonl"))
    if not files:
        return None
    conn = conn or duckdb.connect()
    # sample_size=-1: the schema is read from every line. With DuckDB's default sample (20,480
    # lines) a key first seen later (`shadow`, a feature that was always null so far) is
    # silently dropped, or read as NULL.
    return conn.sql(f"SELECT * FROM read_json('{Path(directory)}/predictions-*.jsonl', "
                    "format='newline_delimited', union_by_name=true, sample_size=-1)")
