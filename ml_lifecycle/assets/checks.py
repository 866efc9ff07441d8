"""Great Expectations suites as blocking Dagster asset checks on raw_*, cleaned and features."""

import dagster as dg

from ml_lifecycle.data.ingestion import table_columns
from ml_lifecycle.data.validation import expectations_for, load_frames, validate_frames
from ml_lifecycle.resources import Warehouse
from ml_lifecycle.spec import DatasetSpec

CHECK_NAME = "great_expectations"


def _check(spec: DatasetSpec, table: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=table,
        name=CHECK_NAME,
        blocking=True,
        pool="duckdb",
        description=(
            f"Great Expectations suite for `{table}`: expectations generated from the dataset "
            f"spec (columns it names, non-null ids, unique keys, ranges, target values) plus "
            f"`expectations.{table}` from the spec. An error-level failure blocks everything "
            "downstream, in the same run and under automation; warn-level failures are reported."
        ),
    )
    def great_expectations(warehouse: Warehouse) -> dg.AssetCheckResult:
        with warehouse.get_connection() as conn:
            columns = table_columns(conn, table)
            expectations = expectations_for(spec, table, columns)
            # Only the columns the suite reads: the frame is a pandas copy (GX's engine).
            frames = load_frames(conn, table, expectations, columns)
        outcome = validate_frames(frames, expectations)
        failed = outcome.failed_errors + outcome.failed_warnings
        return dg.AssetCheckResult(
            passed=not failed,
            severity=dg.AssetCheckSeverity.ERROR
            if outcome.failed_errors
            else dg.AssetCheckSeverity.WARN,
            description=outcome.describe_failures()
            if failed
            else f"{len(outcome.results)} expectations passed on {outcome.row_count} rows",
            metadata={
                "rows_validated": outcome.row_count,
                "expectations": len(outcome.results),
                "failed_errors": len(outcome.failed_errors),
                "failed_warnings": len(outcome.failed_warnings),
                # Which expectation on which column, at a glance (details in `failures`).
                "failed_expectations": ", ".join(f"{r.type}({r.column or ''})" for r in failed)
                or "none",
                "failures": dg.MetadataValue.md(outcome.describe_failures() or "none"),
                "results": dg.MetadataValue.md(outcome.to_markdown()),
                "unexpected_counts": dg.MetadataValue.json(
                    {
                        f"{r.type}({r.column or ''})": r.unexpected_count
                        for r in outcome.results
                        if r.unexpected_count
                    }
                ),
            },
        )

    return great_expectations


def build_validation_checks(spec: DatasetSpec) -> list[dg.AssetChecksDefinition]:
    return [_check(spec, table) for table in [*spec.raw_asset_names(), "cleaned", "features"]]
