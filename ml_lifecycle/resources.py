"""Resources shared by the assets: the DuckDB warehouse of the dataset in use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from dagster_duckdb import DuckDBResource


class Warehouse(DuckDBResource):
    """The dataset's DuckDB file (one writer at a time: writer assets use pool "duckdb")."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        with super().get_connection() as conn:
            yield conn
