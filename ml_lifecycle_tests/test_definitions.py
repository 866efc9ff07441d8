"""The code location loads, and the flights Definitions have the stage-1 assets, checks and jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from ml_lifecycle.assets.plots import INLINE_MARKDOWN_LIMIT
from ml_lifecycle.definitions import build_definitions
from ml_lifecycle.settings import DEFAULT_SPEC, REPO_ROOT
from ml_lifecycle.spec import load_spec

DATA_ASSETS = {
    "raw_flights",
    "raw_weather",
    "raw_planes",
    "raw_airports",
    "raw_airlines",
    "cleaned",
    "features",
}


def test_dagster_validates_the_workspace(tmp_path: Path) -> None:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    env = {
        **os.environ,
        "ML_LIFECYCLE_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(dagster_home),
    }
    env.pop("ML_LIFECYCLE_DATASET", None)
    dagster = Path(sys.executable).with_name("dagster")

    done = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "All code locations passed validation" in output


def test_flights_definitions_have_the_data_stage(home: Path) -> None:
    defs = build_definitions(load_spec(DEFAULT_SPEC))
    graph = defs.resolve_asset_graph()

    data_assets = {
        k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).group_name == "data"
    }
    assert data_assets == DATA_ASSETS
    assert {p.to_user_string() for p in graph.get(dg.AssetKey("cleaned")).parent_keys} == {
        a for a in DATA_ASSETS if a.startswith("raw_")
    }
    assert {p.to_user_string() for p in graph.get(dg.AssetKey("features")).parent_keys} == {
        "cleaned"
    }

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


def test_every_asset_job_sensor_and_check_explains_itself(home: Path) -> None:
    spec = load_spec(DEFAULT_SPEC)
    defs = build_definitions(spec)
    graph = defs.resolve_asset_graph()

    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        name = key.to_user_string()
        assert node.group_name in {"data", "training", "serving", "monitoring"}, name
        assert node.description and len(node.description) > 60, name
        assert set(node.owners) == set(spec.owners), name
    for check_key in graph.asset_check_keys:
        description = graph.get_check_spec(check_key).description
        assert description and len(description) > 40, check_key

    for job in ("data_pipeline", "training_pipeline", "serving_pipeline", "monitoring_pipeline"):
        description = defs.resolve_job_def(job).description or ""
        # What it does and when it runs ("fires", "runs on demand", "every 30 s", ...).
        assert len(description) > 120, job
        assert any(word in description for word in ("Fires", "Runs", "runs", "on demand")), job
    for sensor in defs.sensors:
        assert sensor.description and any(
            word in sensor.description for word in ("Every", "Fires", "every")
        ), sensor.name
    automation = next(s for s in defs.sensors if s.name == "lifecycle_automation")
    # Dagster names automation runs __ASSET_JOB: the tags say what started them.
    assert automation.run_tags["ml_lifecycle/trigger"] == "lifecycle_automation"


def _significant_digits(value: float) -> int:
    digits = f"{abs(value):.15g}".replace(".", "").lstrip("0")
    return len(digits.rstrip("0") or "0")


def test_evaluation_plots_render_inline_and_metrics_are_rounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an instance with local compute logs (what `dagster dev` uses), every plot is a short
    markdown image the UI shows inline, and the PNG it points to is where the webserver's
    /logs route reads it; metrics are plain floats with at most 4 significant digits."""
    from ml_lifecycle_tests.test_training import write_dataset

    monkeypatch.setenv("ML_LIFECYCLE_HOME", str(tmp_path / "home"))
    spec = load_spec(write_dataset(tmp_path / "ds", "binary", rows=1500))
    defs = build_definitions(spec)
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        result = defs.resolve_job_def("training_pipeline").execute_in_process(instance=instance)
        assert result.success
        materialization = next(
            m for m in result.asset_materializations_for_node("evaluation_report")
        )
        metadata = materialization.metadata
        manager = instance.compute_log_manager

        plots = {
            label: entry.value for label, entry in metadata.items() if label.startswith("plot_")
        }
        assert set(plots) == {"plot_roc", "plot_pr", "plot_calibration", "plot_importance"}
        for label, markdown in plots.items():
            assert len(markdown) < INLINE_MARKDOWN_LIMIT, label
            match = re.fullmatch(r"!\[[^\]]+\]\(/logs/(.+)/png\)", markdown)
            assert match, markdown
            path = Path(manager.get_captured_local_path(match.group(1).split("/"), "png"))
            assert path.read_bytes().startswith(b"\x89PNG"), path

        floats = {
            label: entry.value
            for label, entry in metadata.items()
            if isinstance(entry, dg.FloatMetadataValue)
        }
        assert {"test_roc_auc", "test_log_loss", "valid_roc_auc"} <= set(floats)
        assert all(_significant_digits(v) <= 4 for v in floats.values() if v is not None), floats
        assert "plots" in metadata  # the base64 copy, for storage the webserver cannot read


def test_cli_run_shows_progress_and_ends_with_a_summary(tmp_path: Path) -> None:
    """`ml-lifecycle run` draws a step bar, then says what was materialized, how each check
    went and where to look next, and tags the run with its trigger."""
    from ml_lifecycle_tests.test_training import write_dataset

    spec_path = write_dataset(tmp_path / "ds", "binary", rows=800)
    env = {
        **os.environ,
        "ML_LIFECYCLE_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "ML_LIFECYCLE_DATASET": str(spec_path),
    }
    cli = Path(sys.executable).with_name("ml-lifecycle")

    done = subprocess.run(
        [str(cli), "run", "data_pipeline"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"data_pipeline: 100%\|.*\| 6/6", output), output  # 3 assets + 3 checks
    run_id = re.search(r"run ([0-9a-f]{8}) of data_pipeline: SUCCESS", output).group(1)
    assert re.search(r"materialized features +800 rows", output), output
    assert "check features:great_expectations passed" in output
    assert re.search(rf"details: `make ui`, then http://127\.0\.0\.1:3001/runs/{run_id}", output)
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        run = next(r for r in instance.get_runs() if r.run_id.startswith(run_id))
        assert run.job_name == "data_pipeline"
        assert run.tags["ml_lifecycle/trigger"] == "cli"


@pytest.mark.parametrize(("environment", "advised"), [(None, "False"), ("1", "True")])
def test_numpy_huge_page_advice_is_off_unless_the_environment_asks(
    environment: str | None, advised: str
) -> None:
    """The package turns off numpy's huge-page advice (each fresh large array cost ~4x to touch
    on THP-`madvise` kernels); numpy's own switch in the environment still decides."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if environment is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = environment
    code = ("import ml_lifecycle, numpy._core.multiarray as m; "
            "print(m._get_madvise_hugepage())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == advised
