"""The code location loads, and the flights Definitions have the stage-1 assets, checks and jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from ml_lifecycle.definitions import build_definitions
from ml_lifecycle.settings import DEFAULT_SPEC, REPO_ROOT
from ml_lifecycle.spec import load_spec

DATA_ASSETS = {"raw_flights", "raw_weather", "raw_planes", "raw_airports", "raw_airlines",
               "cleaned", "features"}


def test_dagster_validates_the_workspace(tmp_path: Path) -> None:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    env = {**os.environ, "ML_LIFECYCLE_HOME": str(tmp_path / "home"),
           "DAGSTER_HOME": str(dagster_home)}
    env.pop("ML_LIFECYCLE_DATASET", None)
    dagster = Path(sys.executable).with_name("dagster")

    done = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "All code locations passed validation" in output


def test_flights_definitions_have_the_data_stage(home: Path) -> None:
    defs = build_definitions(load_spec(DEFAULT_SPEC))
    graph = defs.resolve_asset_graph()

    data_assets = {k.to_user_string() for k in graph.get_all_asset_keys()
                   if graph.get(k).group_name == "data"}
    assert data_assets == DATA_ASSETS
    assert {p.to_user_string() for p in graph.get(dg.AssetKey("cleaned")).parent_keys} == {
        a for a in DATA_ASSETS if a.startswith("raw_")}
    assert {p.to_user_string() for p in graph.get(dg.AssetKey("features")).parent_keys} == {
        "cleaned"}

    for asset in DATA_ASSETS:
        key = dg.AssetCheckKey(dg.AssetKey(asset), "great_expectations")
        assert key in graph.asset_check_keys, asset
        assert graph.get_check_spec(key).blocking, asset

    data_job = defs.resolve_job_def("data_pipeline")
    assert {k.to_user_string() for k in data_job.asset_layer.selected_asset_keys} == DATA_ASSETS
    training_job = defs.resolve_job_def("training_pipeline")
    training_assets = {k.to_user_string() for k in training_job.asset_layer.selected_asset_keys}
    assert training_assets >= DATA_ASSETS
    assert {"landing_sensor", "lifecycle_automation"} <= {s.name for s in defs.sensors}


def test_building_the_definitions_writes_nothing(home: Path) -> None:
    build_definitions(load_spec(DEFAULT_SPEC))
    assert list(home.iterdir()) == []
