"""The online feature store: history aggregates served at request time.

Same definition as the offline computation (`data/aggregates.py`): for a request at time t the
statistics cover values of the same keys that became known within [t - lag - window, t - lag].
`MemoryOnlineStore` keeps sorted per-key arrays in process (embedded default); `RedisOnlineStore`
keeps one sorted set per aggregate and key in Redis (production), scored by `known_at`.
Events arrive from the pipeline's snapshot at start and from the event feed while serving.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ml_lifecycle.data.cleaning import MISSING_LEVEL
from ml_lifecycle.spec import Aggregate

Key = tuple[Any, ...]


def _micros(times: Any) -> np.ndarray:
    return np.asarray(times, dtype="datetime64[us]").astype(np.int64)


def valid_key(key: Key) -> bool:
    return all(k is not None and k != MISSING_LEVEL and not (isinstance(k, float) and math.isnan(k))
               for k in key)


def statistics(values: np.ndarray, wanted: Sequence[str]) -> dict[str, float | int | None]:
    """The statistics DuckDB's window aggregates give for the same values (NULL -> None)."""
    n = int(values.size)
    out: dict[str, float | int | None] = {}
    for stat in wanted:
        if stat == "count":
            out[stat] = n
        elif n == 0:
            out[stat] = None
        elif stat == "mean":
            out[stat] = float(values.mean())
        elif stat == "sum":
            out[stat] = float(values.sum())
        elif stat == "min":
            out[stat] = float(values.min())
        elif stat == "max":
            out[stat] = float(values.max())
        elif stat == "std":
            out[stat] = float(values.std(ddof=1)) if n > 1 else None
    return out


class OnlineStore(Protocol):
    def add(self, aggregate: Aggregate, keys: Sequence[Key], known_at: Any,
            values: Sequence[float]) -> int: ...

    def query(self, aggregate: Aggregate, keys: Sequence[Key], times: Any
              ) -> list[dict[str, float | int | None]]: ...


def _window(aggregate: Aggregate, times: Any) -> tuple[np.ndarray, np.ndarray]:
    at = _micros(times) - int(aggregate.lag.total_seconds() * 1e6)
    return at - int(aggregate.window.total_seconds() * 1e6), at


class MemoryOnlineStore:
    """Per (aggregate, key): known_at (µs) and values, kept sorted; thread-safe."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, Key], tuple[np.ndarray, np.ndarray]] = {}
        self._pending: dict[tuple[str, Key], list[tuple[int, float]]] = {}
        self._lock = threading.Lock()

    def add(self, aggregate: Aggregate, keys: Sequence[Key], known_at: Any,
            values: Sequence[float]) -> int:
        stamps = _micros(known_at)
        added = 0
        with self._lock:
            for key, stamp, value in zip(keys, stamps, values, strict=True):
                if not valid_key(key) or value is None or (isinstance(value, float)
                                                           and math.isnan(value)):
                    continue
                self._pending.setdefault((aggregate.name, tuple(key)), []).append(
                    (int(stamp), float(value)))
                added += 1
        return added

    def _series_for(self, name: str, key: Key) -> tuple[np.ndarray, np.ndarray]:
        slot = (name, key)
        pending = self._pending.pop(slot, None)
        series = self._series.get(slot)
        if pending:
            stamps = np.array([p[0] for p in pending], dtype=np.int64)
            values = np.array([p[1] for p in pending], dtype=np.float64)
            if series is not None:
                stamps = np.concatenate([series[0], stamps])
                values = np.concatenate([series[1], values])
            order = np.argsort(stamps, kind="stable")
            series = (stamps[order], values[order])
            self._series[slot] = series
        return series if series is not None else (np.empty(0, np.int64), np.empty(0))

    def query(self, aggregate: Aggregate, keys: Sequence[Key], times: Any
              ) -> list[dict[str, float | int | None]]:
        lows, highs = _window(aggregate, times)
        out = []
        with self._lock:
            for key, low, high in zip(keys, lows, highs, strict=True):
                if not valid_key(tuple(key)):
                    out.append({stat: None for stat in aggregate.statistics})
                    continue
                stamps, values = self._series_for(aggregate.name, tuple(key))
                start = np.searchsorted(stamps, low, side="left")
                end = np.searchsorted(stamps, high, side="right")
                out.append(statistics(values[start:end], aggregate.statistics))
        return out

    def size(self) -> int:
        with self._lock:
            return sum(len(s[0]) for s in self._series.values()) + sum(
                len(p) for p in self._pending.values())


class RedisOnlineStore:
    """One sorted set per aggregate and key (`<prefix>:<aggregate>:<key>`), score = known_at µs."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "mll") -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix

    def _name(self, aggregate: str, key: Key) -> str:
        return f"{self.prefix}:{aggregate}:" + "|".join(str(k) for k in key)

    def add(self, aggregate: Aggregate, keys: Sequence[Key], known_at: Any,
            values: Sequence[float]) -> int:
        stamps = _micros(known_at)
        pipe = self.client.pipeline(transaction=False)
        added = 0
        for key, stamp, value in zip(keys, stamps, values, strict=True):
            if not valid_key(tuple(key)) or value is None or (isinstance(value, float)
                                                              and math.isnan(value)):
                continue
            member = f"{float(value)!r}:{uuid.uuid4().hex[:12]}"
            pipe.zadd(self._name(aggregate.name, tuple(key)), {member: int(stamp)})
            added += 1
            if added % 5000 == 0:
                pipe.execute()
        pipe.execute()
        return added

    def query(self, aggregate: Aggregate, keys: Sequence[Key], times: Any
              ) -> list[dict[str, float | int | None]]:
        lows, highs = _window(aggregate, times)
        pipe = self.client.pipeline(transaction=False)
        slots = []
        for key, low, high in zip(keys, lows, highs, strict=True):
            if valid_key(tuple(key)):
                pipe.zrangebyscore(self._name(aggregate.name, tuple(key)), int(low), int(high))
                slots.append(True)
            else:
                slots.append(False)
        answers = iter(pipe.execute())
        out = []
        for ok in slots:
            if not ok:
                out.append({stat: None for stat in aggregate.statistics})
                continue
            members = next(answers)
            values = np.array([float(m.split(b":", 1)[0]) for m in members], dtype=np.float64)
            out.append(statistics(values, aggregate.statistics))
        return out

    def clear(self) -> None:
        for name in self.client.scan_iter(f"{self.prefix}:*", count=1000):
            self.client.delete(name)
