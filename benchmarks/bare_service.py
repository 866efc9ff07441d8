"""A bare BentoML service for the serving benchmark: the same LightGBM model, no feature logic.

What a user would write: the model saved in BentoML's model store (`bentoml.lightgbm`), a
pydantic record of the model's input columns, `booster.predict` on a numpy matrix. The client
must send the already-computed feature vector (category codes, weather, history aggregates...);
nothing is looked up, validated against a vocabulary or logged.

    BENTOML_HOME=... BARE_MODEL_TAG=bench_lightgbm:latest \
        bentoml serve benchmarks.bare_service:BareLightGBM --host 127.0.0.1 --port 3001

POST /predict with {"<feature>": number|null, ...}; POST /predict_batch with {"rows": [...]};
POST /predict_matrix with {"rows": [[number|null, ...], ...]} (positional, model order).
POST /noop and /noop_sync with {"x": number}: no model at all, the floor of a BentoML endpoint
(async: handled on the event loop; sync: handed to BentoML's thread pool, as /predict is).
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

MODEL_TAG = os.environ.get("BARE_MODEL_TAG", "bench_lightgbm:latest")
FEATURES: list[str] = bentoml.lightgbm.load_model(MODEL_TAG).feature_name()

# Feature names are used as JSON keys (aliases): some may not be valid Python identifiers.
Row = create_model(
    "Row",
    __config__=ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=False),
    **{f"f{i}": (float | None, Field(None, alias=name)) for i, name in enumerate(FEATURES)},
)
_ATTRS = [f"f{i}" for i in range(len(FEATURES))]


class Batch(BaseModel):
    rows: list[Row] = Field(min_length=1, max_length=10_000)  # type: ignore[valid-type]


class Matrix(BaseModel):
    """Rows as positional lists in the model's feature order (no names)."""

    rows: list[list[float | None]] = Field(min_length=1, max_length=10_000)


@bentoml.service(name="bare_lightgbm", traffic={"timeout": 60})
class BareLightGBM:
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.booster = bentoml.lightgbm.load_model(self.model)

    def _matrix(self, rows: list[Any]) -> np.ndarray:
        return np.array([[getattr(row, a) for a in _ATTRS] for row in rows], dtype=np.float64)

    @bentoml.api(route="/predict")
    def predict(self, row: Row, /) -> dict[str, float]:  # type: ignore[valid-type]
        return {"prediction": float(self.booster.predict(self._matrix([row]))[0])}

    @bentoml.api(route="/predict_batch")
    def predict_batch(self, batch: Batch, /) -> dict[str, list[float]]:
        return {"predictions": self.booster.predict(self._matrix(batch.rows)).tolist()}

    @bentoml.api(route="/noop")
    async def noop(self, x: float = 0.0) -> dict[str, float]:
        return {"x": x}

    @bentoml.api(route="/noop_sync")
    def noop_sync(self, x: float = 0.0) -> dict[str, float]:
        return {"x": x}

    @bentoml.api(route="/predict_matrix")
    def predict_matrix(self, matrix: Matrix, /) -> dict[str, list[float]]:
        rows = np.array(matrix.rows, dtype=np.float64)
        return {"predictions": self.booster.predict(rows).tolist()}
