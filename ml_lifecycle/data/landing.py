"""The landing zone: files as sources deliver them, written by a spec's generator when missing."""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Iterable
from pathlib import Path

from ml_lifecycle.spec import DatasetSpec, SpecError


def _generator(spec: DatasetSpec):
    if spec.landing is None:
        return None
    script = spec.base_dir / spec.landing.generator
    if not script.is_file():
        raise SpecError(f"dataset spec {spec.spec_path}: landing.generator: file {script} not found")
    module_spec = importlib.util.spec_from_file_location(f"_landing_{spec.name}", script)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, spec.landing.function, None)
    if not callable(function):
        raise SpecError(f"dataset spec {spec.spec_path}: landing.function: {script} has no "
                        f"function {spec.landing.function!r}")
    return function


def land(spec: DatasetSpec, months: Iterable[int] | None = None, scale: int = 1,
         landing: Path | None = None) -> list[Path]:
    """Run the spec's landing generator (writes only missing files); returns files written."""
    function = _generator(spec)
    if function is None:
        return []
    target = landing or spec.paths().landing
    kwargs = {}
    parameters = inspect.signature(function).parameters
    if months is not None:
        if "months" not in parameters:
            raise SpecError(f"landing generator of {spec.name!r} does not take `months`")
        kwargs["months"] = list(months)
    if scale != 1:
        kwargs["scale"] = scale
    return list(function(target, **kwargs) or [])


def ensure_landing(spec: DatasetSpec) -> list[Path]:
    """On a fresh home, create the landing files so every job works from nothing.

    Only when the landing folder does not exist yet: once files are there (or were released
    month by month), the generator is left alone.
    """
    if spec.landing is None or spec.paths().landing.exists():
        return []
    return land(spec)
