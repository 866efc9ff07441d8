"""Evaluation metrics, baselines, slices, the promotion comparison, plots and report files.

Every metric is checked against scikit-learn (a test-only dependency) on random data.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from sklearn import calibration as sk_calibration
from sklearn import metrics as sk

from ml_lifecycle.training.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    PRIMARY,
    baseline_predictions,
    calibration_curve,
    compute_metrics,
    is_better,
    pr_curve,
    roc_curve,
    slice_metrics,
)
from ml_lifecycle.training.report import (
    PNG_SIGNATURE,
    evaluation_plots,
    metrics_markdown,
    plot_png,
    png_markdown,
    write_report,
)

TOLERANCE = 1e-9


def binary_data(seed: int, n: int = 2_000) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores with many ties (scores rounded to 0.05) and some signal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    raw = np.clip(0.25 * y + 0.75 * rng.random(n), 0.02, 0.98)
    return y, np.round(raw * 20) / 20


def multiclass_data(seed: int, n: int = 1_500, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p


# -- metrics against scikit-learn ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn_with_tied_scores(seed: int) -> None:
    y, p = binary_data(seed)
    assert len(np.unique(p)) < 25  # heavy ties: the rank and step definitions must hold

    ours = compute_metrics("binary", y, p)

    assert list(ours) == METRICS["binary"]
    assert all(type(value) is float for value in ours.values())
    expected = {
        "roc_auc": sk.roc_auc_score(y, p),
        "pr_auc": sk.average_precision_score(y, p),
        "log_loss": sk.log_loss(y, p),
        "brier": sk.brier_score_loss(y, p),
        "accuracy": sk.accuracy_score(y, (p > 0.5).astype(int)),
    }
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=TOLERANCE), name


def test_binary_metrics_accept_boolean_labels_and_clip_certain_predictions() -> None:
    y = np.array([True, False, True, False])
    p = np.array([1.0, 0.0, 0.0, 1.0])

    ours = compute_metrics("binary", y, p)

    # Two of four rows are certain mistakes: each costs about -log(1e-15), not infinity.
    assert ours["log_loss"] == pytest.approx(-math.log(1e-15) / 2, rel=1e-4)
    assert ours["accuracy"] == 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_match_sklearn(seed: int) -> None:
    y, p = multiclass_data(seed)

    ours = compute_metrics("multiclass", y, p)

    assert list(ours) == METRICS["multiclass"]
    predicted = p.argmax(axis=1)
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(y, predicted), abs=TOLERANCE)
    assert ours["macro_f1"] == pytest.approx(
        sk.f1_score(y, predicted, average="macro"), abs=TOLERANCE
    )
    assert ours["log_loss"] == pytest.approx(sk.log_loss(y, p, labels=[0, 1, 2]), abs=TOLERANCE)


def test_macro_f1_averages_over_classes_in_labels_or_predictions_only() -> None:
    # Class 3 is a column of y_pred but never true nor predicted: it must not count as F1 = 0.
    # Class 2 is predicted but never true: it counts (F1 = 0), as in sklearn.
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.zeros((6, 4))
    p[np.arange(6), [0, 1, 1, 1, 2, 0]] = 1.0

    ours = compute_metrics("multiclass", y, p)

    assert ours["macro_f1"] == pytest.approx(
        sk.f1_score(y, p.argmax(axis=1), average="macro"), abs=TOLERANCE
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_regression_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.normal(10, 3, 1_000)
    p = y + rng.normal(0, 2, 1_000)

    ours = compute_metrics("regression", y, p)

    assert list(ours) == METRICS["regression"]
    assert ours["rmse"] == pytest.approx(sk.root_mean_squared_error(y, p), abs=TOLERANCE)
    assert ours["mae"] == pytest.approx(sk.mean_absolute_error(y, p), abs=TOLERANCE)
    assert ours["r2"] == pytest.approx(sk.r2_score(y, p), abs=TOLERANCE)


@pytest.mark.parametrize("seed", [0, 3])
def test_curves_match_sklearn_and_their_areas_are_the_metrics(seed: int) -> None:
    y, p = binary_data(seed)

    fpr, tpr = roc_curve(y, p)
    sk_fpr, sk_tpr, _ = sk.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=TOLERANCE)
    np.testing.assert_allclose(tpr, sk_tpr, atol=TOLERANCE)

    recall, precision = pr_curve(y, p)
    sk_precision, sk_recall, _ = sk.precision_recall_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(recall, sk_recall[::-1], atol=TOLERANCE)
    np.testing.assert_allclose(precision, sk_precision[::-1], atol=TOLERANCE)

    metrics = compute_metrics("binary", y, p)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics["roc_auc"], abs=TOLERANCE)
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(
        metrics["pr_auc"], abs=TOLERANCE
    )


@pytest.mark.parametrize("strategy", ["quantile", "uniform"])
def test_calibration_curve_matches_sklearn(strategy: str) -> None:
    rng = np.random.default_rng(5)
    p = rng.beta(2, 5, 3_000)
    y = (rng.random(3_000) < p).astype(int)

    predicted, observed, counts = calibration_curve(y, p, bins=10, strategy=strategy)
    sk_observed, sk_predicted = sk_calibration.calibration_curve(y, p, n_bins=10, strategy=strategy)

    np.testing.assert_allclose(predicted, sk_predicted, atol=TOLERANCE)
    np.testing.assert_allclose(observed, sk_observed, atol=TOLERANCE)
    assert counts.sum() == 3_000
    if strategy == "quantile":
        assert counts.min() >= 290  # about a tenth of the rows each


# -- undefined metrics -----------------------------------------------------------------------


def test_undefined_metrics_are_nan_not_errors() -> None:
    one_class = compute_metrics("binary", np.ones(20), np.linspace(0.1, 0.9, 20))
    assert math.isnan(one_class["roc_auc"])
    assert one_class["pr_auc"] == pytest.approx(1.0)  # all positives: precision is 1 everywhere
    no_positives = compute_metrics("binary", np.zeros(20), np.linspace(0.1, 0.9, 20))
    assert math.isnan(no_positives["roc_auc"])
    assert math.isnan(no_positives["pr_auc"])
    assert not math.isnan(no_positives["log_loss"])

    constant_target = compute_metrics("regression", np.full(10, 3.0), np.arange(10.0))
    assert math.isnan(constant_target["r2"])
    assert constant_target["mae"] == pytest.approx(np.mean(np.abs(3.0 - np.arange(10.0))))

    for task, y_pred in [
        ("binary", np.zeros(0)),
        ("regression", np.zeros(0)),
        ("multiclass", np.zeros((0, 3))),
    ]:
        empty = compute_metrics(task, np.zeros(0, dtype=int), y_pred)
        assert list(empty) == METRICS[task]
        assert all(math.isnan(value) for value in empty.values())


def test_malformed_inputs_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"y_true of a binary task must hold 0/1 labels.*2"):
        compute_metrics("binary", np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"y_pred must have shape \(3,\)"):
        compute_metrics("binary", np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"class indices in 0\.\.2; found values from 0 to 3"):
        compute_metrics("multiclass", np.array([0, 3]), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="task must be one of"):
        compute_metrics("ranking", np.array([0, 1]), np.array([0.1, 0.2]))


# -- baselines -------------------------------------------------------------------------------


def entropy(probabilities: np.ndarray) -> float:
    probabilities = probabilities[probabilities > 0]
    return float(-np.sum(probabilities * np.log(probabilities)))


def test_binary_baseline_has_auc_one_half_and_log_loss_equal_to_the_prevalence_entropy() -> None:
    rng = np.random.default_rng(0)
    y_train = (rng.random(5_000) < 0.23).astype(int)
    prevalence = y_train.mean()

    baseline = baseline_predictions("binary", y_train, len(y_train))
    metrics = compute_metrics("binary", y_train, baseline)

    assert baseline.shape == (5_000,)
    np.testing.assert_allclose(baseline, prevalence)
    assert metrics["roc_auc"] == 0.5
    assert metrics["log_loss"] == pytest.approx(
        entropy(np.array([prevalence, 1 - prevalence])), abs=TOLERANCE
    )
    assert metrics["brier"] == pytest.approx(prevalence * (1 - prevalence), abs=TOLERANCE)


def test_multiclass_and_regression_baselines() -> None:
    rng = np.random.default_rng(1)
    y_train = rng.choice(3, size=3_000, p=[0.6, 0.3, 0.1])
    frequencies = np.bincount(y_train) / len(y_train)

    baseline = baseline_predictions("multiclass", y_train, 7, num_class=4)

    assert baseline.shape == (7, 4)
    np.testing.assert_allclose(baseline[:, :3], np.tile(frequencies, (7, 1)))
    assert (baseline[:, 3] == 0).all()  # a class absent from training gets no probability
    on_train = baseline_predictions("multiclass", y_train, len(y_train))
    assert compute_metrics("multiclass", y_train, on_train)["log_loss"] == pytest.approx(
        entropy(frequencies), abs=TOLERANCE
    )

    y = rng.normal(5, 2, 1_000)
    regression = baseline_predictions("regression", y, len(y))
    metrics = compute_metrics("regression", y, regression)
    assert metrics["r2"] == pytest.approx(0.0, abs=TOLERANCE)
    assert metrics["rmse"] == pytest.approx(np.std(y), abs=TOLERANCE)

    with pytest.raises(ValueError, match="y_train is empty"):
        baseline_predictions("binary", np.zeros(0), 3)


# -- slices ----------------------------------------------------------------------------------


def test_slice_metrics_merge_small_slices_into_other_and_cover_every_row() -> None:
    rng = np.random.default_rng(2)
    carriers = np.array(["UA"] * 400 + ["DL"] * 250 + ["AA"] * 80 + ["B6"] * 30 + ["WN"] * 12)
    carriers = carriers.astype(object)
    carriers[:5] = None  # 5 missing values: too few for a slice of their own
    rng.shuffle(carriers)
    n = len(carriers)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)

    rows = slice_metrics("binary", y, p, carriers, min_rows=50)

    assert [row["slice"] for row in rows] == ["UA", "DL", "AA", "(other)"]
    assert [row["rows"] for row in rows] == [395, 250, 80, 47]
    assert sum(row["rows"] for row in rows) == n
    other = rows[-1]
    in_other = np.isin(carriers, ["B6", "WN", None])
    assert other["rows"] == in_other.sum()
    assert other["positive_rate"] == pytest.approx(y[in_other].mean())
    assert other["roc_auc"] == pytest.approx(sk.roc_auc_score(y[in_other], p[in_other]))
    ua = carriers == "UA"
    assert rows[0] == {
        "slice": "UA",
        "rows": int(ua.sum()),
        "positive_rate": pytest.approx(y[ua].mean()),
        **compute_metrics("binary", y[ua], p[ua]),
    }


def test_slice_metrics_for_regression_numbers_and_missing_values() -> None:
    rng = np.random.default_rng(3)
    hours = np.array([7.0] * 120 + [18.0] * 90 + [np.nan] * 60 + [3.0] * 10)
    y = rng.normal(size=len(hours))
    p = y + rng.normal(size=len(hours))

    rows = slice_metrics("regression", y, p, hours, min_rows=50)

    assert [row["slice"] for row in rows] == ["7.0", "18.0", "(missing)", "(other)"]
    assert [row["rows"] for row in rows] == [120, 90, 60, 10]
    assert rows[0]["mean_target"] == pytest.approx(y[:120].mean())
    assert set(METRICS["regression"]) <= set(rows[0])


# -- promotion comparison --------------------------------------------------------------------


def test_is_better_follows_the_metric_direction_and_tolerance() -> None:
    assert is_better("roc_auc", 0.81, 0.80)
    assert not is_better("roc_auc", 0.79, 0.80)
    assert is_better("roc_auc", 0.80, 0.80)  # not worse is enough
    assert is_better("roc_auc", 0.795, 0.80, tolerance=0.01)
    assert not is_better("roc_auc", 0.785, 0.80, tolerance=0.01)
    assert not is_better("roc_auc", 0.805, 0.80, tolerance=-0.01)  # demands a real gain

    assert is_better("rmse", 9.0, 10.0)
    assert not is_better("rmse", 11.0, 10.0)
    assert is_better("log_loss", 0.505, 0.50, tolerance=0.01)
    assert not is_better("log_loss", 0.52, 0.50, tolerance=0.01)

    assert not is_better("roc_auc", float("nan"), 0.5)
    assert not is_better("rmse", None, 10.0)
    assert is_better("roc_auc", 0.6, float("nan"))  # nothing to be worse than
    assert is_better("rmse", 3.0, None)
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        is_better("auc", 0.9, 0.8)


def test_every_metric_has_a_direction_and_every_task_a_primary_metric() -> None:
    assert {name for names in METRICS.values() for name in names} == set(HIGHER_IS_BETTER)
    assert all(PRIMARY[task] in METRICS[task] for task in METRICS)


# -- plots and report files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_binary() -> dict:
    """A real LightGBM model on a small synthetic problem, scored like the pipeline does."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=3_000, n_features=8, n_informative=4, weights=[0.8], random_state=0
    )
    names = [f"feature_{i}" for i in range(x.shape[1])]
    train, valid, test = slice(0, 2_000), slice(2_000, 2_500), slice(2_500, 3_000)
    booster = lgb.train(
        {"objective": "binary", "verbosity": -1, "num_leaves": 15, "seed": 0, "num_threads": 1},
        lgb.Dataset(x[train], y[train], feature_name=names),
        num_boost_round=40,
    )
    importance = dict(
        zip(names, booster.feature_importance("gain").astype(float).tolist(), strict=True)
    )
    p_test, p_valid = booster.predict(x[test]), booster.predict(x[valid])
    baseline_test = baseline_predictions("binary", y[train], len(y[test]))
    return {
        "y_test": y[test],
        "p_test": p_test,
        "baseline_test": baseline_test,
        "importance": importance,
        "slice_values": np.where(x[test][:, 0] > 0, "high", "low"),
        "metrics": {
            "test": compute_metrics("binary", y[test], p_test),
            "valid": compute_metrics("binary", y[valid], p_valid),
        },
        "baseline": {"test": compute_metrics("binary", y[test], baseline_test)},
    }


def test_a_trained_model_beats_its_baseline_on_the_primary_metric(trained_binary: dict) -> None:
    primary = PRIMARY["binary"]
    model = trained_binary["metrics"]["test"][primary]
    baseline = trained_binary["baseline"]["test"][primary]
    assert model > 0.8
    assert is_better(primary, model, baseline)
    assert not is_better(primary, baseline, model)


def assert_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1_000


def test_binary_plots_are_pngs(trained_binary: dict) -> None:
    plots = evaluation_plots(
        "binary",
        trained_binary["y_test"],
        trained_binary["p_test"],
        trained_binary["importance"],
        baseline_pred=trained_binary["baseline_test"],
    )

    assert set(plots) == {"roc", "pr", "calibration", "importance"}
    for data in plots.values():
        assert_png(data)


def test_regression_and_multiclass_plots_are_pngs() -> None:
    rng = np.random.default_rng(4)
    y = rng.normal(size=30_000)  # more rows than a scatter draws: subsampled
    regression = evaluation_plots("regression", y, y + rng.normal(size=len(y)), {"a": 2.0})
    assert set(regression) == {"residuals", "predicted_vs_actual", "importance"}

    y_class, p_class = multiclass_data(4)
    multiclass = evaluation_plots(
        "multiclass", y_class, p_class, {}, class_names=["low", "mid", "high"]
    )
    assert set(multiclass) == {"confusion", "importance"}

    for data in [*regression.values(), *multiclass.values()]:
        assert_png(data)
    with pytest.raises(ValueError, match="class_names must name the 3 columns"):
        evaluation_plots("multiclass", y_class, p_class, {}, class_names=["a", "b"])


def test_plot_png_closes_pyplot_figures_and_markdown_embeds_the_png() -> None:
    from matplotlib import pyplot

    figure, ax = pyplot.subplots()
    ax.plot([0, 1], [1, 0])
    png = plot_png(figure)

    assert_png(png)
    assert not pyplot.fignum_exists(figure.number)
    markdown = png_markdown(png, "roc curve")
    assert markdown.startswith("![roc curve](data:image/png;base64,iVBORw0KGgo")


def test_write_report_writes_the_contract_json_and_a_self_contained_html(
    tmp_path: Path, trained_binary: dict
) -> None:
    plots = evaluation_plots(
        "binary",
        trained_binary["y_test"],
        trained_binary["p_test"],
        trained_binary["importance"],
        baseline_pred=trained_binary["baseline_test"],
    )
    slices = slice_metrics(
        "binary",
        trained_binary["y_test"],
        trained_binary["p_test"],
        trained_binary["slice_values"],
    )
    metrics = copy.deepcopy(trained_binary["metrics"])
    metrics["valid"]["roc_auc"] = float("nan")  # e.g. a single-class validation split
    report = {
        "dataset": "synthetic",
        "task": "binary",
        "model_version": "v0007-3f2a",
        "metrics": metrics,
        "baseline": trained_binary["baseline"],
        "slices": {"column": "feature_0_band", "rows": slices},
        "importance": trained_binary["importance"],
        "rows": {"train": 2_000, "valid": 500, "test": 500, "unlabelled": np.int64(0)},
        "champion": {"version": "v0006-77aa", "test": {**metrics["test"], "roc_auc": 0.99}},
        # Shaped like the promotion gate's decision.
        "promotion": {
            "decision": "refuse",
            "challenger": "v0007-3f2a",
            "champion": "v0006-77aa",
            "checks": [
                {"check": "roc_auc >= 0.7", "value": metrics["test"]["roc_auc"], "passed": True},
                {"check": "roc_auc not worse than champion", "value": 0.9, "passed": False},
            ],
            "reason": "roc_auc worse than champion v0006-77aa",
        },
    }

    json_path, html_path = write_report(tmp_path / "reports", report, plots)

    assert json_path == tmp_path / "reports" / "evaluation.json"
    text = json_path.read_text()
    assert "NaN" not in text
    written = json.loads(text)
    assert {"dataset", "task", "model_version", "metrics"} <= set(written)
    assert set(written["metrics"]) == {"test", "valid"}
    assert set(written["metrics"]["test"]) == set(METRICS["binary"])
    assert written["metrics"]["valid"]["roc_auc"] is None
    assert written["metrics"]["test"]["roc_auc"] == pytest.approx(metrics["test"]["roc_auc"])
    assert written["rows"]["unlabelled"] == 0
    assert [row["slice"] for row in written["slices"]["rows"]] == [r["slice"] for r in slices]

    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('<img src="data:image/png;base64,') == len(plots)
    assert "v0007-3f2a" in page
    assert "synthetic" in page
    assert "baseline (test)" in page
    assert "feature_0_band" in page
    assert "champion v0006-77aa (test)" in page  # the champion's column in the metrics table
    assert "Not promoted" in page
    assert "roc_auc worse than champion v0006-77aa" in page
    assert "roc_auc &gt;= 0.7" in page  # each gate check in a table, escaped
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "evaluation.html",
        "evaluation.json",
    ]  # no temporary files left behind


def test_html_shows_one_slice_table_per_column(tmp_path: Path) -> None:
    rows = [{"slice": "JFK", "rows": 60, "rmse": 1.0}, {"slice": "(other)", "rows": 5, "rmse": 2.0}]
    report = {
        "dataset": "flights",
        "task": "regression",
        "model_version": "v1",
        "metrics": {"test": {"rmse": 1.1}},
        "slices": {"column": "origin", "rows": rows},
        "slices_by_column": {"origin": rows, "carrier": [{**rows[0], "slice": "UA"}]},
    }

    _, html_path = write_report(tmp_path, report, {})

    page = html_path.read_text()
    assert "Metrics by <code>origin</code>" in page
    assert "Metrics by <code>carrier</code>" in page
    assert page.count("<td>(other)</td>") == 1


def test_write_report_tolerates_a_minimal_report_and_replaces_the_previous_one(
    tmp_path: Path,
) -> None:
    first = {"dataset": "flights", "task": "regression", "model_version": "v1", "metrics": {}}
    write_report(tmp_path, first, {})
    second = {**first, "model_version": "v2", "metrics": {"test": {"rmse": 1.5}}}

    json_path, html_path = write_report(tmp_path, second, {})

    assert json.loads(json_path.read_text()) == second
    page = html_path.read_text()
    assert "v2" in page
    assert "<img" not in page


def test_metrics_markdown_shows_test_valid_and_baseline(trained_binary: dict) -> None:
    report = {
        "task": "binary",
        "metrics": trained_binary["metrics"],
        "baseline": trained_binary["baseline"],
    }

    markdown = metrics_markdown(report)
    lines = markdown.splitlines()

    assert lines[0] == "| metric | test | valid | baseline (test) |"
    assert lines[2].startswith("| roc_auc (primary) | 0.")
    assert len(lines) == 2 + len(METRICS["binary"])
    assert metrics_markdown({}) == "_No metrics in the report._"
