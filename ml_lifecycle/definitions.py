"""The one Definitions object of the ml-lifecycle code location, built from the dataset spec.

`ML_LIFECYCLE_DATASET` selects the spec (default datasets/flights.yaml) and
`ML_LIFECYCLE_HOME` where runs write (default data/).
"""

from __future__ import annotations

import dagster as dg

from ml_lifecycle.assets.checks import build_validation_checks
from ml_lifecycle.assets.data import build_data_assets
from ml_lifecycle.assets.training import build_training_assets
from ml_lifecycle.resources import Warehouse
from ml_lifecycle.sensors import build_landing_sensor
from ml_lifecycle.settings import dataset_spec_path
from ml_lifecycle.spec import DatasetSpec, load_spec


def build_definitions(spec: DatasetSpec) -> dg.Definitions:
    data_assets = build_data_assets(spec)
    checks = build_validation_checks(spec)
    training_assets, training_checks = build_training_assets(spec)
    data_pipeline = dg.define_asset_job(
        "data_pipeline",
        selection=dg.AssetSelection.groups("data"),
        description=(
            "Stage 1: ingest new landing files into raw_* tables, clean and join them, build "
            "features; Great Expectations checks block bad data. Launched by landing_sensor."
        ),
    )
    training_pipeline = dg.define_asset_job(
        "training_pipeline",
        selection=dg.AssetSelection.groups("data", "training"),
        description=(
            "The main job: raw files -> features -> model -> evaluation_report -> champion (the "
            "promotion gate decides), on a fresh home with no arguments (landing files are "
            "created if missing)."
        ),
    )
    automation = dg.AutomationConditionSensorDefinition(
        "lifecycle_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=(
            "Evaluates the assets' automation conditions every 30 s: cleaned/features refresh "
            "when their inputs change and their blocking checks pass; the model retrains when "
            "its params file (code version) changes; evaluation and promotion follow."
        ),
    )
    paths = spec.paths()
    return dg.Definitions(
        assets=[*data_assets, *training_assets],
        asset_checks=[*checks, *training_checks],
        jobs=[data_pipeline, training_pipeline],
        sensors=[build_landing_sensor(spec, data_pipeline), automation],
        resources={"warehouse": Warehouse(database=str(paths.warehouse))},
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_spec(dataset_spec_path()))


def job_by_name(name: str) -> dg.JobDefinition:
    """Reconstructor for `dg.build_reconstructable_job` (the CLI runs jobs through it)."""
    return defs.resolve_job_def(name)
