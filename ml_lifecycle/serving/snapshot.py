"""The online snapshot the pipeline exports for the service.

`$ML_LIFECYCLE_HOME/<dataset>/online/<stamp>/` holds:
    raw_<primary>.parquet     the primary source's schema (no rows): how requests are typed
    raw_<reference>.parquet   every reference table (the service looks fields up in them)
    events_<aggregate>.parquet  keys, known_at, value of every history event (online store seed)
    manifest.json             when, from which data, how many rows
and `online/CURRENT` names the latest complete one (written atomically after the folder).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from ml_lifecycle.data.cleaning import AGG_KNOWN_AT, AGG_VALUE
from ml_lifecycle.data.sources import quote, sql_literal
from ml_lifecycle.spec import DatasetSpec


def snapshot_root(spec: DatasetSpec) -> Path:
    return spec.paths().root / "online"


def export_online_snapshot(
    conn: duckdb.DuckDBPyConnection, spec: DatasetSpec, root: Path | None = None, keep: int = 3
) -> tuple[Path, dict[str, Any]]:
    root = Path(root or snapshot_root(spec))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    staging = root / f".staging-{stamp}"
    staging.mkdir(parents=True, exist_ok=True)
    rows: dict[str, int] = {}

    def copy(query: str, name: str) -> None:
        target = staging / f"{name}.parquet"
        conn.execute(f"COPY ({query}) TO {sql_literal(str(target))} (FORMAT parquet)")
        rows[name] = int(
            conn.execute(
                f"SELECT count(*) FROM read_parquet({sql_literal(str(target))})"
            ).fetchall()[0][0]
        )

    primary = spec.raw_asset_names()[0]
    copy(f"SELECT * FROM {quote(primary)} LIMIT 0", primary)
    for ref in spec.references:
        copy(f"SELECT * FROM {quote('raw_' + ref.name)}", f"raw_{ref.name}")
    for aggregate in spec.aggregates:
        keys = ", ".join(quote(k) for k in aggregate.keys)
        value, known_at = AGG_VALUE.format(aggregate.name), AGG_KNOWN_AT.format(aggregate.name)
        copy(
            f"SELECT {keys}, {known_at} AS known_at, {value} AS value FROM cleaned "
            f"WHERE {value} IS NOT NULL AND {known_at} IS NOT NULL",
            f"events_{aggregate.name}",
        )
    manifest = {"dataset": spec.name, "created_at": datetime.now(UTC).isoformat(), "rows": rows}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    final = root / stamp
    os.rename(staging, final)
    tmp = root / ".CURRENT.tmp"
    tmp.write_text(stamp)
    os.replace(tmp, root / "CURRENT")
    for old in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[
        :-keep
    ]:
        shutil.rmtree(old, ignore_errors=True)
    return final, manifest


def current_snapshot(spec: DatasetSpec, root: Path | None = None) -> Path:
    root = Path(root or snapshot_root(spec))
    pointer = root / "CURRENT"
    if not pointer.exists():
        raise FileNotFoundError(
            f"no online snapshot under {root}: materialize the `online_features` asset "
            "(or run training_pipeline) first"
        )
    return root / pointer.read_text().strip()
