"""Reading a spec `Source` (csv, parquet, json, ndjson files, or a PostgreSQL table) with DuckDB."""

from __future__ import annotations

import glob
import hashlib
import re
from pathlib import Path
from typing import Any

import duckdb

from ml_lifecycle.spec import DatasetSpec, Source


class SourceError(RuntimeError):
    """A source could not be read; the message names the file or URL."""


def sql_literal(value: Any) -> str:
    """A DuckDB literal for a reader option value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(sql_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{sql_literal(str(k))}: {sql_literal(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("'", "''") + "'"


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def reader_sql(source: Source, location: str | list[str]) -> str:
    """The DuckDB table function call that reads one file of this source (or several, as one
    multi-file scan, given a list)."""
    fmt = source.resolved_format
    options = dict(source.options)
    # Types from every row, not DuckDB's 20,480-row sample: past the sample a CSV value that does
    # not fit the detected type is silently converted (2.5 into a BIGINT column becomes 3) and a
    # JSON key first seen later is dropped. Costs ~10 % of a CSV read.
    if fmt in ("csv", "json", "ndjson") and options.get("auto_detect") is not False:
        options.setdefault("sample_size", -1)
    if fmt == "csv":
        function = "read_csv"
    elif fmt == "parquet":
        function = "read_parquet"
    elif fmt in ("json", "ndjson"):
        function = "read_json"
        options.setdefault("format", "newline_delimited" if fmt == "ndjson" else "auto")
    else:  # pragma: no cover - guarded by Source validation
        raise SourceError(f"{location}: format {fmt!r} is not a file format")
    args = "".join(f", {key} = {sql_literal(value)}" for key, value in options.items())
    return f"{function}({sql_literal(location)}{args})"


def list_files(spec: DatasetSpec, source: Source, home: Path | None = None) -> list[Path]:
    """Files matching a file source's path or glob, sorted by name; hidden/temp files skipped."""
    pattern = spec.resolve_path(source.path, home)
    matches = sorted(Path(p) for p in glob.glob(pattern))
    return [p for p in matches if p.is_file() and not p.name.startswith(".")]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def redact_url(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def read_postgres(conn: duckdb.DuckDBPyConnection, source: Source, url: str, into: str) -> int:
    """Copy a PostgreSQL table into a DuckDB temp table `into`; returns rows copied."""
    import psycopg
    import pyarrow as pa

    table = ".".join(quote(part) for part in str(source.table).split("."))
    try:
        with psycopg.connect(url, connect_timeout=10) as pg, pg.cursor() as cursor:
            cursor.execute(f"SELECT * FROM {table}")
            names = [column.name for column in cursor.description or []]
            rows = cursor.fetchall()
    except psycopg.Error as error:
        raise SourceError(
            f"cannot read table {source.table!r} from {redact_url(url)}: {str(error).strip()}"
        ) from None
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in names]
    arrow = pa.table({name: pa.array(list(values)) for name, values in zip(names, columns, strict=True)})
    conn.register("__pg_arrow", arrow)
    try:
        conn.execute(f"CREATE OR REPLACE TEMP TABLE {quote(into)} AS SELECT * FROM __pg_arrow")
    finally:
        conn.unregister("__pg_arrow")
    return len(rows)
