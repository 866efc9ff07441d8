"""The landing sensor: new or changed landing files request a run for their raw table only."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from ml_lifecycle.definitions import build_definitions
from ml_lifecycle_tests.conftest import make_spec, write


class Shop:
    def __init__(self, home: Path, tmp_path: Path) -> None:
        self.landing = home / "shop" / "landing"
        write(self.landing / "sales" / "day1.csv", "sale_id,store_id,amount\n1,1,2.0\n")
        write(self.landing / "stores" / "stores.csv", "store_id,city\n1,Oslo\n")
        spec = make_spec(tmp_path, {
            "name": "shop",
            "task": "regression",
            "source": {"path": "${LANDING}/sales/*.csv"},
            "target": "amount",
            "references": [{"name": "stores", "source": {"path": "${LANDING}/stores/*.csv"},
                            "keys": ["store_id"]}],
        })
        self.defs = build_definitions(spec)
        self.sensor = self.defs.get_sensor_def("landing_sensor")
        self.instance = dg.DagsterInstance.ephemeral()

    def tick(self, cursor: str | None):
        return self.sensor.evaluate_tick(
            dg.build_sensor_context(instance=self.instance, definitions=self.defs, cursor=cursor))


@pytest.fixture
def shop(home: Path, tmp_path: Path) -> Shop:
    return Shop(home, tmp_path)


def selection(tick) -> list[str]:
    (request,) = tick.run_requests
    return sorted(key.to_user_string() for key in request.asset_selection)


def test_first_tick_requests_every_raw_table(shop: Shop) -> None:
    tick = shop.tick(None)

    assert selection(tick) == ["cleaned", "features", "raw_shop", "raw_stores"]
    assert tick.run_requests[0].tags["ml_lifecycle/new_files"] == "2"
    assert tick.cursor


def test_no_change_skips(shop: Shop) -> None:
    first = shop.tick(None)

    second = shop.tick(first.cursor)

    assert second.run_requests == []
    assert "no new or changed landing files" in (second.skip_message or "")


def test_a_new_file_requests_its_source_only(shop: Shop) -> None:
    first = shop.tick(None)
    write(shop.landing / "sales" / "day2.csv", "sale_id,store_id,amount\n2,1,3.0\n")

    second = shop.tick(first.cursor)

    assert selection(second) == ["cleaned", "features", "raw_shop"]
    assert second.run_requests[0].tags["ml_lifecycle/new_files"] == "1"
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert shop.tick(second.cursor).run_requests == []


def test_a_changed_reference_file_requests_that_reference(shop: Shop) -> None:
    first = shop.tick(None)
    write(shop.landing / "stores" / "stores.csv", "store_id,city\n1,Oslo\n2,Bergen\n")

    second = shop.tick(first.cursor)

    assert selection(second) == ["cleaned", "features", "raw_stores"]


def test_the_sensor_targets_the_data_pipeline_job(shop: Shop) -> None:
    assert shop.sensor.job_name == "data_pipeline"
    assert shop.sensor.default_status == dg.DefaultSensorStatus.RUNNING
