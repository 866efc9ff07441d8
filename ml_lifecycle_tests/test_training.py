"""Stage 2 end to end: binary, regression and multiclass datasets made here go through the same
training job; the gate promotes or refuses; a killed run leaves the registry as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
import yaml

from ml_lifecycle.definitions import build_definitions
from ml_lifecycle.spec import load_spec
from ml_lifecycle.training.params import ParamsError, load_params, params_code_version
from ml_lifecycle.training.registry import ModelRegistry, RegistryError

METRIC_NAMES = {
    "binary": {"roc_auc", "pr_auc", "log_loss", "brier", "accuracy"},
    "regression": {"rmse", "mae", "r2"},
    "multiclass": {"accuracy", "macro_f1", "log_loss"},
}


def write_dataset(folder: Path, task: str, rows: int = 3000, seed: int = 0,
                  params: dict | None = None, promotion: dict | None = None) -> Path:
    """A synthetic dataset (CSV + spec + params) with a learnable signal; returns the spec path."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-01-01T00:00")
    minutes = np.sort(rng.integers(0, 60 * 24 * 180, rows))
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    segment = rng.choice(["north", "south", "east", "west"], size=rows)
    effect = np.select([segment == "north", segment == "south"], [1.0, -1.0], 0.0)
    score = 1.5 * x1 - x2 + effect + rng.normal(scale=0.7, size=rows)
    if task == "binary":
        outcome = (score > 0.3).astype(int)
    elif task == "regression":
        outcome = 10 + 3 * score
    else:
        outcome = np.where(score < -0.7, "low", np.where(score < 0.7, "mid", "high"))
    frame = pl.DataFrame({
        "event_id": np.arange(rows),
        "happened_at": (start + minutes.astype("timedelta64[m]")).astype("datetime64[us]"),
        "x1": x1, "x2": x2, "segment": segment, "outcome": outcome,
    })
    (folder / "data").mkdir(parents=True, exist_ok=True)
    frame.write_csv(folder / "data" / "events.csv")
    spec = {
        "name": f"synthetic_{task}",
        "task": task,
        "source": {"path": "data/events.csv"},
        "target": "outcome",
        "time_column": "happened_at",
        "id_columns": ["event_id"],
        "categorical_columns": ["segment"],
        "slice_columns": ["segment"],
        "split": {"method": "time", "period": "month", "test": 1, "valid": 1},
        "thresholds": {"promotion": promotion or {}, "champion_tolerance": 0.0},
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    (folder / "spec.params.yaml").write_text(yaml.safe_dump(params or {
        "lightgbm": {"num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 20},
        "num_boost_round": 200, "early_stopping_rounds": 20}))
    return folder / "spec.yaml"


def run_training(spec_path: Path, run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    defs = build_definitions(load_spec(spec_path))
    job = defs.resolve_job_def("training_pipeline")
    return job.execute_in_process(instance=dg.DagsterInstance.ephemeral(),
                                  run_config=run_config, raise_on_error=False)


@pytest.fixture
def lifecycle_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("ML_LIFECYCLE_HOME", str(home))
    return home


@pytest.mark.parametrize("task", ["binary", "regression", "multiclass"])
def test_every_task_goes_through_the_same_job(task: str, tmp_path: Path, lifecycle_home: Path):
    spec_path = write_dataset(tmp_path / task, task)
    result = run_training(spec_path)
    assert result.success, [e.message for e in result.all_events if e.is_failure]

    name = f"synthetic_{task}"
    report = json.loads((lifecycle_home / name / "reports" / "evaluation.json").read_text())
    assert report["dataset"] == name and report["task"] == task
    assert report["model_version"] == "v0001"
    assert set(report["metrics"]["test"]) == METRIC_NAMES[task]
    assert set(report["metrics"]["valid"]) == METRIC_NAMES[task]
    assert (lifecycle_home / name / "reports" / "evaluation.html").read_text().count("<img") >= 2
    test = report["metrics"]["test"]
    baseline = report["baseline"]["test"]
    if task == "binary":
        assert test["roc_auc"] > 0.8 > baseline["roc_auc"]
    elif task == "regression":
        assert test["rmse"] < 0.6 * baseline["rmse"] and test["r2"] > 0.6
    else:
        assert test["accuracy"] > baseline["accuracy"] + 0.2
    assert {row["slice"] for row in report["slices"]["rows"]} == {"north", "south", "east", "west"}
    rows = report["rows"]
    assert rows["train"] > rows["valid"] > 0 and rows["test"] > 0

    registry = ModelRegistry(lifecycle_home / name / "registry")
    assert registry.aliases() == {"champion": "v0001", "challenger": "v0001"}
    version = registry.load("v0001")
    assert version.metadata["task"] == task
    assert version.reference_profile()["features"]["x1"]["kind"] == "numeric"
    assert (version.path / "model.txt").read_text().startswith("tree")
    assert [e["event"] for e in registry.audit_log()] == ["promoted"]

    with duckdb.connect(str(lifecycle_home / name / "warehouse.duckdb"), read_only=True) as conn:
        runs = conn.execute("SELECT model_version, status, code_version, data_snapshot, "
                            "test_metrics FROM experiments WHERE kind = 'train'").fetchall()
    assert len(runs) == 1
    model_version, status, code_version, snapshot, test_metrics = runs[0]
    assert model_version == "v0001" and status == "evaluated"
    assert code_version == params_code_version(spec_path.with_name("spec.params.yaml"))
    assert snapshot and set(json.loads(test_metrics)) == METRIC_NAMES[task]


def test_gate_refuses_a_worse_challenger_and_rollback_restores(tmp_path: Path,
                                                              lifecycle_home: Path):
    spec_path = write_dataset(tmp_path / "gate", "binary", promotion={"roc_auc": 0.6})
    assert run_training(spec_path).success
    registry = ModelRegistry(lifecycle_home / "synthetic_binary" / "registry")
    assert registry.alias("champion") == "v0001"

    # A deliberately weak challenger: one tree, two leaves.
    weak = {"ops": {"model": {"config": {"num_boost_round": 1, "overrides": "{num_leaves: 2}"}}}}
    result = run_training(spec_path, weak)
    gate = [e for e in result.get_asset_check_evaluations() if e.check_name == "promotion_gate"]
    assert len(gate) == 1 and not gate[0].passed
    assert "not worse than champion v0001" in gate[0].description
    assert not result.success  # the blocking gate failed: `champion` did not run
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "champion" not in materialized and "model" in materialized
    assert registry.aliases() == {"champion": "v0001", "challenger": "v0002"}
    assert [e["event"] for e in registry.audit_log()] == ["promoted", "refused"]

    # A good challenger is promoted, and rollback returns to the previous champion.
    assert run_training(spec_path).success
    assert registry.alias("champion") == "v0003"
    entry = registry.rollback()
    assert entry["version"] == "v0001" and registry.alias("champion") == "v0001"
    with pytest.raises(RegistryError, match="not found"):
        registry.rollback(to="v0099")


def test_bad_params_name_the_key(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text("lightgbm:\n  num_leavs: 31\n")
    with pytest.raises(ParamsError, match=r"lightgbm\.num_leavs: unknown key"):
        load_params(path)
    path.write_text("lightgbm:\n  learning_rate: fast\n")
    with pytest.raises(ParamsError, match=r"lightgbm\.learning_rate"):
        load_params(path)
    path.write_text("search:\n  trials: 2\n  space: {num_trees: [1, 2]}\n")
    with pytest.raises(ParamsError, match=r"search\.space\.num_trees"):
        load_params(path)


def test_bad_override_fails_the_run_and_keeps_the_registry(tmp_path: Path, lifecycle_home: Path):
    spec_path = write_dataset(tmp_path / "override", "binary")
    assert run_training(spec_path).success
    registry = ModelRegistry(lifecycle_home / "synthetic_binary" / "registry")
    before = (registry.versions(), registry.aliases())
    result = run_training(spec_path, {"ops": {"model": {"config": {"overrides": "{num_leavs: 3}"}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "lightgbm.num_leavs: unknown key" in failure.event_specific_data.error.to_string()
    assert (registry.versions(), registry.aliases()) == before


def test_search_records_every_trial(tmp_path: Path, lifecycle_home: Path):
    spec_path = write_dataset(tmp_path / "search", "binary", params={
        "lightgbm": {"num_leaves": 15}, "num_boost_round": 50, "early_stopping_rounds": 10,
        "search": {"method": "grid", "trials": 4,
                   "space": {"num_leaves": [4, 15], "learning_rate": [0.05, 0.2]}}})
    assert run_training(spec_path).success
    warehouse = lifecycle_home / "synthetic_binary" / "warehouse.duckdb"
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        trials = conn.execute("SELECT params, valid_metrics FROM experiments "
                              "WHERE kind = 'trial'").fetchall()
    assert len(trials) == 4
    leaves = sorted((json.loads(p)["num_leaves"], json.loads(p)["learning_rate"]) for p, _ in trials)
    assert leaves == [(4, 0.05), (4, 0.2), (15, 0.05), (15, 0.2)]
    best = max(json.loads(m)["roc_auc"] for _, m in trials)
    chosen = ModelRegistry(lifecycle_home / "synthetic_binary" / "registry").load("v0001")
    assert chosen.metadata["valid_metrics"]["roc_auc"] == pytest.approx(best)


def test_params_change_marks_model_stale(tmp_path: Path, lifecycle_home: Path):
    spec_path = write_dataset(tmp_path / "stale", "binary")
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions(load_spec(spec_path))
    assert defs.resolve_job_def("training_pipeline").execute_in_process(instance=instance).success
    unchanged = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert unchanged.get_num_requested(dg.AssetKey("model")) == 0

    params = spec_path.with_name("spec.params.yaml")
    params.write_text(params.read_text().replace("num_leaves: 15", "num_leaves: 7"))
    changed_defs = build_definitions(load_spec(spec_path))
    result = dg.evaluate_automation_conditions(defs=changed_defs, instance=instance,
                                               cursor=unchanged.cursor)
    assert result.get_num_requested(dg.AssetKey("model")) == 1
    # The next tick, with nothing changed since, requests nothing again (no duplicate runs).
    again = dg.evaluate_automation_conditions(defs=changed_defs, instance=instance,
                                              cursor=result.cursor)
    assert again.get_num_requested(dg.AssetKey("model")) == 0


def test_a_killed_training_run_leaves_registry_and_champion_untouched(tmp_path: Path,
                                                                      lifecycle_home: Path):
    spec_path = write_dataset(tmp_path / "kill", "binary", rows=20000)
    assert run_training(spec_path).success
    registry = ModelRegistry(lifecycle_home / "synthetic_binary" / "registry")
    before = (registry.versions(), registry.aliases(), len(registry.audit_log()))

    # A long training run in another process, killed while it trains.
    slow = spec_path.with_name("spec.params.yaml")
    slow.write_text(yaml.safe_dump({"lightgbm": {"learning_rate": 0.001, "num_leaves": 63},
                                    "num_boost_round": 100000, "early_stopping_rounds": 100000}))
    script = textwrap.dedent(f"""
        import dagster as dg
        from ml_lifecycle.definitions import build_definitions
        from ml_lifecycle.spec import load_spec
        defs = build_definitions(load_spec({str(spec_path)!r}))
        print("training", flush=True)
        defs.resolve_job_def("training_pipeline").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), asset_selection=[dg.AssetKey("model")])
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               env={**os.environ}, start_new_session=True)
    assert process.stdout.readline().strip() == b"training"
    time.sleep(6)  # well into boosting
    assert process.poll() is None, "the run finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    assert (registry.versions(), registry.aliases(), len(registry.audit_log())) == before
    registry.clean_staging()
    assert registry.load(registry.alias("champion")).booster().num_trees() > 0


def test_encoder_codes_dictionary_columns_as_it_codes_their_text() -> None:
    """Training reads ENUM columns dictionary-encoded; the codes must be those of the text:
    known levels at their vocabulary position, unseen levels and nulls missing."""
    import numpy as np
    import pyarrow as pa

    from ml_lifecycle.data.features import FeatureEncoder, FeatureSpec, FeatureState

    state = FeatureState(dataset="d", categories={"c": ["b", "a", "z"]},
                         features=[FeatureSpec(name="c", kind="categorical", categorical=True)])
    rng = np.random.default_rng(3)
    text = [None if r < 0.1 else str(v) for r, v in
            zip(rng.random(5000), rng.choice(["a", "b", "c", "d", "z"], 5000), strict=True)]
    encoded = pa.chunked_array([pa.array(text[:2500]).dictionary_encode(),
                                pa.array(text[2500:]).dictionary_encode()])
    encoder = FeatureEncoder(state)
    from_dictionary = encoder.category_codes("c", encoded)
    from_text = encoder.category_codes("c", pa.array(text))
    expected = np.array([{"b": 0, "a": 1, "z": 2}.get(v, np.nan) if v else np.nan for v in text],
                        dtype=np.float32)
    np.testing.assert_array_equal(from_dictionary, expected)
    np.testing.assert_array_equal(from_text, expected)
