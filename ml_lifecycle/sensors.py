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
        changed = {table: paths for table, paths in changed.items() if paths}
        if not changed:
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
