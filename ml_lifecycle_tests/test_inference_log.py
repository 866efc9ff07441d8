"""The prediction log's files: Parquet per flush, merged parts, old JSON-lines logs, all read
through `read_predictions` (and the lineage lookup) by DuckDB."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq

from ml_lifecycle.monitoring.lineage import find_prediction
from ml_lifecycle.serving.inference_log import (
    POLARS_FROM_ROWS,
    InferenceLog,
    prediction_files,
    read_predictions,
)


def _log_batch(log: InferenceLog, batch: int, rows: int = 4) -> list[str]:
    ids = [f"b{batch}-{i}" for i in range(rows)]
    log.write_predictions(
        ids,
        "v0001",
        np.linspace(0.1, 0.9, rows),
        np.array(["2013-05-01T10:00"] * rows, dtype="datetime64[us]"),
        {"trip_id": np.arange(rows) + 100 * batch},
        {
            "distance": np.array([1.5, np.nan, 3.0, 4.0][:rows]),
            "origin": np.array(["EWR", None, "JFK", "LGA"][:rows], dtype=object),
        },
    )
    return ids


def _log_rows(log: InferenceLog, prefix: str, rows: int, features: dict[str, np.ndarray]) -> None:
    """`rows` predictions of one time, ids `<prefix><row>`, with these feature columns."""
    log.write_predictions(
        [f"{prefix}{i}" for i in range(rows)],
        "v0001",
        np.linspace(0.0, 1.0, rows),
        np.full(rows, np.datetime64("2013-05-01T10:00", "us")),
        {"trip_id": np.arange(rows)},
        features,
    )


def _count(directory: Path) -> tuple[int, int]:
    conn = duckdb.connect()
    relation = read_predictions(directory, conn)
    assert relation is not None
    relation.create_view("predictions")
    return conn.sql("SELECT count(*), count(DISTINCT request_id) FROM predictions").fetchall()[0]


def test_parts_are_merged_and_a_crash_before_the_deletes_duplicates_nothing(tmp_path: Path):
    log = InferenceLog(tmp_path, worker="host-1", compact_parts=3)
    ids = [i for batch in range(7) for i in _log_batch(log, batch)]
    names = sorted(p.name for p in tmp_path.glob("predictions-*.parquet"))
    session = log.session
    assert names == [
        f"predictions-host-1.{session}.00000000-00000002.parquet",
        f"predictions-host-1.{session}.00000003-00000005.parquet",
        f"predictions-host-1.{session}.00000006.parquet",
    ]
    assert _count(tmp_path) == (len(ids), len(ids))

    # A worker killed after renaming a merged file, before deleting its parts: both are on
    # disk, each row is still read once.
    merged = tmp_path / names[0]
    part = pq.read_table(merged).slice(4, 4)  # batch 1
    pq.write_table(part, tmp_path / f"predictions-host-1.{session}.00000001.parquet")
    # ... and a file it was writing when killed (hidden, unfinished) is never read.
    (tmp_path / f".predictions-host-1.{session}.00000007.parquet.tmp").write_bytes(b"PAR1\x00")
    assert _count(tmp_path) == (len(ids), len(ids))
    files, _ = prediction_files(tmp_path)
    assert [f.name for f in files] == names

    log.close()  # merges what is left
    assert _count(tmp_path) == (len(ids), len(ids))


def test_rows_keep_their_values_and_types(tmp_path: Path):
    log = InferenceLog(tmp_path, worker="w")
    _log_batch(log, 0)
    _log_batch(log, 1, rows=1)  # a single row: same columns
    conn = duckdb.connect()
    rows = (
        read_predictions(tmp_path, conn)
        .order("request_id")
        .select("request_id, event_time, ids.trip_id, features, prediction, logged_at")
        .fetchall()
    )
    assert [r[0] for r in rows] == ["b0-0", "b0-1", "b0-2", "b0-3", "b1-0"]
    assert rows[1][1] == datetime(2013, 5, 1, 10, 0)
    assert rows[4][2] == 100
    assert rows[1][3] == {"distance": None, "origin": None}  # NaN and None are nulls
    assert rows[2][3] == {"distance": 3.0, "origin": "JFK"}
    assert rows[0][4] == 0.1
    assert rows[0][5].tzinfo is not None


def test_group_commit_writes_without_being_asked(tmp_path: Path):
    log = InferenceLog(tmp_path, worker="w", flush_interval=0.1)
    try:
        ids = _log_batch(log, 0)
        assert not list(tmp_path.glob("predictions-*.parquet"))  # queued, not written yet
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not list(tmp_path.glob("predictions-*.parquet")):
            time.sleep(0.02)
        assert _count(tmp_path) == (len(ids), len(ids))
    finally:
        log.close()


def test_json_lines_logs_of_older_versions_are_read_beside_parquet(tmp_path: Path):
    old = {
        "request_id": "old-1",
        "logged_at": "2026-11-01T10:00:00.000000+00:00",
        "event_time": "2013-04-30T09:00:00.000000",
        "model_version": "v0000",
        "ids": {"trip_id": 7},
        "features": {"distance": 2.5, "origin": "EWR"},
        "prediction": 0.75,
    }
    (tmp_path / "predictions-host-9.jsonl").write_text(json.dumps(old) + "\n")
    (tmp_path / "predictions-host-8.jsonl").write_text("")  # a worker that never scored
    log = InferenceLog(tmp_path, worker="w")
    _log_batch(log, 0)
    conn = duckdb.connect()
    read_predictions(tmp_path, conn).create_view("predictions")
    rows = conn.sql(
        "SELECT request_id, features.distance, CAST(event_time AS TIMESTAMP) FROM predictions "
        "WHERE request_id IN ('old-1', 'b0-2') ORDER BY request_id"
    ).fetchall()
    assert rows == [
        ("b0-2", 3.0, datetime(2013, 5, 1, 10, 0)),
        ("old-1", 2.5, datetime(2013, 4, 30, 9, 0)),
    ]

    found = find_prediction(tmp_path, "old-1")
    assert found["prediction"] == 0.75 and found["log_file"].endswith("predictions-host-9.jsonl")
    found = find_prediction(tmp_path, "b0-3")
    assert found["model_version"] == "v0001" and found["log_file"].endswith(".parquet")


def test_an_empty_folder_has_no_predictions(tmp_path: Path):
    assert read_predictions(tmp_path) is None
    shutil.rmtree(tmp_path)
    assert read_predictions(tmp_path) is None


def test_a_group_commit_lets_predictions_pass_between_build_and_write(tmp_path: Path):
    """The flush thread calls the service's hook before building and again before writing
    (where a prediction in flight ends first), and writes the commit as one file; a request
    writing its own batch (no group commit) never waits there."""
    rows = 10_000
    seen: list[bool] = []

    def log_rows(log: InferenceLog, prefix: str) -> None:
        _log_rows(log, prefix, rows, {"distance": np.arange(rows, dtype=np.float64)})

    queued = InferenceLog(tmp_path / "queued", worker="w", flush_interval=3600.0)
    immediate = InferenceLog(tmp_path / "immediate", worker="w")
    for log in (queued, immediate):
        log.before_work = lambda log=log: (
            seen.append(log.flushing),
            setattr(log, "flushing", True),
        )
    try:
        log_rows(queued, "q")
        assert not queued.files() and not seen  # queued until the flush
        queued.flush()
        # Before building, before the write.
        assert seen == [False, False]
        assert not queued.flushing
        (path,) = queued.files()
        assert pq.ParquetFile(path).metadata.num_rows == rows
        assert _count(tmp_path / "queued") == (rows, rows)
        log_rows(immediate, "i")
        assert len(seen) == 2 and not immediate.flushing
        assert _count(tmp_path / "immediate") == (rows, rows)
    finally:
        queued.close()
        immediate.close()


def test_only_runs_of_small_parts_are_merged(tmp_path: Path):
    """A part of `merge_below_rows` rows or more stays as written (merging big batches cost the
    flush thread seconds); the small parts on either side merge into their own files, and a
    merged file never covers a big part's sequence number."""
    log = InferenceLog(tmp_path, worker="host-1", compact_parts=6, merge_below_rows=4)
    ids = _log_batch(log, 0, rows=2) + _log_batch(log, 1, rows=3)  # small: 0, 1
    ids += _log_batch(log, 2, rows=4)  # big: 2
    ids += _log_batch(log, 3, rows=1) + _log_batch(log, 4, rows=2)  # small: 3, 4
    ids += _log_batch(log, 5, rows=4)  # big: 5 (the sixth part: compaction)
    session = log.session
    assert sorted(p.name for p in tmp_path.glob("predictions-*.parquet")) == [
        f"predictions-host-1.{session}.00000000-00000001.parquet",
        f"predictions-host-1.{session}.00000002.parquet",
        f"predictions-host-1.{session}.00000003-00000004.parquet",
        f"predictions-host-1.{session}.00000005.parquet",
    ]
    assert _count(tmp_path) == (len(ids), len(ids))
    log.close()
    assert _count(tmp_path) == (len(ids), len(ids))


def test_big_and_small_commits_read_and_merge_alike(tmp_path: Path):
    """A commit of POLARS_FROM_ROWS rows or more is written by Polars (its Parquet keeps Arrow's
    dictionary types), a smaller one by pyarrow (plain types): DuckDB reads both the same, and
    the two kinds merge into one file with every row once."""
    log = InferenceLog(tmp_path, worker="w", compact_parts=10**6, merge_below_rows=10**9)
    big = POLARS_FROM_ROWS + 5
    levels = np.array(["EWR", "JFK", None, "LGA"], dtype=object)
    for batch, rows in enumerate((big, 3)):
        features = {"origin": levels[np.arange(rows) % 4], "distance": np.arange(rows, dtype=float)}
        _log_rows(log, f"b{batch}-", rows, features)
    big_file, small_file = log.files()
    assert b"ARROW:schema" in (pq.read_metadata(big_file).metadata or {})  # Polars wrote it
    assert b"ARROW:schema" not in (pq.read_metadata(small_file).metadata or {})
    conn = duckdb.connect()

    def origins() -> list[tuple]:
        relation = read_predictions(tmp_path, conn)
        assert relation is not None
        return relation.query(
            "p",
            "SELECT features.origin, count(*), count(DISTINCT request_id) FROM p "
            "GROUP BY ALL ORDER BY 1 NULLS LAST",
        ).fetchall()

    before = origins()
    assert sum(count for _, count, _ in before) == big + 3
    assert [value for value, _, _ in before] == ["EWR", "JFK", "LGA", None]
    assert all(count == distinct for _, count, distinct in before)
    log.close()  # compaction: the two parts are one run of "small" parts here
    (merged,) = log.files()
    assert "-" in merged.name.split(".")[-2]
    assert origins() == before
