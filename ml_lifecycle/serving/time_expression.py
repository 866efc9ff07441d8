"""A dataset's `time_expression` (DuckDB SQL) compiled to numpy, for the service's request rows.

The subset covers what time expressions are made of: column references (integer, floating,
DATE, TIMESTAMP), numeric literals, unary minus, `+ - * / // %`, `make_date`, `make_timestamp`
(6 parts or epoch µs), `CAST(... AS ...)` / `::` to TIMESTAMP, DATE, integers and DOUBLE,
`INTERVAL` literals and `to_<unit>(n)`, date/timestamp +/- interval (date + integer is
not: DuckDB binds it for INTEGER and not BIGINT, a width this evaluator does not track).
`compile_time_expression` returns None for anything else (the caller keeps DuckDB).

Every operation also marks the rows it cannot vouch for: values where DuckDB raises or bends
the rules (division by zero, integer overflow, hour 24, seconds 60, non-integral casts, dates
outside years 1-9999...). The caller sends exactly those rows to DuckDB, so a compiled result is
always DuckDB's own result and DuckDB's errors still reach the client.
"""

from __future__ import annotations

import calendar
import math
import operator
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np

# Integer results are trusted below these magnitudes: INTEGER (literals too) and BIGINT.
_INT32, _INT64 = 2**31, 2**62
# Signed integers of 32 bits or more (narrower or unsigned types overflow at their own width)
# and DOUBLE (a FLOAT/REAL column rounds to 32 bits): other types are left to DuckDB.
_INTEGERS = {"INTEGER", "INT", "INT4", "BIGINT", "INT8", "LONG"}
_FLOATS = {"DOUBLE", "FLOAT8"}
_WIDE = {"BIGINT", "INT8", "LONG"}
_US = {
    "microsecond": 1,
    "millisecond": 1_000,
    "second": 1_000_000,
    "minute": 60_000_000,
    "hour": 3_600_000_000,
    "day": 86_400_000_000,
    "week": 7 * 86_400_000_000,
}
_DAY_US = 86_400_000_000
# DATE / TIMESTAMP values the compiled path vouches for: years 1 to 9999.
_MIN_DAY = int(np.datetime64("0001-01-01", "D").astype(np.int64))
_MAX_DAY = int(np.datetime64("9999-12-31", "D").astype(np.int64))
_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
    r"|\d+(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\"(?P<quoted>(?:[^\"]|\"\")+)\"|'(?P<string>(?:[^']|'')*)'"
    r"|(?P<op>::|//|[-+*/%(),]))"
)


class Unsupported(ValueError):
    """The expression uses something outside the compiled subset."""


@dataclass
class Value:
    """A column of one SQL type: `values` (int64 for int/date/timestamp/interval µs, float64
    for float), `null` (SQL NULL) and `unsafe` (rows the caller must give to DuckDB)."""

    kind: str  # "int" | "float" | "date" (days) | "timestamp" (µs) | "interval" (µs)
    values: np.ndarray
    null: np.ndarray
    unsafe: np.ndarray
    wide: bool = False  # an integer of 64 bits (BIGINT) rather than 32 (INTEGER)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, at = [], 0
    text = text.rstrip()
    while at < len(text):
        match = _TOKEN.match(text, at)
        if not match or match.end() == at:
            raise Unsupported(f"cannot read {text[at : at + 20]!r}")
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "quoted":
            kind, value = "column", value.replace('""', '"')
        out.append((kind, value))
        at = match.end()
    return out


def _combine(
    kind: str, values: np.ndarray, *parts: Value, unsafe: np.ndarray | None = None
) -> Value:
    null = parts[0].null.copy()
    flagged = parts[0].unsafe.copy()
    for part in parts[1:]:
        null |= part.null
        flagged |= part.unsafe
    if unsafe is not None:
        flagged |= unsafe & ~null
    return Value(kind, values, null, flagged, any(p.wide for p in parts))


def _as_float(value: Value) -> np.ndarray:
    return value.values.astype(np.float64)


def _too_big(values: np.ndarray, limit: int = _INT32) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return ~(np.abs(values.astype(np.float64)) < limit)


def _arithmetic(op: str, left: Value, right: Value) -> Value:
    kinds = (left.kind, right.kind)
    if kinds == ("int", "int"):
        a, b = left.values, right.values
        limit = _INT64 if left.wide or right.wide else _INT32
        if op == "/":
            zero = b == 0
            with np.errstate(divide="ignore", invalid="ignore"):
                return _combine("float", a / np.where(zero, 1, b), left, right, unsafe=zero)
        if op in ("//", "%"):
            zero = b == 0
            safe_b = np.where(zero, 1, b)
            # DuckDB truncates toward zero (C semantics), numpy floors.
            quotient = np.abs(a) // np.abs(safe_b) * np.sign(a) * np.sign(safe_b)
            values = quotient if op == "//" else a - quotient * safe_b
            return _combine(
                "int",
                values,
                left,
                right,
                unsafe=zero | _too_big(a, limit) | _too_big(safe_b, limit),
            )
        with np.errstate(over="ignore"):
            values = {"+": np.add, "-": np.subtract, "*": np.multiply}[op](a, b)
        exact = {"+": np.add, "-": np.subtract, "*": np.multiply}[op](
            _as_float(left), _as_float(right)
        )
        return _combine(
            "int",
            values,
            left,
            right,
            unsafe=_too_big(a, limit) | _too_big(b, limit) | _too_big(exact, limit),
        )
    if set(kinds) <= {"int", "float"}:
        a, b = _as_float(left), _as_float(right)
        with np.errstate(all="ignore"):
            if op == "/":
                values = a / np.where(b == 0, 1, b)
                bad = b == 0
            elif op in ("+", "-", "*"):
                values = {"+": np.add, "-": np.subtract, "*": np.multiply}[op](a, b)
                bad = np.zeros(len(a), dtype=bool)
            else:  # // and % on floats: DuckDB's rules for them are not worth copying
                raise Unsupported(f"{op} on floating values")
        return _combine("float", values, left, right, unsafe=bad | ~np.isfinite(values))
    if op in ("+", "-") and left.kind in ("date", "timestamp") and right.kind == "interval":
        base = left.values * _DAY_US if left.kind == "date" else left.values
        values = base + right.values if op == "+" else base - right.values
        return _timestamp(_combine("timestamp", values, left, right))
    if op == "+" and left.kind == "interval" and right.kind in ("date", "timestamp"):
        return _arithmetic("+", right, left)
    if op == "+" and kinds == ("interval", "interval"):
        values = left.values + right.values
        return _combine("interval", values, left, right, unsafe=_too_big(values, _INT64))
    raise Unsupported(f"{left.kind} {op} {right.kind}")


def _date(value: Value) -> Value:
    value.unsafe |= ~value.null & ((value.values < _MIN_DAY) | (value.values > _MAX_DAY))
    return value


def _timestamp(value: Value) -> Value:
    with np.errstate(over="ignore"):
        days = np.floor_divide(value.values, _DAY_US)
    value.unsafe |= ~value.null & ((days < _MIN_DAY) | (days > _MAX_DAY))
    return value


def _days(year: Value, month: Value, day: Value) -> tuple[np.ndarray, np.ndarray]:
    """Epoch days of valid (year, month, day) rows, and the rows that are not a real date."""
    bad = (
        _too_big(year.values)
        | (year.values < 1)
        | (year.values > 9999)
        | (month.values < 1)
        | (month.values > 12)
        | (day.values < 1)
        | (day.values > 31)
    )
    y = np.where(bad, 1970, year.values)
    m = np.where(bad, 1, month.values)
    d = np.where(bad, 1, day.values)
    months = ((y - 1970) * 12 + (m - 1)).astype("datetime64[M]")
    first = months.astype("datetime64[D]").astype(np.int64)
    length = (months + 1).astype("datetime64[D]").astype(np.int64) - first
    bad |= d > length
    return first + d - 1, bad


def _function(name: str, args: list[Value], rows: int) -> Value:
    kinds = [a.kind for a in args]
    if name == "make_date" and kinds == ["int"] * 3:
        days, bad = _days(*args)
        return _date(_combine("date", days, *args, unsafe=bad))
    if name == "make_timestamp" and kinds == ["int"]:
        return _timestamp(_combine("timestamp", args[0].values.copy(), args[0]))
    if (
        name == "make_timestamp"
        and len(args) == 6
        and kinds[:5] == ["int"] * 5
        and kinds[5] in ("int", "float")
    ):
        days, bad = _days(*args[:3])
        hour, minute, second = args[3].values, args[4].values, args[5].values
        with np.errstate(invalid="ignore"):
            micros = np.asarray(second, dtype=np.float64) * 1e6
            whole = np.isfinite(micros) & (micros == np.floor(micros))
            # DuckDB accepts hour 24 and second 60 (rolling over): left to it.
            bad |= (
                (hour < 0)
                | (hour > 23)
                | (minute < 0)
                | (minute > 59)
                | ~whole
                | ~(micros >= 0)
                | ~(micros < 60e6)
            )
        micros = np.where(bad, 0, np.nan_to_num(micros)).astype(np.int64)
        values = (
            days * _DAY_US
            + np.where(bad, 0, hour) * _US["hour"]
            + np.where(bad, 0, minute) * _US["minute"]
            + micros
        )
        return _timestamp(_combine("timestamp", values, *args, unsafe=bad))
    unit = name.removeprefix("to_").removesuffix("s")
    if name.startswith("to_") and unit in _US and kinds == ["int"]:
        with np.errstate(over="ignore"):
            micros = args[0].values * _US[unit]
        return _combine(
            "interval", micros, args[0], unsafe=_too_big(_as_float(args[0]) * _US[unit], _INT64)
        )
    raise Unsupported(f"function {name}({', '.join(kinds)})")


def _cast(value: Value, target: str) -> Value:
    target = target.upper()
    if target in ("TIMESTAMP", "DATETIME"):
        if value.kind == "timestamp":
            return value
        if value.kind == "date":
            return _combine("timestamp", value.values * _DAY_US, value)
    elif target == "DATE":
        if value.kind == "date":
            return value
        if value.kind == "timestamp":
            return _combine("date", np.floor_divide(value.values, _DAY_US), value)
    elif target in _INTEGERS:
        wide = target in _WIDE
        limit = _INT64 if wide else _INT32
        if value.kind == "int":
            out = _combine("int", value.values, value, unsafe=_too_big(value.values, limit))
            out.wide = wide
            return out
        if value.kind == "float":  # DuckDB rounds halves away from zero: integral values only
            floats = value.values
            with np.errstate(invalid="ignore"):
                bad = ~(floats == np.floor(floats)) | _too_big(floats, limit)
            out = _combine(
                "int", np.where(bad, 0, np.nan_to_num(floats)).astype(np.int64), value, unsafe=bad
            )
            out.wide = wide
            return out
    elif target in _FLOATS and value.kind in ("int", "float"):
        return _combine("float", _as_float(value), value, unsafe=_too_big(value.values, 2**53))
    raise Unsupported(f"CAST({value.kind} AS {target})")


class _Parser:
    def __init__(self, text: str, columns: dict[str, str]) -> None:
        self.tokens = _tokens(text)
        self.at = 0
        self.columns = columns  # name -> kind
        self.used: list[str] = []

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.at] if self.at < len(self.tokens) else ("end", "")

    def take(self, expected: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if expected is not None and token[1].upper() != expected:
            raise Unsupported(f"expected {expected}, found {token[1]!r}")
        self.at += 1
        return token

    def parse(self) -> _Node:
        node = self.expression()
        if self.peek()[0] != "end":
            raise Unsupported(f"unexpected {self.peek()[1]!r}")
        return node

    def expression(self) -> _Node:
        node = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            node = _Binary(op, node, self.term())
        return node

    def term(self) -> _Node:
        node = self.unary()
        while self.peek() in (("op", "*"), ("op", "/"), ("op", "//"), ("op", "%")):
            op = self.take()[1]
            node = _Binary(op, node, self.unary())
        return node

    def unary(self) -> _Node:
        if self.peek() == ("op", "-"):
            self.take()
            return self.postfix(_Negate(self.unary()))
        if self.peek() == ("op", "+"):
            self.take()
            return self.unary()
        return self.postfix(self.primary())

    def postfix(self, node: _Node) -> _Node:
        while self.peek() == ("op", "::"):
            self.take()
            node = _Cast(node, self.type_name())
        return node

    def type_name(self) -> str:
        kind, name = self.take()
        if kind != "name":
            raise Unsupported(f"type {name!r}")
        return name

    def primary(self) -> _Node:
        kind, text = self.take()
        if kind == "number":
            if re.fullmatch(r"\d+", text):
                number = int(text)
                if number >= _INT32:
                    raise Unsupported(f"literal {text}")
                return _Constant("int", number)
            return _Constant("float", float(text))
        if kind == "op" and text == "(":
            node = self.expression()
            self.take(")")
            return node
        if kind == "name" and text.upper() == "CAST" and self.peek() == ("op", "("):
            self.take()
            inner = self.expression()
            self.take("AS")
            target = self.type_name()
            self.take(")")
            return _Cast(inner, target)
        if kind == "name" and text.upper() == "INTERVAL":
            return self.interval()
        if kind == "name" and self.peek() == ("op", "("):
            self.take()
            args: list[_Node] = []
            if self.peek() != ("op", ")"):
                args.append(self.expression())
                while self.peek() == ("op", ","):
                    self.take()
                    args.append(self.expression())
            self.take(")")
            return _Call(text.lower(), args)
        if kind in ("name", "column"):
            if text not in self.columns:
                raise Unsupported(f"name {text!r}")
            if text not in self.used:
                self.used.append(text)
            return _Column(text)
        raise Unsupported(f"unexpected {text!r}")

    def interval(self) -> _Node:
        kind, text = self.take()
        if kind == "string":
            parts = text.split()
            if len(parts) == 2:
                amount, unit = parts
            elif len(parts) == 1:
                amount, unit = parts[0], self.take()[1]
            else:
                raise Unsupported(f"INTERVAL '{text}'")
        elif kind == "number":
            amount, unit = text, self.take()[1]
        else:
            raise Unsupported(f"INTERVAL {text!r}")
        unit = unit.lower().removesuffix("s")
        if unit not in _US or not re.fullmatch(r"-?\d+", amount):
            raise Unsupported(f"INTERVAL {amount} {unit}")
        return _Constant("interval", int(amount) * _US[unit])


class _Defer(Exception):
    """A single row the compiled path does not vouch for: DuckDB evaluates it."""


def _big(value: float, limit: int = _INT32) -> bool:
    return not abs(float(value)) < limit


def _scalar_timestamp(micros: int) -> int:
    if not _MIN_DAY <= micros // _DAY_US <= _MAX_DAY:
        raise _Defer
    return micros


def _scalar_days(year: int, month: int, day: int) -> int:
    if _big(year) or not (1 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= 31):
        raise _Defer
    if day > calendar.monthrange(year, month)[1]:
        raise _Defer
    return date(year, month, 1).toordinal() - _EPOCH_ORDINAL + day - 1


class _Node:
    """An expression node: `__call__` evaluates columns (numpy), `scalar` one row (Python).

    Both apply the same rules; `kind` and `wide` are the node's static type, recorded when
    the compiler evaluates the expression once on a sample row."""

    kind = ""
    wide = False

    def __call__(self, env: dict[str, Value]) -> Value:
        value = self.vector(env)
        self.kind, self.wide = value.kind, value.wide
        return value

    def vector(self, env: dict[str, Value]) -> Value:
        raise NotImplementedError

    def scalar(self, row: dict[str, Any]) -> Any:
        raise NotImplementedError


class _Column(_Node):
    def __init__(self, name: str) -> None:
        self.name = name

    def vector(self, env: dict[str, Value]) -> Value:
        return env[self.name]

    def scalar(self, row: dict[str, Any]) -> Any:
        return row[self.name]


class _Constant(_Node):
    def __init__(self, kind: str, number: float) -> None:
        self.constant_kind = kind
        self.number = number

    def vector(self, env: dict[str, Value]) -> Value:
        rows = len(next(iter(env.values())).values) if env else 1
        dtype = np.float64 if self.constant_kind == "float" else np.int64
        empty = np.zeros(rows, dtype=bool)
        return Value(
            self.constant_kind, np.full(rows, self.number, dtype=dtype), empty, empty.copy()
        )

    def scalar(self, row: dict[str, Any]) -> Any:
        return self.number


class _Binary(_Node):
    def __init__(self, op: str, left: _Node, right: _Node) -> None:
        self.op, self.left, self.right = op, left, right

    def vector(self, env: dict[str, Value]) -> Value:
        return _arithmetic(self.op, self.left(env), self.right(env))

    def scalar(self, row: dict[str, Any]) -> Any:
        op = self.op
        a, b = self.left.scalar(row), self.right.scalar(row)
        left, right = self.left.kind, self.right.kind
        if a is None or b is None:
            return None
        if left == right == "int":
            limit = _INT64 if self.left.wide or self.right.wide else _INT32
            if op == "/":
                if b == 0:
                    raise _Defer
                return float(a) / float(b)
            if op in ("//", "%"):
                if b == 0 or _big(a, limit) or _big(b, limit):
                    raise _Defer
                quotient = abs(a) // abs(b)
                if (a < 0) != (b < 0):
                    quotient = -quotient
                return quotient if op == "//" else a - quotient * b
            exact = _PYTHON_OPS[op](float(a), float(b))
            if _big(a, limit) or _big(b, limit) or _big(exact, limit):
                raise _Defer
            return _PYTHON_OPS[op](a, b)
        if left in ("int", "float") and right in ("int", "float"):
            x, y = float(a), float(b)
            if op == "/" and y == 0:
                raise _Defer
            out = x / y if op == "/" else _PYTHON_OPS[op](x, y)
            if not math.isfinite(out):
                raise _Defer
            return out
        if left == "interval" and right in ("date", "timestamp"):
            a, b, left = b, a, right
        if left in ("date", "timestamp"):
            base = a * _DAY_US if left == "date" else a
            return _scalar_timestamp(base + b if op == "+" else base - b)
        total = a + b  # interval + interval
        if _big(total, _INT64):
            raise _Defer
        return total


class _Negate(_Node):
    def __init__(self, inner: _Node) -> None:
        self.inner = inner

    def vector(self, env: dict[str, Value]) -> Value:
        value = self.inner(env)
        if value.kind not in ("int", "float", "interval"):
            raise Unsupported(f"-{value.kind}")
        limit = _INT64 if value.wide else _INT32
        return _combine(
            value.kind,
            -value.values,
            value,
            unsafe=_too_big(value.values, limit) if value.kind == "int" else None,
        )

    def scalar(self, row: dict[str, Any]) -> Any:
        value = self.inner.scalar(row)
        if value is None:
            return None
        if self.kind == "int" and _big(value, _INT64 if self.inner.wide else _INT32):
            raise _Defer
        return -value


class _Cast(_Node):
    def __init__(self, inner: _Node, target: str) -> None:
        self.inner, self.target = inner, target.upper()

    def vector(self, env: dict[str, Value]) -> Value:
        return _cast(self.inner(env), self.target)

    def scalar(self, row: dict[str, Any]) -> Any:
        value = self.inner.scalar(row)
        if value is None:
            return None
        source, target = self.inner.kind, self.target
        if target in ("TIMESTAMP", "DATETIME"):
            return value if source == "timestamp" else value * _DAY_US
        if target == "DATE":
            return value if source == "date" else value // _DAY_US
        if target in _INTEGERS:
            limit = _INT64 if target in _WIDE else _INT32
            if source == "float" and not (math.isfinite(value) and value == math.floor(value)):
                raise _Defer
            if _big(value, limit):
                raise _Defer
            return int(value)
        if _big(value, 2**53):  # to DOUBLE
            raise _Defer
        return float(value)


class _Call(_Node):
    def __init__(self, name: str, args: list[_Node]) -> None:
        self.name, self.args = name, args

    def vector(self, env: dict[str, Value]) -> Value:
        return _function(self.name, [a(env) for a in self.args], 0)

    def scalar(self, row: dict[str, Any]) -> Any:
        values = [a.scalar(row) for a in self.args]
        if any(v is None for v in values):
            return None
        name = self.name
        if name == "make_date":
            return _scalar_days(*values)
        if name == "make_timestamp" and len(values) == 1:
            return _scalar_timestamp(values[0])
        if name == "make_timestamp":
            year, month, day, hour, minute, second = values
            days = _scalar_days(year, month, day)
            micros = float(second) * 1e6
            if not (
                0 <= hour <= 23
                and 0 <= minute <= 59
                and math.isfinite(micros)
                and micros == math.floor(micros)
                and 0 <= micros < 60e6
            ):
                raise _Defer
            return _scalar_timestamp(
                days * _DAY_US + hour * _US["hour"] + minute * _US["minute"] + int(micros)
            )
        unit = _US[name.removeprefix("to_").removesuffix("s")]  # to_<unit>
        if _big(float(values[0]) * unit, _INT64):
            raise _Defer
        return values[0] * unit


_PYTHON_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


_KINDS = {
    **dict.fromkeys(_INTEGERS, "int"),
    **dict.fromkeys(_WIDE, "bigint"),
    **dict.fromkeys(_FLOATS, "float"),
    "DATE": "date",
    "TIMESTAMP": "timestamp",
    "TIMESTAMP_US": "timestamp",
    "DATETIME": "timestamp",
}


class TimeExpression:
    """`epoch_us(CAST((expression) AS TIMESTAMP))` over request columns, in numpy."""

    def __init__(self, text: str, root: _Node, inputs: list[str], kinds: dict[str, str]) -> None:
        self.text = text
        self.root = root
        self.inputs = inputs
        self.kinds = kinds

    def column(self, name: str, values: list) -> Value:
        kind = self.kinds[name]
        # One object array compared with None in C (no Python call per value).
        objects = np.empty(len(values), dtype=object)
        objects[:] = values
        null = np.equal(objects, None)
        unsafe = np.zeros(len(values), dtype=bool)
        if kind == "float":
            array = np.where(null, np.nan, objects).astype(np.float64)
            unsafe |= np.isnan(array) & ~null  # a DOUBLE NaN is not NULL: DuckDB's business
            return Value(kind, array, null, unsafe)
        if kind in ("date", "timestamp"):
            unit = "D" if kind == "date" else "us"
            array = np.array(values, dtype=f"datetime64[{unit}]").astype(np.int64)
            return Value(kind, array, null, unsafe)
        if null.any():
            objects[null] = 0
        array = objects.astype(np.int64)
        return Value("int", array, null, unsafe, wide=kind == "bigint")

    def evaluate(self, columns: dict[str, list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch µs, null, unsafe) for each row; `unsafe` rows must be evaluated by DuckDB."""
        env = {name: self.column(name, columns[name]) for name in self.inputs}
        result = self.root(env)
        if result.kind == "date":
            result = _cast(result, "TIMESTAMP")
        elif result.kind != "timestamp":
            raise Unsupported(f"the expression gives {result.kind}, not a date or timestamp")
        return result.values, result.null, result.unsafe

    def evaluate_one(self, values: dict[str, Any]) -> tuple[int | None, bool]:
        """(epoch µs or None for NULL, unsafe) of one row, in plain Python: the same rules as
        `evaluate` without numpy's per-call set-up (~10x faster for a single request)."""
        row: dict[str, Any] = {}
        try:
            for name in self.inputs:
                value = values.get(name)
                kind = self.kinds[name]
                if value is None:
                    row[name] = None
                elif kind == "float":
                    row[name] = float(value)
                    if math.isnan(row[name]):
                        raise _Defer
                elif kind == "date":
                    row[name] = value.toordinal() - _EPOCH_ORDINAL
                elif kind == "timestamp":
                    row[name] = (value - _EPOCH) // _MICROSECOND
                else:
                    row[name] = int(value)
            result = self.root.scalar(row)
        except _Defer:
            return None, True
        if result is not None and self.root.kind == "date":
            result *= _DAY_US
        return result, False


def compile_time_expression(text: str, column_types: dict[str, str]) -> TimeExpression | None:
    """The compiled expression, or None when it is outside the subset (DuckDB evaluates it).

    `column_types` maps each column name to its DuckDB type. The expression is also checked
    on one row of zeros, so a type mismatch (e.g. a timestamp times an integer) is found
    here rather than on a request."""
    kinds = {
        name: _KINDS[dtype.split("(")[0].upper()]
        for name, dtype in column_types.items()
        if dtype.split("(")[0].upper() in _KINDS
    }
    try:
        parser = _Parser(text, kinds)
        root = parser.parse()
        compiled = TimeExpression(text, root, parser.used, kinds)
        if not compiled.inputs:
            return None  # a constant: the memo of the DuckDB path answers it once
        sample = {name: [None] for name in compiled.inputs}
        compiled.evaluate(sample)
    except (Unsupported, RecursionError, KeyError):
        return None
    return compiled
