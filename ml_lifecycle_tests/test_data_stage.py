"""Stage 1 through Dagster on a dataset that is not flights: shop orders with JSON, text, no references.

Runs real assets and Great Expectations checks on a DuckDB file in tmp_path.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from ml_lifecycle.spec import TARGET, TIME, DatasetSpec
from ml_lifecycle_tests.conftest import (
    check_evaluations,
    count_rows,
    make_spec,
    materialization_metadata,
    materialize_data_stage,
    materialized_keys,
    table_fingerprint,
    warehouse_connection,
)

START = datetime(2024, 3, 1)
DEVICES = ["ios", "web"]
REVIEWS = ["great fast delivery", "late and cold", "Great food, great price!"]
PRIORITIES = ["low", "normal", "high"]
DATA_ASSETS = {"raw_orders", "cleaned", "features"}


def orders(first_id: int, count: int, shops: list[str] | None = None) -> pl.DataFrame:
    shops = shops or ["north", "south"]
    return pl.DataFrame([
        {
            "order_id": first_id + i,
            "placed_at": START + timedelta(hours=3 * (first_id + i)),
            "shop": shops[i % len(shops)],
            "basket": i % 5 + 1,
            "attrs": json.dumps({"device": DEVICES[i % 2], "cart": {"items": i % 4}}),
            "review": REVIEWS[i % 3],
            "internal_note": f"note {i}",
            "priority": PRIORITIES[i % 3],
        }
        for i in range(count)
    ])


class Orders:
    """The orders dataset in a fresh home: its spec, landing folder and warehouse file."""

    def __init__(self, home: Path, tmp_path: Path) -> None:
        self.spec: DatasetSpec = make_spec(tmp_path / "datasets", {
            "name": "orders",
            "task": "multiclass",
            "source": {"path": "${LANDING}/orders_*.csv"},
            "target": "priority",
            "time_column": "placed_at",
            "id_columns": ["order_id"],
            "categorical_columns": ["shop"],
            "json_columns": ["attrs"],
            "text_columns": [{"name": "review", "buckets": 8}],
            "drop_columns": ["internal_note"],
            "valid_ranges": {"basket": [0, 100]},
            "aggregates": [{"name": "shop_basket", "keys": ["shop"], "value": "basket",
                            "window": "1d", "lag": "1h"}],
            "expectations": {"cleaned": [
                {"type": "expect_column_values_to_be_in_set", "column": "shop",
                 "value_set": ["north", "south", "east"]},
            ]},
        }, name="orders.yaml")
        self.landing = home / "orders" / "landing"
        self.landing.mkdir(parents=True)
        self.database = self.spec.paths().warehouse

    def deliver(self, name: str, frame: pl.DataFrame) -> None:
        frame.write_csv(self.landing / f"orders_{name}.csv")

    def materialize(self) -> dg.ExecuteInProcessResult:
        return materialize_data_stage(self.spec, self.database)

    def fingerprints(self) -> dict[str, tuple[int, int]]:
        with warehouse_connection(self.database) as conn:
            return {t: table_fingerprint(conn, t) for t in ("raw_orders", "cleaned", "features")}


@pytest.fixture
def dataset(home: Path, tmp_path: Path) -> Orders:
    data = Orders(home, tmp_path)
    data.deliver("001", orders(1, 20))
    return data


@pytest.fixture
def built(dataset: Orders) -> Orders:
    """The orders dataset after one successful run of the data stage."""
    result = dataset.materialize()
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return dataset


def test_the_data_stage_builds_every_table_and_passes_its_checks(dataset: Orders) -> None:
    result = dataset.materialize()

    assert result.success
    assert materialized_keys(result) == DATA_ASSETS
    checks = check_evaluations(result)
    assert set(checks) == DATA_ASSETS
    assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}
    with warehouse_connection(dataset.database) as conn:
        assert {t: count_rows(conn, t) for t in DATA_ASSETS} == dict.fromkeys(DATA_ASSETS, 20)
        assert conn.execute(
            "SELECT count(*) FROM raw_orders WHERE __source_file LIKE '%orders_001.csv'"
        ).fetchall() == [(20,)]
    for key in DATA_ASSETS:
        assert materialization_metadata(result, key)["dagster/row_count"] == 20


def test_features_are_model_ready(built: Orders) -> None:
    with warehouse_connection(built.database) as conn:
        types = {name: dtype for name, dtype, *_ in conn.execute("DESCRIBE features").fetchall()}
        cleaned_columns = [row[0] for row in conn.execute("DESCRIBE cleaned").fetchall()]
        first = conn.sql("SELECT * FROM features WHERE order_id = 1").fetchall()
        columns = conn.sql("SELECT * FROM features LIMIT 0").columns
        row = dict(zip(columns, first[0], strict=True))
        token_counts = conn.execute(
            "SELECT order_id, " + " + ".join(f"review__h{b}" for b in range(8))
            + " FROM features ORDER BY order_id").fetchall()

    # JSON leaves became typed columns.
    assert types["attrs__device"] == "ENUM('ios', 'web')"
    assert types["attrs__cart_items"] == "DOUBLE"
    assert (row["attrs__device"], row["attrs__cart_items"]) == ("ios", 0.0)
    assert "attrs" not in types
    # Free text became hashed token counts: every token lands in exactly one bucket.
    assert [c for c in types if c.startswith("review")] == [f"review__h{b}" for b in range(8)]
    words = [len(REVIEWS[i % 3].replace(",", " ").replace("!", " ").split()) for i in range(20)]
    assert [n for _, n in token_counts] == words
    # Categoricals are ENUMs.
    assert types["shop"].startswith("ENUM(")
    assert set(types["shop"][5:-1].replace("'", "").split(", ")) == {"north", "south"}
    # Leaks and raw inputs are gone; the target and time travel under reserved names.
    assert "internal_note" not in types and "internal_note" not in cleaned_columns
    assert "priority" not in types
    assert types[TARGET] == "VARCHAR"
    assert types[TIME] == "TIMESTAMP"
    assert {"shop_basket_mean", "shop_basket_count", "time__hour"} <= set(types)
    assert not [c for c in types if c.startswith("__agg_")]


def test_materializations_carry_catalog_metadata(dataset: Orders) -> None:
    result = dataset.materialize()

    raw = materialization_metadata(result, "raw_orders")
    assert raw["new_files"] == 1
    assert raw["rows_added"] == 20
    raw_columns = {c.name: c.type for c in raw["dagster/column_schema"].columns}
    assert {"order_id", "attrs", "review", "__source_file"} <= set(raw_columns)

    cleaned = materialization_metadata(result, "cleaned")
    assert cleaned["rows_without_time_dropped"] == 0
    lineage = cleaned["dagster/column_lineage"].deps_by_column
    assert [(d.asset_key.to_user_string(), d.column_name) for d in lineage["basket"]] == [
        ("raw_orders", "basket")]
    assert [(d.asset_key.to_user_string(), d.column_name) for d in lineage[TARGET]] == [
        ("raw_orders", "priority")]

    features = materialization_metadata(result, "features")
    schema = {c.name: c.type for c in features["dagster/column_schema"].columns}
    assert schema["shop"] == "ENUM (2 levels)"
    deps = features["dagster/column_lineage"].deps_by_column
    assert [(d.asset_key.to_user_string(), d.column_name) for d in deps["attrs__device"]] == [
        ("cleaned", "attrs")]
    assert features["dagster/table_name"].endswith(".main.features")
    assert features["feature_state_version"] == 1


def test_a_null_id_fails_the_raw_check_and_blocks_downstream(built: Orders) -> None:
    before = built.fingerprints()
    bad = orders(100, 3).with_columns(
        pl.when(pl.col("order_id") == 101).then(None).otherwise(pl.col("order_id"))
        .alias("order_id"))
    built.deliver("002", bad)

    result = built.materialize()

    assert not result.success
    check = check_evaluations(result)["raw_orders"]
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR
    assert "order_id" in check.description
    assert materialized_keys(result) == {"raw_orders"}  # cleaned and features did not run
    after = built.fingerprints()
    assert after["raw_orders"][0] == 23
    assert after["cleaned"] == before["cleaned"]
    assert after["features"] == before["features"]


def test_a_failed_cleaned_expectation_blocks_features(built: Orders) -> None:
    before = built.fingerprints()
    built.deliver("002", orders(100, 4, shops=["atlantis"]))

    result = built.materialize()

    assert not result.success
    checks = check_evaluations(result)
    assert checks["raw_orders"].passed
    assert not checks["cleaned"].passed
    assert checks["cleaned"].severity == dg.AssetCheckSeverity.ERROR
    assert "atlantis" in checks["cleaned"].description
    assert materialized_keys(result) == {"raw_orders", "cleaned"}
    assert built.fingerprints()["features"] == before["features"]


def test_feature_codes_only_grow(built: Orders) -> None:
    with warehouse_connection(built.database) as conn:
        levels_before = conn.execute(
            "SELECT enum_range(any_value(shop)) FROM features").fetchall()[0][0]
        codes_before = dict(conn.execute(
            "SELECT order_id, enum_code(shop) FROM features").fetchall())
    # A new shop that is now the most frequent: a refit from scratch would give it code 0.
    built.deliver("002", orders(100, 30, shops=["east"]))

    result = built.materialize()

    assert result.success
    assert materialization_metadata(result, "features")["feature_state_version"] == 2
    with warehouse_connection(built.database) as conn:
        levels_after = conn.execute(
            "SELECT enum_range(any_value(shop)) FROM features").fetchall()[0][0]
        codes_after = dict(conn.execute(
            "SELECT order_id, enum_code(shop) FROM features").fetchall())
    assert levels_after == [*levels_before, "east"]
    assert {k: codes_after[k] for k in codes_before} == codes_before
    assert {codes_after[k] for k in range(100, 130)} == {len(levels_before)}


def test_a_bad_landing_file_fails_ingestion_naming_it(built: Orders) -> None:
    before = built.fingerprints()
    bad = built.landing / "orders_002.csv"
    bad.write_text("order_id,placed_at,shop\n100,2024-03-20 10:00:00,north\n")

    result = built.materialize()

    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_key == "raw_orders"
    error = failure.step_failure_data.error
    message = error.cause.message if error.cause else error.message
    assert "IngestError" in message
    assert str(bad) in message
    assert "missing column(s)" in message and "'basket'" in message
    assert materialized_keys(result) == set()
    assert built.fingerprints() == before


def test_no_landing_files_fails_naming_the_path(home: Path, tmp_path: Path) -> None:
    data = Orders(home, tmp_path)

    result = data.materialize()

    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_key == "raw_orders"
    assert f"no files match {data.landing}/orders_*.csv" in failure.step_failure_data.error.message
