"""Warehouse tables and model matrices as Parquet under an fsspec URL, for readers on other machines.

Two exports, both plain Parquet part files plus a small JSON sidecar:

- `export_features(conn, url)` writes the `features` table (`part-00000.parquet`, ... and the
  fitted `feature_state.json`); `model_data_from_features(url, spec)` rebuilds the train/valid/test
  matrices from it with the one split and matrix code (`training.dataset.load_model_data`), so any
  machine with the spec reads the same arrays the warehouse gives.
- `export_model_data(data, url)` writes the matrices themselves, per split
  (`train/part-*.parquet`, `valid/...`, `test/...` and `model_data.json`); Dask workers read their
  own parts (`read_split_part`) without a warehouse (see training/distributed.py).

A URL is anything fsspec resolves (`file://`, a plain path, `s3://` with s3fs installed, ...).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ml_lifecycle.data.features import FeatureState
from ml_lifecycle.data.sources import quote, sql_literal
from ml_lifecycle.spec import TARGET, TIME, DatasetSpec
from ml_lifecycle.training.dataset import SPLITS, ModelData, SplitData, load_model_data

FEATURE_STATE_FILE = "feature_state.json"
MODEL_DATA_FILE = "model_data.json"
ROWS_PER_FILE = 1_000_000
_BATCH_ROWS = 100_000
_SLICE = "__slice_"


class ExportError(RuntimeError):
    """An export folder is missing, incomplete or not what the reader expects."""


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/") or "/"


def _part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _plain_strings(table_or_batch: pa.RecordBatch) -> pa.RecordBatch:
    """ENUM columns arrive as Arrow dictionaries; store their values (readers recode them)."""
    columns = []
    for column in table_or_batch.columns:
        if pa.types.is_dictionary(column.type):
            column = column.cast(pa.string())
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=table_or_batch.schema.names)


def _write_parts(fs: fsspec.AbstractFileSystem, folder: str, batches, rows_per_file: int
                 ) -> list[dict[str, Any]]:
    """Write record batches into part files of at most `rows_per_file` rows; returns
    [{"file", "rows"}] in order."""
    fs.makedirs(folder, exist_ok=True)
    for stale in fs.glob(posixpath.join(folder, "part-*.parquet")):
        fs.rm(stale)
    parts: list[dict[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    rows_in_file = 0
    for batch in batches:
        offset = 0
        while offset < batch.num_rows:
            if writer is None:
                name = _part_name(len(parts))
                writer = pq.ParquetWriter(posixpath.join(folder, name), batch.schema,
                                          filesystem=fs)
                parts.append({"file": name, "rows": 0})
                rows_in_file = 0
            take = min(batch.num_rows - offset, rows_per_file - rows_in_file)
            writer.write_batch(batch.slice(offset, take))
            offset += take
            rows_in_file += take
            parts[-1]["rows"] = rows_in_file
            if rows_in_file >= rows_per_file:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()
    return parts


# -- the features table ------------------------------------------------------------------------
def export_features(conn: duckdb.DuckDBPyConnection, url: str, state: FeatureState,
                    table: str = "features", rows_per_file: int = ROWS_PER_FILE
                    ) -> list[dict[str, Any]]:
    """Stream `table` (in row order) into Parquet parts under `url`, with `state` beside them.

    Returns the parts written ([{"file", "rows"}]); an earlier export in the folder is replaced.
    """
    fs, root = _filesystem(url)
    reader = conn.sql(f"SELECT * FROM {quote(table)} ORDER BY rowid").to_arrow_reader(_BATCH_ROWS)
    parts = _write_parts(fs, root, (_plain_strings(b) for b in reader), rows_per_file)
    with fs.open(posixpath.join(root, FEATURE_STATE_FILE), "w") as handle:
        handle.write(state.model_dump_json(indent=1))
    return parts


def read_feature_state(url: str) -> FeatureState:
    fs, root = _filesystem(url)
    path = posixpath.join(root, FEATURE_STATE_FILE)
    if not fs.exists(path):
        raise ExportError(f"{url}: no {FEATURE_STATE_FILE}; expected a folder written by "
                          "export_features")
    return FeatureState.model_validate_json(fs.cat_file(path))


def model_data_from_features(url: str, spec: DatasetSpec, state: FeatureState | None = None,
                             classes: list[str] | None = None) -> ModelData:
    """The train/valid/test matrices of an exported features table, as `load_model_data` gives
    them from the warehouse (same splits, same row order, same categorical codes)."""
    fs, root = _filesystem(url)
    state = state or read_feature_state(url)
    files = sorted(fs.glob(posixpath.join(root, "part-*.parquet")))
    if not files:
        raise ExportError(f"{url}: no part-*.parquet files; expected a folder written by "
                          "export_features")
    arrow = pq.read_table(files, filesystem=fs)
    # Categorical features come back as strings: recode them under the exported vocabulary.
    items = []
    for name in arrow.schema.names:
        values = state.categories.get(name)
        if values:
            enum = "ENUM(" + ", ".join(sql_literal(v) for v in values) + ")"
            items.append(f"TRY_CAST(CAST({quote(name)} AS VARCHAR) AS {enum}) AS {quote(name)}")
        else:
            items.append(quote(name))
    with duckdb.connect() as conn:
        conn.register("exported_features", arrow)
        conn.execute(f"CREATE TABLE features AS SELECT {', '.join(items)} "
                     "FROM exported_features").fetchall()
        conn.unregister("exported_features")
        return load_model_data(conn, spec, state, table="features", classes=classes)


# -- the model matrices ------------------------------------------------------------------------
def _split_table(data: SplitData, feature_names: list[str]) -> pa.Table:
    columns: dict[str, pa.Array] = {name: pa.array(data.X[:, index])
                                    for index, name in enumerate(feature_names)}
    columns[TARGET] = pa.array(data.y)
    if data.time is not None:
        columns[TIME] = pa.array(data.time)
    for column, values in data.slices.items():
        columns[_SLICE + column] = pa.array(values.astype(object) if values.dtype == object
                                            else values)
    return pa.table(columns)


def export_model_data(data: ModelData, url: str, rows_per_file: int = ROWS_PER_FILE
                      ) -> dict[str, Any]:
    """Write each split's matrix, target, time and slice values as Parquet parts under
    `url/<split>/`, and `model_data.json` (names, classes, parts); returns that JSON."""
    fs, root = _filesystem(url)
    meta: dict[str, Any] = {
        "feature_names": data.feature_names,
        "categorical": data.categorical,
        "classes": data.classes,
        "unlabelled": data.unlabelled,
        "boundaries": data.boundaries,
        "slice_columns": sorted(next(iter(data.splits.values())).slices),
        "splits": {},
    }
    for name in SPLITS:
        table = _split_table(data.splits[name], data.feature_names)
        batches = table.to_batches(max_chunksize=_BATCH_ROWS)
        meta["splits"][name] = _write_parts(fs, posixpath.join(root, name), batches,
                                            rows_per_file)
    with fs.open(posixpath.join(root, MODEL_DATA_FILE), "w") as handle:
        handle.write(json.dumps(meta, indent=1))
    return meta


def read_model_data_meta(url: str) -> dict[str, Any]:
    fs, root = _filesystem(url)
    path = posixpath.join(root, MODEL_DATA_FILE)
    if not fs.exists(path):
        raise ExportError(f"{url}: no {MODEL_DATA_FILE}; expected a folder written by "
                          "export_model_data")
    return json.loads(fs.cat_file(path))


def _split_from_table(table: pa.Table, meta: dict[str, Any]) -> SplitData:
    names = meta["feature_names"]
    X = np.empty((table.num_rows, len(names)), dtype=np.float32)
    for index, name in enumerate(names):
        X[:, index] = table.column(name).to_numpy()
    time = table.column(TIME).to_numpy() if TIME in table.schema.names else None
    slices = {c: table.column(_SLICE + c).to_numpy(zero_copy_only=False)
              for c in meta["slice_columns"]}
    return SplitData(X=X, y=table.column(TARGET).to_numpy(), time=time, slices=slices)


def read_split_part(url: str, split: str, file: str, meta: dict[str, Any]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of one part file of a split: what one Dask worker loads."""
    fs, root = _filesystem(url)
    columns = [*meta["feature_names"], TARGET]
    part = _split_from_table(
        pq.read_table(posixpath.join(root, split, file), columns=columns, filesystem=fs),
        {**meta, "slice_columns": []})
    return part.X, part.y


def read_split(url: str, split: str, meta: dict[str, Any] | None = None) -> SplitData:
    """One whole split (all its parts, in order)."""
    meta = meta or read_model_data_meta(url)
    fs, root = _filesystem(url)
    files = [posixpath.join(root, split, p["file"]) for p in meta["splits"][split]]
    return _split_from_table(pq.read_table(files, filesystem=fs), meta)


def read_model_data(url: str) -> ModelData:
    """The ModelData written by `export_model_data`."""
    meta = read_model_data_meta(url)
    return ModelData(
        feature_names=meta["feature_names"],
        categorical=meta["categorical"],
        splits={name: read_split(url, name, meta) for name in SPLITS},
        classes=meta["classes"],
        unlabelled=meta["unlabelled"],
        boundaries=meta["boundaries"],
    )
