"""Stage 4 assets (group `monitoring`): reference profile, drift and live performance, service
health; checks whose error-level failure requests a retrain (see `retrain_condition`)."""

import json
import os
import urllib.request
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import polars as pl

from ml_lifecycle.assets.catalog import markdown_table
from ml_lifecycle.assets.plots import inline_plots
from ml_lifecycle.monitoring.live import (
    monitor_windows,
    performance_status,
    results_rows,
    served_span,
)
from ml_lifecycle.monitoring.notifier import Notifier
from ml_lifecycle.resources import Warehouse
from ml_lifecycle.spec import DatasetSpec
from ml_lifecycle.training.metrics import PRIMARY
from ml_lifecycle.training.registry import ModelRegistry
from ml_lifecycle.training.report import plot_png, png_markdown, round_sig, rounded

GROUP = "monitoring"
RETRAIN_CHECK = "retrain_required"


def retrain_condition() -> dg.AutomationCondition:
    """True on the tick after `drift_metrics`' blocking retrain check was evaluated and failed
    (each failing evaluation requests one retrain; the same failure is not counted twice). No
    cycle: the model does not depend on drift_metrics, it watches it."""
    return dg.AutomationCondition.asset_matches(
        "drift_metrics",
        dg.AutomationCondition.any_checks_match(
            dg.AutomationCondition.check_failed() & dg.AutomationCondition.newly_updated(),
            blocking_only=True,
        ),
    )


def _test_metrics(conn) -> dict[str, dict[str, float]]:
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'experiments'"
    ).fetchall()[0][0]
    if not exists:
        return {}
    rows = conn.execute(
        "SELECT model_version, test_metrics FROM experiments "
        "WHERE kind = 'train' AND test_metrics IS NOT NULL"
    ).fetchall()
    return {version: json.loads(metrics) for version, metrics in rows}


def _drift_plot(rows: list[dict[str, Any]]) -> bytes | None:
    if not rows:
        return None
    from matplotlib.figure import Figure

    frame = pl.DataFrame(rows).with_columns(
        pl.max_horizontal(pl.col("psi").fill_null(0), pl.col("js").fill_null(0)).alias("effect")
    )
    windows = sorted(frame["window_start"].unique().to_list())
    features = (
        frame.group_by("feature")
        .agg(pl.col("effect").max())
        .sort("effect", descending=True)["feature"]
        .to_list()[:20]
    )
    figure = Figure(figsize=(8, 0.3 * len(features) + 1.5))
    axis = figure.subplots()
    grid = [
        [
            frame.filter((pl.col("feature") == f) & (pl.col("window_start") == w))["effect"].max()
            or 0.0
            for w in windows
        ]
        for f in features
    ]
    image = axis.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=0.5)
    axis.set_yticks(range(len(features)), features, fontsize=7)
    axis.set_xticks(range(len(windows)), windows, rotation=45, fontsize=7)
    axis.set_title("Drift per feature and window (max of PSI, JS)")
    figure.colorbar(image, ax=axis)
    return plot_png(figure)


def build_monitoring_assets(spec: DatasetSpec) -> tuple[list, list]:
    paths = spec.paths()
    inference_log = dg.AssetSpec(
        "inference_log",
        group_name=GROUP,
        kinds={"parquet"},
        owners=spec.owners or None,
        description=(
            f"Every prediction the service made (request id, time, model version, features as "
            f"scored, prediction) as Parquet files under `{paths.inference}`: one file set per "
            "worker, one file per group commit (merged every 240), read with DuckDB through "
            "`serving.inference_log.read_predictions`; the labels that arrived as JSON lines "
            "beside them. Written by the service, not by Dagster."
        ),
    )

    @dg.asset(
        name="reference_profile",
        group_name=GROUP,
        deps=["champion"],
        kinds={"json"},
        owners=spec.owners or None,
        automation_condition=dg.AutomationCondition.eager(),
        description=(
            "The champion's training distribution per feature and for its prediction (quantile "
            "bins for numbers, level frequencies for categories, null rates), stored with the "
            "model version: drift is computed against it without re-reading training data."
        ),
    )
    def reference_profile() -> dg.MaterializeResult:
        registry = ModelRegistry(paths.registry)
        version = registry.alias("champion")
        if version is None:
            raise dg.Failure("no champion yet")
        profile = registry.load(version).reference_profile()
        features = profile.get("features", {})
        table = [
            [
                name,
                p["kind"],
                f"{p.get('null_rate', 0):.3f}",
                len(p.get("edges", [])) + 1 if p["kind"] == "numeric" else len(p.get("counts", {})),
            ]
            for name, p in features.items()
        ]
        return dg.MaterializeResult(
            metadata={
                "model_version": version,
                "rows_profiled": profile.get("rows", 0),
                "features": len(features),
                "profile": dg.MetadataValue.md(
                    markdown_table(["feature", "kind", "null rate", "bins/levels"], table)
                ),
                "path": dg.MetadataValue.path(
                    str(paths.registry / "versions" / version / "reference_profile.json")
                ),
            }
        )

    @dg.asset(
        name="drift_metrics",
        group_name=GROUP,
        deps=[inference_log, reference_profile],
        kinds={"duckdb"},
        pool="duckdb",
        owners=spec.owners or None,
        description=(
            f"Per {spec.monitoring.window} of event time and serving model version: PSI, KS D, "
            "Jensen-Shannon, Hellinger and total-variation distance, null-rate change and "
            "unseen-category share per feature, prediction drift, the share of drifted "
            "features, and (where labels arrived) the live metric next to the model's test "
            "metric. Table `drift_metrics` in the warehouse; `plot_drift` below is the heatmap "
            "of drift per feature and window. Its checks decide on effect sizes, never p-values."
        ),
    )
    def drift_metrics(
        context: dg.AssetExecutionContext, warehouse: Warehouse
    ) -> dg.MaterializeResult:
        with warehouse.get_connection() as conn:
            test_metrics = _test_metrics(conn)
        results = monitor_windows(spec, test_metrics=test_metrics)
        rows = results_rows(results)
        windows = []
        for result in results:
            status, drop = performance_status(spec, result)
            windows.append(
                {
                    "window_start": result.window,
                    "model_version": result.model_version,
                    "rows": result.rows,
                    "drift_status": result.status,
                    "drift_reasons": "; ".join(result.drift.get("reasons") or []),
                    "drifted_share": result.drift.get("drifted_share"),
                    "prediction_psi": (result.drift.get("prediction") or {}).get("psi"),
                    "labelled": result.labelled,
                    "live_metric": result.live_metrics.get(PRIMARY[spec.task]),
                    "test_metric": result.reference_metrics.get(PRIMARY[spec.task]),
                    "performance_status": status,
                    "performance_drop": drop,
                }
            )
        with warehouse.get_connection() as conn:
            frame = pl.DataFrame(windows) if windows else None
            if frame is not None:
                conn.register("windows_frame", frame.to_arrow())
                conn.execute("CREATE OR REPLACE TABLE drift_windows AS SELECT * FROM windows_frame")
                conn.unregister("windows_frame")
            if rows:
                conn.register("rows_frame", pl.DataFrame(rows).to_arrow())
                conn.execute("CREATE OR REPLACE TABLE drift_metrics AS SELECT * FROM rows_frame")
                conn.unregister("rows_frame")
        latest = windows[-1] if windows else {}
        plot = _drift_plot(rows)
        context.log.info(f"drift: {len(windows)} window(s); latest {latest}")
        shown = [{k: v for k, v in w.items() if k != "drift_reasons"} for w in windows]
        title = "Drift per feature and window (max of PSI, JS)"
        return dg.MaterializeResult(
            metadata={
                "windows": len(windows),
                "latest_window": latest.get("window_start", "none"),
                "latest_drift_status": latest.get("drift_status", "none"),
                "latest_drift_reasons": latest.get("drift_reasons") or "none",
                "latest_drifted_share": round_sig(latest.get("drifted_share") or 0.0),
                "latest_prediction_psi": round_sig(latest.get("prediction_psi") or 0.0),
                "latest_live_metric": round_sig(latest.get("live_metric")),
                # The heatmap inline on the asset page (no click), then the same PNG in a dialog.
                **(
                    inline_plots(
                        context.instance,
                        "drift_metrics",
                        context.run_id,
                        {"drift": plot},
                        {"drift": title},
                    )
                    if plot
                    else {}
                ),
                "by_window": dg.MetadataValue.md(
                    markdown_table(
                        list(shown[0]) if shown else ["window"],
                        [[_short(v) for v in w.values()] for w in shown],
                    )
                ),
                "drift_plot": dg.MetadataValue.md(png_markdown(plot, title) if plot else "no data"),
                "windows_json": dg.MetadataValue.json(rounded(windows)),
            }
        )

    def _latest(conn) -> dict[str, Any] | None:
        exists = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'drift_windows'"
        ).fetchall()[0][0]
        if not exists:
            return None
        rows = conn.sql("SELECT * FROM drift_windows ORDER BY window_start DESC LIMIT 1").pl()
        return rows.to_dicts()[0] if rows.height else None

    def _worst_features(conn, window: str, limit: int = 5) -> list[dict[str, Any]]:
        frame = conn.sql(
            "SELECT feature, status, psi, ks, js, unseen_share, stats FROM drift_metrics "
            f"WHERE window_start = '{window}' AND status <> 'ok' "
            "ORDER BY greatest(coalesce(psi, 0), coalesce(js, 0)) DESC LIMIT ?",
            params=[limit],
        ).pl()
        worst = []
        for row in frame.to_dicts():
            stats = json.loads(row.pop("stats") or "{}")
            worst.append({**rounded(row), "past_thresholds": "; ".join(stats.get("reasons") or [])})
        return worst

    @dg.asset_check(
        asset=drift_metrics,
        name="feature_drift",
        description=(
            "Warns when the latest window's drift passes the warn thresholds of "
            "thresholds.drift (PSI, KS, JS per feature; share of drifted features); names the "
            "features and how far past the threshold they are."
        ),
    )
    def feature_drift(warehouse: Warehouse, notifier: Notifier) -> dg.AssetCheckResult:
        with warehouse.get_connection() as conn:
            latest = _latest(conn)
            worst = _worst_features(conn, latest["window_start"]) if latest else []
        if not latest:
            return dg.AssetCheckResult(passed=True, description="no logged predictions yet")
        status = latest["drift_status"]
        # Each feature with the thresholds it passed, e.g. "x1 (error: psi 0.812 > 0.25)".
        described = "; ".join(
            f"{w['feature']} ({w['status']}: {w['past_thresholds'] or _stats_text(w)})"
            for w in worst
        )
        passed = status == "ok"
        if not passed:
            notifier.send(
                "drift",
                status,
                f"window {latest['window_start']}: {described}",
                dataset=spec.name,
                drifted_share=latest["drifted_share"],
            )
        window_reasons = latest.get("drift_reasons") or ""
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                f"window {latest['window_start']}: drift {status}"
                + (
                    f" ({window_reasons})"
                    if window_reasons
                    else f"; drifted share {_short(latest['drifted_share'])}"
                )
                + (f"; worst features: {described}" if described else "")
            ),
            metadata={
                "window_start": latest["window_start"],
                "drift_status": status,
                "drifted_share": round_sig(latest["drifted_share"]),
                "thresholds (warn, error)": _thresholds_text(spec),
                "features": dg.MetadataValue.md(
                    markdown_table(
                        ["feature", "status", "past thresholds", "psi", "ks", "js", "unseen share"],
                        [
                            [
                                w["feature"],
                                w["status"],
                                w["past_thresholds"],
                                _short(w["psi"]),
                                _short(w["ks"]),
                                _short(w["js"]),
                                _short(w["unseen_share"]),
                            ]
                            for w in worst
                        ],
                    )
                    if worst
                    else "no feature past a threshold"
                ),
            },
        )

    @dg.asset_check(
        asset=drift_metrics,
        name="live_performance",
        description=(
            "Compares the latest labelled window's live primary metric with the serving model's "
            "test metric; warns or errors past monitoring.performance_drop."
        ),
    )
    def live_performance(warehouse: Warehouse, notifier: Notifier) -> dg.AssetCheckResult:
        with warehouse.get_connection() as conn:
            latest = _latest(conn)
        if not latest or latest.get("performance_status") in (None, "unknown"):
            return dg.AssetCheckResult(passed=True, description="no labelled window yet")
        status = latest["performance_status"]
        warn, error = spec.monitoring.performance_drop
        text = (
            f"window {latest['window_start']}: live {PRIMARY[spec.task]} "
            f"{_short(latest['live_metric'])} vs test {_short(latest['test_metric'])}: "
            f"drop {_short(latest['performance_drop'])} (thresholds: warn {warn:g}, "
            f"error {error:g}; monitoring.performance_drop)"
        )
        if status != "ok":
            notifier.send("performance", status, text, dataset=spec.name)
        return dg.AssetCheckResult(
            passed=status == "ok",
            severity=dg.AssetCheckSeverity.ERROR
            if status == "error"
            else dg.AssetCheckSeverity.WARN,
            description=text,
            metadata={
                "window_start": latest["window_start"],
                "status": status,
                "live_metric": round_sig(latest["live_metric"]),
                "test_metric": round_sig(latest["test_metric"]),
                "performance_drop": round_sig(latest["performance_drop"]),
                "drop_warn": warn,
                "drop_error": error,
            },
        )

    @dg.asset_check(
        asset=drift_metrics,
        name=RETRAIN_CHECK,
        blocking=True,
        description=(
            "Error-level drift (share of drifted features past its error threshold) or an "
            "error-level performance drop in the latest window fails this check, which requests "
            "a retrain of `model` through its automation condition. Not before the champion has "
            "served `monitoring.cooldown` of event time, so a fresh model is not retrained again "
            "at once; one check for all windows, so several failing windows make one request."
        ),
    )
    def retrain_required(warehouse: Warehouse, notifier: Notifier) -> dg.AssetCheckResult:
        with warehouse.get_connection() as conn:
            latest = _latest(conn)
        if not latest:
            return dg.AssetCheckResult(passed=True, description="no logged predictions yet")
        reasons = []
        if latest["drift_status"] == "error":
            share_error = spec.thresholds.drift.drifted_share[1]
            reasons.append(
                f"drift error (drifted share {_short(latest['drifted_share'])}, "
                f"error threshold {share_error:g}"
                + (f": {latest['drift_reasons']}" if latest.get("drift_reasons") else "")
                + ")"
            )
        if latest.get("performance_status") == "error":
            reasons.append(
                f"performance drop {_short(latest['performance_drop'])} > error "
                f"threshold {spec.monitoring.performance_drop[1]:g}"
            )
        champion = ModelRegistry(paths.registry).alias("champion")
        span = served_span(spec, champion) if champion else None
        cooling = span is not None and span < spec.monitoring.cooldown
        if reasons and cooling:
            return dg.AssetCheckResult(
                passed=True,
                description=(
                    f"{'; '.join(reasons)} in window {latest['window_start']}, but champion "
                    f"{champion} has served only {span} of event time (cooldown "
                    f"{spec.monitoring.cooldown}): no retrain yet"
                ),
                metadata={"cooldown": True},
            )
        if reasons:
            notifier.send(
                "retrain",
                "error",
                f"window {latest['window_start']}: {'; '.join(reasons)} -> retraining {spec.name}",
                champion=champion,
            )
        return dg.AssetCheckResult(
            passed=not reasons,
            severity=dg.AssetCheckSeverity.ERROR,
            description=("; ".join(reasons) + " -> retrain requested")
            if reasons
            else f"window {latest['window_start']}: no error-level drift or performance drop",
            metadata={"window_start": latest["window_start"], "champion": champion or "none"},
        )

    @dg.asset(
        name="service_health",
        group_name=GROUP,
        kinds={"prometheus", "duckdb"},
        pool="duckdb",
        owners=spec.owners or None,
        description=(
            "Scrapes the service's Prometheus /metrics (ML_LIFECYCLE_SERVICE_URL, default "
            "http://127.0.0.1:3000) into the `service_health` table: requests, error rate and "
            "latency quantiles estimated from the histogram."
        ),
    )
    def service_health(
        context: dg.AssetExecutionContext, warehouse: Warehouse
    ) -> dg.MaterializeResult:
        url = os.environ.get("ML_LIFECYCLE_SERVICE_URL", "http://127.0.0.1:3000")
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError as error:
            raise dg.Failure(f"cannot scrape {url}/metrics: {error}") from None
        health = parse_health(text)
        health["scraped_at"] = datetime.now(UTC).replace(tzinfo=None)
        health["url"] = url
        with warehouse.get_connection() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS service_health (scraped_at TIMESTAMP, "
                "url VARCHAR, requests BIGINT, errors BIGINT, error_rate DOUBLE, "
                "p50_ms DOUBLE, p99_ms DOUBLE)"
            )
            conn.execute(
                "INSERT INTO service_health VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    health["scraped_at"],
                    url,
                    health["requests"],
                    health["errors"],
                    health["error_rate"],
                    health["p50_ms"],
                    health["p99_ms"],
                ],
            )
        return dg.MaterializeResult(
            metadata={
                k: round_sig(v) if isinstance(v, float) else v
                for k, v in health.items()
                if isinstance(v, int | float)
            }
        )

    @dg.asset_check(
        asset=service_health,
        name="latency_and_errors",
        description="p99 latency and error rate against monitoring.latency_p99_ms "
        "and monitoring.error_rate; alerts when passed.",
    )
    def latency_and_errors(warehouse: Warehouse, notifier: Notifier) -> dg.AssetCheckResult:
        with warehouse.get_connection() as conn:
            row = (
                conn.sql("SELECT * FROM service_health ORDER BY scraped_at DESC LIMIT 1")
                .pl()
                .to_dicts()[0]
            )
        problems = []
        if row["p99_ms"] is not None and row["p99_ms"] > spec.monitoring.latency_p99_ms:
            problems.append(f"p99 {row['p99_ms']:.1f} ms > {spec.monitoring.latency_p99_ms} ms")
        if row["error_rate"] is not None and row["error_rate"] > spec.monitoring.error_rate:
            problems.append(
                f"error rate {row['error_rate']:.3%} > {spec.monitoring.error_rate:.3%}"
            )
        if problems:
            notifier.send("service_health", "warn", "; ".join(problems), url=row["url"])
        return dg.AssetCheckResult(
            passed=not problems,
            severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(problems) or "within thresholds",
        )

    return (
        [inference_log, reference_profile, drift_metrics, service_health],
        [feature_drift, live_performance, retrain_required, latency_and_errors],
    )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _stats_text(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={_short(row[key])}" for key in ("psi", "ks", "js") if row.get(key) is not None
    )


def _thresholds_text(spec: DatasetSpec) -> str:
    drift = spec.thresholds.drift
    return ", ".join(
        f"{key} {warn:g}/{error:g}"
        for key, (warn, error) in (
            ("psi", drift.psi),
            ("ks", drift.ks),
            ("js", drift.js),
            ("drifted share", drift.drifted_share),
        )
    )


def parse_health(text: str) -> dict[str, Any]:
    """Requests, errors and latency quantiles from BentoML's Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = errors = 0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name.endswith("request_total") and "http_response_code" in labels:
                if labels.get("endpoint", "").startswith("/predict"):
                    requests += int(value)
                    if labels["http_response_code"].startswith("5"):
                        errors += int(value)
            elif name.endswith("request_duration_seconds_bucket") and labels.get(
                "endpoint", ""
            ).startswith("/predict"):
                bound = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
                buckets[bound] = buckets.get(bound, 0) + value

    def quantile(q: float) -> float | None:
        if not buckets:
            return None
        total = max(buckets.values())
        if total == 0:
            return None
        for bound in sorted(buckets):
            if buckets[bound] >= q * total:
                return None if bound == float("inf") else bound * 1000
        return None

    return {
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else 0.0,
        "p50_ms": quantile(0.5),
        "p99_ms": quantile(0.99),
    }
