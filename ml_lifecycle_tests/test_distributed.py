"""Training on a real Dask cluster (a 2-worker `distributed.LocalCluster`) gives the model quality
of in-process training; the `model` asset trains there when the `cluster` resource names it; the
Parquet exports read back the same arrays, and workers train from them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import lightgbm as lgb
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

from ml_lifecycle.assets.data import build_data_assets
from ml_lifecycle.data.export import (
    export_features,
    export_model_data,
    model_data_from_features,
    read_model_data,
)
from ml_lifecycle.data.features import load_state
from ml_lifecycle.resources import Warehouse
from ml_lifecycle.spec import load_spec
from ml_lifecycle.training.cluster import SCHEDULER_ENV
from ml_lifecycle.training.dataset import SPLITS, ModelData, load_model_data
from ml_lifecycle.training.distributed import train_distributed, train_from_parquet
from ml_lifecycle.training.metrics import compute_metrics
from ml_lifecycle.training.params import TrainingParams, load_params
from ml_lifecycle.training.registry import ModelRegistry, RegistryError
from ml_lifecycle.training.trainer import predict, train
from ml_lifecycle_tests.conftest import warehouse_connection
from ml_lifecycle_tests.test_training import run_training, write_dataset

ROWS = 8000


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def client(dask_cluster: LocalCluster) -> Iterator[Client]:
    with Client(dask_cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """task -> (spec path, warehouse) with the data stage materialized, once per session."""
    out = {}
    for task in ("binary", "regression", "multiclass"):
        folder = tmp_path_factory.mktemp(f"dask_{task}")
        spec_path = write_dataset(folder, task, rows=ROWS)
        database = folder / "warehouse.duckdb"
        spec = load_spec(spec_path)
        result = dg.materialize(build_data_assets(spec), instance=dg.DagsterInstance.ephemeral(),
                                resources={"warehouse": Warehouse(database=str(database))})
        assert result.success
        out[task] = (spec_path, database)
    return out


def model_data(prepared: dict[str, tuple[Path, Path]], task: str) -> ModelData:
    spec_path, database = prepared[task]
    with warehouse_connection(database) as conn:
        return load_model_data(conn, load_spec(spec_path), load_state(conn))


def primary_test_metric(task: str, data: ModelData, booster: lgb.Booster) -> float:
    test = data.splits["test"]
    metrics = compute_metrics(task, test.y, predict(booster, test.X, task))
    return metrics[{"binary": "roc_auc", "regression": "rmse", "multiclass": "accuracy"}[task]]


@pytest.mark.parametrize("task", ["binary", "regression", "multiclass"])
def test_dask_training_matches_in_process_quality(task: str, client: Client,
                                                  prepared: dict[str, tuple[Path, Path]]):
    data = model_data(prepared, task)
    params = load_params(prepared[task][0].with_name("spec.params.yaml"))
    local = train(task, data, params, log=lambda _: None)
    with get_task_stream(client) as stream:
        remote = train_distributed(client, task, data, params, log=lambda _: None)

    assert remote.trained_on == "dask" and local.trained_on == "in_process"
    assert isinstance(remote.booster, lgb.Booster)
    # Data-parallel: both workers took part; early stopping ended well before the round limit.
    assert len({t["worker"] for t in stream.data}) == 2
    assert 0 < remote.best_iteration < params.num_boost_round - params.early_stopping_rounds
    assert remote.booster.num_trees() == remote.best_iteration * (
        len(data.classes) if task == "multiclass" else 1)
    ours, theirs = primary_test_metric(task, data, remote.booster), primary_test_metric(task, data, local.booster)
    if task == "binary":
        assert ours > 0.8 and abs(ours - theirs) < 0.02
    elif task == "regression":
        assert abs(ours - theirs) < 0.05 * theirs
    else:
        assert ours > 0.6 and abs(ours - theirs) < 0.03


def test_search_trials_spread_over_the_workers(client: Client,
                                               prepared: dict[str, tuple[Path, Path]]):
    data = model_data(prepared, "binary")
    base = load_params(prepared["binary"][0].with_name("spec.params.yaml"))
    params = TrainingParams.model_validate({**base.model_dump(), "search": {
        "method": "grid", "trials": 4,
        "space": {"num_leaves": [4, 15], "learning_rate": [0.05, 0.2]}}})
    local = train("binary", data, params, log=lambda _: None)
    with get_task_stream(client) as stream:
        remote = train_distributed(client, "binary", data, params, log=lambda _: None)

    trial_workers = {t["worker"] for t in stream.data if "_remote_trial" in t["key"]}
    assert len(trial_workers) == 2
    assert [t.params for t in remote.trials] == [t.params for t in local.trials]
    # Each trial is the in-process fit on a worker: the same scores, the same winner.
    for ours, theirs in zip(remote.trials, local.trials, strict=True):
        assert ours.valid_metrics["roc_auc"] == pytest.approx(theirs.valid_metrics["roc_auc"],
                                                              abs=1e-3)
    assert remote.params == local.params


def test_model_asset_trains_on_the_cluster_resource(tmp_path: Path, dask_cluster: LocalCluster,
                                                    monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ML_LIFECYCLE_HOME", str(home))
    monkeypatch.setenv(SCHEDULER_ENV, dask_cluster.scheduler_address)
    spec_path = write_dataset(tmp_path / "asset", "binary", rows=ROWS)
    result = run_training(spec_path)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    model_event = next(e for e in result.get_asset_materialization_events()
                       if e.asset_key.path[-1] == "model")
    assert model_event.materialization.metadata["trained_on"].value == "dask"

    # The registry takes a file:// URL as well as a path.
    registry = ModelRegistry((home / "synthetic_binary" / "registry").as_uri())
    version = registry.load(registry.alias("champion"))
    assert version.metadata["trained_on"] == "dask"
    report = json.loads((home / "synthetic_binary" / "reports" / "evaluation.json").read_text())
    assert report["metrics"]["test"]["roc_auc"] > 0.8
    with pytest.raises(RegistryError, match="expected a local path or a file:// URL"):
        ModelRegistry("s3://bucket/registry")


def assert_same_model_data(ours: ModelData, theirs: ModelData) -> None:
    assert ours.feature_names == theirs.feature_names
    assert ours.categorical == theirs.categorical
    assert ours.classes == theirs.classes and ours.boundaries == theirs.boundaries
    assert ours.counts() == theirs.counts()
    for name in SPLITS:
        a, b = ours.splits[name], theirs.splits[name]
        np.testing.assert_array_equal(a.X, b.X)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.time, b.time)
        assert a.slices.keys() == b.slices.keys()
        for column in a.slices:
            assert a.slices[column].tolist() == b.slices[column].tolist()


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_parquet_exports_round_trip(task: str, tmp_path: Path,
                                    prepared: dict[str, tuple[Path, Path]]):
    spec_path, database = prepared[task]
    spec = load_spec(spec_path)
    features_url = (tmp_path / "features").as_uri()
    with warehouse_connection(database) as conn:
        state = load_state(conn)
        warehouse_data = load_model_data(conn, spec, state)
        parts = export_features(conn, features_url, state, rows_per_file=3000)
    assert [p["rows"] for p in parts] == [3000, 3000, ROWS - 6000]
    assert_same_model_data(model_data_from_features(features_url, spec), warehouse_data)

    matrices = str(tmp_path / "matrices")  # a plain path is a URL too
    meta = export_model_data(warehouse_data, matrices, rows_per_file=2000)
    assert sum(p["rows"] for p in meta["splits"]["train"]) == warehouse_data.splits["train"].rows
    assert_same_model_data(read_model_data(matrices), warehouse_data)


def test_workers_train_from_parquet(tmp_path: Path, client: Client,
                                    prepared: dict[str, tuple[Path, Path]]):
    data = model_data(prepared, "binary")
    url = (tmp_path / "matrices").as_uri()
    meta = export_model_data(data, url, rows_per_file=2000)
    params = load_params(prepared["binary"][0].with_name("spec.params.yaml"))
    with get_task_stream(client) as stream:
        trained = train_from_parquet(client, "binary", url, params, log=lambda _: None)
    readers = [t for t in stream.data if "read_split_part" in str(t["key"])]
    assert len(readers) == len(meta["splits"]["train"]) > 2 and len({t["worker"] for t in readers}) == 2
    local = train("binary", data, params, log=lambda _: None)
    assert abs(primary_test_metric("binary", data, trained.booster)
               - primary_test_metric("binary", data, local.booster)) < 0.02
