"""Live monitoring over the inference log: drift and performance per window of event time.

Each window's logged features are compared with the reference profile of the model version
that served them (stored in the registry: the training data is never re-read); labels that
arrived are joined by request id to give the window's real metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from ml_lifecycle.monitoring.drift import drift_report
from ml_lifecycle.serving.inference_log import predictions_sql
from ml_lifecycle.spec import DatasetSpec
from ml_lifecycle.training.metrics import PRIMARY, compute_metrics
from ml_lifecycle.training.registry import ModelRegistry


@dataclass
class WindowResult:
    window: str
    model_version: str
    rows: int
    drift: dict[str, Any]
    labelled: int = 0
    live_metrics: dict[str, float] = field(default_factory=dict)
    reference_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.drift.get("status", "ok"))


def _log_relation(conn: duckdb.DuckDBPyConnection, directory: Path, kind: str) -> bool:
    """A temp view `kind` over the worker logs: predictions (Parquet, and JSON lines of older
    versions) or labels (JSON lines)."""
    if kind == "predictions":
        select = predictions_sql(directory)
    else:
        files = [f for f in sorted(Path(directory).glob(f"{kind}-*.jsonl")) if f.stat().st_size]
        listing = "[" + ", ".join(f"'{f}'" for f in files) + "]"
        select = (f"SELECT * FROM read_json({listing}, format='newline_delimited', "
                  "union_by_name=true)") if files else None
    if select is None:
        return False
    conn.execute(f"CREATE OR REPLACE TEMP VIEW {kind} AS {select}")
    return True


def monitor_windows(spec: DatasetSpec, directory: Path | None = None,
                    test_metrics: dict[str, dict[str, float]] | None = None,
                    ) -> list[WindowResult]:
    """Drift (and, where labels arrived, performance) per window and serving model version."""
    directory = Path(directory or spec.paths().inference)
    registry = ModelRegistry(spec.paths().registry)
    conn = duckdb.connect()
    if not _log_relation(conn, directory, "predictions"):
        return []
    has_labels = _log_relation(conn, directory, "labels")
    period = spec.monitoring.window
    windows = conn.execute(
        f"SELECT CAST(date_trunc('{period}', CAST(event_time AS TIMESTAMP)) AS DATE) AS w, "
        f"model_version, count(*) FROM predictions GROUP BY ALL HAVING count(*) >= ? "
        f"ORDER BY w, model_version", [spec.monitoring.min_rows]).fetchall()
    thresholds = spec.thresholds.drift.model_dump()
    results = []
    profiles: dict[str, dict] = {}
    for window, version, rows in windows:
        if version not in profiles:
            profiles[version] = registry.load(version).reference_profile()
        profile = _monitored(profiles[version], spec)
        names = list(profile.get("features", {}))
        select = ", ".join(f"features.\"{n}\" AS \"{n}\"" for n in names)
        frame = conn.sql(
            f"SELECT {select}{', ' if select else ''}prediction, request_id FROM predictions "
            f"WHERE model_version = '{version}' AND CAST(date_trunc('{period}', "
            f"CAST(event_time AS TIMESTAMP)) AS DATE) = DATE '{window}'").pl()
        current = {}
        for name in names:
            column = frame[name]
            if profile["features"][name]["kind"] == "categorical":
                current[name] = np.array(column.cast(str).to_list(), dtype=object)
            else:
                current[name] = column.cast(float).to_numpy()
        prediction = frame["prediction"]
        pred_values = prediction.cast(float).to_numpy() if spec.task != "multiclass" else None
        drift = drift_report(profile, current, thresholds, pred_values)
        result = WindowResult(window=str(window), model_version=version, rows=int(rows),
                              drift=drift)
        if has_labels and spec.task != "multiclass":
            joined = conn.sql(
                f"SELECT p.prediction, l.label FROM predictions p JOIN (SELECT request_id, "
                f"any_value(label) AS label FROM labels GROUP BY request_id) l USING (request_id) "
                f"WHERE p.model_version = '{version}' AND CAST(date_trunc('{period}', "
                f"CAST(p.event_time AS TIMESTAMP)) AS DATE) = DATE '{window}' "
                f"AND l.label IS NOT NULL").fetchall()
            if joined:
                y_pred = np.array([float(r[0]) for r in joined])
                y_true = np.array([float(r[1]) for r in joined])
                result.labelled = len(joined)
                result.live_metrics = compute_metrics(spec.task, y_true, y_pred)
        if test_metrics and version in test_metrics:
            result.reference_metrics = test_metrics[version]
        results.append(result)
    conn.close()
    return results


def _monitored(profile: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """The profile without calendar parts (time__*: they move forward by construction, so they
    would always 'drift') and without the features the spec excludes from monitoring."""
    excluded = set(spec.monitoring.exclude_features)
    features = {name: p for name, p in profile.get("features", {}).items()
                if not name.startswith("time__") and name not in excluded}
    return {**profile, "features": features}


def served_span(spec: DatasetSpec, version: str, directory: Path | None = None) -> timedelta:
    """How much event time the version has served (for the retrain cooldown)."""
    conn = duckdb.connect()
    if not _log_relation(conn, Path(directory or spec.paths().inference), "predictions"):
        return timedelta(0)
    low, high = conn.execute(
        "SELECT min(CAST(event_time AS TIMESTAMP)), max(CAST(event_time AS TIMESTAMP)) "
        "FROM predictions WHERE model_version = ?", [version]).fetchall()[0]
    conn.close()
    return (high - low) if low and high else timedelta(0)


def performance_status(spec: DatasetSpec, result: WindowResult) -> tuple[str, float | None]:
    """ok|warn|error from the live primary metric vs the version's test metric."""
    metric = PRIMARY[spec.task]
    live = result.live_metrics.get(metric)
    reference = result.reference_metrics.get(metric)
    if live is None or reference is None or live != live:
        return "unknown", None
    higher = metric in ("roc_auc", "pr_auc", "accuracy", "r2", "macro_f1")
    drop = (reference - live) if higher else (live - reference)
    warn, error = spec.monitoring.performance_drop
    return ("error" if drop > error else "warn" if drop > warn else "ok"), float(drop)


def results_rows(results: list[WindowResult]) -> list[dict[str, Any]]:
    """Flat rows (one per window and feature) for the drift_metrics table."""
    rows = []
    for result in results:
        for feature, stats in result.drift.get("features", {}).items():
            rows.append({"window_start": result.window, "model_version": result.model_version,
                         "feature": feature, "rows": result.rows,
                         "status": stats.get("status"), "psi": stats.get("psi"),
                         "ks": stats.get("ks"), "js": stats.get("js"),
                         "hellinger": stats.get("hellinger"),
                         "total_variation": stats.get("total_variation"),
                         "null_rate_change": stats.get("null_rate_change"),
                         "unseen_share": stats.get("unseen_share"),
                         "stats": json.dumps(stats, default=str)})
    return rows
