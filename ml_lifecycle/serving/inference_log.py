"""Append-only inference and label logs, one file set per worker, read with DuckDB.

Predictions: each flush writes one Parquet file (`predictions-<worker>.<session>.<seq>.parquet`)
under a temporary name and renames it into place, so a reader never sees a torn file and a
killed worker leaves only whole files. Parquet, not JSON lines: a 1000-row batch of ~50 features
takes ~1-2 ms to write instead of ~6 ms of float-to-text encoding, in a tenth of the bytes. The
HTTP service group-commits (`InferenceLog(flush_interval=...)`): a killed worker loses at most
the last interval's predictions (0.5 s in the service; the issue allows one second). Every
`compact_parts` files the worker merges each run of consecutive small parts (under
`merge_below_rows` rows: single-row traffic) into one (`<session>.<first>-<last>`); readers
skip parts that a merged file covers, so a crash between the merge and the deletes duplicates
nothing. Labels and rejected requests (small, rare) stay JSON lines (`labels-<worker>.jsonl`),
appended with O_APPEND whole-line writes. Read predictions with `read_predictions(directory)`
(or `predictions_sql`); logs of older versions (`predictions-<worker>.jsonl`) are read too.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

# One logged batch as columns: a leaf is a numpy array or list (one value per prediction) or a
# scalar shared by all its rows (model version, logged_at); a dict is a struct column.
LogColumns = dict[str, Any]

_PART = re.compile(
    r"^predictions-(?P<worker>.+)\.(?P<session>[0-9a-f]{8})\."
    r"(?P<first>\d{8})(?:-(?P<last>\d{8}))?\.parquet$"
)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# The flush thread's name in the OS (`top -H`, /proc/<pid>/task/*/comm): what the benchmark
# counts as the log's own CPU, with Polars' writer threads.
FLUSH_THREAD = "inference-log"


def _name_os_thread(name: str) -> None:
    """Name the calling thread for the OS (Linux, at most 15 bytes); elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


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
        payload = "".join(
            json.dumps(r, default=_default, separators=(",", ":")) + "\n" for r in records
        ).encode()
        with self._lock:  # whole lines in one O_APPEND write: a killed worker tears none
            view = memoryview(payload)
            while view:  # a regular file takes it in one write; loop in case it does not
                view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        os.close(self._fd)


def _length(columns: LogColumns) -> int:
    return len(columns["request_id"])


def _leaf_array(values: list[Any]) -> pa.Array:
    """Concatenated values of one column as Arrow (float NaN -> null; None-only -> null type,
    which DuckDB's union_by_name widens to the other files' type)."""
    first = values[0]
    if all(isinstance(v, pa.Array) for v in values):
        if len(values) == 1:
            return first
        if all(v.type == first.type for v in values):
            return pa.concat_arrays(values)
        values = [v.to_pylist() for v in values]
    if all(isinstance(v, np.ndarray) for v in values):
        array = np.concatenate(values) if len(values) > 1 else first
        kind = array.dtype.kind
        if kind == "f":
            return _floats(array)
        if kind in "iub":
            return pa.array(array)
        if kind == "M":
            return pa.array(array.astype("datetime64[us]"), type=pa.timestamp("us"))
        try:  # objects (text, None): Arrow reads the array itself, no list in between
            return pa.array(array, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            values = [array]
    flat = [
        v
        for part in values
        for v in (part.tolist() if isinstance(part, np.ndarray | pa.Array) else part)
    ]
    try:
        return pa.array(flat, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: as text, as JSON would show
        return pa.array([None if v is None else str(v) for v in flat], type=pa.string())


def _floats(array: np.ndarray) -> pa.Array:
    """Arrow floats from numpy (float32 stays float32, others become float64), NaN -> null:
    the validity bitmap packed by numpy (about a third of what Arrow's own NaN scan,
    `from_pandas=True`, costs per value)."""
    single = array.dtype == np.float32
    values = np.ascontiguousarray(array, dtype=np.float32 if single else np.float64)
    missing = np.isnan(values)
    if not missing.any():
        return pa.array(values)
    valid = np.packbits(~missing, bitorder="little")
    return pa.Array.from_buffers(
        pa.float32() if single else pa.float64(),
        len(values),
        [pa.py_buffer(valid), pa.py_buffer(values)],
        int(missing.sum()),
    )


def _column(parts: list[Any], lengths: list[int]) -> pa.Array:
    if isinstance(parts[0], dict):
        names = list(parts[0])
        children = [_column([p[name] for p in parts], lengths) for name in names]
        return pa.StructArray.from_arrays(children, names=names)
    if isinstance(parts[0], np.ndarray | list | tuple | pa.Array):
        return _leaf_array(list(parts))
    if isinstance(parts[0], datetime):
        stamps = [v for v, n in zip(parts, lengths, strict=True) for _ in range(n)]
        return pa.array(stamps, type=pa.timestamp("us", tz="UTC"))
    return pa.array([v for v, n in zip(parts, lengths, strict=True) for _ in range(n)])


def _shape(columns: LogColumns) -> tuple:
    """Items with the same shape are concatenated column by column before Arrow sees them."""
    return tuple(
        (name, _shape(value) if isinstance(value, dict) else type(value).__name__)
        for name, value in columns.items()
    )


def log_table(items: list[LogColumns]) -> pa.Table:
    """One Arrow table from batches of the same shape (column names and struct fields)."""
    lengths = [_length(item) for item in items]
    names = list(items[0])
    return pa.table({name: _column([item[name] for item in items], lengths) for name in names})


class InferenceLog:
    """The worker's prediction, label and rejection logs under `directory`.

    `flush_interval` > 0 (the HTTP service) turns on group commit for predictions: a request
    only queues a closure over the columns it scored; a background thread builds and writes
    one Parquet file of everything queued every `flush_interval` seconds. A worker killed
    mid-load loses at most the last `flush_interval` (plus one write) of predictions. 0 (the
    default, for in-process callers that read the log right away) writes before returning."""

    def __init__(
        self,
        directory: Path,
        worker: str | None = None,
        flush_interval: float = 0.0,
        compact_parts: int = 240,
        merge_below_rows: int = 1000,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.worker = worker or worker_id()
        # Two logs of one process (same worker id: tests, a reloaded service) never share names.
        self.session = uuid.uuid4().hex[:8]
        self._sequence = 0
        # (sequence, path, rows) written since the last compaction
        self._parts: list[tuple[int, Path, int]] = []
        self.compact_parts = compact_parts
        # Only small parts are merged (single-row traffic's many small files): a part of this
        # many rows or more is already a fair file, and merging a million rows of 1000-row
        # batches took the flush thread ~6 s beside the requests.
        self.merge_below_rows = merge_below_rows
        self.labels = JsonLinesWriter(self.directory / f"labels-{self.worker}.jsonl")
        self.rejected = JsonLinesWriter(self.directory / f"rejected-{self.worker}.jsonl")
        self.flush_interval = flush_interval
        # Closures, or (group, builder, payload, args): payloads of one group are built together.
        self._pending: list[Any] = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self.flushing = False  # writing on the flush thread (it has a core)
        # Called before each step of a flush (building, writing): the service waits
        # there for the prediction in flight to end, then marks the log `flushing` (so the
        # next prediction leaves the core to it). None: just mark it.
        self.before_work: Callable[[], None] | None = None
        if flush_interval > 0:
            self._flusher = threading.Thread(
                target=self._flush_every, daemon=True, name="inference-log-flush"
            )
            self._flusher.start()
            atexit.register(self.flush)

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)

    def files(self) -> list[Path]:
        """This log's prediction files (its own, not other workers' or sessions')."""
        return sorted(self.directory.glob(f"predictions-{self.worker}.{self.session}.*.parquet"))

    def submit(self, columns: Callable[[], LogColumns]) -> None:
        """Log the batch `columns()` returns: now, or at the next group commit."""
        if self.flush_interval <= 0:
            with self._flush_lock:
                self._write([columns()])
            return
        with self._pending_lock:
            self._pending.append(columns)

    def submit_group(
        self,
        group: Any,
        builder: Callable[..., LogColumns],
        payload: Any,
        *args: Any,
    ) -> None:
        """Log `builder([payload, ...], *args)`: at the next group commit, every payload queued
        under the same `group` (same builder and args) goes to one call, so many small requests
        build their columns once (now when there is no group commit)."""
        if self.flush_interval <= 0:
            with self._flush_lock:
                self._write([builder([payload], *args)])
            return
        with self._pending_lock:
            self._pending.append((group, builder, payload, args))

    def flush(self) -> None:
        """Build and write every queued prediction (one file per batch shape, usually one)."""
        with self._flush_lock:
            with self._pending_lock:
                pending, self._pending = self._pending, []
            if pending:
                self._begin_work()
            try:
                builds: list[Callable[[], LogColumns]] = []
                groups: dict[Any, tuple[Callable[..., LogColumns], list[Any], tuple]] = {}
                for entry in pending:
                    if callable(entry):
                        builds.append(entry)
                        continue
                    group, builder, payload, args = entry
                    if group not in groups:
                        groups[group] = (builder, [], args)
                        builds.append(lambda g=groups[group]: g[0](g[1], *g[2]))
                    groups[group][1].append(payload)
                items = []
                for build in builds:
                    try:
                        items.append(build())
                    except Exception:  # one bad batch must not stop the log
                        logging.getLogger(__name__).exception(
                            "inference log: a batch failed to build"
                        )
                if pending:
                    self._between_steps()  # a prediction may pass between build and write
                self._write(items)
            finally:
                self.flushing = False

    def _begin_work(self) -> None:
        if self.before_work is not None:
            self.before_work()
        else:
            self.flushing = True

    def _between_steps(self) -> None:
        self.flushing = False
        self._begin_work()

    def _write(self, items: list[LogColumns]) -> None:
        groups: dict[tuple, list[LogColumns]] = {}
        for item in items:
            if _length(item):
                groups.setdefault(_shape(item), []).append(item)
        for group in groups.values():
            sequence = self._sequence
            self._sequence += 1
            path = self.directory / (
                f"predictions-{self.worker}.{self.session}.{sequence:08d}.parquet"
            )
            table = log_table(group)
            _write_parquet(table, path)
            self._parts.append((sequence, path, table.num_rows))
        if len(self._parts) >= self.compact_parts:
            self._compact()

    def _compact(self) -> None:
        """Merge each run of consecutive small parts written since the last compaction into one
        file (`<first>-<last>`), then delete them. A merged file covers every sequence number
        in its range, so only consecutive parts are merged; parts of `merge_below_rows` rows or
        more stay as they are. The merged file appears (rename) before any part goes: readers
        see each row once."""
        parts, self._parts = self._parts, []
        runs: list[list[tuple[int, Path, int]]] = [[]]
        for part in parts:
            sequence, _path, rows = part
            follows = runs[-1] and runs[-1][-1][0] + 1 == sequence
            if rows >= self.merge_below_rows:
                runs.append([])
            elif follows or not runs[-1]:
                runs[-1].append(part)
            else:
                runs.append([part])
        for run in runs:
            if len(run) >= 2:
                self._merge(run)

    def _merge(self, parts: list[tuple[int, Path, int]]) -> None:
        try:
            tables = [pq.read_table(path) for _, path, _rows in parts]
            merged = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
            logging.getLogger(__name__).exception("inference log: parts not merged")
            return
        first, last = parts[0][0], parts[-1][0]
        _write_parquet(
            merged,
            self.directory
            / f"predictions-{self.worker}.{self.session}.{first:08d}-{last:08d}.parquet",
        )
        for _, path, _rows in parts:
            path.unlink(missing_ok=True)

    def _flush_every(self) -> None:
        _name_os_thread(FLUSH_THREAD)
        while not self._stop.wait(self.flush_interval):
            self.flush()

    def write_predictions(
        self,
        request_ids: list[str],
        model_version: str,
        predictions: Any,
        event_times: Any,
        ids: dict[str, Any],
        features: dict[str, Any],
        shadow: dict[str, Any] | None = None,
    ) -> None:
        """One row per prediction (see `prediction_columns`)."""
        now = self.now()
        self.submit(
            lambda: prediction_columns(
                request_ids, now, model_version, predictions, event_times, ids, features, shadow
            )
        )

    def close(self) -> None:
        self._stop.set()
        self.flush()
        with self._flush_lock:
            if len(self._parts) > 1:
                self._compact()
        for writer in (self.labels, self.rejected):
            writer.close()


POLARS_FROM_ROWS = 2000  # smaller files: pyarrow's writer (less fixed cost per file)


def _write_parquet(table: pa.Table, path: Path) -> None:
    """The whole file under a hidden name, then renamed: it appears complete or not at all.

    A commit of `POLARS_FROM_ROWS` rows or more is written by Polars' Parquet writer (Rust):
    a 25,000-row flush of the flights log (53 columns) takes ~19-24 ms of CPU there against
    ~30-37 ms in pyarrow's. A small one (single-row traffic) by pyarrow's, whose fixed cost
    per file is lower (78 rows: ~1.7-2.7 ms against ~4 ms). DuckDB reads both the same
    (dictionary text -> VARCHAR). One row group per file, with min/max statistics (pyarrow:
    of the top-level columns, what readers filter on) so readers can skip files by time."""
    temporary = path.with_name(f".{path.name}.tmp")
    if table.num_rows >= POLARS_FROM_ROWS:
        pl.from_arrow(table).write_parquet(
            temporary, compression="snappy", statistics=True, row_group_size=table.num_rows
        )
    else:
        # No Arrow schema stored: dictionary-encoded text reads back (and merges) as plain
        # text. No statistics for the ~50 features and ids inside the structs (15% of the write).
        top = [f.name for f in table.schema if not pa.types.is_struct(f.type)]
        pq.write_table(
            table,
            temporary,
            compression="snappy",
            store_schema=False,
            write_statistics=top,
            row_group_size=max(table.num_rows, 1),
        )
    os.replace(temporary, path)


def prediction_columns(
    request_ids: list[str] | pa.Array,
    now: datetime | pa.Array,
    model_version: str,
    predictions: Any,
    event_times: Any,
    ids: dict[str, Any],
    features: dict[str, Any],
    shadow: dict[str, Any] | None = None,
) -> LogColumns:
    """A batch's log rows as columns (numpy arrays or lists; float NaN = null):
    {request_id, logged_at, event_time, model_version, ids: {...}, features: {...},
    prediction[, shadow: {model_version, prediction, ...}]}. `now`: one time for the batch, or
    an Arrow timestamp array, one per row (requests merged at a group commit)."""
    if isinstance(event_times, np.ndarray) and event_times.dtype.kind == "M":
        event_times = event_times.astype("datetime64[us]")
    elif not isinstance(event_times, np.ndarray):
        event_times = list(event_times)
    columns: LogColumns = {
        "request_id": request_ids if isinstance(request_ids, pa.Array) else list(request_ids),
        "logged_at": now,
        "event_time": event_times,
        "model_version": model_version,
        "ids": dict(ids),
        "features": dict(features),
        "prediction": predictions,
    }
    if shadow is not None:
        columns["shadow"] = {
            "model_version": shadow["model_version"],
            **{
                {"predictions": "prediction", "labels": "label"}.get(key, key): value
                for key, value in shadow.items()
                if key != "model_version"
            },
        }
    return columns


def prediction_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(Parquet files, JSON-lines files of older versions) holding the logged predictions: a
    part a merged file of the same session covers is left out (its rows are in the merge)."""
    directory = Path(directory)
    merged: dict[tuple[str, str], list[tuple[int, int]]] = {}
    parts = []
    for path in sorted(directory.glob("predictions-*.parquet")):
        match = _PART.match(path.name)
        if match is None:
            parts.append((path, None))
            continue
        slot = (match["worker"], match["session"])
        first = int(match["first"])
        if match["last"] is not None:
            merged.setdefault(slot, []).append((first, int(match["last"])))
        parts.append((path, (slot, first, match["last"])))
    files = []
    for path, where in parts:
        if where is not None and where[2] is None:
            slot, sequence, _ = where
            if any(low <= sequence <= high for low, high in merged.get(slot, [])):
                continue
        files.append(path)
    legacy = [p for p in sorted(directory.glob("predictions-*.jsonl")) if p.stat().st_size > 0]
    return files, legacy


def _listing(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def predictions_sql(directory: Path, filename: bool = False) -> str | None:
    """A SELECT over every logged prediction in `directory` (None if there is none yet);
    `filename` adds the column `filename` (the file a row is in)."""
    files, legacy = prediction_files(directory)
    selects = []
    with_name = ", filename=true" if filename else ""
    if files:
        selects.append(
            f"SELECT * FROM read_parquet({_listing(files)}, union_by_name=true{with_name})"
        )
    if legacy:
        # sample_size=-1: the schema is read from every line. With DuckDB's default sample
        # (20,480 lines) a key first seen later (`shadow`, a feature that was always null so
        # far) is silently dropped, or read as NULL.
        selects.append(
            f"SELECT * FROM read_json({_listing(legacy)}, format='newline_delimited', "
            f"union_by_name=true, sample_size=-1{with_name})"
        )
    if not selects:
        return None
    return " UNION ALL BY NAME ".join(selects)


def read_predictions(
    directory: Path, conn: duckdb.DuckDBPyConnection | None = None, filename: bool = False
):
    """All logged predictions as a DuckDB relation (empty folder -> None)."""
    sql = predictions_sql(directory, filename=filename)
    if sql is None:
        return None
    conn = conn or duckdb.connect()
    return conn.sql(sql)
