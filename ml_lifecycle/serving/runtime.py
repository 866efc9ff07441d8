"""The serving runtime: request rows -> the pipeline's own cleaning and feature code -> prediction.

No Dagster and no BentoML here (the BentoML service is a thin shell around it), so tests and
benchmarks drive it directly. One request batch goes through:
1. cleaning as `data/cleaning.py` defines it in serving mode: the plan's column rules and
   reference lookups, compiled at start-up (`serving/transform.py`: the pipeline's reference
   queries and cleaning SQL run once over the snapshot's tables, then no query per request);
2. history aggregates from the online store (same definition as offline);
3. `FeatureEncoder` of the model version being served (the encoder training builds its matrix
   with);
4. LightGBM; every prediction appended to the worker's inference log.
A plan the compiled path cannot reproduce (nested primary columns, text or JSON features), or
ML_LIFECYCLE_SERVING_SQL=1, runs the pipeline's SQL statements per request instead (slow: a DuckDB
query plan per request, tens of ms).
The champion is re-read from the registry when its alias changes and swapped in one assignment:
requests in flight finish on the model they started with, none fail.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import lightgbm as lgb
import numpy as np
import pyarrow as pa

from ml_lifecycle.data.cleaning import (
    AGG_KNOWN_AT,
    AGG_VALUE,
    REQUEST_ROW,
    build_cleaning,
    flatten_columns,
)
from ml_lifecycle.data.features import (
    FeatureEncoder,
    FeatureState,
    feature_select_sql,
)
from ml_lifecycle.data.sources import quote, sql_literal
from ml_lifecycle.serving.event_journal import EventJournal
from ml_lifecycle.serving.inference_log import InferenceLog, LogColumns, prediction_columns
from ml_lifecycle.serving.online_store import MemoryOnlineStore, OnlineStore, columns_of
from ml_lifecycle.serving.snapshot import current_snapshot
from ml_lifecycle.serving.transform import RequestTransform
from ml_lifecycle.spec import TIME, DatasetSpec
from ml_lifecycle.training.dataset import matrix_select_sql
from ml_lifecycle.training.registry import ModelRegistry

_PY_TYPES = {
    "BIGINT": int,
    "INTEGER": int,
    "SMALLINT": int,
    "TINYINT": int,
    "HUGEINT": int,
    "UBIGINT": int,
    "UINTEGER": int,
    "USMALLINT": int,
    "UTINYINT": int,
    "DOUBLE": float,
    "FLOAT": float,
    "REAL": float,
    "DECIMAL": float,
    "VARCHAR": str,
    "BOOLEAN": bool,
    "TIMESTAMP": datetime,
    "TIMESTAMP_NS": datetime,
    "TIMESTAMP WITH TIME ZONE": datetime,
    "DATE": date,
}


_VALUE_ERRORS = (
    duckdb.ConversionException,
    duckdb.OutOfRangeException,
    duckdb.InvalidInputException,
)


class RequestError(ValueError):
    """A request a client must fix (answered 400); the message names the field."""


@dataclass(frozen=True)
class RequestField:
    name: str
    dtype: str
    python_type: type
    required: bool
    # A required key (reference/aggregate) may still be null, as in the data: offline such a row
    # is scored with "(missing)" and no joined or history values; only ids and time may not.
    nullable: bool = False
    description: str = ""


@dataclass
class LoadedModel:
    version: str
    booster: lgb.Booster
    state: FeatureState
    metadata: dict[str, Any]
    matrix_sql: str = ""
    encoder: FeatureEncoder | None = None
    positions: dict[str, int] = field(default_factory=dict)  # feature -> matrix column
    # Text categoricals logged as dictionary arrays: the model's levels, built once.
    log_levels: dict[str, pa.Array] = field(default_factory=dict)

    @property
    def classes(self) -> list[str] | None:
        return self.metadata.get("classes")

    @property
    def compiled(self) -> bool:
        """Whether the encoder covers every feature (text and JSON features need the SQL)."""
        return all(f.kind not in ("text_hash", "json") for f in self.state.features)


@dataclass
class ScoreResult:
    predictions: list[dict[str, Any]]
    features: list[dict[str, Any]] = field(default_factory=list)


def _referenced(expr: str | None, names: list[str]) -> set[str]:
    import re

    if not expr:
        return set()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr))
    return {n for n in names if n in words}


class ServingRuntime:
    def __init__(
        self,
        spec: DatasetSpec,
        store: OnlineStore | None = None,
        log_dir: Path | None = None,
        shadow: bool = False,
        watch_interval: float | None = 1.0,
        snapshot: Path | None = None,
        max_batch: int = 10_000,
        unknown_categories: str | None = None,
        log_flush_interval: float = 0.0,
        shared_events: bool = False,
    ) -> None:
        """`shared_events`: several workers serve together; events posted to one reach the
        others' embedded online stores through an `EventJournal` (see event_journal.py)."""
        self.spec = spec
        # "reject" (400 naming the field) or "score" (as missing, logged: drift sees it).
        self.unknown_categories = unknown_categories or spec.unknown_categories
        self.paths = spec.paths()
        self.registry = ModelRegistry(self.paths.registry)
        self.max_batch = max_batch
        self.shadow_enabled = shadow
        self.snapshot = Path(snapshot) if snapshot else current_snapshot(spec)
        self.db = duckdb.connect()
        self._local = threading.local()
        primary = spec.raw_asset_names()[0]
        for parquet in sorted(self.snapshot.glob("raw_*.parquet")):
            self.db.execute(
                f"CREATE TABLE {quote(parquet.stem)} AS SELECT * FROM "
                f"read_parquet({sql_literal(str(parquet))})"
            )
        self.raw_schema = self.db.sql(f"SELECT * FROM {quote(primary)}").to_arrow_table().schema
        self.request_schema = self.raw_schema.append(pa.field(REQUEST_ROW, pa.int64()))
        self.plan = build_cleaning(self.db, spec, serving=True, request_relation="__request")
        for statement in self.plan.prepare_sql:
            self.db.execute(statement)
        # Parse the cleaning statement once: requests query a view over their own `__request`.
        self.db.register("__request", pa.Table.from_pylist([], schema=self.request_schema))
        self.db.execute(f"CREATE VIEW __clean AS {self.plan.sql}")
        self.db.unregister("__request")
        self.transform: RequestTransform | None = None
        if os.environ.get("ML_LIFECYCLE_SERVING_SQL", "0").lower() in ("0", "false", "no", ""):
            transform = RequestTransform(
                self.db, spec, self.plan, self.raw_schema, flatten_columns(self.db, primary)
            )
            self.transform = None if transform.unsupported else transform
        self._models_prepared = 0
        self._predicting = 0  # predictions in flight (threads per prediction: see _predict)
        self._predicting_lock = threading.Lock()
        self._predictions_done = threading.Condition(self._predicting_lock)
        self._threaded = 0  # predictions in flight on more than one thread
        self._reload_lock = threading.Lock()
        self.fields = self._request_fields(primary)
        self._cleaned_types = {f.name: f.type for f in self._empty_cleaned().schema}
        self._text_columns = {
            name for name, kind in self._cleaned_types.items() if pa.types.is_string(kind)
        }
        self.event_fields = self._event_fields(primary)
        self.store = store if store is not None else MemoryOnlineStore()
        self.seeded_events = self._seed_store() if store is None else 0
        self.journal = (
            EventJournal(self.snapshot.parent / "journal" / self.snapshot.name)
            if shared_events and store is None
            else None
        )
        self._catch_up()
        self.log = InferenceLog(log_dir or self.paths.inference, flush_interval=log_flush_interval)
        self.log.before_work = self._log_takes_a_core
        # ML_LIFECYCLE_INFERENCE_LOG=0 turns the prediction log off (benchmarks measure its cost).
        self.log_predictions = os.environ.get("ML_LIFECYCLE_INFERENCE_LOG", "1").lower() not in (
            "0",
            "false",
            "no",
            "off",
        )
        self.model = self._load(self._champion_version())
        self.shadow = self._load_shadow()
        self._aliases_mtime = self._alias_mtime()
        # Requests run tiny queries (a time expression, events): DuckDB's second worker thread
        # only spins next to the request's own thread (a single-row miss cost 3x more with 2).
        self.db.execute("SET threads = 1")
        self._stop = threading.Event()
        self.swaps = 0
        if watch_interval:
            self._watcher = threading.Thread(
                target=self._watch, args=(watch_interval,), daemon=True, name="champion-watcher"
            )
            self._watcher.start()

    # -- schema ---------------------------------------------------------------------------
    def _request_fields(self, primary: str) -> list[RequestField]:
        """Raw primary columns a client sends: those the cleaned table keeps, minus target."""
        spec = self.spec
        flat = flatten_columns(self.db, primary)
        raw_names = [f.name for f in self.raw_schema]
        used_roots = {c.origin for c in flat if c.name in self.plan.roles}
        used_roots |= _referenced(spec.time_sql, raw_names)
        not_null = set(spec.id_columns) | _referenced(spec.time_sql, raw_names)
        required = set(not_null)
        for ref in spec.references:
            required |= set(ref.keys)
        for aggregate in spec.aggregates:
            required |= set(aggregate.keys)
        target_roots = {spec.target} if spec.target else set()
        return self._fields(
            primary,
            [
                n
                for n in raw_names
                if (n in used_roots - target_roots and n not in spec.drop_columns)
                or n in _referenced(spec.time_sql, raw_names)
            ],
            required,
            not_null,
        )

    def _event_fields(self, primary: str) -> list[RequestField]:
        """Events (the feed that keeps aggregates current) may carry every raw column."""
        raw_names = [f.name for f in self.raw_schema if not f.name.startswith("__")]
        required = {f.name for f in self.fields if f.required}
        not_null = {f.name for f in self.fields if f.required and not f.nullable}
        return self._fields(primary, raw_names, required, not_null)

    def _fields(
        self, primary: str, names: list[str], required: set[str], not_null: set[str]
    ) -> list[RequestField]:
        described = dict(
            self.db.execute(
                "SELECT column_name, data_type FROM "
                "information_schema.columns WHERE table_name = ?",
                [primary],
            ).fetchall()
        )
        out = []
        for name in names:
            dtype = described[name]
            python_type = _PY_TYPES.get(
                dtype.split("(")[0].upper(), dict if dtype.startswith("STRUCT") else str
            )
            out.append(
                RequestField(
                    name, dtype, python_type, name in required, nullable=name not in not_null
                )
            )
        return out

    # -- models ---------------------------------------------------------------------------
    def _champion_version(self) -> str:
        version = self.registry.alias("champion")
        if version is None:
            raise RuntimeError(
                f"no champion in {self.registry.root}: train and promote a model "
                "first (training_pipeline)"
            )
        return version

    def _load(self, version: str) -> LoadedModel:
        loaded = self.registry.load(version)
        model = LoadedModel(
            version=version,
            booster=loaded.booster(),
            state=loaded.state,
            metadata=loaded.metadata,
            encoder=FeatureEncoder(loaded.state),
        )
        model.positions = {name: index for index, name in enumerate(model.state.feature_names)}
        model.log_levels = {
            name: pa.array(levels, type=pa.string())
            for name, levels in model.state.categories.items()
            if name in self._text_columns
        }
        if self.transform is None or not model.compiled:
            model.matrix_sql = self._prepare_matrix(model)
        return model

    def _load_shadow(self) -> LoadedModel | None:
        if not self.shadow_enabled:
            return None
        challenger = self.registry.alias("challenger")
        if challenger and challenger != self.model.version:
            return self._load(challenger)
        return None

    def _alias_mtime(self) -> float:
        file = self.registry.root / "aliases.json"
        return file.stat().st_mtime_ns if file.exists() else 0

    def reload_if_changed(self) -> bool:
        """Swap to the registry's champion (and shadow challenger) if an alias moved."""
        # The watcher thread and `/model` both call this: one reload at a time (two concurrent
        # `_load`s would create the same ENUM types and views).
        with self._reload_lock:
            mtime = self._alias_mtime()
            if mtime == self._aliases_mtime:
                return False
            version = self._champion_version()
            changed = False
            if version != self.model.version:
                self.model = self._load(version)  # one assignment: the swap
                self.swaps += 1
                changed = True
            if self.shadow_enabled:
                self.shadow = self._load_shadow()
            self._aliases_mtime = mtime  # only once loaded: a failed load is retried next tick
            return changed

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.reload_if_changed()
            except Exception:  # a half-written registry: try again next tick
                continue

    def close(self) -> None:
        self._stop.set()
        self.log.flush()

    # -- SQL ------------------------------------------------------------------------------
    def _prepare_matrix(self, model: LoadedModel) -> str:
        """Create the model's ENUM types and matrix view once; returns the per-request query."""
        state = model.state
        self._models_prepared += 1
        tag = f"m{self._models_prepared}"
        enum_types = {}
        for index, (name, levels) in enumerate(state.categories.items()):
            type_name = f"__enum_{tag}_{index}"
            values = ", ".join(sql_literal(v) for v in levels) or "'(none)'"
            self.db.execute(f"CREATE TYPE {type_name} AS ENUM ({values})")
            enum_types[name] = type_name
        aggregates = {name: f"c.{quote(name)}" for name in state.aggregates}
        features = feature_select_sql(state, "c", aggregates, enum_types)
        matrix = [item.replace(' AS "', ' AS "__m_') for item in matrix_select_sql(state, "f")]
        sample = self._with_aggregates(self._empty_cleaned())
        self.db.register("__cleaned", sample)
        self.db.execute(
            f"CREATE VIEW __matrix_{tag} AS SELECT f.*, {', '.join(matrix)} "
            f"FROM (SELECT c.{REQUEST_ROW}, {', '.join(features)} FROM __cleaned c) f "
            f"ORDER BY f.{REQUEST_ROW}"
        )
        self.db.unregister("__cleaned")
        return f"SELECT * FROM __matrix_{tag}"

    def _empty_cleaned(self) -> pa.Table:
        self.db.register("__request", pa.Table.from_pylist([], schema=self.request_schema))
        try:
            return self.db.sql("SELECT * FROM __clean").to_arrow_table()
        finally:
            self.db.unregister("__request")

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self.db.cursor()
            self._local.cursor = cursor
        return cursor

    def _request_table(self, records: list[dict[str, Any]]) -> pa.Table:
        rows = [{**record, REQUEST_ROW: index} for index, record in enumerate(records)]
        table = pa.Table.from_pylist(rows, schema=self.request_schema)
        return table

    def _run_clean(self, records: list[dict[str, Any]]) -> pa.Table:
        cursor = self._cursor()
        cursor.register("__request", self._request_table(records))
        try:
            return cursor.sql("SELECT * FROM __clean").to_arrow_table()
        finally:
            cursor.unregister("__request")

    def _clean(self, records: list[dict[str, Any]]) -> pa.Table:
        try:
            cleaned = self._run_clean(records)
        except _VALUE_ERRORS as error:
            # A value the spec's expressions cannot take (e.g. a delay of 2**62 minutes in an
            # aggregate's known_at): the client's data, so a 400 naming the record.
            message = str(error).splitlines()[0]
            bad = next(
                (i for i, record in enumerate(records[:1000]) if not self._cleans(record)), None
            )
            where = f"record {bad}" if bad is not None else "the batch"
            raise RequestError(
                f"{where}: the dataset's expressions (time, target, aggregate "
                f"value/known_at) fail on its values: {message}"
            ) from None
        if self.spec.has_time and cleaned.column(TIME).null_count:
            bad = cleaned.column(TIME).to_pylist().index(None)
            raise RequestError(
                f"record {bad}: the time ({self.spec.time_sql}) cannot be computed from its fields"
            )
        return cleaned

    def _cleans(self, record: dict[str, Any]) -> bool:
        try:
            self._run_clean([record])
        except _VALUE_ERRORS:
            return False
        return True

    def _with_aggregates(self, cleaned: pa.Table) -> pa.Table:
        if not self.spec.aggregates:
            return cleaned
        self._catch_up()
        times = cleaned.column(TIME).to_numpy(zero_copy_only=False)
        for aggregate in self.spec.aggregates:
            key_columns = [cleaned.column(k).to_pylist() for k in aggregate.keys]
            keys = list(zip(*key_columns, strict=True))
            stats = self.store.query(aggregate, keys, times)
            for stat in aggregate.statistics:
                values = [row[stat] for row in stats]
                dtype = pa.int64() if stat == "count" else pa.float64()
                cleaned = cleaned.append_column(
                    f"{aggregate.name}_{stat}", pa.array(values, type=dtype)
                )
        return cleaned

    def _check_categories(self, cleaned: pa.Table, model: LoadedModel) -> None:
        if self.unknown_categories != "reject":
            return
        for name, levels in model.state.categories.items():
            if len(levels) >= self.spec.max_categories or name not in cleaned.column_names:
                continue  # capped vocabulary: rare levels are expected
            known = set(levels)
            for index, value in enumerate(cleaned.column(name).to_pylist()):
                if value is not None and str(value) not in known:
                    raise RequestError(
                        f"record {index}: field {name!r}: unknown category {value!r} "
                        f"(the model knows {len(levels)} levels)"
                    )

    def _score_matrix(self, features: pa.Table, model: LoadedModel) -> tuple[np.ndarray, pa.Table]:
        cursor = self._cursor()
        cursor.register("__cleaned", features)
        try:
            scored = cursor.sql(model.matrix_sql).to_arrow_table()
        finally:
            cursor.unregister("__cleaned")
        names = [n for n in scored.column_names if n.startswith("__m_")]
        matrix = (
            np.column_stack(
                [scored.column(n).to_numpy(zero_copy_only=False).astype(np.float32) for n in names]
            )
            if names
            else np.empty((scored.num_rows, 0), np.float32)
        )
        prediction = np.asarray(model.booster.predict(matrix))
        readable = scored.select(
            [n for n in scored.column_names if not n.startswith("__m_") and n != REQUEST_ROW]
        )
        return prediction, readable

    def _present(self, prediction: Any, model: LoadedModel) -> dict[str, Any]:
        task = self.spec.task
        if task == "binary":
            p = float(prediction)
            return {"prediction": p, "label": int(p >= 0.5)}
        if task == "multiclass":
            classes = model.classes or []
            probabilities = {c: float(v) for c, v in zip(classes, prediction, strict=True)}
            return {
                "prediction": classes[int(np.argmax(prediction))],
                "probabilities": probabilities,
            }
        return {"prediction": float(prediction)}

    # -- public API -----------------------------------------------------------------------
    def score(
        self, records: list[dict[str, Any]], request_ids: list[str] | None = None, log: bool = True
    ) -> list[dict[str, Any]]:
        """Predictions for raw records (the request fields), in order; logs each one."""
        self._check_size(len(records))
        model = self.model  # pinned: a swap during this request does not affect it
        shadow = self.shadow
        if self._compiled_for(model, shadow):
            names = [f.name for f in self.fields]
            inputs = {name: [r.get(name) for r in records] for name in names}
            ids, prediction = self._score_compiled(
                inputs, len(records), model, shadow, request_ids, log
            )
            return self._present_all(prediction, model, ids)
        return self._score_sql(records, model, shadow, request_ids, log)

    def score_fields(
        self,
        inputs: dict[str, list[Any]],
        request_ids: list[str] | None = None,
        log: bool = True,
    ) -> list[dict[str, Any]]:
        """`score` for records given as columns of request fields (equal lengths)."""
        rows = _rows_of(inputs)
        self._check_size(rows)
        model = self.model
        shadow = self.shadow
        if self._compiled_for(model, shadow):
            ids, prediction = self._score_compiled(inputs, rows, model, shadow, request_ids, log)
            return self._present_all(prediction, model, ids)
        names = list(inputs)
        records = [
            dict(zip(names, values, strict=True)) for values in zip(*inputs.values(), strict=True)
        ]
        return self._score_sql(records, model, shadow, request_ids, log)

    def score_columns(
        self, inputs: dict[str, list[Any]], request_ids: list[str] | None = None, log: bool = True
    ) -> dict[str, Any]:
        """Predictions for columns of request fields (equal lengths), as columns."""
        rows = _rows_of(inputs)
        self._check_size(rows)
        model = self.model
        shadow = self.shadow
        if self._compiled_for(model, shadow):
            ids, prediction = self._score_compiled(inputs, rows, model, shadow, request_ids, log)
            return self._present_columns(prediction, model, ids)
        names = list(inputs)
        records = [
            dict(zip(names, values, strict=True)) for values in zip(*inputs.values(), strict=True)
        ]
        results = self._score_sql(records, model, shadow, request_ids, log)
        out: dict[str, Any] = {
            "model_version": model.version,
            "request_ids": [r["request_id"] for r in results],
        }
        for key in results[0]:
            if key not in ("request_id", "model_version"):
                out[_plural(key)] = [r[key] for r in results]
        return out

    def score_table(
        self, inputs: dict[str, list[Any]], request_ids: list[str] | None = None, log: bool = True
    ) -> pa.Table:
        """`score_columns` answered as an Arrow table: request_id, model_version, prediction
        (binary: and label; multiclass: a probability column per class)."""
        rows = _rows_of(inputs)
        self._check_size(rows)
        model = self.model
        shadow = self.shadow
        if not self._compiled_for(model, shadow):
            answer = self.score_columns(inputs, request_ids, log)
            table = {
                "request_id": answer["request_ids"],
                "model_version": [answer["model_version"]] * rows,
                "prediction": answer["predictions"],
            }
            if "labels" in answer:
                table["label"] = answer["labels"]
            for level, column in answer.get("probabilities", {}).items():
                table[f"probability_{level}"] = column
            return pa.table(table)
        ids, prediction = self._score_compiled(inputs, rows, model, shadow, request_ids, log)
        out: dict[str, Any] = {
            "request_id": ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string()),
            "model_version": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(rows, dtype=np.int32)), pa.array([model.version])
            ),
        }
        for name, values in self._logged_outcome(prediction, model).items():
            if isinstance(values, dict):
                for level, column in values.items():
                    out[f"probability_{level}"] = pa.array(column)
            else:
                out[name] = pa.array(values)
        return pa.table(out)

    def _check_size(self, rows: int) -> None:
        if not rows:
            raise RequestError("the batch is empty: send at least one record")
        if rows > self.max_batch:
            raise RequestError(f"the batch has {rows} records; at most {self.max_batch}")

    def _compiled_for(self, model: LoadedModel, shadow: LoadedModel | None) -> bool:
        return self.transform is not None and model.compiled and (shadow is None or shadow.compiled)

    def _score_sql(
        self,
        records: list[dict[str, Any]],
        model: LoadedModel,
        shadow: LoadedModel | None,
        request_ids: list[str] | None,
        log: bool,
    ) -> list[dict[str, Any]]:
        """The pipeline's SQL per request (plans the compiled path does not cover)."""
        cleaned = self._with_aggregates(self._clean(records))
        self._check_categories(cleaned, model)
        prediction, readable = self._score_matrix(cleaned, model)
        shadow_prediction = None
        if shadow is not None:
            shadow_prediction, _ = self._score_matrix(cleaned, shadow)
        ids = request_ids or _as_list(_request_ids(len(records)))
        results = []
        for index in range(len(records)):
            results.append(
                {
                    "request_id": ids[index],
                    "model_version": model.version,
                    **self._present(prediction[index], model),
                }
            )
        if log and self.log_predictions:
            self._log(results, readable, cleaned, prediction, shadow, shadow_prediction, records)
        return results

    # -- compiled path ----------------------------------------------------------------------
    def _clean_compiled(self, inputs: dict[str, list[Any]], rows: int) -> dict[str, Any]:
        assert self.transform is not None
        try:
            columns, times = self.transform.clean(inputs, rows)
        except _VALUE_ERRORS:
            # The SQL path names the record the spec's expression fails on.
            names = list(inputs)
            self._clean(
                [
                    dict(zip(names, values, strict=True))
                    for values in zip(*inputs.values(), strict=True)
                ]
            )
            raise
        if self.spec.has_time:
            bad = np.flatnonzero(times == np.iinfo(np.int64).min)
            if bad.size:
                raise RequestError(
                    f"record {int(bad[0])}: the time ({self.spec.time_sql}) "
                    "cannot be computed from its fields"
                )
        self._add_aggregates(columns)
        return columns

    def _add_aggregates(self, columns: dict[str, Any]) -> None:
        """The history aggregates of the cleaned request rows, from the online store."""
        self._catch_up()
        by_columns = getattr(self.store, "query_key_columns", None)
        for aggregate in self.spec.aggregates:
            if by_columns is not None:  # the request's key columns as they are, no tuples
                stats = by_columns(aggregate, [columns[k] for k in aggregate.keys], columns[TIME])
            else:
                keys = list(zip(*[columns[k] for k in aggregate.keys], strict=True))
                query = getattr(self.store, "query_columns", None)
                stats = (
                    query(aggregate, keys, columns[TIME])
                    if query is not None
                    else columns_of(aggregate, self.store.query(aggregate, keys, columns[TIME]))
                )
            for stat in aggregate.statistics:
                columns[f"{aggregate.name}_{stat}"] = stats[stat]

    def _check_compiled(
        self, columns: dict[str, Any], model: LoadedModel, matrix: np.ndarray
    ) -> None:
        """Reject unknown levels of the model's uncapped vocabularies: a level the encoder did
        not find (NaN code) that was sent (not null)."""
        if self.unknown_categories != "reject":
            return
        assert model.encoder is not None
        position = model.positions
        for name, levels in model.state.categories.items():
            if len(levels) >= self.spec.max_categories or name not in columns:
                continue  # capped vocabulary: rare levels are expected
            unknown = np.isnan(matrix[:, position[name]])
            if not unknown.any():
                continue
            values = columns[name]
            for index in np.flatnonzero(unknown).tolist():
                if values[index] is not None:
                    raise RequestError(
                        f"record {index}: field {name!r}: unknown category {values[index]!r} "
                        f"(the model knows {len(levels)} levels)"
                    )

    def _score_compiled(
        self,
        inputs: dict[str, list[Any]],
        rows: int,
        model: LoadedModel,
        shadow: LoadedModel | None,
        request_ids: list[str] | None,
        log: bool,
    ) -> tuple[list[str], np.ndarray]:
        columns = self._clean_compiled(inputs, rows)
        assert model.encoder is not None
        matrix = model.encoder.matrix(columns, rows)
        self._check_compiled(columns, model, matrix)
        prediction = self._predict(model, matrix)
        shadow_prediction = None
        if shadow is not None:
            assert shadow.encoder is not None
            shadow_prediction = self._predict(shadow, shadow.encoder.matrix(columns, rows))
        ids = request_ids or _request_ids(rows)
        if log and self.log_predictions:
            self._log_compiled(ids, prediction, columns, matrix, model, shadow, shadow_prediction)
        return ids, prediction

    def _predict(self, model: LoadedModel, matrix: np.ndarray) -> np.ndarray:
        rows = len(matrix)
        with self._predicting_lock:
            self._predicting += 1
            # One thread for small requests (waking OpenMP workers costs more than the trees)
            # and whenever another prediction or the log's flush has a core: OpenMP splits the
            # rows evenly, so a busy core stalls the whole call (1000 rows beside a Parquet
            # write: 6.6 ms on 2 threads, 5.3 on 1, 2.5 on 2 idle cores).
            threaded = rows >= _THREADED_FROM and self._predicting == 1 and not self.log.flushing
            self._threaded += threaded
        try:
            threads = _PREDICT_THREADS if threaded else 1
            return np.asarray(model.booster.predict(matrix, num_threads=threads))
        finally:
            with self._predicting_lock:
                self._predicting -= 1
                self._threaded -= threaded
                if not self._threaded:
                    self._predictions_done.notify_all()

    def _log_takes_a_core(self, patience: float = 0.05) -> None:
        """The log's flush thread, before each step of its work: wait (at most `patience`
        seconds) for a prediction running on both cores to end, then mark the log flushing,
        atomically with the check, so the next prediction takes one thread and leaves the
        log its core. Between two batches of a request stream the flush then runs beside
        the request's Python (cleaning, lookups), not against LightGBM's second thread."""
        with self._predictions_done:
            self._predictions_done.wait_for(lambda: not self._threaded, timeout=patience)
            self.log.flushing = True

    def _present_all(
        self, prediction: np.ndarray, model: LoadedModel, ids: list[str]
    ) -> list[dict[str, Any]]:
        version = model.version
        ids = _as_list(ids)
        if self.spec.task == "binary":
            values = prediction.tolist()
            return [
                {"request_id": i, "model_version": version, "prediction": p, "label": int(p >= 0.5)}
                for i, p in zip(ids, values, strict=True)
            ]
        return [
            {"request_id": i, "model_version": version, **self._present(p, model)}
            for i, p in zip(ids, prediction, strict=True)
        ]

    def _present_columns(
        self, prediction: np.ndarray, model: LoadedModel, ids: list[str]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"model_version": model.version, "request_ids": _as_list(ids)}
        if self.spec.task == "binary":
            out["predictions"] = prediction.tolist()
            out["labels"] = (prediction >= 0.5).astype(int).tolist()
        elif self.spec.task == "multiclass":
            classes = model.classes or []
            out["predictions"] = [classes[i] for i in np.argmax(prediction, axis=1).tolist()]
            out["probabilities"] = {c: prediction[:, i].tolist() for i, c in enumerate(classes)}
        else:
            out["predictions"] = prediction.tolist()
        return out

    def _readable(
        self, columns: dict[str, Any], model: LoadedModel, matrix: np.ndarray
    ) -> dict[str, Any]:
        """The features as scored, by name: what the model's matrix holds (numbers as its
        float32 values, stored as float32, the model's own precision; NaN = null; categorical
        levels as sent, unseen: None). Numbers come from the matrix, not from the request's
        columns: a commit of many single-row requests then concatenates one small matrix per
        request instead of ~40 one-value columns each."""
        assert model.encoder is not None
        position = model.positions
        numbers = [
            f.name for f in model.state.features if not f.categorical and f.kind != "boolean"
        ]
        # One transposed copy of the number columns: each row is one feature.
        block = np.ascontiguousarray(matrix[:, [position[name] for name in numbers]].T)
        row = {name: index for index, name in enumerate(numbers)}
        out: dict[str, Any] = {}
        for feature in model.state.features:
            name = feature.name
            if feature.categorical:
                # Unseen levels are the matrix's NaN codes: the encoder's own lookup, not a
                # second one per value.
                codes = matrix[:, position[name]]
                unseen = np.isnan(codes)
                levels = model.log_levels.get(name)
                if levels is not None:  # text: the level *is* the value sent, no strings built
                    with np.errstate(invalid="ignore"):  # NaN codes: masked below
                        indices = codes.astype(np.int32)
                    if unseen.any():
                        indices[unseen] = 0
                        indices = pa.array(indices, mask=unseen)
                    else:
                        indices = pa.array(indices)
                    out[name] = pa.DictionaryArray.from_arrays(indices, levels)
                else:
                    values = np.asarray(columns[name], dtype=object)
                    out[name] = np.where(unseen, None, values)
            elif feature.kind == "boolean":
                flags = matrix[:, position[name]]
                missing = np.isnan(flags)
                out[name] = pa.array(np.where(missing, 0, flags).astype(np.int64), mask=missing)
            else:
                out[name] = block[row[name]]
        return out

    def _logged_ids(self, columns: dict[str, Any]) -> dict[str, Any]:
        """The id columns as cleaned; whole numbers as int64 arrays, so Arrow does not guess
        the type of each value (about half the cost)."""
        out: dict[str, Any] = {}
        for name in self.spec.id_columns:
            if name not in columns:
                continue
            values = columns[name]
            kind = self._cleaned_types.get(name)
            out[name] = values
            if kind is not None and pa.types.is_integer(kind) and isinstance(values, np.ndarray):
                # the cleaning gives ints (or None: then Arrow reads the objects)
                with contextlib.suppress(TypeError, ValueError):
                    out[name] = values.astype(np.int64)
        return out

    def _log_compiled(
        self,
        ids: list[str] | pa.Array,
        prediction: np.ndarray,
        columns: dict[str, Any],
        matrix: np.ndarray,
        model: LoadedModel,
        shadow: LoadedModel | None,
        shadow_prediction: np.ndarray | None,
    ) -> None:
        # Everything but the timestamp is deferred: under group commit the log's flush thread
        # builds the columns of every request queued for the same model(s) at once (a
        # single-row request costs a queue entry, not its own arrays). The columns and matrix
        # are this request's own, never modified after scoring.
        logged = _Logged(self.log.now(), ids, prediction, columns, matrix, shadow_prediction)
        self.log.submit_group((id(model), id(shadow)), self._grouped_columns, logged, model, shadow)

    def _grouped_columns(
        self, batches: list[_Logged], model: LoadedModel, shadow: LoadedModel | None
    ) -> LogColumns:
        """The log columns of requests scored by the same model(s), merged before building."""
        if len(batches) == 1:
            one = batches[0]
            return self._prediction_columns(
                one.now,
                one.ids,
                one.prediction,
                one.columns,
                one.matrix,
                model,
                shadow,
                one.shadow_prediction,
            )
        # Numbers, booleans and text levels come from the matrix (`_readable`): only the ids,
        # the time and categorical features without text levels are needed as columns.
        needed = [
            *(
                f.name
                for f in model.state.features
                if f.categorical and f.name not in model.log_levels
            ),
            *self.spec.id_columns,
        ]
        if self.spec.has_time:
            needed.append(TIME)
        columns = {
            name: _concatenated([b.columns[name] for b in batches])
            for name in dict.fromkeys(needed)
            if name in batches[0].columns
        }
        shadow_prediction = (
            np.concatenate([b.shadow_prediction for b in batches]) if shadow is not None else None
        )
        # One logged_at per row, built as Arrow from each request's time (not a datetime each).
        now = pa.array(
            np.repeat(
                np.array([_micros(b.now) for b in batches], dtype=np.int64),
                [len(b.ids) for b in batches],
            ),
            type=pa.timestamp("us", tz="UTC"),
        )
        return self._prediction_columns(
            now,
            _concatenated([b.ids for b in batches]),
            np.concatenate([b.prediction for b in batches]),
            columns,
            np.concatenate([b.matrix for b in batches]),
            model,
            shadow,
            shadow_prediction,
        )

    def _logged_outcome(self, prediction: np.ndarray, model: LoadedModel) -> dict[str, Any]:
        """What the response says, as log columns: prediction (binary: also the label)."""
        if self.spec.task == "binary":
            return {"prediction": prediction, "label": (prediction >= 0.5).astype(np.int64)}
        if self.spec.task == "multiclass":
            classes = model.classes or []
            return {
                "prediction": [classes[i] for i in np.argmax(prediction, axis=1).tolist()],
                "probabilities": {c: prediction[:, i] for i, c in enumerate(classes)},
            }
        return {"prediction": prediction}

    def _prediction_columns(
        self,
        now: datetime | pa.Array,
        ids: list[str] | pa.Array,
        prediction: np.ndarray,
        columns: dict[str, Any],
        matrix: np.ndarray,
        model: LoadedModel,
        shadow: LoadedModel | None,
        shadow_prediction: np.ndarray | None,
    ) -> LogColumns:
        rows = len(ids)
        times = columns[TIME] if self.spec.has_time else [None] * rows
        readable = self._readable(columns, model, matrix)
        shadows = None
        if shadow is not None and shadow_prediction is not None:
            shadows = {"model_version": shadow.version}
            shadows.update(self._logged_outcome(shadow_prediction, shadow))
        return prediction_columns(
            ids,
            now,
            model.version,
            self._logged_outcome(prediction, model)["prediction"],
            times,
            self._logged_ids(columns),
            readable,
            shadows,
        )

    def _log(
        self,
        results,
        readable: pa.Table,
        cleaned: pa.Table,
        prediction,
        shadow,
        shadow_prediction,
        records,
    ) -> None:
        now = self.log.now()
        times = (
            cleaned.column(TIME).to_numpy(zero_copy_only=False)
            if self.spec.has_time
            else [None] * len(results)
        )
        ids = {
            name: cleaned.column(name).to_pylist()
            for name in self.spec.id_columns
            if name in cleaned.column_names
        }
        # Numbers as the model scored them (its matrix is float32), as the compiled path logs.
        features = {
            name: (
                readable.column(name).cast(pa.float32()).to_numpy(zero_copy_only=False)
                if pa.types.is_floating(readable.column(name).type)
                else readable.column(name).to_pylist()
            )
            for name in readable.column_names
        }
        shadows = None
        if shadow is not None and shadow_prediction is not None:
            shadows = {"model_version": shadow.version}
            shadows.update(self._logged_outcome(np.asarray(shadow_prediction), shadow))
        columns = prediction_columns(
            [r["request_id"] for r in results],
            now,
            results[0]["model_version"],
            [r["prediction"] for r in results],
            times,
            ids,
            features,
            shadows,
        )
        self.log.submit(lambda: columns)

    def ingest_events(self, records: list[dict[str, Any]]) -> int:
        """Feed events (rows with their outcomes) to the online store; returns values added."""
        if not records:
            return 0
        self._catch_up()
        cleaned = self._clean(records)
        added = self._add_events(cleaned)
        if self.journal is not None:  # the other workers apply it before their next read
            self.journal.append(cleaned)
        return added

    def _catch_up(self) -> None:
        """Apply the events other workers journaled since this worker last looked."""
        if self.journal is None or not self.spec.aggregates:
            return
        for cleaned in self.journal.unapplied():
            self._add_events(cleaned)

    def _add_events(self, cleaned: pa.Table) -> int:
        added = 0
        for aggregate in self.spec.aggregates:
            value = cleaned.column(AGG_VALUE.format(aggregate.name)).to_pylist()
            known = cleaned.column(AGG_KNOWN_AT.format(aggregate.name)).to_numpy(
                zero_copy_only=False
            )
            keys = list(zip(*[cleaned.column(k).to_pylist() for k in aggregate.keys], strict=True))
            mask = [v is not None for v in value]
            added += self.store.add(
                aggregate,
                [k for k, m in zip(keys, mask, strict=True) if m],
                known[np.array(mask, dtype=bool)] if len(mask) else known,
                [v for v in value if v is not None],
            )
        return added

    def record_labels(self, labels: list[dict[str, Any]]) -> int:
        """Ground truth as it arrives: {request_id, label} (or the id columns and label)."""
        now = self.log.now()
        lines = [{"logged_at": now, **label} for label in labels]
        self.log.labels.write(lines)
        return len(lines)

    def _seed_store(self) -> int:
        added = 0
        for aggregate in self.spec.aggregates:
            path = self.snapshot / f"events_{aggregate.name}.parquet"
            if not path.exists():
                continue
            frame = self.db.sql(f"SELECT * FROM read_parquet({sql_literal(str(path))})").pl()
            keys = list(zip(*[frame[k].to_list() for k in aggregate.keys], strict=True))
            added += self.store.add(
                aggregate, keys, frame["known_at"].to_numpy(), frame["value"].to_list()
            )
        return added

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.spec.name,
            "task": self.spec.task,
            "model_version": self.model.version,
            "shadow_version": self.shadow.version if self.shadow else None,
            "snapshot": self.snapshot.name,
            "swaps": self.swaps,
            "request_fields": {
                f.name: {"type": f.dtype, "required": f.required, "nullable": f.nullable}
                for f in self.fields
            },
        }


def configured_workers() -> int:
    """The service's worker processes (`ML_LIFECYCLE_WORKERS`, default 1)."""
    workers = int(os.environ.get("ML_LIFECYCLE_WORKERS", "1") or 1)
    if workers < 1:
        raise ValueError(f"ML_LIFECYCLE_WORKERS must be 1 or more, found {workers}")
    return workers


_THREADED_FROM = 512  # rows
# Both cores of the 2-core target for a large batch nobody else is predicting (1000 rows:
# 5.5 -> 2.9 ms); more would only take cores from the HTTP workers and the log. With several
# worker processes each takes its share of the cores.
_PREDICT_THREADS = max(1, min(2, (os.cpu_count() or 1) // configured_workers()))


def _rows_of(inputs: dict[str, list[Any]]) -> int:
    lengths = {name: len(values) for name, values in inputs.items()}
    if len(set(lengths.values())) > 1:
        raise RequestError(f"columns differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def _plural(key: str) -> str:
    return {"prediction": "predictions", "label": "labels", "probabilities": "probabilities"}.get(
        key, key
    )


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _request_ids(count: int) -> pa.Array:
    """Unique ids for a batch: one random prefix, then the row (32 hex digits like a uuid4),
    built as one Arrow string array (no Python string per row)."""
    prefix = np.frombuffer(uuid.uuid4().hex[:24].encode(), dtype=np.uint8)
    text = np.empty((count, 32), dtype=np.uint8)
    text[:, :24] = prefix
    rows = np.arange(count, dtype=np.int64)
    text[:, 24:] = _HEX[(rows[:, None] >> np.arange(28, -1, -4, dtype=np.int64)) & 15]
    offsets = np.arange(0, 32 * (count + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(text))


def _micros(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (exact)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _as_list(ids: list[str] | pa.Array) -> list[str]:
    return ids.to_pylist() if isinstance(ids, pa.Array) else list(ids)


def _concatenated(parts: list[Any]) -> Any:
    """One column from the same column of several requests (numpy, Arrow or lists)."""
    kinds = {type(p) for p in parts}  # one pass in C (a generator per part cost more, for
    # a commit of many single-row requests, than the concatenation)
    if all(issubclass(kind, np.ndarray) for kind in kinds):
        return np.concatenate(parts)
    if all(issubclass(kind, pa.Array) for kind in kinds):
        return pa.concat_arrays(parts)
    return [v for p in parts for v in (p.to_pylist() if isinstance(p, pa.Array) else p)]


@dataclass
class _Logged:
    """What one scored request leaves for the log's flush thread."""

    now: datetime
    ids: list[str] | pa.Array
    prediction: np.ndarray
    columns: dict[str, Any]
    matrix: np.ndarray
    shadow_prediction: np.ndarray | None


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
