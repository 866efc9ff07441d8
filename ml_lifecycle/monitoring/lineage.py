"""Governance: from one served prediction to the model version, the training run, the data
snapshot (exact landing files by content hash) and the code version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb

from ml_lifecycle.data.ingestion import MANIFEST
from ml_lifecycle.serving.inference_log import read_predictions
from ml_lifecycle.spec import DatasetSpec
from ml_lifecycle.training.registry import ModelRegistry


class TraceError(LookupError):
    """A link of the chain is missing; the message says which."""


def find_prediction(directory: Path, request_id: str) -> dict[str, Any]:
    """The logged prediction of `request_id` (any worker's file, any log format)."""
    conn = duckdb.connect()
    try:
        relation = read_predictions(directory, conn, filename=True)
        rows = [] if relation is None else (
            relation.filter(duckdb.ColumnExpression("request_id") == duckdb.ConstantExpression(
                request_id)).limit(1).to_arrow_table().to_pylist())
    finally:
        conn.close()
    if not rows:
        raise TraceError(f"request {request_id!r} not found in the prediction log {directory}")
    record = rows[0]
    record["log_file"] = record.pop("filename")
    return record


def trace_prediction(spec: DatasetSpec, request_id: str) -> dict[str, Any]:
    """prediction -> model version -> training run -> data snapshot -> code version."""
    prediction = find_prediction(spec.paths().inference, request_id)
    version = prediction["model_version"]
    model = ModelRegistry(spec.paths().registry).load(version)
    meta = model.metadata
    chain: dict[str, Any] = {
        "request_id": request_id,
        "prediction": prediction["prediction"],
        "logged_at": prediction["logged_at"],
        "log_file": prediction["log_file"],
        "model_version": version,
        "registered_at": meta.get("registered_at"),
        "training_run_id": meta.get("run_id"),
        "data_snapshot": meta.get("data_snapshot"),
        "feature_state": meta.get("feature_state_version"),
        "code_version": meta.get("code_version"),
        "git_commit": meta.get("git_commit"),
    }
    warehouse = spec.paths().warehouse
    if warehouse.exists():
        with duckdb.connect(str(warehouse), read_only=True) as conn:
            rows = conn.execute(
                "SELECT status, started_at, duration_s FROM experiments WHERE model_version = ? "
                "AND kind = 'train'", [version]).fetchall()
            if rows:
                chain["experiment"] = {"status": rows[0][0], "started_at": str(rows[0][1]),
                                       "duration_s": rows[0][2]}
            files = conn.execute(f"SELECT table_name, path, sha256 FROM {MANIFEST} "
                                 "ORDER BY ALL").fetchall()
        # The snapshot id is a hash of the manifest at training time; say whether today's
        # warehouse still holds exactly that data.
        current = hashlib.sha256(json.dumps([list(f) for f in files]).encode()).hexdigest()[:16]
        chain["data_files_now"] = len(files)
        chain["warehouse_matches_snapshot"] = current == meta.get("data_snapshot")
    return chain
