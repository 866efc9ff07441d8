"""Stage 2 assets (group `training`): model -> evaluation_report -> champion, with the gate.

`model` trains LightGBM on the features (params file = code version), registers a version as
`challenger` and tracks the run; `evaluation_report` scores challenger and champion on the same
test rows and writes reports/evaluation.{json,html}; the blocking `promotion_gate` check decides;
`champion` promotes (only runs when the gate passed).
"""

import json
import time
from typing import Any

import dagster as dg
import numpy as np

from ml_lifecycle.assets.monitoring import retrain_condition
from ml_lifecycle.assets.plots import inline_plots
from ml_lifecycle.data.features import load_state
from ml_lifecycle.monitoring.profile import build_profile
from ml_lifecycle.resources import Warehouse
from ml_lifecycle.spec import DatasetSpec
from ml_lifecycle.training import tracking
from ml_lifecycle.training.cluster import TrainingCluster
from ml_lifecycle.training.dataset import load_model_data
from ml_lifecycle.training.gate import promotion_decision
from ml_lifecycle.training.metrics import (
    baseline_predictions,
    compute_metrics,
    slice_metrics,
)
from ml_lifecycle.training.params import (
    load_params,
    params_code_version,
    parse_overrides,
)
from ml_lifecycle.training.registry import ModelRegistry
from ml_lifecycle.training.report import (
    PLOT_TITLES,
    evaluation_plots,
    metrics_markdown,
    png_markdown,
    round_sig,
    rounded,
    write_report,
)
from ml_lifecycle.training.trainer import gain_importance, predict

GROUP = "training"
PROFILE_ROWS = 200_000


class ModelConfig(dg.Config):
    """Run-time overrides of the params file (everything defaults to the file's values)."""

    learning_rate: float | None = None
    num_leaves: int | None = None
    num_boost_round: int | None = None
    search_trials: int | None = None
    overrides: str = ""  # YAML mapping of any LightGBM parameter we expose, e.g. "{max_bin: 127}"


def _floats(metrics: dict[str, float], prefix: str) -> dict[str, Any]:
    """Metrics as plain floats (4 significant digits): the UI plots each one's history."""
    return {f"{prefix}{name}": round_sig(value) for name, value in metrics.items()}


def build_training_assets(
    spec: DatasetSpec,
) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    paths = spec.paths()
    params_path = spec.params_path()
    code_version = params_code_version(params_path)

    def registry() -> ModelRegistry:
        return ModelRegistry(paths.registry)

    @dg.asset(
        name="model",
        group_name=GROUP,
        deps=["features"],
        code_version=code_version,
        kinds={"lightgbm"},
        pool="duckdb",
        owners=spec.owners or None,
        tags={"stage": "training"},
        automation_condition=(
            (dg.AutomationCondition.code_version_changed() | retrain_condition())
            & ~dg.AutomationCondition.in_progress()
            & dg.AutomationCondition.all_deps_blocking_checks_passed()
        ),
        description=(
            f"A LightGBM {spec.task} model trained on the `features` table with early stopping "
            f"on the validation split ({spec.split_method} split). Hyper-parameters come from "
            f"`{params_path.name if params_path else 'built-in defaults'}` (its hash is this "
            "asset's code version: edit it and the model is retrained), overridable by run "
            "config. Each run registers a new version as `challenger` and adds a row to the "
            "`experiments` table. Trains in the step's process, or with `lightgbm.dask` on the "
            "Dask cluster the `cluster` resource names (ML_LIFECYCLE_DASK_SCHEDULER)."
        ),
    )
    def model(
        context: dg.AssetExecutionContext,
        config: ModelConfig,
        warehouse: Warehouse,
        cluster: TrainingCluster,
    ) -> dg.MaterializeResult:
        started = time.time()
        params = load_params(params_path)
        overrides = parse_overrides(config.overrides)
        for key in ("learning_rate", "num_leaves"):
            if getattr(config, key) is not None:
                overrides[key] = getattr(config, key)
        if overrides:
            params = params.with_lightgbm(**overrides)
        if config.num_boost_round is not None:
            params = params.model_copy(update={"num_boost_round": config.num_boost_round})
        if config.search_trials is not None:
            params = params.model_copy(
                update={"search": params.search.model_copy(update={"trials": config.search_trials})}
            )
        with warehouse.get_connection() as conn:
            state = load_state(conn)
            if state is None:
                raise dg.Failure("no feature state: materialize `features` first")
            data = load_model_data(conn, spec, state)
            snapshot = tracking.data_snapshot_id(conn)
        counts = data.counts()
        context.log.info(f"training on {counts} rows, {len(data.feature_names)} features")
        trained = cluster.train(spec.task, data, params, log=context.log.info)
        train_split = data.splits["train"]
        rows = np.random.default_rng(0).permutation(train_split.rows)[:PROFILE_ROWS]
        profile = build_profile(
            train_split.X[rows],
            data.feature_names,
            data.categorical,
            predict(trained.booster, train_split.X[rows], spec.task),
            state.categories,
        )
        commit = tracking.git_commit()
        metadata = {
            "dataset": spec.name,
            "task": spec.task,
            "run_id": context.run_id,
            "params": trained.params.model_dump(),
            "code_version": code_version,
            "data_snapshot": snapshot,
            "feature_state_version": state.version,
            "git_commit": commit,
            "best_iteration": trained.best_iteration,
            "trained_on": trained.trained_on,
            "valid_metrics": trained.valid_metrics,
            "rows": counts,
            "classes": data.classes,
            "split_boundaries": data.boundaries,
            "feature_names": data.feature_names,
            "categorical_features": data.categorical,
        }
        version = registry().register(trained.booster, state, metadata, profile)
        duration = time.time() - started
        with warehouse.get_connection() as conn:
            for trial in trained.trials:
                tracking.record(
                    conn,
                    run_id=context.run_id,
                    kind="trial",
                    duration_s=trial.seconds,
                    params=trial.params,
                    data_snapshot=snapshot,
                    feature_state_version=state.version,
                    code_version=code_version,
                    git_commit=commit,
                    valid_metrics=trial.valid_metrics,
                    model_version=version,
                    status="trial",
                )
            tracking.record(
                conn,
                run_id=context.run_id,
                kind="train",
                duration_s=duration,
                params=trained.params.model_dump(),
                data_snapshot=snapshot,
                feature_state_version=state.version,
                code_version=code_version,
                git_commit=commit,
                rows=counts,
                valid_metrics=trained.valid_metrics,
                model_version=version,
                status="registered",
            )
            history = tracking.comparison(conn, limit=10)
        context.log.info(f"registered {version} as challenger: valid {trained.valid_metrics}")
        return dg.MaterializeResult(
            metadata={
                "model_version": version,
                "best_iteration": trained.best_iteration,
                "training_seconds": round(duration, 2),
                "trained_on": trained.trained_on,
                **_floats(trained.valid_metrics, "valid_"),
                "rows": dg.MetadataValue.json(counts),
                "params": dg.MetadataValue.json(rounded(trained.params.model_dump())),
                "data_snapshot": snapshot,
                "search_trials": len(trained.trials),
                "experiments": dg.MetadataValue.md(_experiments_markdown(history)),
                "registry": dg.MetadataValue.path(str(paths.registry / "versions" / version)),
            }
        )

    @dg.asset(
        name="evaluation_report",
        group_name=GROUP,
        deps=[model],
        kinds={"lightgbm", "html"},
        pool="duckdb",
        owners=spec.owners or None,
        tags={"stage": "training"},
        automation_condition=dg.AutomationCondition.eager()
        & dg.AutomationCondition.all_deps_blocking_checks_passed(),
        description=(
            "Test and validation metrics of the challenger next to a naive baseline and the "
            "current champion (scored on the same test rows), metrics per slice, feature "
            "importance and plots (the `plot_*` rows of the metadata below, and the metric "
            "history under Plots); written to reports/evaluation.json and evaluation.html. "
            "Carries the promotion decision that the `promotion_gate` check enforces."
        ),
    )
    def evaluation_report(
        context: dg.AssetExecutionContext, warehouse: Warehouse
    ) -> dg.MaterializeResult:
        reg = registry()
        challenger_version = reg.alias("challenger")
        if challenger_version is None:
            raise dg.Failure("no challenger in the registry: materialize `model` first")
        challenger = reg.load(challenger_version)
        champion_version = reg.alias("champion")
        with warehouse.get_connection() as conn:
            data = load_model_data(
                conn, spec, challenger.state, classes=challenger.metadata.get("classes")
            )
            champion_data = None
            if champion_version and champion_version != challenger_version:
                champion = reg.load(champion_version)
                champion_data = load_model_data(
                    conn, spec, champion.state, classes=champion.metadata.get("classes")
                )
        booster = challenger.booster()
        test, valid = data.splits["test"], data.splits["valid"]
        test_pred = predict(booster, test.X, spec.task)
        metrics = {
            "test": compute_metrics(spec.task, test.y, test_pred),
            "valid": compute_metrics(spec.task, valid.y, predict(booster, valid.X, spec.task)),
        }
        num_class = len(data.classes) if data.classes else None
        baseline_pred = baseline_predictions(
            spec.task, data.splits["train"].y, test.rows, num_class=num_class
        )
        baseline = {"test": compute_metrics(spec.task, test.y, baseline_pred)}
        champion_test = None
        if champion_data is not None:
            champion_booster = reg.load(champion_version).booster()
            champion_test = compute_metrics(
                spec.task,
                champion_data.splits["test"].y,
                predict(champion_booster, champion_data.splits["test"].X, spec.task),
            )
        decision = promotion_decision(
            spec.task,
            spec.thresholds,
            challenger_version,
            metrics["test"],
            champion_version,
            champion_test,
        )
        importance = gain_importance(booster)
        slices = {}
        for column, values in test.slices.items():
            slices[column] = slice_metrics(spec.task, test.y, test_pred, values)
        report = {
            "dataset": spec.name,
            "task": spec.task,
            "model_version": challenger_version,
            "metrics": metrics,
            "baseline": baseline,
            "champion": {"version": champion_version, "test": champion_test},
            "promotion": decision,
            "slices": (
                {"column": next(iter(slices)), "rows": next(iter(slices.values()))}
                if slices
                else {}
            ),
            "slices_by_column": slices,
            "importance": dict(list(importance.items())[:50]),
            "rows": data.counts(),
            "split_boundaries": data.boundaries,
        }
        plots = evaluation_plots(
            spec.task,
            test.y,
            test_pred,
            importance,
            baseline_pred=baseline_pred,
            class_names=data.classes,
        )
        json_path, html_path = write_report(paths.reports, report, plots)
        with warehouse.get_connection() as conn:
            tracking.update(
                conn, challenger_version, test_metrics=metrics["test"], status="evaluated"
            )
        context.log.info(
            f"{challenger_version}: test {metrics['test']}; gate: {decision['reason']}"
        )
        plot_md = "\n\n".join(png_markdown(png, name) for name, png in plots.items())
        titles = {
            name: f"{PLOT_TITLES.get(name, name)} ({challenger_version}, test)" for name in plots
        }
        return dg.MaterializeResult(
            metadata={
                "model_version": challenger_version,
                "promotion_decision": decision["decision"],
                "promotion_reason": decision["reason"],
                **_floats(metrics["test"], "test_"),
                # One inline image per plot, right under the headline numbers (no click needed).
                **inline_plots(
                    context.instance, "evaluation_report", context.run_id, plots, titles
                ),
                **_floats(metrics["valid"], "valid_"),
                **_floats(baseline["test"], "baseline_test_"),
                "metrics": dg.MetadataValue.md(metrics_markdown(report)),
                "plots": dg.MetadataValue.md(plot_md),
                "champion_version": champion_version or "none",
                "report_json": dg.MetadataValue.path(str(json_path)),
                "report_html": dg.MetadataValue.path(str(html_path)),
            }
        )

    @dg.asset_check(
        asset=evaluation_report,
        name="promotion_gate",
        blocking=True,
        description=(
            "Blocks promotion unless the challenger meets the spec's thresholds.promotion on the "
            "test split and is not worse than the champion on the primary metric (same test "
            "rows, tolerance thresholds.champion_tolerance). Every refusal is written to the "
            "registry's audit log with the reason."
        ),
    )
    def promotion_gate() -> dg.AssetCheckResult:
        report = json.loads((paths.reports / "evaluation.json").read_text())
        decision = report["promotion"]
        passed = decision["decision"] == "promote"
        if not passed:
            registry().audit(
                "refused",
                decision["challenger"],
                decision["reason"],
                champion=decision["champion"],
                checks=decision["checks"],
            )
        failed = [c for c in decision["checks"] if not c["passed"]]
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=decision["reason"],
            metadata={
                "challenger": decision["challenger"],
                "champion": decision["champion"] or "none",
                "failed_checks": "; ".join(c["check"] for c in failed) or "none",
                "checks": dg.MetadataValue.md(_gate_markdown(decision["checks"])),
                "checks_json": dg.MetadataValue.json(rounded(decision["checks"])),
            },
        )

    @dg.asset(
        name="champion",
        group_name=GROUP,
        deps=[evaluation_report],
        kinds={"lightgbm"},
        owners=spec.owners or None,
        tags={"stage": "training"},
        automation_condition=dg.AutomationCondition.eager()
        & dg.AutomationCondition.all_deps_blocking_checks_passed(),
        description=(
            "The model version in production: the challenger is promoted here (the registry's "
            "`champion` alias, written atomically, with an audit entry) only after "
            "`promotion_gate` passed. Roll back with `ml-lifecycle rollback`."
        ),
    )
    def champion(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        report = json.loads((paths.reports / "evaluation.json").read_text())
        decision = report["promotion"]
        reg = registry()
        version = decision["challenger"]
        previous = reg.alias("champion")
        if previous != version:
            reg.promote(version, decision["reason"], metrics=report["metrics"]["test"])
        context.log.info(f"champion: {version} (was {previous})")
        return dg.MaterializeResult(
            metadata={
                "champion_version": version,
                "previous_champion": previous or "none",
                **_floats(report["metrics"]["test"], "test_"),
                "reason": decision["reason"],
            }
        )

    return [model, evaluation_report, champion], [promotion_gate]


def _gate_markdown(checks: list[dict[str, Any]]) -> str:
    """The gate's checks as a table: what was required, what was found, by how much it missed."""
    from ml_lifecycle.assets.catalog import markdown_table

    rows = []
    for check in checks:
        value, champion = check.get("value"), check.get("champion")
        rows.append(
            [
                check["check"],
                "pass" if check["passed"] else "FAIL",
                _sig(value),
                _sig(champion) if champion is not None else "",
                _miss(check),
            ]
        )
    return markdown_table(["check", "result", "challenger", "champion", "missed by"], rows)


def _sig(value: Any) -> str:
    number = round_sig(value) if isinstance(value, int | float) else None
    return "n/a" if number is None else f"{number:g}"


def _miss(check: dict[str, Any]) -> str:
    """How far a failed threshold check is from its bound ("" when it passed or has no bound)."""
    if check["passed"] or not isinstance(check.get("value"), int | float):
        return ""
    parts = check["check"].split()
    reference = check.get("champion")
    if reference is None and len(parts) == 3 and parts[1] in (">=", "<="):
        try:
            reference = float(parts[2])
        except ValueError:
            return ""
    if not isinstance(reference, int | float):
        return ""
    return _sig(abs(check["value"] - reference))


def _experiments_markdown(rows: list[dict[str, Any]]) -> str:
    from ml_lifecycle.assets.catalog import markdown_table

    table = []
    for row in rows:
        valid = json.loads(row["valid_metrics"] or "{}")
        test = json.loads(row["test_metrics"] or "{}")
        first = next(iter(valid), None)
        table.append(
            [
                str(row["started_at"])[:19],
                row["model_version"],
                row["status"],
                row["code_version"],
                row["data_snapshot"],
                f"{valid.get(first, float('nan')):.4f}" if first else "",
                f"{test.get(first, float('nan')):.4f}" if first and test else "",
                f"{row['duration_s']:.1f}",
            ]
        )
    return markdown_table(
        ["time", "version", "status", "code", "data", "valid", "test", "s"], table
    )
