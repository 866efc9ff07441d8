"""Catalog metadata for table assets: schema, row count, column lineage and a preview.

Every table asset reports these, so the Dagster UI doubles as the data catalog.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import duckdb

from ml_lifecycle.data.sources import quote

PREVIEW_ROWS = 10
_SQL_STRING = re.compile(r"'(?:[^']|'')*'")


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "| " + " | ".join(_cell(c) for c in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _short_type(dtype: str) -> str:
    if dtype.startswith("ENUM("):
        # Count the quoted levels: a level may itself contain a comma.
        return f"ENUM ({len(_SQL_STRING.findall(dtype))} levels)"
    return dtype


def table_metadata(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    *,
    database: str,
    column_descriptions: Mapping[str, str] | None = None,
    lineage: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    preview_columns: int = 30,
) -> dict[str, Any]:
    """Dagster metadata describing `table` for the catalog."""
    described = conn.execute(f"DESCRIBE {quote(table)}").fetchall()
    descriptions = column_descriptions or {}
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn(name=name, type=_short_type(dtype), description=descriptions.get(name))
            for name, dtype, *_ in described
        ]
    )
    rows = int(conn.execute(f"SELECT count(*) FROM {quote(table)}").fetchall()[0][0])
    shown = [name for name, *_ in described][:preview_columns]
    sample = conn.execute(
        f"SELECT {', '.join(quote(c) for c in shown)} FROM {quote(table)} LIMIT {PREVIEW_ROWS}"
    ).fetchall()
    metadata: dict[str, Any] = {
        "dagster/column_schema": schema,
        "dagster/row_count": rows,
        "dagster/table_name": f"{database}.main.{table}",
        "preview": dg.MetadataValue.md(markdown_table(shown, sample)),
    }
    if lineage:
        metadata["dagster/column_lineage"] = dg.TableColumnLineage(
            deps_by_column={
                column: [
                    dg.TableColumnDep(asset_key=dg.AssetKey(asset), column_name=source)
                    for asset, source in dict.fromkeys(deps)
                ]
                for column, deps in lineage.items()
                if deps
            }
        )
    return metadata
