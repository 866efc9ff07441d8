"""`make demo`: replay a year of flights through the whole lifecycle, unattended.

1. The first months land; `training_pipeline` ingests, cleans, builds features, trains, gates
   and promotes the first champion and exports the online snapshot.
2. Each following month: its file lands, the simulator replays its flights as requests to the
   service runtime (with departures posted to the event feed and arrivals as labels),
   `monitoring_pipeline` computes drift and live performance, the automation condition of
   `model` is evaluated: if the retrain check failed it requests a retrain, which runs on the
   data landed so far; the gate decides; the service swaps to a promoted champion by itself.
3. A timeline (table + HTML with plots) shows drift per feature per month, live AUC with
   retraining against the first model without it, and the promotions.
Everything runs as Dagster runs on $DAGSTER_HOME, so `make ui` shows them afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np

from ml_lifecycle.data.landing import land
from ml_lifecycle.spec import TARGET, TIME, DatasetSpec
from ml_lifecycle.training.dataset import matrix_select_sql
from ml_lifecycle.training.metrics import compute_metrics
from ml_lifecycle.training.registry import ModelRegistry


@dataclass
class MonthRow:
    month: int
    requests: int = 0
    scored: int = 0
    champion: str = ""
    drift_status: str = ""
    drifted_share: float | None = None
    live_auc: float | None = None
    retrain_requested: bool = False
    promoted: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _execute(
    job_name: str, instance: dg.DagsterInstance, selection: list[str] | None = None, step: str = ""
) -> dg.DagsterRun | None:
    from ml_lifecycle.cli import execute_with_progress

    # The demo prints what happened itself; a failing blocking check is how the monitoring run
    # asks for a retrain, so step failures are expected here and their stack traces would only
    # bury the story. Every event is still in the run's log in the UI (`make ui`).
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    run, error = execute_with_progress(
        job_name,
        instance,
        selection=selection,
        run_config=quiet,
        tags={"ml_lifecycle/trigger": "demo", "ml_lifecycle/demo_step": step or job_name},
        desc=f"      {job_name}",
        leave=False,
    )
    if error is not None:
        raise error
    return run


def _failed_steps(instance: dg.DagsterInstance, run: dg.DagsterRun | None) -> set[str]:
    """Step keys that failed in a run (a failing blocking check is one, by design)."""
    if run is None or run.is_success:
        return set()
    failures = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    return {event.step_key for event in failures if event.step_key}


def _month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, 1)
    end = datetime(year + (month == 12), month % 12 + 1, 1)
    return start, end


def _score_months(spec: DatasetSpec, version: str) -> dict[int, float]:
    """ROC AUC per month of one model version on the (fully ingested) features table."""
    registry = ModelRegistry(spec.paths().registry)
    model = registry.load(version)
    booster = model.booster()
    with duckdb.connect(str(spec.paths().warehouse), read_only=True) as conn:
        frame = conn.sql(
            f"SELECT month({TIME}) AS m, {TARGET} AS y, {', '.join(matrix_select_sql(model.state))}"
            f" FROM features f WHERE {TARGET} IS NOT NULL"
        ).pl()
    out = {}
    for month in sorted(frame["m"].unique().to_list()):
        part = frame.filter(frame["m"] == month)
        X = part.select(model.state.feature_names).to_numpy().astype(np.float32)
        out[int(month)] = compute_metrics(
            "binary", part["y"].to_numpy().astype(float), booster.predict(X)
        )["roc_auc"]
    return out


def run_demo(
    spec: DatasetSpec,
    first_months: int = 6,
    year: int = 2013,
    batch: int = 1000,
    fresh: bool = True,
    last_month: int = 12,
) -> list[MonthRow]:
    from ml_lifecycle.cli import _instance
    from ml_lifecycle.definitions import defs
    from ml_lifecycle.serving.runtime import ServingRuntime
    from ml_lifecycle.serving.simulator import held_out_rows, replay

    paths = spec.paths()
    if fresh and paths.root.exists():
        shutil.rmtree(paths.root)
    instance = _instance()
    started = time.monotonic()

    print(f"[1/3] months 1-{first_months} land; training the first champion")
    land(spec, months=range(1, first_months + 1))
    run = _execute("training_pipeline", instance, step="first champion")
    registry = ModelRegistry(paths.registry)
    first = registry.alias("champion")
    if not run or not run.is_success or first is None:
        raise RuntimeError("the first training run did not produce a champion; see `make ui`")
    print(f"      champion {first} ({time.monotonic() - started:.0f}s)")
    # New levels (a destination first served in autumn) are scored as missing and logged, so
    # the unseen-category share shows up in drift instead of failing whole batches.
    runtime = ServingRuntime(spec, watch_interval=0.5, unknown_categories="score")
    fields = [f.name for f in runtime.fields]
    automation_cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance).cursor

    timeline: list[MonthRow] = []
    print(f"[2/3] replaying months {first_months + 1}-{last_month} through the service")
    for month in range(first_months + 1, last_month + 1):
        tick = time.monotonic()
        row = MonthRow(month=month)
        written = land(spec, months=[month])
        rows = held_out_rows(spec, *_month_bounds(year, month), files=written or None)
        report = replay(runtime, spec, rows, fields, batch=batch, progress=True)
        row.requests, row.scored = report.records, report.scored
        row.champion = ",".join(sorted(report.model_versions))
        monitoring = _execute("monitoring_pipeline", instance, step=f"month {month}: drift")
        unexpected = _failed_steps(instance, monitoring) - {"drift_metrics_retrain_required"}
        if unexpected:
            row.notes.append(f"monitoring steps failed: {sorted(unexpected)} (see `make ui`)")
            print(f"      monitoring run failed at {sorted(unexpected)}; its log is in the UI")
        with duckdb.connect(str(paths.warehouse), read_only=True) as conn:
            latest = conn.sql(
                "SELECT * FROM drift_windows WHERE month(CAST(window_start AS DATE)) = ? "
                "ORDER BY model_version DESC LIMIT 1",
                params=[month],
            ).pl()
        if latest.height:
            window = latest.to_dicts()[0]
            row.drift_status = window["drift_status"]
            row.drifted_share = window["drifted_share"]
            row.live_auc = window["live_metric"]
        evaluation = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=automation_cursor
        )
        automation_cursor = evaluation.cursor
        row.retrain_requested = evaluation.get_num_requested(dg.AssetKey("model")) > 0
        if row.retrain_requested:
            before = registry.alias("champion")
            retrain = _execute("training_pipeline", instance, step=f"month {month}: retrain")
            after = registry.alias("champion")
            if after != before:
                row.promoted = after
                runtime.reload_if_changed()
            elif retrain and not retrain.is_success:
                row.notes.append("challenger refused by the gate")
        row.seconds = time.monotonic() - tick
        timeline.append(row)
        print(
            f"      month {month:>2}: {row.scored:>6} scored by {row.champion:<6} drift "
            f"{row.drift_status or '-':<5} share {_fmt(row.drifted_share)} live AUC "
            f"{_fmt(row.live_auc)}"
            + (f"  retrain -> {row.promoted or 'refused'}" if row.retrain_requested else "")
            + f"  ({row.seconds:.0f}s)"
        )
    runtime.close()

    print("[3/3] timeline report")
    _execute("data_pipeline", instance, step="last month")  # it lands in the warehouse too
    baseline = _score_months(spec, first)
    html = write_timeline(spec, timeline, baseline, first)
    print(format_timeline(timeline, baseline))
    print(
        summary_text(timeline, first, registry.alias("champion"), html, time.monotonic() - started)
    )
    return timeline


def summary_text(
    timeline: list[MonthRow], first: str, champion: str | None, html: Path, seconds: float
) -> str:
    """What the replay did, in a few lines, and where to look next."""
    requested = sum(r.retrain_requested for r in timeline)
    promoted = [r.promoted for r in timeline if r.promoted]
    drifted = [r.month for r in timeline if r.drift_status in ("warn", "error")]
    months = f"{timeline[0].month}-{timeline[-1].month}" if timeline else "none"
    return "\n".join(
        [
            f"\nsummary: replayed months {months} ({sum(r.scored for r in timeline):,} predictions "
            f"scored) in {seconds / 60:.1f} min",
            f"  drift flagged in {len(drifted)} month(s){': ' + str(drifted) if drifted else ''}; "
            f"{requested} retrain(s) requested, {len(promoted)} promoted"
            f"{' (' + ', '.join(promoted) + ')' if promoted else ''}",
            f"  champion: {first} at the start, {champion} now",
            f"  report:   {html} (timeline, live AUC with and without retraining, drift heatmap)",
        ]
    )


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:.3f}"


def format_timeline(timeline: list[MonthRow], baseline: dict[int, float]) -> str:
    lines = [
        f"{'month':>5} {'scored':>7} {'served by':>9} {'drift':>6} {'share':>6} "
        f"{'live AUC':>8} {'no-retrain AUC':>14}  retrain"
    ]
    for row in timeline:
        lines.append(
            f"{row.month:>5} {row.scored:>7} {row.champion:>9} {row.drift_status or '-':>6} "
            f"{_fmt(row.drifted_share):>6} {_fmt(row.live_auc):>8} "
            f"{_fmt(baseline.get(row.month)):>14}  "
            + (
                "promoted " + row.promoted
                if row.promoted
                else "requested, refused"
                if row.retrain_requested
                else ""
            )
        )
    return "\n".join(lines)


def write_timeline(
    spec: DatasetSpec, timeline: list[MonthRow], baseline: dict[int, float], first: str
) -> Path:
    from matplotlib.figure import Figure

    from ml_lifecycle.training.report import plot_png

    months = [r.month for r in timeline]
    figure = Figure(figsize=(8, 4))
    axis = figure.subplots()
    axis.plot(months, [r.live_auc for r in timeline], "o-", label="live AUC (with retraining)")
    axis.plot(
        months,
        [baseline.get(m) for m in months],
        "s--",
        label=f"first champion {first} (no retraining)",
    )
    for row in timeline:
        if row.promoted:
            axis.axvline(row.month, color="green", alpha=0.3)
            axis.annotate(
                f"{row.promoted}", (row.month, axis.get_ylim()[0]), fontsize=8, color="green"
            )
    axis.set_xlabel("month of 2013")
    axis.set_ylabel("ROC AUC")
    axis.set_title("Live performance per month; promotions in green")
    axis.legend()
    auc_png = plot_png(figure)
    drift_png = None
    with duckdb.connect(str(spec.paths().warehouse), read_only=True) as conn:
        rows = conn.sql("SELECT * FROM drift_metrics").pl().to_dicts()
    from ml_lifecycle.assets.monitoring import _drift_plot

    drift_png = _drift_plot(rows)
    import base64

    def img(png: bytes | None) -> str:
        return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""

    table = "".join(
        f"<tr><td>{r.month}</td><td>{r.scored}</td><td>{r.champion}</td>"
        f"<td>{r.drift_status}</td><td>{_fmt(r.drifted_share)}</td><td>{_fmt(r.live_auc)}</td>"
        f"<td>{_fmt(baseline.get(r.month))}</td><td>{r.promoted or ''}</td></tr>"
        for r in timeline
    )
    html = (
        f"<html><head><meta charset='utf-8'><title>{spec.name} lifecycle replay</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;"
        "border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>{spec.name}: a year through the lifecycle</h1>"
        "<table><tr><th>month</th><th>scored</th><th>served by</th><th>drift</th>"
        "<th>drifted share</th><th>live AUC</th><th>no-retrain AUC</th><th>promoted</th></tr>"
        f"{table}</table><h2>Live AUC</h2>{img(auc_png)}<h2>Drift per feature</h2>"
        f"{img(drift_png)}</body></html>"
    )
    path = spec.paths().reports / "demo.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    (spec.paths().reports / "demo.json").write_text(
        json.dumps([r.__dict__ for r in timeline], default=str, indent=1)
    )
    return path
