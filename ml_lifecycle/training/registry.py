"""The model registry: one folder per version, aliases written atomically, an audit log.

Layout under `$ML_LIFECYCLE_HOME/<dataset>/registry/`:
    versions/v0001/model.txt            LightGBM text model
    versions/v0001/feature_state.json   the fitted feature transform (schema + vocabularies)
    versions/v0001/reference_profile.json  training distribution, for drift
    versions/v0001/metadata.json        task, classes, params, metrics, run id, snapshot, ...
    aliases.json                        {"champion": "v0001", "challenger": "v0002"}
    audit.jsonl                         every promotion, refusal and rollback, with the reason
A version is written into a temporary folder and renamed into place when complete, so a run
killed mid-way leaves no half version and never touches the aliases.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_lifecycle.data.features import FeatureState
from ml_lifecycle.settings import StorageURLError, local_root

if TYPE_CHECKING:
    import lightgbm as lgb

ALIASES = ("champion", "challenger")


class RegistryError(RuntimeError):
    """A version or alias does not exist, or the registry is inconsistent."""


@dataclass
class ModelVersion:
    version: str
    path: Path
    metadata: dict[str, Any]
    state: FeatureState

    def booster(self) -> lgb.Booster:
        import lightgbm as lgb

        return lgb.Booster(model_file=str(self.path / "model.txt"))

    def reference_profile(self) -> dict[str, Any]:
        file = self.path / "reference_profile.json"
        return json.loads(file.read_text()) if file.exists() else {}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _local_root(root: Path | str) -> Path:
    """A registry root as a local path (`settings.local_root`): aliases are atomic renames and
    writers take an flock, so object-store URLs are refused rather than half supported."""
    try:
        return local_root(str(root), "model registry root")
    except StorageURLError as error:
        raise RegistryError(str(error)) from None


class ModelRegistry:
    def __init__(self, root: Path | str) -> None:
        self.root = _local_root(root)
        self.versions_dir = self.root / "versions"

    # -- locking --------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- versions -------------------------------------------------------------------------
    def versions(self) -> list[str]:
        if not self.versions_dir.exists():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir()
                      if p.is_dir() and p.name.startswith("v") and (p / "metadata.json").exists())

    def register(
        self,
        booster: lgb.Booster,
        state: FeatureState,
        metadata: dict[str, Any],
        reference_profile: dict[str, Any],
    ) -> str:
        """Write a complete new version and point `challenger` at it; returns the version."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = self.versions_dir / f".staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            booster.save_model(str(staging / "model.txt"), num_iteration=booster.best_iteration or None)
            (staging / "feature_state.json").write_text(state.model_dump_json(indent=1))
            (staging / "reference_profile.json").write_text(json.dumps(reference_profile))
            with self._lock():
                existing = self.versions()
                number = int(existing[-1][1:]) + 1 if existing else 1
                version = f"v{number:04d}"
                full = {**metadata, "version": version, "registered_at": _now()}
                (staging / "metadata.json").write_text(json.dumps(full, indent=1, default=str))
                for name in ("model.txt", "feature_state.json", "reference_profile.json",
                             "metadata.json"):
                    with (staging / name).open("rb") as handle:
                        os.fsync(handle.fileno())
                os.rename(staging, self.versions_dir / version)
                self._set_alias_locked("challenger", version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def load(self, version: str) -> ModelVersion:
        path = self.versions_dir / version
        if not (path / "metadata.json").exists():
            raise RegistryError(f"model version {version!r} not found in {self.versions_dir} "
                                f"(have: {', '.join(self.versions()) or 'none'})")
        return ModelVersion(
            version=version,
            path=path,
            metadata=json.loads((path / "metadata.json").read_text()),
            state=FeatureState.model_validate_json((path / "feature_state.json").read_text()),
        )

    def clean_staging(self) -> int:
        """Remove folders left by killed runs; returns how many."""
        if not self.versions_dir.exists():
            return 0
        stale = [p for p in self.versions_dir.iterdir() if p.name.startswith(".staging-")]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    # -- aliases --------------------------------------------------------------------------
    def aliases(self) -> dict[str, str]:
        file = self.root / "aliases.json"
        return json.loads(file.read_text()) if file.exists() else {}

    def alias(self, name: str) -> str | None:
        return self.aliases().get(name)

    def _set_alias_locked(self, name: str, version: str) -> None:
        if name not in ALIASES:
            raise RegistryError(f"unknown alias {name!r}; expected one of {ALIASES}")
        aliases = self.aliases()
        aliases[name] = version
        _atomic_write(self.root / "aliases.json", json.dumps(aliases, indent=1, sort_keys=True))

    def set_alias(self, name: str, version: str) -> None:
        self.load(version)  # must exist
        with self._lock():
            self._set_alias_locked(name, version)

    # -- audit ----------------------------------------------------------------------------
    def audit(self, event: str, version: str | None, reason: str, **details: Any) -> dict:
        record = {"time": _now(), "event": event, "version": version, "reason": reason, **details}
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "audit.jsonl").open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record

    def audit_log(self) -> list[dict[str, Any]]:
        file = self.root / "audit.jsonl"
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    def promote(self, version: str, reason: str, **details: Any) -> dict:
        """Make `version` the champion (atomic) and record why."""
        previous = self.alias("champion")
        self.set_alias("champion", version)
        return self.audit("promoted", version, reason, previous_champion=previous, **details)

    def rollback(self, to: str | None = None, reason: str = "manual rollback") -> dict:
        """Point `champion` back at `to`, or at the champion before the current one."""
        current = self.alias("champion")
        if to is None:
            # Replay the champion history as a stack: a rollback pops back to its target.
            stack: list[str] = []
            for entry in self.audit_log():
                version = entry.get("version")
                if entry["event"] == "promoted" and version:
                    stack.append(version)
                elif entry["event"] == "rolled_back" and version:
                    while stack and stack[-1] != version:
                        stack.pop()
                    if not stack:
                        stack.append(version)
            if len(stack) < 2:
                raise RegistryError("no earlier champion to roll back to; name a version")
            to = stack[-2]
        self.set_alias("champion", to)
        return self.audit("rolled_back", to, reason, previous_champion=current)
