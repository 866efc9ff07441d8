"""Stage 1 assets (group `data`): raw_<source> -> cleaned -> features, with GX checks.

Thin wrappers: the logic lives in `ml_lifecycle.data.*`; assets read, call it, write, report.
"""


from typing import Any

import dagster as dg

from ml_lifecycle.assets.catalog import table_metadata
from ml_lifecycle.data.aggregates import aggregate_frame
from ml_lifecycle.data.cleaning import clean, load_roles
from ml_lifecycle.data.features import (
    create_features_table,
    fit_feature_state,
    load_state,
    save_state,
)
from ml_lifecycle.data.ingestion import ingest_files, ingest_sql_table
from ml_lifecycle.data.landing import ensure_landing
from ml_lifecycle.data.sources import list_files, quote
from ml_lifecycle.resources import Warehouse, duckdb_buffers_released
from ml_lifecycle.spec import TARGET, TIME, DatasetSpec, Source

GROUP = "data"
POOL = "duckdb"
ROLE_TEXT = {
    "id": "identifier (dedup key)",
    "time": "prediction time (from the spec's time)",
    "target": "target (from the spec's target)",
    "numeric": "number; NaN/inf/out-of-range -> NULL",
    "categorical": "category; NULL/empty -> '(missing)'",
    "text": "free text; NULL -> ''",
    "json": "JSON string, flattened in features",
    "boolean": "boolean",
    "temporal": "date/time",
    "aggregate_input": "internal: history aggregate input (never a feature)",
}


def _file_metadata(report) -> dict[str, Any]:
    return {
        "new_files": len(report.new_files),
        "replaced_files": len(report.replaced_files),
        "unchanged_files": report.skipped_files,
        "rows_added": report.rows_added,
        "rows_removed": report.rows_removed,
        "files": dg.MetadataValue.md(
            "\n".join(f"- `{f}`" for f in report.new_files + report.replaced_files)
            or "no new files"),
    }


def _raw_asset(spec: DatasetSpec, name: str, source: Source, primary: bool) -> dg.AssetsDefinition:
    table = f"raw_{name}"
    fmt = source.resolved_format or "file"
    where = (source.path if source.is_sql else spec.resolve_path(source.path))
    kind = "incremental: new and changed files only" if primary else "reference table"
    description = (
        f"Raw `{name}` rows ingested from `{where}` ({fmt}) into the DuckDB warehouse; {kind}. "
        "A file is ingested once per content hash: the same file twice adds no rows, a changed "
        "file replaces its rows. A bad file (unreadable, empty, wrong schema) fails the run and "
        "writes nothing."
    )

    @dg.asset(
        name=table,
        group_name=GROUP,
        kinds={"duckdb", "postgres" if source.is_sql else fmt},
        pool=POOL,
        owners=spec.owners or None,
        description=description,
        tags={"stage": "data", "layer": "raw"},
    )
    def raw(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
        if source.is_sql:
            with warehouse.get_connection() as conn:
                report = ingest_sql_table(conn, table, source, spec.resolve_path(source.path))
                metadata = table_metadata(conn, table, database=warehouse.database)
        else:
            written = ensure_landing(spec)
            if written:
                context.log.info(f"fresh home: wrote {len(written)} landing files")
            files = list_files(spec, source)
            if not files:
                raise dg.Failure(
                    f"{table}: no files match {spec.resolve_path(source.path)} "
                    f"(source.path of {'source' if primary else 'reference ' + name!r})")
            with warehouse.get_connection() as conn:
                report = ingest_files(conn, table, source, files)
                metadata = table_metadata(conn, table, database=warehouse.database)
        context.log.info(
            f"{table}: +{report.rows_added} rows from {len(report.new_files)} new and "
            f"{len(report.replaced_files)} changed file(s); {report.skipped_files} unchanged")
        return dg.MaterializeResult(metadata={**_file_metadata(report), **metadata})

    return raw


def build_data_assets(spec: DatasetSpec) -> list[dg.AssetsDefinition]:
    raws = [_raw_asset(spec, spec.primary_name, spec.source, primary=True)]
    raws += [_raw_asset(spec, ref.name, ref.source, primary=False) for ref in spec.references]
    raw_keys = [r.key for r in raws]

    @dg.asset(
        name="cleaned",
        group_name=GROUP,
        deps=raw_keys,
        kinds={"duckdb"},
        pool=POOL,
        owners=spec.owners or None,
        tags={"stage": "data", "layer": "cleaned"},
        automation_condition=dg.AutomationCondition.eager()
        & dg.AutomationCondition.all_deps_blocking_checks_passed(),
    )
    def cleaned(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
        """Typed, deduplicated rows with the target derived, leak columns dropped and reference
        tables joined (point-in-time where the reference has a time: the latest observation at or
        before the row's time, never a later one). Numbers: NaN/inf/out-of-range -> NULL;
        categories: NULL/empty -> '(missing)'; rows without a time are dropped; duplicates by
        id_columns keep the latest ingested row."""
        with warehouse.get_connection() as conn:
            plan, report = clean(conn, spec)
            descriptions = {c: ROLE_TEXT.get(role, role) for c, role in plan.roles.items()}
            metadata = table_metadata(conn, "cleaned", database=warehouse.database,
                                      column_descriptions=descriptions, lineage=plan.lineage)
        context.log.info(f"cleaned: {report}")
        nulled = "\n".join(f"- `{c}`: {n}" for c, n in report.values_nulled.items())
        return dg.MaterializeResult(metadata={
            **metadata,
            "rows_in": report.rows_in,
            "rows_without_time_dropped": report.rows_without_time,
            "duplicates_removed": report.duplicates_removed,
            "rows_without_target": report.rows_without_target,
            "bad_values_nulled": dg.MetadataValue.md(nulled or "none"),
            "columns_by_role": dg.MetadataValue.json(
                {role: [c for c, r in plan.roles.items() if r == role]
                 for role in sorted(set(plan.roles.values()))}),
        })

    @dg.asset(
        name="features",
        group_name=GROUP,
        deps=[cleaned.key],
        kinds={"duckdb"},
        pool=POOL,
        owners=spec.owners or None,
        tags={"stage": "data", "layer": "features"},
        automation_condition=dg.AutomationCondition.eager()
        & dg.AutomationCondition.all_deps_blocking_checks_passed(),
    )
    def features(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
        """Model-ready columns: categories encoded as stable codes (DuckDB ENUMs whose levels only
        grow), time parts, point-in-time history aggregates from the spec (computed only from
        values known `lag` before each row's time), hashed text and flattened JSON. The transform
        is `ml_lifecycle.data.features.feature_select_sql`, the same code the service runs."""
        with warehouse.get_connection() as conn:
            plan_roles = load_roles(conn, "cleaned")
            previous = load_state(conn)
            state = fit_feature_state(conn, spec, plan_roles, previous=previous)
            # Aggregates come back as arrays in `cleaned`'s row order (joined by row id).
            aligned = None
            if spec.aggregates:
                with duckdb_buffers_released(conn):
                    aligned = aggregate_frame(conn, spec)
            create_features_table(conn, spec, state, aligned)
            del aligned
            save_state(conn, state)
            lineage = {f.name: [("cleaned", s) for s in f.source] for f in state.features}
            for column in [*spec.id_columns, TIME, TARGET]:
                lineage.setdefault(column, [("cleaned", column)])
            descriptions = {f.name: f"{f.kind}{' (categorical)' if f.categorical else ''}"
                            for f in state.features}
            metadata = table_metadata(conn, "features", database=warehouse.database,
                                      column_descriptions=descriptions, lineage=lineage)
            coverage = conn.execute(
                "SELECT " + ", ".join(
                    f"count({quote(name)}) / greatest(count(*), 1)" for name in state.aggregates
                ) + " FROM features"
            ).fetchall()[0] if state.aggregates else []
        context.log.info(f"features: {len(state.features)} features, state v{state.version}")
        return dg.MaterializeResult(metadata={
            **metadata,
            "feature_count": len(state.features),
            "feature_state_version": state.version,
            "features_by_kind": dg.MetadataValue.json(
                {kind: [f.name for f in state.features if f.kind == kind]
                 for kind in sorted({f.kind for f in state.features})}),
            "category_levels": dg.MetadataValue.json(
                {name: len(values) for name, values in state.categories.items()}),
            "aggregate_coverage": dg.MetadataValue.json(
                {name: round(float(v or 0), 4) for name, v in zip(state.aggregates, coverage,
                                                                   strict=False)}),
        })

    return [*raws, cleaned, features]
