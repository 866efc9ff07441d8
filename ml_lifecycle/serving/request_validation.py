"""Batch requests validated column by column: the per-record pydantic rules, without a model
instance per record.

A 1000-record batch validated by the generated pydantic `Record` model cost ~5 ms (one model
and a strict check per value); here each field is checked once over its whole column (the set
of value types, then numpy for finiteness and integer ranges), so a batch costs about one pass
over its values. The rules are the `Record` model's: unknown fields rejected, required fields
present, null only where the field is nullable or optional, numbers finite (a JSON integer is a
float, `true` or "1.5" is not), integers integral and in the column's range, strings for text.
Other types (dates, timestamps, structs) go through a pydantic adapter of the same item type.
Arrow IPC bodies (`arrow`) are checked on their column types instead (an Arrow integer column
holds integers by construction), then values the types do not vouch for: nulls, finiteness,
ranges. Every error names where it is (`records.3.distance`, `columns.distance.0`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ml_lifecycle.serving.runtime import RequestError, RequestField

_NONE = type(None)
_SIMPLE = {float: (float, int), int: (int,), str: (str,), bool: (bool,)}
_TYPE_NAMES = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class _Rule:
    name: str
    python_type: type
    allows_null: bool
    required: bool
    low: int | None
    high: int | None
    # Other types: checks a whole column (nulls included), raising `InvalidValue`.
    adapter: Callable[[list[Any]], Any] | None


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class BatchValidator:
    """Checks batches of request fields; answers columns (field -> list of values)."""

    def __init__(
        self,
        fields: list[RequestField],
        max_batch: int,
        int_ranges: dict[str, tuple[int, int]],
        adapter_for: Callable[[RequestField], Callable[[list[Any]], Any]],
    ) -> None:
        self.max_batch = max_batch
        self.rules: list[_Rule] = []
        for field in fields:
            simple = field.python_type in _SIMPLE
            low = high = None
            if field.python_type is int:
                base = field.dtype.split("(")[0].upper()
                low, high = int_ranges.get(base, int_ranges["BIGINT"])
            self.rules.append(
                _Rule(
                    name=field.name,
                    python_type=field.python_type,
                    allows_null=field.nullable or not field.required,
                    required=field.required,
                    low=low,
                    high=high,
                    adapter=None if simple else adapter_for(field),
                )
            )
        self.names = {rule.name for rule in self.rules}
        self.required = {rule.name for rule in self.rules if rule.required}

    def _fields(self, sent: set[str], where: str) -> None:
        """A column-wise batch sends only known fields and every required one."""
        unknown = sorted(sent - self.names)
        if unknown:
            raise RequestError(f"{where}: unknown field(s) {unknown}; known: {sorted(self.names)}")
        missing = sorted(self.required - sent)
        if missing:
            raise RequestError(f"{where}: missing required field(s) {missing}")

    def _size(self, rows: int, where: str, what: str) -> None:
        if rows < 1:
            raise RequestError(f"{where}: the batch is empty: send 1 to {self.max_batch} {what}")
        if rows > self.max_batch:
            raise RequestError(
                f"{where}: the batch has {rows} {what}; at most {self.max_batch} per request"
            )

    def columns(self, columns: dict[str, Any], where: str = "columns") -> dict[str, list[Any]]:
        """`{"<field>": [values...]}` checked; optional fields may be left out."""
        self._fields(set(columns), where)
        lengths = {}
        for name, values in columns.items():
            if type(values) is not list:
                raise RequestError(f"{where}.{name}: expected a list, one value per record")
            lengths[name] = len(values)
        if len(set(lengths.values())) > 1:
            raise RequestError(
                f"{where}: every column needs one value per record; lengths: {lengths}"
            )
        self._size(next(iter(lengths.values()), 0), where, "records")
        for rule in self.rules:
            if rule.name in columns:
                self._check(rule, columns[rule.name], lambda i, n=rule.name: f"{where}.{n}.{i}")
        return columns

    def records(self, records: list[Any], where: str = "records") -> dict[str, list[Any]]:
        """A list of record objects checked and turned into columns (absent optional -> null)."""
        if type(records) is not list:
            raise RequestError(f"{where}: expected a list of records")
        self._size(len(records), where, "records")
        if set(map(type, records)) != {dict}:
            index = next(i for i, r in enumerate(records) if type(r) is not dict)
            raise RequestError(
                f"{where}.{index}: expected an object, found {_describe(records[index])}"
            )
        key_sets = set(map(frozenset, records))
        for keys in key_sets:  # usually one: every record sends the same fields
            if not (keys <= self.names and self.required <= keys):
                index = next(i for i, r in enumerate(records) if frozenset(r) == keys)
                unknown = sorted(keys - self.names)
                if unknown:
                    raise RequestError(f"{where}.{index}: unknown field(s) {unknown}")
                missing = sorted(self.required - keys)
                raise RequestError(f"{where}.{index}: missing required field(s) {missing}")
        out: dict[str, list[Any]] = {}
        for rule in self.rules:
            values = [r.get(rule.name) for r in records]
            self._check(rule, values, lambda i, n=rule.name: f"{where}.{i}.{n}")
            out[rule.name] = values
        return out

    def arrow(self, table: pa.Table, where: str = "arrow") -> dict[str, list[Any]]:
        """An Arrow table (one column per field) checked by column type, as columns of Python
        values; optional fields may be left out."""
        names = table.column_names
        if len(set(names)) != len(names):
            raise RequestError(f"{where}: a field is sent twice: {names}")
        self._fields(set(names), where)
        self._size(table.num_rows, where, "rows")
        out: dict[str, list[Any]] = {}
        for rule in self.rules:
            if rule.name in names:
                column = table.column(rule.name)
                out[rule.name] = self._check_arrow(rule, column, f"{where}.{rule.name}")
        return out

    def _check_arrow(self, rule: _Rule, column: pa.ChunkedArray, at: str) -> list[Any]:
        kind = column.type
        if pa.types.is_dictionary(kind):
            column = column.cast(kind.value_type)
            kind = column.type
        if column.null_count and not rule.allows_null:
            index = int(pc.index(pc.is_null(column), True).as_py())
            raise RequestError(f"{at}.{index}: {rule.name} may not be null")

        def wrong(expected: str) -> RequestError:
            return RequestError(f"{at}: expected a column of {expected}, found Arrow type {kind}")

        if rule.python_type is float:
            if not (
                pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)
            ):
                raise wrong("numbers (float or integer)")
            values = column.cast(pa.float64())
            finite = pc.fill_null(pc.is_finite(values), True)
            if not pc.all(finite).as_py():
                index = int(pc.index(finite, False).as_py())
                raise RequestError(
                    f"{at}.{index}: expected a finite number, found {values[index].as_py()!r}"
                )
            return values.to_pylist()
        if rule.python_type is int:
            if not (pa.types.is_integer(kind) or pa.types.is_null(kind)):
                raise wrong("integers")
            if rule.low is not None and rule.high is not None and len(column) > column.null_count:
                bounds = pc.min_max(column).as_py()
                if bounds["min"] < rule.low or bounds["max"] > rule.high:
                    wide = column.cast(pa.float64())
                    bad = pc.or_(pc.less(wide, rule.low), pc.greater(wide, rule.high))
                    index = int(pc.index(pc.fill_null(bad, False), True).as_py())
                    raise RequestError(
                        f"{at}.{index}: expected an integer in [{rule.low}, {rule.high}], "
                        f"found {column[index].as_py()!r}"
                    )
            return column.to_pylist()
        if rule.python_type is str:
            if not (
                pa.types.is_string(kind)
                or pa.types.is_large_string(kind)
                or pa.types.is_string_view(kind)
                or pa.types.is_null(kind)
            ):
                raise wrong("strings")
            return column.to_pylist()
        if rule.python_type is bool:
            if not (pa.types.is_boolean(kind) or pa.types.is_null(kind)):
                raise wrong("booleans")
            return column.to_pylist()
        if pa.types.is_timestamp(kind) and kind.tz is not None:
            raise RequestError(
                f"{at}: expected the dataset's local date-time (a timestamp without time "
                f"zone), found Arrow type {kind}: a zone would shift it"
            )
        values = column.to_pylist()
        self._check(rule, values, lambda i: f"{at}.{i}")
        return values

    @staticmethod
    def _check(rule: _Rule, values: list[Any], at: Callable[[int], str]) -> None:
        def fail(index: int, problem: str) -> RequestError:
            return RequestError(f"{at(index)}: {problem}, found {_describe(values[index])}")

        types = set(map(type, values))
        has_null = _NONE in types
        if has_null:
            if not rule.allows_null:
                raise fail(values.index(None), f"{rule.name} may not be null")
            types.discard(_NONE)
        if rule.adapter is not None:
            try:
                rule.adapter(values)
            except InvalidValue as error:
                raise fail(error.index, error.problem) from None
            return
        allowed = _SIMPLE[rule.python_type]
        if not types <= set(allowed):
            index = next(
                i for i, v in enumerate(values) if v is not None and type(v) not in allowed
            )
            raise fail(index, f"expected {_TYPE_NAMES[rule.python_type]}")
        present = [v for v in values if v is not None] if has_null else values
        if rule.python_type is float:
            try:
                good = np.isfinite(np.asarray(present, dtype=np.float64))
            except OverflowError:  # an integer beyond float range
                good = np.array([_finite(v) for v in present], dtype=bool)
            if not good.all():
                bad = present[int(np.flatnonzero(~good)[0])]
                raise fail(_index_of(values, bad), "expected a finite number")
        elif rule.python_type is int and rule.low is not None and rule.high is not None:
            try:
                array = np.asarray(present, dtype=np.int64)
                good = (array >= rule.low) & (array <= rule.high)
            except OverflowError:
                good = np.array([rule.low <= v <= rule.high for v in present], dtype=bool)
            if not good.all():
                bad = present[int(np.flatnonzero(~good)[0])]
                raise fail(
                    _index_of(values, bad), f"expected an integer in [{rule.low}, {rule.high}]"
                )


class InvalidValue(ValueError):
    """Raised by a field's adapter: the record index and what is wrong with its value."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"{index}: {problem}")
        self.index = index
        self.problem = problem


def _finite(value: float | int) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except OverflowError:
        return False


def _index_of(values: list[Any], bad: Any) -> int:
    return next(i for i, v in enumerate(values) if v is bad)
