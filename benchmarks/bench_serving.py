"""Stage 3 benchmark: the serving path (BentoML + ServingRuntime) vs a bare BentoML service vs the
model's in-process predict. Loopback only; every load is bounded in time and in requests.

Run with `.venv/bin/python benchmarks/bench_serving.py` (never part of the test suite):

    .venv/bin/python benchmarks/bench_serving.py --home /tmp/bench_home      # flights, if trained
    .venv/bin/python benchmarks/bench_serving.py --synthetic                 # the test dataset
    .venv/bin/python benchmarks/bench_serving.py --home H --warehouse W.duckdb --duration 8

Data: the flights dataset (datasets/flights.yaml) when `--home` holds a trained flights model
(registry champion + online snapshot; `ML_LIFECYCLE_HOME=H ml-lifecycle demo` makes one), else
the synthetic serving dataset of the tests (ml_lifecycle_tests/serving_support.py) trained into
a temporary home. Requests are rows of the model's test period: raw request fields for our
service, the model's feature vector (from the features table) for the bare one.

What runs, one after the other (never two servers at once on this 2-CPU machine):
* in-process limit: `booster.predict` on a numpy matrix (bulk, 1000-row slices, single rows);
* ServingRuntime in process (no HTTP): `score()` single row / 1000 rows, logging on and off,
  and a step-by-step profile of one `score()` (pydantic, compiled cleaning and reference
  lookups, online store, FeatureEncoder matrix, LightGBM, inference log, response JSON), and
  the same `score()` through the pipeline's SQL per request (ML_LIFECYCLE_SERVING_SQL=1, what
  the service did before it compiled the plan);
* HTTP, one BentoML worker each: `bare` (benchmarks/bare_service.py: same model, no feature
  logic), `ours` (ml_lifecycle.serving.service) and `ours_nolog` (ML_LIFECYCLE_INFERENCE_LOG=0).
  Scenarios: single-row /predict at 1 and 8 connections, 1000-row /predict_batch at 1 and 2
  connections, for `ours` also 1000-row /predict_columns (one list per field); for `bare` also
  1000-row /predict_matrix (rows as positional lists instead of objects with 42 named fields:
  how much of a batch is JSON/pydantic per field) and the floor: /noop (async) and /noop_sync,
  an endpoint without any model. Load generator: `wrk` (C, rotates over pre-serialised bodies
  with a Lua script) when installed, else Python threads with httpx (slower: it competes for
  the same 2 CPUs).

Before measuring, the script waits (polling every 30 s, up to `--wait-minutes`) until the
1-minute load average is below `--max-load`, and records the load before/after every scenario.
Prediction log files written by the benchmark's servers are deleted afterwards.
Results: a table on stdout and benchmarks/results/bench_serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "bench_serving.json"
LUA = r"""
local bodies = {}
if os.getenv("WRK_BODY_FILES") == "1" then
  -- binary bodies (Arrow IPC): one file each, listed one path per line
  for path in io.lines(os.getenv("WRK_BODIES")) do
    local handle = io.open(path, "rb")
    bodies[#bodies + 1] = handle:read("*a")
    handle:close()
  end
else
  for line in io.lines(os.getenv("WRK_BODIES")) do bodies[#bodies + 1] = line end
end
local limit = tonumber(os.getenv("WRK_MAX_REQUESTS_PER_THREAD") or "0")
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/json"
local i = 0
local done = 0
function init(args)
  i = math.random(#bodies)
end
function request()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
function response(status, headers, body)
  done = done + 1
  if limit > 0 and done >= limit then wrk.thread:stop() end
end
"""


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet(max_load: float, minutes: float) -> dict[str, Any]:
    start = time.monotonic()
    first = load1()
    while load1() > max_load and time.monotonic() - start < minutes * 60:
        print(f"  load {load1():.2f} > {max_load}: waiting (up to {minutes:.0f} min)", flush=True)
        time.sleep(30)
    return {
        "load_at_start": first,
        "load_when_measuring": load1(),
        "waited_s": round(time.monotonic() - start, 1),
    }


def _json_ready(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and value != value:
        return None
    return value


# -- setup ---------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The home, spec, request records (raw fields) and feature matrix of the test period."""
    from ml_lifecycle.spec import load_spec

    spec_path = Path(args.dataset).resolve()
    dataset = load_spec(spec_path).name
    home = Path(args.home).resolve() if args.home else None
    usable = (
        home is not None
        and not args.synthetic
        and (home / dataset / "registry" / "aliases.json").exists()
        and (home / dataset / "online" / "CURRENT").exists()
    )
    if not usable:
        from ml_lifecycle_tests.serving_support import write_serving_dataset
        from ml_lifecycle_tests.test_training import run_training

        dataset = "synthetic_serving (generated)"
        home = work / "home"
        os.environ["ML_LIFECYCLE_HOME"] = str(home)
        spec_path = write_serving_dataset(work / "dataset", rows=20_000)
        print("training the synthetic dataset into", home, flush=True)
        assert run_training(spec_path).success
    assert home is not None
    os.environ["ML_LIFECYCLE_HOME"] = str(home)
    os.environ["ML_LIFECYCLE_DATASET"] = str(spec_path)
    spec = load_spec(spec_path)
    warehouse = Path(args.warehouse) if args.warehouse else spec.paths().warehouse
    return {
        "dataset": dataset,
        "home": home,
        "spec_path": spec_path,
        "spec": spec,
        "warehouse": warehouse,
    }


def load_requests(setup: dict[str, Any], service: Any, rows: int) -> dict[str, Any]:
    import duckdb
    from pydantic import TypeAdapter

    from ml_lifecycle.data.sources import quote
    from ml_lifecycle.training.dataset import load_model_data

    spec = setup["spec"]
    runtime = service.RUNTIME
    model = runtime.model
    fields = [f.name for f in runtime.fields]
    with duckdb.connect(str(setup["warehouse"]), read_only=True) as conn:
        data = load_model_data(conn, spec, model.state, classes=model.classes)
        test_from = data.boundaries.get("test_from")
        where = (
            f"WHERE CAST(({spec.time_sql}) AS TIMESTAMP) >= TIMESTAMP '{test_from}'"
            if test_from
            else ""
        )
        columns = ", ".join(quote(f) for f in fields)
        raw = (
            conn.sql(
                f"SELECT {columns} FROM {quote(spec.raw_asset_names()[0])} {where} "
                f"ORDER BY hash(rowid) LIMIT {int(rows)}"
            )
            .to_arrow_table()
            .to_pylist()
        )
    records = [{k: _json_ready(v) for k, v in r.items()} for r in raw]
    # Keep the records the service accepts (its pydantic model, then the runtime: a vocabulary
    # may reject a rare category), as the HTTP service would see them.
    adapter = TypeAdapter(list[service.Record])

    def accepts(chunk: list[dict[str, Any]]) -> bool:
        try:
            runtime.score(
                [r.model_dump() for r in adapter.validate_json(json.dumps(chunk))], log=False
            )
            return True
        except Exception:
            return False

    accepted = []
    for start in range(0, len(records), 1000):
        chunk = records[start : start + 1000]
        accepted += chunk if accepts(chunk) else [r for r in chunk if accepts([r])]
    typed = [r.model_dump() for r in adapter.validate_json(json.dumps(accepted))]
    X = data.splits["test"].X
    rng = np.random.default_rng(0)
    sample = X[rng.choice(len(X), size=min(rows, len(X)), replace=False)]
    names = data.feature_names
    feature_rows = [
        {n: (None if v != v else float(v)) for n, v in zip(names, row, strict=True)}
        for row in sample.tolist()
    ]
    return {
        "records": accepted,
        "typed": typed,
        "X": X,
        "feature_rows": feature_rows,
        "fields": fields,
        "features": names,
        "rejected": len(records) - len(accepted),
    }


def arrow_body(records: list[dict[str, Any]], fields: list[str]) -> bytes:
    """An Arrow IPC stream of the records, one column per field (what /predict_arrow takes)."""
    import pyarrow as pa

    table = pa.table({f: [r[f] for r in records] for f in fields})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# -- in process ------------------------------------------------------------------------------


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 4),
        "p99_ms": round(float(np.percentile(values, 99)), 4),
        "mean_ms": round(float(values.mean()), 4),
    }


def bench_model(booster: Any, X: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": len(X), "features": X.shape[1], "trees": booster.num_trees()}
    booster.predict(X[:1000])
    best = min(_timed(lambda: booster.predict(X)) for _ in range(3))
    out["bulk_rows_per_s"] = round(len(X) / best)
    chunk = X[:1000]
    best = min(_timed(lambda: booster.predict(chunk)) for _ in range(5))
    out["batch1000_rows_per_s"] = round(1000 / best)
    for threads in (0, 1):
        extra = {"num_threads": threads} if threads else {}
        times = [
            _timed(lambda i=i, e=extra: booster.predict(X[i : i + 1], **e))
            for i in range(min(2000, len(X)))
        ]
        out[f"single_row{'_1thread' if threads else ''}"] = percentiles(times)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_runtime(runtime: Any, requests: dict[str, Any]) -> dict[str, Any]:
    typed = requests["typed"]
    out: dict[str, Any] = {}
    for log in (True, False):
        tag = "log" if log else "nolog"
        for record in typed[:30]:
            runtime.score([record], log=log)
        if runtime.transform is not None:
            runtime.transform._memo.clear()  # new requests: time inputs never seen before
        times = [_timed(lambda r=r, g=log: runtime.score([r], log=g)) for r in typed[:300]]
        out[f"single_{tag}"] = percentiles(times)
        runtime.log.flush()  # the service group-commits: nothing queued into the next timing
        batches = [
            typed[i : i + 1000]
            for i in range(0, min(len(typed), 5000), 1000)
            if len(typed[i : i + 1000]) == 1000
        ]
        # Rows/s including the log's encode + write (the flush thread's work, counted here).
        total = sum(_timed(lambda b=b, g=log: runtime.score(b, log=g)) for b in batches)
        total += _timed(runtime.log.flush)
        out[f"batch1000_{tag}_rows_per_s"] = round(1000 * len(batches) / total)
    return out


def profile_score(
    service: Any, requests: dict[str, Any], size: int, repeats: int, arrow: bool = False
) -> dict[str, float]:
    """One `ServingRuntime.score()` taken apart (the same calls, timed one by one)."""
    runtime = service.RUNTIME
    model = runtime.model
    bodies = [
        json.dumps(requests["records"][i : i + size]).encode()
        for i in range(0, size * repeats, size)
    ]
    bodies_arrow = [
        arrow_body(requests["records"][i : i + size], requests["fields"])
        for i in range(0, size * repeats, size)
    ]
    steps: dict[str, list[float]] = {}

    def tick(name: str, since: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append(now - since)
        return now

    adapter = __import__("pydantic").TypeAdapter(service.Record)
    names = [f.name for f in runtime.fields]
    for body in bodies:
        t = time.perf_counter()
        if size == 1:  # /predict: the pydantic Record, then its fields as columns
            records = [adapter.validate_json(body[1:-1]).model_dump()]
            inputs = {name: [r.get(name) for r in records] for name in names}
            t = tick("request: pydantic Record validate + dump", t)
        elif arrow:  # /predict_arrow: read the IPC stream, check its column types
            import pyarrow as pa

            records = bodies_arrow[bodies.index(body)]
            t = time.perf_counter()
            inputs = service.VALIDATOR.arrow(pa.ipc.open_stream(records).read_all())
            records = next(iter(inputs.values()))
            t = tick("request: Arrow IPC read + column checks", t)
        else:  # /predict_batch: JSON parse, then Record's rules column by column
            records = service.Batch.model_validate_json(b'{"records": ' + body + b"}").records
            inputs = service.VALIDATOR.records(records)
            t = tick("request: JSON parse + column validation", t)
        runtime.transform._memo.clear()  # as a new request: its time inputs were never seen
        t = time.perf_counter()
        runtime.transform.times(inputs, len(records))
        t = tick("time expression (compiled)", t)
        time_ms = steps["time expression (compiled)"][-1]
        columns, _ = runtime.transform.clean(inputs, len(records))
        t = tick("cleaning rules + reference lookups (compiled)", t)
        steps["cleaning rules + reference lookups (compiled)"][-1] -= time_ms  # clean() repeats it
        runtime._add_aggregates(columns)
        t = tick("online store aggregates", t)
        matrix = model.encoder.matrix(columns, len(records))
        t = tick("FeatureEncoder matrix", t)
        runtime._check_compiled(columns, model, matrix)
        t = tick("category check", t)
        prediction = runtime._predict(model, matrix)  # its thread choice
        t = tick("LightGBM predict", t)
        ids = [f"r{i}" for i in range(len(records))]
        if arrow:
            import pyarrow as pa

            answer = pa.table({"request_id": ids, "prediction": prediction})
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, answer.schema) as writer:
                writer.write_table(answer)
            t = tick("present results + response Arrow IPC", t)
        else:
            results = runtime._present_all(prediction, model, ids)
            t = tick("present results", t)
        runtime._log_compiled(ids, prediction, columns, matrix, model, None, None)
        t = tick("inference log: queue (request thread)", t)
        runtime.log.flush()
        t = tick("inference log: Parquet build + write (flush thread)", t)
        if not arrow:
            json.dumps(results)
            tick("response JSON", t)
    return {name: round(statistics.median(values) * 1000, 4) for name, values in steps.items()}


def bench_sql_runtime(spec: Any, requests: dict[str, Any]) -> dict[str, Any]:
    """`score()` through the pipeline's SQL per request (the service before compiling)."""
    from ml_lifecycle.serving.runtime import ServingRuntime

    os.environ["ML_LIFECYCLE_SERVING_SQL"] = "1"
    try:
        runtime = ServingRuntime(spec, watch_interval=None, log_dir=Path(tempfile.mkdtemp()))
    finally:
        os.environ.pop("ML_LIFECYCLE_SERVING_SQL")
    typed = requests["typed"]
    for record in typed[:5]:
        runtime.score([record], log=False)
    times = [_timed(lambda r=r: runtime.score([r], log=False)) for r in typed[:40]]
    batch = _timed(lambda: runtime.score(typed[:1000], log=False))
    runtime.close()
    return {"single_nolog": percentiles(times), "batch1000_nolog_rows_per_s": round(1000 / batch)}


# -- HTTP ----------------------------------------------------------------------------------------


def start(target: str, env: dict[str, str], log: Path, cwd: Path) -> Any:
    from ml_lifecycle_tests.serving_support import start_server

    return start_server(env, log, target=target, timeout=600, cwd=cwd)


ARROW_STREAM = "application/vnd.apache.arrow.stream"


def run_wrk(
    url: str,
    bodies_file: Path,
    connections: int,
    duration: float,
    max_requests: int,
    content_type: str = "application/json",
) -> dict[str, Any]:
    threads = min(connections, 2)
    script = bodies_file.with_suffix(".lua")
    script.write_text(LUA)
    env = {
        **os.environ,
        "WRK_BODIES": str(bodies_file),
        "WRK_BODY_FILES": "1" if content_type == ARROW_STREAM else "0",
        "WRK_CONTENT_TYPE": content_type,
        "WRK_MAX_REQUESTS_PER_THREAD": str(max(1, max_requests // threads)),
    }
    result = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{int(duration)}s",
            "--timeout",
            "20s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=duration + 120,
        check=False,
    )
    text = result.stdout
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stderr}{text}")

    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
        return float(number) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]

    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", text, re.MULTILINE))
    if "50" not in dist or "99" not in dist:
        raise RuntimeError(f"cannot read wrk's output:\n{text}\n{result.stderr}")
    count = re.search(r"(\d+) requests in", text).group(1)
    elapsed = ms(re.search(r"requests in (\S+),", text).group(1)) / 1000
    capped = int(count) >= threads * max(1, max_requests // threads)
    if capped:
        # wrk reports the whole -d duration even when the request cap stopped its threads
        # early: estimate the busy time from the mean latency instead.
        mean = ms(re.search(r"Latency\s+(\S+)", text).group(1)) / 1000
        elapsed = mean * int(count) / connections
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return {
        "capped": capped,
        "requests": int(count),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(int(count) / elapsed, 1),
        "p50_ms": ms(dist["50"]),
        "p99_ms": ms(dist["99"]),
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(int(g) for g in socket.groups()) if socket else 0),
    }


def run_python(
    url: str,
    bodies: list[bytes],
    connections: int,
    duration: float,
    max_requests: int,
    content_type: str = "application/json",
) -> dict[str, Any]:
    import threading

    import httpx

    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + duration

    def worker(offset: int) -> None:
        with httpx.Client(timeout=20, headers={"content-type": content_type}) as client:
            i = offset
            while time.monotonic() < stop and len(latencies) < max_requests:
                i = (i + 1) % len(bodies)
                t = time.perf_counter()
                try:
                    ok = client.post(url, content=bodies[i]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors[0] += not ok

    start_time = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k * 97,)) for k in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start_time
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        **{k: v for k, v in percentiles(latencies).items() if k != "mean_ms"},
        "errors": errors[0],
    }


def http_scenarios(
    server: Any,
    single: list[bytes],
    batch: list[bytes],
    work: Path,
    args: argparse.Namespace,
    name: str,
    matrix: list[bytes] | None = None,
    columns: list[bytes] | None = None,
    floor: list[bytes] | None = None,
    arrow: list[bytes] | None = None,
) -> dict[str, Any]:
    import httpx

    kinds = {"single": single, "batch": batch}
    optional = {"matrix": matrix, "columns": columns, "floor": floor, "arrow": arrow}
    kinds.update({kind: bodies for kind, bodies in optional.items() if bodies})
    files = {kind: (path, kinds[kind]) for kind, path in write_bodies(work, name, kinds).items()}
    if arrow:
        with httpx.Client(timeout=60) as client:
            response = client.post(
                f"{server.url}/predict_arrow",
                content=arrow[0],
                headers={"content-type": ARROW_STREAM},
            )
            assert response.status_code == 200, response.text[:500]
    with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as client:
        for body in single[:200]:  # warm-up; every body class must be accepted
            response = client.post(f"{server.url}/predict", content=body)
            assert response.status_code == 200, response.text
        response = client.post(f"{server.url}/predict_batch", content=batch[0])
        assert response.status_code == 200, response.text[:500]
    use_wrk = shutil.which("wrk") is not None and not args.python_client
    out: dict[str, Any] = {}
    plan = [
        ("single_c1", "predict", "single", 1, args.max_single),
        ("single_c8", "predict", "single", 8, args.max_single),
        ("batch1000_c1", "predict_batch", "batch", 1, args.max_batches),
        ("batch1000_c2", "predict_batch", "batch", 2, args.max_batches),
    ]
    if matrix:  # the bare service's positional payload: rows as lists, no field names
        plan.append(("batch1000_matrix_c1", "predict_matrix", "matrix", 1, args.max_batches))
    if columns:  # ours: one list per field
        plan.append(("batch1000_columns_c1", "predict_columns", "columns", 1, args.max_batches))
        plan.append(("batch1000_columns_c2", "predict_columns", "columns", 2, args.max_batches))
    if arrow:  # ours: an Arrow IPC stream in, Arrow out
        plan.append(("batch1000_arrow_c1", "predict_arrow", "arrow", 1, args.max_batches))
        plan.append(("batch1000_arrow_c2", "predict_arrow", "arrow", 2, args.max_batches))
    if "_2w" in name:  # two workers: enough connections that both get some
        # (a keep-alive connection stays with the worker that accepted it, and the kernel may
        # give one worker most of them: more connections even it out)
        plan.append(("batch1000_arrow_c4", "predict_arrow", "arrow", 4, 2 * args.max_batches))
        plan.append(("batch1000_arrow_c8", "predict_arrow", "arrow", 8, 2 * args.max_batches))
        plan.append(("batch1000_columns_c8", "predict_columns", "columns", 8, 2 * args.max_batches))
    if floor:  # no model: what BentoML itself costs per request
        plan.insert(0, ("floor_sync_c1", "noop_sync", "floor", 1, args.max_single))
        plan.insert(0, ("floor_async_c1", "noop", "floor", 1, args.max_single))
    for key, route, kind, connections, limit in plan:
        before = load1()
        path, bodies = files[kind]
        url = f"{server.url}/{route}"
        content_type = ARROW_STREAM if kind == "arrow" else "application/json"
        result = (
            run_wrk(url, path, connections, args.duration, limit, content_type)
            if use_wrk
            else run_python(url, bodies, connections, args.duration, limit, content_type)
        )
        result["load_before"], result["load_after"] = before, load1()
        if kind in ("batch", "matrix", "columns", "arrow"):
            result["rows_per_s"] = round(result["requests_per_s"] * 1000)
        out[key] = result
        print(
            f"  {name:10s} {key:20s} {result['requests_per_s']:8.1f} req/s  "
            f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
            f"errors {result['errors']}  load {before}->{result['load_after']}",
            flush=True,
        )
    out["client"] = "wrk" if use_wrk else "python-httpx"
    return out


def write_bodies(work: Path, name: str, kinds: dict[str, list[bytes]]) -> dict[str, Path]:
    """wrk's body files: one JSON body per line, or (arrow) a listing of one file per body."""
    files = {}
    for kind, bodies in kinds.items():
        if kind == "arrow":
            paths = []
            for index, body in enumerate(bodies):
                paths.append(work / f"{name}_arrow_{index}.arrows")
                paths[-1].write_bytes(body)
            files[kind] = work / f"{name}_arrow.list"
            files[kind].write_text("".join(f"{p}\n" for p in paths))
        else:
            files[kind] = work / f"{name}_{kind}.jsonl"
            files[kind].write_bytes(b"\n".join(bodies) + b"\n")
    return files


# The service's threads that only the inference log uses: its flush thread (named by
# ml_lifecycle.serving.inference_log) and Polars' writer threads.
LOG_THREADS = ("inference-log", "polars-", "tokio-rt-worker", "async-executor")


def server_cpu_s(server: Any) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by a `bentoml serve` process and its workers:
    (all threads, the inference log's threads), read per thread from /proc."""
    import psutil

    root = psutil.Process(server.process.pid)
    total = log = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            threads = process.threads()
        except psutil.NoSuchProcess:
            continue
        for thread in threads:
            used = thread.user_time + thread.system_time
            total += used
            try:
                name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith(LOG_THREADS):
                log += used
    return total, log


def logging_cost_ab(
    env: dict[str, str],
    workers: int,
    bodies: dict[str, list[bytes]],
    work: Path,
    args: argparse.Namespace,
    only: set[str] | None = None,
    start_order: tuple[str, str] = ("on", "off"),
) -> dict[str, Any]:
    """The log's cost measured side by side: the service with the log on and with it off run
    at the same time (only one under load at any moment), and each scenario alternates
    between them for `--ab-rounds` rounds (on-off, off-on, ...), 1 s apart so the last
    burst's log flush is over. Sequential variants minutes apart drift by more than the log
    costs on a shared 2-CPU machine; alternating rounds cancel that drift."""
    import httpx

    name = f"ab{workers}w"
    files = write_bodies(work, name, bodies)
    servers = {}
    try:
        for log in start_order:
            servers[log] = start(
                "ml_lifecycle.serving.service:Predictor",
                {
                    **env,
                    "ML_LIFECYCLE_INFERENCE_LOG": "1" if log == "on" else "0",
                    "ML_LIFECYCLE_WORKERS": str(workers),
                },
                work / f"{name}_{log}.log",
                REPO,
            )
        for server in servers.values():  # warm-up: every route once per worker, roughly
            with httpx.Client(timeout=60) as client:
                for body in bodies["single"][:100]:
                    client.post(
                        f"{server.url}/predict",
                        content=body,
                        headers={"content-type": "application/json"},
                    ).raise_for_status()
                for body in bodies["arrow"][: 4 * workers]:
                    client.post(
                        f"{server.url}/predict_arrow",
                        content=body,
                        headers={"content-type": ARROW_STREAM},
                    ).raise_for_status()
        plan = (
            [
                ("single_c1", "predict", "single", 1, args.max_single),
                ("single_c8", "predict", "single", 8, args.max_single),
                ("batch1000_arrow_c1", "predict_arrow", "arrow", 1, args.max_batches),
                ("batch1000_arrow_c2", "predict_arrow", "arrow", 2, args.max_batches),
            ]
            if workers == 1
            else [
                ("single_c8", "predict", "single", 8, args.max_single),
                ("batch1000_arrow_c4", "predict_arrow", "arrow", 4, 2 * args.max_batches),
                ("batch1000_arrow_c8", "predict_arrow", "arrow", 8, 2 * args.max_batches),
            ]
        )
        out: dict[str, Any] = {}
        for key, route, kind, connections, limit in plan:
            if only and key not in only:
                continue
            rates: dict[str, list[float]] = {"on": [], "off": []}
            cpu: dict[str, list[float]] = {"on": [], "off": []}  # server CPU ms per request
            log_cpu: dict[str, list[float]] = {"on": [], "off": []}  # the log's threads
            errors = 0
            for round_ in range(args.ab_rounds):
                for log in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                    time.sleep(0.5)
                    used = server_cpu_s(servers[log])
                    result = run_wrk(
                        f"{servers[log].url}/{route}",
                        files[kind],
                        connections,
                        args.ab_duration,
                        limit,
                        ARROW_STREAM if kind == "arrow" else "application/json",
                    )
                    time.sleep(0.5)  # the burst's last log flush is done (and counted)
                    now = server_cpu_s(servers[log])
                    requests = max(result["requests"], 1)
                    rates[log].append(result["requests_per_s"] * (1000 if kind == "arrow" else 1))
                    cpu[log].append(round(1000 * (now[0] - used[0]) / requests, 3))
                    log_cpu[log].append(round(1000 * (now[1] - used[1]) / requests, 3))
                    errors += result["errors"]
            on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
            out[key] = {
                "unit": "rows/s" if kind == "arrow" else "requests/s",
                "on": rates["on"],
                "off": rates["off"],
                "median_on": round(on, 1),
                "median_off": round(off, 1),
                "cost_pct": round(100 * (off - on) / off, 1),
                "round_costs_pct": [
                    round(100 * (b - a) / b, 1)
                    for a, b in zip(rates["on"], rates["off"], strict=True)
                ],
                # The log's own threads (flush, Polars' writers) in the log-on server, as a
                # share of that server's CPU in the same bursts: not moved by how fast each
                # server process happens to run (those differ by +-15% between starts).
                "log_threads_ms_per_request": log_cpu["on"],
                "log_threads_ms_per_request_log_off": log_cpu["off"],
                "log_threads_share_pct": round(
                    100 * sum(log_cpu["on"]) / max(sum(cpu["on"]), 1e-9), 1
                ),
                "cpu_ms_per_request_on": cpu["on"],
                "cpu_ms_per_request_off": cpu["off"],
                # the log's share of the server's CPU: at saturation, the throughput it costs
                "cpu_cost_pct": round(
                    100
                    * (statistics.median(cpu["on"]) - statistics.median(cpu["off"]))
                    / statistics.median(cpu["on"]),
                    1,
                ),
                "errors": errors,
            }
            print(
                f"  log cost, {workers} worker(s), {key:20s} on {on:10,.0f}  off {off:10,.0f}  "
                f"cost {out[key]['cost_pct']:5.1f}%  rounds {out[key]['round_costs_pct']}  "
                f"CPU/request {statistics.median(cpu['on']):.3f} vs "
                f"{statistics.median(cpu['off']):.3f} ms ({out[key]['cpu_cost_pct']}%)  "
                f"log threads {out[key]['log_threads_share_pct']}% of the log-on server's CPU  "
                f"errors {errors}  load {load1()}",
                flush=True,
            )
        return out
    finally:
        for server in servers.values():
            server.stop()


# -- report ----------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    http = results["http"]
    limit = results["in_process_model"]
    runtime = results["in_process_runtime"]
    rows = [
        "| | in-process predict (limit) | bare BentoML | ours | ours, log off |",
        "|---|---|---|---|---|",
    ]

    def cell(variant: str, key: str, field: str, fmt: str = "{:.2f}") -> str:
        value = http.get(variant, {}).get(key, {}).get(field)
        return fmt.format(value) if value is not None else "-"

    rows.append(
        "| single row p50, 1 conn (ms) | {:.3f} | {} | {} | {} |".format(
            limit["single_row"]["p50_ms"],
            *(cell(v, "single_c1", "p50_ms") for v in ("bare", "ours", "ours_nolog")),
        )
    )
    rows.append(
        "| single row p99, 1 conn (ms) | {:.3f} | {} | {} | {} |".format(
            limit["single_row"]["p99_ms"],
            *(cell(v, "single_c1", "p99_ms") for v in ("bare", "ours", "ours_nolog")),
        )
    )
    for key, label in (("single_c1", "req/s, 1 conn"), ("single_c8", "req/s, 8 conns")):
        rows.append(
            f"| single row {label} | - | "
            + " | ".join(
                cell(v, key, "requests_per_s", "{:.0f}") for v in ("bare", "ours", "ours_nolog")
            )
            + " |"
        )
    rows.append(
        "| single row p50 / p99, 8 conns (ms) | - | "
        + " | ".join(
            f"{cell(v, 'single_c8', 'p50_ms')} / {cell(v, 'single_c8', 'p99_ms')}"
            for v in ("bare", "ours", "ours_nolog")
        )
        + " |"
    )
    for key, label in (("batch1000_c1", "1 conn"), ("batch1000_c2", "2 conns")):
        rows.append(
            f"| 1000-row batches, rows/s, {label} | "
            f"{limit['batch1000_rows_per_s']:,} | "
            + " | ".join(
                cell(v, key, "rows_per_s", "{:,.0f}") for v in ("bare", "ours", "ours_nolog")
            )
            + " |"
        )
    for key, label in (("batch1000_columns_c1", "1 conn"), ("batch1000_columns_c2", "2 conns")):
        rows.append(
            f"| 1000-row batches as columns (/predict_columns), rows/s, {label} | - | - | "
            + " | ".join(cell(v, key, "rows_per_s", "{:,.0f}") for v in ("ours", "ours_nolog"))
            + " |"
        )
    for key, label in (("batch1000_arrow_c1", "1 conn"), ("batch1000_arrow_c2", "2 conns")):
        rows.append(
            f"| 1000-row batches as Arrow IPC (/predict_arrow), rows/s, {label} | - | - | "
            + " | ".join(cell(v, key, "rows_per_s", "{:,.0f}") for v in ("ours", "ours_nolog"))
            + " |"
        )
    rows.append(
        "| 1000-row batches, rows/s, positional lists (no field names), 1 conn | - | "
        + cell("bare", "batch1000_matrix_c1", "rows_per_s", "{:,.0f}")
        + " | - | - |"
    )
    for key, label in (("floor_async_c1", "async"), ("floor_sync_c1", "sync")):
        rows.append(
            f"| floor: BentoML endpoint without a model ({label}), p50 ms / req/s, 1 conn | - | "
            f"{cell('bare', key, 'p50_ms')} / {cell('bare', key, 'requests_per_s', '{:.0f}')}"
            " | - | - |"
        )
    if "ours_2w" in http or "ours_2w_nolog" in http:
        for key, label in (
            ("batch1000_arrow_c2", "Arrow IPC, 2 conns"),
            ("batch1000_arrow_c4", "Arrow IPC, 4 conns"),
            ("batch1000_arrow_c8", "Arrow IPC, 8 conns"),
            ("batch1000_columns_c8", "columns, 8 conns"),
            ("single_c8", "single rows, req/s, 8 conns"),
        ):
            field = "requests_per_s" if key.startswith("single") else "rows_per_s"
            rows.append(
                f"| two workers (`ML_LIFECYCLE_WORKERS=2`), {label} (rows/s unless said) | - | - | "
                + " | ".join(cell(v, key, field, "{:,.0f}") for v in ("ours_2w", "ours_2w_nolog"))
                + " |"
            )
    rows.append(f"| bulk predict, rows/s | {limit['bulk_rows_per_s']:,} | - | - | - |")
    rows.append(
        "| ServingRuntime.score in process, single row p50 (ms) | - | - | "
        f"{runtime['single_log']['p50_ms']:.3f} | {runtime['single_nolog']['p50_ms']:.3f} |"
    )
    rows.append(
        "| ServingRuntime.score in process, 1000-row rows/s | - | - | "
        f"{runtime['batch1000_log_rows_per_s']:,} | "
        f"{runtime['batch1000_nolog_rows_per_s']:,} |"
    )
    sql = results.get("in_process_sql_runtime")
    if sql:
        rows.append(
            "| same, the pipeline's SQL per request (before), single p50 ms / 1000-row rows/s "
            f"| - | - | - | {sql['single_nolog']['p50_ms']:.3f} / "
            f"{sql['batch1000_nolog_rows_per_s']:,} |"
        )
    return "\n".join(rows)


def logging_cost(http: dict[str, Any]) -> dict[str, Any]:
    """Requests/s lost with the log on, variants measured one after the other."""
    one_worker = (
        "single_c1",
        "single_c8",
        "batch1000_c1",
        "batch1000_c2",
        "batch1000_columns_c1",
        "batch1000_columns_c2",
        "batch1000_arrow_c1",
        "batch1000_arrow_c2",
    )
    two_workers = (
        "single_c8",
        "batch1000_arrow_c2",
        "batch1000_arrow_c4",
        "batch1000_arrow_c8",
        "batch1000_columns_c8",
    )
    out = {}
    for logged, unlogged, prefix, keys in (
        ("ours", "ours_nolog", "", one_worker),
        ("ours_2w", "ours_2w_nolog", "two_workers_", two_workers),
    ):
        for key in keys:
            on = http.get(logged, {}).get(key, {}).get("requests_per_s")
            off = http.get(unlogged, {}).get(key, {}).get("requests_per_s")
            if on and off:
                out[f"{prefix}{key}"] = round(100 * (off - on) / off, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--home",
        default=os.environ.get("ML_LIFECYCLE_HOME"),
        help="ML_LIFECYCLE_HOME with a trained flights model",
    )
    parser.add_argument("--dataset", default=str(REPO / "datasets" / "flights.yaml"))
    parser.add_argument(
        "--warehouse",
        help="warehouse file to read requests from (default: the "
        "home's; a copy avoids DuckDB's lock if a pipeline is writing it)",
    )
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic dataset")
    parser.add_argument("--rows", type=int, default=20_000, help="request rows to draw")
    parser.add_argument("--duration", type=float, default=8, help="seconds per HTTP scenario")
    parser.add_argument(
        "--max-single", type=int, default=20_000, help="request cap per single-row scenario"
    )
    parser.add_argument(
        "--max-batches", type=int, default=200, help="request cap per 1000-row batch scenario"
    )
    parser.add_argument("--variants", default="bare,ours,ours_nolog,ours_2w,ours_2w_nolog")
    parser.add_argument("--python-client", action="store_true", help="httpx threads, not wrk")
    parser.add_argument(
        "--ab-rounds",
        type=int,
        default=3,
        help="alternating log on/off rounds per scenario for the side-by-side log cost (0: skip)",
    )
    parser.add_argument("--ab-duration", type=float, default=5, help="seconds per A/B measurement")
    parser.add_argument("--ab-workers", default="1,2", help="worker counts for the A/B log cost")
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--wait-minutes", type=float, default=15)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        setup = prepare(args, work)
        print(f"data: {setup['dataset']} (home {setup['home']})", flush=True)
        inference = setup["spec"].paths().inference
        existing = set(inference.glob("*")) if inference.exists() else set()
        print("starting the in-process service (seeding the online store)...", flush=True)
        started = time.perf_counter()
        import ml_lifecycle.serving.service as service  # the HTTP service's own runtime

        runtime = service.RUNTIME
        startup_s = time.perf_counter() - started
        requests = load_requests(setup, service, args.rows)
        print(
            f"  {len(requests['records'])} request rows ({requests['rejected']} rejected), "
            f"{len(requests['features'])} model features; runtime start {startup_s:.1f}s",
            flush=True,
        )
        quiet = wait_for_quiet(args.max_load, args.wait_minutes)
        print(f"load: {quiet}", flush=True)
        results: dict[str, Any] = {
            "command": " ".join([".venv/bin/python", "benchmarks/bench_serving.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "dataset": setup["dataset"],
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "load": quiet,
            "runtime_start_s": round(startup_s, 1),
            "request_rows": len(requests["records"]),
            "model_version": runtime.model.version,
            "store_events": runtime.seeded_events,
        }
        booster = runtime.model.booster
        print("in-process model predict...", flush=True)
        results["in_process_model"] = bench_model(booster, requests["X"])
        print("in-process ServingRuntime.score...", flush=True)
        results["in_process_runtime"] = bench_runtime(runtime, requests)
        results["profile_ms"] = {
            "single_row": profile_score(service, requests, 1, 200),
            "batch_1000": profile_score(service, requests, 1000, 5),
            "batch_1000_arrow": profile_score(service, requests, 1000, 5, arrow=True),
        }
        runtime.close()
        print("in-process ServingRuntime.score through the SQL per request (before)...", flush=True)
        results["in_process_sql_runtime"] = bench_sql_runtime(setup["spec"], requests)

        single_ours = [json.dumps(r).encode() for r in requests["records"][:5000]]
        batch_ours = [
            json.dumps({"records": requests["records"][i : i + 1000]}).encode()
            for i in range(0, min(len(requests["records"]), 10_000), 1000)
            if len(requests["records"][i : i + 1000]) == 1000
        ]
        fields = requests["fields"]
        columns_ours = [
            json.dumps(
                {"columns": {f: [r[f] for r in requests["records"][i : i + 1000]] for f in fields}}
            ).encode()
            for i in range(0, min(len(requests["records"]), 10_000), 1000)
            if len(requests["records"][i : i + 1000]) == 1000
        ]
        arrow_ours = [
            arrow_body(requests["records"][i : i + 1000], fields)
            for i in range(0, min(len(requests["records"]), 10_000), 1000)
            if len(requests["records"][i : i + 1000]) == 1000
        ]
        floor = [json.dumps({"x": float(i)}).encode() for i in range(100)]
        single_bare = [json.dumps(r).encode() for r in requests["feature_rows"][:5000]]
        batch_bare = [
            json.dumps({"rows": requests["feature_rows"][i : i + 1000]}).encode()
            for i in range(0, min(len(requests["feature_rows"]), 10_000), 1000)
            if len(requests["feature_rows"][i : i + 1000]) == 1000
        ]
        matrix_bare = [
            json.dumps({"rows": requests["X"][i : i + 1000].astype(float).tolist()})
            .replace("NaN", "null")
            .encode()
            for i in range(0, min(len(requests["X"]), 10_000), 1000)
            if len(requests["X"][i : i + 1000]) == 1000
        ]
        results["http"] = {}
        bentoml_home = work / "bentoml"
        for variant in args.variants.split(","):
            env = {
                "BENTOML_HOME": str(bentoml_home),
                "ML_LIFECYCLE_HOME": str(setup["home"]),
                "ML_LIFECYCLE_DATASET": str(setup["spec_path"]),
            }
            if variant == "bare":
                import bentoml

                os.environ["BENTOML_HOME"] = str(bentoml_home)
                saved = bentoml.lightgbm.save_model("bench_lightgbm", booster)
                env["BARE_MODEL_TAG"] = str(saved.tag)
                target, cwd = "bare_service:BareLightGBM", REPO / "benchmarks"
                bodies = (single_bare, batch_bare)
                extra = {"matrix": matrix_bare, "floor": floor}
            else:
                env["ML_LIFECYCLE_INFERENCE_LOG"] = "0" if variant.endswith("nolog") else "1"
                # ours_2w*: two worker processes (events shared through the journal)
                env["ML_LIFECYCLE_WORKERS"] = "2" if "_2w" in variant else "1"
                target, cwd = "ml_lifecycle.serving.service:Predictor", REPO
                bodies = (single_ours, batch_ours)
                extra = {"columns": columns_ours, "arrow": arrow_ours}
            print(f"serving {variant}...", flush=True)
            started = time.perf_counter()
            server = start(target, env, work / f"{variant}.log", cwd)
            try:
                ready = time.perf_counter() - started
                results["http"][variant] = http_scenarios(
                    server, *bodies, work, args, variant, **extra
                )
                results["http"][variant]["ready_s"] = round(ready, 1)
            finally:
                server.stop()
        results["logging_cost_pct"] = logging_cost(results["http"])
        if args.ab_rounds > 0 and shutil.which("wrk"):
            results["logging_cost_ab"] = {}
            for workers in (int(w) for w in args.ab_workers.split(",") if w):
                print(f"log cost side by side, {workers} worker(s)...", flush=True)
                results["logging_cost_ab"][f"{workers}_worker{'s' if workers > 1 else ''}"] = (
                    logging_cost_ab(
                        {
                            "BENTOML_HOME": str(bentoml_home),
                            "ML_LIFECYCLE_HOME": str(setup["home"]),
                            "ML_LIFECYCLE_DATASET": str(setup["spec_path"]),
                        },
                        workers,
                        {"single": single_ours, "arrow": arrow_ours},
                        work,
                        args,
                    )
                )
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        if "http" in previous:  # the run this one replaces, for comparison
            results["previous_run"] = {
                key: previous.get(key)
                for key in (
                    "date",
                    "load",
                    "in_process_runtime",
                    "profile_ms",
                    "http",
                    "logging_cost_pct",
                    "logging_cost_ab",
                    "table",
                )
            }
        if "before" in previous:
            results["before"] = previous["before"]
        elif "http" in previous:  # the service before it compiled the cleaning plan
            results["before"] = {
                key: previous.get(key)
                for key in ("load", "in_process_runtime", "profile_ms", "http", "table")
            }
        results["load_at_end"] = load1()
        results["table"] = table(results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        print()
        print(results["table"])
        print(
            f"\nlogging cost (% of requests/s), variants in sequence: {results['logging_cost_pct']}"
        )
        for workers, scenarios in results.get("logging_cost_ab", {}).items():
            print(
                f"logging cost side by side, {workers}: "
                + ", ".join(
                    f"{k} {v['cost_pct']}% (log threads {v['log_threads_share_pct']}% of CPU)"
                    for k, v in scenarios.items()
                )
            )
        print("\nprofile of one score() (median ms):")
        for size, steps in results["profile_ms"].items():
            print(f"  {size}: " + ", ".join(f"{k} {v}" for k, v in steps.items()))
        print(f"\nwritten to {args.out}")
        if inference.exists():
            for file in set(inference.glob("*")) - existing:
                file.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
