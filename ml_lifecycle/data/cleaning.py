"""The `cleaned` table: typed, deduplicated, target derived, leaks dropped, references joined.

Everything is one DuckDB statement built from the spec. Rules, per column type:
- numbers: NaN/inf and values outside `valid_ranges` become NULL (LightGBM treats NULL as missing);
- categorical strings: trimmed, empty or NULL becomes the level "(missing)";
- text: NULL becomes "";  JSON strings are kept for the feature transform to flatten;
- nested (STRUCT) columns of any source are flattened to `<column>_<field>`;
- rows without a time are dropped; rows without a target are kept (stage 2 counts and skips them);
- duplicates by `id_columns` keep the most recently ingested row;
- references join on their keys; a reference with a time joins as of the row's time (ASOF: the
  latest observation at or before it, never a later one), optionally no older than `max_age`.
Aggregate inputs (`value`, `known_at`) are evaluated here, before leak columns are dropped, into
internal `__agg_<name>_value` / `__agg_<name>_known_at` columns that are never features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import duckdb
import numpy as np

from ml_lifecycle.data.ingestion import INGESTED_AT, LINEAGE_COLUMNS, SOURCE_FILE
from ml_lifecycle.data.sources import quote
from ml_lifecycle.spec import TARGET, TIME, DatasetSpec, SpecError, duration_sql

MISSING_LEVEL = "(missing)"
AGG_VALUE = "__agg_{}_value"
AGG_KNOWN_AT = "__agg_{}_known_at"
_NUMERIC = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
            "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL", "REAL"}
_FLOATS = {"FLOAT", "DOUBLE", "REAL"}


@dataclass(frozen=True)
class FlatColumn:
    name: str  # flattened name
    expr: str  # SQL over the raw table
    dtype: str
    origin: str  # raw column it comes from


# DuckDB's trim() removes the Unicode space separators (category Zs), not tabs or newlines.
_SPACES = " \u00a0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u202f\u205f\u3000"
_INTEGERS = _NUMERIC - _FLOATS - {"DECIMAL"}


@dataclass(frozen=True)
class ColumnRule:
    """How one column's values are cleaned, by role. One rule, two executors over the same
    fields: `sql(expr)` (the pipeline's statement, millions of rows) and `apply(values)` (the
    service's request rows, no query per request). Tests run both over whole datasets."""

    name: str
    dtype: str
    role: str
    low: float | None = None
    high: float | None = None

    @property
    def base(self) -> str:
        return _base(self.dtype)

    def sql(self, expr: str) -> str:
        if self.role == "categorical":
            as_text = expr if self.base == "VARCHAR" else f"CAST({expr} AS VARCHAR)"
            return f"coalesce(NULLIF(trim({as_text}), ''), '{MISSING_LEVEL}')"
        if self.role == "text":
            return f"coalesce(CAST({expr} AS VARCHAR), '')"
        if self.role == "numeric":
            out = expr
            if self.base in _FLOATS:
                out = f"CASE WHEN isfinite({out}) THEN {out} END"
            conditions = []
            if self.low is not None:
                conditions.append(f"{expr} >= {self.low}")
            if self.high is not None:
                conditions.append(f"{expr} <= {self.high}")
            if conditions:
                out = f"CASE WHEN {' AND '.join(conditions)} THEN {out} END"
            return out
        return expr

    @property
    def applicable(self) -> bool:
        """Whether `apply` reproduces `sql` for this type (else the service runs the SQL)."""
        if self.role == "categorical":
            return self.base == "VARCHAR" or self.base in _INTEGERS
        if self.role == "text":
            return self.base == "VARCHAR"
        if self.role == "numeric":
            return self.base in _FLOATS or self.base in _INTEGERS
        return self.role in ("id", "boolean", "temporal", "other")

    def apply(self, values: list[Any]) -> np.ndarray:
        """The rule over Python values: numeric -> float64 (NaN = NULL), others -> object."""
        if self.role == "categorical":
            out = np.empty(len(values), dtype=object)
            for index, value in enumerate(values):
                text = None if value is None else (value if isinstance(value, str) else str(value))
                out[index] = text.strip(_SPACES) or MISSING_LEVEL if text is not None else (
                    MISSING_LEVEL)
            return out
        if self.role == "text":
            out = np.empty(len(values), dtype=object)
            out[:] = ["" if v is None else v for v in values]
            return out
        if self.role == "numeric":
            array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            keep = np.isfinite(array)  # NaN stands for NULL here, so integers need no special case
            with np.errstate(invalid="ignore"):
                if self.low is not None:
                    keep &= array >= self.low
                if self.high is not None:
                    keep &= array <= self.high
            return np.where(keep, array, np.nan)
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out


@dataclass(frozen=True)
class ReferenceLookup:
    """Serving: how one reference is joined, for the service's in-memory index of its rows.

    The rows are the prepared table `table` (the pipeline's own reference query); `outputs`
    maps each cleaned column to the SQL (over alias `r`) giving its cleaned value, and `missing`
    to the SQL of its value when no row matches (or the match is older than `max_age`)."""

    name: str
    table: str
    keys: list[tuple[str, str, bool]]  # (primary column, reference column, compared as VARCHAR)
    timed: bool
    max_age: timedelta | None
    outputs: dict[str, str]
    missing: dict[str, str]


@dataclass
class CleaningPlan:
    sql: str
    roles: dict[str, str]  # cleaned column -> id|time|target|numeric|categorical|text|json|boolean|temporal|aggregate_input
    lineage: dict[str, list[tuple[str, str]]]  # cleaned column -> [(raw asset, raw column)]
    bad_value_sql: str | None = None  # one-row query: rows nulled per column
    prepare_sql: list[str] = field(default_factory=list)  # serving: run once at start
    stats_sql: str = ""
    # Pipeline: `sql` when `stats_sql` finds no duplicate ids (no dedup window), and the narrow
    # point-in-time lookups to build first (temp tables `staged_tables`, dropped after).
    sql_unique: str = ""
    stage_sql: list[str] = field(default_factory=list)
    staged_tables: list[str] = field(default_factory=list)
    # Serving: the primary columns' rules, in the order of the statement, and the references.
    primary_rules: list[ColumnRule] = field(default_factory=list)
    references: list[ReferenceLookup] = field(default_factory=list)


@dataclass
class CleaningReport:
    rows_in: int
    rows_out: int
    rows_without_time: int
    duplicates_removed: int
    rows_without_target: int
    values_nulled: dict[str, int] = field(default_factory=dict)


def _base(dtype: str) -> str:
    return dtype.split("(")[0].upper()


def flatten_columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[FlatColumn]:
    """Columns of a raw table with STRUCT columns expanded recursively to `<col>_<field>`."""
    relation = conn.sql(f"SELECT * FROM {quote(table)}")
    out: list[FlatColumn] = []

    def walk(name: str, expr: str, dtype: duckdb.sqltype.DuckDBPyType, origin: str) -> None:
        if dtype.id == "struct":
            for child_name, child_type in dtype.children:
                walk(f"{name}_{child_name}", f"{expr}.{quote(child_name)}", child_type, origin)
        else:
            out.append(FlatColumn(name, expr, str(dtype), origin))

    for name, dtype in zip(relation.columns, relation.types, strict=True):
        walk(name, quote(name), dtype, name)
    return out


def _data_columns(flat: list[FlatColumn]) -> dict[str, FlatColumn]:
    return {c.name: c for c in flat if c.name not in LINEAGE_COLUMNS}


def _missing(where: str, key: str, names: list[str], available: dict[str, FlatColumn]) -> None:
    missing = [n for n in names if n not in available]
    if missing:
        raise SpecError(
            f"{where}: {key}: column(s) {missing} not found; available: {sorted(available)}")


def _check_expression(conn: duckdb.DuckDBPyConnection, where: str, key: str, expr: str,
                      relation: str) -> None:
    try:
        conn.execute(f"SELECT ({expr}) FROM {relation} LIMIT 0").fetchall()
    except duckdb.Error as error:
        message = str(error).splitlines()[0]
        raise SpecError(f"{where}: {key}: invalid expression {expr!r}: {message}") from None


REQUEST_ROW = "__request_row"
RAW_ROW = "__raw_row"


def build_cleaning(
    conn: duckdb.DuckDBPyConnection,
    spec: DatasetSpec,
    serving: bool = False,
    request_relation: str = "__request",
) -> CleaningPlan:
    """Check the spec against the raw tables and build the cleaning statement.

    With `serving=True` the statement reads the primary rows from `request_relation` (same
    columns as the raw table plus `__request_row`), keeps every row in request order (no
    dedup, no time filter) and carries `__request_row` through: the service cleans requests
    with exactly the rules the pipeline used.
    """
    where = f"dataset spec {spec.spec_path or spec.name}"
    primary_table = spec.raw_asset_names()[0]
    primary = _data_columns(flatten_columns(conn, primary_table))

    # Reference outputs first: a categorical column may be a joined one.
    ref_flat: dict[str, dict[str, FlatColumn]] = {}
    ref_outputs: dict[str, tuple[str, str]] = {}  # output name -> (ref name, ref column)
    for ref in spec.references:
        table = f"raw_{ref.name}"
        columns = _data_columns(flatten_columns(conn, table))
        ref_flat[ref.name] = columns
        prefix = f"references.{ref.name}"
        _missing(f"{where} ({table})", f"{prefix}.keys", list(ref.keys.values()), columns)
        _missing(f"{where} ({primary_table})", f"{prefix}.keys", list(ref.keys), primary)
        if ref.time_column:
            _missing(f"{where} ({table})", f"{prefix}.time_column", [ref.time_column], columns)
        if ref.columns is not None:
            _missing(f"{where} ({table})", f"{prefix}.columns", ref.columns, columns)
        flat_view = _flat_view_sql(table, list(columns.values()))
        if ref.time_expression:
            _check_expression(conn, where, f"{prefix}.time_expression", ref.time_expression,
                              flat_view)
        chosen = ref.columns if ref.columns is not None else [
            c for c in columns if c not in ref.keys.values() and c != ref.time_column]
        for column in chosen:
            output = f"{ref.column_prefix}{column}"
            if output in primary or output in ref_outputs:
                raise SpecError(f"{where}: {prefix}: joined column {output!r} clashes with an "
                                f"existing column; set a different prefix")
            ref_outputs[output] = (ref.name, column)

    available = {**primary, **{n: FlatColumn(n, "", "", n) for n in ref_outputs}}
    checks = {
        "id_columns": spec.id_columns,
        "drop_columns": spec.drop_columns,
        "categorical_columns": spec.categorical_columns,
        "text_columns": [t.name for t in spec.text_columns],
        "json_columns": spec.json_columns,
        "valid_ranges": list(spec.valid_ranges),
    }
    for key, names in checks.items():
        _missing(f"{where} ({primary_table})", key, names, available)
    for agg in spec.aggregates:
        _missing(f"{where} ({primary_table})", f"aggregates.{agg.name}.keys", agg.keys, available)
    if spec.target:
        _missing(f"{where} ({primary_table})", "target", [spec.target], primary)
    if spec.time_column:
        _missing(f"{where} ({primary_table})", "time_column", [spec.time_column], primary)

    flat_primary = _flat_view_sql(primary_table, list(primary.values()))
    flat_source = (_flat_view_sql(request_relation, list(primary.values()), [REQUEST_ROW])
                   if serving else _flat_view_sql(primary_table, list(primary.values()),
                                                  rowid_as=RAW_ROW))
    if spec.time_expression:
        _check_expression(conn, where, "time_expression", spec.time_expression, flat_primary)
    if spec.target_expression:
        _check_expression(conn, where, "target_expression", spec.target_expression, flat_primary)
    time_sql = f"CAST(({spec.time_sql}) AS TIMESTAMP)" if spec.has_time else "NULL::TIMESTAMP"
    target_type = {"binary": "INTEGER", "multiclass": "VARCHAR", "regression": "DOUBLE"}[spec.task]
    target_sql = f"CAST(({spec.target_sql}) AS {target_type})"
    with_time = f"(SELECT *, {time_sql} AS {TIME}, {target_sql} AS {TARGET} FROM {flat_source})"
    checkable = f"(SELECT *, {time_sql} AS {TIME}, {target_sql} AS {TARGET} FROM {flat_primary})"
    for agg in spec.aggregates:
        key = f"aggregates.{agg.name}"
        _check_expression(conn, where, f"{key}.value", agg.value, checkable)
        if agg.known_at:
            _check_expression(conn, where, f"{key}.known_at", agg.known_at, checkable)

    # -- roles of the cleaned columns -------------------------------------------------------
    dropped = set(spec.drop_columns)
    text = {t.name for t in spec.text_columns}
    json_cols = set(spec.json_columns)
    ids = list(spec.id_columns)
    declared_cat = set(spec.categorical_columns)

    def role_of(name: str, dtype: str) -> str:
        base = _base(dtype)
        if name in ids:
            return "id"
        if name in text:
            return "text"
        if name in json_cols:
            return "json"
        if name in declared_cat or base == "VARCHAR":
            return "categorical"
        if base in _NUMERIC:
            return "numeric"
        if base == "BOOLEAN":
            return "boolean"
        if base in {"TIMESTAMP", "DATE", "TIMESTAMP WITH TIME ZONE", "TIME"}:
            return "temporal"
        return "other"

    def rule(name: str, dtype: str, role: str) -> ColumnRule:
        low, high = spec.valid_ranges.get(name, (None, None))
        return ColumnRule(name, dtype, role, low, high)

    def cleaned_expr(expr: str, name: str, dtype: str, role: str) -> str:
        return rule(name, dtype, role).sql(expr)

    roles: dict[str, str] = {}
    lineage: dict[str, list[tuple[str, str]]] = {}
    select: list[str] = []
    bad_value_checks: list[str] = []
    for name in ids:
        select.append(f"p.{quote(name)}")
        roles[name] = "id"
        lineage[name] = [(primary_table, primary[name].origin)]
    if spec.has_time:
        select.append(f"p.{TIME}")
        roles[TIME] = "time"
        lineage[TIME] = [(primary_table, c.origin) for c in _referenced(spec.time_sql, primary)]
    select.append(f"p.{TARGET}")
    roles[TARGET] = "target"
    lineage[TARGET] = [(primary_table, c.origin) for c in _referenced(spec.target_sql, primary)]

    primary_rules = [rule(name, primary[name].dtype, "id") for name in ids]
    for column in primary.values():
        # The target travels as __target only: a copy under its own name would be a feature.
        if column.name in ids or column.name in dropped or column.name == spec.target:
            continue
        role = role_of(column.name, column.dtype)
        roles[column.name] = role
        primary_rules.append(rule(column.name, column.dtype, role))
        select.append(f"{cleaned_expr('p.' + quote(column.name), column.name, column.dtype, role)}"
                      f" AS {quote(column.name)}")
        lineage[column.name] = [(primary_table, column.origin)]
        if role == "numeric" and (column.name in spec.valid_ranges or _base(column.dtype) in _FLOATS):
            raw = quote(column.name)
            kept = cleaned_expr(raw, column.name, column.dtype, role)
            bad_value_checks.append(
                f"count(*) FILTER (WHERE {raw} IS NOT NULL AND ({kept}) IS NULL) AS {quote(column.name)}")

    joins: list[str] = []
    ctes: list[str] = []
    prepare: list[str] = []
    stage: list[str] = []
    staged: list[str] = []
    lookups: list[ReferenceLookup] = []
    for index, ref in enumerate(spec.references):
        alias = f"r{index}"
        table = f"raw_{ref.name}"
        columns = ref_flat[ref.name]
        keys = list(ref.keys.items())
        chosen = [(out, col) for out, (name, col) in ref_outputs.items() if name == ref.name]
        key_select = [f"{columns[r].expr} AS {quote(r)}" for _, r in keys]
        value_select = [f"{columns[c].expr} AS {quote(c)}" for _, c in chosen
                        if c not in ref.keys.values()]
        value_select += [f"{columns[c].expr} AS {quote('__v_' + c)}" for _, c in chosen
                         if c in ref.keys.values()]
        partition = ", ".join(columns[r].expr for _, r in keys)
        order = f"ORDER BY {INGESTED_AT} DESC, {SOURCE_FILE} DESC"
        on = " AND ".join(
            f"CAST(p.{quote(p_col)} AS VARCHAR) = CAST({alias}.{quote(r_col)} AS VARCHAR)"
            if _base(primary[p_col].dtype) != _base(columns[r_col].dtype)
            else f"p.{quote(p_col)} = {alias}.{quote(r_col)}"
            for p_col, r_col in keys
        )
        ref_time = ref.time_sql
        if ref_time:
            if ref.time_column:
                ref_time = columns[ref.time_column].expr
            time_expr = f"CAST(({ref_time}) AS TIMESTAMP)"
            body = (f"SELECT {', '.join(key_select + value_select)}, {time_expr} AS __ref_time "
                    f"FROM {quote(table)} WHERE {time_expr} IS NOT NULL "
                    f"QUALIFY row_number() OVER (PARTITION BY {partition}, {time_expr} {order}) = 1")
            if serving:
                # Prepared once when the service starts; a request reads only the observations
                # its batch can use.
                prepare.append(f"CREATE OR REPLACE TABLE __ref_{alias} AS {body} "
                               f"ORDER BY __ref_time")
                window = f"__ref_time <= (SELECT max({TIME}) FROM p)"
                if ref.max_age is not None:
                    window += (f" AND __ref_time >= (SELECT min({TIME}) FROM p) - "
                               f"{duration_sql(ref.max_age)}")
                ctes.append(f"{alias} AS (SELECT * FROM __ref_{alias} WHERE {window})")
            if not spec.has_time:
                raise SpecError(f"{where}: references.{ref.name}: a reference with a time needs "
                                "the dataset's time_column or time_expression")
            if serving:
                joins.append(f"ASOF LEFT JOIN {alias} ON {on} AND p.{TIME} >= {alias}.__ref_time")
            else:
                # The as-of match runs on narrow rows (raw row id, keys, time) into a temp table;
                # the wide statement then joins it by row id: an ASOF join carrying every
                # column sorts them all.
                rows, matches = f"__stage_{alias}_rows", f"__stage_{alias}_match"
                staged += [matches, rows]
                stage.append(f"CREATE OR REPLACE TEMP TABLE {rows} AS SELECT "
                             f"row_number() OVER () AS __ref_row, * FROM ({body})")
                narrow_keys = ", ".join(quote(p_col) for p_col, _ in keys)
                stage.append(
                    f"CREATE OR REPLACE TEMP TABLE {matches} AS SELECT p.{RAW_ROW}, "
                    f"{alias}.__ref_row FROM (SELECT {RAW_ROW}, {narrow_keys}, {TIME} FROM "
                    f"(SELECT *, {time_sql} AS {TIME} FROM {flat_source}) WHERE {TIME} IS NOT NULL"
                    f") p ASOF JOIN {rows} {alias} ON {on} AND p.{TIME} >= {alias}.__ref_time")
                joins.append(f"LEFT JOIN {matches} m{index} ON m{index}.{RAW_ROW} = p.{RAW_ROW} "
                             f"LEFT JOIN {rows} {alias} ON {alias}.__ref_row = m{index}.__ref_row")
        else:
            body = (f"SELECT {', '.join(key_select + value_select)} FROM {quote(table)} "
                    f"QUALIFY row_number() OVER (PARTITION BY {partition} {order}) = 1")
            if serving:
                prepare.append(f"CREATE OR REPLACE TABLE __ref_{alias} AS {body}")
                ctes.append(f"{alias} AS (SELECT * FROM __ref_{alias})")
            else:
                ctes.append(f"{alias} AS ({body})")
            joins.append(f"LEFT JOIN {alias} ON {on}")
        outputs: dict[str, str] = {}
        missing: dict[str, str] = {}
        for output, column in chosen:
            source_name = f"__v_{column}" if column in ref.keys.values() else column
            value = f"{alias}.{quote(source_name)}"
            if ref_time and ref.max_age is not None:
                value = (f"CASE WHEN p.{TIME} - {alias}.__ref_time <= {duration_sql(ref.max_age)} "
                         f"THEN {value} END")
            dtype = columns[column].dtype
            role = "categorical" if output in declared_cat else role_of(output, dtype)
            if role == "id":
                role = "categorical"
            roles[output] = role
            select.append(f"{cleaned_expr(value, output, dtype, role)} AS {quote(output)}")
            lineage[output] = [(table, columns[column].origin)]
            outputs[output] = cleaned_expr(f"r.{quote(source_name)}", output, dtype, role)
            missing[output] = cleaned_expr(f"CAST(NULL AS {dtype})", output, dtype, role)
        lookups.append(ReferenceLookup(
            name=ref.name, table=f"__ref_{alias}",
            keys=[(p_col, r_col, _base(primary[p_col].dtype) != _base(columns[r_col].dtype))
                  for p_col, r_col in keys],
            timed=bool(ref_time), max_age=ref.max_age if ref_time else None,
            outputs=outputs, missing=missing))

    agg_select: list[str] = []
    for agg in spec.aggregates:
        value_name = AGG_VALUE.format(agg.name)
        known_name = AGG_KNOWN_AT.format(agg.name)
        agg_select.append(f"CAST(({agg.value}) AS DOUBLE) AS {value_name}")
        agg_select.append(f"CAST(({agg.known_at or TIME}) AS TIMESTAMP) AS {known_name}")
        select.append(f"p.{value_name}")
        select.append(f"p.{known_name}")
        roles[value_name] = roles[known_name] = "aggregate_input"
        origin = [(primary_table, c.origin) for c in _referenced(agg.value, primary)]
        lineage[value_name] = origin
        lineage[known_name] = origin + [
            (primary_table, c.origin) for c in _referenced(agg.known_at or "", primary)]

    data_columns = [c.name for c in primary.values()]
    partition = ", ".join(quote(c) for c in (ids or data_columns))
    with_aggs = f"SELECT *{''.join(', ' + s for s in agg_select)} FROM {with_time}"
    time_filter = f"WHERE {TIME} IS NOT NULL" if spec.has_time else ""
    dedup = (
        f"p AS ({with_aggs} {time_filter} "
        f"QUALIFY row_number() OVER (PARTITION BY {partition} "
        f"ORDER BY {INGESTED_AT} DESC, {SOURCE_FILE} DESC) = 1)"
    )
    unique = f"p AS ({with_aggs} {time_filter})"
    # No ORDER BY in the pipeline: sorting every wide row by time was a third of the step and
    # nothing downstream depends on storage order (training orders its own rows).
    order_by = ""
    if serving:
        dedup = unique = f"p AS ({with_aggs})"
        select.append(f"p.{REQUEST_ROW}")
        order_by = f" ORDER BY p.{REQUEST_ROW}"
    body = f" SELECT {', '.join(select)} FROM p {' '.join(joins)}{order_by}"
    sql = f"WITH {', '.join([dedup, *ctes])}{body}"
    sql_unique = f"WITH {', '.join([unique, *ctes])}{body}"
    stats = (
        f"SELECT count(*) AS rows_in, "
        f"count(*) FILTER (WHERE {TIME} IS NULL) AS rows_without_time, "
        f"count(DISTINCT ({partition})) FILTER (WHERE {TIME} IS NOT NULL) AS distinct_ids "
        f"FROM {with_time}"
    )
    bad_sql = (f"SELECT {', '.join(bad_value_checks)} FROM {flat_primary}"
               if bad_value_checks else None)
    return CleaningPlan(sql=sql, roles=roles, lineage=lineage, bad_value_sql=bad_sql,
                        stats_sql=stats, prepare_sql=prepare, primary_rules=primary_rules,
                        references=lookups, sql_unique=sql_unique, stage_sql=stage,
                        staged_tables=staged)


def _flat_view_sql(table: str, columns: list[FlatColumn], extra: list[str] | None = None,
                   rowid_as: str | None = None) -> str:
    parts = [f"{c.expr} AS {quote(c.name)}" for c in columns]
    parts += [quote(c) for c in [*LINEAGE_COLUMNS, *(extra or [])]]
    if rowid_as:
        parts.append(f"rowid AS {rowid_as}")
    return f"(SELECT {', '.join(parts)} FROM {quote(table)})"


def _referenced(expr: str | None, columns: dict[str, FlatColumn]) -> list[FlatColumn]:
    """Columns an expression mentions (by name, for lineage only)."""
    if not expr:
        return []
    import re

    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr))
    return [c for name, c in columns.items() if name in words]


ROLES_TABLE = "_column_roles"


def save_roles(conn: duckdb.DuckDBPyConnection, table: str, roles: dict[str, str]) -> None:
    conn.execute(f"CREATE TABLE IF NOT EXISTS {ROLES_TABLE} "
                 "(table_name VARCHAR, column_name VARCHAR, role VARCHAR)")
    conn.execute(f"DELETE FROM {ROLES_TABLE} WHERE table_name = ?", [table])
    conn.executemany(f"INSERT INTO {ROLES_TABLE} VALUES (?, ?, ?)",
                     [(table, column, role) for column, role in roles.items()])


def load_roles(conn: duckdb.DuckDBPyConnection, table: str = "cleaned") -> dict[str, str]:
    """Roles of a cleaned table's columns, as saved when it was built (in column order)."""
    rows = conn.execute(
        f"SELECT column_name, role FROM {ROLES_TABLE} WHERE table_name = ?", [table]).fetchall()
    return dict(rows)


def clean(conn: duckdb.DuckDBPyConnection, spec: DatasetSpec, table: str = "cleaned"
          ) -> tuple[CleaningPlan, CleaningReport]:
    """Build `table` from the raw tables; returns the plan (roles, lineage) and what happened."""
    plan = build_cleaning(conn, spec)
    rows_in, no_time, distinct = conn.execute(plan.stats_sql).fetchall()[0]
    nulled: dict[str, int] = {}
    if plan.bad_value_sql:
        row = conn.sql(plan.bad_value_sql)
        values = row.fetchall()[0]
        nulled = {c: int(v) for c, v in zip(row.columns, values, strict=True) if v}
    # Ids are unique in most loads: then the statement has no dedup window at all.
    sql = plan.sql_unique if int(rows_in) - int(no_time) == int(distinct) else plan.sql
    try:
        for statement in plan.stage_sql:
            conn.execute(statement)
        conn.execute(f"CREATE OR REPLACE TABLE {quote(table)} AS {sql}")
    except duckdb.ConversionException as error:
        raise SpecError(f"dataset spec {spec.spec_path}: cleaning failed: "
                        f"{str(error).splitlines()[0]}") from None
    finally:
        for staged in plan.staged_tables:
            conn.execute(f"DROP TABLE IF EXISTS {staged}")
    save_roles(conn, table, plan.roles)
    rows_out, unlabelled = conn.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {TARGET} IS NULL) FROM {quote(table)}"
    ).fetchall()[0]
    if spec.task == "binary":
        bad = conn.execute(
            f"SELECT DISTINCT {TARGET} FROM {quote(table)} WHERE {TARGET} NOT IN (0, 1) LIMIT 5"
        ).fetchall()
        if bad:
            raise SpecError(f"dataset spec {spec.spec_path}: target: a binary target must be 0/1 "
                            f"or boolean, found {[b[0] for b in bad]}")
    report = CleaningReport(
        rows_in=int(rows_in),
        rows_out=int(rows_out),
        rows_without_time=int(no_time),
        duplicates_removed=int(rows_in) - int(no_time) - int(distinct),
        rows_without_target=int(unlabelled),
        values_nulled=nulled,
    )
    return plan, report
