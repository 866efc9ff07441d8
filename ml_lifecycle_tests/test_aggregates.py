"""Point-in-time history aggregates: exact windows, lag, and nothing known after the prediction."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from ml_lifecycle.data.aggregates import aggregate_frame
from ml_lifecycle.data.cleaning import clean
from ml_lifecycle.data.features import (
    build_features_sql,
    create_features_table,
    fit_feature_state,
)
from ml_lifecycle.data.ingestion import ingest_files
from ml_lifecycle.data.sources import list_files
from ml_lifecycle_tests.conftest import make_spec, write

HEADER = "sale_id,store,shelf,sold_at,settled_at,amount\n"


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    yield connection
    connection.close()


@pytest.fixture(params=["arrays", "sql"])
def implementation(request: pytest.FixtureRequest) -> str:
    """Every behaviour test runs against both implementations of the one definition: the
    array one the pipeline runs (`aggregate_frame`, joined by row id) and the SQL reference
    (`aggregate_sql`)."""
    return request.param


def aggregates_of(
    conn: duckdb.DuckDBPyConnection, folder: Path, csv_body: str, aggregates: list[dict[str, Any]],
    implementation: str = "arrays",
) -> dict[int, dict[str, Any]]:
    """Ingest the sales, clean them, build the features; sale_id -> aggregate columns."""
    write(folder / "landing" / "sales.csv", HEADER + csv_body)
    spec = make_spec(folder, {
        "name": "sales",
        "task": "regression",
        "source": {"path": "landing/sales.csv"},
        "target": "amount",
        "time_column": "sold_at",
        "id_columns": ["sale_id"],
        "aggregates": aggregates,
    })
    ingest_files(conn, "raw_sales", spec.source, list_files(spec, spec.source))
    plan, _ = clean(conn, spec)
    state = fit_feature_state(conn, spec, plan.roles)
    if implementation == "arrays":
        aligned = aggregate_frame(conn, spec)
        assert aligned is not None
        conn.register("__aggregates", aligned)
        sql = build_features_sql(spec, state, aggregates_by_rowid="__aggregates")
    else:
        sql = build_features_sql(spec, state)
    relation = conn.sql(sql)
    names = [c for a in spec.aggregates for c in a.output_columns()]
    rows = relation.select(", ".join(["sale_id", *names])).fetchall()
    return {row[0]: dict(zip(names, row[1:], strict=True)) for row in rows}


def test_window_and_lag_give_exact_statistics(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection, implementation: str
) -> None:
    got = aggregates_of(conn, tmp_path, (
        "1,A,1,2024-01-01 10:00,2024-01-01 10:00,10\n"
        "2,A,1,2024-01-01 10:30,2024-01-01 10:30,20\n"
        "3,A,1,2024-01-01 11:00,2024-01-01 11:00,30\n"
        "4,A,1,2024-01-01 12:00,2024-01-01 12:00,40\n"
        "5,A,1,2024-01-01 13:15,2024-01-01 13:15,50\n"
        "6,B,2,2024-01-01 10:45,2024-01-01 10:45,100\n"
        "7,B,2,2024-01-01 11:30,2024-01-01 11:30,200\n"
    ), [{"name": "store_amount", "keys": ["store"], "value": "amount", "window": "1h",
         "lag": "15m", "statistics": ["mean", "count", "max"]}], implementation)

    # For a sale at t: amounts of the same store sold within [t - 15m - 1h, t - 15m].
    expected = {
        1: (None, 0, None),   # A 10:00 -> [08:45, 09:45]: nothing
        2: (10.0, 1, 10.0),   # A 10:30 -> [09:15, 10:15]: 10
        3: (15.0, 2, 20.0),   # A 11:00 -> [09:45, 10:45]: 10, 20
        4: (30.0, 1, 30.0),   # A 12:00 -> [10:45, 11:45]: 30
        5: (40.0, 1, 40.0),   # A 13:15 -> [12:00, 13:00]: 40 (the window includes its start)
        6: (None, 0, None),   # B 10:45 -> [09:30, 10:30]: store A's sales do not count
        7: (100.0, 1, 100.0),  # B 11:30 -> [10:15, 11:15]: 100
    }
    assert {
        sale: (row["store_amount_mean"], row["store_amount_count"], row["store_amount_max"])
        for sale, row in got.items()
    } == expected


def test_a_value_known_after_t_minus_lag_is_not_counted(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection, implementation: str
) -> None:
    got = aggregates_of(conn, tmp_path, (
        # sale 20 happened at 09:00 but was only settled (known) at 11:00
        "20,C,3,2024-01-01 09:00,2024-01-01 11:00,100\n"
        "21,C,3,2024-01-01 09:30,2024-01-01 09:30,50\n"
        "22,C,3,2024-01-01 10:45,2024-01-01 10:45,1\n"
        "24,C,3,2024-01-01 11:20,2024-01-01 11:20,3\n"
        "23,C,3,2024-01-01 11:45,2024-01-01 11:45,2\n"
        "25,C,3,2024-01-01 12:15,2024-01-01 12:15,4\n"
    ), [{"name": "settled", "keys": ["store"], "value": "amount", "known_at": "settled_at",
         "window": "3h", "lag": "30m", "statistics": ["mean", "count"]}], implementation)

    stats = {sale: (row["settled_mean"], row["settled_count"]) for sale, row in got.items()}
    # 10:45 -> known by 10:15: only 21 (20's event time 09:00 is earlier, but it was known at 11:00)
    assert stats[22] == (50.0, 1)
    # 11:20 -> known by 10:50: 21 and 22; still not 20
    assert stats[24] == ((50 + 1) / 2, 2)
    # 11:45 -> known by 11:15: now 20 counts too (24, known at 11:20, does not)
    assert stats[23] == pytest.approx(((50 + 100 + 1) / 3, 3))
    # 12:15 -> known by 11:45: 23 was known exactly at 11:45 and counts
    assert stats[25] == pytest.approx(((50 + 100 + 1 + 3 + 2) / 5, 5))
    assert stats[20] == (None, 0)


def test_rows_without_a_key_get_null_aggregates_and_feed_no_one(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection, implementation: str
) -> None:
    got = aggregates_of(conn, tmp_path, (
        "1,A,1,2024-01-01 10:00,2024-01-01 10:00,10\n"
        "2,,,2024-01-01 10:30,2024-01-01 10:30,300\n"
        "3,,,2024-01-01 11:30,2024-01-01 11:30,500\n"
        "4,A,1,2024-01-01 12:00,2024-01-01 12:00,40\n"
    ), [
        {"name": "by_store", "keys": ["store"], "value": "amount", "window": "1d"},  # text key
        {"name": "by_shelf", "keys": ["shelf"], "value": "amount", "window": "1d"},  # number key
    ], implementation)

    for sale in (2, 3):
        assert got[sale] == {"by_store_mean": None, "by_store_count": None,
                             "by_shelf_mean": None, "by_shelf_count": None}
    # sale 4 sees only sale 1 (and itself: known at its own time, lag 0), never the keyless ones
    assert got[4]["by_store_mean"] == got[4]["by_shelf_mean"] == 25.0
    assert got[4]["by_store_count"] == got[4]["by_shelf_count"] == 2


def test_array_implementation_equals_the_sql_definition_on_random_histories(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    """Random sales (ties, missing keys, late settlements, two keys) and every statistic: the
    pipeline's array implementation gives what the SQL definition gives, row for row."""
    rng = random.Random(7)
    lines = []
    for sale in range(1, 1501):
        minute = rng.randrange(0, 3 * 24 * 60, 5)  # whole 5 minutes: many exact ties
        sold = datetime(2024, 1, 1) + timedelta(minutes=minute)
        settled = sold + timedelta(minutes=rng.choice([0, 0, 10, 90, 400]))
        store = rng.choice(["A", "B", "C", "D", ""])
        shelf = rng.choice(["1", "2", "3", ""])
        amount = rng.choice([f"{rng.uniform(-50, 500):.3f}", "", "1e3"])
        lines.append(f"{sale},{store},{shelf},{sold:%Y-%m-%d %H:%M},{settled:%Y-%m-%d %H:%M},"
                     f"{amount}\n")
    statistics = ["mean", "sum", "count", "min", "max", "std"]
    aggregates = [
        {"name": "store_2h", "keys": ["store"], "value": "amount", "known_at": "settled_at",
         "window": "2h", "lag": "20m", "statistics": statistics},
        {"name": "store_shelf_1d", "keys": ["store", "shelf"], "value": "amount",
         "window": "1d", "lag": "0m", "statistics": statistics},
        # shares store_2h's known_at and value (the arrays share their time order) on a number key
        {"name": "shelf_3h", "keys": ["shelf"], "value": "amount", "known_at": "settled_at",
         "window": "3h", "lag": "1h", "statistics": ["mean", "count", "max"]},
    ]
    arrays = aggregates_of(conn, tmp_path, "".join(lines), aggregates, "arrays")
    sql = aggregates_of(conn, tmp_path, "".join(lines), aggregates, "sql")
    assert arrays.keys() == sql.keys() and len(arrays) == 1500
    compared = 0
    for sale, expected in sql.items():
        for column, value in expected.items():
            got = arrays[sale][column]
            if value is None:
                assert got is None, (sale, column, got)
            else:
                # std comes from differences of running sums of squares: a little less exact.
                tolerance = 1e-6 if column.endswith("_std") else 1e-9
                assert got == pytest.approx(value, rel=tolerance, abs=tolerance), (sale, column)
                compared += 1
    assert compared > 10_000  # most windows are not empty: the comparison has teeth


def test_features_built_in_slices_equal_one_statement_even_with_rows_deleted(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    """`create_features_table` joins the aggregates a rowid range at a time; rows deleted from
    `cleaned` (gaps in rowid) must not shift any row's values: every slicing gives the table the
    SQL definition builds in one statement."""
    rng = random.Random(11)
    lines = "".join(
        f"{sale},{rng.choice('ABC')},1,2024-01-01 {rng.randrange(0, 24):02d}:{rng.randrange(60):02d},"
        f"2024-01-02 00:00,{rng.randrange(100)}\n" for sale in range(1, 201))
    write(tmp_path / "landing" / "sales.csv", HEADER + lines)
    spec = make_spec(tmp_path, {
        "name": "sales", "task": "regression", "source": {"path": "landing/sales.csv"},
        "target": "amount", "time_column": "sold_at", "id_columns": ["sale_id"],
        "aggregates": [{"name": "store_2h", "keys": ["store"], "value": "amount",
                        "window": "2h", "lag": "10m", "statistics": ["mean", "count", "max"]}],
    })
    ingest_files(conn, "raw_sales", spec.source, list_files(spec, spec.source))
    plan, _ = clean(conn, spec)
    conn.execute("DELETE FROM cleaned WHERE sale_id % 7 = 0")  # rowid gaps
    state = fit_feature_state(conn, spec, plan.roles)
    create_features_table(conn, spec, state, None, table="by_sql")
    expected = conn.execute("SELECT * FROM by_sql ORDER BY sale_id").fetchall()
    assert len(expected) == 200 - 28
    for chunk_rows in (1, 13, 1000):
        create_features_table(conn, spec, state, aggregate_frame(conn, spec), table="sliced",
                              chunk_rows=chunk_rows)
        got = conn.execute("SELECT * FROM sliced ORDER BY sale_id").fetchall()
        assert _close(got, expected), chunk_rows


def _close(got: list[tuple], expected: list[tuple]) -> bool:
    assert len(got) == len(expected)
    for row, want in zip(got, expected, strict=True):
        for a, b in zip(row, want, strict=True):
            assert (a is None and b is None) or a == b or a == pytest.approx(b, rel=1e-12), (row, want)
    return True
