"""The reference profile: the training distribution of each feature and of the prediction,
stored compactly with the model version (quantile bin edges and counts for numbers, level
frequencies for categories, null rates), so drift is computed without re-reading training data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_BINS = 10
MAX_LEVELS = 100


def numeric_profile(values: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    rows = int(values.size)
    profile: dict[str, Any] = {
        "kind": "numeric",
        "rows": rows,
        "null_rate": float(1 - finite.size / rows) if rows else 0.0,
    }
    if finite.size == 0:
        return {**profile, "edges": [], "counts": []}
    # Inner edges at the quantiles; the outer bins are open (-inf, e1] ... (ek, inf).
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=edges.size + 1)
    return {
        **profile,
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


def categorical_profile(codes: np.ndarray, levels: list[str] | None = None) -> dict[str, Any]:
    codes = np.asarray(codes, dtype=np.float64)
    present = codes[np.isfinite(codes)].astype(np.int64)
    rows = int(codes.size)
    values, counts = np.unique(present, return_counts=True)
    order = np.argsort(-counts)[:MAX_LEVELS]
    frequencies = {
        (levels[int(values[i])] if levels and int(values[i]) < len(levels) else str(int(values[i]))):
        int(counts[i]) for i in order
    }
    other = int(counts.sum() - sum(frequencies.values()))
    if other:
        frequencies["(other)"] = other
    return {
        "kind": "categorical",
        "rows": rows,
        "null_rate": float(1 - present.size / rows) if rows else 0.0,
        "counts": frequencies,
    }


def build_profile(
    X: np.ndarray,
    feature_names: list[str],
    categorical: list[str],
    prediction: np.ndarray,
    categories: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Profile of every feature column of X and of the model's prediction on the same rows."""
    categories = categories or {}
    features = {}
    for index, name in enumerate(feature_names):
        column = X[:, index]
        features[name] = (categorical_profile(column, categories.get(name)) if name in categorical
                          else numeric_profile(column))
    prediction = np.asarray(prediction)
    if prediction.ndim == 2:  # multiclass: profile the predicted class
        predicted = {"kind": "categorical", **categorical_profile(prediction.argmax(axis=1))}
    else:
        predicted = numeric_profile(prediction)
    return {"rows": int(X.shape[0]), "features": features, "prediction": predicted}
