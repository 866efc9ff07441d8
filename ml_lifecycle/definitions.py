"""The one Definitions object of the ml-lifecycle code location, built from the dataset spec.

`ML_LIFECYCLE_DATASET` selects the spec (default datasets/flights.yaml) and
`ML_LIFECYCLE_HOME` where runs write (default data/).
"""

from __future__ import annotations

import dagster as dg

from ml_lifecycle.assets.checks import build_validation_checks
from ml_lifecycle.assets.data import build_data_assets
from ml_lifecycle.assets.monitoring import build_monitoring_assets
from ml_lifecycle.assets.serving import build_serving_assets
from ml_lifecycle.assets.training import build_training_assets
from ml_lifecycle.monitoring.notifier import Notifier
from ml_lifecycle.resources import Warehouse
from ml_lifecycle.sensors import build_landing_sensor
from ml_lifecycle.settings import dataset_spec_path
from ml_lifecycle.spec import DatasetSpec, load_spec
from ml_lifecycle.training.cluster import TrainingCluster, executor_from_env


def build_definitions(spec: DatasetSpec) -> dg.Definitions:
    paths = spec.paths()
    data_assets = build_data_assets(spec)
    checks = build_validation_checks(spec)
    training_assets, training_checks = build_training_assets(spec)
    serving_assets = build_serving_assets(spec)
    monitoring_assets, monitoring_checks = build_monitoring_assets(spec)
    data_pipeline = dg.define_asset_job(
        "data_pipeline",
        selection=dg.AssetSelection.groups("data"),
        description=(
            "Stage 1: ingest new landing files into raw_* tables (only files not seen before), "
            "clean and join them, build features; blocking Great Expectations checks stop bad "
            "data before it reaches the next table. Fires when `landing_sensor` sees new or "
            "changed landing files (checked every 30 s; runs tagged ml_lifecycle/trigger="
            "landing_sensor), or on demand: Materialize all on this page, "
            "`ml-lifecycle run data_pipeline`."
        ),
    )
    training_pipeline = dg.define_asset_job(
        "training_pipeline",
        selection=dg.AssetSelection.groups("data", "training")
        | dg.AssetSelection.assets("online_features"),
        description=(
            "The main job, stages 1-2: raw files -> features -> model -> evaluation_report -> "
            "champion (the blocking promotion_gate check decides) plus the online feature "
            "snapshot; works on a fresh home with no arguments (landing files are created if "
            "missing). Runs on demand: `make demo`, `ml-lifecycle run`, Materialize all on this "
            "page. Retraining by itself needs no job: `lifecycle_automation` re-materializes "
            "model -> champion when drift fails `retrain_required` or the params file changes."
        ),
    )
    serving_pipeline = dg.define_asset_job(
        "serving_pipeline",
        selection=dg.AssetSelection.groups("serving"),
        description=(
            "Stage 3: export the online feature snapshot and build a Bento for the current "
            "champion (`bentoml build`); the asset metadata shows the command to serve it. Run "
            "it on demand to ship a container; `make serve` needs no Bento (the service follows "
            "the registry's champion alias live)."
        ),
    )
    monitoring_pipeline = dg.define_asset_job(
        "monitoring_pipeline",
        selection=dg.AssetSelection.assets("drift_metrics"),
        description=(
            "Stage 4: drift and live performance per window of the inference log, with checks "
            "that name the features and thresholds passed. A failed `retrain_required` check "
            "makes `lifecycle_automation` retrain the model on its next tick. Runs on demand "
            "(the demo runs it after every replayed month; add a schedule in production)."
        ),
    )
    notifier = Notifier(
        webhook_url=spec.monitoring.webhook_url or "", alerts_file=str(paths.root / "alerts.jsonl")
    )

    @dg.run_failure_sensor(
        name="run_failure_alerts",
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Fires when any run of this code location fails: sends "
        "an alert (run log, <home>/alerts.jsonl and the spec's "
        "monitoring.webhook_url when set) naming the job and "
        "the error.",
    )
    def run_failure_alerts(context: dg.RunFailureSensorContext) -> None:
        notifier.send(
            "run_failed",
            "error",
            f"run {context.dagster_run.run_id[:8]} of {context.dagster_run.job_name} "
            f"failed: {context.failure_event.message}",
            dataset=spec.name,
        )

    automation = dg.AutomationConditionSensorDefinition(
        "lifecycle_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        # Automation runs are named __ASSET_JOB by Dagster; the tags say why they started.
        run_tags={
            "ml_lifecycle/trigger": "lifecycle_automation",
            "ml_lifecycle/why": "automation condition (see the asset's Automation tab)",
        },
        description=(
            "Every 30 s, evaluates the assets' automation conditions and launches runs (tagged "
            "ml_lifecycle/trigger=lifecycle_automation): cleaned/features refresh when their "
            "inputs change and their blocking checks pass; the model retrains when a failing "
            "`drift_metrics` retrain_required check asks for it or its params file (code "
            "version) changes; evaluation, the promotion gate and promotion follow."
        ),
    )
    return dg.Definitions(
        assets=[*data_assets, *training_assets, *serving_assets, *monitoring_assets],
        asset_checks=[*checks, *training_checks, *monitoring_checks],
        jobs=[data_pipeline, training_pipeline, serving_pipeline, monitoring_pipeline],
        sensors=[build_landing_sensor(spec, data_pipeline), automation, run_failure_alerts],
        resources={
            "warehouse": Warehouse(database=str(paths.warehouse)),
            "notifier": notifier,
            "cluster": TrainingCluster.from_env(),
        },
        executor=executor_from_env(),
    )


defs = build_definitions(load_spec(dataset_spec_path()))


def job_by_name(name: str) -> dg.JobDefinition:
    """Reconstructor for `dg.build_reconstructable_job` (the CLI runs jobs through it)."""
    return defs.resolve_job_def(name)
