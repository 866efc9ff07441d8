"""Drift of a window of served data against a model version's reference profile: effect sizes per
feature and for the prediction, and an ok|warn|error status, from the stored profile alone.

Pure functions (no Dagster, no training data): the `drift_metrics` asset, the benchmark and the
tests call them. Effect sizes decide, never p-values: at a million rows every trivial shift is
"significant", while PSI, KS D and the Jensen-Shannon distance keep their meaning at any size.

Distances over bins (numeric: the profile's quantile bins; categorical: the profile's levels plus
one "unseen" bucket) with p = reference shares and q = current shares of the non-null values:

* ``psi`` = sum((q - p) * ln(q / p)), natural log (the scale of the usual 0.1 / 0.25 rule of
  thumb). An empty bin counts as a share of ``EPSILON`` = 1e-4 on either side, so a bin that
  empties or appears adds a large but finite term (a 5 % bin emptying adds ~0.31);
* ``js``: Jensen-Shannon *distance* (the square root of the divergence), base 2, in [0, 1], as
  ``scipy.spatial.distance.jensenshannon(p, q, base=2)``;
* ``hellinger`` = sqrt(sum((sqrt p - sqrt q)^2) / 2) and ``total_variation`` = sum|p - q| / 2,
  both in [0, 1] (the two distances MLRun reports);
* ``ks`` (numeric only): see `numeric_drift`.

Null rates are reported apart from the distributions (the shares above are of non-null values):
``null_rate_change`` = current - reference, signed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from ml_lifecycle.monitoring.profile import OTHER, bin_counts

EPSILON = 1e-4
STATUSES = ("ok", "warn", "error")
# (warn, error) bounds; the same defaults as the dataset spec's `thresholds.drift`.
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {
    "psi": (0.1, 0.25),
    "ks": (0.1, 0.2),
    "js": (0.1, 0.2),
    "drifted_share": (0.2, 0.4),
}
# Judged only when given: |null_rate_change| against (warn, error).
OPTIONAL_THRESHOLDS = ("null_rate_change",)
# Which statistics decide a status, per kind of column.
JUDGED_BY = {"numeric": ("psi", "ks"), "categorical": ("js", "psi")}
UNSEEN_LEVELS_SHOWN = 10


def _number(value: Any) -> float | None:
    """A JSON-safe float: None for missing, NaN or infinite values."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _bin_distances(reference: np.ndarray, current: np.ndarray) -> dict[str, float]:
    """PSI, Jensen-Shannon distance, Hellinger and total variation between two count vectors."""
    p = reference / reference.sum()
    q = current / current.sum()
    p_floor, q_floor = np.maximum(p, EPSILON), np.maximum(q, EPSILON)
    psi = np.sum((q_floor - p_floor) * np.log(q_floor / p_floor))
    m = (p + q) / 2
    divergence = 0.0
    for shares in (p, q):
        present = shares > 0  # 0 * log(0) = 0; where shares > 0, m > 0 too
        divergence += 0.5 * np.sum(shares[present] * np.log2(shares[present] / m[present]))
    hellinger = np.sqrt(0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2))
    return {
        "psi": float(psi),
        "js": float(np.sqrt(max(divergence, 0.0))),
        "hellinger": float(hellinger),
        "total_variation": float(0.5 * np.sum(np.abs(p - q))),
    }


def _null_rates(reference: float | None, current: float | None) -> dict[str, float | None]:
    change = None if reference is None or current is None else current - reference
    return {
        "null_rate_reference": _number(reference),
        "null_rate_current": _number(current),
        "null_rate_change": _number(change),
    }


def numeric_drift(profile: Mapping[str, Any], values: np.ndarray) -> dict[str, Any]:
    """Drift of the numeric ``values`` of a window (NaN/inf = null) from a numeric profile.

    ``ks`` is the Kolmogorov-Smirnov D between the reference CDF given by the profile's bin counts
    and the window's empirical CDF, both evaluated at the profile's edges: exactly the KS D of the
    two binned samples (equal to ``scipy.stats.ks_2samp`` on the bin indices). It is a lower bound
    of the raw-sample KS D, and between two edges neither CDF moves by more than its share of that
    bin, so raw D <= binned D + the largest bin share (~0.05 with the profile's 20 quantile
    bins), a worst case reached only when the whole change hides inside one bin. In practice the
    gap is far smaller: on 1M rows vs 1M rows of a standard normal, 0.0002 for a +0.5 sd shift
    (0.1966 binned, 0.1968 raw), 0.0005 for a 1.5x scale, 0.003 for a lognormal; the tests bound
    it by 0.005 for shifted normals.
    """
    if profile.get("kind") != "numeric":
        raise ValueError(
            f"numeric_drift: expected a numeric profile, found kind {profile.get('kind')!r}"
        )
    values = np.ascontiguousarray(values, dtype=np.float64)  # a strided column is slow to scan
    if values.ndim != 1:
        raise ValueError(f"numeric_drift: expected 1-D values, found shape {values.shape}")
    rows = int(values.size)
    finite_mask = np.isfinite(values)
    present = int(np.count_nonzero(finite_mask))
    finite = values if present == rows else values[finite_mask]
    reference = np.asarray(profile.get("counts", []), dtype=np.int64)
    result: dict[str, Any] = {
        "kind": "numeric",
        "rows": rows,
        "psi": None,
        "ks": None,
        "js": None,
        "hellinger": None,
        "total_variation": None,
        **_null_rates(profile.get("null_rate"), 1 - present / rows if rows else None),
        "mean_reference": _number(profile.get("mean")),
        "mean_current": _number(finite.mean()) if present else None,
    }
    if reference.sum() == 0 or present == 0:
        return result
    edges = np.asarray(profile["edges"], dtype=np.float64)
    if reference.size != edges.size + 1:
        raise ValueError(
            f"numeric_drift: profile has {edges.size} edges and {reference.size} "
            f"counts, expected {edges.size + 1} counts"
        )
    current = bin_counts(edges, finite)
    result.update(_bin_distances(reference, current))
    reference_cdf = np.cumsum(reference)[:-1] / reference.sum()
    current_cdf = np.cumsum(current)[:-1] / present
    result["ks"] = float(np.max(np.abs(reference_cdf - current_cdf))) if edges.size else 0.0
    return result


def _level_counts(values: Sequence[Any] | np.ndarray | pl.Series) -> tuple[dict[str, int], int]:
    """Non-null level -> count, and the number of rows, of a column of strings (None/NaN = null).

    A polars Series (String, Categorical or Enum) is counted natively; anything else goes through
    a Counter over Python objects: exact, but an order of magnitude slower.
    """
    if isinstance(values, pl.Series) and isinstance(values.dtype, pl.Enum):
        # An Enum's physical codes index its fixed category list: a bincount, no hashing.
        categories = values.dtype.categories.to_list()
        codes = values.to_physical().fill_null(len(categories)).to_numpy()
        counts = np.bincount(codes, minlength=len(categories) + 1)[: len(categories)]
        present = np.flatnonzero(counts)
        return {categories[i]: int(counts[i]) for i in present}, len(values)
    if isinstance(values, pl.Series):
        counted = values.rename("level").drop_nulls().value_counts()
        levels = counted["level"].cast(pl.String).to_list()
        return dict(zip(levels, counted["count"].to_list(), strict=True)), len(values)
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"categorical_drift: expected 1-D values, found shape {values.shape}")
        values = values.tolist()
    counts: dict[str, int] = {}
    rows = 0
    for level, count in Counter(values).items():
        rows += count
        if level is None or (isinstance(level, float) and not math.isfinite(level)):
            continue
        key = level if isinstance(level, str) else str(level)
        counts[key] = counts.get(key, 0) + count
    return counts, rows


def categorical_drift(
    profile: Mapping[str, Any], values: Sequence[Any] | np.ndarray | pl.Series
) -> dict[str, Any]:
    """Drift of the category ``values`` (strings, None = null) of a window from a categorical
    profile.

    A current level the profile does not list goes to the profile's ``"(other)"`` bucket when it
    has one (the profile folded levels beyond its top 100 there, so the level may well have been
    seen in training); only without that bucket is it unseen. Unseen levels are pooled into one
    extra bin for the distances, and ``unseen_share`` is their share of the non-null values.
    """
    if profile.get("kind") != "categorical":
        raise ValueError(
            f"categorical_drift: expected a categorical profile, found kind {profile.get('kind')!r}"
        )
    counts, rows = _level_counts(values)
    reference_counts: Mapping[str, int] = profile.get("counts", {})
    index = {level: i for i, level in enumerate(reference_counts)}
    unseen_bin = len(index)
    reference = np.array([*reference_counts.values(), 0], dtype=np.int64)
    current = np.zeros(unseen_bin + 1, dtype=np.int64)
    unseen: dict[str, int] = {}
    for level, count in counts.items():
        position = index.get(level, index.get(OTHER, unseen_bin))
        current[position] += count
        if position == unseen_bin:
            unseen[level] = count
    present = int(current.sum())
    result: dict[str, Any] = {
        "kind": "categorical",
        "rows": rows,
        "psi": None,
        "js": None,
        "hellinger": None,
        "total_variation": None,
        "unseen_share": _number(current[unseen_bin] / present) if present else None,
        "unseen_levels": sorted(unseen, key=lambda level: -unseen[level])[:UNSEEN_LEVELS_SHOWN],
        **_null_rates(profile.get("null_rate"), 1 - present / rows if rows else None),
    }
    if reference.sum() and present:
        result.update(_bin_distances(reference, current))
    return result


def _normalise_thresholds(
    thresholds: Mapping[str, Sequence[float]] | None,
) -> dict[str, tuple[float, float]]:
    limits = dict(DEFAULT_THRESHOLDS)
    for key, bounds in (thresholds or {}).items():
        if key not in DEFAULT_THRESHOLDS and key not in OPTIONAL_THRESHOLDS:
            raise ValueError(
                f"drift thresholds: unknown key {key!r}; expected some of "
                f"{[*DEFAULT_THRESHOLDS, *OPTIONAL_THRESHOLDS]}"
            )
        try:
            warn, error = (float(bound) for bound in bounds)
        except (TypeError, ValueError):
            raise ValueError(
                f"drift thresholds: {key} must be (warn, error), found {bounds!r}"
            ) from None
        if warn > error:
            raise ValueError(
                f"drift thresholds: {key} warn bound {warn} is above its error bound {error}"
            )
        limits[key] = (warn, error)
    return limits


def _level(value: float | None, bounds: tuple[float, float]) -> str:
    if value is None:
        return "ok"
    return "error" if value > bounds[1] else "warn" if value > bounds[0] else "ok"


def _worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=STATUSES.index, default="ok")


def _judge(stats: dict[str, Any], limits: dict[str, tuple[float, float]]) -> None:
    """Set ``status`` (worst over the judged statistics) and ``reasons`` on a column's stats."""
    reasons = []
    statuses = ["ok"]
    judged = {key: stats[key] for key in JUDGED_BY[stats["kind"]]}
    if "null_rate_change" in limits and stats["null_rate_change"] is not None:
        judged["null_rate_change"] = abs(stats["null_rate_change"])
    for key, value in judged.items():
        status = _level(value, limits[key])
        if status != "ok":
            bound = limits[key][STATUSES.index(status) - 1]
            reasons.append(f"{key} {value:.3f} > {bound:g}")
        statuses.append(status)
    # Not comparable when one side has no non-null values: a feature that went entirely missing
    # (or appeared where training had none) is the largest drift there is.
    one_sided = (stats["null_rate_current"] == 1.0) != (stats["null_rate_reference"] == 1.0)
    if stats["psi"] is None and stats["rows"] and one_sided:
        reasons.append(
            f"null rate {stats['null_rate_reference']:g} -> {stats['null_rate_current']:g}"
        )
        statuses.append("error")
    stats["status"] = _worst(statuses)
    stats["reasons"] = reasons


def _column_drift(profile: Mapping[str, Any], values: Any) -> dict[str, Any]:
    kind = profile.get("kind")
    if kind == "numeric":
        return numeric_drift(profile, values)
    if kind == "categorical":
        return categorical_drift(profile, values)
    raise ValueError(f"drift: profile kind must be 'numeric' or 'categorical', found {kind!r}")


def _prediction_values(profile: Mapping[str, Any], prediction: np.ndarray) -> Any:
    if profile.get("kind") != "categorical":
        return prediction
    # Multiclass: the profile counts the predicted class as str(class index).
    prediction = np.asarray(prediction)
    classes = prediction.argmax(axis=1) if prediction.ndim == 2 else prediction
    return pl.Series(np.asarray(classes, dtype=np.int64)).cast(pl.String)


def drift_report(
    profile: Mapping[str, Any],
    current: Mapping[str, Any],
    thresholds: Mapping[str, Sequence[float]] | None = None,
    prediction: np.ndarray | None = None,
) -> dict[str, Any]:
    """Drift of a window (``current``: feature -> values) against a `build_profile` output.

    Each feature gets its statistics, a ``status`` and the ``reasons`` for it: numeric features are
    judged by the worse of PSI and KS D, categorical ones by the worse of JS and PSI, each against
    its (warn, error) bounds (exceeding a bound, ``>``, reaches that level); ``null_rate_change``
    joins only when its bounds are given. A feature with values on one side only is at error.

    ``drifted_share`` is the share of features at error (drifted); ``warn_share`` the share at warn
    or worse. The overall ``status`` is:

    * error: ``drifted_share`` > the drifted_share error bound, or the prediction at error;
    * warn: otherwise, any feature or the prediction at error, or ``warn_share`` > the
      drifted_share warn bound;
    * ok: otherwise.

    ``prediction`` (the window's predictions: scores, or class probabilities for multiclass) is
    compared with the profile's prediction profile like a feature. Everything returned is
    JSON-safe (undefined statistics are None).
    """
    limits = _normalise_thresholds(thresholds)
    feature_profiles = profile.get("features")
    if not isinstance(feature_profiles, Mapping):
        raise ValueError(
            "drift_report: profile has no 'features' mapping; expected the output of build_profile"
        )
    missing = [name for name in feature_profiles if name not in current]
    if missing:
        raise ValueError(
            f"drift_report: no current values for profiled feature(s) {missing}; "
            f"found {sorted(current)}"
        )
    features: dict[str, dict[str, Any]] = {}
    for name, feature_profile in feature_profiles.items():
        stats = _column_drift(feature_profile, current[name])
        _judge(stats, limits)
        features[name] = stats

    predicted = None
    prediction_profile = profile.get("prediction")
    if prediction is not None and prediction_profile:
        predicted = _column_drift(
            prediction_profile, _prediction_values(prediction_profile, prediction)
        )
        _judge(predicted, limits)

    total = len(features)
    at_error = [name for name, stats in features.items() if stats["status"] == "error"]
    at_warn = [name for name, stats in features.items() if stats["status"] == "warn"]
    drifted_share = len(at_error) / total if total else 0.0
    warn_share = (len(at_error) + len(at_warn)) / total if total else 0.0
    share_warn, share_error = limits["drifted_share"]
    prediction_status = predicted["status"] if predicted else "ok"

    reasons = []
    if drifted_share > share_error:
        reasons.append(
            f"{len(at_error)}/{total} features drifted (error): share "
            f"{drifted_share:.2f} > {share_error:g}"
        )
        status = "error"
    elif at_error:
        reasons.append(f"{len(at_error)}/{total} features drifted (error): {at_error}")
        status = "warn"
    elif warn_share > share_warn:
        reasons.append(
            f"{len(at_warn)}/{total} features at warn: share {warn_share:.2f} > {share_warn:g}"
        )
        status = "warn"
    else:
        status = "ok"
    if prediction_status != "ok":
        reasons.append(
            f"prediction drift at {prediction_status} ({', '.join(predicted['reasons'])})"
        )
        status = _worst([status, prediction_status])

    rows = next(
        (stats["rows"] for stats in features.values()), predicted["rows"] if predicted else 0
    )
    return {
        "status": status,
        "reasons": reasons,
        "rows": rows,
        "features": features,
        "drifted_share": drifted_share,
        "warn_share": warn_share,
        "drifted_features": at_error,
        "warn_features": at_warn,
        "prediction": predicted,
        "thresholds": {key: list(bounds) for key, bounds in limits.items()},
    }
