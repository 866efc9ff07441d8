"""Point-in-time history aggregates, computed offline.

For a row at time t, an aggregate covers the values of rows with the same keys whose value
became known (`known_at`) within [t - lag - window, t - lag]. Nothing known after t - lag can
enter: the definition is exact, not an approximation.

Two implementations of that one definition:
- `aggregate_sql` is the definition written as DuckDB SQL: query points (t - lag) and events
  (known_at) are merged into one stream per key and a RANGE window sums what came before. It
  is short and obviously right, and the tests use it as the reference; DuckDB's RANGE frames
  grow worse than linearly on long partitions, so the pipeline runs it only when the rows
  cannot be aligned (see `aggregate_frame`).
- `aggregate_frame` is what the pipeline runs: the rows come out of DuckDB as arrays,
  events are sorted once per aggregate by (key, known_at), each row finds its window's first
  and last event with two binary searches, and count/sum/mean/std are differences of running
  totals (centred on the key's mean, so the variance does not lose precision) while min/max
  come from a sparse table built one level at a time. O(n log n), flat memory, exact (equal to
  the SQL up to float rounding). The result goes back to DuckDB as an Arrow table.

The online store (serving stage) implements the same definition incrementally.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from ml_lifecycle.data.cleaning import AGG_KNOWN_AT, AGG_VALUE, MISSING_LEVEL
from ml_lifecycle.data.sources import quote, sql_literal
from ml_lifecycle.spec import TIME, Aggregate, DatasetSpec, duration_sql

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


ROWID = "__rowid"


def aggregate_frame(conn: duckdb.DuckDBPyConnection, spec: DatasetSpec,
                    table: str = "cleaned") -> pa.Table | None:
    """Every aggregate column for every row of `table`, with the row's `__rowid`, to join on
    `rowid`: one join for all aggregates instead of one window query each. (A POSITIONAL JOIN
    would need no hash table, but DuckDB runs it on one thread with every wide column flat:
    30 s instead of 6 s at 3.4M rows.) None when the table's rowids are not 0..n-1 (rows
    deleted since it was built); `aggregate_sql` serves then."""
    count, top = conn.execute(
        f"SELECT count(*), coalesce(max(rowid), -1) FROM {quote(table)}").fetchall()[0]
    if top + 1 != count:
        return None
    columns: dict[str, pa.Array] = {ROWID: pa.array(np.arange(count, dtype=np.int64))}
    for aggregate in spec.aggregates:
        rowid, stats = _compute_arrays(conn, aggregate, table)
        for stat in aggregate.statistics:
            values, valid = stats[stat]
            full = np.zeros(count, dtype=values.dtype)
            present = np.zeros(count, dtype=bool)
            full[rowid] = values
            present[rowid] = valid
            del values, valid
            columns[f"{aggregate.name}_{stat}"] = pa.array(full, mask=~present)
    return pa.table(columns)


def _compute_arrays(conn: duckdb.DuckDBPyConnection, aggregate: Aggregate, table: str
                    ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    key_list = [quote(k) for k in aggregate.keys]
    keys = ", ".join(key_list)
    not_null = " AND ".join(
        f"{quote(k)} IS NOT NULL AND CAST({quote(k)} AS VARCHAR) <> {sql_literal(MISSING_LEVEL)}"
        for k in aggregate.keys)
    value = quote(AGG_VALUE.format(aggregate.name))
    known_at = quote(AGG_KNOWN_AT.format(aggregate.name))
    lag_us = int(aggregate.lag.total_seconds() * 1_000_000)
    window_us = int(aggregate.window.total_seconds() * 1_000_000)
    # Keys become dense integer codes (exact, whatever their types); times become microseconds.
    # Only the columns needed travel through the join.
    needed = ", ".join(dict.fromkeys([*key_list, TIME, value, known_at]))
    coded = (f"(SELECT t.__rowid, c.__code, t.* EXCLUDE (__rowid) FROM "
             f"(SELECT rowid AS __rowid, {needed} FROM {quote(table)}) t JOIN "
             f"(SELECT {keys}, (row_number() OVER ())::BIGINT AS __code FROM "
             f"(SELECT DISTINCT {keys} FROM {quote(table)} WHERE {not_null})) c USING ({keys}))")
    conn.execute(f"CREATE OR REPLACE TEMP TABLE __aggregate_coded AS "
                 f"SELECT __rowid, __code, epoch_us({TIME}) - {lag_us} AS __q, "
                 f"epoch_us({known_at}) AS __e, {value} AS __v FROM {coded}")
    try:
        queries = conn.execute("SELECT __rowid, __code, __q FROM __aggregate_coded "
                               "WHERE __q IS NOT NULL").fetchnumpy()
        events = conn.execute("SELECT __code, __e, __v FROM __aggregate_coded "
                              "WHERE __e IS NOT NULL AND __v IS NOT NULL").fetchnumpy()
    finally:
        conn.execute("DROP TABLE IF EXISTS __aggregate_coded")
    q_rowid = np.asarray(queries["__rowid"], dtype=np.int64)
    stats = window_statistics(
        np.asarray(queries["__code"], dtype=np.int64), np.asarray(queries["__q"], dtype=np.int64),
        np.asarray(events["__code"], dtype=np.int64), np.asarray(events["__e"], dtype=np.int64),
        np.asarray(events["__v"], dtype=np.float64), window_us, list(aggregate.statistics))
    return q_rowid, stats


def window_statistics(q_code: np.ndarray, q_at: np.ndarray, e_code: np.ndarray,
                      e_at: np.ndarray, e_val: np.ndarray, window: int,
                      statistics: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each query (code, t): the statistics of the events with the same code and a time in
    [t - window, t], both ends included. Returns {statistic: (values, valid mask)}."""
    n_q = len(q_at)
    if len(e_at) == 0 or n_q == 0:
        zero = np.zeros(n_q)
        return {s: (zero.astype(np.int64), np.ones(n_q, bool)) if s == "count"
                else (zero, np.zeros(n_q, bool)) for s in statistics}
    e_key, q_hi_key, q_lo_key = _packed_keys(q_code, q_at, e_code, e_at, window)
    order = np.argsort(e_key, kind="stable")
    e_key, e_code, values = e_key[order], e_code[order], e_val[order]
    # Binary searches with sorted needles walk the events once (numpy reuses the last bound).
    q_order = np.argsort(q_hi_key, kind="stable")
    hi = np.empty(n_q, dtype=np.int64)
    lo = np.empty(n_q, dtype=np.int64)
    hi[q_order] = np.searchsorted(e_key, q_hi_key[q_order], side="right")
    lo[q_order] = np.searchsorted(e_key, q_lo_key[q_order], side="left")
    count = hi - lo
    has = count > 0
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {"count": (count.astype(np.int64),
                                                               np.ones(n_q, bool))}
    if {"sum", "mean", "std"} & set(statistics):
        # Centre on each key's mean: running totals stay small and the variance exact.
        totals = np.bincount(e_code, weights=values)
        sizes = np.bincount(e_code)
        centre = np.divide(totals, sizes, out=np.zeros(len(sizes)), where=sizes > 0)
        deviation = values - centre[e_code]
        running = np.concatenate([[0.0], np.cumsum(deviation)])
        window_dev = running[hi] - running[lo]
        safe = np.maximum(count, 1)
        q_centre = centre[np.minimum(q_code, len(centre) - 1)]
        total = window_dev + count * q_centre
        out["sum"] = (np.where(has, total, 0.0), has)
        out["mean"] = (np.where(has, total / safe, 0.0), has)
        if "std" in statistics:
            # Extended precision for the squares (the differences of large running totals lose
            # digits), and a window whose values are all equal gets exactly 0.
            squares = np.concatenate([[0.0], np.cumsum(deviation.astype(np.longdouble) ** 2)])
            sums = np.concatenate([[0.0], np.cumsum(deviation.astype(np.longdouble))])
            window_sum = sums[hi] - sums[lo]
            variance = ((squares[hi] - squares[lo] - window_sum * window_sum / safe)
                        / np.maximum(count - 1, 1)).astype(np.float64)
            constant = (_window_extreme(values, lo, hi, np.minimum)
                        == _window_extreme(values, lo, hi, np.maximum))
            std = np.where(constant, 0.0, np.sqrt(np.maximum(variance, 0.0)))
            out["std"] = (std, count > 1)
    for stat, reduce in (("min", np.minimum), ("max", np.maximum)):
        if stat in statistics:
            out[stat] = (_window_extreme(values, lo, hi, reduce), has)
    return {s: out[s] for s in statistics}


def _packed_keys(q_code: np.ndarray, q_at: np.ndarray, e_code: np.ndarray, e_at: np.ndarray,
                 window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code, time) packed into one sortable int64 for the events, the window ends (t) and
    the window starts (t - window). Times are offsets from the earliest time when codes x span
    fits in 62 bits, otherwise ranks among all the times involved (exact either way)."""
    first = min(int(e_at.min()), int(q_at.min()) - window)
    span = max(int(e_at.max()), int(q_at.max())) - first + 1
    codes = int(max(e_code.max(), q_code.max())) + 1
    if codes * span < 2**62:
        return (e_code * span + (e_at - first), q_code * span + (q_at - first),
                q_code * span + (q_at - window - first))
    times = np.sort(np.concatenate([e_at, q_at, q_at - window]))
    times = times[np.concatenate([[True], times[1:] != times[:-1]])]
    span = len(times) + 1
    return (e_code * span + np.searchsorted(times, e_at),
            q_code * span + np.searchsorted(times, q_at),
            q_code * span + np.searchsorted(times, q_at - window))


def _window_extreme(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, reduce) -> np.ndarray:
    """reduce(values[lo:hi]) per query via a sparse table built one level at a time: level k
    holds reduce over [i, i + 2^k), and a window of length L reads two overlapping blocks of
    level floor(log2 L). Memory stays at two arrays of the events' size."""
    length = hi - lo
    result = np.zeros(len(lo))
    has = length > 0
    level = np.zeros(len(lo), dtype=np.int64)
    level[has] = np.frexp(length[has].astype(np.float64))[1] - 1
    table = values
    for k in range(int(level.max()) + 1 if has.any() else 0):
        if k:
            half = 1 << (k - 1)
            table = reduce(table[:-half], table[half:])
        chosen = np.flatnonzero(has & (level == k))
        if len(chosen):
            result[chosen] = reduce(table[lo[chosen]], table[hi[chosen] - (1 << k)])
    return result
