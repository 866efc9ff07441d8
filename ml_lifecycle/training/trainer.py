"""LightGBM training with early stopping on the validation split, and the optional search."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_lifecycle.training.dataset import ModelData
from ml_lifecycle.training.metrics import HIGHER_IS_BETTER, PRIMARY, compute_metrics
from ml_lifecycle.training.params import TrainingParams, search_candidates

if TYPE_CHECKING:
    import lightgbm as lgb

_OBJECTIVES = {
    "binary": {"objective": "binary", "metric": "binary_logloss"},
    "regression": {"objective": "regression", "metric": "l2"},
    "multiclass": {"objective": "multiclass", "metric": "multi_logloss"},
}


@dataclass
class Trial:
    params: dict[str, Any]
    best_iteration: int
    valid_metrics: dict[str, float]
    seconds: float


@dataclass
class TrainedModel:
    booster: lgb.Booster
    params: TrainingParams
    best_iteration: int
    valid_metrics: dict[str, float]
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    trained_on: str = "in_process"  # or "dask" (ml_lifecycle.training.distributed)


def lightgbm_params(task: str, params: TrainingParams, num_class: int | None) -> dict[str, Any]:
    out = {**_OBJECTIVES[task], **params.lightgbm.model_dump(), "seed": params.seed,
           "verbosity": -1, "deterministic": True, "force_col_wise": True}
    if task == "multiclass":
        out["num_class"] = num_class
    return out


def predict(booster: lgb.Booster, X: np.ndarray, task: str) -> np.ndarray:
    """P(class 1) for binary, an (n, k) matrix for multiclass, values for regression."""
    out = booster.predict(X, num_iteration=booster.best_iteration or None)
    return np.asarray(out)


def _fit(task: str, data: ModelData, params: TrainingParams) -> tuple[lgb.Booster, float]:
    import lightgbm as lgb  # imported on use: it pulls in scikit-learn when installed

    started = time.perf_counter()
    num_class = len(data.classes) if data.classes else None
    train, valid = data.splits["train"], data.splits["valid"]
    train_set = lgb.Dataset(train.X, label=train.y, feature_name=data.feature_names,
                            categorical_feature=data.categorical, free_raw_data=True)
    valid_set = lgb.Dataset(valid.X, label=valid.y, reference=train_set)
    booster = lgb.train(
        lightgbm_params(task, params, num_class),
        train_set,
        num_boost_round=params.num_boost_round,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
    )
    return booster, time.perf_counter() - started


def fit_trial(task: str, data: ModelData, params: TrainingParams) -> tuple[lgb.Booster, Trial]:
    """One fit with early stopping, scored on the validation split."""
    booster, seconds = _fit(task, data, params)
    valid = data.splits["valid"]
    metrics = compute_metrics(task, valid.y, predict(booster, valid.X, task))
    return booster, Trial(params=params.lightgbm.model_dump(),
                          best_iteration=booster.best_iteration, valid_metrics=metrics,
                          seconds=seconds)


def trial_score(task: str, metrics: dict[str, float]) -> float:
    """The task's primary validation metric, oriented so that higher is better."""
    primary = PRIMARY[task]
    return metrics[primary] if HIGHER_IS_BETTER[primary] else -metrics[primary]


def train(task: str, data: ModelData, params: TrainingParams, log=print) -> TrainedModel:
    """Train once, or run the search first and retrain-free keep the best trial's booster."""
    started = time.perf_counter()
    primary = PRIMARY[task]
    trials: list[Trial] = []
    best: tuple[float, lgb.Booster, TrainingParams, dict[str, float]] | None = None
    candidates = search_candidates(params)
    for index, overrides in enumerate(candidates or [{}]):
        trial_params = params.with_lightgbm(**overrides) if overrides else params
        booster, trial = fit_trial(task, data, trial_params)
        metrics = trial.valid_metrics
        trials.append(trial)
        if candidates:
            log(f"trial {index + 1}/{len(candidates)} {overrides}: valid {primary}="
                f"{metrics[primary]:.4f} ({booster.best_iteration} rounds, {trial.seconds:.1f}s)")
        score = trial_score(task, metrics)
        if best is None or (np.isfinite(score) and score > best[0]):
            best = (score, booster, trial_params, metrics)
    assert best is not None
    _, booster, chosen, metrics = best
    return TrainedModel(
        booster=booster,
        params=chosen,
        best_iteration=booster.best_iteration,
        valid_metrics=metrics,
        trials=trials if candidates else [],
        seconds=time.perf_counter() - started,
    )


def gain_importance(booster: lgb.Booster) -> dict[str, float]:
    gains = booster.feature_importance(importance_type="gain")
    total = float(np.sum(gains)) or 1.0
    pairs = sorted(zip(booster.feature_name(), gains, strict=True), key=lambda p: -p[1])
    return {name: float(gain) / total for name, gain in pairs}
