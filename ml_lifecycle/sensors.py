"""Sensors: new or changed landing files start an ingestion run."""

import hashlib
import json

import dagster as dg

from ml_lifecycle.data.sources import list_files
from ml_lifecycle.spec import DatasetSpec


def landing_signatures(spec: DatasetSpec) -> dict[str, dict[str, str]]:
    """raw asset name -> {file path: size:mtime} for every file source of the spec."""
    sources = [(spec.primary_name, spec.source)] + [(r.name, r.source) for r in spec.references]
    out: dict[str, dict[str, str]] = {}
    for name, source in sources:
        if source.is_sql:
            continue
        out[f"raw_{name}"] = {
            str(p): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in list_files(spec, source)
        }
    return out


def already_ingested(spec: DatasetSpec) -> dict[str, dict[str, int]]:
    """raw table -> {path: size} from the warehouse manifest; empty when it cannot be read
    (no warehouse yet, or a run holds the write lock)."""
    import duckdb

    from ml_lifecycle.data.ingestion import MANIFEST

    warehouse = spec.paths().warehouse
    if not warehouse.exists():
        return {}
    try:
        with duckdb.connect(str(warehouse), read_only=True) as conn:
            rows = conn.execute(f"SELECT table_name, path, size_bytes FROM {MANIFEST}").fetchall()
    except duckdb.Error:
        return {}
    out: dict[str, dict[str, int]] = {}
    for table, path, size in rows:
        out.setdefault(table, {})[path] = size
    return out


def build_landing_sensor(spec: DatasetSpec, job) -> dg.SensorDefinition:
    @dg.sensor(
        name="landing_sensor",
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Every 30 s, lists the landing files of `{spec.name}` (source and references). When a "
            "file is new or changed, launches `data_pipeline` for the raw tables whose files "
            "changed plus `cleaned` and `features`; ingestion then reads only the new files."
        ),
    )
    def landing_sensor(context: dg.SensorEvaluationContext):
        current = landing_signatures(spec)
        previous = json.loads(context.cursor) if context.cursor else {}
        changed = {
            table: sorted(p for p, sig in files.items() if previous.get(table, {}).get(p) != sig)
            for table, files in current.items()
        }
        if not context.cursor:
            # First tick: files already in the warehouse manifest need no run.
            ingested = already_ingested(spec)
            changed = {
                table: [
                    p
                    for p in paths
                    if ingested.get(table, {}).get(p) != int(current[table][p].split(":")[0])
                ]
                for table, paths in changed.items()
            }
        changed = {table: paths for table, paths in changed.items() if paths}
        if not changed:
            context.update_cursor(json.dumps(current))
            return dg.SkipReason("no new or changed landing files")
        context.update_cursor(json.dumps(current))
        key = hashlib.sha256(
            json.dumps(
                {t: {p: current[t][p] for p in paths} for t, paths in changed.items()},
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        selection = [dg.AssetKey(t) for t in changed] + [
            dg.AssetKey("cleaned"),
            dg.AssetKey("features"),
        ]
        return dg.RunRequest(
            run_key=key,
            asset_selection=selection,
            tags={
                "ml_lifecycle/trigger": "landing_sensor",
                "ml_lifecycle/new_files": str(sum(len(p) for p in changed.values())),
            },
        )

    return landing_sensor
