"""Append-only inference and label logs: JSON lines, one file set per worker, read with DuckDB.

Each worker appends to its own files (`predictions-<worker>.jsonl`, `labels-<worker>.jsonl`,
`rejected-<worker>.jsonl`) with an O_APPEND descriptor and whole lines per write, so workers
never contend and a killed worker leaves no torn line. The HTTP service group-commits
predictions (`InferenceLog(flush_interval=...)`): a killed worker loses at most the last
interval's predictions (0.25 s by default, well under the one second allowed).
Read them all with `read_json('<dir>/predictions-*.jsonl')`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


_POLARS_FROM = 32  # rows
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def _singular(key: str) -> str:
    return {"predictions": "prediction", "labels": "label"}.get(key, key)


def _series(name: str, values: Any):
    import polars as pl

    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return pl.Series(name, values, nan_to_null=True)
    if isinstance(values, np.ndarray) and values.dtype.kind == "M":
        return pl.Series(name, values.astype("datetime64[us]")).dt.to_string(_ISO_US)
    return pl.Series(name, list(values), strict=False)


_ISO_US = "%Y-%m-%dT%H:%M:%S%.6f"  # what np.datetime_as_string(unit="us") writes


def _ndjson(
    request_ids: list[str],
    now: str,
    model_version: str,
    predictions: Any,
    event_times: Any,
    ids: dict[str, Any],
    features: dict[str, Any],
    shadow_version: str | None,
    shadow: dict[str, Any],
) -> bytes:
    """The lines of a batch, encoded by one Polars expression over its columns.

    The expression (struct -> `json_encode`) runs in Rust without the GIL, so the request
    threads keep running while a flush encodes; `write_ndjson` writes the same bytes but holds
    the GIL throughout (~5 ms per 1000 lines of ~50 features)."""
    import polars as pl

    series = [
        pl.Series("request_id", request_ids, dtype=pl.String),
        _series("event_time", event_times).cast(pl.String),
        _series("prediction", predictions),
    ]
    groups: dict[str, list[Any]] = {}
    for group, columns in (("ids", ids), ("features", features), ("shadow", shadow)):
        # Columns named by position: a name may be both an id and a feature (`origin`).
        groups[group] = []
        for name, values in columns.items():
            column = f"{group}{len(groups[group])}"
            series.append(_series(column, values))
            groups[group].append(pl.col(column).alias(name))
    fields = [
        pl.col("request_id"),
        pl.lit(now, pl.String).alias("logged_at"),
        pl.col("event_time"),
        pl.lit(model_version, pl.String).alias("model_version"),
        pl.struct(groups["ids"]).alias("ids"),
        pl.struct(groups["features"]).alias("features"),
        pl.col("prediction"),
    ]
    if shadow_version is not None:
        version = pl.lit(shadow_version, pl.String).alias("model_version")
        fields.append(pl.struct([version, *groups["shadow"]]).alias("shadow"))
    lines = pl.DataFrame(series).select(pl.struct(fields).struct.json_encode().str.join("\n"))
    return (lines.item() + "\n").encode()


def _json_ready(values: Any) -> list[Any]:
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "f":
            return [None if v != v else v for v in values.tolist()]
        return values.tolist()
    return list(values)


def _rows(columns: dict[str, Any], count: int) -> list[dict[str, Any]]:
    if not columns:
        return [{} for _ in range(count)]
    names = list(columns)
    lists = [_json_ready(values) for values in columns.values()]
    return [dict(zip(names, values, strict=True)) for values in zip(*lists, strict=True)]


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
        self.write_bytes(
            "".join(
                json.dumps(r, default=_default, separators=(",", ":")) + "\n" for r in records
            ).encode()
        )

    def write_bytes(self, payload: bytes) -> None:
        """Whole lines in one O_APPEND write (a killed worker leaves no torn line)."""
        with self._lock:
            view = memoryview(payload)
            while view:  # a regular file takes it in one write; loop in case it does not
                written = os.write(self._fd, view)
                view = view[written:]

    def write_chunks(self, chunks: list[bytes]) -> None:
        """Several payloads of whole lines in one O_APPEND `writev`: a flush's batches are not
        copied into one buffer first (megabytes, under the GIL)."""
        chunks = [chunk for chunk in chunks if chunk]
        if len(chunks) <= 1 or len(chunks) > _IOV_MAX:
            self.write_bytes(b"".join(chunks))
            return
        with self._lock:
            written = os.writev(self._fd, chunks)
            if written == sum(len(chunk) for chunk in chunks):
                return
            # A regular file takes it all; finish it in case it does not.
            view = memoryview(b"".join(chunks))[written:]
            while view:
                view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        os.close(self._fd)


class InferenceLog:
    """The worker's prediction, label and rejection logs under `directory`.

    `flush_interval` > 0 (the HTTP service) turns on group commit for predictions: a request
    only queues its encoder (a closure over the columns it scored) and a background thread
    encodes and appends everything queued, in one write, every `flush_interval` seconds. The
    encoding leaves the request path and a batch of requests shares one write; a worker killed
    mid-load loses at most the last `flush_interval` (plus one encoding) of predictions. 0 (the
    default, for in-process callers that read the log right away) writes before returning."""

    def __init__(
        self, directory: Path, worker: str | None = None, flush_interval: float = 0.0
    ) -> None:
        self.directory = Path(directory)
        self.worker = worker or worker_id()
        self.predictions = JsonLinesWriter(self.directory / f"predictions-{self.worker}.jsonl")
        self.labels = JsonLinesWriter(self.directory / f"labels-{self.worker}.jsonl")
        self.rejected = JsonLinesWriter(self.directory / f"rejected-{self.worker}.jsonl")
        self.flush_interval = flush_interval
        self._pending: list[Callable[[], bytes]] = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self.flushing = False  # encoding on the flush thread (it has a core)
        if flush_interval > 0:
            self._flusher = threading.Thread(
                target=self._flush_every, daemon=True, name="inference-log-flush"
            )
            self._flusher.start()
            atexit.register(self.flush)

    @staticmethod
    def now() -> str:
        return datetime.now(UTC).isoformat(timespec="microseconds")

    def submit(self, encode: Callable[[], bytes]) -> None:
        """Append what `encode` returns (whole JSON lines): now, or at the next group commit."""
        if self.flush_interval <= 0:
            self.predictions.write_bytes(encode())
            return
        with self._pending_lock:
            self._pending.append(encode)

    def flush(self) -> None:
        """Encode and append every queued prediction (one write)."""
        with self._flush_lock:
            with self._pending_lock:
                pending, self._pending = self._pending, []
            chunks = []
            self.flushing = bool(pending)
            try:
                for encode in pending:
                    try:
                        chunks.append(encode())
                    except Exception:  # one bad batch must not stop the log
                        logging.getLogger(__name__).exception(
                            "inference log: a batch failed to encode"
                        )
                if chunks:
                    self.predictions.write_chunks(chunks)
            finally:
                self.flushing = False

    def _flush_every(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self.flush()

    def write_predictions(
        self,
        request_ids: list[str],
        model_version: str,
        predictions: list[Any],
        event_times: list[Any],
        ids: dict[str, list[Any]],
        features: dict[str, list[Any]],
        shadow: dict[str, Any] | None = None,
    ) -> None:
        """One line per prediction (see `encode_predictions`), in one append."""
        now = self.now()
        self.submit(
            lambda: encode_predictions(
                request_ids, now, model_version, predictions, event_times, ids, features, shadow
            )
        )

    def close(self) -> None:
        self._stop.set()
        self.flush()
        for writer in (self.predictions, self.labels, self.rejected):
            writer.close()


def encode_predictions(
    request_ids: list[str],
    now: str,
    model_version: str,
    predictions: list[Any],
    event_times: list[Any],
    ids: dict[str, list[Any]],
    features: dict[str, list[Any]],
    shadow: dict[str, Any] | None = None,
) -> bytes:
    """JSON lines, one per prediction, from columns: lists of JSON-ready values or numpy
    arrays (float NaN -> null, datetime64 -> ISO text to the microsecond).

    Lines: {request_id, logged_at, event_time, model_version, ids: {...}, features: {...},
    prediction[, shadow: {model_version, prediction, ...}]}. Batches are encoded by Polars
    (Rust, ~10x faster than json.dumps per line), single rows by json."""
    count = len(request_ids)
    shadow_columns = {}
    if shadow is not None:
        shadow_columns = {_singular(k): v for k, v in shadow.items() if k != "model_version"}
    if (
        count >= _POLARS_FROM
        and ids
        and features
        and not any(isinstance(v, dict) for v in shadow_columns.values())
    ):
        return _ndjson(
            request_ids,
            now,
            model_version,
            predictions,
            event_times,
            ids,
            features,
            shadow["model_version"] if shadow is not None else None,
            shadow_columns,
        )
    if isinstance(event_times, np.ndarray) and event_times.dtype.kind == "M":
        event_times = np.datetime_as_string(event_times, unit="us").tolist()
    id_rows = _rows(ids, count)
    feature_rows = _rows(features, count)
    shadow_rows = _rows(shadow_columns, count) if shadow is not None else None
    lines = []
    for index in range(count):
        line = {
            "request_id": request_ids[index],
            "logged_at": now,
            "event_time": event_times[index],
            "model_version": model_version,
            "ids": id_rows[index],
            "features": feature_rows[index],
            "prediction": predictions[index],
        }
        if shadow_rows is not None:
            assert shadow is not None
            line["shadow"] = {"model_version": shadow["model_version"], **shadow_rows[index]}
        lines.append(line)
    return "".join(
        json.dumps(r, default=_default, separators=(",", ":")) + "\n" for r in lines
    ).encode()


def read_predictions(directory: Path, conn: duckdb.DuckDBPyConnection | None = None):
    """All logged predictions as a DuckDB relation (empty folder -> None)."""
    files = sorted(Path(directory).glob("predictions-*.jsonl"))
    if not files:
        return None
    conn = conn or duckdb.connect()
    # sample_size=-1: the schema is read from every line. With DuckDB's default sample (20,480
    # lines) a key first seen later (`shadow`, a feature that was always null so far) is
    # silently dropped, or read as NULL.
    return conn.sql(
        f"SELECT * FROM read_json('{Path(directory)}/predictions-*.jsonl', "
        "format='newline_delimited', union_by_name=true, sample_size=-1)"
    )
