"""Drift statistics against scipy and hand-computed values on known distributions, and the
statuses a user would see: stable windows pass, shifted ones warn or fail."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from ml_lifecycle.monitoring.drift import (
    EPSILON,
    categorical_drift,
    drift_report,
    numeric_drift,
)
from ml_lifecycle.monitoring.profile import (
    bin_counts,
    build_profile,
    categorical_profile,
    numeric_profile,
)

THRESHOLDS = {"psi": (0.1, 0.25), "ks": (0.1, 0.2), "js": (0.1, 0.2), "drifted_share": (0.2, 0.4)}
N = 200_000


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def hand_profile(edges: list[float], counts: list[int], null_rate: float = 0.0) -> dict:
    return {
        "kind": "numeric",
        "rows": sum(counts),
        "null_rate": null_rate,
        "edges": edges,
        "counts": counts,
        "mean": 0.0,
    }


def binned_shares(profile: dict, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(profile["counts"], dtype=float)
    index = np.searchsorted(np.asarray(profile["edges"]), values, side="left")
    current = np.bincount(index, minlength=reference.size).astype(float)
    return reference / reference.sum(), current / current.sum()


# --- binning and the profile -------------------------------------------------------------------


def test_bin_counts_matches_searchsorted_including_values_on_edges(rng):
    edges = np.array([-1.0, 0.0, 0.5, 2.0])
    values = np.concatenate([rng.normal(size=10_000), edges, edges, [-5.0, 9.0]])
    expected = np.bincount(np.searchsorted(edges, values, side="left"), minlength=5)
    assert bin_counts(edges, values).tolist() == expected.tolist()
    many_edges = np.linspace(-3, 3, 99)  # the searchsorted branch
    expected = np.bincount(np.searchsorted(many_edges, values, side="left"), minlength=100)
    assert bin_counts(many_edges, values).tolist() == expected.tolist()


def test_numeric_profile_has_20_quantile_bins_and_treats_nan_and_inf_as_null(rng):
    values = rng.normal(size=N)
    values[:1000] = np.nan
    values[1000:1500] = np.inf
    profile = numeric_profile(values)
    assert len(profile["edges"]) == 19 and len(profile["counts"]) == 20
    assert sum(profile["counts"]) == N - 1500
    assert profile["null_rate"] == pytest.approx(1500 / N)
    assert max(profile["counts"]) / sum(profile["counts"]) == pytest.approx(0.05, abs=1e-3)
    json.dumps(profile, allow_nan=False)


def test_categorical_profile_folds_levels_beyond_the_top_100_into_other(rng):
    codes = np.concatenate([np.repeat(np.arange(120), np.arange(120, 0, -1)), [np.nan] * 10])
    profile = categorical_profile(codes, [f"L{i}" for i in range(120)])
    assert len(profile["counts"]) == 101
    assert profile["counts"]["L0"] == 120
    assert profile["counts"]["(other)"] == sum(range(1, 21))  # levels 100..119
    assert profile["null_rate"] == pytest.approx(10 / codes.size)


# --- numeric statistics ------------------------------------------------------------------------


def test_psi_equals_the_hand_computed_value():
    profile = hand_profile([0.0, 1.0], [25, 50, 25])
    # 0.0 sits on the first edge and so falls in (-inf, 0]: shares 0.1, 0.6, 0.3.
    current = np.array([-1.0] * 5 + [0.0] * 5 + [0.5] * 60 + [2.0] * 30)
    expected = (
        (0.1 - 0.25) * math.log(0.1 / 0.25)
        + (0.6 - 0.5) * math.log(0.6 / 0.5)
        + (0.3 - 0.25) * math.log(0.3 / 0.25)
    )
    assert numeric_drift(profile, current)["psi"] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.1648, abs=1e-4)


def test_psi_floors_an_empty_bin_at_epsilon():
    profile = hand_profile([0.0, 1.0], [25, 50, 25])
    current = np.array([0.5] * 50 + [2.0] * 50)  # the first bin empties
    expected = (
        (EPSILON - 0.25) * math.log(EPSILON / 0.25) + 0.0 + (0.5 - 0.25) * math.log(0.5 / 0.25)
    )
    assert numeric_drift(profile, current)["psi"] == pytest.approx(expected, rel=1e-12)


def test_binned_ks_is_ks_2samp_of_the_binned_samples(rng):
    reference = rng.gamma(2.0, size=N)
    current = rng.gamma(2.3, size=N)
    profile = numeric_profile(reference)
    edges = np.asarray(profile["edges"])
    expected = stats.ks_2samp(
        np.searchsorted(edges, reference, side="left"), np.searchsorted(edges, current, side="left")
    ).statistic
    assert numeric_drift(profile, current)["ks"] == pytest.approx(expected, abs=1e-12)


def test_ks_equals_raw_ks_2samp_when_the_data_only_takes_the_edge_values(rng):
    # A distribution whose CDF is constant between the edges: binned KS = raw-sample KS exactly.
    support = np.arange(10.0)
    reference = rng.choice(support, size=N, p=np.full(10, 0.1))
    current = rng.choice(
        support, size=N, p=np.linspace(0.05, 0.15, 10) / np.linspace(0.05, 0.15, 10).sum()
    )
    edges = support[:-1]
    profile = hand_profile(edges.tolist(), bin_counts(edges, reference).tolist())
    expected = stats.ks_2samp(reference, current).statistic
    assert numeric_drift(profile, current)["ks"] == pytest.approx(expected, abs=1e-12)


def test_binned_ks_is_a_close_lower_bound_of_the_raw_ks_with_20_bins(rng):
    reference = rng.normal(size=N)
    profile = numeric_profile(reference)
    for shift in (0.1, 0.5, 1.0):
        current = rng.normal(shift, 1.0, size=N)
        raw = stats.ks_2samp(reference, current).statistic
        binned = numeric_drift(profile, current)["ks"]
        assert binned <= raw + 1e-12
        assert raw - binned < 0.005, (shift, raw, binned)


def test_js_hellinger_and_total_variation_over_the_bins(rng):
    reference = rng.lognormal(size=N)
    current = rng.lognormal(0.2, 1.1, size=N)
    profile = numeric_profile(reference)
    p, q = binned_shares(profile, current)
    result = numeric_drift(profile, current)
    assert result["js"] == pytest.approx(jensenshannon(p, q, base=2), rel=1e-9)
    assert result["hellinger"] == pytest.approx(
        np.sqrt(np.sum((np.sqrt(p) - np.sqrt(q)) ** 2) / 2), rel=1e-9
    )
    assert result["hellinger"] == pytest.approx(np.sqrt(1 - np.sum(np.sqrt(p * q))), rel=1e-6)
    assert result["total_variation"] == pytest.approx(np.abs(p - q).sum() / 2, rel=1e-9)
    assert result["mean_current"] == pytest.approx(current.mean())
    assert result["mean_reference"] == pytest.approx(reference.mean())


def test_identical_distributions_show_no_drift(rng):
    reference = rng.normal(size=N)
    profile = numeric_profile(reference)
    same = numeric_drift(profile, reference)
    assert same["psi"] == pytest.approx(0, abs=1e-12) and same["ks"] == 0.0
    assert same["js"] == pytest.approx(0, abs=1e-6) and same["total_variation"] == 0.0
    fresh = numeric_drift(profile, rng.normal(size=N))
    assert fresh["psi"] < 0.01 and fresh["ks"] < 0.01 and fresh["js"] < 0.02


def test_a_shifted_normal_crosses_the_thresholds(rng):
    reference = rng.normal(size=N)
    profile = {"features": {"x": numeric_profile(reference)}}
    half = drift_report(profile, {"x": rng.normal(0.5, 1.0, size=N)}, THRESHOLDS)["features"]["x"]
    assert 0.1 < half["psi"] < 0.25 and 0.1 < half["ks"] < 0.2
    assert half["status"] == "warn"
    one = drift_report(profile, {"x": rng.normal(1.0, 1.0, size=N)}, THRESHOLDS)["features"]["x"]
    assert one["psi"] > 0.25 and one["ks"] > 0.2
    assert one["status"] == "error"
    assert any(reason.startswith("psi") for reason in one["reasons"])


def test_injected_nulls_show_as_null_rate_change_not_as_a_shift(rng):
    reference = rng.normal(size=N)
    reference[:2000] = np.nan
    profile = numeric_profile(reference)
    current = rng.normal(size=N)
    current[: N // 10] = np.nan
    result = numeric_drift(profile, current)
    assert result["null_rate_reference"] == pytest.approx(0.01)
    assert result["null_rate_current"] == pytest.approx(0.1)
    assert result["null_rate_change"] == pytest.approx(0.09)
    assert result["psi"] < 0.01
    report = drift_report({"features": {"x": profile}}, {"x": current}, THRESHOLDS)
    assert report["features"]["x"]["status"] == "ok"  # null rate judged only when asked
    report = drift_report(
        {"features": {"x": profile}},
        {"x": current},
        {**THRESHOLDS, "null_rate_change": (0.02, 0.05)},
    )
    assert report["features"]["x"]["status"] == "error"


def test_a_feature_that_goes_entirely_missing_is_at_error(rng):
    profile = {"features": {"x": numeric_profile(rng.normal(size=1000))}}
    report = drift_report(profile, {"x": np.full(500, np.nan)}, THRESHOLDS)
    stats_ = report["features"]["x"]
    assert stats_["status"] == "error" and stats_["psi"] is None
    assert stats_["null_rate_current"] == 1.0
    json.dumps(report, allow_nan=False)


def test_an_old_10_bin_profile_still_works(rng):
    reference = rng.normal(size=N)
    profile = numeric_profile(reference, bins=10)
    assert len(profile["counts"]) == 10
    result = numeric_drift(profile, rng.normal(1.0, 1.0, size=N))
    assert result["psi"] > 0.25 and result["ks"] > 0.2


# --- categorical statistics --------------------------------------------------------------------

CATEGORICAL = {
    "kind": "categorical",
    "rows": 100,
    "null_rate": 0.0,
    "counts": {"a": 50, "b": 30, "c": 20},
}


def test_a_new_level_is_unseen_and_pooled_into_one_bucket():
    values = ["a"] * 40 + ["b"] * 30 + ["d"] * 15 + ["e"] * 5 + [None] * 10
    result = categorical_drift(CATEGORICAL, values)
    assert result["unseen_share"] == pytest.approx(20 / 90)
    assert result["unseen_levels"] == ["d", "e"]
    assert result["null_rate_current"] == pytest.approx(0.1)
    assert result["null_rate_change"] == pytest.approx(0.1)
    assert result["rows"] == 100
    p = np.array([50, 30, 20, 0]) / 100
    q = np.array([40, 30, 0, 20]) / 90
    assert result["js"] == pytest.approx(jensenshannon(p, q, base=2), rel=1e-9)
    assert result["hellinger"] == pytest.approx(
        np.sqrt(np.sum((np.sqrt(p) - np.sqrt(q)) ** 2) / 2), rel=1e-9
    )
    assert result["total_variation"] == pytest.approx(np.abs(p - q).sum() / 2, rel=1e-9)
    pf, qf = np.maximum(p, EPSILON), np.maximum(q, EPSILON)
    assert result["psi"] == pytest.approx(np.sum((qf - pf) * np.log(qf / pf)), rel=1e-9)


def test_a_level_beyond_the_profiled_top_100_is_other_not_unseen():
    codes = np.repeat(np.arange(120), np.arange(120, 0, -1)).astype(float)
    levels = [f"L{i}" for i in range(120)]
    profile = categorical_profile(codes, levels)
    values = [levels[int(code)] for code in codes]  # the same data: L100..L119 are "(other)"
    result = categorical_drift(profile, [*values, "brand-new"])
    assert result["unseen_share"] == 0.0
    assert result["js"] < 0.01


def test_categorical_inputs_of_every_kind_give_the_same_result():
    values = ["a"] * 40 + ["b"] * 30 + ["d"] * 20 + [None] * 10
    expected = categorical_drift(CATEGORICAL, values)
    kinds = [
        np.array(values, dtype=object),
        pl.Series(values, dtype=pl.String),
        pl.Series(values, dtype=pl.Categorical),
        pl.Series(values, dtype=pl.Enum(["a", "b", "c", "d"])),
    ]
    for values_of_kind in kinds:
        assert categorical_drift(CATEGORICAL, values_of_kind) == expected


def test_the_same_level_frequencies_show_no_categorical_drift():
    values = ["a"] * 500 + ["b"] * 300 + ["c"] * 200
    result = categorical_drift(CATEGORICAL, values)
    assert result["js"] == pytest.approx(0, abs=1e-7) and result["psi"] == pytest.approx(0)
    assert result["unseen_share"] == 0.0 and result["unseen_levels"] == []


# --- the report --------------------------------------------------------------------------------


def make_data(
    rng: np.random.Generator, rows: int, shifted: int = 0, level_shift: bool = False
) -> np.ndarray:
    """10 numeric and 2 categorical features; the first `shifted` numerics move by +1 sd."""
    numeric = rng.normal(size=(rows, 10))
    numeric[:, :shifted] += 1.0
    p = [0.1, 0.2, 0.7] if level_shift else [0.5, 0.3, 0.2]
    cats = np.column_stack([rng.choice(3, size=rows, p=p), rng.choice(4, size=rows)])
    return np.column_stack([numeric, cats]).astype(float)


NAMES = [f"x{i}" for i in range(10)] + ["colour", "size"]
LEVELS = {"colour": ["red", "green", "blue"], "size": ["S", "M", "L", "XL"]}


def window(X: np.ndarray) -> dict[str, np.ndarray]:
    current = {name: X[:, i] for i, name in enumerate(NAMES[:10])}
    for i, name in enumerate(NAMES[10:], start=10):
        current[name] = np.array(LEVELS[name], dtype=object)[X[:, i].astype(int)]
    return current


@pytest.fixture
def reference_profile(rng) -> dict:
    X = make_data(rng, N)
    score = 1 / (1 + np.exp(-X[:, 0]))
    return build_profile(X, NAMES, ["colour", "size"], score, LEVELS)


def test_a_stable_window_is_ok(rng, reference_profile):
    X = make_data(rng, 50_000)
    report = drift_report(reference_profile, window(X), THRESHOLDS, 1 / (1 + np.exp(-X[:, 0])))
    assert report["status"] == "ok", report["reasons"]
    assert report["drifted_share"] == 0.0 and report["warn_share"] == 0.0
    assert report["prediction"]["status"] == "ok"
    assert {stats_["status"] for stats_ in report["features"].values()} == {"ok"}
    assert report["rows"] == 50_000
    json.dumps(report, allow_nan=False)


def test_one_drifted_feature_warns_and_many_fail(rng, reference_profile):
    X = make_data(rng, 50_000, shifted=1)
    report = drift_report(reference_profile, window(X), THRESHOLDS)
    assert report["drifted_features"] == ["x0"]
    assert report["drifted_share"] == pytest.approx(1 / 12)
    assert report["status"] == "warn"
    assert report["prediction"] is None

    X = make_data(rng, 50_000, shifted=4, level_shift=True)
    report = drift_report(reference_profile, window(X), THRESHOLDS)
    assert report["drifted_features"] == ["x0", "x1", "x2", "x3", "colour"]
    assert report["features"]["colour"]["js"] > 0.2
    assert report["features"]["size"]["status"] == "ok"
    assert report["drifted_share"] == pytest.approx(5 / 12)
    assert report["status"] == "error"
    assert "5/12 features drifted" in report["reasons"][0]
    json.dumps(report, allow_nan=False)


def test_prediction_drift_alone_fails_the_window(rng, reference_profile):
    X = make_data(rng, 50_000)
    report = drift_report(
        reference_profile, window(X), THRESHOLDS, 1 / (1 + np.exp(-(X[:, 0] + 1.5)))
    )
    assert report["drifted_share"] == 0.0
    assert report["prediction"]["status"] == "error"
    assert report["status"] == "error"


def test_multiclass_prediction_is_compared_as_classes(rng):
    X = rng.normal(size=(N, 1))
    proba = rng.dirichlet([1, 1, 1], size=N)
    profile = build_profile(X, ["x"], [], proba)
    assert profile["prediction"]["kind"] == "categorical"
    same = drift_report(profile, {"x": X[:, 0]}, THRESHOLDS, rng.dirichlet([1, 1, 1], size=N))
    assert same["prediction"]["status"] == "ok"
    skewed = drift_report(profile, {"x": X[:, 0]}, THRESHOLDS, rng.dirichlet([8, 1, 1], size=N))
    assert skewed["prediction"]["status"] == "error"


def test_bad_input_is_refused_with_what_was_expected(rng, reference_profile):
    X = make_data(rng, 100)
    current = window(X)
    del current["x3"]
    with pytest.raises(ValueError, match=r"x3"):
        drift_report(reference_profile, current, THRESHOLDS)
    with pytest.raises(ValueError, match="unknown key 'kl'"):
        drift_report(reference_profile, window(X), {"kl": (0.1, 0.2)})
    with pytest.raises(ValueError, match=r"warn bound 0\.3 is above"):
        drift_report(reference_profile, window(X), {"psi": (0.3, 0.2)})
    with pytest.raises(ValueError, match="expected a categorical profile"):
        categorical_drift(reference_profile["features"]["x0"], ["a"])
