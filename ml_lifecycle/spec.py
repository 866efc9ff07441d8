"""The dataset spec: one YAML file that describes a dataset to every stage (a public contract).

`load_spec(path)` parses and validates the file; every error names the file and the key.
Checks that need the data (missing columns, bad SQL expressions) live in `data/schema_check.py`.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ml_lifecycle.settings import DatasetPaths, lifecycle_home

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_PREFIX = "__"
# Columns every cleaned/features table carries; user columns may not start with "__".
TIME = "__time"
TARGET = "__target"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


class SpecError(ValueError):
    """A dataset spec is invalid; the message names the file and the key or column."""


def parse_duration(value: Any) -> timedelta:
    """'90s', '15m', '3h', '28d', '1w' (or a number of seconds) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=float(value))
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    raise ValueError(f"expected a duration like '15m', '3h' or '28d', found {value!r}")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def duration_sql(delta: timedelta) -> str:
    """A DuckDB INTERVAL literal for a timedelta (whole seconds)."""
    return f"INTERVAL {int(delta.total_seconds())} SECOND"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _identifier(value: str, what: str) -> str:
    if not IDENTIFIER.match(value):
        raise ValueError(f"{what} must be a SQL identifier (letters, digits, _), found {value!r}")
    if value.startswith(RESERVED_PREFIX):
        raise ValueError(f"{what} may not start with '{RESERVED_PREFIX}' (reserved), found {value!r}")
    return value


Format = Literal["csv", "parquet", "json", "ndjson", "postgres"]
_EXTENSIONS: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".json": "json",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
}


class Source(StrictModel):
    """Where a table comes from: a file or glob (csv, parquet, json, ndjson) or a PostgreSQL table."""

    path: str = Field(description="File, glob, or postgresql:// URL. Relative paths resolve "
                      "against the spec's folder; ${LANDING}, ${ML_LIFECYCLE_HOME} and other "
                      "environment variables are expanded.")
    format: Format | None = None
    table: str | None = Field(None, description="Table (or schema.table) for a postgres source.")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Reader options passed to DuckDB (e.g. nullstr).")

    @model_validator(mode="after")
    def _format_known(self) -> Source:
        fmt = self.resolved_format
        if fmt is None:
            raise ValueError(
                f"cannot tell the format of {self.path!r} from its extension; "
                f"set format to one of csv, parquet, json, ndjson, postgres"
            )
        if fmt == "postgres" and not self.table:
            raise ValueError("a postgres source needs `table`")
        return self

    @property
    def resolved_format(self) -> Format | None:
        if self.format:
            return self.format
        if self.path.startswith(("postgresql://", "postgres://")):
            return "postgres"
        suffix = Path(self.path.replace("*", "x")).suffix.lower()
        return _EXTENSIONS.get(suffix)

    @property
    def is_sql(self) -> bool:
        return self.resolved_format == "postgres"


class Reference(StrictModel):
    """A table joined onto the primary rows by keys; point-in-time when it carries a time."""

    name: str
    source: Source
    keys: dict[str, str] = Field(description="primary column -> reference column")
    time_column: str | None = None
    time_expression: str | None = None
    max_age: Duration | None = Field(
        None, description="With a time: observations older than this are treated as missing.")
    columns: list[str] | None = Field(
        None, description="Reference columns to bring (default: all but keys and time).")
    prefix: str | None = Field(None, description="Prefix for joined columns (default '<name>_').")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _identifier(v, "reference name")

    @field_validator("keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        if isinstance(v, list):
            return {k: k for k in v}
        return v

    @model_validator(mode="after")
    def _one_time(self) -> Reference:
        if self.time_column and self.time_expression:
            raise ValueError("give time_column or time_expression, not both")
        if not self.keys:
            raise ValueError("keys must name at least one column")
        return self

    @property
    def column_prefix(self) -> str:
        return self.prefix if self.prefix is not None else f"{self.name}_"

    @property
    def time_sql(self) -> str | None:
        if self.time_column:
            return f'"{self.time_column}"'
        return self.time_expression


Statistic = Literal["mean", "sum", "count", "min", "max", "std"]


class Aggregate(StrictModel):
    """A point-in-time history feature.

    For a row at time t the statistics cover the values of rows with the same keys that became
    known (`known_at`, default the row's own time) in the window [t - lag - window, t - lag]:
    only what was known `lag` before t, when the prediction is made.
    """

    name: str
    keys: list[str] = Field(min_length=1)
    value: str = Field(description="DuckDB SQL expression over source columns (and __target).")
    window: Duration
    lag: Duration = timedelta(0)
    known_at: str | None = Field(
        None, description="SQL expression: when the value becomes known (default: the row's time).")
    statistics: list[Statistic] = Field(default_factory=lambda: ["mean", "count"], min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _identifier(v, "aggregate name")

    @field_validator("window")
    @classmethod
    def _positive_window(cls, v: timedelta) -> timedelta:
        if v.total_seconds() <= 0:
            raise ValueError("window must be positive")
        return v

    @field_validator("lag")
    @classmethod
    def _non_negative_lag(cls, v: timedelta) -> timedelta:
        if v.total_seconds() < 0:
            raise ValueError("lag may not be negative (that would read the future)")
        return v

    def output_columns(self) -> list[str]:
        return [f"{self.name}_{stat}" for stat in self.statistics]


class TextColumn(StrictModel):
    """A free-text column hashed into `buckets` token-count features."""

    name: str
    buckets: int = Field(16, ge=2, le=4096)


class Split(StrictModel):
    """How stage 2 splits rows: by time (newest = test) when the spec has a time, else random."""

    method: Literal["time", "random"] | None = None
    period: Literal["day", "week", "month"] = "month"
    test: float = Field(0.2, gt=0, description="time: number of periods; random: fraction")
    valid: float = Field(0.1, gt=0, description="time: number of periods; random: fraction")
    seed: int = 42


class Expectation(BaseModel):
    """One Great Expectations expectation: `type` is its snake_case name, other keys its kwargs."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    severity: Literal["error", "warn"] = "error"

    @field_validator("type")
    @classmethod
    def _expect(cls, v: str) -> str:
        if not v.startswith("expect_"):
            raise ValueError(f"expectation type must start with 'expect_', found {v!r}")
        return v

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DriftThresholds(StrictModel):
    """Effect-size thresholds (warn, error) for drift checks."""

    psi: tuple[float, float] = (0.1, 0.25)
    ks: tuple[float, float] = (0.1, 0.2)
    js: tuple[float, float] = (0.1, 0.2)
    drifted_share: tuple[float, float] = (0.2, 0.4)


class Thresholds(StrictModel):
    """Promotion gate (metric floors/ceilings on test data) and drift thresholds."""

    promotion: dict[str, float] = Field(default_factory=dict)
    champion_tolerance: float = Field(0.0, ge=0)
    drift: DriftThresholds = DriftThresholds()


class Monitoring(StrictModel):
    """Stage 4: windows of the inference log, retraining cooldown, alert thresholds."""

    window: Literal["day", "week", "month"] = "day"
    min_rows: int = Field(200, ge=1, description="Windows with fewer logged rows are skipped.")
    cooldown: Duration = Field(
        timedelta(days=7), description="After a promotion, drift does not request another "
        "retrain until this much event time has passed.")
    performance_drop: tuple[float, float] = Field(
        (0.02, 0.05), description="Live primary metric worse than the training test metric by "
        "this much: (warn, error).")
    exclude_features: list[str] = Field(
        default_factory=list, description="Features left out of drift (calendar parts time__* "
        "always are: they move forward by construction).")
    latency_p99_ms: float = 250.0
    error_rate: float = 0.01
    webhook_url: str | None = Field(None, description="Slack-compatible webhook for alerts "
                                    "(${ENV_VAR} expanded).")


class Landing(StrictModel):
    """A script next to the spec that writes the landing files when they are missing."""

    generator: str = Field(description="Python file, relative to the spec's folder.")
    function: str = "generate"


class DatasetSpec(StrictModel):
    name: str
    task: Literal["binary", "multiclass", "regression"]
    description: str = ""
    owners: list[str] = Field(default_factory=list)
    landing: Landing | None = None
    source: Source
    source_name: str | None = Field(None, description="Name of the primary source (default: name).")
    target: str | None = None
    target_expression: str | None = None
    time_column: str | None = None
    time_expression: str | None = None
    id_columns: list[str] = Field(default_factory=list)
    drop_columns: list[str] = Field(default_factory=list)
    categorical_columns: list[str] = Field(default_factory=list)
    text_columns: list[TextColumn] = Field(default_factory=list)
    json_columns: list[str] = Field(default_factory=list)
    valid_ranges: dict[str, tuple[float | None, float | None]] = Field(default_factory=dict)
    max_categories: int = Field(1000, ge=2)
    unknown_categories: Literal["reject", "score"] = Field(
        "reject", description="Serving: answer 400 to a category the model never saw (for "
        "vocabularies below max_categories), or score it as missing.")
    references: list[Reference] = Field(default_factory=list)
    aggregates: list[Aggregate] = Field(default_factory=list)
    split: Split = Split()
    params: str | None = Field(
        None, description="Training params file (default: <spec name>.params.yaml beside the spec "
        "if present, else built-in defaults).")
    slice_columns: list[str] = Field(
        default_factory=list, description="Categorical columns the evaluation reports per slice.")
    expectations: dict[str, list[Expectation]] = Field(default_factory=dict)
    thresholds: Thresholds = Thresholds()
    monitoring: Monitoring = Monitoring()

    _spec_path: Path | None = PrivateAttr(default=None)

    @field_validator("name", "source_name")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return None if v is None else _identifier(v, "name")

    @field_validator("text_columns", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": item} if isinstance(item, str) else item for item in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if bool(self.target) == bool(self.target_expression):
            raise ValueError("give exactly one of target or target_expression")
        if self.time_column and self.time_expression:
            raise ValueError("give time_column or time_expression, not both")
        if self.split.method == "time" and not self.has_time:
            raise ValueError("split.method is 'time' but the spec has no time_column/time_expression")
        names = [self.primary_name] + [r.name for r in self.references]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"source/reference names must be unique, repeated: {sorted(dupes)}")
        agg_names = [a.name for a in self.aggregates]
        if len(set(agg_names)) != len(agg_names):
            raise ValueError(f"aggregate names must be unique: {agg_names}")
        tables = set(self.raw_asset_names()) | {"cleaned", "features"}
        for key in self.expectations:
            if key not in tables:
                raise ValueError(
                    f"expectations.{key}: unknown table; expected one of {sorted(tables)}")
        for column in self.drop_columns:
            if column in self.id_columns:
                raise ValueError(f"drop_columns: {column!r} is also an id column")
        for agg in self.aggregates:
            for key in agg.keys:
                if key in self.drop_columns:
                    raise ValueError(
                        f"aggregates.{agg.name}.keys: {key!r} is in drop_columns; "
                        "an aggregate key must stay in the cleaned table")
        return self

    # -- derived facts -------------------------------------------------------------------
    @property
    def primary_name(self) -> str:
        return self.source_name or self.name

    @property
    def has_time(self) -> bool:
        return bool(self.time_column or self.time_expression)

    @property
    def time_sql(self) -> str | None:
        if self.time_column:
            return f'"{self.time_column}"'
        return self.time_expression

    @property
    def target_sql(self) -> str:
        return f'"{self.target}"' if self.target else str(self.target_expression)

    @property
    def split_method(self) -> str:
        return self.split.method or ("time" if self.has_time else "random")

    def params_path(self) -> Path | None:
        """The training params file in use, or None for the built-in defaults."""
        if self.params:
            return Path(self.resolve_path(self.params))
        if self._spec_path:
            candidate = self._spec_path.with_name(f"{self._spec_path.stem}.params.yaml")
            if candidate.exists():
                return candidate
        return None

    def raw_asset_names(self) -> list[str]:
        return [f"raw_{self.primary_name}"] + [f"raw_{r.name}" for r in self.references]

    @property
    def spec_path(self) -> Path | None:
        return self._spec_path

    @property
    def base_dir(self) -> Path:
        return self._spec_path.parent if self._spec_path else Path.cwd()

    def paths(self, home: Path | None = None) -> DatasetPaths:
        return DatasetPaths.for_dataset(self.name, home)

    def resolve_path(self, raw: str, home: Path | None = None) -> str:
        """Expand ${LANDING}, ${ML_LIFECYCLE_HOME}, env vars; resolve relative to the spec folder."""
        if raw.startswith(("postgresql://", "postgres://")):
            return os.path.expandvars(raw)
        paths = self.paths(home)
        expanded = (
            raw.replace("${LANDING}", str(paths.landing))
            .replace("${ML_LIFECYCLE_HOME}", str(home or lifecycle_home()))
        )
        expanded = os.path.expanduser(os.path.expandvars(expanded))
        if "$" in expanded:
            raise SpecError(f"{self._where()}: path {raw!r} names an unset environment variable")
        path = Path(expanded)
        if not path.is_absolute():
            path = self.base_dir / path
        return str(path)

    def _where(self) -> str:
        return str(self._spec_path) if self._spec_path else f"dataset {self.name!r}"


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {key}: {message}")
    return f"invalid dataset spec {path}:\n" + "\n".join(lines)


def parse_spec(data: dict[str, Any], path: Path) -> DatasetSpec:
    try:
        spec = DatasetSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_format_validation_error(path, error)) from None
    spec._spec_path = path.resolve()
    return spec


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and validate a dataset spec YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"cannot read dataset spec {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"dataset spec {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SpecError(f"dataset spec {path} must be a mapping of keys, found {type(data).__name__}")
    return parse_spec(data, path)
