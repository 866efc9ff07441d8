"""Ingestion of landing files (and a PostgreSQL table) into raw DuckDB tables."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import polars as pl
import pytest

from ml_lifecycle.data.ingestion import (
    MANIFEST,
    SOURCE_FILE,
    IngestError,
    IngestReport,
    ingest_files,
    ingest_sql_table,
)
from ml_lifecycle.data.sources import list_files
from ml_lifecycle.spec import DatasetSpec
from ml_lifecycle_tests.conftest import count_rows, make_spec, table_fingerprint, write

TABLE = "raw_sales"


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    yield connection
    connection.close()


def sales_spec(folder: Path, pattern: str) -> DatasetSpec:
    return make_spec(folder, {
        "name": "sales",
        "task": "regression",
        "source": {"path": f"landing/{pattern}"},
        "target": "amount",
    })


def ingest(conn: duckdb.DuckDBPyConnection, spec: DatasetSpec) -> IngestReport:
    return ingest_files(conn, TABLE, spec.source, list_files(spec, spec.source))


def snapshot(conn: duckdb.DuckDBPyConnection) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fingerprints of the raw table and of the manifest."""
    return table_fingerprint(conn, TABLE), table_fingerprint(conn, MANIFEST)


def rows_by_file(conn: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for source_file, sale_id, amount in conn.execute(
        f"SELECT {SOURCE_FILE}, sale_id, amount FROM {TABLE} ORDER BY sale_id"
    ).fetchall():
        out.setdefault(Path(source_file).name, []).append((sale_id, amount))
    return out


def csv_rows(*rows: tuple[int, str, float]) -> str:
    return "sale_id,store,amount\n" + "".join(f"{i},{s},{a}\n" for i, s, a in rows)


# -- formats ---------------------------------------------------------------------------------

def write_csv(landing: Path) -> Path:
    return write(landing / "sales.csv", csv_rows((1, "north", 2.5), (2, "south", 4.0)))


def write_parquet(landing: Path) -> Path:
    landing.mkdir(parents=True, exist_ok=True)
    path = landing / "sales.parquet"
    pl.DataFrame({"sale_id": [1, 2], "store": ["north", "south"], "amount": [2.5, 4.0]}) \
        .write_parquet(path)
    return path


def write_ndjson(landing: Path) -> Path:
    lines = [
        {"sale_id": 1, "store": "north", "amount": 2.5, "till": {"number": 3, "staffed": True}},
        {"sale_id": 2, "store": "south", "amount": 4.0, "till": {"number": 7, "staffed": False}},
    ]
    return write(landing / "sales.ndjson", "".join(json.dumps(line) + "\n" for line in lines))


def write_json_array(landing: Path) -> Path:
    rows = [{"sale_id": 1, "store": "north", "amount": 2.5},
            {"sale_id": 2, "store": "south", "amount": 4.0}]
    return write(landing / "sales.json", json.dumps(rows))


@pytest.mark.parametrize("writer", [write_csv, write_parquet, write_ndjson, write_json_array],
                         ids=["csv", "parquet", "ndjson", "json"])
def test_each_format_ingests_with_source_file_lineage(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection, writer: Callable[[Path], Path]
) -> None:
    path = writer(tmp_path / "landing")
    spec = sales_spec(tmp_path, path.name)

    report = ingest(conn, spec)

    assert report.new_files == [str(path)]
    assert report.rows_added == report.total_rows == 2
    assert rows_by_file(conn) == {path.name: [(1, 2.5), (2, 4.0)]}
    assert conn.execute(f"SELECT DISTINCT {SOURCE_FILE} FROM {TABLE}").fetchall() == [(str(path),)]


def test_nested_ndjson_objects_are_kept_as_structs(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    path = write_ndjson(tmp_path / "landing")
    ingest(conn, sales_spec(tmp_path, path.name))

    assert conn.execute(
        f"SELECT till.number, till.staffed FROM {TABLE} ORDER BY sale_id").fetchall() == [
        (3, True), (7, False)]


# -- incremental and idempotent ------------------------------------------------------------

def test_same_files_twice_add_no_rows(tmp_path: Path, conn: duckdb.DuckDBPyConnection) -> None:
    write(tmp_path / "landing" / "day1.csv", csv_rows((1, "north", 1.0), (2, "south", 2.0)))
    write(tmp_path / "landing" / "day2.csv", csv_rows((3, "north", 3.0)))
    spec = sales_spec(tmp_path, "*.csv")
    ingest(conn, spec)
    before = snapshot(conn)

    again = ingest(conn, spec)

    assert again.rows_added == 0
    assert again.skipped_files == 2
    assert not again.changed
    assert snapshot(conn) == before


def test_a_new_file_adds_only_its_rows(tmp_path: Path, conn: duckdb.DuckDBPyConnection) -> None:
    write(tmp_path / "landing" / "day1.csv", csv_rows((1, "north", 1.0), (2, "south", 2.0)))
    spec = sales_spec(tmp_path, "*.csv")
    ingest(conn, spec)
    new = write(tmp_path / "landing" / "day2.csv", csv_rows((3, "north", 3.0)))

    report = ingest(conn, spec)

    assert report.new_files == [str(new)]
    assert report.rows_added == 1
    assert report.skipped_files == 1
    assert rows_by_file(conn) == {"day1.csv": [(1, 1.0), (2, 2.0)], "day2.csv": [(3, 3.0)]}


def test_a_changed_file_replaces_its_rows(tmp_path: Path, conn: duckdb.DuckDBPyConnection) -> None:
    day1 = write(tmp_path / "landing" / "day1.csv", csv_rows((1, "north", 1.0), (2, "south", 2.0)))
    write(tmp_path / "landing" / "day2.csv", csv_rows((3, "north", 3.0)))
    spec = sales_spec(tmp_path, "*.csv")
    ingest(conn, spec)
    write(day1, csv_rows((1, "north", 10.0)))  # corrected delivery: one row, new amount

    report = ingest(conn, spec)

    assert report.replaced_files == [str(day1)]
    assert (report.rows_removed, report.rows_added) == (2, 1)
    assert rows_by_file(conn) == {"day1.csv": [(1, 10.0)], "day2.csv": [(3, 3.0)]}
    assert conn.execute(f"SELECT count(*) FROM {MANIFEST} WHERE path = ?",
                        [str(day1)]).fetchall() == [(1,)]


# -- many new CSV files: one typed scan, same result as file by file -------------------------

def raw_rows(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    return conn.execute(
        f"SELECT * EXCLUDE (__ingested_at) FROM {TABLE} ORDER BY sale_id").fetchall()


def test_many_new_files_at_once_equal_file_by_file(tmp_path: Path) -> None:
    days = {f"day{d}.csv": csv_rows(*[(d * 10 + i, f"store{i}", d + i / 4) for i in range(3)])
            for d in range(1, 6)}
    tables = []
    for mode in ("together", "one-by-one"):
        folder = tmp_path / mode
        spec = sales_spec(folder, "*.csv")
        with duckdb.connect(str(folder / "w.duckdb")) as conn:
            for name, text in days.items():
                write(folder / "landing" / name, text)
                if mode == "one-by-one":
                    assert ingest(conn, spec).rows_added == 3
            if mode == "together":
                report = ingest(conn, spec)
                assert (len(report.new_files), report.rows_added) == (5, 15)
            rows = [(Path(r[3]).name, *r[:3]) for r in raw_rows(conn)]
            manifest = conn.execute(f"SELECT path, rows FROM {MANIFEST} ORDER BY path").fetchall()
            tables.append((rows, [(Path(p).name, n) for p, n in manifest],
                           conn.execute(f"DESCRIBE {TABLE}").fetchall()))
    assert tables[0] == tables[1]
    assert tables[0][0][0] == ("day1.csv", 10, "store0", 1.0)


def test_a_batch_needing_a_wider_type_is_widened(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    write(tmp_path / "landing" / "day1.csv", "sale_id,store,amount\n1,north,2\n")
    write(tmp_path / "landing" / "day2.csv", "sale_id,store,amount\n2,south,2.5\n")

    report = ingest(conn, sales_spec(tmp_path, "*.csv"))

    assert report.rows_added == 2
    assert dict((r[0], r[1]) for r in conn.execute(f"DESCRIBE {TABLE}").fetchall())["amount"] \
        == "DOUBLE"
    assert rows_by_file(conn) == {"day1.csv": [(1, 2.0)], "day2.csv": [(2, 2.5)]}


@pytest.mark.parametrize("files", [1, 3], ids=["one-file", "many-files"])
def test_a_decimal_past_the_first_rows_makes_the_column_double(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection, files: int
) -> None:
    # DuckDB's sniffer samples 20,480 rows by default; past them, 2.5 in a BIGINT column
    # would silently become 3.
    rows = [(i, "north", float(i)) for i in range(25_000)]
    for index in range(files - 1):
        write(tmp_path / "landing" / f"day{index}.csv",
              csv_rows(*rows[:10]).replace(".0\n", "\n"))
    text = csv_rows(*rows).replace(".0\n", "\n") + "25000,south,2.5\n"
    write(tmp_path / "landing" / "last.csv", text)

    report = ingest(conn, sales_spec(tmp_path, "*.csv"))

    assert report.rows_added == 25_001 + 10 * (files - 1)
    types = {r[0]: r[1] for r in conn.execute(f"DESCRIBE {TABLE}").fetchall()}
    assert types["amount"] == "DOUBLE"
    assert conn.execute(f"SELECT amount FROM {TABLE} WHERE sale_id = 25000").fetchall() == [(2.5,)]


def test_a_file_with_its_columns_in_another_order_is_read_by_name(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    write(tmp_path / "landing" / "day1.csv", csv_rows((1, "north", 1.0)))
    spec = sales_spec(tmp_path, "*.csv")
    ingest(conn, spec)
    write(tmp_path / "landing" / "day2.csv", "amount,sale_id,store\n7.5,2,south\n")
    write(tmp_path / "landing" / "day3.csv", csv_rows((3, "east", 3.0)))

    assert ingest(conn, spec).rows_added == 2

    assert conn.execute(f"SELECT sale_id, store, amount FROM {TABLE} ORDER BY sale_id"
                        ).fetchall() == [(1, "north", 1.0), (2, "south", 7.5), (3, "east", 3.0)]


# -- bad files: named in the error, nothing written ----------------------------------------

def garbage_parquet(landing: Path) -> tuple[Path, list[str]]:
    path = landing / "day2.parquet"
    path.write_bytes(b"PAR1 this is not really a parquet file" * 20)
    return path, ["cannot be read as parquet"]


def empty_csv(landing: Path) -> tuple[Path, list[str]]:
    return write(landing / "day2.csv", ""), ["file has no rows"]


def header_only_csv(landing: Path) -> tuple[Path, list[str]]:
    return write(landing / "day2.csv", "sale_id,store,amount\n"), ["file has no rows"]


def missing_column_csv(landing: Path) -> tuple[Path, list[str]]:
    path = write(landing / "day2.csv", "sale_id,amount\n3,3.0\n")
    return path, ["wrong schema for raw_sales", "missing column(s) ['store']"]


def text_in_integer_column_csv(landing: Path) -> tuple[Path, list[str]]:
    path = write(landing / "day2.csv", "sale_id,store,amount\n3,north,3.0\nfour,south,4.0\n")
    return path, ["column 'sale_id'", "expected BIGINT", "'four'"]


BAD_FILES = {
    "garbage-parquet": ("parquet", garbage_parquet),
    "empty-csv": ("csv", empty_csv),
    "header-only-csv": ("csv", header_only_csv),
    "missing-column": ("csv", missing_column_csv),
    "text-in-integer-column": ("csv", text_in_integer_column_csv),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_fails_naming_it_and_writes_nothing(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection, case: str
) -> None:
    fmt, make_bad = BAD_FILES[case]
    landing = tmp_path / "landing"
    if fmt == "parquet":
        write_parquet(landing).rename(landing / "day1.parquet")
    else:
        write(landing / "day1.csv", csv_rows((1, "north", 1.0), (2, "south", 2.0)))
    spec = sales_spec(tmp_path, f"*.{fmt}")
    ingest(conn, spec)
    before = snapshot(conn)
    # A good new file next to the bad one is not written either: a run is all-or-nothing.
    good = landing / f"day0.{fmt}"
    if fmt == "parquet":
        pl.DataFrame({"sale_id": [9], "store": ["east"], "amount": [9.0]}).write_parquet(good)
    else:
        write(good, csv_rows((9, "east", 9.0)))
    bad, fragments = make_bad(landing)

    with pytest.raises(IngestError) as caught:
        ingest(conn, spec)

    message = str(caught.value)
    assert str(bad) in message
    for fragment in fragments:
        assert fragment in message
    assert str(good) not in message
    assert "nothing was written" in message
    assert snapshot(conn) == before


def test_a_changed_file_with_a_bad_schema_keeps_its_old_rows(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection
) -> None:
    day1 = write(tmp_path / "landing" / "day1.csv", csv_rows((1, "north", 1.0)))
    spec = sales_spec(tmp_path, "*.csv")
    ingest(conn, spec)
    before = snapshot(conn)
    write(day1, "sale_id,store,amount\n1,north,lots\n")

    with pytest.raises(IngestError, match=r"column 'amount'.*'lots'") as caught:
        ingest(conn, spec)

    assert str(day1) in str(caught.value)
    assert snapshot(conn) == before


def test_a_bad_first_file_creates_no_table(tmp_path: Path, conn: duckdb.DuckDBPyConnection) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    bad, _ = garbage_parquet(landing)

    with pytest.raises(IngestError, match=str(bad)):
        ingest(conn, sales_spec(tmp_path, "*.parquet"))

    assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                        [TABLE]).fetchall() == [(0,)]
    assert count_rows(conn, MANIFEST) == 0


# -- PostgreSQL ----------------------------------------------------------------------------

@pytest.mark.postgres
def test_a_postgres_table_is_snapshotted(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection, postgres_url: str
) -> None:
    import psycopg

    table = f"stores_{uuid.uuid4().hex[:12]}"
    spec = make_spec(tmp_path, {
        "name": "sales",
        "task": "regression",
        "source": {"path": "sales.csv"},
        "target": "amount",
        "references": [{"name": "stores", "keys": ["store"],
                        "source": {"path": postgres_url, "table": table}}],
    })
    source = spec.references[0].source
    url = spec.resolve_path(source.path)
    assert source.is_sql
    with psycopg.connect(postgres_url, autocommit=True) as pg:
        pg.execute(f'CREATE TABLE "{table}" (store TEXT PRIMARY KEY, city TEXT, size_m2 INTEGER)')
        try:
            pg.execute(f"""INSERT INTO "{table}" VALUES ('north', 'Oslo', 120), ('south', 'Rome', NULL)""")
            first = ingest_sql_table(conn, "raw_stores", source, url)
            pg.execute(f"""INSERT INTO "{table}" VALUES ('east', 'Riga', 80)""")
            second = ingest_sql_table(conn, "raw_stores", source, url)
        finally:
            pg.execute(f'DROP TABLE IF EXISTS "{table}"')

    assert first.rows_added == 2
    assert (second.rows_removed, second.rows_added, second.total_rows) == (2, 3, 3)
    rows = conn.execute(
        f"SELECT store, city, size_m2, {SOURCE_FILE} FROM raw_stores ORDER BY store").fetchall()
    label = f"{url}#{table}"
    assert rows == [("east", "Riga", 80, label), ("north", "Oslo", 120, label),
                    ("south", "Rome", None, label)]


@pytest.mark.postgres
def test_a_missing_postgres_table_names_it(
    tmp_path: Path, conn: duckdb.DuckDBPyConnection, postgres_url: str
) -> None:
    table = f"missing_{uuid.uuid4().hex[:12]}"
    spec = make_spec(tmp_path, {
        "name": "sales", "task": "regression", "target": "amount",
        "source": {"path": postgres_url, "table": table},
    })

    with pytest.raises(IngestError, match=table):
        ingest_sql_table(conn, "raw_sales", spec.source, spec.resolve_path(spec.source.path))

    assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                        ["raw_sales"]).fetchall() == [(0,)]
