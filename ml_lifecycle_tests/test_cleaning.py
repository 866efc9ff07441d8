"""The cleaned table: point-in-time joins, dedup, bad values, missing categories, spec errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from ml_lifecycle.data.cleaning import MISSING_LEVEL, CleaningReport, clean
from ml_lifecycle.data.ingestion import ingest_files
from ml_lifecycle.data.sources import list_files
from ml_lifecycle.spec import TARGET, TIME, DatasetSpec, SpecError
from ml_lifecycle_tests.conftest import make_spec, write

# A tiny hand-made timeline. Station A reports at 10:00, 11:00 and 12:00; station B only at 12:00.
TRIPS = """trip_id,station,started_at,fare,kind,km,tip
1,A,2024-01-01 09:30:00,5.0,short,1,0.5
2,A,2024-01-01 10:00:00,6.0,,2,0.5
3,A,2024-01-01 10:59:00,7.0,long,3,inf
4,A,2024-01-01 12:30:00,8.0,short,-5,0.5
5,A,2024-01-01 16:00:00,9.0,short,4,nan
6,B,2024-01-01 11:00:00,10.0,long,5,0.5
7,A,,11.0,short,6,0.5
"""
READINGS = """station_code,read_at,temp
A,2024-01-01 10:00:00,1.0
A,2024-01-01 11:00:00,2.0
A,2024-01-01 12:00:00,3.0
B,2024-01-01 12:00:00,30.0
"""
STATIONS = """station,city
A,Oslo
B,Bergen
"""


def trips_spec(folder: Path, **extra: Any) -> DatasetSpec:
    data: dict[str, Any] = {
        "name": "trips",
        "task": "regression",
        "source": {"path": "landing/trips/*.csv"},
        "target": "fare",
        "time_column": "started_at",
        "id_columns": ["trip_id"],
        "categorical_columns": ["kind"],
        "valid_ranges": {"km": [0, 100]},
        "references": [
            {"name": "readings", "source": {"path": "landing/readings.csv"},
             "keys": {"station": "station_code"}, "time_column": "read_at", "max_age": "2h"},
            {"name": "stations", "source": {"path": "landing/stations.csv"}, "keys": ["station"]},
        ],
    }
    data.update(extra)
    return make_spec(folder, data)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    write(tmp_path / "landing" / "trips" / "day1.csv", TRIPS)
    write(tmp_path / "landing" / "readings.csv", READINGS)
    write(tmp_path / "landing" / "stations.csv", STATIONS)
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ingest_all(connection, trips_spec(tmp_path))
    yield connection
    connection.close()


def ingest_all(conn: duckdb.DuckDBPyConnection, spec: DatasetSpec) -> None:
    sources = [(spec.primary_name, spec.source)] + [(r.name, r.source) for r in spec.references]
    for name, source in sources:
        ingest_files(conn, f"raw_{name}", source, list_files(spec, source))


def cleaned_rows(conn: duckdb.DuckDBPyConnection, *columns: str) -> dict[int, tuple]:
    selected = ", ".join(columns)
    return {row[0]: row[1:] for row in conn.execute(
        f"SELECT trip_id, {selected} FROM cleaned ORDER BY trip_id").fetchall()}


def run_clean(conn: duckdb.DuckDBPyConnection, spec: DatasetSpec) -> CleaningReport:
    _, report = clean(conn, spec)
    return report


def test_each_row_gets_the_latest_observation_at_or_before_its_time(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    run_clean(conn, trips_spec(tmp_path))

    temps = {trip: row[0] for trip, row in cleaned_rows(conn, "readings_temp").items()}
    assert temps[1] is None   # 09:30: nothing observed yet
    assert temps[2] == 1.0    # 10:00: the 10:00 reading counts (at, not only before)
    assert temps[3] == 1.0    # 10:59: still the 10:00 reading, never the 11:00 one
    assert temps[4] == 3.0    # 12:30: the 12:00 reading
    assert temps[6] is None   # B at 11:00: B's only reading is at 12:00, a later one


def test_max_age_turns_stale_observations_into_null(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    run_clean(conn, trips_spec(tmp_path))
    assert cleaned_rows(conn, "readings_temp")[5] == (None,)  # 16:00: 12:00 is 4h old > 2h

    spec = trips_spec(tmp_path, references=[
        {"name": "readings", "source": {"path": "landing/readings.csv"},
         "keys": {"station": "station_code"}, "time_column": "read_at", "max_age": "5h"},
        {"name": "stations", "source": {"path": "landing/stations.csv"}, "keys": ["station"]},
    ])
    run_clean(conn, spec)
    assert cleaned_rows(conn, "readings_temp")[5] == (3.0,)


def test_a_reference_without_time_joins_on_its_keys(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    run_clean(conn, trips_spec(tmp_path))
    cities = {trip: row[0] for trip, row in cleaned_rows(conn, "stations_city").items()}
    assert cities == {1: "Oslo", 2: "Oslo", 3: "Oslo", 4: "Oslo", 5: "Oslo", 6: "Bergen"}


def test_rows_without_time_are_dropped_and_counted(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    report = run_clean(conn, trips_spec(tmp_path))

    assert report.rows_in == 7
    assert report.rows_without_time == 1
    assert report.rows_out == 6
    assert 7 not in cleaned_rows(conn, TIME)
    times = [row[0] for row in conn.execute(f"SELECT {TIME} FROM cleaned ORDER BY 1").fetchall()]
    assert times[0] == datetime(2024, 1, 1, 9, 30)


def test_out_of_range_and_non_finite_values_become_null_and_are_counted(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    report = run_clean(conn, trips_spec(tmp_path))

    rows = cleaned_rows(conn, "km", "tip")
    assert rows[4][0] is None       # km -5 is outside [0, 100]
    assert rows[1] == (1, 0.5)
    assert rows[3][1] is None       # inf
    assert rows[5][1] is None       # nan
    assert report.values_nulled == {"km": 1, "tip": 2}
    assert not any(isinstance(v, float) and math.isnan(v) for row in rows.values() for v in row)


def test_missing_categories_become_a_level(tmp_path: Path, conn: duckdb.DuckDBPyConnection) -> None:
    run_clean(conn, trips_spec(tmp_path))
    assert cleaned_rows(conn, "kind")[2] == (MISSING_LEVEL,)
    assert conn.execute("SELECT count(*) FROM cleaned WHERE kind IS NULL").fetchall() == [(0,)]


def test_the_target_is_carried_as_target_only(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    run_clean(conn, trips_spec(tmp_path))
    columns = [row[0] for row in conn.execute("DESCRIBE cleaned").fetchall()]

    assert TARGET in columns
    assert "fare" not in columns  # a copy of the target would become a feature
    assert cleaned_rows(conn, TARGET)[6] == (10.0,)


def test_duplicates_keep_the_latest_ingested_row(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    spec = trips_spec(tmp_path)
    write(tmp_path / "landing" / "trips" / "day2.csv",
          "trip_id,station,started_at,fare,kind,km,tip\n"
          "2,A,2024-01-01 10:00:00,60.0,long,2,0.5\n"
          "8,B,2024-01-01 13:00:00,12.0,short,7,0.5\n")
    ingest_all(conn, spec)

    report = run_clean(conn, spec)

    assert report.duplicates_removed == 1
    assert report.rows_out == 7
    assert cleaned_rows(conn, TARGET, "kind")[2] == (60.0, "long")


def test_a_missing_id_column_names_the_key_and_column(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    with pytest.raises(SpecError) as caught:
        clean(conn, trips_spec(tmp_path, id_columns=["nope"]))
    message = str(caught.value)
    assert "id_columns" in message
    assert "'nope'" in message
    assert "trip_id" in message  # what is available
    assert str(tmp_path / "spec.yaml") in message


def test_a_missing_reference_key_names_the_reference(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    spec = trips_spec(tmp_path, references=[
        {"name": "stations", "source": {"path": "landing/stations.csv"},
         "keys": {"station": "station_id"}},
    ])
    with pytest.raises(SpecError, match=r"references\.stations\.keys.*'station_id'"):
        clean(conn, spec)


def test_a_bad_target_expression_names_the_key(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    spec = trips_spec(tmp_path, target=None, target_expression="fare >>> 10")
    with pytest.raises(SpecError) as caught:
        clean(conn, spec)
    assert "target_expression" in str(caught.value)
    assert "fare >>> 10" in str(caught.value)


def test_a_target_expression_derives_the_target(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    spec = trips_spec(tmp_path, task="binary", target=None, target_expression="fare > 7.5",
                      drop_columns=["fare"])
    report = run_clean(conn, spec)

    targets = {trip: row[0] for trip, row in cleaned_rows(conn, TARGET).items()}
    assert targets == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    assert report.rows_without_target == 0
