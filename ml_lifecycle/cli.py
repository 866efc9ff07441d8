"""`ml-lifecycle`: run the lifecycle from a terminal (demo, jobs, landing files, status, spec check).

Jobs run on the Dagster instance in $DAGSTER_HOME, so every run shows up in `make ui`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from ml_lifecycle.settings import REPO_ROOT, dataset_spec_path
from ml_lifecycle.spec import SpecError, load_spec


def _months(text: str | None) -> list[int] | None:
    if not text:
        return None
    months: list[int] = []
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            months.extend(range(int(low), int(high) + 1))
        else:
            months.append(int(part))
    return months


def _instance():
    import dagster as dg

    home = os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / ".dagster_home"))
    Path(home).mkdir(parents=True, exist_ok=True)
    config = Path(home) / "dagster.yaml"
    if not config.exists():
        config.write_text((REPO_ROOT / "dagster.yaml").read_text())
    return dg.DagsterInstance.get()


UI_URL = "http://127.0.0.1:3001"  # `make ui`


def execute_with_progress(
    job_name: str,
    instance,
    selection: list[str] | None = None,
    run_config: dict | None = None,
    tags: dict[str, str] | None = None,
    desc: str | None = None,
    leave: bool = True,
):
    """Execute a job (optionally a subset of its assets) on `instance` while a progress bar
    counts its finished steps; returns (the run, or None when it failed to start; the error)."""
    import uuid

    import dagster as dg
    from tqdm import tqdm

    from ml_lifecycle.definitions import defs

    job_def = defs.resolve_job_def(job_name)
    keys = [dg.AssetKey(s) for s in selection] if selection else None
    try:
        total = len((job_def.get_subset(asset_selection=set(keys)) if keys else job_def).nodes)
    except Exception:  # only the bar's length: count without a total
        total = None
    token = uuid.uuid4().hex
    result: dict = {}

    def target() -> None:
        job = dg.build_reconstructable_job(
            "ml_lifecycle.definitions", "job_by_name", reconstructable_args=(job_name,)
        )
        try:
            with dg.execute_job(
                job,
                instance=instance,
                run_config=run_config,
                asset_selection=keys,
                tags={
                    "ml_lifecycle/trigger": "cli",
                    **(tags or {}),
                    "ml_lifecycle/cli_token": token,
                },
            ) as outcome:
                result["run_id"] = outcome.run_id
        except Exception as error:  # surfaced to the caller; the run's events hold details
            result["error"] = error

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    bar = tqdm(total=total, desc=desc or job_name, unit="step", file=sys.stdout, leave=leave)
    run_id = None
    seen: set[str] = set()
    while True:
        if run_id is None:
            runs = instance.get_runs(
                filters=dg.RunsFilter(tags={"ml_lifecycle/cli_token": token}), limit=1
            )
            run_id = runs[0].run_id if runs else None
        if run_id:
            for record in instance.all_logs(
                run_id,
                of_type={
                    dg.DagsterEventType.STEP_SUCCESS,
                    dg.DagsterEventType.STEP_FAILURE,
                    dg.DagsterEventType.STEP_SKIPPED,
                },
            ):
                step = record.step_key or ""
                if step not in seen:
                    seen.add(step)
                    bar.update(1)
                    bar.set_postfix_str(step[:40])
        if not worker.is_alive():
            break
        time.sleep(0.3)
    worker.join()
    bar.close()
    run_id = result.get("run_id") or run_id
    return (instance.get_run_by_id(run_id) if run_id else None), result.get("error")


def run_job(job_name: str) -> bool:
    """Execute a job on the persistent instance with a progress bar; print what happened."""
    instance = _instance()
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    run, error = execute_with_progress(job_name, instance, run_config=quiet)
    if run is None:
        print(f"run failed to start: {error}", file=sys.stderr)
        return False
    _summarise(instance, run.run_id)
    return run.is_success


# Float metadata worth a line in a run's summary (the rest is in the UI).
HEADLINE_PREFIXES = ("test_", "latest_")


def _summarise(instance, run_id: str) -> None:
    import dagster as dg

    run = instance.get_run_by_id(run_id)
    status = run.status.value if run else "UNKNOWN"
    print(f"\nrun {run_id[:8]} of {run.job_name if run else '?'}: {status}")
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = record.dagster_event.event_specific_data.materialization
        metadata = materialization.metadata
        rows = metadata.get("dagster/row_count")
        label = "/".join(materialization.asset_key.path)
        extra = f"{rows.value:>10,} rows" if rows is not None else ""
        headline = [
            f"{key}={entry.value:g}"
            for key, entry in metadata.items()
            if key.startswith(HEADLINE_PREFIXES)
            and isinstance(entry, dg.FloatMetadataValue)
            and entry.value is not None
        ][:3]
        version = metadata.get("model_version") or metadata.get("champion_version")
        if version is not None:
            headline.insert(0, str(version.value))
        print(f"  materialized {label:<22} {extra}{'  ' + ', '.join(headline) if headline else ''}")
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.dagster_event.event_specific_data
        verdict = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value})"
        print(f"  check {'/'.join(evaluation.asset_key.path)}:{evaluation.check_name} {verdict}")
        if not evaluation.passed and evaluation.description:
            for line in evaluation.description.splitlines()[:5]:
                print(f"      {line}")
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        error = record.dagster_event.event_specific_data.error
        message = error.message.strip().splitlines() if error else []
        print(f"  step {record.step_key} failed: {message[-1] if message else ''}")
    print(f"  details: `make ui`, then {UI_URL}/runs/{run_id}")


def cmd_demo(args: argparse.Namespace) -> int:
    spec = load_spec(dataset_spec_path())
    print(f"ml-lifecycle demo: dataset {spec.name!r} ({spec.spec_path})")
    print(
        f"  home: {spec.paths().root} (started fresh)\n  dagster instance: "
        f"{os.environ.get('DAGSTER_HOME', REPO_ROOT / '.dagster_home')}"
    )
    if args.quick or spec.landing is None:
        ok = run_job("training_pipeline")
    else:
        from ml_lifecycle.demo import run_demo

        run_demo(spec, first_months=args.first_months)
        ok = True
    print(
        "\nnext: `make ui` and open http://127.0.0.1:3001 to see every run, asset, check and "
        "plot;\n      `make serve` to serve the champion; `ml-lifecycle models` and "
        "`ml-lifecycle experiments` for the registry and the training runs."
    )
    return 0 if ok else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from datetime import datetime

    from ml_lifecycle.serving.simulator import Drift, HttpTarget, held_out_rows, replay

    spec = load_spec(dataset_spec_path())
    target = HttpTarget(args.url)
    schema = target.client.post("/model").json()
    fields = list(schema["request_fields"])
    rows = held_out_rows(spec, datetime.fromisoformat(args.start), datetime.fromisoformat(args.end))
    report = replay(
        target,
        spec,
        rows,
        fields,
        rate=args.rate,
        batch=args.batch,
        drift=Drift.parse(args.drift or []),
        max_records=args.max_records,
        max_seconds=args.max_seconds,
    )
    print(
        f"\nsent {report.records:,} records in {report.seconds:.1f}s: {report.scored:,} scored "
        f"{report.model_versions}, {report.rejected} rejected (4xx), {report.errors} errors; "
        f"{report.events:,} events, {report.labels:,} labels posted"
    )
    print(
        f"next: `ml-lifecycle run monitoring_pipeline` computes drift and live performance "
        f"from the inference log ({spec.paths().inference});\n      then the drift_metrics "
        f"asset and its checks in `make ui` ({UI_URL}/assets/drift_metrics)"
    )
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from ml_lifecycle.monitoring.lineage import trace_prediction

    spec = load_spec(dataset_spec_path())
    chain = trace_prediction(spec, args.request_id)
    for key, value in chain.items():
        print(f"{key:>18}: {value}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return 0 if run_job(args.job) else 1


def cmd_land(args: argparse.Namespace) -> int:
    from ml_lifecycle.data.landing import land

    spec = load_spec(dataset_spec_path())
    written = land(spec, months=_months(args.months), scale=args.scale)
    print(f"wrote {len(written)} landing file(s) under {spec.paths().landing}")
    for path in written:
        print(f"  {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import duckdb

    spec = load_spec(dataset_spec_path())
    warehouse = spec.paths().warehouse
    print(f"dataset {spec.name!r}: {warehouse}")
    if not warehouse.exists():
        print("  no warehouse yet: run `make demo`")
        return 0
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        tables = conn.execute(
            "SELECT table_name, estimated_size, column_count FROM duckdb_tables() ORDER BY 1"
        ).fetchall()
        for name, _, columns in tables:
            rows = conn.execute(f'SELECT count(*) FROM "{name}"').fetchall()[0][0]
            print(f"  {name:<22} {rows:>10,} rows  {columns:>3} columns")
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    import json

    import duckdb

    from ml_lifecycle.training.tracking import TABLE

    spec = load_spec(dataset_spec_path())
    warehouse = spec.paths().warehouse
    if not warehouse.exists():
        print("no warehouse yet: run `make demo`")
        return 0
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        exists = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [TABLE]
        ).fetchall()[0][0]
        if not exists:
            print("no training runs yet")
            return 0
        rows = conn.execute(
            f"SELECT started_at, model_version, status, code_version, data_snapshot, duration_s, "
            f"valid_metrics, test_metrics, params FROM {TABLE} WHERE kind = 'train' "
            f"ORDER BY started_at DESC LIMIT ?",
            [args.limit],
        ).fetchall()
    print(
        f"{'time':<20} {'version':<8} {'status':<10} {'code':<13} {'data':<17} "
        f"{'secs':>6}  valid -> test"
    )
    for started, version, status, code, data, secs, valid, test, params in rows:
        valid, test = json.loads(valid or "{}"), json.loads(test or "{}")
        figures = "  ".join(
            f"{k}={valid.get(k, float('nan')):.4f}->"
            + (f"{test[k]:.4f}" if test.get(k) is not None else "?")
            for k in list(valid)[:3]
        )
        print(
            f"{str(started)[:19]:<20} {version:<8} {status:<10} {code:<13} {data:<17} "
            f"{secs:>6.1f}  {figures}"
        )
        if args.params:
            print(f"{'':<20} params: {json.loads(params or '{}').get('lightgbm')}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ml_lifecycle.training.registry import ModelRegistry

    spec = load_spec(dataset_spec_path())
    registry = ModelRegistry(spec.paths().registry)
    aliases = registry.aliases()
    print(f"registry {registry.root}: aliases {aliases or 'none'}")
    for version in registry.versions():
        meta = registry.load(version).metadata
        tags = [name for name, v in aliases.items() if v == version]
        valid = meta.get("valid_metrics", {})
        first = next(iter(valid), None)
        score = f"valid {first}={valid[first]:.4f}" if first else ""
        print(
            f"  {version} {meta.get('registered_at', '')} {score} run {str(meta.get('run_id'))[:8]}"
            f" data {meta.get('data_snapshot')} code {meta.get('code_version')}"
            f"{'  <- ' + ', '.join(tags) if tags else ''}"
        )
    for entry in registry.audit_log()[-args.audit :]:
        print(
            f"  audit {entry['time']} {entry['event']:<11} {entry.get('version')}: "
            f"{entry['reason']}"
        )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from ml_lifecycle.training.registry import ModelRegistry, RegistryError

    spec = load_spec(dataset_spec_path())
    registry = ModelRegistry(spec.paths().registry)
    try:
        entry = registry.rollback(args.to, reason=args.reason)
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"champion: {entry['previous_champion']} -> {entry['version']} ({entry['reason']})")
    return 0


def cmd_check_spec(args: argparse.Namespace) -> int:
    from ml_lifecycle.data.validation import check_spec_expectations

    path = Path(args.path) if args.path else dataset_spec_path()
    spec = load_spec(path)
    check_spec_expectations(spec)
    print(
        f"{path}: valid ({spec.task}, {len(spec.references)} references, "
        f"{len(spec.aggregates)} aggregates)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ml-lifecycle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="replay a year through the lifecycle (default dataset)")
    demo.add_argument("--quick", action="store_true", help="only run training_pipeline")
    demo.add_argument("--first-months", type=int, default=6)
    simulate = sub.add_parser("simulate", help="replay held-out rows against a running service")
    simulate.add_argument("--url", default="http://127.0.0.1:3000")
    simulate.add_argument("--start", required=True, help="e.g. 2013-11-01")
    simulate.add_argument("--end", required=True, help="e.g. 2013-12-01")
    simulate.add_argument("--rate", type=float, default=500.0, help="records per second")
    simulate.add_argument("--batch", type=int, default=50)
    simulate.add_argument("--max-records", type=int, default=50_000)
    simulate.add_argument("--max-seconds", type=float, default=600.0)
    simulate.add_argument(
        "--drift", nargs="*", help="shift:col=v scale:col=f new:col=share nulls:col=share"
    )
    trace = sub.add_parser("trace", help="prediction -> model version -> run -> data -> code")
    trace.add_argument("request_id")
    run = sub.add_parser("run", help="run a job on the $DAGSTER_HOME instance")
    run.add_argument("job", nargs="?", default="training_pipeline")
    land = sub.add_parser("land", help="write landing files with the spec's generator")
    land.add_argument("--months", help="e.g. 1-3 or 4,5 (default: all)")
    land.add_argument("--scale", type=int, default=1, help="copies shifted by whole years")
    sub.add_parser("status", help="tables in the dataset's warehouse")
    experiments = sub.add_parser("experiments", help="compare training runs (experiments table)")
    experiments.add_argument("--limit", type=int, default=20)
    experiments.add_argument("--params", action="store_true", help="show each run's params")
    models = sub.add_parser("models", help="registered model versions, aliases, audit log")
    models.add_argument("--audit", type=int, default=10, help="audit entries to show")
    rollback = sub.add_parser("rollback", help="point the champion back at an earlier version")
    rollback.add_argument("--to", help="version, e.g. v0002 (default: the previous champion)")
    rollback.add_argument("--reason", default="manual rollback")
    check = sub.add_parser("check-spec", help="validate a dataset spec file")
    check.add_argument("path", nargs="?")
    args = parser.parse_args(argv)
    handlers = {
        "demo": cmd_demo,
        "simulate": cmd_simulate,
        "trace": cmd_trace,
        "run": cmd_run,
        "land": cmd_land,
        "status": cmd_status,
        "experiments": cmd_experiments,
        "models": cmd_models,
        "rollback": cmd_rollback,
        "check-spec": cmd_check_spec,
    }
    try:
        return handlers[args.command](args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
