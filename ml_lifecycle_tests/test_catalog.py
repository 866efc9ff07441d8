"""Catalog metadata of a table: what the Dagster UI shows for schema, rows, lineage and preview."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb

from ml_lifecycle.assets.catalog import table_metadata


def test_table_metadata_describes_the_table(tmp_path: Path) -> None:
    database = tmp_path / "warehouse.duckdb"
    conn = duckdb.connect(str(database))
    conn.execute("CREATE TYPE vendor_t AS ENUM ('Acme, Inc.', 'O''Brien & Sons', 'Zed')")
    conn.execute("CREATE TABLE features (order_id INTEGER, vendor vendor_t, note VARCHAR)")
    conn.execute("INSERT INTO features VALUES (1, 'Acme, Inc.', 'a|b'), (2, 'Zed', 'plain')")

    metadata = table_metadata(
        conn, "features", database=str(database),
        column_descriptions={"vendor": "categorical"},
        lineage={"vendor": [("cleaned", "vendor"), ("cleaned", "vendor")], "order_id": []},
    )
    conn.close()

    assert metadata["dagster/row_count"] == 2
    assert metadata["dagster/table_name"] == f"{database}.main.features"
    columns = {c.name: c for c in metadata["dagster/column_schema"].columns}
    assert list(columns) == ["order_id", "vendor", "note"]
    assert columns["vendor"].type == "ENUM (3 levels)"  # a comma inside a level is not a level
    assert columns["vendor"].description == "categorical"
    deps = metadata["dagster/column_lineage"].deps_by_column
    assert deps == {"vendor": [dg.TableColumnDep(asset_key=dg.AssetKey("cleaned"),
                                                 column_name="vendor")]}
    preview = metadata["preview"].value
    assert preview.splitlines()[0] == "| order_id | vendor | note |"
    assert "a\\|b" in preview  # a pipe in a value does not break the markdown table
