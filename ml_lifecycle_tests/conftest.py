"""Shared fixtures: a per-test ML_LIFECYCLE_HOME, real DuckDB warehouses, real Dagster runs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from ml_lifecycle.assets.checks import build_validation_checks
from ml_lifecycle.assets.data import build_data_assets
from ml_lifecycle.data.sources import quote
from ml_lifecycle.resources import Warehouse
from ml_lifecycle.spec import DatasetSpec, parse_spec

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ML_LIFECYCLE_HOME for this test (the spec reads it when resolving paths)."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("ML_LIFECYCLE_HOME", str(path))
    return path


def make_spec(folder: Path, data: dict[str, Any], name: str = "spec.yaml") -> DatasetSpec:
    """A spec as if read from `folder/name` (relative source paths resolve against `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    return parse_spec(data, folder / name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def table_fingerprint(conn: duckdb.DuckDBPyConnection, table: str) -> tuple[int, int]:
    """(row count, order-independent checksum of every value) of a table."""
    count, checksum = conn.execute(
        f"SELECT count(*), coalesce(sum(hash(t)), 0) FROM {quote(table)} AS t"
    ).fetchall()[0]
    return int(count), int(checksum)


def count_rows(conn: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {quote(table)}").fetchall()[0][0])


@contextmanager
def warehouse_connection(database: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection with the Warehouse resource's own settings (DuckDB refuses to open one file
    twice in a process with different settings)."""
    with Warehouse(database=str(database)).get_connection() as conn:
        yield conn


def materialize_data_stage(
    spec: DatasetSpec, database: Path, selection: list[str] | None = None
) -> dg.ExecuteInProcessResult:
    """Run stage 1 (raw_*, cleaned, features and their checks) through Dagster, in process."""
    return dg.materialize(
        [*build_data_assets(spec), *build_validation_checks(spec)],
        selection=selection,
        resources={"warehouse": Warehouse(database=str(database))},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def materialized_keys(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def materialization_metadata(result: dg.ExecuteInProcessResult, key: str) -> dict[str, Any]:
    events = [e for e in result.get_asset_materialization_events()
              if e.asset_key.to_user_string() == key]
    assert len(events) == 1, f"expected one materialization of {key}, found {len(events)}"
    return {k: v.value for k, v in events[0].materialization.metadata.items()}


def check_evaluations(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    """asset key -> its great_expectations check evaluation in this run."""
    return {e.asset_key.to_user_string(): e for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The machine's PostgreSQL (trust auth); the test is skipped when it is not up."""
    pg_isready = shutil.which("pg_isready")
    if pg_isready is None:
        pytest.skip("pg_isready is not installed")
    ready = subprocess.run([pg_isready, "-h", PG_HOST, "-p", str(PG_PORT), "-t", "3"],
                           capture_output=True, check=False)
    if ready.returncode != 0:
        pytest.skip(f"PostgreSQL is not accepting connections on {PG_HOST}:{PG_PORT}")
    return PG_URL
