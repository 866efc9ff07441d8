"""Stage 4 benchmark: drift of 25 columns, 1M reference vs 1M current rows, three ways.

Run with `.venv/bin/python benchmarks/bench_drift.py`; never part of the test suite.

Data (synthetic, seeded, written once as Parquet to the work folder and reused): 20 numeric
columns (normal, lognormal, uniform, exponential, Poisson counts with ties; some with nulls) and
5 categorical ones (5, 20, 100, 300 and 1000 Zipf-distributed levels), plus the model score
`prediction`. The current window shifts some columns, from trivially (+0.05 sd, which p-values
flag at this size) to clearly (+0.5 sd, a 1.3x scale, a frequency change, a new level, nulls
2 % -> 10 %), and keeps the rest as fresh samples of the same distributions.

Every variant runs in its own fresh subprocess, one after the other:

* ``profile``  -- ours, at training time: `build_profile` on the reference rows (numerics +
  ENUM codes, as in the features table), written as JSON. Done once per model version.
* ``ours``     -- ours, per window: the stored profile JSON + the current Parquet (categoricals
  as polars Enum Series, as read), `drift_report` over the 25 features and the prediction.
* ``ours-objects`` -- the same with the categoricals as numpy object arrays of Python strings
  (what a caller gets from `.to_list()`): the slow path of `categorical_drift`.
* ``scipy``    -- what a user writes with numpy/scipy on the raw samples: PSI over reference
  deciles (numpy), `scipy.stats.ks_2samp` per numeric column; level counts (polars) and
  `scipy.stats.chi2_contingency` per categorical column.
* ``evidently`` -- Evidently's `Report([DataDriftPreset()])` on pandas frames read from the same
  Parquet (its defaults at this size: normed Wasserstein for numbers, Jensen-Shannon for
  categories). It will not import beside pandas 3, so it runs from its own virtualenv,
  benchmarks/.evidently-venv (created on first use with `python3 -m venv` + pip, pinned below,
  git-ignored by a `*` .gitignore inside it; nothing is added to the project's lock).

Time is the computation inside the child on data already in memory (median of repeats for the
fast variants, one run for scipy and Evidently); reading the Parquet is timed apart. Peak memory
is the child's whole process tree (interpreter, imports, its data and the computation), RSS
sampled with psutil every 10 ms, with the child's ru_maxrss (os.wait4) as a cross-check. Ours
computes 26 columns (the prediction too); scipy and Evidently 25. Before the measurements the
script waits (polling up to 15 min) for the 1-minute load average to drop under 1.5 and reports
the load around each child.

Results: a table on stdout and benchmarks/results/bench_drift.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_drift.json"
EVIDENTLY_VENV = REPO / "benchmarks" / ".evidently-venv"
EVIDENTLY_PINS = ("evidently==0.7.23", "pandas==2.3.3", "pyarrow==26.0.1")
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "ml-lifecycle-bench-drift"
DATA_VERSION = 1
SEED = 2013
NUMERIC = [f"num_{i:02d}" for i in range(20)]
CATEGORICAL = ["cat_0", "cat_1", "cat_2", "cat_3", "cat_4"]
CATEGORY_LEVELS = {"cat_0": 5, "cat_1": 20, "cat_2": 100, "cat_3": 300, "cat_4": 1000}
# What the current window changes; every other column is a fresh sample of the same distribution.
SHIFTS = {
    "num_00": "+0.5 sd",
    "num_01": "+0.05 sd (trivial)",
    "num_02": "lognormal sigma x1.3",
    "num_05": "Poisson lambda 3 -> 4",
    "num_07": "nulls 2 % -> 10 %",
    "cat_0": "level frequencies change",
    "cat_1": "a new level, 5 % of rows",
}
THRESHOLDS = {"psi": (0.1, 0.25), "ks": (0.1, 0.2), "js": (0.1, 0.2), "drifted_share": (0.2, 0.4)}
LABELS = {
    "profile": "ours: build_profile (reference, once per model)",
    "ours": "ours: drift_report",
    "ours-objects": "ours: drift_report, categoricals as object arrays",
    "scipy": "numpy/scipy: decile PSI + ks_2samp + chi2",
    "evidently": "Evidently 0.7 DataDriftPreset",
}
REPEATS = {"profile": 5, "ours": 5, "ours-objects": 3, "scipy": 1, "evidently": 1}
SAMPLE_SECONDS = 0.01
LOAD_LIMIT = 1.5
LOAD_WAIT_SECONDS = 15 * 60
GOALS = {"speedup_vs_evidently": 50.0, "seconds": 1.0, "memory_ratio": 1 / 3}


# --- data --------------------------------------------------------------------------------------


def _numeric_column(rng, name: str, rows: int, current: bool):
    import numpy as np

    index = NUMERIC.index(name)
    changed = current and name in SHIFTS
    if name in ("num_05", "num_15"):  # counts: many ties
        values = rng.poisson(4.0 if changed else 3.0, rows).astype(np.float64)
    elif index % 5 == 0:
        values = rng.normal(10.0 + index + (1.0 if changed else 0.0), 2.0, rows)  # +0.5 sd
    elif index % 5 == 1:
        values = rng.normal(0.05 if changed else 0.0, 1.0, rows)
    elif index % 5 == 2:
        values = rng.lognormal(1.0, 0.65 if changed and name == "num_02" else 0.5, rows)
    elif index % 5 == 3:
        values = rng.uniform(-1.0, 1.0, rows) * (index + 1)
    else:
        values = rng.exponential(2.0, rows)
    null_share = {"num_07": 0.10 if changed else 0.02, "num_12": 0.01, "num_17": 0.005}
    if name in null_share:
        values[rng.random(rows) < null_share[name]] = np.nan
    return values


def _categorical_column(rng, name: str, rows: int, current: bool):
    import numpy as np
    import polars as pl

    k = CATEGORY_LEVELS[name]
    levels = [f"{name}_L{i:04d}" for i in range(k)]
    weights = 1.0 / np.arange(1, k + 1) ** 1.1
    if current and name == "cat_0":
        weights = weights[::-1].copy()
    codes = rng.choice(k, size=rows, p=weights / weights.sum())
    categories = list(levels)
    if current and name == "cat_1":
        categories.append("cat_1_NEW")
        codes[rng.random(rows) < 0.05] = k
    series = pl.Series(name, categories).gather(codes)
    return series.cast(pl.Enum(categories))


def ensure_data(workdir: Path, rows: int, fresh: bool) -> dict[str, Path]:
    import numpy as np
    import polars as pl

    paths = {"reference": workdir / "reference.parquet", "current": workdir / "current.parquet"}
    meta_path = workdir / "data.json"
    meta = {"rows": rows, "seed": SEED, "version": DATA_VERSION}
    if (
        not fresh
        and meta_path.exists()
        and json.loads(meta_path.read_text()) == meta
        and all(p.exists() for p in paths.values())
    ):
        return paths
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"writing {rows:,} reference and {rows:,} current rows to {workdir} ...", flush=True)
    for which, seed_offset in (("reference", 0), ("current", 1)):
        rng = np.random.default_rng(SEED + seed_offset)
        current = which == "current"
        columns = {name: _numeric_column(rng, name, rows, current) for name in NUMERIC}
        # The "model": a fixed logistic score of three columns (so it moves with num_00).
        signal = (
            0.8 * (columns["num_00"] - 10.0) / 2.0
            + 0.5 * columns["num_03"] / 4.0
            - 0.4 * (columns["num_04"] - 2.0) / 2.0
        )
        score = 1.0 / (1.0 + np.exp(-signal))
        frame = pl.DataFrame(
            {
                **{
                    name: pl.Series(name, values, nan_to_null=True)
                    for name, values in columns.items()
                },
                **{name: _categorical_column(rng, name, rows, current) for name in CATEGORICAL},
                "prediction": score,
            }
        )
        frame.write_parquet(paths[which])
        del frame, columns
    meta_path.write_text(json.dumps(meta))
    return paths


# --- the Evidently environment -------------------------------------------------------------------


def evidently_python() -> Path:
    python = EVIDENTLY_VENV / "bin" / "python"
    wanted = {pin.split("==")[0]: pin.split("==")[1] for pin in EVIDENTLY_PINS}
    if python.exists():
        probe = subprocess.run(
            [
                str(python),
                "-c",
                "import json, importlib.metadata as m; print(json.dumps("
                f"{{n: m.version(n) for n in {list(wanted)!r}}}))",
            ],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and json.loads(probe.stdout) == wanted:
            return python
    print(f"creating {EVIDENTLY_VENV} with {' '.join(EVIDENTLY_PINS)} ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(EVIDENTLY_VENV)], check=True)
    (EVIDENTLY_VENV / ".gitignore").write_text("*\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", *EVIDENTLY_PINS], check=True)
    return python


# --- children ------------------------------------------------------------------------------------


def _timed(function, repeats: int) -> tuple[object, dict[str, list[float]]]:
    """Wall and CPU seconds (all threads of the process) of each of `repeats` calls."""
    timing: dict[str, list[float]] = {"seconds": [], "cpu_seconds": []}
    result = None
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        result = function()
        timing["seconds"].append(time.perf_counter() - started)
        timing["cpu_seconds"].append(time.process_time() - cpu)
    return result, timing


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_profile(workdir: Path, repeats: int) -> dict:
    import numpy as np
    import polars as pl

    sys.path.insert(0, str(REPO))
    from ml_lifecycle.monitoring.profile import build_profile

    started = time.perf_counter()
    frame = pl.read_parquet(workdir / "reference.parquet")
    X = np.column_stack(
        [frame[name].to_numpy() for name in NUMERIC]
        + [
            frame[name].to_physical().cast(pl.Float64).fill_null(np.nan).to_numpy()
            for name in CATEGORICAL
        ]
    )
    categories = {name: list(frame[name].dtype.categories) for name in CATEGORICAL}
    prediction = frame["prediction"].to_numpy()
    del frame
    read = time.perf_counter() - started
    rss_before = _rss_mb()
    profile, timing = _timed(
        lambda: build_profile(X, NUMERIC + CATEGORICAL, CATEGORICAL, prediction, categories),
        repeats,
    )
    text = json.dumps(profile, allow_nan=False)
    (workdir / "profile.json").write_text(text)
    return {
        "read_s": read,
        **timing,
        "rss_before_mb": rss_before,
        "profile_json_bytes": len(text),
    }


def child_ours(workdir: Path, repeats: int, objects: bool) -> dict:
    import numpy as np
    import polars as pl

    sys.path.insert(0, str(REPO))
    from ml_lifecycle.monitoring.drift import drift_report

    started = time.perf_counter()
    profile = json.loads((workdir / "profile.json").read_text())
    frame = pl.read_parquet(workdir / "current.parquet")
    current = {name: frame[name].to_numpy() for name in NUMERIC}
    for name in CATEGORICAL:
        current[name] = (
            np.array(frame[name].cast(pl.String).to_list(), dtype=object)
            if objects
            else frame[name]
        )
    prediction = frame["prediction"].to_numpy()
    read = time.perf_counter() - started
    rss_before = _rss_mb()
    report, timing = _timed(lambda: drift_report(profile, current, THRESHOLDS, prediction), repeats)
    json.dumps(report, allow_nan=False)
    columns = {
        name: {
            key: stats.get(key)
            for key in ("status", "psi", "ks", "js", "null_rate_change", "unseen_share")
        }
        for name, stats in report["features"].items()
    }
    return {
        "read_s": read,
        **timing,
        "rss_before_mb": rss_before,
        "status": report["status"],
        "drifted_share": report["drifted_share"],
        "prediction_status": report["prediction"]["status"],
        "columns": columns,
    }


def child_scipy(workdir: Path, repeats: int) -> dict:
    import numpy as np
    import polars as pl
    from scipy import stats

    started = time.perf_counter()
    frames = {
        which: pl.read_parquet(workdir / f"{which}.parquet", columns=NUMERIC + CATEGORICAL)
        for which in ("reference", "current")
    }
    numeric = {
        which: {name: frame[name].to_numpy() for name in NUMERIC} for which, frame in frames.items()
    }
    categorical = {
        which: {name: frame[name] for name in CATEGORICAL} for which, frame in frames.items()
    }
    read = time.perf_counter() - started
    rss_before = _rss_mb()

    def compute() -> dict:
        out = {}
        for name in NUMERIC:
            reference, current = numeric["reference"][name], numeric["current"][name]
            reference = reference[np.isfinite(reference)]
            current = current[np.isfinite(current)]
            deciles = np.unique(np.quantile(reference, np.linspace(0.1, 0.9, 9)))
            bins = np.concatenate([[-np.inf], deciles, [np.inf]])
            p = np.histogram(reference, bins)[0] / reference.size
            q = np.histogram(current, bins)[0] / current.size
            p, q = np.maximum(p, 1e-4), np.maximum(q, 1e-4)
            ks = stats.ks_2samp(reference, current)
            out[name] = {
                "psi": float(np.sum((q - p) * np.log(q / p))),
                "ks": float(ks.statistic),
                "p_value": float(ks.pvalue),
            }
        for name in CATEGORICAL:
            counts = [
                categorical[which][name]
                .drop_nulls()
                .cast(pl.String)
                .value_counts()
                .rename({name: "level"})
                for which in ("reference", "current")
            ]
            table = (
                counts[0]
                .join(counts[1], on="level", how="full", coalesce=True, suffix="_current")
                .fill_null(0)
            )
            chi2 = stats.chi2_contingency(table.select("count", "count_current").to_numpy().T)
            out[name] = {"chi2": float(chi2.statistic), "p_value": float(chi2.pvalue)}
        return out

    columns, timing = _timed(compute, repeats)
    return {"read_s": read, **timing, "rss_before_mb": rss_before, "columns": columns}


def child_evidently(workdir: Path, repeats: int) -> dict:
    import evidently
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    started = time.perf_counter()
    frames = {
        which: pd.read_parquet(workdir / f"{which}.parquet", columns=NUMERIC + CATEGORICAL)
        for which in ("reference", "current")
    }
    read = time.perf_counter() - started
    rss_before = _rss_mb()
    definition = DataDefinition(numerical_columns=NUMERIC, categorical_columns=CATEGORICAL)

    def compute() -> dict:
        report = Report([DataDriftPreset()])
        snapshot = report.run(
            Dataset.from_pandas(frames["current"], data_definition=definition),
            Dataset.from_pandas(frames["reference"], data_definition=definition),
        )
        return snapshot.dict()

    snapshot, timing = _timed(compute, repeats)
    columns, drifted = {}, None
    for metric in snapshot["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith("ValueDrift"):
            columns[config["column"]] = {
                "method": config.get("method"),
                "score": metric["value"],
                "threshold": config.get("threshold"),
            }
        elif config.get("type", "").endswith("DriftedColumnsCount"):
            drifted = metric["value"]
    return {
        "read_s": read,
        **timing,
        "rss_before_mb": rss_before,
        "columns": columns,
        "drifted_columns": drifted,
        "evidently": evidently.__version__,
        "pandas": pd.__version__,
    }


# --- the parent ------------------------------------------------------------------------------------


def _sample_tree(pid: int, peak: list[float], stop: threading.Event) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            rss = root.memory_info().rss
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss += child.memory_info().rss
        except psutil.NoSuchProcess:
            return
        peak[0] = max(peak[0], rss)
        stop.wait(SAMPLE_SECONDS)


def run_child(variant: str, python: Path, workdir: Path) -> dict:
    command = [
        str(python),
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--workdir",
        str(workdir),
        "--repeats",
        str(REPEATS[variant]),
    ]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
        peak = [0.0]
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_tree, args=(process.pid, peak, stop), daemon=True)
        sampler.start()
        # Reap with wait4 to get the child's own ru_maxrss as a cross-check of the sampling.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"child {variant} failed ({process.returncode}):\n{errors[-3000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    result.update(
        {
            "variant": variant,
            "label": LABELS[variant],
            "median_s": statistics.median(result["seconds"]),
            "best_s": min(result["seconds"]),
            "median_cpu_s": statistics.median(result["cpu_seconds"]),
            "child_wall_s": wall,
            "peak_mb": peak[0] / 2**20,
            "ru_maxrss_mb": usage.ru_maxrss / 1024,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        }
    )
    return result


def wait_for_quiet_machine(limit: float, max_wait: float) -> dict:
    started = time.time()
    load = os.getloadavg()[0]
    while load >= limit and time.time() - started < max_wait:
        print(
            f"  load average {load:.2f} >= {limit}: waiting (up to "
            f"{(max_wait - (time.time() - started)) / 60:.0f} more min) ...",
            flush=True,
        )
        time.sleep(15)
        load = os.getloadavg()[0]
    waited = time.time() - started
    return {"load": load, "waited_s": round(waited, 1), "quiet": load < limit}


def _format_table(results: dict[str, dict], evidently: dict | None) -> str:
    header = (
        f"{'variant':52s} {'seconds':>8s} {'cpu s':>8s} {'read s':>7s} {'peak MB':>8s} "
        f"{'vs Evidently':>12s} {'mem vs Ev.':>10s}"
    )
    lines = [header, "-" * len(header)]
    for result in results.values():
        speedup = f"{evidently['median_s'] / result['median_s']:.0f}x" if evidently else "-"
        memory = f"{result['peak_mb'] / evidently['peak_mb']:.2f}" if evidently else "-"
        lines.append(
            f"{result['label']:52s} {result['median_s']:8.3f} {result['median_cpu_s']:8.3f} "
            f"{result['read_s']:7.2f} {result['peak_mb']:8.0f} {speedup:>12s} {memory:>10s}"
        )
    return "\n".join(lines)


def _verdicts(results: dict[str, dict]) -> list[dict]:
    rows = []
    for name in NUMERIC + CATEGORICAL:
        row = {"column": name, "change": SHIFTS.get(name, "none")}
        if "ours" in results:
            ours = results["ours"]["columns"][name]
            row.update(
                {
                    "ours_status": ours["status"],
                    "ours_psi": ours["psi"],
                    "ours_ks": ours.get("ks"),
                    "ours_js": ours.get("js"),
                    "ours_null_rate_change": ours["null_rate_change"],
                    "ours_unseen_share": ours.get("unseen_share"),
                }
            )
        if "scipy" in results:
            scipy = results["scipy"]["columns"][name]
            row.update(
                {
                    "scipy_psi": scipy.get("psi"),
                    "scipy_ks": scipy.get("ks"),
                    "scipy_p_value": scipy["p_value"],
                }
            )
        if "evidently" in results:
            evidently = results["evidently"]["columns"].get(name, {})
            row.update(
                {
                    "evidently_method": evidently.get("method"),
                    "evidently_score": evidently.get("score"),
                    "evidently_drift": (evidently["score"] > evidently["threshold"])
                    if evidently
                    else None,
                }
            )
        rows.append(row)
    return rows


def _format_verdicts(rows: list[dict]) -> str:
    def number(value) -> str:
        return "-" if value is None else f"{value:.3g}"

    header = (
        f"{'column':8s} {'change':26s} {'ours':6s} {'psi':>7s} {'ks':>7s} {'js':>7s} "
        f"{'null +':>7s} {'unseen':>7s} {'scipy p':>8s} {'Ev. score':>9s} {'Ev. drift':>9s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['column']:8s} {row['change']:26s} {row.get('ours_status', '-'):6s} "
            f"{number(row.get('ours_psi')):>7s} {number(row.get('ours_ks')):>7s} "
            f"{number(row.get('ours_js')):>7s} {number(row.get('ours_null_rate_change')):>7s} "
            f"{number(row.get('ours_unseen_share')):>7s} {number(row.get('scipy_p_value')):>8s} "
            f"{number(row.get('evidently_score')):>9s} {row.get('evidently_drift', '-')!s:>9s}"
        )
    lines.append(
        "(ours: status from PSI/KS D (numbers) or JS/PSI (categories) against the spec's "
        "default thresholds; scipy p: ks_2samp or chi2 p-value; Ev.: Evidently's drift score "
        "and its verdict at its default 0.1)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--fresh-data", action="store_true", help="rewrite the Parquet files")
    parser.add_argument("--skip-evidently", action="store_true")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results JSON (default: {RESULTS.relative_to(REPO)} for the "
        "full 1M-row run, else bench_drift.json in the work folder)",
    )
    parser.add_argument("--child", choices=list(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        children = {
            "profile": lambda: child_profile(args.workdir, args.repeats),
            "ours": lambda: child_ours(args.workdir, args.repeats, objects=False),
            "ours-objects": lambda: child_ours(args.workdir, args.repeats, objects=True),
            "scipy": lambda: child_scipy(args.workdir, args.repeats),
            "evidently": lambda: child_evidently(args.workdir, args.repeats),
        }
        print(json.dumps(children[args.child]()))
        return

    ensure_data(args.workdir, args.rows, args.fresh_data)
    evidently_py = None if args.skip_evidently else evidently_python()
    load = {"quiet": None, "load": os.getloadavg()[0], "waited_s": 0.0}
    if not args.no_wait:
        load = wait_for_quiet_machine(LOAD_LIMIT, LOAD_WAIT_SECONDS)
    print(
        f"1-min load average at start: {load['load']:.2f} (waited {load['waited_s']:.0f} s)",
        flush=True,
    )

    results: dict[str, dict] = {}
    variants = ["profile", "ours", "ours-objects", "scipy"]
    if evidently_py:
        variants.append("evidently")
    for variant in variants:
        python = evidently_py if variant == "evidently" else Path(sys.executable)
        print(f"running {LABELS[variant]} ...", flush=True)
        results[variant] = run_child(variant, python, args.workdir)
        result = results[variant]
        print(
            f"  {result['median_s']:.3f} s (median of {len(result['seconds'])}), peak "
            f"{result['peak_mb']:.0f} MB, load {result['load_before']:.2f} -> "
            f"{result['load_after']:.2f}",
            flush=True,
        )

    evidently = results.get("evidently")
    ours = results["ours"]
    goals = None
    if evidently:
        speedup = evidently["median_s"] / ours["median_s"]
        memory_ratio = ours["peak_mb"] / evidently["peak_mb"]
        goals = {
            "speedup_vs_evidently": {
                "value": speedup,
                "goal": GOALS["speedup_vs_evidently"],
                "met": speedup >= GOALS["speedup_vs_evidently"],
            },
            # The same ratio on CPU time: steadier when other work shares the machine.
            "speedup_vs_evidently_cpu": {
                "value": evidently["median_cpu_s"] / ours["median_cpu_s"],
                "goal": GOALS["speedup_vs_evidently"],
                "met": evidently["median_cpu_s"] / ours["median_cpu_s"]
                >= GOALS["speedup_vs_evidently"],
            },
            "seconds": {
                "value": ours["median_s"],
                "goal": GOALS["seconds"],
                "met": ours["median_s"] < GOALS["seconds"],
            },
            "memory_ratio": {
                "value": memory_ratio,
                "goal": GOALS["memory_ratio"],
                "met": memory_ratio <= GOALS["memory_ratio"],
            },
        }
    verdicts = _verdicts(results)

    print()
    print(
        f"Drift of 25 columns (20 numeric + 5 categorical), {args.rows:,} reference vs "
        f"{args.rows:,} current rows; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    print(_format_table(results, evidently))
    print(
        "(seconds / cpu s: wall / CPU time of the computation on data in memory, median of "
        "repeats; read s: Parquet -> arrays/frames, apart; peak MB: the whole child process; "
        "vs Evidently: Evidently seconds / seconds)"
    )
    if goals:
        print(
            "goals: "
            + "; ".join(
                f"{key} {goal['value']:.3g} (goal {goal['goal']:.3g}): "
                f"{'met' if goal['met'] else 'NOT met'}"
                for key, goal in goals.items()
            )
        )
    loads = [load["load"]] + [r["load_before"] for r in results.values()]
    if max(loads) >= LOAD_LIMIT:
        print(
            f"WARNING: measured with the 1-minute load average up to {max(loads):.1f} on "
            f"{os.cpu_count()} CPUs: wall times are inflated by other work; cpu s is the "
            "steadier figure."
        )
    print()
    print(_format_verdicts(verdicts))

    payload = {
        "benchmark": "drift",
        "rows": {"reference": args.rows, "current": args.rows},
        "columns": {"numeric": len(NUMERIC), "categorical": len(CATEGORICAL)},
        "shifts": SHIFTS,
        "thresholds": THRESHOLDS,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "load_at_start": load,
        "load_max": max(loads),
        "evidently_environment": list(EVIDENTLY_PINS) if evidently_py else None,
        "results": results,
        "goals": goals,
        "verdicts": verdicts,
        "command": "cd /work/main && .venv/bin/python benchmarks/bench_drift.py",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = args.out or (RESULTS if args.rows == 1_000_000 else args.workdir / "bench_drift.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
