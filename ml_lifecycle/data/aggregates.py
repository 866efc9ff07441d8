"""Point-in-time history aggregates, computed offline.

For a row at time t, an aggregate covers the values of rows with the same keys whose value
became known (`known_at`) within [t - lag - window, t - lag]. Nothing known after t - lag can
enter: the definition is exact, not an approximation.

Two implementations of that one definition:
- `aggregate_sql` is the definition written as DuckDB SQL: query points (t - lag) and events
  (known_at) are merged into one stream per key and a RANGE window sums what came before. It
  is short and obviously right, and the tests use it as the reference; DuckDB's RANGE frames
  grow worse than linearly on long partitions, so the pipeline runs `aggregate_frame`.
- `aggregate_frame` is what the pipeline runs: the rows come out of DuckDB as arrays in one
  scan, are put in time order once (and once per distinct `known_at`), each aggregate regroups
  them by key code with a linear radix sort, each row finds its window's first
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
import pyarrow.compute as pc

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
_RADIX_CODES = 1 << 16  # numpy's stable sort is a radix sort (O(n)) for 16-bit integers


def aggregate_frame(conn: duckdb.DuckDBPyConnection, spec: DatasetSpec,
                    table: str = "cleaned") -> pa.Table | None:
    """Every aggregate column for every row of `table`, with the row's `__rowid`, to join on
    `rowid`: one join for all aggregates instead of one window query each. (A POSITIONAL JOIN
    would need no hash table, but DuckDB runs it on one thread with every wide column flat:
    30 s instead of 6 s at 3.4M rows.) None when the spec declares no aggregate.

    One scan reads what every aggregate needs, each input once (aggregates that share a key
    column, a value or a `known_at` expression share its array). The rows are put in time
    order once for the queries and once per distinct `known_at` for the events; each aggregate
    then only regroups those orders by its key code (a radix sort, linear), so events and
    queries reach `window_statistics` already sorted by (key, time)."""
    if not spec.aggregates:
        return None
    values = {agg.value: quote(AGG_VALUE.format(agg.name)) for agg in reversed(spec.aggregates)}
    known = {agg.known_at or TIME: quote(AGG_KNOWN_AT.format(agg.name))
             for agg in reversed(spec.aggregates)}
    keys = list(dict.fromkeys(k for agg in spec.aggregates for k in agg.keys))
    items = [f"rowid AS {ROWID}", f"epoch_us({TIME}) AS __t"]
    items += [f"{quote(k)} AS __k{i}" for i, k in enumerate(keys)]
    items += [f"{column} AS __v{i}" for i, column in enumerate(values.values())]
    items += [f"epoch_us({column}) AS __e{i}" for i, column in enumerate(known.values())]
    fetched = conn.sql(f"SELECT {', '.join(items)} FROM {quote(table)}").to_arrow_table()
    count = fetched.num_rows
    rowid = _int64(fetched.column(ROWID))[0]
    times, has_time = _int64(fetched.column("__t"))
    key_codes = {k: _key_codes(fetched.column(f"__k{i}")) for i, k in enumerate(keys)}
    value_arrays = {expr: _float64(fetched.column(f"__v{i}")) for i, expr in enumerate(values)}
    known_arrays = {expr: _int64(fetched.column(f"__e{i}")) for i, expr in enumerate(known)}
    del fetched
    # Each input is dropped after the last aggregate that reads it: memory stays near one
    # aggregate's working set (int32 row numbers and codes halve it).
    last_use: dict[tuple[str, str], int] = {}
    for index, aggregate in enumerate(spec.aggregates):
        last_use.update({("key", k): index for k in aggregate.keys})
        last_use.update({("value", aggregate.value): index,
                         ("known", aggregate.known_at or TIME): index})
    by_time = _time_order(times, has_time)
    by_known: dict[str, np.ndarray] = {}
    columns: dict[str, pa.Array] = {ROWID: _arrow(rowid)}
    for index, aggregate in enumerate(spec.aggregates):
        codes, n_codes = _combined_codes([key_codes[k] for k in aggregate.keys])
        expr = aggregate.known_at or TIME
        if expr not in by_known:
            by_known[expr] = _time_order(*known_arrays[expr])
        event_at, event_known = known_arrays[expr]
        value, value_known = value_arrays[aggregate.value]
        q_rows, q_code = _group_by_code(by_time, codes, n_codes)
        e_valid = event_known & value_known
        e_rows, e_code = _group_by_code(by_known[expr][e_valid[by_known[expr]]], codes, n_codes)
        del codes, e_valid
        q_at = times[q_rows]
        q_at -= int(aggregate.lag.total_seconds() * 1_000_000)
        window = int(aggregate.window.total_seconds() * 1_000_000)
        stats = window_statistics(q_code, q_at, e_code, event_at[e_rows], value[e_rows], window,
                                  list(aggregate.statistics), presorted=True)
        del q_at, q_code, e_rows, e_code, event_at, event_known, value, value_known
        for stat in aggregate.statistics:
            result, valid = stats.pop(stat)
            full = np.zeros(count, dtype=result.dtype)
            present = np.zeros(count, dtype=bool)
            full[q_rows] = result
            present[q_rows] = valid
            del result, valid
            columns[f"{aggregate.name}_{stat}"] = _arrow(full, present)
        del q_rows
        for kind, name in [*(("key", k) for k in aggregate.keys), ("value", aggregate.value),
                           ("known", expr)]:
            if last_use[(kind, name)] == index:
                {"key": key_codes, "value": value_arrays, "known": known_arrays}[kind].pop(name)
                by_known.pop(name, None) if kind == "known" else None
    return pa.table(columns)


def _int64(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, validity) of an integer column; a NULL's slot holds an arbitrary value, and
    every use of the values goes through the validity first."""
    return _numbers(column, np.int64)


def _float64(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    return _numbers(column, np.float64)


def _numbers(column: pa.ChunkedArray | pa.Array, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow column of fixed-width numbers as numpy (value buffer and validity bitmap read
    directly, without the conversions that import pandas)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.type != pa.from_numpy_dtype(dtype):
        raise TypeError(f"expected {np.dtype(dtype)} values, got {array.type}")
    start, size = array.offset, len(array)
    validity, data = array.buffers()[:2]
    values = np.frombuffer(data, dtype=dtype, count=start + size)[start:] if size else \
        np.empty(0, dtype)
    if array.null_count == 0 or validity is None:
        return values, np.ones(size, bool)
    bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")
    return values, bits[start:start + size].astype(bool)


def _arrow(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """A numpy array (and its validity) as an Arrow array, sharing the values' memory
    (built from buffers: `pa.array` and `pa.scalar` import pandas the first time, 0.2 s of
    a 1x run)."""
    values = np.ascontiguousarray(values)
    nulls = 0 if valid is None else len(valid) - int(np.count_nonzero(valid))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [bitmap, pa.py_buffer(values)], null_count=nulls)


def _indices(encoded: pa.DictionaryArray) -> np.ndarray:
    """A dictionary array's indices as int64, -1 for NULL."""
    index_type = encoded.indices.type
    indices, valid = _numbers(encoded.indices, np.dtype(f"int{index_type.bit_width}").type)
    return np.where(valid, indices, -1).astype(_index_type(len(encoded.dictionary)), copy=False)


def _key_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Dense codes of a key column's values (a hash, exact whatever the type) and their count;
    -1 where the key is missing: NULL, or the level cleaning gives a NULL category (pooling
    such rows would mix unrelated rows into one history; `aggregate_sql` excludes them too)."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    codes = _indices(encoded)
    dictionary = encoded.dictionary
    text = dictionary if pa.types.is_string(dictionary.type) or \
        pa.types.is_large_string(dictionary.type) else dictionary.cast(pa.string())
    levels = text.to_pylist()  # the distinct values only (`pc.index` would import pandas)
    if MISSING_LEVEL in levels:
        codes[codes == levels.index(MISSING_LEVEL)] = -1
    return codes, len(dictionary)


def _combined_codes(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """Dense codes of a tuple of keys (-1 when any part is missing), and their count."""
    codes, size = parts[0]
    for more, more_size in parts[1:]:
        valid = (codes >= 0) & (more >= 0)
        # Both parts are dense (< 2^31), so the pair fits an int64; then only the pairs that
        # occur are numbered, which keeps the codes dense for the next part and the radix sort.
        pairs = _arrow(np.where(valid, codes.astype(np.int64) * more_size + more, 0), valid)
        encoded = pc.dictionary_encode(pairs)
        codes, size = _indices(encoded), len(encoded.dictionary)
    return codes, size


def _time_order(times: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Row indices with a time, in time order (stable: ties keep row order)."""
    rows = np.flatnonzero(valid) if not valid.all() else np.arange(len(times))
    return rows[np.argsort(times[rows], kind="stable")].astype(_index_type(len(times)))


def _index_type(size: int) -> type:
    """Row numbers and codes as int32 when they fit (half the memory of int64)."""
    return np.int32 if size < 2**31 else np.int64


def _group_by_code(rows: np.ndarray, codes: np.ndarray, n_codes: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`rows` (in time order) regrouped by key code, time order kept within a code, rows
    without a key dropped: (rows, their codes), sorted by (code, time)."""
    row_codes = codes[rows]
    keep = row_codes >= 0
    if not keep.all():
        rows, row_codes = rows[keep], row_codes[keep]
    sortable = row_codes.astype(np.uint16) if n_codes <= _RADIX_CODES else row_codes
    order = np.argsort(sortable, kind="stable")
    return rows[order], row_codes[order]


def window_statistics(q_code: np.ndarray, q_at: np.ndarray, e_code: np.ndarray,
                      e_at: np.ndarray, e_val: np.ndarray, window: int,
                      statistics: list[str], presorted: bool = False
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each query (code, t): the statistics of the events with the same code and a time in
    [t - window, t], both ends included. Returns {statistic: (values, valid mask)}.
    `presorted`: events and queries both come sorted by (code, time); no sort is needed."""
    n_q = len(q_at)
    if len(e_at) == 0 or n_q == 0:
        zero = np.zeros(n_q)
        return {s: (zero.astype(np.int64), np.ones(n_q, bool)) if s == "count"
                else (zero, np.zeros(n_q, bool)) for s in statistics}
    e_key, q_hi_key, q_lo_key = _packed_keys(q_code, q_at, e_code, e_at, window)
    if presorted:
        values = e_val
        hi = np.searchsorted(e_key, q_hi_key, side="right")
        lo = np.searchsorted(e_key, q_lo_key, side="left")
    else:
        order = np.argsort(e_key, kind="stable")
        e_key, e_code, values = e_key[order], e_code[order], e_val[order]
        # Binary searches with sorted needles walk the events once (numpy reuses the last bound).
        q_order = np.argsort(q_hi_key, kind="stable")
        hi = np.empty(n_q, dtype=np.int64)
        lo = np.empty(n_q, dtype=np.int64)
        hi[q_order] = np.searchsorted(e_key, q_hi_key[q_order], side="right")
        lo[q_order] = np.searchsorted(e_key, q_lo_key[q_order], side="left")
    del e_key, q_hi_key, q_lo_key
    count = hi - lo
    has = count > 0
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "count": (count.astype(np.int64, copy=False), np.ones(n_q, bool))}
    if {"sum", "mean", "std"} & set(statistics):
        # Centre on each key's mean: running totals stay small and the variance exact.
        totals = np.bincount(e_code, weights=values)
        sizes = np.bincount(e_code)
        centre = np.divide(totals, sizes, out=np.zeros(len(sizes)), where=sizes > 0)
        deviation = values - centre[e_code]
        running = np.concatenate([[0.0], np.cumsum(deviation)])
        total = running[hi] - running[lo]
        del running
        total += count * centre[np.minimum(q_code, len(centre) - 1)]
        safe = np.maximum(count, 1)
        if "sum" in statistics:
            out["sum"] = (np.where(has, total, 0.0), has)
        if "mean" in statistics:
            total /= safe
            out["mean"] = (np.where(has, total, 0.0), has)
        del total
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
        del deviation
    for stat, reduce in (("min", np.minimum), ("max", np.maximum)):
        if stat in statistics:
            out[stat] = (_window_extreme(values, lo, hi, reduce), has)
    return {s: out[s] for s in statistics}


def _packed_keys(q_code: np.ndarray, q_at: np.ndarray, e_code: np.ndarray, e_at: np.ndarray,
                 window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code, time) packed into one sortable int64 for the events, the window ends (t) and
    the window starts (t - window). Times are offsets from the earliest time when codes x span
    fits in 62 bits, otherwise ranks among all the times involved (exact either way)."""
    q_code, e_code = q_code.astype(np.int64, copy=False), e_code.astype(np.int64, copy=False)
    first = min(int(e_at.min()), int(q_at.min()) - window)
    span = max(int(e_at.max()), int(q_at.max())) - first + 1
    codes = int(max(e_code.max(), q_code.max())) + 1
    if codes * span < 2**62:
        e_key = e_code * span
        e_key += e_at
        e_key -= first
        q_hi = q_code * span
        q_hi += q_at
        q_hi -= first
        return e_key, q_hi, q_hi - window
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
