"""Experiment tracking: every training run and search trial is a row in the `experiments` table.

Columns: run id, kind (train|trial), time, duration, params, data snapshot id (hash of the
ingested files behind the features), code version (params hash), git commit, validation and test
metrics, model version and status (registered, promoted, refused). Queryable with DuckDB.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime
from typing import Any

import duckdb

from ml_lifecycle.data.ingestion import MANIFEST
from ml_lifecycle.settings import REPO_ROOT

TABLE = "experiments"


def ensure_table(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            run_id VARCHAR, kind VARCHAR, started_at TIMESTAMP, duration_s DOUBLE,
            params JSON, data_snapshot VARCHAR, feature_state_version INTEGER,
            code_version VARCHAR, git_commit VARCHAR, rows JSON,
            valid_metrics JSON, test_metrics JSON, model_version VARCHAR, status VARCHAR)"""
    )


def data_snapshot_id(conn: duckdb.DuckDBPyConnection) -> str:
    """A hash of exactly which landing files (by content) the warehouse was built from."""
    rows = conn.execute(
        f"SELECT table_name, path, sha256 FROM {MANIFEST} ORDER BY ALL").fetchall()
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def record(conn: duckdb.DuckDBPyConnection, **row: Any) -> None:
    ensure_table(conn)
    columns = ["run_id", "kind", "started_at", "duration_s", "params", "data_snapshot",
               "feature_state_version", "code_version", "git_commit", "rows", "valid_metrics",
               "test_metrics", "model_version", "status"]
    values = []
    for column in columns:
        value = row.get(column)
        if column in ("params", "rows", "valid_metrics", "test_metrics") and value is not None:
            value = json.dumps(json_safe(value), default=_nan_safe)
        if column == "started_at" and value is None:
            value = datetime.now(UTC).replace(tzinfo=None)
        values.append(value)
    placeholders = ", ".join("?" for _ in columns)
    conn.execute(f"INSERT INTO {TABLE} ({', '.join(columns)}) VALUES ({placeholders})", values)


def _nan_safe(value: Any) -> Any:
    return str(value)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def update(conn: duckdb.DuckDBPyConnection, model_version: str, **changes: Any) -> None:
    ensure_table(conn)
    for column, value in changes.items():
        if column in ("test_metrics", "valid_metrics", "rows"):
            value = json.dumps(json_safe(value), default=_nan_safe)
        conn.execute(f"UPDATE {TABLE} SET {column} = ? WHERE model_version = ? AND kind = 'train'",
                     [value, model_version])


def comparison(conn: duckdb.DuckDBPyConnection, limit: int = 20) -> list[dict[str, Any]]:
    """The latest training runs, newest first, with their main figures."""
    ensure_table(conn)
    frame = conn.sql(
        f"SELECT started_at, run_id, model_version, status, code_version, data_snapshot, "
        f"duration_s, valid_metrics, test_metrics, params FROM {TABLE} WHERE kind = 'train' "
        f"ORDER BY started_at DESC LIMIT {int(limit)}").pl()
    return frame.to_dicts()
