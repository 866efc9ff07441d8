"""Evaluation metrics, naive baselines, per-slice metrics and curves, in plain numpy/scipy.

Training, the promotion gate, the evaluation report and the benchmarks all score models with
these functions, so a metric has one definition everywhere. A metric that is undefined on the
data (AUC with one class, R² of a constant target, anything on zero rows) is NaN, not an error:
a report must still be written when a split or a slice is degenerate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

METRICS: dict[str, list[str]] = {
    "binary": ["roc_auc", "pr_auc", "log_loss", "brier", "accuracy"],
    "regression": ["rmse", "mae", "r2"],
    "multiclass": ["accuracy", "macro_f1", "log_loss"],
}
PRIMARY: dict[str, str] = {"binary": "roc_auc", "regression": "rmse", "multiclass": "log_loss"}
HIGHER_IS_BETTER: dict[str, bool] = {
    "roc_auc": True,
    "pr_auc": True,
    "log_loss": False,
    "brier": False,
    "accuracy": True,
    "rmse": False,
    "mae": False,
    "r2": True,
    "macro_f1": True,
}

PROBABILITY_CLIP = 1e-15
OTHER_SLICE = "(other)"
MISSING_SLICE = "(missing)"

NAN = float("nan")


# -- input checks ---------------------------------------------------------------------------


def _check_task(task: str) -> None:
    if task not in METRICS:
        raise ValueError(f"task must be one of {sorted(METRICS)}; found {task!r}")


def _binary_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of 0/1 labels; found shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.float64)
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(
            f"{name} of a binary task must hold 0/1 labels; found {np.unique(y[bad])[:5].tolist()}"
        )
    return y.astype(np.float64)


def _class_indices(y_true: Any, num_class: int | None, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of class indices; found shape {y.shape}")
    if y.size == 0:
        return y.astype(np.int64)
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError(f"{name} of a multiclass task must hold integer class indices")
    if y.dtype.kind not in "iuf" and y.dtype != bool:
        raise ValueError(
            f"{name} of a multiclass task must hold integer class indices 0..k-1; "
            f"found dtype {y.dtype}"
        )
    y = y.astype(np.int64)
    upper = num_class if num_class is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= upper:
        raise ValueError(
            f"{name} of a multiclass task must hold class indices in 0..{upper - 1}; "
            f"found values from {int(y.min())} to {int(y.max())}"
        )
    return y


def _vector(values: Any, n: int, name: str = "y_pred") -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like y_true; found {v.shape}")
    return v


# -- binary ---------------------------------------------------------------------------------


def _threshold_counts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when predicting positive at or above each distinct score."""
    order = np.argsort(p)[::-1]  # order within a run of ties does not matter: runs are summed
    p_sorted, y_sorted = p[order], y[order]
    # The last row of each run of equal scores: tied rows cross the threshold together.
    ends = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]
    tps = np.cumsum(y_sorted)[ends]
    fps = (ends + 1) - tps
    return tps, fps, p_sorted[ends]


def _roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    # Mann-Whitney U over average ranks: equal to the trapezoidal area under the ROC curve.
    n_pos = float(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    from scipy.stats import rankdata  # imported here: scipy.stats costs seconds to load

    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(y: np.ndarray, p: np.ndarray) -> float:
    # Step-wise sum of precision over recall increments, no interpolation (sklearn's definition).
    tps, fps, _ = _threshold_counts(y, p)
    if tps[-1] == 0:
        return NAN
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _binary_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def _binary_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    # p > 0.5, not >=: a tie goes to class 0, as argmax over [1 - p, p] does.
    return float(np.mean((p > 0.5) == (y == 1)))


# -- regression -----------------------------------------------------------------------------


def _rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - p) ** 2)))


def _mae(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(y - p)))


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0:
        return NAN
    return float(1 - np.sum((y - p) ** 2) / total)


# -- multiclass -----------------------------------------------------------------------------


def _multiclass_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.argmax(p, axis=1) == y))


def _macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    k = p.shape[1]
    predicted = np.argmax(p, axis=1)
    true_positive = np.bincount(y[predicted == y], minlength=k)
    support = np.bincount(y, minlength=k) + np.bincount(predicted, minlength=k)
    present = support > 0  # classes seen in y_true or in the predictions
    return float(np.mean(2 * true_positive[present] / support[present]))


def _multiclass_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    chosen = np.clip(p[np.arange(len(y)), y], PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)
    return float(-np.mean(np.log(chosen)))


_Metric = Callable[[np.ndarray, np.ndarray], float]
_FUNCTIONS: dict[str, dict[str, _Metric]] = {
    "binary": {
        "roc_auc": _roc_auc,
        "pr_auc": _average_precision,
        "log_loss": _binary_log_loss,
        "brier": _brier,
        "accuracy": _binary_accuracy,
    },
    "regression": {"rmse": _rmse, "mae": _mae, "r2": _r2},
    "multiclass": {
        "accuracy": _multiclass_accuracy,
        "macro_f1": _macro_f1,
        "log_loss": _multiclass_log_loss,
    },
}


def _prepare(task: str, y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    _check_task(task)
    if task == "multiclass":
        p = np.asarray(y_pred, dtype=np.float64)
        n = len(np.asarray(y_true))
        if p.ndim != 2 or p.shape[0] != n:
            raise ValueError(
                f"y_pred of a multiclass task must be an (n, k) probability matrix with n = {n}; "
                f"found shape {p.shape}"
            )
        return _class_indices(y_true, p.shape[1]), p
    y = _binary_labels(y_true) if task == "binary" else np.asarray(y_true, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be a 1-d array; found shape {y.shape}")
    return y, _vector(y_pred, len(y))


def compute_metrics(task: str, y_true: Any, y_pred: Any) -> dict[str, float]:
    """The task's metrics (`METRICS[task]`, in that order) as plain floats; NaN where undefined.

    binary: y_true 0/1, y_pred = P(class 1) of shape (n,); regression: y_pred are predictions;
    multiclass: y_true class indices 0..k-1, y_pred an (n, k) probability matrix.
    """
    y, p = _prepare(task, y_true, y_pred)
    functions = _FUNCTIONS[task]
    if len(y) == 0:
        return {name: NAN for name in functions}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {name: fn(y, p) for name, fn in functions.items()}


def baseline_predictions(
    task: str, y_train: Any, n: int, num_class: int | None = None
) -> np.ndarray:
    """The naive model a real one must beat: the training prevalence, mean or class frequencies.

    Returns shape (n,) for binary and regression, (n, num_class) for multiclass (num_class
    defaults to the largest training class index + 1).
    """
    _check_task(task)
    if len(np.asarray(y_train)) == 0:
        raise ValueError("a baseline needs training labels; y_train is empty")
    if task == "multiclass":
        y = _class_indices(y_train, num_class, name="y_train")
        k = num_class if num_class is not None else int(y.max()) + 1
        frequencies = np.bincount(y, minlength=k) / len(y)
        return np.tile(frequencies, (n, 1))
    y = _binary_labels(y_train, "y_train") if task == "binary" else np.asarray(y_train, float)
    return np.full(n, float(np.mean(y)))


# -- slices ---------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN, NaT
    except (TypeError, ValueError):  # pandas.NA refuses bool()
        return True


def _slice_labels(slice_values: Any) -> np.ndarray:
    values = np.asarray(slice_values)
    if values.dtype.kind == "f":
        labels = values.astype(str).astype(object)
        labels[np.isnan(values)] = MISSING_SLICE
    elif values.dtype.kind in "mM":
        labels = values.astype(str).astype(object)
        labels[np.isnat(values)] = MISSING_SLICE
    elif values.dtype.kind == "O":
        labels = np.array(
            [MISSING_SLICE if _is_missing(v) else str(v) for v in values], dtype=object
        )
    else:
        labels = values.astype(str).astype(object)
    return labels.astype(str)


def slice_metrics(
    task: str, y_true: Any, y_pred: Any, slice_values: Any, min_rows: int = 50
) -> list[dict[str, Any]]:
    """Metrics per distinct value of a categorical column, most frequent first.

    Each row is `{"slice": str(value), "rows": n, "positive_rate" | "mean_target", **metrics}`.
    Values with fewer than `min_rows` rows are pooled into a last `"(other)"` row, so the rows
    always add up to n; missing values (None, NaN, NaT) form the `"(missing)"` slice.
    """
    y, p = _prepare(task, y_true, y_pred)
    labels = _slice_labels(slice_values)
    if labels.shape != (len(y),):
        raise ValueError(
            f"slice_values must have one value per row ({len(y)}); found shape {labels.shape}"
        )
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    # Row indices grouped by slice without one boolean mask per slice (many slices, many rows).
    by_slice = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    order = sorted(range(len(values)), key=lambda i: (-counts[i], values[i]))
    groups = [(str(values[i]), by_slice[i]) for i in order if counts[i] >= min_rows]
    small = [by_slice[i] for i in order if counts[i] < min_rows]
    if small:
        groups.append((OTHER_SLICE, np.sort(np.concatenate(small))))

    rows = []
    for label, index in groups:
        row: dict[str, Any] = {"slice": label, "rows": len(index)}
        if task == "binary":
            row["positive_rate"] = float(np.mean(y[index]))
        elif task == "regression":
            row["mean_target"] = float(np.mean(y[index]))
        row.update(compute_metrics(task, y[index], p[index]))
        rows.append(row)
    return rows


# -- comparison -----------------------------------------------------------------------------


def is_better(
    metric: str, candidate: float | None, reference: float | None, tolerance: float = 0.0
) -> bool:
    """Whether `candidate` is not worse than `reference` by more than `tolerance`.

    The direction comes from `HIGHER_IS_BETTER`. A NaN or None candidate is never better; a NaN
    or None reference (nothing to compare with) is beaten by any real candidate. A negative
    tolerance demands an improvement of at least that much.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(HIGHER_IS_BETTER)}")
    if candidate is None or math.isnan(candidate):
        return False
    if reference is None or math.isnan(reference):
        return True
    if HIGHER_IS_BETTER[metric]:
        return candidate >= reference - tolerance
    return candidate <= reference + tolerance


# -- curves ---------------------------------------------------------------------------------


def _curve_inputs(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = _binary_labels(y, "y")
    return labels, _vector(p, len(labels), "p")


def roc_curve(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score, from (0, 0) to (1, 1).

    NaN where undefined (no positives or no negatives).
    """
    labels, scores = _curve_inputs(y, p)
    if len(labels) == 0:
        return np.zeros(0), np.zeros(0)
    tps, fps, _ = _threshold_counts(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def pr_curve(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score, by increasing recall, starting at (0, 1).

    The area under it drawn as steps (precision held over each recall increment) is `pr_auc`.
    """
    labels, scores = _curve_inputs(y, p)
    if len(labels) == 0:
        return np.zeros(0), np.zeros(0)
    tps, fps, _ = _threshold_counts(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.r_[0.0, tps / tps[-1]], np.r_[1.0, tps / (tps + fps)]


def calibration_curve(
    y: Any,
    p: Any,
    bins: int = 10,
    strategy: Literal["quantile", "uniform"] = "quantile",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram data: (mean predicted, fraction positive, rows) per non-empty bin.

    Bins are quantile bins by default (about equally many rows each, so a rare positive class
    still gets resolution where its predictions are) or `strategy="uniform"` bins over [0, 1].
    Bins are right-closed, like sklearn's `calibration_curve`.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1; found {bins}")
    if strategy not in ("quantile", "uniform"):
        raise ValueError(f"strategy must be 'quantile' or 'uniform'; found {strategy!r}")
    labels, scores = _curve_inputs(y, p)
    if len(labels) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    if strategy == "quantile":
        edges = np.unique(np.quantile(scores, np.linspace(0, 1, bins + 1)))
    else:
        edges = np.linspace(0, 1, bins + 1)
    index = np.searchsorted(edges[1:-1], scores, side="left")
    size = max(len(edges) - 1, 1)
    counts = np.bincount(index, minlength=size)
    predicted = np.bincount(index, weights=scores, minlength=size)
    positive = np.bincount(index, weights=labels, minlength=size)
    keep = counts > 0
    return predicted[keep] / counts[keep], positive[keep] / counts[keep], counts[keep]
