"""Point-in-time history aggregates, computed offline in DuckDB.

For a row at time t, an aggregate covers the values of rows with the same keys whose value
became known (`known_at`) within [t - lag - window, t - lag]. Query points (t - lag) and events
(known_at) are merged into one stream per key and a RANGE window over that stream sums what came
before: exact, vectorised, and impossible to leak a value known after the prediction time.
The online store (serving stage) implements the same definition incrementally.
"""

from __future__ import annotations

from ml_lifecycle.data.cleaning import AGG_KNOWN_AT, AGG_VALUE, MISSING_LEVEL
from ml_lifecycle.data.sources import quote, sql_literal
from ml_lifecycle.spec import TIME, Aggregate, duration_sql

_STAT_SQL = {
    "mean": "avg(__v)",
    "sum": "sum(__v)",
    "count": "count(__v)",
    "min": "min(__v)",
    "max": "max(__v)",
    "std": "stddev_samp(__v)",
}


def aggregate_sql(aggregate: Aggregate, table: str) -> str:
    """One row per row of `table` that has all keys: `__rowid` plus the aggregate's columns."""
    keys = ", ".join(quote(k) for k in aggregate.keys)
    # Cleaning turns a NULL category into MISSING_LEVEL: such rows have no key either, and
    # pooling them would mix unrelated rows into one history.
    not_null = " AND ".join(
        f"{quote(k)} IS NOT NULL AND CAST({quote(k)} AS VARCHAR) <> {sql_literal(MISSING_LEVEL)}"
        for k in aggregate.keys)
    value = AGG_VALUE.format(aggregate.name)
    known_at = AGG_KNOWN_AT.format(aggregate.name)
    lag = duration_sql(aggregate.lag)
    stats = ", ".join(
        f"{_STAT_SQL[stat]} OVER w AS {quote(f'{aggregate.name}_{stat}')}"
        for stat in aggregate.statistics
    )
    # __is_event orders events before query points at the same instant, so a value known
    # exactly at the prediction time counts (the frame's CURRENT ROW includes peers anyway).
    return f"""
        WITH stream AS (
            SELECT rowid AS __rowid, {keys}, {TIME} - {lag} AS __at, NULL::DOUBLE AS __v,
                   FALSE AS __is_event
            FROM {quote(table)} WHERE {not_null} AND {TIME} IS NOT NULL
            UNION ALL
            SELECT NULL, {keys}, {known_at}, {value}, TRUE
            FROM {quote(table)}
            WHERE {not_null} AND {value} IS NOT NULL AND {known_at} IS NOT NULL
        )
        SELECT __rowid, {stats}
        FROM stream
        WINDOW w AS (PARTITION BY {keys} ORDER BY __at
                     RANGE BETWEEN {duration_sql(aggregate.window)} PRECEDING AND CURRENT ROW)
        QUALIFY NOT __is_event
    """
