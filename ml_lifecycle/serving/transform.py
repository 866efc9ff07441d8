"""Request rows -> cleaned columns without a query per request, compiled from the cleaning plan.

The pipeline's `build_cleaning(..., serving=True)` describes every column it cleans: the primary
columns' rules (`ColumnRule`, whose `apply` is the numpy executor of the same rule the SQL
statement uses) and each reference's lookup (`ReferenceLookup`). At start-up this module runs
the pipeline's own reference queries and cleaning SQL over the snapshot's reference tables once,
and keeps the cleaned reference values in memory, indexed by key (and sorted by time for a
reference with a time). A request is then: the rules over its columns, dictionary and binary
searches for the joins (as of the request's time, `max_age` applied), and the spec's time
expression, compiled to numpy (`serving/time_expression.py`) when it stays in the common
subset; DuckDB evaluates the rows (or expressions) it does not vouch for, memoised by inputs.

What it cannot reproduce exactly (nested primary columns, a rule over an unusual type) makes
`RequestTransform.unsupported` non-empty, and the runtime then runs the SQL per request instead.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from ml_lifecycle.data.cleaning import CleaningPlan, ColumnRule, FlatColumn, ReferenceLookup
from ml_lifecycle.data.sources import quote
from ml_lifecycle.serving.time_expression import TimeExpression, compile_time_expression
from ml_lifecycle.spec import TIME, DatasetSpec

_DIRECT_TIMES = {"TIMESTAMP", "DATE"}
_TEXT_KEYS = {
    "VARCHAR",
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
}
_MEMO_LIMIT = 200_000
_PARAMETERS_UP_TO = 16  # rows


def _base(dtype: str) -> str:
    return dtype.split("(")[0].upper()


def _column(values: pa.ChunkedArray) -> np.ndarray:
    """An Arrow column as float64 (numbers, NaN = NULL) or an object array (anything else)."""
    kind = values.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return values.cast(pa.float64()).to_numpy().astype(np.float64, copy=False)
    out = np.empty(len(values), dtype=object)
    out[:] = values.to_pylist()
    return out


def _applied(rule: ColumnRule, values: Sequence[Any]) -> np.ndarray:
    """`rule.apply(values)`; a categorical rule of text values runs once per distinct value
    (the rule is per value, and a column holds a few levels: 1000 rows, ~5 origins)."""
    if rule.role != "categorical" or len(values) < 64:
        return rule.apply(values)
    if not set(map(type, values)) <= _TEXT_OR_NULL:  # 1 == 1.0 == True: not one dict key
        return rule.apply(values)
    distinct = list(dict.fromkeys(values))
    if 2 * len(distinct) > len(values):
        return rule.apply(values)
    cleaned = dict(zip(distinct, rule.apply(distinct).tolist(), strict=True))
    out = np.empty(len(values), dtype=object)
    out[:] = list(map(cleaned.__getitem__, values))
    return out


_TEXT_OR_NULL = {str, type(None)}


class ReferenceIndex:
    """One reference's cleaned rows in memory: key -> rows (sorted by time when it has one)."""

    def __init__(self, db: duckdb.DuckDBPyConnection, lookup: ReferenceLookup) -> None:
        self.lookup = lookup
        self.timed = lookup.timed
        self._first_rows: dict[tuple[Any, ...], int] | None = None
        self.max_age_us = (
            int(lookup.max_age.total_seconds()) * 1_000_000 if lookup.max_age is not None else None
        )
        keys = [
            f"CAST(r.{quote(r_col)} AS VARCHAR)" if as_text else f"r.{quote(r_col)}"
            for _, r_col, as_text in lookup.keys
        ]
        names = [f"__k{i}" for i in range(len(keys))]
        time_item = "epoch_us(r.__ref_time)" if self.timed else "0"
        outputs = [f"{sql} AS {quote(name)}" for name, sql in lookup.outputs.items()]
        not_null = " AND ".join(f"{k} IS NOT NULL" for k in keys)
        # `r` is the pipeline's reference query (prepared once by the runtime), so the rows, the
        # de-duplication and the cleaning of every value are the pipeline's own.
        table = db.sql(
            f"SELECT {', '.join(f'{k} AS {n}' for k, n in zip(keys, names, strict=True))}, "
            f"{time_item} AS __t{''.join(', ' + o for o in outputs)} FROM {lookup.table} r "
            f"WHERE {not_null} ORDER BY {', '.join(names)}, __t"
        ).to_arrow_table()
        missing = None
        if lookup.missing:
            items = ", ".join(f"{sql} AS {quote(name)}" for name, sql in lookup.missing.items())
            missing = db.sql(f"SELECT {items}").to_arrow_table()
        self.times = table.column("__t").to_numpy().astype(np.int64)
        key_lists = [table.column(n).to_pylist() for n in names]
        self.spans: dict[tuple[Any, ...], tuple[int, int]] = {}
        previous, start = None, 0
        for row, key in enumerate(zip(*key_lists, strict=True)):
            if key != previous:
                if previous is not None:
                    self.spans[previous] = (start, row)
                previous, start = key, row
        if previous is not None:
            self.spans[previous] = (start, table.num_rows)
        self.missing_row = table.num_rows  # every column ends with its no-match value
        # Keys by rank (table order); one key column: ranked by the value itself, no tuples.
        self.single = len(names) == 1
        self._rank = {(key[0] if self.single else key): i for i, key in enumerate(self.spans)}
        self._band_start = np.array([span[0] for span in self.spans.values()], dtype=np.int64)
        # Timed: all rows searchable at once, `position` = key rank * span + (time - first + 1)
        # (the rows are sorted by key, then time), so one searchsorted finds every ASOF match.
        self._position: np.ndarray | None = None
        if self.timed and self.times.size:
            self._first = int(self.times.min())
            self._span = int(self.times.max()) - self._first + 2
            if len(self.spans) * self._span < 2**62:
                lengths = [end - start for start, end in self.spans.values()]
                self._position = np.repeat(
                    np.arange(len(self.spans), dtype=np.int64) * self._span, lengths
                ) + (self.times - self._first + 1)
        self.columns: dict[str, np.ndarray] = {}
        for name in lookup.outputs:
            column = _column(table.column(name))
            fallback = _column(missing.column(name)) if missing is not None else None
            self.columns[name] = np.concatenate([column, fallback.astype(column.dtype)])

    def _timed_rows(
        self, key_columns: list[Sequence[Any]], times: np.ndarray, out: np.ndarray
    ) -> np.ndarray:
        """`rows` for a timed reference: the latest row of the key at or before each time
        (within `max_age`), for every request row in one searchsorted."""
        assert self._position is not None
        count = len(times)
        keys = key_columns[0] if self.single else list(zip(*key_columns, strict=True))
        # dict.get mapped in C; a NULL in a key (or an unknown key) matches nothing: -1.
        ranks = np.fromiter(
            map(self._rank.get, keys, itertools.repeat(-1, count)), dtype=np.int64, count=count
        )
        at = np.flatnonzero(ranks >= 0)
        if not at.size:
            return out
        ranks, wanted = ranks[at], times[at]
        # Clipped into the key's band (the max first: NaT's int64 minimum cannot overflow).
        offset = np.minimum(np.maximum(wanted, self._first - 1) - (self._first - 1), self._span - 1)
        found = np.searchsorted(self._position, ranks * self._span + offset, side="right") - 1
        ok = found >= self._band_start[ranks]  # ASOF: a row of the same key, not the one before
        if self.max_age_us is not None:
            ok &= wanted - self.times[np.maximum(found, 0)] <= self.max_age_us
        out[at[ok]] = found[ok]
        return out

    def rows(self, key_columns: list[Sequence[Any]], times: np.ndarray) -> np.ndarray:
        """The matched row of each request row (`missing_row` when none, or too old)."""
        count = len(times)
        out = np.full(count, self.missing_row, dtype=np.int64)
        as_text = [t for _, _, t in self.lookup.keys]
        if any(as_text):
            key_columns = [
                [None if k is None else str(k) for k in column] if text else column
                for column, text in zip(key_columns, as_text, strict=True)
            ]
        if self._position is not None:
            return self._timed_rows(key_columns, times, out)
        keys = list(zip(*key_columns, strict=True))
        if not self.timed:  # one row per key (the pipeline's query keeps the latest)
            if self._first_rows is None:
                self._first_rows = {key: span[0] for key, span in self.spans.items()}
            # dict.get mapped in C: no Python call per row. A NULL in a key matches nothing.
            return np.fromiter(
                map(self._first_rows.get, keys, itertools.repeat(self.missing_row, count)),
                dtype=np.int64,
                count=count,
            )
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)
        for key, indices in groups.items():
            span = self.spans.get(key)
            if span is None:
                continue
            start, end = span
            at = np.asarray(indices, dtype=np.int64)
            wanted = times[at]
            found = start + np.searchsorted(self.times[start:end], wanted, side="right") - 1
            ok = found >= start  # ASOF: the latest observation at or before the row's time
            if self.max_age_us is not None:
                ok &= wanted - self.times[np.maximum(found, start)] <= self.max_age_us
            out[at[ok]] = found[ok]
        return out


class RequestTransform:
    """Cleans request rows like `build_cleaning(..., serving=True)` does, without SQL per row."""

    def __init__(
        self,
        db: duckdb.DuckDBPyConnection,
        spec: DatasetSpec,
        plan: CleaningPlan,
        raw_schema: pa.Schema,
        flat: list[FlatColumn],
    ) -> None:
        self.spec = spec
        self.rules: list[ColumnRule] = plan.primary_rules
        self.raw_schema = raw_schema
        self.unsupported: list[str] = []
        nested = [c.name for c in flat if c.name != c.origin]
        if nested:
            self.unsupported.append(f"nested primary columns {nested}")
        self.unsupported += [
            f"column {r.name!r} ({r.role}, {r.dtype})" for r in self.rules if not r.applicable
        ]
        types = {c.name: c.dtype for c in flat}
        for lookup in plan.references:
            for p_col, _, as_text in lookup.keys:
                if as_text and _base(types.get(p_col, "")) not in _TEXT_KEYS:
                    self.unsupported.append(
                        f"reference {lookup.name!r} key {p_col!r} compared "
                        f"as text from {types.get(p_col)}"
                    )
        self.references = [ReferenceIndex(db, lookup) for lookup in plan.references]
        self.time_inputs: list[str] = []
        self.time_direct = False
        if spec.has_time:
            if spec.time_column and _base(types.get(spec.time_column, "")) in _DIRECT_TIMES:
                self.time_direct = True
                self.time_inputs = [spec.time_column]
            else:
                words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", spec.time_sql or ""))
                self.time_inputs = [f.name for f in raw_schema if f.name in words]
        self.time_compiled: TimeExpression | None = None
        if spec.has_time and not self.time_direct and spec.time_sql:
            self.time_compiled = compile_time_expression(
                spec.time_sql, {n: types[n] for n in self.time_inputs if n in types}
            )
        self._casts = [f"CAST(? AS {types[n]})" for n in self.time_inputs if n in types]
        self._names = ", ".join(quote(n) for n in self.time_inputs)
        self._db = db
        self._local = threading.local()
        self._memo: dict[tuple[Any, ...], int | None] = {}
        self._memo_lock = threading.Lock()

    # -- time -------------------------------------------------------------------------------
    def times(self, inputs: dict[str, Sequence[Any]], rows: int) -> np.ndarray:
        """`__time` of each row in µs (int64; NaT's value for NULL), as the pipeline's
        `CAST((time_sql) AS TIMESTAMP)`. Raises DuckDB's value errors for the caller."""
        if not self.spec.has_time:
            return np.zeros(rows, dtype=np.int64)
        if self.time_direct:
            values = inputs.get(self.time_inputs[0], [None] * rows)
            return np.array(values, dtype="datetime64[us]").astype(np.int64)
        none = [None] * rows
        nat = np.iinfo(np.int64).min
        if self.time_compiled is not None and rows == 1:
            value, unsafe_one = self.time_compiled.evaluate_one(
                {n: inputs.get(n, none)[0] for n in self.time_compiled.inputs}
            )
            if not unsafe_one:
                return np.array([nat if value is None else value], dtype=np.int64)
            return self._times_by_duckdb(inputs, rows)
        if self.time_compiled is not None:
            values, null, unsafe = self.time_compiled.evaluate(
                {n: inputs.get(n, none) for n in self.time_compiled.inputs}
            )
            out = np.where(null, nat, values)
            if unsafe.any():  # DuckDB's own answer (or error) for the rows it must decide
                at = np.flatnonzero(unsafe).tolist()
                subset = {n: [inputs.get(n, none)[i] for i in at] for n in self.time_inputs}
                out[at] = self._times_by_duckdb(subset, len(at))
            return out
        return self._times_by_duckdb(inputs, rows)

    def _times_by_duckdb(self, inputs: dict[str, Sequence[Any]], rows: int) -> np.ndarray:
        none = [None] * rows
        keys = list(zip(*[inputs.get(n, none) for n in self.time_inputs], strict=True))
        memo = self._memo
        todo = sorted({k for k in keys if k not in memo}, key=repr)
        if todo:
            self._evaluate_times(todo)
        nat = np.iinfo(np.int64).min
        return np.array([nat if memo[k] is None else memo[k] for k in keys], dtype=np.int64)

    def _evaluate_times(self, keys: list[tuple[Any, ...]]) -> None:
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._local.cursor = self._db.cursor()
        expression = f"epoch_us(CAST(({self.spec.time_sql}) AS TIMESTAMP))"
        if len(keys) <= _PARAMETERS_UP_TO:
            # A few rows: bound parameters (about 3x cheaper than registering an Arrow table).
            rows = ", ".join("(" + ", ".join(self._casts) + ")" for _ in keys)
            values = cursor.execute(
                f"SELECT {expression} FROM (VALUES {rows}) AS t({self._names})",
                [value for key in keys for value in key],
            ).fetchall()
        else:
            fields = [self.raw_schema.field(n) for n in self.time_inputs]
            table = pa.table(
                [
                    pa.array(list(values), type=f.type)
                    for f, values in zip(fields, zip(*keys, strict=True), strict=True)
                ],
                schema=pa.schema(fields),
            )
            cursor.register("__time_input", table)
            try:
                values = cursor.execute(f"SELECT {expression} FROM __time_input").fetchall()
            finally:
                cursor.unregister("__time_input")
        with self._memo_lock:
            if len(self._memo) + len(keys) > _MEMO_LIMIT:
                self._memo.clear()
            self._memo.update(zip(keys, (v[0] for v in values), strict=True))

    # -- rows -------------------------------------------------------------------------------
    def clean(
        self, inputs: dict[str, Sequence[Any]], rows: int
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Cleaned columns by name (numbers float64 with NaN = NULL, others objects) from the
        request fields' columns (a missing field is NULL), and the rows' `__time` in µs (the
        caller rejects NULL times)."""
        times = self.times(inputs, rows)
        none = [None] * rows
        columns: dict[str, Any] = {}
        for rule in self.rules:
            columns[rule.name] = _applied(rule, inputs.get(rule.name, none))
        for reference in self.references:
            keys = [inputs.get(p_col, none) for p_col, _, _ in reference.lookup.keys]
            matched = reference.rows(keys, times)
            for name, values in reference.columns.items():
                columns[name] = values[matched]
        columns[TIME] = times.astype("datetime64[us]")
        return columns, times
