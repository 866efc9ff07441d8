"""The dataset spec: what parses, and errors that name the file and the key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ml_lifecycle.settings import DEFAULT_SPEC
from ml_lifecycle.spec import SpecError, load_spec, parse_spec

SPEC_PATH = Path("/specs/shop.yaml")


def base(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "shop",
        "task": "regression",
        "source": {"path": "${LANDING}/sales/*.csv"},
        "target": "amount",
        "time_column": "sold_at",
    }
    data.update(extra)
    return data


def spec_error(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(data, SPEC_PATH)
    message = str(caught.value)
    assert str(SPEC_PATH) in message, message
    return message


def test_valid_spec_parses_durations_and_reference_keys() -> None:
    spec = parse_spec(base(
        references=[
            {"name": "stores", "source": {"path": "stores.parquet"}, "keys": ["store_id"]},
            {"name": "weather", "source": {"path": "weather.ndjson"},
             "keys": {"city": "town"}, "time_column": "observed_at", "max_age": "3h"},
        ],
        aggregates=[{"name": "store_amount", "keys": ["store_id"], "value": "amount",
                     "window": "28d", "lag": "90m"}],
        text_columns=["comment"],
    ), SPEC_PATH)

    stores, weather = spec.references
    assert stores.keys == {"store_id": "store_id"}
    assert weather.keys == {"city": "town"}
    assert weather.max_age == timedelta(hours=3)
    assert spec.aggregates[0].window == timedelta(days=28)
    assert spec.aggregates[0].lag == timedelta(minutes=90)
    assert spec.aggregates[0].output_columns() == ["store_amount_mean", "store_amount_count"]
    assert spec.text_columns[0].name == "comment"
    assert spec.raw_asset_names() == ["raw_shop", "raw_stores", "raw_weather"]
    assert spec.split_method == "time"
    assert spec.spec_path == SPEC_PATH.resolve()


def test_paths_resolve_against_the_spec_folder_and_landing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ML_LIFECYCLE_HOME", str(tmp_path / "home"))
    spec = parse_spec(base(), tmp_path / "specs" / "shop.yaml")

    assert spec.resolve_path("${LANDING}/a.csv") == str(tmp_path / "home" / "shop" / "landing" / "a.csv")
    assert spec.resolve_path("local/b.csv") == str(tmp_path / "specs" / "local" / "b.csv")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(SpecError, match="NOT_SET_ANYWHERE"):
        spec.resolve_path("${NOT_SET_ANYWHERE}/c.csv")


def test_unknown_key_is_named_with_its_path() -> None:
    message = spec_error(base(references=[
        {"name": "stores", "source": {"path": "s.csv"}, "keys": ["id"], "colums": ["city"]},
    ]))
    assert "references.0.colums: unknown key" in message


def test_unknown_top_level_key_is_named() -> None:
    assert "targt: unknown key" in spec_error(base(targt="amount"))


def test_missing_required_key_is_named() -> None:
    data = base()
    del data["task"]
    assert "task: required key is missing" in spec_error(data)


def test_target_and_target_expression_are_exclusive() -> None:
    message = spec_error(base(target_expression="amount > 10"))
    assert "exactly one of target or target_expression" in message


def test_bad_duration_names_the_key_and_value() -> None:
    message = spec_error(base(aggregates=[
        {"name": "a", "keys": ["store_id"], "value": "amount", "window": "three hours"},
    ]))
    assert "aggregates.0.window" in message
    assert "'three hours'" in message


def test_expectation_type_must_start_with_expect() -> None:
    message = spec_error(base(expectations={"cleaned": [{"type": "column_exists", "column": "x"}]}))
    assert "expectations.cleaned.0.type" in message
    assert "'column_exists'" in message


def test_expectations_for_an_unknown_table_are_refused() -> None:
    message = spec_error(base(expectations={
        "raw_sales": [{"type": "expect_column_to_exist", "column": "x"}],
    }))
    assert "expectations.raw_sales: unknown table" in message
    assert "raw_shop" in message


def test_the_flights_spec_loads() -> None:
    spec = load_spec(DEFAULT_SPEC)
    assert spec.name == "flights"
    assert spec.task == "binary"
    assert spec.raw_asset_names() == [
        "raw_flights", "raw_weather", "raw_planes", "raw_airports", "raw_airlines"]
    assert spec.references[0].max_age == timedelta(hours=6)
    assert "dep_delay" in spec.drop_columns


def test_load_spec_on_a_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as caught:
        load_spec(missing)
    assert str(missing) in str(caught.value)
    assert "cannot read dataset spec" in str(caught.value)


def test_load_spec_on_invalid_yaml_names_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: shop\ntask: [regression\n")
    with pytest.raises(SpecError) as caught:
        load_spec(broken)
    assert str(broken) in str(caught.value)
    assert "not valid YAML" in str(caught.value)


def test_load_spec_reports_bad_keys_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(
        "name: shop\ntask: regression\ntarget: amount\n"
        "source: {path: sales.csv, fromat: csv}\n"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in str(caught.value)
    assert "source.fromat: unknown key" in str(caught.value)


def test_storage_roots_take_a_path_or_file_url_and_refuse_object_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml_lifecycle.settings import DatasetPaths, StorageURLError

    paths = DatasetPaths(tmp_path / "home" / "flights")
    assert paths.registry == tmp_path / "home" / "flights" / "registry"
    monkeypatch.setenv("ML_LIFECYCLE_REGISTRY_URL", (tmp_path / "shared").as_uri())
    monkeypatch.setenv("ML_LIFECYCLE_INFERENCE_URL", str(tmp_path / "logs"))
    assert paths.registry == tmp_path / "shared" / "flights"
    assert paths.inference == tmp_path / "logs" / "flights"
    monkeypatch.setenv("ML_LIFECYCLE_REGISTRY_URL", "s3://bucket/registry")
    with pytest.raises(StorageURLError, match=r"ML_LIFECYCLE_REGISTRY_URL.*s3"):
        _ = paths.registry
