"""Traffic simulator: replays a time window of held-out rows as prediction requests.

Bounded (record count and seconds) and loopback-only for HTTP. Optionally injects drift
(shifted or scaled numbers, new categories, nulls) into the requests. After each batch it posts
the rows' outcomes to the event feed (history aggregates stay current) and their labels
(performance monitoring), as a real system would once flights have landed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import duckdb
import numpy as np
import polars as pl

from ml_lifecycle.data.sources import list_files, reader_sql
from ml_lifecycle.spec import DatasetSpec

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass
class Drift:
    shift: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    new_category: dict[str, float] = field(default_factory=dict)  # column -> share of rows
    nulls: dict[str, float] = field(default_factory=dict)  # column -> share of rows
    seed: int = 0

    @classmethod
    def parse(cls, items: list[str]) -> Drift:
        """CLI form: shift:<column>=<amount> scale:<column>=<factor> new:<column>=<share>
        nulls:<column>=<share> (e.g. shift:x=500 new:c=0.2), column names from the spec."""
        drift = cls()
        for item in items:
            kind, _, rest = item.partition(":")
            column, _, value = rest.partition("=")
            target = {
                "shift": drift.shift,
                "scale": drift.scale,
                "new": drift.new_category,
                "nulls": drift.nulls,
            }.get(kind)
            if target is None or not column or not value:
                raise ValueError(f"bad drift {item!r}: expected shift|scale|new|nulls:COLUMN=VALUE")
            target[column] = float(value)
        return drift

    def apply(self, frame: pl.DataFrame) -> pl.DataFrame:
        rng = np.random.default_rng(self.seed)
        out = frame
        for column, delta in self.shift.items():
            out = out.with_columns((pl.col(column) + delta).cast(out.schema[column]))
        for column, factor in self.scale.items():
            out = out.with_columns((pl.col(column) * factor).cast(out.schema[column]))
        for column, share in self.new_category.items():
            mask = pl.Series(rng.random(out.height) < share)
            out = out.with_columns(
                pl.when(mask)
                .then(pl.lit(f"NEW_{column.upper()}"))
                .otherwise(pl.col(column))
                .alias(column)
            )
        for column, share in self.nulls.items():
            mask = pl.Series(rng.random(out.height) < share)
            out = out.with_columns(pl.when(mask).then(None).otherwise(pl.col(column)).alias(column))
        return out


class Target(Protocol):
    def score(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]: ...
    def ingest_events(self, records: list[dict[str, Any]]) -> int: ...
    def record_labels(self, labels: list[dict[str, Any]]) -> int: ...


class HttpTarget:
    """The BentoML service over HTTP (loopback only)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        import httpx

        host = urlparse(url).hostname or ""
        if host not in LOOPBACK:
            raise ValueError(f"the simulator only targets loopback addresses, not {host!r}")
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self.rejected = 0

    def score(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        response = self.client.post("/predict_batch", json={"records": records})
        if 400 <= response.status_code < 500:
            self.rejected += len(records)
            return []
        response.raise_for_status()
        return response.json()["predictions"]

    def ingest_events(self, records: list[dict[str, Any]]) -> int:
        response = self.client.post("/events", json={"events": records})
        return response.json().get("added", 0) if response.status_code == 200 else 0

    def record_labels(self, labels: list[dict[str, Any]]) -> int:
        response = self.client.post("/labels", json={"labels": labels})
        return response.json().get("recorded", 0) if response.status_code == 200 else 0


@dataclass
class SimulationReport:
    records: int = 0
    scored: int = 0
    rejected: int = 0
    errors: int = 0
    events: int = 0
    labels: int = 0
    seconds: float = 0.0
    model_versions: dict[str, int] = field(default_factory=dict)


def held_out_rows(
    spec: DatasetSpec, start: datetime, end: datetime, files: list[Path] | None = None
) -> pl.DataFrame:
    """Primary-source rows with time in [start, end), from the landing files, in time order,
    with `__time` and `__target` computed by the spec's own expressions."""
    files = files if files is not None else list_files(spec, spec.source)
    if not files:
        raise FileNotFoundError(f"no landing files for {spec.name}")
    conn = duckdb.connect()
    union = " UNION ALL BY NAME ".join(
        f"SELECT * FROM {reader_sql(spec.source, str(f))}" for f in files
    )
    time_sql = f"CAST(({spec.time_sql}) AS TIMESTAMP)" if spec.has_time else "NULL"
    frame = conn.sql(
        f"SELECT *, {time_sql} AS __time, ({spec.target_sql}) AS __target FROM ({union}) "
        f"WHERE {time_sql} >= ? AND {time_sql} < ? ORDER BY __time",
        params=[start, end],
    ).pl()
    conn.close()
    return frame


def replay(
    target: Target,
    spec: DatasetSpec,
    rows: pl.DataFrame,
    request_fields: list[str],
    rate: float = 0.0,
    batch: int = 200,
    drift: Drift | None = None,
    max_records: int = 1_000_000,
    max_seconds: float = 900.0,
    events: bool = True,
    labels: bool = True,
    progress: bool = True,
) -> SimulationReport:
    """Send `rows` (time-ordered) as requests at `rate` records/s (0 = as fast as possible)."""
    from tqdm import tqdm

    report = SimulationReport()
    rows = rows.head(max_records)
    requests = rows.select([c for c in request_fields if c in rows.columns])
    if drift:
        requests = drift.apply(requests)
    event_columns = [c for c in rows.columns if not c.startswith("__")]
    started = time.monotonic()
    bar = tqdm(total=rows.height, unit="rec", desc=f"replay {spec.name}", disable=not progress)
    for offset in range(0, rows.height, batch):
        if time.monotonic() - started > max_seconds:
            break
        chunk = requests.slice(offset, batch).to_dicts()
        truth = rows.slice(offset, batch)
        if events:
            # Outcomes go to the feed first: the store only uses an event once it is known
            # (known_at <= request time - lag), so early arrival never leaks, and no request of
            # the batch misses an event that was known before it.
            report.events += target.ingest_events(truth.select(event_columns).to_dicts())
        try:
            results = target.score(chunk)
        except Exception:  # counted; the replay goes on
            report.errors += len(chunk)
            results = []
        report.records += len(chunk)
        report.scored += len(results)
        for result in results:
            version = result.get("model_version", "?")
            report.model_versions[version] = report.model_versions.get(version, 0) + 1
        if labels and results:
            report.labels += target.record_labels(
                [
                    {"request_id": r["request_id"], "label": y}
                    for r, y in zip(results, truth["__target"].to_list(), strict=False)
                    if y is not None
                ]
            )
        bar.update(len(chunk))
        if rate > 0:
            ahead = (offset + len(chunk)) / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    bar.close()
    report.rejected = getattr(target, "rejected", 0)
    report.seconds = time.monotonic() - started
    return report
