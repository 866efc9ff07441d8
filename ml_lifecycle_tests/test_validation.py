"""Great Expectations validation: generated expectations, spec expectations, outcomes."""

from __future__ import annotations

import gc
import json
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ml_lifecycle.data import validation
from ml_lifecycle.data.validation import (
    ValidationOutcome,
    expectations_for,
    generated_expectations,
    validate_frame,
)
from ml_lifecycle.spec import DatasetSpec, Expectation, SpecError, parse_spec


def make_spec(**extra: Any) -> DatasetSpec:
    data: dict[str, Any] = {
        "name": "orders",
        "task": "binary",
        "source": {"path": "x.csv"},
        "target": "churned",
        "id_columns": ["order_id"],
    }
    data.update(extra)
    return parse_spec(data, Path("/tmp/x.yaml"))


@pytest.fixture(scope="session")
def gx_ready() -> None:
    """Build the process-wide GX context once for the whole session (the import is slow)."""
    validation._gx_state()


def raw_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "order_id": [1, 2, 3, 4],
        "ts": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]),
        "amount": [10.0, 20.5, 30.0, 5.0],
        "country": ["DE", "FR", "DE", "US"],
        "churned": [0, 1, 0, 1],
    })


RAW_TYPES = {"order_id": "BIGINT", "ts": "TIMESTAMP", "amount": "DOUBLE", "country": "VARCHAR",
             "churned": "BIGINT"}


def cleaned_frame() -> pd.DataFrame:
    frame = raw_frame().rename(columns={"ts": "__time", "churned": "__target"})
    frame["__target"] = frame["__target"].astype(bool)
    return frame


CLEANED_TYPES = {"order_id": "BIGINT", "__time": "TIMESTAMP", "amount": "DOUBLE",
                 "country": "VARCHAR", "__target": "BOOLEAN"}


def only(outcome: ValidationOutcome, type_: str, column: str | None = None):
    found = [r for r in outcome.results
             if r.type == type_ and (column is None or r.column == column)]
    assert len(found) == 1, found
    return found[0]


def types_of(expectations: list[Expectation]) -> list[tuple[str, Any]]:
    return [(e.type, e.kwargs.get("column", e.kwargs.get("column_list"))) for e in expectations]


# -- generated expectations ----------------------------------------------------------------


def test_generated_raw_primary_checks_spec_columns_exist() -> None:
    spec = make_spec(
        id_columns=["order_id", "line"],
        time_column="ts",
        categorical_columns=["country", "cust_segment"],
        drop_columns=["internal_note"],
        valid_ranges={"amount": [0, 1000], "note_len": [0, 10]},
        references=[{"name": "cust", "source": {"path": "c.csv"}, "keys": {"cust_id": "id"}}],
        aggregates=[{"name": "spend", "keys": ["cust_id"], "value": "amount", "window": "7d"}],
    )
    columns = {**RAW_TYPES, "line": "BIGINT", "note_len": "VARCHAR"}
    got = types_of(generated_expectations(spec, "raw_orders", columns))
    exists = {col for t, col in got if t == "expect_column_to_exist"}
    assert {"order_id", "line", "ts", "country", "internal_note", "churned", "cust_id"} <= exists
    # a joined reference column (prefix "cust_") is not expected in the raw primary table
    assert "cust_segment" not in exists
    assert ("expect_table_row_count_to_be_between", None) in got
    assert ("expect_column_values_to_not_be_null", "order_id") in got
    ranges = [e for e in generated_expectations(spec, "raw_orders", columns)
              if e.type == "expect_column_values_to_be_between"]
    # only numeric columns get a range check (note_len is VARCHAR); severity warn
    assert [(e.kwargs["column"], e.kwargs["min_value"], e.kwargs["max_value"], e.severity)
            for e in ranges] == [("amount", 0, 1000, "warn")]


def test_generated_target_expression_is_not_a_column() -> None:
    spec = make_spec(target=None, target_expression="amount > 10")
    got = types_of(generated_expectations(spec, "raw_orders", RAW_TYPES))
    assert ("expect_column_to_exist", "churned") not in got


def test_generated_reference_and_cleaned_and_features() -> None:
    spec = make_spec(
        id_columns=["order_id", "line"],
        time_column="ts",
        categorical_columns=["country", "absent"],
        references=[
            {"name": "cust", "source": {"path": "c.csv"}, "keys": {"cust_id": "id"}},
            {"name": "fx", "source": {"path": "f.csv"}, "keys": ["currency"],
             "time_column": "valid_from"},
        ],
    )
    cust = types_of(generated_expectations(spec, "raw_cust", {"id": "BIGINT"}))
    assert ("expect_column_to_exist", "id") in cust
    assert ("expect_column_values_to_not_be_null", "id") in cust
    assert ("expect_column_values_to_be_unique", "id") in cust
    fx = types_of(generated_expectations(spec, "raw_fx", {"currency": "VARCHAR"}))
    assert ("expect_column_to_exist", "valid_from") in fx
    assert not any(t.endswith("_to_be_unique") for t, _ in fx)

    cleaned = types_of(generated_expectations(spec, "cleaned", CLEANED_TYPES))
    assert ("expect_column_values_to_not_be_null", "__time") in cleaned
    assert ("expect_column_values_to_be_in_set", "__target") in cleaned
    assert ("expect_compound_columns_to_be_unique", ["order_id", "line"]) in cleaned
    assert ("expect_column_values_to_not_be_null", "country") in cleaned
    assert ("expect_column_values_to_not_be_null", "absent") not in cleaned

    features = types_of(generated_expectations(spec, "features", CLEANED_TYPES))
    assert features == [("expect_table_row_count_to_be_between", None),
                        ("expect_column_values_to_not_be_null", "__time")]

    regression = make_spec(task="regression")
    assert not any(c == "__target" for _, c in
                   types_of(generated_expectations(regression, "cleaned", CLEANED_TYPES)))


def test_expectations_for_tags_origin_and_unknown_table() -> None:
    spec = make_spec(expectations={"cleaned": [
        {"type": "expect_column_values_to_be_between", "column": "amount", "min_value": 0}]})
    pairs = expectations_for(spec, "cleaned", CLEANED_TYPES)
    assert pairs[-1][1] == "spec" and pairs[-1][0].kwargs["column"] == "amount"
    assert {origin for _, origin in pairs[:-1]} == {"generated"}
    with pytest.raises(SpecError, match="nope"):
        expectations_for(spec, "nope", {})


# -- validation ----------------------------------------------------------------------------


def test_clean_frames_pass(gx_ready: None) -> None:
    spec = make_spec(time_column="ts", categorical_columns=["country"],
                     valid_ranges={"amount": [0, 100]})
    raw = validate_frame(raw_frame(), "raw_orders", expectations_for(spec, "raw_orders", RAW_TYPES))
    assert raw.passed, raw.describe_failures()
    assert raw.row_count == 4 and raw.describe_failures() == ""
    assert all(r.success and r.exception is None for r in raw.results)
    rows = only(raw, "expect_table_row_count_to_be_between")
    assert rows.observed_value == 4 and rows.origin == "generated"
    cleaned = validate_frame(cleaned_frame(), "cleaned",
                             expectations_for(spec, "cleaned", CLEANED_TYPES))
    assert cleaned.passed, cleaned.describe_failures()


def test_null_and_duplicate_ids_fail(gx_ready: None) -> None:
    spec = make_spec(time_column="ts")
    raw = raw_frame()
    raw["order_id"] = [1.0, None, 3.0, 4.0]
    outcome = validate_frame(raw, "raw_orders", expectations_for(spec, "raw_orders", RAW_TYPES))
    assert not outcome.passed
    failed = only(outcome, "expect_column_values_to_not_be_null", "order_id")
    assert (failed.success, failed.unexpected_count, failed.unexpected_percent) == (False, 1, 25.0)
    assert failed.partial_unexpected == [None]  # NaN made JSON-safe
    assert "order_id" in outcome.describe_failures()

    cleaned = cleaned_frame()
    cleaned["order_id"] = [1, 2, 2, 4]
    outcome = validate_frame(cleaned, "cleaned", expectations_for(spec, "cleaned", CLEANED_TYPES))
    assert not outcome.passed
    dup = only(outcome, "expect_column_values_to_be_unique", "order_id")
    assert dup.unexpected_count == 2 and dup.partial_unexpected == [2, 2]
    assert outcome.failed_errors == [dup]
    line = outcome.describe_failures()
    assert "cleaned" in line and "order_id" in line and "2 unexpected" in line and "[error]" in line


def test_spec_range_and_set_expectations(gx_ready: None) -> None:
    spec = make_spec(expectations={"raw_orders": [
        {"type": "expect_column_values_to_be_between", "column": "amount",
         "min_value": 0, "max_value": 25},
        {"type": "expect_column_values_to_be_in_set", "column": "country",
         "value_set": ["DE", "FR"]},
    ]})
    outcome = validate_frame(raw_frame(), "raw_orders",
                             expectations_for(spec, "raw_orders", RAW_TYPES))
    between = only(outcome, "expect_column_values_to_be_between", "amount")
    assert (between.success, between.unexpected_count, between.origin) == (False, 1, "spec")
    assert between.partial_unexpected == [30.0]
    in_set = only(outcome, "expect_column_values_to_be_in_set", "country")
    assert (in_set.unexpected_count, in_set.partial_unexpected) == (1, ["US"])
    assert not outcome.passed and len(outcome.failed_errors) == 2
    text = outcome.describe_failures()
    assert len(text.splitlines()) == 2 and "amount" in text and "country" in text

    # a wrong target value in the cleaned table (binary task)
    cleaned = cleaned_frame()
    cleaned["__target"] = [0, 1, 2, None]
    target = validate_frame(cleaned, "cleaned",
                            expectations_for(spec, "cleaned", CLEANED_TYPES))
    result = only(target, "expect_column_values_to_be_in_set", "__target")
    assert (result.success, result.unexpected_count, result.partial_unexpected) == (False, 1, [2])


def test_warnings_do_not_fail(gx_ready: None) -> None:
    spec = make_spec(valid_ranges={"amount": [0, 25]}, expectations={"raw_orders": [
        {"type": "expect_column_values_to_match_regex", "column": "country",
         "regex": "^[A-Z]{2}$", "severity": "warn"},
        {"type": "expect_column_mean_to_be_between", "column": "amount", "max_value": 1,
         "severity": "warn"},
    ]})
    outcome = validate_frame(raw_frame(), "raw_orders",
                             expectations_for(spec, "raw_orders", RAW_TYPES))
    assert outcome.passed
    assert {(r.type, r.severity) for r in outcome.failed_warnings} == {
        ("expect_column_values_to_be_between", "warn"),
        ("expect_column_mean_to_be_between", "warn"),
    }
    mean = only(outcome, "expect_column_mean_to_be_between")
    assert mean.observed_value == pytest.approx(16.375)
    assert "observed 16.375" in outcome.describe_failures()
    assert "[warn]" in outcome.describe_failures()


def test_unknown_type_and_bad_kwargs_raise_spec_error(gx_ready: None) -> None:
    unknown = [(Expectation(type="expect_foo", column="amount"), "spec")]
    with pytest.raises(SpecError, match=r"expectations\.cleaned: unknown expectation type "
                       r"'expect_foo' \(no great_expectations\.expectations\.ExpectFoo\)"):
        validate_frame(cleaned_frame(), "cleaned", unknown)
    typo = [(Expectation(type="expect_column_values_to_be_between", column="amount",
                         min_valu=1), "spec")]
    with pytest.raises(SpecError, match=r"raw_orders.*expect_column_values_to_be_between.*min_valu"):
        validate_frame(raw_frame(), "raw_orders", typo)
    spec = make_spec(expectations={"features": [{"type": "expect_colum_to_exist", "column": "x"}]})
    with pytest.raises(SpecError, match="did you mean 'expect_column_to_exist'"):
        validation.check_spec_expectations(spec)


def test_missing_column_is_a_failed_result(gx_ready: None) -> None:
    spec = make_spec(id_columns=["order_id", "line"], categorical_columns=["country"],
                     expectations={"raw_orders": [
                         {"type": "expect_column_values_to_not_be_null", "column": "nowhere"}]})
    outcome = validate_frame(raw_frame(), "raw_orders",
                             expectations_for(spec, "raw_orders", RAW_TYPES))
    exists = only(outcome, "expect_column_to_exist", "line")
    assert not exists.success and exists.exception is None
    broken = only(outcome, "expect_column_values_to_not_be_null", "nowhere")
    assert not broken.success and "nowhere" in broken.exception
    assert not outcome.passed
    text = outcome.describe_failures()
    assert "line" in text and "nowhere" in text and "column missing" in text
    # the cleaned table's compound id check on a missing id column fails too, without a crash
    cleaned = validate_frame(cleaned_frame(), "cleaned",
                             expectations_for(spec, "cleaned", CLEANED_TYPES))
    compound = only(cleaned, "expect_compound_columns_to_be_unique")
    assert not compound.success and compound.exception


def test_results_keep_order_duplicates_and_are_json_safe(gx_ready: None) -> None:
    frame = raw_frame()
    frame["when"] = pd.to_datetime(["2024-01-01", None, "2024-01-03", None])
    frame["blob"] = [{"a": 1}, {"a": 2}, None, {"a": np.int64(3)}]
    same = Expectation(type="expect_column_values_to_not_be_null", column="when")
    pairs = [
        (Expectation(type="expect_column_values_to_not_be_null", column="blob"), "spec"),
        (same, "generated"),
        (Expectation(type="expect_column_values_to_not_be_null", column="when",
                     severity="warn"), "spec"),
        (Expectation(type="expect_column_max_to_be_between", column="order_id",
                     min_value=0), "spec"),
        (Expectation(type="expect_column_values_to_be_in_set", column="when",
                     value_set=["2024-01-01"]), "spec"),
    ]
    outcome = validate_frame(frame, "raw_orders", pairs)
    assert [(r.type, r.severity, r.origin) for r in outcome.results] == [
        (e.type, e.severity, o) for e, o in pairs]
    blob, when_error, when_warn, max_id, _ = outcome.results
    assert blob.unexpected_count == 1
    # the suite would silently drop the duplicate; both get the same result
    assert when_error.unexpected_count == when_warn.unexpected_count == 2
    assert max_id.observed_value == 4 and isinstance(max_id.observed_value, int)
    json.dumps([asdict(r) for r in outcome.results], allow_nan=False)
    json.dumps(outcome.to_dict(), allow_nan=False)
    table = outcome.to_markdown()
    assert table.count("\n") == len(pairs) + 1
    assert "| FAIL | error | expect_column_values_to_not_be_null | when |" in table
    assert "| WARN | warn |" in table


def test_empty_frame_fails_row_count(gx_ready: None) -> None:
    spec = make_spec()
    frame = raw_frame().iloc[0:0]
    outcome = validate_frame(frame, "raw_orders", expectations_for(spec, "raw_orders", RAW_TYPES))
    assert not outcome.passed and outcome.row_count == 0
    rows = only(outcome, "expect_table_row_count_to_be_between")
    assert not rows.success and rows.observed_value == 0
    assert validate_frame(frame, "raw_orders", []).results == []


def test_cached_context_does_not_keep_the_frame(gx_ready: None) -> None:
    frame = raw_frame()
    ref = weakref.ref(frame)
    validate_frame(frame, "raw_orders", expectations_for(make_spec(), "raw_orders", RAW_TYPES))
    del frame
    gc.collect()
    assert ref() is None


def test_json_safe_values() -> None:
    safe = validation._json_safe
    assert safe(np.float64("nan")) is None
    assert safe(float("inf")) == "inf"
    assert safe(pd.NaT) is None and safe(pd.NA) is None
    assert safe(pd.Timestamp("2024-01-02 03:04:05")) == "2024-01-02T03:04:05"
    assert safe(np.datetime64("2024-01-02")) == "2024-01-02T00:00:00"
    assert safe({"a": np.int32(3), "b": (np.bool_(True),)}) == {"a": 3, "b": [True]}
    assert safe(np.array([1.5, np.nan])) == [1.5, None]


def test_the_check_loads_only_the_columns_its_suite_reads() -> None:
    from ml_lifecycle.data.validation import columns_needed
    from ml_lifecycle.spec import Expectation

    columns = {"id": "BIGINT", "a": "DOUBLE", "b": "VARCHAR", "c": "DOUBLE"}

    def suite(*expectations: dict) -> list:
        return [(Expectation(**e), "spec") for e in expectations]

    row_count = {"type": "expect_table_row_count_to_be_between", "min_value": 1}
    assert columns_needed(suite(row_count, {"type": "expect_column_values_to_not_be_null",
                                            "column": "b"},
                                {"type": "expect_compound_columns_to_be_unique",
                                 "column_list": ["id", "c"]}), columns) == ["id", "b", "c"]
    # A row count alone still needs one column to count rows; a column that is missing from
    # the table is not loaded (its expect_column_to_exist fails on the frame, as it should).
    assert columns_needed(suite(row_count), columns) == ["id"]
    assert columns_needed(suite({"type": "expect_column_to_exist", "column": "zz"}),
                          columns) == ["id"]
    # A table-level expectation about the columns themselves needs all of them.
    assert columns_needed(suite({"type": "expect_table_columns_to_match_set",
                                 "column_set": ["id"]}), columns) == list(columns)


def test_a_table_is_validated_with_column_checks_on_its_schema_and_values_on_its_rows() -> None:
    import duckdb

    from ml_lifecycle.data.validation import validate_table
    from ml_lifecycle.spec import Expectation

    conn = duckdb.connect()
    conn.execute("CREATE TABLE t AS SELECT range AS id, range % 3 AS a, 'x' AS b FROM range(10)")
    columns = {"id": "BIGINT", "a": "BIGINT", "b": "VARCHAR"}
    suite = [(Expectation(**e), "spec") for e in (
        {"type": "expect_column_to_exist", "column": "b"},
        {"type": "expect_column_values_to_be_between", "column": "a", "min_value": 0,
         "max_value": 1},
        {"type": "expect_column_to_exist", "column": "missing"},
        {"type": "expect_table_row_count_to_be_between", "min_value": 10, "max_value": 10},
        {"type": "expect_table_columns_to_match_set", "column_set": ["id", "a", "b"]},
    )]

    outcome = validate_table(conn, "t", suite, columns)

    assert outcome.row_count == 10
    assert [r.type for r in outcome.results] == [e.type for e, _ in suite]
    assert [r.success for r in outcome.results] == [True, False, False, True, True]
    assert outcome.results[1].unexpected_count == 3  # a = 2 on rows 2, 5, 8
