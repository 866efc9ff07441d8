"""Stage 3: the BentoML service against the pipeline that trained its model.

One synthetic dataset (trips with a delay known only afterwards, hourly readings joined as of
the trip's time, static site facts, two history aggregates) is trained once through the real
`training_pipeline` job, and one real `bentoml serve` process on 127.0.0.1 serves it (with
shadow mode on). Tests run in file order; the last one kills the server's worker.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import httpx
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml_lifecycle.data.aggregates import aggregate_sql
from ml_lifecycle.data.cleaning import clean
from ml_lifecycle.data.sources import sql_literal
from ml_lifecycle.definitions import build_definitions
from ml_lifecycle.serving.inference_log import prediction_files, read_predictions
from ml_lifecycle.serving.online_store import MemoryOnlineStore, RedisOnlineStore
from ml_lifecycle.serving.runtime import ServingRuntime
from ml_lifecycle.serving.snapshot import current_snapshot
from ml_lifecycle.spec import TIME, DatasetSpec, load_spec
from ml_lifecycle.training.dataset import load_model_data
from ml_lifecycle.training.registry import ModelRegistry
from ml_lifecycle_tests.conftest import warehouse_connection
from ml_lifecycle_tests.serving_support import Server, launch_server, write_serving_dataset
from ml_lifecycle_tests.test_training import run_training

MAX_BATCH = 300
MAX_BODY_BYTES = 400_000
AGGREGATE_COLUMNS = [
    "site_delay_3h_mean",
    "site_delay_3h_count",
    "site_delay_3h_max",
    "site_late_7d_mean",
    "site_late_7d_count",
]


@dataclass
class Served:
    """The trained dataset: its spec, the test split as raw requests, offline predictions."""

    root: Path
    home: Path
    spec_path: Path
    spec: DatasetSpec
    fields: list[str]
    test_ids: list[int]
    test_records: list[dict[str, Any]]  # raw request fields of the test split, JSON-ready
    last_time: datetime
    runtime: ServingRuntime  # in process, memory store, logs under root/inproc_log
    server: Server  # launched once the snapshot exists; the `server` fixture waits for it
    offline: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.spec.paths().registry)

    @property
    def inference_dir(self) -> Path:
        return self.spec.paths().inference

    def offline_predictions(self, version: str) -> np.ndarray:
        """The model version's predictions on the features table's test split, in test_ids order."""
        if version not in self.offline:
            loaded = self.registry.load(version)
            with warehouse_connection(self.spec.paths().warehouse) as conn:
                data = load_model_data(
                    conn, self.spec, loaded.state, classes=loaded.metadata.get("classes")
                )
            self.offline[version] = np.asarray(loaded.booster().predict(data.splits["test"].X))
        return self.offline[version]


def _json_ready(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serving")
    home = root / "home"
    patch = pytest.MonkeyPatch()
    patch.setenv("ML_LIFECYCLE_HOME", str(home))
    server: Server | None = None
    try:
        spec_path = write_serving_dataset(root / "dataset")
        result = run_training(spec_path)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
        assert {"features", "champion", "online_features"} <= materialized
        spec = load_spec(spec_path)
        # The server boots (another process) while this process reads the offline side.
        server = launch_server(
            {
                "ML_LIFECYCLE_HOME": str(home),
                "ML_LIFECYCLE_DATASET": str(spec_path),
                "BENTOML_HOME": str(root / "bentoml"),
                "ML_LIFECYCLE_SHADOW": "1",
                "ML_LIFECYCLE_MAX_BATCH": str(MAX_BATCH),
                "ML_LIFECYCLE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            },
            root / "serve.log",
        )
        runtime = ServingRuntime(
            spec, watch_interval=None, log_dir=root / "inproc_log", max_batch=MAX_BATCH
        )
        fields = [f.name for f in runtime.fields]
        assert fields == ["trip_id", "sched_at", "site", "vehicle", "distance", "passengers"]
        loaded = ModelRegistry(spec.paths().registry).load("v0001")
        with warehouse_connection(spec.paths().warehouse) as conn:
            data = load_model_data(conn, spec, loaded.state)
            test_from = data.boundaries["test_from"]
            # The order load_model_data reads rows in (time, ids, rowid), test split only.
            test_ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT trip_id FROM features WHERE __target IS NOT NULL AND {TIME} >= "
                    f"TIMESTAMP '{test_from}' ORDER BY {TIME}, trip_id, rowid"
                ).fetchall()
            ]
            columns = ", ".join(fields)
            raw = (
                conn.sql(
                    f"SELECT {columns} FROM raw_synthetic_serving WHERE trip_id IN "
                    f"(SELECT trip_id FROM features WHERE {TIME} >= TIMESTAMP "
                    f"'{test_from}')"
                )
                .to_arrow_table()
                .to_pylist()
            )
            last_time = conn.execute(f"SELECT max({TIME}) FROM features").fetchall()[0][0]
        by_id = {row["trip_id"]: {k: _json_ready(v) for k, v in row.items()} for row in raw}
        records = [by_id[i] for i in test_ids]
        assert len(records) == data.splits["test"].rows > 500
        offline = {"v0001": np.asarray(loaded.booster().predict(data.splits["test"].X))}
        served = Served(
            root,
            home,
            spec_path,
            spec,
            fields,
            test_ids,
            records,
            last_time,
            runtime,
            server,
            offline,
        )
        yield served
        runtime.close()
    finally:
        if server is not None:
            server.stop()
        patch.undo()


@pytest.fixture(scope="module")
def server(served: Served) -> Server:
    """The real `bentoml serve` of the trained dataset (shadow mode on, small limits)."""
    served.server.wait_ready(180)
    return served.server


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


_second: dict[str, str] = {}


def second_version(served: Served) -> str:
    """Train a different model (fewer leaves and rounds) through the job's `model` asset: it is
    registered as challenger, not promoted. Once per module."""
    if "version" not in _second:
        defs = build_definitions(served.spec)
        config = {"ops": {"model": {"config": {"num_leaves": 4, "num_boost_round": 12}}}}
        result = defs.resolve_job_def("training_pipeline").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(),
            asset_selection=[dg.AssetKey("model")],
            run_config=config,
            raise_on_error=False,
        )
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        _second["version"] = served.registry.alias("challenger")
        assert _second["version"] != "v0001"
    return _second["version"]


def logged(served: Served, request_ids: list[str], wait: float = 5.0) -> dict[str, dict[str, Any]]:
    """Logged prediction lines (all workers' files) for these request ids, by id; waits up to
    `wait` seconds for them (the service group-commits its log every 0.5 s)."""
    deadline = time.monotonic() + wait
    while True:
        found = _logged_now(served, request_ids)
        if len(found) == len(set(request_ids)) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _logged_now(
    served: Served, request_ids: list[str], directory: Path | None = None
) -> dict[str, dict[str, Any]]:
    conn = duckdb.connect()
    relation = read_predictions(directory or served.inference_dir, conn)
    if relation is None:  # no flush has written a file yet
        return {}
    relation.create_view("predictions")
    conn.register("wanted", pa.table({"request_id": request_ids}))
    rows = (
        conn.sql("SELECT p.* FROM predictions p JOIN wanted USING (request_id)")
        .to_arrow_table()
        .to_pylist()
    )
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert row["request_id"] not in by_id, f"{row['request_id']} logged twice"
        by_id[row["request_id"]] = row
    return by_id


def wait_until(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


# -- 1. parity -----------------------------------------------------------------------------


def test_http_predictions_equal_offline_predictions(served: Served, client: httpx.Client):
    """The test split through HTTP (raw request fields only; readings, site facts and history
    looked up by the service) scores exactly as the features table does offline."""
    predictions, versions = [], set()
    for start in range(0, len(served.test_records), MAX_BATCH):
        response = client.post(
            "/predict_batch", json={"records": served.test_records[start : start + MAX_BATCH]}
        )
        assert response.status_code == 200, response.text
        answers = response.json()["predictions"]
        predictions += [a["prediction"] for a in answers]
        versions |= {a["model_version"] for a in answers}
    assert versions == {"v0001"}
    assert any(r["site"] is None for r in served.test_records)  # null keys are scored too
    offline = served.offline_predictions("v0001")
    assert len(predictions) == len(offline)
    np.testing.assert_allclose(predictions, offline, rtol=0, atol=1e-9)
    # One record at a time gives the same answers (no batch effects in the joins or history).
    for index in (0, len(offline) // 2, len(offline) - 1):
        single = client.post("/predict", json=served.test_records[index])
        assert single.status_code == 200, single.text
        assert abs(single.json()["prediction"] - offline[index]) <= 1e-9
        assert single.headers["content-type"] == "application/json"  # fixed once per route


def test_json_routes_have_their_media_type_fixed_once(served: Served):
    """BentoML would rebuild each JSON route's output schema on every response to find its
    media type; the service fixes it once, to what that schema gives."""
    show = (
        "import json, ml_lifecycle.serving.service as s; "
        "print(json.dumps({k: a.output_spec.media_type for k, a in s.Predictor.apis.items()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", show],
        env={**os.environ, **_service_env(served), "ML_LIFECYCLE_INFERENCE_LOG": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    types = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("predict", "predict_batch", "predict_columns", "events", "labels", "model"):
        assert types[name] == "application/json", (name, types)


def _service_env(served: Served) -> dict[str, str]:
    return {"ML_LIFECYCLE_HOME": str(served.home), "ML_LIFECYCLE_DATASET": str(served.spec_path)}


def test_columns_payload_scores_like_records(served: Served, client: httpx.Client):
    """/predict_columns (one list per field) answers what /predict_batch answers, as lists."""
    records = served.test_records[:MAX_BATCH]
    columns = {name: [r[name] for r in records] for name in served.fields}
    response = client.post("/predict_columns", json={"columns": columns})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model_version", "request_ids", "predictions", "labels"}
    assert body["model_version"] == "v0001" and len(set(body["request_ids"])) == len(records)
    offline = served.offline_predictions("v0001")[: len(records)]
    np.testing.assert_allclose(body["predictions"], offline, rtol=0, atol=1e-9)
    assert body["labels"] == [int(p >= 0.5) for p in body["predictions"]]
    # An optional field may be left out (null for every record); bad values name the field.
    optional = {k: v for k, v in columns.items() if k != "passengers"}
    assert client.post("/predict_columns", json={"columns": optional}).status_code == 200
    cases = [
        ({**columns, "distance": columns["distance"][:-1]}, ["lengths", "distance"]),
        ({**columns, "distance": ["far", *columns["distance"][1:]]}, ["distance", "0"]),
        ({k: v for k, v in columns.items() if k != "site"}, ["site"]),
        ({**columns, "site": ["atlantis", *columns["site"][1:]]}, ["record 0", "site"]),
        ({**columns, "delay": [1] * len(records)}, ["delay"]),
        ({**columns, "distance": [math.nan, *columns["distance"][1:]]}, ["distance.0", "finite"]),
        ({**columns, "distance": _at(columns["distance"], 1, math.inf)}, ["distance.1", "finite"]),
        ({**columns, "distance": _at(columns["distance"], 2, True)}, ["distance.2"]),
        ({**columns, "passengers": _at(columns["passengers"], 3, 2.5)}, ["passengers.3"]),
        ({**columns, "passengers": _at(columns["passengers"], 0, 2**70)}, ["passengers.0"]),
        ({**columns, "sched_at": _at(columns["sched_at"], 4, "yesterday")}, ["sched_at.4"]),
        ({**columns, "trip_id": _at(columns["trip_id"], 5, None)}, ["trip_id.5", "null"]),
        ({**columns, "distance": 5.0}, ["distance", "list"]),
        ({k: [] for k in columns}, ["empty"]),
        ({k: v * 2 for k, v in columns.items()}, [str(MAX_BATCH)]),
    ]
    for body_columns, words in cases:
        bad = client.post(  # json.dumps writes NaN and Infinity as JavaScript does
            "/predict_columns",
            content=json.dumps({"columns": body_columns}),
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400 and all(w in bad.text for w in words), bad.text[:300]


ARROW_STREAM = "application/vnd.apache.arrow.stream"


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_arrow_payload_scores_like_records(served: Served, client: httpx.Client):
    """/predict_arrow (an Arrow IPC stream, one column per field) answers the offline
    predictions as an Arrow stream; wrong types, values and bodies are 4xx naming the field."""
    records = served.test_records[:MAX_BATCH]
    columns = {name: [r[name] for r in records] for name in served.fields}
    columns["sched_at"] = [datetime.fromisoformat(v) for v in columns["sched_at"]]
    table = pa.table(columns)

    def post(body: bytes, content_type: str = ARROW_STREAM) -> httpx.Response:
        return client.post("/predict_arrow", content=body, headers={"content-type": content_type})

    response = post(_arrow(table))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == ARROW_STREAM
    answer = pa.ipc.open_stream(response.content).read_all()
    assert answer.column_names == ["request_id", "model_version", "prediction", "label"]
    offline = served.offline_predictions("v0001")[: len(records)]
    np.testing.assert_allclose(answer["prediction"].to_numpy(), offline, rtol=0, atol=1e-9)
    assert set(answer["model_version"].to_pylist()) == {"v0001"}
    assert answer["label"].to_pylist() == [int(p >= 0.5) for p in answer["prediction"].to_pylist()]
    logged_rows = logged(served, answer["request_id"].to_pylist())
    assert len(logged_rows) == len(records)
    # Narrower Arrow types and a dictionary-encoded text column are what they say they are.
    narrow = table.set_column(
        table.schema.get_field_index("site"), "site", table["site"].dictionary_encode()
    )
    assert post(_arrow(narrow)).status_code == 200
    assert post(_arrow(table.drop_columns(["passengers"]))).status_code == 200  # optional

    def replaced(name: str, values: pa.Array) -> pa.Table:
        return table.set_column(table.schema.get_field_index(name), name, values)

    distance = table["distance"].to_pylist()
    cases = [
        (table.drop_columns(["site"]), ["missing", "site"]),
        (table.append_column("delay", pa.array([1] * len(records))), ["unknown", "delay"]),
        (replaced("distance", pa.array(["far"] * len(records))), ["distance", "numbers"]),
        (replaced("distance", pa.array(_at(distance, 1, math.inf))), ["distance.1", "finite"]),
        (replaced("passengers", pa.array([2.5] * len(records))), ["passengers", "integers"]),
        (replaced("trip_id", pa.array(_at(columns["trip_id"], 5, None))), ["trip_id.5", "null"]),
        (replaced("site", pa.array(_at(columns["site"], 0, "atlantis"))), ["record 0", "site"]),
        (
            replaced("sched_at", table["sched_at"].cast(pa.timestamp("us", tz="UTC"))),
            ["sched_at", "zone"],
        ),
        (pa.concat_tables([table, table]), [str(MAX_BATCH)]),
        (table.slice(0, 0), ["empty"]),
    ]
    for bad_table, words in cases:
        bad = post(_arrow(bad_table))
        assert bad.status_code == 400 and all(w in bad.text for w in words), bad.text[:300]
    assert post(b"not arrow at all").status_code == 400
    assert post(_arrow(table)[:100]).status_code == 400  # a truncated stream
    assert post(b"{}", "application/json").status_code == 415
    assert (
        client.post(
            "/predict_batch", content=_arrow(table), headers={"content-type": ARROW_STREAM}
        ).status_code
        == 415
    )
    assert client.post("/model").status_code == 200  # still serving


def _at(values: list[Any], index: int, value: Any) -> list[Any]:
    return [*values[:index], value, *values[index + 1 :]]


def test_compiled_serving_path_equals_the_pipeline_sql_on_every_row(served: Served):
    """The service's compiled cleaning (column rules, in-memory reference lookups) and the
    pipeline's cleaning SQL give the same columns and predictions for every row of the dataset
    (null keys, out-of-range values, readings older than max_age included); the encoder's time
    parts and category codes equal the features table's SQL on every row."""
    from ml_lifecycle.data.features import FeatureEncoder, time_parts
    from ml_lifecycle.training.dataset import matrix_select_sql

    runtime = served.runtime
    assert runtime.transform is not None and runtime.model.compiled
    with warehouse_connection(served.spec.paths().warehouse) as conn:
        records = (
            conn.sql(
                f"SELECT {', '.join(served.fields)} FROM raw_synthetic_serving ORDER BY trip_id"
            )
            .to_arrow_table()
            .to_pylist()
        )
        state = runtime.model.state
        parts = [name for name in state.feature_names if name.startswith("time__")]
        table = conn.sql(
            f"SELECT f.{TIME}, {', '.join(f'f.{n} AS sql_{n}' for n in parts)}, "
            f"{', '.join(matrix_select_sql(state))} FROM features f"
        ).pl()
        features = conn.sql(
            f"SELECT {TIME}, * EXCLUDE ({TIME}) REPLACE ("
            + ", ".join(f"CAST({n} AS VARCHAR) AS {n}" for n in state.categorical_features)
            + ") FROM features"
        ).pl()
    assert len(records) == 5000
    inputs = {name: [r[name] for r in records] for name in served.fields}
    compiled = runtime._clean_compiled(inputs, len(records))
    by_sql = runtime._with_aggregates(runtime._clean(records))
    for name in by_sql.column_names:
        if name.startswith("__") and name != TIME:
            continue  # target, aggregate inputs, request row: not used for scoring
        want = by_sql.column(name).to_pylist()
        have = compiled[name]
        if name == TIME:
            have = have.astype("datetime64[us]").tolist()
        elif isinstance(have, np.ndarray) and have.dtype.kind == "f":
            have = [None if v != v else v for v in have.tolist()]
            want = [None if v is None else float(v) for v in want]
        else:
            have = list(have)
        assert have == want, name
    assert np.isnan(compiled["readings_wind"]).any()  # stale or unmatched readings exist
    assert "(missing)" in set(compiled["site"].tolist())

    encoder = FeatureEncoder(state)
    for name, values in time_parts(table[TIME].to_numpy()).items():
        np.testing.assert_array_equal(values, table[f"sql_{name}"].to_numpy().astype(np.float64))
    columns = {f.name: features[f.name].to_list() for f in state.features if f.kind != "time"}
    columns[TIME] = features[TIME].to_numpy()
    by_sql_matrix = table.select(state.feature_names).to_numpy().astype(np.float32)
    np.testing.assert_array_equal(encoder.matrix(columns, features.height), by_sql_matrix)

    previous = os.environ.get("ML_LIFECYCLE_SERVING_SQL")
    os.environ["ML_LIFECYCLE_SERVING_SQL"] = "1"
    try:
        sql_runtime = ServingRuntime(
            served.spec, watch_interval=None, log_dir=served.root / "sql_log", max_batch=5000
        )
    finally:
        if previous is None:
            os.environ.pop("ML_LIFECYCLE_SERVING_SQL")
        else:
            os.environ["ML_LIFECYCLE_SERVING_SQL"] = previous
    try:
        assert sql_runtime.transform is None
        runtime.max_batch = 5000
        fast = [r["prediction"] for r in runtime.score(records, log=False)]
        slow = [r["prediction"] for r in sql_runtime.score(records, log=False)]
        np.testing.assert_array_equal(fast, slow)
    finally:
        runtime.max_batch = MAX_BATCH
        sql_runtime.close()


# -- 2. online vs offline aggregates --------------------------------------------------------


def test_online_store_equals_offline_aggregates(served: Served):
    """For every row of the features table, the online store (seeded from the snapshot) gives
    the statistics the offline SQL computed, for the same site and time."""
    with warehouse_connection(served.spec.paths().warehouse) as conn:
        frame = conn.sql(
            f"SELECT CAST(site AS VARCHAR) AS site, {TIME}, "
            f"{', '.join(AGGREGATE_COLUMNS)} FROM features"
        ).pl()
    keys = [(site,) for site in frame["site"].to_list()]
    times = frame[TIME].to_numpy()
    compared = 0
    for aggregate in served.spec.aggregates:
        online = served.runtime.store.query(aggregate, keys, times)
        for stat in aggregate.statistics:
            offline = frame[f"{aggregate.name}_{stat}"].to_list()
            got = [row[stat] for row in online]
            for index, (want, have) in enumerate(zip(offline, got, strict=True)):
                if want is None:
                    assert have is None, (aggregate.name, stat, index, have)
                else:
                    assert have == pytest.approx(want, rel=1e-12, abs=1e-12), (
                        aggregate.name,
                        stat,
                        index,
                    )
            compared += len(got)
    assert compared == frame.height * 5
    assert frame["site_delay_3h_count"].max() > 2 and frame["site_late_7d_count"].min() == 0


def _offline_statistics(
    served: Served, events: list[dict[str, Any]], query: dict[str, Any]
) -> dict[str, Any]:
    """What the offline pipeline (clean + aggregate_sql) gives `query` given `events` as the
    only history: raw rows in a scratch DuckDB with the snapshot's reference tables."""
    snapshot = current_snapshot(served.spec)
    conn = duckdb.connect()
    for parquet in snapshot.glob("raw_*.parquet"):
        conn.execute(
            f'CREATE TABLE "{parquet.stem}" AS SELECT * FROM '
            f"read_parquet({sql_literal(str(parquet))})"
        )
    schema = conn.sql("SELECT * FROM raw_synthetic_serving").to_arrow_table().schema
    rows = [{**e, "sched_at": datetime.fromisoformat(e["sched_at"])} for e in [*events, query]]
    conn.register("incoming", pa.Table.from_pylist(rows, schema=schema))
    conn.execute("INSERT INTO raw_synthetic_serving SELECT * FROM incoming")
    clean(conn, served.spec)
    out: dict[str, Any] = {}
    for aggregate in served.spec.aggregates:
        stats = (
            conn.sql(
                f"SELECT a.* EXCLUDE (__rowid) FROM cleaned c JOIN "
                f"({aggregate_sql(aggregate, 'cleaned')}) a ON a.__rowid = c.rowid "
                f"WHERE c.trip_id = {int(query['trip_id'])}"
            )
            .to_arrow_table()
            .to_pylist()
        )
        out.update(stats[0])
    return out


def test_events_move_the_online_value_as_the_offline_definition_says(
    served: Served, client: httpx.Client
):
    """Events posted to /events change the history features of a later request exactly as the
    offline SQL would (window, lag, known_at), and only for their own key."""
    at = served.last_time.replace(minute=0, second=0) + timedelta(days=30)  # no history yet
    query = {
        "trip_id": 9_000_000,
        "sched_at": at.isoformat(),
        "site": "east",
        "vehicle": "van",
        "distance": 20.0,
        "passengers": 3,
    }

    def features_at() -> dict[str, Any]:
        response = client.post("/predict", json=query)
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]
        return logged(served, [request_id])[request_id]["features"]

    before = features_at()
    assert before["site_delay_3h_count"] == 0 and before["site_delay_3h_mean"] is None
    assert before["site_late_7d_count"] == 0

    def event(trip_id: int, minutes_before: int, delay: int, site: str = "east") -> dict:
        return {
            "trip_id": trip_id,
            "sched_at": (at - timedelta(minutes=minutes_before)).isoformat(),
            "site": site,
            "vehicle": "bus",
            "distance": 10.0,
            "passengers": 1,
            "delay": delay,
        }

    events = [
        event(9_000_001, 120, 30),  # known 1h30 before: inside [t-4h, t-1h] -> counts
        event(9_000_002, 180, 50),  # known 2h10 before: counts
        event(9_000_003, 90, 60),  # known 30 min before: inside the 1h lag, not yet
        event(9_000_004, 300, 0),  # known 5h before: outside the 3h window
        event(9_000_005, 120, 100, site="west"),  # another key
    ]
    response = client.post("/events", json={"events": events})
    assert response.status_code == 200, response.text
    assert response.json() == {"added": 2 * len(events)}

    after = features_at()
    offline = _offline_statistics(served, events, {**query, "delay": None})
    for column in AGGREGATE_COLUMNS:
        assert after[column] == pytest.approx(offline[column]), column
    # The same numbers by hand: 3h delay window holds 30 and 50; the 7-day late-rate window
    # (known_at = the trip's own time) holds the four east trips: late, late, late, on time.
    assert (
        after["site_delay_3h_count"],
        after["site_delay_3h_mean"],
        after["site_delay_3h_max"],
    ) == (2, 40.0, 50.0)
    assert (after["site_late_7d_count"], after["site_late_7d_mean"]) == (4, 0.75)


# -- 3. bad input ----------------------------------------------------------------------------


def _error_text(response: httpx.Response) -> str:
    return response.text


def test_bad_input_is_a_4xx_naming_the_field_and_the_service_keeps_serving(
    served: Served, client: httpx.Client
):
    good = served.test_records[0]
    raw = {"content-type": "application/json"}
    cases: list[tuple[str, httpx.Response, int, list[str]]] = [
        (
            "malformed JSON",
            client.post("/predict", content=b'{"trip_id": 1,', headers=raw),
            400,
            ["json"],
        ),
        (
            "wrong type",
            client.post("/predict", json={**good, "passengers": "many"}),
            400,
            ["passengers"],
        ),
        (
            "float for an integer",
            client.post("/predict", json={**good, "passengers": 2.5}),
            400,
            ["passengers"],
        ),
        (
            "integer out of range",
            client.post("/predict", json={**good, "passengers": 2**70}),
            400,
            ["passengers"],
        ),
        (
            "bool for a float",
            client.post("/predict", json={**good, "distance": True}),
            400,
            ["distance"],
        ),
        (
            "string for a float",
            client.post("/predict", json={**good, "distance": "1.5"}),
            400,
            ["distance"],
        ),
        (
            "bad timestamp",
            client.post("/predict", json={**good, "sched_at": "yesterday"}),
            400,
            ["sched_at"],
        ),
        (
            "timestamp with an offset",
            client.post("/predict", json={**good, "sched_at": good["sched_at"] + "+02:00"}),
            400,
            ["sched_at", "offset"],
        ),
        (
            "epoch number for a timestamp",
            client.post("/predict", json={**good, "sched_at": 0}),
            400,
            ["sched_at"],
        ),
        (
            "missing required",
            client.post("/predict", json={k: v for k, v in good.items() if k != "site"}),
            400,
            ["site"],
        ),
        ("extra field", client.post("/predict", json={**good, "delay": 12}), 400, ["delay"]),
        (
            "NaN",
            client.post(
                "/predict", content=json.dumps({**good, "distance": math.nan}), headers=raw
            ),
            400,
            ["distance"],
        ),
        (
            "Infinity",
            client.post(
                "/predict", content=json.dumps({**good, "distance": math.inf}), headers=raw
            ),
            400,
            ["distance"],
        ),
        (
            "unknown category",
            client.post("/predict", json={**good, "site": "atlantis"}),
            400,
            ["site", "atlantis"],
        ),
        (
            "unknown category in a batch",
            client.post("/predict_batch", json={"records": [good, {**good, "vehicle": "rocket"}]}),
            400,
            ["record 1", "vehicle", "rocket"],
        ),
        (
            "bad field in a batch",
            client.post("/predict_batch", json={"records": [good, {**good, "distance": "far"}]}),
            400,
            ["records", "1", "distance"],
        ),
        ("empty batch", client.post("/predict_batch", json={"records": []}), 400, ["records"]),
        (
            "oversized batch",
            client.post("/predict_batch", json={"records": [good] * (MAX_BATCH + 1)}),
            400,
            ["records", str(MAX_BATCH)],
        ),
        ("not an object", client.post("/predict", json=[good]), 400, ["object"]),
        (
            "form body",
            client.post(
                "/predict",
                content=b"trip_id=1",
                headers={"content-type": "application/x-www-form-urlencoded"},
            ),
            415,
            ["application/json"],
        ),
        (
            "multipart without boundary",
            client.post(
                "/predict", content=b"--x", headers={"content-type": "multipart/form-data"}
            ),
            415,
            ["application/json"],
        ),
        (
            "body over the limit",
            client.post("/predict_batch", content=b" " * (MAX_BODY_BYTES + 1), headers=raw),
            413,
            [str(MAX_BODY_BYTES)],
        ),
        (
            "event missing its key",
            client.post(
                "/events", json={"events": [{k: v for k, v in good.items() if k != "site"}]}
            ),
            400,
            ["site"],
        ),
        (
            "event value the spec's known_at cannot take",
            client.post(
                "/events", json={"events": [{**good, "delay": 0}, {**good, "delay": 2**62}]}
            ),
            400,
            ["record 1", "out of range"],
        ),
        (
            "label without request id",
            client.post("/labels", json={"labels": [{"label": 1}]}),
            400,
            ["request_id"],
        ),
    ]
    problems = []
    for name, response, status, words in cases:
        text = _error_text(response).lower()
        if response.status_code != status or not all(w.lower() in text for w in words):
            problems.append(f"{name}: {response.status_code} {response.text[:300]}")
    assert not problems, "\n".join(problems)
    after = client.post("/predict", json=good)
    assert after.status_code == 200 and after.json()["model_version"] == "v0001"
    assert client.get("/readyz").status_code == 200


# -- 6. inference log and labels --------------------------------------------------------------


def test_every_prediction_is_logged_once_and_labels_join_by_request_id(
    served: Served, client: httpx.Client
):
    answers = []
    for record in served.test_records[:20]:
        response = client.post("/predict", json=record)
        assert response.status_code == 200
        answers.append(response.json())
    response = client.post("/predict_batch", json={"records": served.test_records[20:50]})
    assert response.status_code == 200
    answers += response.json()["predictions"]
    ids = [a["request_id"] for a in answers]
    assert len(set(ids)) == 50

    lines = logged(served, ids)
    assert set(lines) == set(ids)
    for answer in answers:
        line = lines[answer["request_id"]]
        assert line["model_version"] == answer["model_version"]
        assert line["prediction"] == answer["prediction"]
        assert line["ids"]["trip_id"] in served.test_ids
        # Features as scored: the request's own fields, looked-up references and history.
        assert {
            "site",
            "distance",
            "readings_wind",
            "sites_capacity",
            "time__hour",
            "site_delay_3h_mean",
            "site_late_7d_count",
        } <= set(line["features"])
        assert "delay" not in line["features"]

    truth = dict(zip(served.test_ids, [None] * len(served.test_ids), strict=True))
    with warehouse_connection(served.spec.paths().warehouse) as conn:
        truth.update(conn.execute("SELECT trip_id, __target FROM features").fetchall())
    labels = [{"request_id": a_id, "label": truth[lines[a_id]["ids"]["trip_id"]]} for a_id in ids]
    response = client.post("/labels", json={"labels": labels})
    assert response.status_code == 200 and response.json() == {"recorded": 50}

    conn = duckdb.connect()
    read_predictions(served.inference_dir, conn).create_view("predictions")
    joined = conn.sql(
        f"SELECT count(*), count(DISTINCT p.request_id), avg(l.label) FROM predictions p "
        f"JOIN read_json('{served.inference_dir}/labels-*.jsonl', format='newline_delimited', "
        f"union_by_name=true, sample_size=-1) l USING (request_id) "
        f"WHERE p.request_id IN (SELECT unnest({ids!r}))"
    ).fetchall()[0]
    assert joined[0] == joined[1] == 50
    assert joined[2] == pytest.approx(np.mean([label["label"] for label in labels]))


def test_read_predictions_sees_keys_first_logged_late(tmp_path: Path):
    """Keys that appear only after DuckDB's schema sample (20,480 lines by default) are read:
    a shadow block, or a feature that was null in every earlier line."""
    early = "".join(
        json.dumps(
            {
                "request_id": f"e{i}",
                "model_version": "v1",
                "features": {"wind": None},
                "prediction": 0.5,
            }
        )
        + "\n"
        for i in range(21_000)
    )
    late = json.dumps(
        {
            "request_id": "late",
            "model_version": "v1",
            "features": {"wind": 7.5},
            "prediction": 0.25,
            "shadow": {"model_version": "v2", "prediction": 0.5},
        }
    )
    (tmp_path / "predictions-w-1.jsonl").write_text(early + late + "\n")
    (tmp_path / "predictions-w-2.jsonl").write_text("")  # a worker that has not scored yet
    conn = duckdb.connect()
    read_predictions(tmp_path, conn).create_view("predictions")
    row = conn.sql(
        "SELECT features.wind, shadow.model_version, count(*) OVER () "
        "FROM predictions WHERE request_id = 'late'"
    ).fetchall()
    assert row == [(7.5, "v2", 1)]
    assert conn.sql("SELECT count(*) FROM predictions").fetchall()[0][0] == 21_001


def test_a_batch_logs_what_its_records_log_one_by_one(served: Served):
    """A batch's log rows (built column by column) carry what the same records log when
    scored one at a time: ids, event time, features as scored (nulls, and an unseen category
    as null), prediction."""
    runtime = served.runtime
    records = [dict(r) for r in served.test_records[:MAX_BATCH]]
    records[3]["vehicle"] = "rocket"  # not in the model's vocabulary: scored as missing
    batch_ids = [f"batch-{uuid.uuid4().hex}" for _ in records]
    single_ids = [f"single-{uuid.uuid4().hex}" for _ in records]
    previous = runtime.unknown_categories
    runtime.unknown_categories = "score"
    try:
        runtime.score(records, request_ids=batch_ids)
        for record, request_id in zip(records, single_ids, strict=True):
            runtime.score([record], request_ids=[request_id])
    finally:
        runtime.unknown_categories = previous
    wanted = set(batch_ids) | set(single_ids)
    lines = {
        row.pop("request_id"): row
        for row in _logged_now(served, sorted(wanted), runtime.log.directory).values()
    }
    assert set(lines) == wanted
    for batch_id, single_id in zip(batch_ids, single_ids, strict=True):
        batch, single = lines[batch_id], lines[single_id]
        assert batch.pop("logged_at") != single.pop("logged_at")
        assert batch == single
    assert lines[batch_ids[3]]["features"]["vehicle"] is None
    assert lines[batch_ids[3]]["ids"]["trip_id"] == records[3]["trip_id"]
    # Each feature as scored is the features table's value offline (numbers to the model
    # matrix's float32), name by name.
    trip_ids = [r["trip_id"] for r in records]
    names = sorted(lines[batch_ids[0]]["features"])
    with warehouse_connection(served.spec.paths().warehouse) as conn:
        offline = conn.sql(
            "SELECT trip_id, " + ", ".join(names) + " FROM features WHERE trip_id IN "
            f"({', '.join(str(t) for t in trip_ids)})"
        ).fetchall()
    by_trip = {row[0]: dict(zip(names, row[1:], strict=True)) for row in offline}
    for index, (batch_id, trip_id) in enumerate(zip(batch_ids, trip_ids, strict=True)):
        logged_features, expected = lines[batch_id]["features"], by_trip[trip_id]
        for name in names:
            got, want = logged_features[name], expected[name]
            if index == 3 and name == "vehicle":
                continue  # sent as "rocket": unseen, logged as null
            if isinstance(want, float) and not math.isnan(want):
                assert got == pytest.approx(want, rel=1e-6, abs=1e-6), (trip_id, name)
            elif want is None or (isinstance(want, float) and math.isnan(want)):
                assert got is None, (trip_id, name, got)
            else:
                assert got == want, (trip_id, name)
    features = [lines[i]["features"] for i in batch_ids]
    assert any(value is None for f in features for value in f.values())
    assert any(f["readings_wind"] is None for f in features)  # stale or missing readings
    assert all(lines[i]["event_time"] for i in batch_ids)


def test_requests_merged_at_a_group_commit_log_what_they_log_alone(served: Served):
    """Under group commit the flush thread builds the rows of every queued request of one
    model at once (single rows and batches together, one file): each row is what the same
    request logs when written alone, with its own request's logged_at."""
    runtime = served.runtime
    log = runtime.log
    records = [dict(r) for r in served.test_records[:12]]
    records[2]["vehicle"] = "rocket"  # unseen: logged as null
    alone = [f"alone-{uuid.uuid4().hex}" for _ in records]
    queued = [f"queued-{uuid.uuid4().hex}" for _ in records]
    previous = runtime.unknown_categories, log.flush_interval
    runtime.unknown_categories = "score"
    try:
        for record, request_id in zip(records, alone, strict=True):
            runtime.score([record], request_ids=[request_id])  # written before returning
        log.flush_interval = 3600.0  # queue until the flush below (no timer in this log)
        for record, request_id in zip(records[:6], queued[:6], strict=True):
            runtime.score([record], request_ids=[request_id])
            time.sleep(0.002)
        runtime.score(records[6:], request_ids=queued[6:])  # a batch in the same commit
        files = set(log.files())
        assert not _logged_now(served, queued, log.directory)  # queued, nothing written
        log.flush()
    finally:
        runtime.unknown_categories, log.flush_interval = previous
    assert len(set(log.files()) - files) == 1
    lines = _logged_now(served, alone + queued, log.directory)
    assert set(lines) == set(alone + queued)
    stamps = [lines[i]["logged_at"] for i in queued]
    assert stamps[:6] == sorted(stamps[:6]) and len(set(stamps[:6])) == 6
    assert len(set(stamps[6:])) == 1 and stamps[6] >= stamps[5]
    for one, merged in zip(alone, queued, strict=True):
        a, b = dict(lines[one]), dict(lines[merged])
        for row in (a, b):
            row.pop("request_id"), row.pop("logged_at")
        assert a == b
    assert lines[queued[2]]["features"]["vehicle"] is None


# -- 5. zero-downtime upgrade and rollback ------------------------------------------------------


def test_promotion_and_rollback_swap_the_model_without_a_failed_request(
    served: Served, server: Server
):
    registry = served.registry
    assert registry.alias("champion") == "v0001"
    record = served.test_records[0]
    stop = threading.Event()
    seen: list[list[tuple[int, str]]] = [[], []]

    def load(out: list[tuple[int, str]]) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set() and len(out) < 20_000:
                try:
                    response = http.post("/predict", json=record)
                    ok = response.status_code == 200
                    out.append(
                        (
                            response.status_code,
                            response.json()["model_version"] if ok else response.text[:200],
                        )
                    )
                except httpx.HTTPError as error:
                    out.append((0, repr(error)))
                time.sleep(0.002)

    threads = [threading.Thread(target=load, args=(out,), daemon=True) for out in seen]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(seen), 30, "no responses")
        new = second_version(served)  # trained while the requests run
        marks = [len(out) for out in seen]
        registry.promote(new, reason="test: zero-downtime upgrade")
        wait_until(
            lambda: all(
                any(v == new for _, v in out[m:]) for out, m in zip(seen, marks, strict=True)
            ),
            30,
            "never served the new version",
        )
        marks = [len(out) for out in seen]
        registry.rollback(reason="test: rollback")
        assert registry.alias("champion") == "v0001"
        wait_until(
            lambda: all(
                any(v == "v0001" for _, v in out[m:]) for out, m in zip(seen, marks, strict=True)
            ),
            30,
            "never rolled back",
        )
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    for out in seen:
        failures = [r for r in out if r[0] != 200]
        assert not failures, failures[:5]
        # Each client saw old, then new, then old again: one clean switch each way.
        segments = [out[0][1]]
        for _, version in out[1:]:
            if version != segments[-1]:
                segments.append(version)
        assert segments == ["v0001", new, "v0001"], segments
    assert all(len(out) >= 3 for out in seen)


# -- 7. shadow mode ------------------------------------------------------------------------------


def test_shadow_challenger_is_logged_not_returned(served: Served, client: httpx.Client):
    challenger = second_version(served)
    registry = served.registry
    if registry.alias("champion") != "v0001":
        registry.promote("v0001", reason="test: shadow setup")
    registry.set_alias("challenger", challenger)
    wait_until(
        lambda: client.post("/model").json()["shadow_version"] == challenger,
        15,
        "the service did not load the challenger as shadow",
    )
    response = client.post("/predict_batch", json={"records": served.test_records[:100]})
    assert response.status_code == 200
    answers = response.json()["predictions"]
    assert all(set(a) == {"request_id", "model_version", "prediction", "label"} for a in answers)
    lines = logged(served, [a["request_id"] for a in answers])
    champion = served.offline_predictions("v0001")[:100]
    shadow = served.offline_predictions(challenger)[:100]
    for index, answer in enumerate(answers):
        line = lines[answer["request_id"]]
        assert line["model_version"] == answer["model_version"] == "v0001"
        assert line["shadow"]["model_version"] == challenger
        assert abs(line["prediction"] - champion[index]) <= 1e-9
        assert abs(line["shadow"]["prediction"] - shadow[index]) <= 1e-9
    assert np.abs(champion - shadow).max() > 1e-3  # a genuinely different model


# -- 4. fuzzing --------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(served: Served, server: Server):
    """Fuzz every operation of /docs.json (bounded): no 5xx. Only the server-error check runs:
    BentoML's own 400 body does not match the schema it declares (see STACK-NOTES)."""
    cli = Path(sys.executable).with_name("schemathesis")
    work = served.root / "fuzz"
    work.mkdir(exist_ok=True)
    result = subprocess.run(
        [
            str(cli),
            "--no-color",
            "run",
            f"{server.url}/docs.json",
            "--checks",
            "not_a_server_error",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "30",
            "--workers",
            "1",
            "--seed",
            "20240501",
            "--request-timeout",
            "20",
            "--suppress-health-check",
            "all",
            "--generation-database",
            "none",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "ml_lifecycle_tests.schemathesis_hooks",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:] + "\n--- server log ---\n" + server.tail(6000)
    assert " generated" in output and "Server error" not in output, output[-3000:]


# -- 8. Redis --------------------------------------------------------------------------------


def test_redis_store_matches_the_memory_store(served: Served):
    url = "redis://127.0.0.1:6379/0"
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as error:  # no Redis on this machine
        pytest.skip(f"Redis not reachable at {url}: {error}")
    store = RedisOnlineStore(url, prefix=f"mll-test-{uuid.uuid4().hex[:10]}")
    memory = MemoryOnlineStore()
    snapshot = current_snapshot(served.spec)
    try:
        conn = duckdb.connect()
        for aggregate in served.spec.aggregates:
            events = conn.sql(
                f"SELECT * FROM read_parquet("
                f"{sql_literal(str(snapshot / f'events_{aggregate.name}.parquet'))})"
            ).pl()
            keys = list(zip(*[events[k].to_list() for k in aggregate.keys], strict=True))
            added = store.add(
                aggregate, keys, events["known_at"].to_numpy(), events["value"].to_list()
            )
            # Events without a key ("(missing)" site) have no history: both stores skip them.
            assert added == memory.add(
                aggregate, keys, events["known_at"].to_numpy(), events["value"].to_list()
            )
            assert added == sum(1 for k in keys if k[0] not in (None, "(missing)")) > 4000
        rng = np.random.default_rng(3)
        start = np.datetime64("2024-01-01T00:00", "us")
        times = start + rng.integers(0, 152 * 24 * 60, 3000).astype("timedelta64[m]")
        keys = [
            (s,) for s in rng.choice(["north", "south", "east", "west", "harbour", "nowhere"], 3000)
        ]
        keys[:2] = [(None,), ("(missing)",)]
        for aggregate in served.spec.aggregates:
            want = memory.query(aggregate, keys, times)
            got = store.query(aggregate, keys, times)
            for index, (a, b) in enumerate(zip(want, got, strict=True)):
                assert a.keys() == b.keys()
                for stat in a:
                    assert (a[stat] is None) == (b[stat] is None), (aggregate.name, index, stat)
                    if a[stat] is not None:
                        assert b[stat] == pytest.approx(a[stat], rel=1e-12), (
                            aggregate.name,
                            index,
                            stat,
                        )

        # The whole runtime over Redis scores the test split as the offline model does.
        runtime = ServingRuntime(
            served.spec,
            store=store,
            watch_interval=None,
            log_dir=served.root / "redis_log",
            max_batch=MAX_BATCH,
        )
        try:
            records = [
                {**r, "sched_at": datetime.fromisoformat(r["sched_at"])}
                for r in served.test_records[:MAX_BATCH]
            ]
            answers = runtime.score(records, log=False)
        finally:
            runtime.close()
        np.testing.assert_allclose(
            [a["prediction"] for a in answers],
            served.offline_predictions("v0001")[:MAX_BATCH],
            atol=1e-9,
            rtol=0,
        )
    finally:
        store.clear()
        assert not list(store.client.scan_iter(f"{store.prefix}:*"))


# -- 6b. a killed worker loses no acknowledged prediction (last: it kills the server's worker) --


def _worker_pids(server: Server) -> list[int]:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return [c.pid for c in children if "_bentoml_impl.worker.service" in " ".join(c.cmdline())]


def test_a_worker_killed_mid_load_loses_at_most_the_last_second(served: Served, server: Server):
    """The service group-commits its prediction log (every 0.5 s): SIGKILL under load loses
    at most the predictions of the last second, never a torn or duplicated line."""
    workers = _worker_pids(server)
    assert len(workers) == 1, workers
    worker = workers[0]

    def worker_log() -> list[str]:
        """The request ids in the killed worker's prediction files (each file read whole)."""
        for _ in range(5):  # a compaction may delete a listed part while it is read: list again
            files, _legacy = prediction_files(served.inference_dir)
            try:
                return [
                    request_id
                    for file in files
                    if f"-{worker}." in file.name
                    for request_id in pq.read_table(file)["request_id"].to_pylist()
                ]
            except FileNotFoundError:
                continue
        raise AssertionError("the log kept changing while it was read")

    before = set(worker_log())
    batch, threads_count = 5, 4
    acked: list[tuple[float, str]] = []  # (when the answer arrived, request id)
    # Requests sent once the worker was dead: only the worker started in its place answers
    # them. (An answer that arrives after the kill may still come from the dead worker.)
    sent_after_kill: list[str] = []
    killed_at = math.inf
    failed: list[str] = []
    stop = threading.Event()

    def load(offset: int) -> None:
        records = served.test_records[offset * batch : (offset + 1) * batch]
        with httpx.Client(base_url=server.url, timeout=5) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = http.post("/predict_batch", json={"records": records})
                except httpx.HTTPError as error:
                    failed.append(repr(error))
                    return
                if response.status_code != 200:
                    failed.append(response.text[:200])
                    return
                now = time.monotonic()
                answered = [a["request_id"] for a in response.json()["predictions"]]
                acked.extend((now, request_id) for request_id in answered)
                if sent > killed_at:
                    sent_after_kill.extend(answered)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: len(acked) >= 200 and time.monotonic() - acked[0][0] >= 2.0,
        60,
        "the load did not start",
    )
    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    logged_ids = [i for i in worker_log() if i not in before]  # no torn file either
    in_file = set(logged_ids)
    assert len(in_file) == len(logged_ids)
    # Every prediction answered more than a second before the kill was logged by that worker.
    settled = {request_id for when, request_id in acked if when < killed_at - 1.0}
    assert len(settled) >= 100
    assert settled <= in_file
    # At most the requests in flight when it died were logged but never answered.
    answered = {request_id for _, request_id in acked}
    assert len(in_file - answered) <= threads_count * batch
    # Answers from the worker BentoML started in its place are logged too (once each).
    assert set(logged(served, sent_after_kill, wait=10)) == set(sent_after_kill)

    # The arbiter survived (BentoML starts a new worker; that takes as long as a start-up, so it
    # is not waited for here).
    assert server.process.poll() is None


# -- 8. several workers --------------------------------------------------------------------


def test_two_workers_share_the_events_posted_to_either(served: Served):
    """`ML_LIFECYCLE_WORKERS=2`: two worker processes, each with its own embedded online store.
    Events posted to one reach the other through the event journal before its next read: every
    prediction made after the post sees them, whichever worker answers (both do)."""
    server = launch_server(
        {
            "ML_LIFECYCLE_HOME": str(served.home),
            "ML_LIFECYCLE_DATASET": str(served.spec_path),
            "BENTOML_HOME": str(served.root / "bentoml"),
            "ML_LIFECYCLE_WORKERS": "2",
        },
        served.root / "serve_two_workers.log",
    )
    try:
        server.wait_ready(180)
        workers = _worker_pids(server)
        assert len(workers) == 2, workers
        at = served.last_time.replace(minute=0, second=0) + timedelta(days=60)
        query = {"trip_id": 9_100_000, "sched_at": at.isoformat(), "site": "east",
                 "vehicle": "van", "distance": 20.0, "passengers": 3}

        def predict_on_new_connections(count: int) -> list[str]:
            responses: list[httpx.Response] = []

            def one() -> None:  # a fresh connection each time: the kernel picks the worker
                responses.append(httpx.post(f"{server.url}/predict", json=query, timeout=30))

            threads = [threading.Thread(target=one) for _ in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert [r.status_code for r in responses] == [200] * count, responses[0].text
            return [r.json()["request_id"] for r in responses]

        def answered_by(ids: list[str]) -> dict[int, list[dict[str, Any]]]:
            found = logged(served, ids, wait=10)
            assert set(found) == set(ids)
            by_worker: dict[int, list[dict[str, Any]]] = {w: [] for w in workers}
            files, _legacy = prediction_files(served.inference_dir)
            for file in files:
                for worker in workers:
                    if f"-{worker}." in file.name:
                        for request_id in pq.read_table(file)["request_id"].to_pylist():
                            if request_id in found:
                                by_worker[worker].append(found[request_id]["features"])
            return by_worker

        before = answered_by(predict_on_new_connections(8))
        assert all(f["site_delay_3h_count"] == 0 for rows in before.values() for f in rows)

        def event(trip_id: int, minutes_before: int, delay: int) -> dict[str, Any]:
            return {"trip_id": trip_id, "sched_at": (at - timedelta(minutes=minutes_before)).isoformat(),
                    "site": "east", "vehicle": "bus", "distance": 10.0, "passengers": 1,
                    "delay": delay}

        posted = httpx.post(f"{server.url}/events", timeout=30, json={"events": [
            event(9_100_001, 120, 30), event(9_100_002, 180, 50)]})
        assert posted.status_code == 200, posted.text

        seen: dict[int, list[dict[str, Any]]] = {w: [] for w in workers}
        deadline = time.monotonic() + 60
        while min(len(rows) for rows in seen.values()) < 3:  # until both workers answered
            assert time.monotonic() < deadline, {w: len(r) for w, r in seen.items()}
            for worker, rows in answered_by(predict_on_new_connections(8)).items():
                seen[worker].extend(rows)
        for worker, rows in seen.items():
            for features in rows:
                assert (features["site_delay_3h_count"], features["site_delay_3h_mean"]) == (
                    2, 40.0), worker
    finally:
        server.stop()


def test_the_service_lets_idle_openmp_threads_sleep(served: Served):
    """The service module turns libgomp's spin-wait off before LightGBM loads it (a spinning
    OpenMP thread took most of a core between batches from the HTTP loop, the log's flush and
    other workers); an OMP_WAIT_POLICY set by the operator is kept."""
    show = (
        "import ctypes, ml_lifecycle.serving.service; "
        "ctypes.CDLL('libgomp.so.1').omp_display_env(1)"
    )

    def displayed(extra: dict[str, str]) -> str:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update({**_service_env(served), "ML_LIFECYCLE_INFERENCE_LOG": "0", **extra})
        done = subprocess.run(
            [sys.executable, "-c", show], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    assert "GOMP_SPINCOUNT = '0'" in displayed({})
    kept = displayed({"OMP_WAIT_POLICY": "active"})
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in kept and "GOMP_SPINCOUNT = '0'" not in kept
