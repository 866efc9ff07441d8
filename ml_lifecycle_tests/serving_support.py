"""Helpers for the serving tests and benchmark: a synthetic dataset that exercises everything the
service must reproduce, and a real `bentoml serve` process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import yaml

SITES = ["north", "south", "east", "west", "harbour"]
REGIONS = {
    "north": "upland",
    "south": "coast",
    "east": "coast",
    "west": "upland",
    "harbour": "coast",
}
VEHICLES = ["van", "truck", "bike", "car", "bus", "tram"]
START = np.datetime64("2024-01-01T00:00")
DAYS = 151  # 2024-01-01 .. 2024-05-30: five months, time split test=May, valid=April

SERVICE = "ml_lifecycle.serving.service:Predictor"


def write_serving_dataset(folder: Path, rows: int = 5000, seed: int = 7) -> Path:
    """Trips at five sites with their delay (known only after the trip, in drop_columns), hourly
    readings per site (a reference with a time, joined as of the trip's time, max_age 3h), static
    site facts (a reference without a time) and two history aggregates. Returns the spec path."""
    rng = np.random.default_rng(seed)
    minutes = np.sort(rng.integers(0, 60 * 24 * DAYS, rows))
    sched = (START + minutes.astype("timedelta64[m]")).astype("datetime64[us]")
    site = rng.choice(SITES, size=rows, p=[0.3, 0.25, 0.2, 0.15, 0.1])
    vehicle = rng.choice(VEHICLES, size=rows).astype(object)
    vehicle[rng.random(rows) < 0.05] = None  # NULL category -> "(missing)"
    distance = np.round(rng.gamma(3.0, 20.0, rows), 1).astype(object)
    distance[rng.random(rows) < 0.03] = None
    distance[rng.random(rows) < 0.01] = -5.0  # outside valid_ranges: nulled by cleaning
    passengers = rng.integers(0, 40, rows)

    # Hourly readings per site, with gaps (some older than max_age): wind drives delays.
    hours = np.arange(0, 24 * DAYS)
    readings = []
    wind_by_site = {}
    for name in SITES:
        wind = np.clip(np.cumsum(rng.normal(0, 1.5, hours.size)) % 40, 0, None)
        wind_by_site[name] = wind
        keep = rng.random(hours.size) > 0.1
        for gap in rng.integers(0, hours.size - 8, 12):  # 12 gaps of 6 hours per site
            keep[gap : gap + 6] = False
        observed = (START + hours[keep].astype("timedelta64[h]")).astype("datetime64[us]")
        readings.append(
            pl.DataFrame(
                {
                    "site": [name] * int(keep.sum()),
                    "observed_at": observed,
                    "wind": np.round(wind[keep], 2),
                    "rain": np.round(rng.exponential(1.0, int(keep.sum())), 2),
                }
            )
        )
    hour_index = (minutes // 60).astype(int)
    wind_at = np.array([wind_by_site[s][h] for s, h in zip(site, hour_index, strict=True)])
    regime = {name: np.repeat(rng.normal(0, 6, DAYS // 3 + 1), 3)[:DAYS] for name in SITES}
    day = minutes // (60 * 24)
    site_regime = np.array([regime[s][d] for s, d in zip(site, day, strict=True)])
    base = {"north": 2, "south": 6, "east": 0, "west": 4, "harbour": 9}
    delay = (
        np.array([base[s] for s in site])
        + 0.4 * wind_at
        + site_regime
        + 3 * (vehicle == "truck")
        + rng.normal(0, 6, rows)
    )
    delay = np.clip(np.round(delay), -10, 180).astype(int)
    # A few trips without a site (the key of both references and both aggregates): scored with
    # "(missing)", no joined readings or facts and no history, offline and online alike.
    site = site.astype(object)
    site[rng.random(rows) < 0.02] = None
    trips = pl.DataFrame(
        {
            "trip_id": np.arange(1, rows + 1),
            "sched_at": sched,
            "site": pl.Series(site.tolist(), dtype=pl.String),
            "vehicle": pl.Series(vehicle.tolist(), dtype=pl.String),
            "distance": pl.Series(distance.tolist(), dtype=pl.Float64),
            "passengers": passengers,
            "delay": delay,
        }
    )
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    trips.write_csv(data / "trips.csv")
    pl.concat(readings).sort("observed_at").write_csv(data / "readings.csv")
    pl.DataFrame(
        {"site": SITES, "capacity": [120, 80, 60, 100, 40], "region": [REGIONS[s] for s in SITES]}
    ).write_csv(data / "sites.csv")

    spec = {
        "name": "synthetic_serving",
        "task": "binary",
        "source": {"path": "data/trips.csv"},
        "target_expression": "delay > 10",
        "time_column": "sched_at",
        "id_columns": ["trip_id"],
        "drop_columns": ["delay"],
        "categorical_columns": ["site", "vehicle"],
        "valid_ranges": {"distance": [0, 1000]},
        "references": [
            {
                "name": "readings",
                "source": {"path": "data/readings.csv"},
                "keys": ["site"],
                "time_column": "observed_at",
                "max_age": "3h",
            },
            {"name": "sites", "source": {"path": "data/sites.csv"}, "keys": ["site"]},
        ],
        "aggregates": [
            {
                "name": "site_delay_3h",
                "keys": ["site"],
                "value": "delay",
                "known_at": "__time + to_minutes(CAST(delay AS BIGINT))",
                "window": "3h",
                "lag": "1h",
                "statistics": ["mean", "count", "max"],
            },
            {
                "name": "site_late_7d",
                "keys": ["site"],
                "value": "CAST(__target AS DOUBLE)",
                "window": "7d",
                "lag": "1h",
                "statistics": ["mean", "count"],
            },
        ],
        "split": {"method": "time", "period": "month", "test": 1, "valid": 1},
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "spec.params.yaml").write_text(
        yaml.safe_dump(
            {
                "lightgbm": {"num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 20},
                "num_boost_round": 60,
                "early_stopping_rounds": 10,
            }
        )
    )
    return folder / "spec.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A `bentoml serve` process group on 127.0.0.1."""

    process: subprocess.Popen
    url: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait (bounded) until /readyz answers 200; stop the server and raise otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"bentoml serve exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"bentoml serve not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def launch_server(
    env: dict[str, str], log: Path, target: str = SERVICE, cwd: Path | None = None
) -> Server:
    """Start `bentoml serve target` with `env` on a free loopback port (not waiting)."""
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=cwd or Path(__file__).resolve().parents[1],
            start_new_session=True,
        )
    return Server(process, f"http://127.0.0.1:{port}", log, env)


def start_server(
    env: dict[str, str],
    log: Path,
    target: str = SERVICE,
    timeout: float = 180.0,
    cwd: Path | None = None,
) -> Server:
    """Start `bentoml serve target` and wait for /readyz."""
    server = launch_server(env, log, target, cwd)
    server.wait_ready(timeout)
    return server
