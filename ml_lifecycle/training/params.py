"""Training hyper-parameters: a versioned YAML file per dataset, validated, hashed.

The file's hash (with the trainer's own version) is the `model` asset's code version, so editing
it marks the model stale. Errors name the file and the key.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ml_lifecycle.spec import SpecError

# Bump when the training code changes in a way that changes models.
TRAINER_VERSION = "1"


class ParamsError(SpecError):
    """A params file or override is invalid; the message names the key."""


class LightGBMParams(BaseModel):
    """The LightGBM parameters we expose (names as in LightGBM's docs)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(0.05, gt=0, le=1)
    num_leaves: int = Field(63, ge=2, le=131072)
    max_depth: int = Field(-1, ge=-1)
    min_data_in_leaf: int = Field(50, ge=1)
    min_sum_hessian_in_leaf: float = Field(1e-3, ge=0)
    feature_fraction: float = Field(0.8, gt=0, le=1)
    bagging_fraction: float = Field(0.8, gt=0, le=1)
    bagging_freq: int = Field(1, ge=0)
    lambda_l1: float = Field(0.0, ge=0)
    lambda_l2: float = Field(1.0, ge=0)
    min_gain_to_split: float = Field(0.0, ge=0)
    cat_smooth: float = Field(10.0, ge=0)
    cat_l2: float = Field(10.0, ge=0)
    max_cat_to_onehot: int = Field(4, ge=1)
    max_bin: int = Field(255, ge=2)
    num_threads: int = Field(0, ge=0)


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["random", "grid"] = "random"
    trials: int = Field(0, ge=0, description="0 = no search")
    space: dict[str, list[Any]] = Field(default_factory=dict)


class TrainingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lightgbm: LightGBMParams = LightGBMParams()
    num_boost_round: int = Field(1000, ge=1)
    early_stopping_rounds: int = Field(50, ge=1)
    seed: int = 42
    search: SearchSpace = SearchSpace()

    def with_lightgbm(self, **overrides: Any) -> TrainingParams:
        merged = {**self.lightgbm.model_dump(), **overrides}
        return self.model_copy(update={"lightgbm": _validate_lightgbm(merged, "override")})


def _validate_lightgbm(values: dict[str, Any], where: str) -> LightGBMParams:
    try:
        return LightGBMParams.model_validate(values)
    except ValidationError as error:
        raise ParamsError(_format(where, error, prefix="lightgbm")) from None


def _format(where: str, error: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in error.errors():
        key = ".".join([prefix, *[str(p) for p in item["loc"]]] if prefix else
                       [str(p) for p in item["loc"]])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {message}")
    return f"invalid training params ({where}):\n" + "\n".join(lines)


def parse_params(data: dict[str, Any] | None, where: str) -> TrainingParams:
    try:
        params = TrainingParams.model_validate(data or {})
    except ValidationError as error:
        raise ParamsError(_format(where, error)) from None
    for key in params.search.space:
        if key not in LightGBMParams.model_fields:
            raise ParamsError(f"invalid training params ({where}):\n  search.space.{key}: "
                              f"not a LightGBM parameter we expose "
                              f"({', '.join(LightGBMParams.model_fields)})")
        if not params.search.space[key]:
            raise ParamsError(f"invalid training params ({where}):\n  search.space.{key}: "
                              "needs at least one value")
    return params


def load_params(path: Path | None) -> TrainingParams:
    """Read a params file; None gives the built-in defaults."""
    if path is None:
        return TrainingParams()
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ParamsError(f"cannot read training params {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"training params {path} is not valid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"training params {path} must be a mapping of keys")
    return parse_params(data, str(path))


def parse_overrides(text: str) -> dict[str, Any]:
    """YAML/JSON overrides from run config, e.g. `{num_leaves: 31, learning_rate: 0.1}`."""
    if not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(f"params overrides are not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ParamsError("params overrides must be a mapping of LightGBM parameter -> value")
    return data


def params_code_version(path: Path | None) -> str:
    """Hash of the params file content (or 'defaults') and the trainer version."""
    content = Path(path).read_bytes() if path and Path(path).exists() else b"defaults"
    return hashlib.sha256(content + TRAINER_VERSION.encode()).hexdigest()[:12]


def search_candidates(params: TrainingParams) -> list[dict[str, Any]]:
    """The parameter sets a search evaluates (seeded; grid = all combinations, capped)."""
    search = params.search
    if search.trials <= 0 or not search.space:
        return []
    keys = sorted(search.space)
    grid = [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(search.space[k] for k in keys))]
    if search.method == "grid":
        return grid[: search.trials] if search.trials < len(grid) else grid
    rng = random.Random(params.seed)
    if search.trials >= len(grid):
        rng.shuffle(grid)
        return grid
    return rng.sample(grid, search.trials)
