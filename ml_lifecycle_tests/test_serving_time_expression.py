"""The compiled time expression (serving/time_expression.py) against DuckDB, row by row.

For every expression and every row the compiled evaluator either gives DuckDB's own value
(or NULL), or marks the row for DuckDB; on ordinary rows it marks none, so the fast path is
the one taken. Rows include NULLs, leap days, month/day/hour/minute out of range, hour 24,
negative and zero divisors, huge values and dates outside years 1-9999.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from ml_lifecycle.serving.time_expression import compile_time_expression

TYPES = {
    "year": "BIGINT",
    "month": "BIGINT",
    "day": "BIGINT",
    "hhmm": "INTEGER",
    "minutes": "BIGINT",
    "seconds": "DOUBLE",
    "d": "DATE",
    "ts": "TIMESTAMP",
    "epoch": "BIGINT",
    "small": "SMALLINT",
}
ARROW = {
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "DATE": pa.date32(),
    "TIMESTAMP": pa.timestamp("us"),
    "SMALLINT": pa.int16(),
}

EXPRESSIONS = [
    "make_timestamp(year, month, day, hhmm // 100, hhmm % 100, 0)",
    "make_timestamp(year, month, day, hhmm // 100, hhmm % 100, seconds)",
    "make_date(year, month, day)",
    "CAST(make_date(year, month, day) AS TIMESTAMP) + to_minutes(minutes)",
    "make_date(year, month, day) + INTERVAL 90 MINUTE",
    "make_date(year, month, day) + INTERVAL '2 hours' - to_seconds(minutes * 60)",
    "d + to_days(CAST(CAST(minutes AS DOUBLE) AS BIGINT))",
    "d + to_minutes((minutes // 7) * 2 - 1)",
    "ts - INTERVAL 1 DAY",
    "CAST(ts AS DATE)",
    "ts::DATE + INTERVAL 36 HOURS",
    "make_timestamp(epoch)",
    "make_timestamp(epoch * 1000000)",
    "make_timestamp(2013, 1, 1, 0, 0, 0) + to_hours(-(minutes % 24))",
    'make_timestamp("year", ((month)), day, CAST((hhmm - hhmm % 100) // 100 AS BIGINT), 0, 0.5)',
    "make_date(year, month, day) + to_days(day // (month - 1))",
]
# Outside the subset: the service keeps DuckDB for them.
UNSUPPORTED = [
    "strptime(CAST(year AS VARCHAR), '%Y')",
    "make_date(year, month, day) + INTERVAL 1 MONTH",
    "make_date(small, month, day)",
    "CASE WHEN year > 0 THEN make_date(year, 1, 1) END",
    "year + month",
    "d + 1",
    "make_timestamp(year, month, day, 0, 0, seconds // 1)",
]


def _rows(count: int, seed: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    ordinary = rng.random(count) < 0.6

    def pick(normal, odd) -> list:
        return [n if keep else o for n, o, keep in zip(normal, odd, ordinary, strict=True)]

    def with_nulls(values: list) -> list:
        return [None if rng.random() < 0.05 else v for v in values]

    year = pick(
        rng.integers(1990, 2030, count),
        rng.choice([0, 1, -5, 9999, 10_000, 2000, 2100, 2024, 2**40, -(2**62)], count),
    )
    month = pick(rng.integers(1, 13, count), rng.choice([0, 2, 13, -1, 12, 2**35], count))
    day = pick(rng.integers(1, 29, count), rng.choice([28, 29, 30, 31, 0, 32, -3], count))
    hhmm = pick(
        rng.integers(0, 24, count) * 100 + rng.integers(0, 60, count),
        rng.choice([2400, 2359, 60, 99, -1, -130, 0, 2**31 - 1], count),
    )
    minutes = pick(
        rng.integers(-3000, 3000, count), rng.choice([0, -(2**40), 2**40, 2**62, 1, -1], count)
    )
    seconds = pick(
        rng.integers(0, 60, count).astype(float),
        rng.choice([59.9999999, 60.0, -0.5, 0.25, 1e300, np.nan, 30.0], count),
    )
    days = rng.integers(-800_000, 3_000_000, count)
    d = [
        date(1970, 1, 1) + timedelta(days=int(v)) if -719_000 < v < 2_900_000 else date(2013, 3, 1)
        for v in days
    ]
    ts = [
        datetime(1970, 1, 1) + timedelta(microseconds=int(v))
        for v in rng.integers(-62_000_000_000_000_000, 253_000_000_000_000_000, count)
    ]
    epoch = pick(
        rng.integers(-(10**10), 10**10, count),
        rng.choice([2**62, -(2**62), 0, 253_402_300_800, -62_135_596_801], count),
    )
    return {
        "year": with_nulls([int(v) for v in year]),
        "month": with_nulls([int(v) for v in month]),
        "day": with_nulls([int(v) for v in day]),
        "hhmm": with_nulls([int(v) for v in hhmm]),
        "minutes": with_nulls([int(v) for v in minutes]),
        "seconds": with_nulls([None if v != v else float(v) for v in seconds]),
        "d": with_nulls(d),
        "ts": with_nulls(ts),
        "epoch": with_nulls([int(v) for v in epoch]),
        "small": with_nulls([int(v) for v in rng.integers(1, 3000, count)]),
    }


def _duckdb(expression: str, columns: dict[str, list]) -> list:
    """DuckDB's value per row (None when NULL or an error, with TRY)."""
    table = pa.table({n: pa.array(columns[n], type=ARROW[TYPES[n]]) for n in TYPES})
    conn = duckdb.connect()
    conn.register("t", table)
    return [
        row[0]
        for row in conn.sql(
            f"SELECT TRY(epoch_us(CAST(({expression}) AS TIMESTAMP))) FROM t"
        ).fetchall()
    ]


def _raises(expression: str, row: dict[str, list]) -> bool:
    table = pa.table({n: pa.array(row[n], type=ARROW[TYPES[n]]) for n in TYPES})
    conn = duckdb.connect()
    conn.register("t", table)
    try:
        conn.sql(f"SELECT epoch_us(CAST(({expression}) AS TIMESTAMP)) FROM t").fetchall()
    except duckdb.Error:
        return True
    return False


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_compiled_time_expression_equals_duckdb_on_every_row(expression: str):
    compiled = compile_time_expression(expression, TYPES)
    assert compiled is not None, expression
    columns = _rows(2000, seed=len(expression))
    values, null, unsafe = compiled.evaluate({n: columns[n] for n in compiled.inputs})
    expected = _duckdb(expression, columns)
    problems = []
    for index, want in enumerate(expected):
        if unsafe[index]:
            continue
        got = None if null[index] else int(values[index])
        if got != want:
            problems.append((index, {n: columns[n][index] for n in compiled.inputs}, got, want))
    assert not problems, problems[:5]
    # A NULL the compiled path gives is DuckDB's NULL, not an error TRY turned into one.
    nulls = np.flatnonzero(null & ~unsafe).tolist()
    assert nulls and not _raises(expression, {n: [columns[n][i] for i in nulls] for n in TYPES})
    # The rows DuckDB decides are the odd ones: ordinary rows stay on the compiled path.
    assert unsafe.mean() < 0.5
    assert (~unsafe & ~null).sum() > 500


def test_ordinary_rows_never_leave_the_compiled_path():
    compiled = compile_time_expression(EXPRESSIONS[0], TYPES)
    assert compiled is not None
    columns = {
        "year": [2013] * 1440,
        "month": [12] * 1440,
        "day": [31] * 1440,
        "hhmm": [h * 100 + m for h in range(24) for m in range(60)],
    }
    values, null, unsafe = compiled.evaluate(columns)
    assert not unsafe.any() and not null.any()
    assert values.tolist() == _duckdb(EXPRESSIONS[0], {**_rows(1440, 0), **columns})


@pytest.mark.parametrize("expression", UNSUPPORTED)
def test_expressions_outside_the_subset_are_left_to_duckdb(expression: str):
    assert compile_time_expression(expression, TYPES) is None


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_single_row_path_agrees_with_the_columns_path(expression: str):
    """One request row is evaluated in plain Python (`evaluate_one`): on every row it gives
    the columns path's value, NULL or hand-over to DuckDB."""
    compiled = compile_time_expression(expression, TYPES)
    assert compiled is not None
    columns = _rows(2000, seed=len(expression) + 1)
    values, null, unsafe = compiled.evaluate({n: columns[n] for n in compiled.inputs})
    problems = []
    for index in range(len(values)):
        got = compiled.evaluate_one({n: columns[n][index] for n in compiled.inputs})
        want = (
            (None, True) if unsafe[index] else (None if null[index] else int(values[index]), False)
        )
        if got != want:
            problems.append((index, {n: columns[n][index] for n in compiled.inputs}, got, want))
    assert not problems, problems[:5]
