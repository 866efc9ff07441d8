"""LightGBM on a Dask cluster: the same training as trainer.py, spread over the workers.

- One fit (no search) is data-parallel with `lightgbm.dask`: each worker holds a slice of the
  train split, histograms are all-reduced, and every worker builds the same trees.
- A search runs its trials side by side, one ordinary in-process fit per task
  (`trainer.fit_trial` on a worker holding a copy of the data), and keeps the best trial's booster,
  exactly as the in-process search does.

Early stopping: `lightgbm.dask` has none (its workers evaluate only their local part of an eval set
and stop at different rounds, which hangs the network; LightGBM issues #3712, #6351). Here every
worker evaluates the *whole* validation split after each round with a callback
(`ValidationStopping`); as the workers hold identical trees, they compute identical scores and stop
at the same round, with the same rule and metric as `lgb.early_stopping` in-process.

The train split reaches the workers either from the driver's arrays (`scatter`) or straight from
Parquet parts on shared storage (`train_from_parquet`, written by `data.export.export_model_data`).
Either way the result is a plain `lgb.Booster`, as in-process training returns.
"""

from __future__ import annotations

import operator
import time
import warnings
from collections.abc import Callable
from typing import Any

import dask.array as da
import lightgbm as lgb
import numpy as np
from distributed import Client, get_worker
from lightgbm.dask import DaskLGBMClassifier, DaskLGBMRegressor

from ml_lifecycle.data import export
from ml_lifecycle.training.dataset import ModelData, SplitData
from ml_lifecycle.training.metrics import PRIMARY, compute_metrics
from ml_lifecycle.training.params import TrainingParams, search_candidates
from ml_lifecycle.training.trainer import (
    TrainedModel,
    Trial,
    fit_trial,
    lightgbm_params,
    predict,
    trial_score,
)

TRAINED_ON = "dask"
_EPS = 1e-15


class ValidationStopping:
    """Early stopping on the whole validation split, run identically on every worker.

    Mirrors `lgb.early_stopping(rounds)` with the task's training metric (binary_logloss, l2,
    multi_logloss): the best round is the first with the lowest value; training stops when
    `rounds` rounds in a row did not improve on it. Workers in one process (a threaded cluster)
    share this object, so the progress is kept per booster.
    """

    order = 30
    before_iteration = False

    def __init__(self, task: str, X: np.ndarray, y: np.ndarray, rounds: int) -> None:
        self.task, self.X, self.y, self.rounds = task, X, y, rounds
        self.metric = lightgbm_params(task, TrainingParams(), None)["metric"]
        self._progress: dict[int, dict[str, Any]] = {}

    def loss(self, raw: np.ndarray) -> float:
        """The metric of raw scores (before the link function) on the validation split."""
        if self.task == "regression":
            return float(np.mean((raw - self.y) ** 2))
        if self.task == "binary":
            p = np.clip(1.0 / (1.0 + np.exp(-raw)), _EPS, 1 - _EPS)
            return float(-np.mean(self.y * np.log(p) + (1 - self.y) * np.log(1 - p)))
        shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
        p = shifted / shifted.sum(axis=1, keepdims=True)
        picked = p[np.arange(len(self.y)), self.y.astype(np.int64)]
        return float(-np.mean(np.log(np.clip(picked, _EPS, 1.0))))

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        if env.iteration == env.begin_iteration:
            self._progress[id(env.model)] = {"raw": None, "best_score": np.inf,
                                             "best_iteration": -1}
        progress = self._progress[id(env.model)]
        # The new round only: raw scores add up over rounds (the first round carries the bias).
        raw = env.model.predict(self.X, raw_score=True, start_iteration=env.iteration,
                                num_iteration=1)
        progress["raw"] = raw if progress["raw"] is None else progress["raw"] + raw
        score = self.loss(progress["raw"])
        if score < progress["best_score"]:
            progress["best_score"], progress["best_iteration"] = score, env.iteration
        best = progress["best_iteration"]
        if env.iteration - best >= self.rounds or env.iteration == env.end_iteration - 1:
            self._progress.pop(id(env.model), None)
            raise lgb.callback.EarlyStopException(
                best, [("valid", self.metric, progress["best_score"], False)])


def worker_count(client: Client) -> int:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        raise RuntimeError(f"the Dask cluster at {client.scheduler.address} has no workers")
    return len(workers)


def scatter_arrays(client: Client, X: np.ndarray, y: np.ndarray) -> tuple[da.Array, da.Array]:
    """The driver's arrays as Dask arrays, one chunk per worker, already on the workers."""
    pieces = [p for p in np.array_split(np.arange(len(y)), worker_count(client)) if len(p)]
    x_futures = client.scatter([X[p[0]:p[-1] + 1] for p in pieces])
    y_futures = client.scatter([y[p[0]:p[-1] + 1] for p in pieces])
    x_parts = [da.from_delayed(f, shape=(len(p), X.shape[1]), dtype=X.dtype)
               for f, p in zip(x_futures, pieces, strict=True)]
    y_parts = [da.from_delayed(f, shape=(len(p),), dtype=y.dtype)
               for f, p in zip(y_futures, pieces, strict=True)]
    return da.concatenate(x_parts), da.concatenate(y_parts)


def parquet_arrays(client: Client, url: str, split: str, meta: dict[str, Any]
                   ) -> tuple[da.Array, da.Array]:
    """A split exported by `export_model_data` as Dask arrays: each part file is read once, by a
    worker, and stays in that worker's memory."""
    parts = meta["splits"][split]
    if not parts:
        raise export.ExportError(f"{url}: the {split} split has no parts")
    n_features = len(meta["feature_names"])
    y_dtype = np.int64 if meta["classes"] else np.float64
    x_parts, y_parts = [], []
    for part in parts:
        loaded = client.submit(export.read_split_part, url, split, part["file"], meta)
        x_parts.append(da.from_delayed(client.submit(operator.itemgetter(0), loaded),
                                       shape=(part["rows"], n_features), dtype=np.float32))
        y_parts.append(da.from_delayed(client.submit(operator.itemgetter(1), loaded),
                                       shape=(part["rows"],), dtype=y_dtype))
    return da.concatenate(x_parts), da.concatenate(y_parts)


def fit_data_parallel(client: Client, task: str, X: da.Array, y: da.Array, valid: SplitData,
                      feature_names: list[str], categorical: list[str],
                      classes: list[str] | None, params: TrainingParams) -> lgb.Booster:
    """One data-parallel LightGBM fit over the workers holding X/y; early stopping on `valid`."""
    num_class = len(classes) if classes else None
    lgb_params = lightgbm_params(task, params, num_class)
    lgb_params.pop("num_threads", None)  # lightgbm.dask uses each worker's own thread count
    lgb_params.pop("num_class", None)  # the classifier counts the classes of y
    factory = DaskLGBMRegressor if task == "regression" else DaskLGBMClassifier
    estimator = factory(client=client, n_estimators=params.num_boost_round, **lgb_params)
    stopping = ValidationStopping(task, valid.X, valid.y, params.early_stopping_rounds)
    # lightgbm.dask waits on futures through the current client, and warns that the sklearn
    # default n_jobs is replaced by each worker's thread count (as intended).
    with client.as_current(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored")
        estimator.fit(X, y, feature_name=feature_names, categorical_feature=categorical,
                      callbacks=[stopping])
    return estimator.to_local().booster_


def _remote_trial(task: str, data: ModelData | str, params: TrainingParams
                  ) -> tuple[lgb.Booster, Trial, str]:
    """A search trial on a worker: an ordinary in-process fit with the worker's threads."""
    worker = get_worker()
    if isinstance(data, str):
        data = export.read_model_data(data)
    threads = params.with_lightgbm(num_threads=worker.state.nthreads)
    booster, trial = fit_trial(task, data, threads)
    trial.params = params.lightgbm.model_dump()  # as configured, like the in-process record
    return booster, trial, worker.address


def _search(client: Client, task: str, data: ModelData | str, valid: SplitData,
            params: TrainingParams, log: Callable[[str], None]) -> TrainedModel:
    started = time.perf_counter()
    candidates = search_candidates(params)
    primary = PRIMARY[task]
    # Each worker gets the data once; trials read it from worker memory (or from Parquet).
    source = client.scatter(data, broadcast=True) if isinstance(data, ModelData) else data
    trial_params = [params.with_lightgbm(**c) for c in candidates]
    futures = [client.submit(_remote_trial, task, source, p, pure=False) for p in trial_params]
    best: tuple[float, lgb.Booster, TrainingParams, dict[str, float]] | None = None
    trials: list[Trial] = []
    for index, (future, candidate, chosen) in enumerate(
            zip(futures, candidates, trial_params, strict=True)):
        booster, trial, worker = future.result()
        trials.append(trial)
        metrics = trial.valid_metrics
        log(f"trial {index + 1}/{len(candidates)} {candidate} on {worker}: valid {primary}="
            f"{metrics[primary]:.4f} ({trial.best_iteration} rounds, {trial.seconds:.1f}s)")
        score = trial_score(task, metrics)
        if best is None or (np.isfinite(score) and score > best[0]):
            best = (score, booster, chosen, metrics)
    assert best is not None
    _, booster, chosen, metrics = best
    return TrainedModel(booster=booster, params=chosen, best_iteration=booster.best_iteration,
                        valid_metrics=metrics, trials=trials,
                        seconds=time.perf_counter() - started, trained_on=TRAINED_ON)


def _single(client: Client, task: str, X: da.Array, y: da.Array, valid: SplitData,
            feature_names: list[str], categorical: list[str], classes: list[str] | None,
            params: TrainingParams, log: Callable[[str], None]) -> TrainedModel:
    started = time.perf_counter()
    booster = fit_data_parallel(client, task, X, y, valid, feature_names, categorical, classes,
                                params)
    metrics = compute_metrics(task, valid.y, predict(booster, valid.X, task))
    seconds = time.perf_counter() - started
    log(f"trained on {worker_count(client)} Dask workers: {booster.best_iteration} rounds, "
        f"{seconds:.1f}s")
    return TrainedModel(booster=booster, params=params, best_iteration=booster.best_iteration,
                        valid_metrics=metrics, trials=[], seconds=seconds, trained_on=TRAINED_ON)


def train_distributed(client: Client, task: str, data: ModelData, params: TrainingParams,
                      log: Callable[[str], None] = print) -> TrainedModel:
    """`trainer.train` on the cluster behind `client`, from the driver's arrays."""
    valid = data.splits["valid"]
    if search_candidates(params):
        return _search(client, task, data, valid, params, log)
    X, y = scatter_arrays(client, data.splits["train"].X, data.splits["train"].y)
    return _single(client, task, X, y, valid, data.feature_names, data.categorical, data.classes,
                   params, log)


def train_from_parquet(client: Client, task: str, url: str, params: TrainingParams,
                       log: Callable[[str], None] = print) -> TrainedModel:
    """`trainer.train` on the cluster from matrices exported under `url`: the workers read the
    train parts themselves; the driver reads only the validation split."""
    meta = export.read_model_data_meta(url)
    valid = export.read_split(url, "valid", meta)
    if search_candidates(params):
        return _search(client, task, url, valid, params, log)
    X, y = parquet_arrays(client, url, "train", meta)
    return _single(client, task, X, y, valid, meta["feature_names"], meta["categorical"],
                   meta["classes"], params, log)
