"""Train/valid/test splits and the model matrix, read from the features table.

Split by time when the spec has one (train on the oldest periods, validate on the next, test on
the newest), otherwise a seeded random split. Rows without a target are excluded and counted.
The matrix is built by `FeatureEncoder(state)` (data/features.py), the encoder the service
calls on each request: categorical levels become their codes under the model's own vocabulary
(a level the model never saw becomes missing), so a model can score any later features table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import numpy as np

from ml_lifecycle.data.features import FeatureEncoder, FeatureState
from ml_lifecycle.data.sources import quote
from ml_lifecycle.spec import TARGET, TIME, DatasetSpec, SpecError

SPLIT = "__split"
SPLITS = ("train", "valid", "test")


@dataclass
class SplitData:
    X: np.ndarray
    y: np.ndarray
    time: np.ndarray | None = None
    slices: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.y)


@dataclass
class ModelData:
    feature_names: list[str]
    categorical: list[str]
    splits: dict[str, SplitData]
    classes: list[str] | None
    unlabelled: int
    boundaries: dict[str, str]

    def counts(self) -> dict[str, int]:
        return {**{name: data.rows for name, data in self.splits.items()},
                "unlabelled": self.unlabelled}


def matrix_select_sql(state: FeatureState, alias: str = "f") -> list[str]:
    """SELECT items giving the model's numeric matrix (FLOAT) in SQL (ad-hoc scoring in DuckDB,
    e.g. the demo); `FeatureEncoder` gives the same values and is what training and serving use."""
    items = []
    for feature in state.features:
        column = f"{alias}.{quote(feature.name)}"
        if feature.categorical:
            size = len(state.categories.get(feature.name, []))
            items.append(f"CAST(CASE WHEN enum_code({column}) < {size} THEN enum_code({column}) "
                         f"END AS FLOAT) AS {quote(feature.name)}")
        else:
            items.append(f"CAST({column} AS FLOAT) AS {quote(feature.name)}")
    return items


def _time_boundaries(conn: duckdb.DuckDBPyConnection, spec: DatasetSpec, table: str
                     ) -> tuple[datetime, datetime]:
    split = spec.split
    for key in ("test", "valid"):
        value = getattr(split, key)
        if value != int(value) or value < 1:
            raise SpecError(f"dataset spec {spec.spec_path}: split.{key}: a time split counts "
                            f"whole periods ({split.period}s), found {value}")
    periods = [row[0] for row in conn.execute(
        f"SELECT DISTINCT date_trunc('{split.period}', {TIME}) AS p FROM {quote(table)} "
        f"WHERE {TARGET} IS NOT NULL ORDER BY p").fetchall()]
    needed = int(split.test) + int(split.valid) + 1
    if len(periods) < needed:
        raise SpecError(
            f"dataset spec {spec.spec_path}: split: a time split with test={int(split.test)} and "
            f"valid={int(split.valid)} {split.period}s needs at least {needed} {split.period}s "
            f"of labelled rows, found {len(periods)}")
    return periods[-int(split.test) - int(split.valid)], periods[-int(split.test)]


def load_model_data(
    conn: duckdb.DuckDBPyConnection,
    spec: DatasetSpec,
    state: FeatureState,
    table: str = "features",
    classes: list[str] | None = None,
) -> ModelData:
    """Read the features table into train/valid/test matrices for `state`'s features."""
    unlabelled = int(conn.execute(
        f"SELECT count(*) FROM {quote(table)} WHERE {TARGET} IS NULL").fetchall()[0][0])
    slice_cols = [c for c in spec.slice_columns]
    extra = [f"CAST(f.{quote(c)} AS VARCHAR) AS {quote('__slice_' + c)}" for c in slice_cols]
    boundaries: dict[str, str] = {}
    if spec.split_method == "time":
        valid_start, test_start = _time_boundaries(conn, spec, table)
        boundaries = {"valid_from": str(valid_start), "test_from": str(test_start)}
        split_sql = (f"CASE WHEN f.{TIME} >= TIMESTAMP '{test_start}' THEN 'test' "
                     f"WHEN f.{TIME} >= TIMESTAMP '{valid_start}' THEN 'valid' ELSE 'train' END")
        # Ties in time are ordered by id so the row order, and so the model, is reproducible.
        order = ", ".join([f"f.{TIME}", *[f"f.{quote(c)}" for c in spec.id_columns], "f.rowid"])
    else:
        split_sql = "NULL"
        order = ", ".join([*[f"f.{quote(c)}" for c in spec.id_columns], "f.rowid"])
    time_item = [f"f.{TIME} AS {TIME}"] if spec.has_time else []
    # Categorical columns stay ENUMs (dictionary-encoded): the encoder maps their levels once.
    inputs = [f"f.{quote(f.name)}" for f in state.features if f.kind != "time"]
    query = (
        f"SELECT {split_sql} AS {SPLIT}, f.{TARGET} AS {TARGET}, {', '.join(time_item + extra)}"
        f"{', ' if time_item or extra else ''}{', '.join(inputs)} "
        f"FROM {quote(table)} AS f WHERE f.{TARGET} IS NOT NULL ORDER BY {order}"
    )
    frame = conn.sql(query).pl()
    names = state.feature_names
    if spec.split_method == "random":
        rng = np.random.default_rng(spec.split.seed)
        draw = rng.random(frame.height)
        test, valid = float(spec.split.test), float(spec.split.valid)
        if not (0 < test < 1 and 0 < valid < 1 and test + valid < 1):
            raise SpecError(f"dataset spec {spec.spec_path}: split: a random split takes fractions "
                            f"with test + valid < 1, found test={test}, valid={valid}")
        labels = np.where(draw < test, "test", np.where(draw < test + valid, "valid", "train"))
    else:
        labels = frame[SPLIT].to_numpy()
    target = frame[TARGET]
    if spec.task == "multiclass":
        values = target.cast(str).to_numpy()
        if classes is None:
            classes = sorted(set(values[labels == "train"].tolist()))
        index = {c: i for i, c in enumerate(classes)}
        y_all = np.array([index.get(v, -1) for v in values], dtype=np.int64)
    else:
        y_all = target.cast(float).to_numpy()
    times = frame[TIME].to_numpy() if spec.has_time else None
    categorical = set(state.categorical_features)
    columns = {f.name: frame[f.name].to_arrow() if f.name in categorical else frame[f.name].to_numpy()
               for f in state.features if f.kind != "time"}
    if times is not None:
        columns[TIME] = times
    X_all = FeatureEncoder(state).matrix(columns, frame.height)
    slice_values = {c: frame["__slice_" + c].to_numpy() for c in slice_cols}
    del columns, frame  # the matrix holds what training needs: free the frame before the splits
    splits: dict[str, SplitData] = {}
    for name in SPLITS:
        mask = labels == name
        if spec.task == "multiclass":
            mask &= y_all >= 0  # classes unseen in training cannot be scored
        # A time split is ordered by time, so each split is one block: a view, not a copy.
        where = np.flatnonzero(mask)
        block = (slice(int(where[0]), int(where[-1]) + 1)
                 if len(where) and where[-1] - where[0] + 1 == len(where) else mask)
        splits[name] = SplitData(
            X=X_all[block],
            y=y_all[block],
            time=times[block] if times is not None else None,
            slices={c: values[block] for c, values in slice_values.items()},
        )
    for name, data in splits.items():
        if data.rows == 0:
            raise SpecError(f"dataset spec {spec.spec_path}: split: the {name} split is empty")
    return ModelData(
        feature_names=names,
        categorical=state.categorical_features,
        splits=splits,
        classes=classes,
        unlabelled=unlabelled,
        boundaries=boundaries,
    )
