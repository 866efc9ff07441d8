"""Stage 4 end to end: drift injected into served traffic fails the retrain check, the
automation requests exactly one retrain (none during the cooldown), the retrained model is
promoted and the running service answers with it; alerts reach a webhook; a prediction traces
back to its training run, data and code."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from ml_lifecycle.definitions import build_definitions
from ml_lifecycle.monitoring.lineage import trace_prediction
from ml_lifecycle.monitoring.notifier import Notifier
from ml_lifecycle.serving.runtime import ServingRuntime
from ml_lifecycle.spec import load_spec
from ml_lifecycle.training.registry import ModelRegistry
from ml_lifecycle_tests.test_training import write_dataset


def _with_monitoring(spec_path: Path, **monitoring) -> Path:
    data = yaml.safe_load(spec_path.read_text())
    data["monitoring"] = {"window": "month", "min_rows": 50, **monitoring}
    spec_path.write_text(yaml.safe_dump(data))
    return spec_path


def _requests(folder: Path, shift: float = 0.0) -> tuple[list[dict], list[int]]:
    frame = pl.read_csv(folder / "data" / "events.csv", try_parse_dates=True)
    frame = frame.filter(pl.col("happened_at").dt.month() >= 5).sample(600, seed=1)
    labels = frame["outcome"].to_list()
    frame = frame.drop("outcome").with_columns(pl.col("x1") + shift, pl.col("x2") - shift)
    return frame.to_dicts(), labels


@pytest.fixture
def trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ML_LIFECYCLE_HOME", str(tmp_path / "home"))
    spec_path = _with_monitoring(write_dataset(tmp_path / "ds", "binary"), cooldown="1h")
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions(load_spec(spec_path))
    assert defs.resolve_job_def("training_pipeline").execute_in_process(
        instance=instance).success
    return spec_path, instance


def _monitor(defs, instance) -> dict[str, dg.AssetCheckEvaluation]:
    result = defs.resolve_job_def("monitoring_pipeline").execute_in_process(
        instance=instance, raise_on_error=False)
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_drift_retrains_once_promotes_and_the_service_swaps(trained, tmp_path: Path):
    spec_path, instance = trained
    spec = load_spec(spec_path)
    defs = build_definitions(spec)
    runtime = ServingRuntime(spec, watch_interval=0.1)
    try:
        baseline = dg.evaluate_automation_conditions(defs=defs, instance=instance)

        # Traffic like the training data: no retrain.
        records, labels = _requests(tmp_path / "ds")
        results = runtime.score(records)
        runtime.record_labels([{"request_id": r["request_id"], "label": y}
                               for r, y in zip(results, labels, strict=True)])
        checks = _monitor(defs, instance)
        assert checks["retrain_required"].passed, checks["retrain_required"].description
        quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                  cursor=baseline.cursor)
        assert quiet.get_num_requested(dg.AssetKey("model")) == 0

        # Drifted traffic: the check fails, naming the drifted features.
        drifted, labels = _requests(tmp_path / "ds", shift=3.0)
        results = runtime.score(drifted)
        runtime.record_labels([{"request_id": r["request_id"], "label": y}
                               for r, y in zip(results, labels, strict=True)])
        checks = _monitor(defs, instance)
        assert not checks["retrain_required"].passed
        assert "drift error" in checks["retrain_required"].description
        assert not checks["feature_drift"].passed and "x1" in checks["feature_drift"].description

        requested = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                      cursor=quiet.cursor)
        assert requested.get_num_requested(dg.AssetKey("model")) == 1
        again = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                  cursor=requested.cursor)
        assert again.get_num_requested(dg.AssetKey("model")) == 0  # no duplicate run

        # The retrain: model -> evaluation -> gate -> champion; the service follows.
        assert defs.resolve_job_def("training_pipeline").execute_in_process(
            instance=instance).success
        registry = ModelRegistry(spec.paths().registry)
        assert registry.alias("champion") == "v0002"
        runtime.reload_if_changed()
        assert runtime.score(records[:1])[0]["model_version"] == "v0002"
        again = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                  cursor=again.cursor)

        # Still drifted after the retrain (same data): a new failing evaluation asks again.
        runtime.score(drifted)
        checks = _monitor(defs, instance)
        assert not checks["retrain_required"].passed
        once_more = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                      cursor=again.cursor)
        assert once_more.get_num_requested(dg.AssetKey("model")) == 1

        chain = trace_prediction(spec, results[0]["request_id"])
        assert chain["model_version"] == "v0001"
        assert chain["training_run_id"] and chain["data_snapshot"] and chain["code_version"]
        assert chain["experiment"]["status"] in ("evaluated", "registered")
        assert chain["warehouse_matches_snapshot"] is True
    finally:
        runtime.close()


def test_no_retrain_during_cooldown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ML_LIFECYCLE_HOME", str(tmp_path / "home"))
    spec_path = _with_monitoring(write_dataset(tmp_path / "ds", "binary"), cooldown="365d")
    instance = dg.DagsterInstance.ephemeral()
    spec = load_spec(spec_path)
    defs = build_definitions(spec)
    assert defs.resolve_job_def("training_pipeline").execute_in_process(
        instance=instance).success
    runtime = ServingRuntime(spec, watch_interval=None)
    baseline = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    drifted, _ = _requests(tmp_path / "ds", shift=3.0)
    runtime.score(drifted)
    checks = _monitor(defs, instance)
    assert checks["retrain_required"].passed
    assert "cooldown" in checks["retrain_required"].description
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                               cursor=baseline.cursor)
    assert result.get_num_requested(dg.AssetKey("model")) == 0


def test_alerts_reach_a_slack_compatible_webhook(tmp_path: Path):
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        notifier = Notifier(webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
                            alerts_file=str(tmp_path / "alerts.jsonl"))
        alert = notifier.send("drift", "error", "window 2013-07: psi 0.4 on dest", dataset="x")
        assert alert["webhook_status"] == 200
        assert received and "drift" in received[0]["text"] and "ERROR" in received[0]["text"]
        logged = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text()
                  .splitlines()]
        assert logged[0]["kind"] == "drift"
        # A dead webhook is recorded, never raised.
        down = Notifier(webhook_url="http://127.0.0.1:9/hook").send("x", "warn", "y")
        assert "webhook_error" in down
    finally:
        server.shutdown()
