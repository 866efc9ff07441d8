"""The online feature store: history aggregates served at request time.

Same definition as the offline computation (`data/aggregates.py`): for a request at time t the
statistics cover values of the same keys that became known within [t - lag - window, t - lag].
`MemoryOnlineStore` keeps sorted per-key arrays in process (embedded default); `RedisOnlineStore`
keeps one sorted set per aggregate and key in Redis (production), scored by `known_at`.
Events arrive from the pipeline's snapshot at start and from the event feed while serving.
"""

from __future__ import annotations

import itertools
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
    return all(
        k is not None and k != MISSING_LEVEL and not (isinstance(k, float) and math.isnan(k))
        for k in key
    )


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
    def add(
        self, aggregate: Aggregate, keys: Sequence[Key], known_at: Any, values: Sequence[float]
    ) -> int: ...

    def query(
        self, aggregate: Aggregate, keys: Sequence[Key], times: Any
    ) -> list[dict[str, float | int | None]]: ...


def columns_of(
    aggregate: Aggregate, rows: list[dict[str, float | int | None]]
) -> dict[str, np.ndarray]:
    """Per-row statistics as one float64 column per statistic (None -> NaN)."""
    return {
        stat: np.array([np.nan if r[stat] is None else r[stat] for r in rows], dtype=np.float64)
        for stat in aggregate.statistics
    }


def rows_of(
    aggregate: Aggregate, columns: dict[str, np.ndarray]
) -> list[dict[str, float | int | None]]:
    lists = {
        stat: [
            None if v != v else (int(v) if stat == "count" else float(v))
            for v in columns[stat].tolist()
        ]
        for stat in aggregate.statistics
    }
    return [dict(zip(lists, values, strict=True)) for values in zip(*lists.values(), strict=True)]


def _window_extremes(
    padded: np.ndarray, starts: np.ndarray, ends: np.ndarray, wanted: Sequence[str]
) -> dict[str, np.ndarray]:
    """min / max / std of values[start:end] for many windows at once (NaN = NULL); `padded` is
    the values plus one trailing element (`reduceat` needs every index < len).

    Windows must be sorted by start: `reduceat` then walks each window and the gaps between
    consecutive ones, so a batch costs at most one pass over the values it spans."""
    out: dict[str, np.ndarray] = {}
    lengths = ends - starts
    empty = lengths == 0
    if not len(starts) or padded.size <= 1 or empty.all():
        return {stat: np.full(len(starts), np.nan) for stat in wanted}
    values = padded[:-1]
    base, top = int(starts[0]), int(ends.max())
    total = int(lengths.sum())
    if 2 * total < top - base:
        # Windows far apart (many keys): gather just their values, back to back.
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        gather = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)
        span = np.append(values[gather], 0.0)
        first, last = offsets, offsets + lengths
    else:
        span = padded[base : top + 1]  # a view: the windows and the gaps between them
        first, last = starts - base, ends - base
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2], bounds[1::2] = first, last
    for stat in wanted:
        if stat in ("min", "max"):
            ufunc = np.minimum if stat == "min" else np.maximum
            out[stat] = np.where(empty, np.nan, ufunc.reduceat(span, bounds)[0::2])
        elif stat == "std":
            out[stat] = np.array(
                [
                    np.nan if e - s < 2 else float(values[s:e].std(ddof=1))
                    for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
                ]
            )
    return out


class _Windows:
    """Per-row window contents of one `_Flat`: count, sum (0 when empty) and, when asked for,
    min / max / std (NaN when empty)."""

    __slots__ = ("count", "extremes", "total")

    def __init__(self, count: np.ndarray, total: np.ndarray, extremes: dict[str, np.ndarray]):
        self.count, self.total, self.extremes = count, total, extremes


class _Flat:
    """All series of one aggregate in one array, sorted by (key, known_at), searchable at once:
    `position` = key rank * span + (known_at - first + 1), so one `searchsorted` finds every
    row's window whatever its key. Sums come from running totals (two reads per window however
    long it is): exact when every value is an integer (running totals of integers below 2**53
    are exact in float64), otherwise centred on each key's mean, as the offline kernel
    (`data.aggregates.window_statistics`) computes them."""

    def __init__(self, series: dict[Key, tuple[np.ndarray, np.ndarray]], single: bool) -> None:
        keys = list(series)
        # One key column: ranks by the value itself (no tuple per request row to build or hash).
        self.rank = {(key[0] if single else key): index for index, key in enumerate(keys)}
        stamps = [series[k][0] for k in keys]
        lengths = np.array([len(s) for s in stamps], dtype=np.int64)
        self.padded = np.concatenate([*(series[k][1] for k in keys), np.zeros(1)])
        every = np.concatenate(stamps) if keys else np.empty(0, np.int64)
        self.size = int(every.size)
        self.first = int(every.min()) if every.size else 0
        self.span = (int(every.max()) - self.first + 3) if every.size else 3
        self.searchable = len(keys) * self.span < 2**62
        self.position = (
            (
                np.repeat(np.arange(len(keys), dtype=np.int64) * self.span, lengths)
                + (every - self.first + 1)
            )
            if self.searchable
            else every
        )
        values = self.padded[:-1]
        self.centre = np.zeros(len(keys))
        if values.size and not (
            np.array_equal(values, np.round(values)) and float(np.abs(values).sum()) < 2**53
        ):
            sums = np.add.reduceat(values, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
            self.centre = sums / lengths
            values = values - np.repeat(self.centre, lengths)
        self.running = np.concatenate([[0.0], np.cumsum(values)])

    def windows(
        self, ranks: np.ndarray, lows: np.ndarray, highs: np.ndarray, extremes: Sequence[str]
    ) -> _Windows:
        """The windows [low, high] of keys `ranks` (all >= 0), in input order."""
        base = ranks * self.span
        top = self.span - 1
        # Clipped into the key's band: outside the history, the band's edge finds the same rows.
        low = base + np.minimum(np.maximum(lows - (self.first - 1), 0), top)
        high = base + np.minimum(np.maximum(highs - (self.first - 1), 0), top)
        # Sorted needles: searchsorted walks the history once instead of jumping around it
        # (3x faster on 1000 rows), and the windows come out in the order reduceat needs.
        order = np.argsort(low, kind="stable")
        starts = np.empty(len(low), dtype=np.int64)
        ends = np.empty(len(low), dtype=np.int64)
        starts[order] = np.searchsorted(self.position, low[order], side="left")
        ends[order] = np.searchsorted(self.position, high[order], side="right")
        np.maximum(ends, starts, out=ends)
        count = ends - starts
        total = self.running[ends] - self.running[starts] + count * self.centre[ranks]
        found: dict[str, np.ndarray] = {}
        if extremes:
            sorted_stats = _window_extremes(self.padded, starts[order], ends[order], extremes)
            for stat, column in sorted_stats.items():
                found[stat] = np.empty(len(low))
                found[stat][order] = column
        return _Windows(count, total, found)

    def window(self, rank: int, low: int, high: int, extremes: Sequence[str]) -> _Windows:
        """`windows` for one row, on scalars (a single-row request)."""
        base, top = rank * self.span, self.span - 1
        position = self.position
        start = int(position.searchsorted(base + min(max(low - self.first + 1, 0), top)))
        end = int(position.searchsorted(base + min(max(high - self.first + 1, 0), top), "right"))
        end = max(start, end)
        count = end - start
        total = float(self.running[end] - self.running[start]) + count * float(self.centre[rank])
        found = {}
        for stat in extremes:
            values = self.padded[start:end]
            if stat == "std":
                found[stat] = float(values.std(ddof=1)) if count > 1 else np.nan
            else:
                found[stat] = (
                    np.nan if not count else float(values.min() if stat == "min" else values.max())
                )
        return _Windows(
            np.array([count]), np.array([total]), {k: np.array([v]) for k, v in found.items()}
        )


def _window(aggregate: Aggregate, times: Any) -> tuple[np.ndarray, np.ndarray]:
    at = _micros(times) - int(aggregate.lag.total_seconds() * 1e6)
    return at - int(aggregate.window.total_seconds() * 1e6), at


_EXTREMES = ("min", "max", "std")


class MemoryOnlineStore:
    """Per (aggregate, key): known_at (µs) and values, kept sorted; thread-safe.

    Queries read one consolidated `_Flat` per aggregate plus, when events arrived since it was
    built, a small `_Flat` of just those events (their windows are added to the main one's):
    an event costs an append, and the whole history is re-consolidated only once the recent
    events outgrow `consolidate_from` (or an eighth of the history)."""

    def __init__(self, consolidate_from: int = 4096) -> None:
        self._series: dict[tuple[str, Key], tuple[np.ndarray, np.ndarray]] = {}
        self._pending: dict[str, dict[Key, list[tuple[int, float]]]] = {}
        self._pending_size: dict[str, int] = {}
        self._flats: dict[str, _Flat] = {}
        self._recent: dict[str, _Flat | None] = {}
        self.consolidate_from = consolidate_from
        self._lock = threading.Lock()

    def add(
        self, aggregate: Aggregate, keys: Sequence[Key], known_at: Any, values: Sequence[float]
    ) -> int:
        stamps = _micros(known_at).tolist()
        added = 0
        with self._lock:
            pending = self._pending.setdefault(aggregate.name, {})
            for key, stamp, value in zip(keys, stamps, values, strict=True):
                if (
                    not valid_key(key)
                    or value is None
                    or (isinstance(value, float) and math.isnan(value))
                ):
                    continue
                pending.setdefault(tuple(key), []).append((stamp, float(value)))
                added += 1
            if added:
                self._pending_size[aggregate.name] = (
                    self._pending_size.get(aggregate.name, 0) + added
                )
                self._recent[aggregate.name] = None  # rebuilt on the next read
        return added

    @staticmethod
    def _sorted(pairs: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
        stamps = np.array([p[0] for p in pairs], dtype=np.int64)
        values = np.array([p[1] for p in pairs], dtype=np.float64)
        order = np.argsort(stamps, kind="stable")
        return stamps[order], values[order]

    def _consolidate(self, aggregate: Aggregate) -> None:
        """Merge the aggregate's recent events into its series and rebuild its `_Flat`."""
        name = aggregate.name
        for key, pairs in self._pending.pop(name, {}).items():
            stamps, values = self._sorted(pairs)
            series = self._series.get((name, key))
            if series is not None:
                stamps = np.concatenate([series[0], stamps])
                values = np.concatenate([series[1], values])
                order = np.argsort(stamps, kind="stable")
                stamps, values = stamps[order], values[order]
            self._series[(name, key)] = (stamps, values)
        self._pending_size[name] = 0
        self._recent[name] = None
        series = {key: value for (owner, key), value in self._series.items() if owner == name}
        self._flats[name] = _Flat(series, single=len(aggregate.keys) == 1)

    def _flats_for(self, aggregate: Aggregate) -> tuple[_Flat, _Flat | None]:
        """(history, recent events or None), under the lock."""
        name = aggregate.name
        flat = self._flats.get(name)
        size = self._pending_size.get(name, 0)
        if flat is None or (
            size
            and (
                size >= max(self.consolidate_from, flat.size // 8)
                or "std" in aggregate.statistics  # std reads the values: one history
            )
        ):
            self._consolidate(aggregate)
            return self._flats[name], None
        if not size:
            return flat, None
        recent = self._recent.get(name)
        if recent is None:
            pending = self._pending.get(name, {})
            recent = _Flat(
                {key: self._sorted(pairs) for key, pairs in pending.items()},
                single=len(aggregate.keys) == 1,
            )
            self._recent[name] = recent
        return flat, recent

    def query(
        self, aggregate: Aggregate, keys: Sequence[Key], times: Any
    ) -> list[dict[str, float | int | None]]:
        return rows_of(aggregate, self.query_columns(aggregate, keys, times))

    def query_columns(
        self, aggregate: Aggregate, keys: Sequence[Key], times: Any
    ) -> dict[str, np.ndarray]:
        """The statistics of each (key, time) as float64 columns (NaN = NULL)."""
        if len(aggregate.keys) == 1:
            return self.query_key_columns(aggregate, [[key[0] for key in keys]], times)
        return self._query(aggregate, [tuple(key) for key in keys], times)

    def query_key_columns(
        self, aggregate: Aggregate, key_columns: Sequence[Sequence[Any]], times: Any
    ) -> dict[str, np.ndarray]:
        """`query_columns` with the keys given as one sequence per key column (the request's
        own columns: no tuple per row when the aggregate has one key)."""
        if len(key_columns) == 1:
            return self._query(aggregate, key_columns[0], times)
        return self._query(aggregate, list(zip(*key_columns, strict=True)), times)

    def _query(
        self, aggregate: Aggregate, keys: Sequence[Any], times: Any
    ) -> dict[str, np.ndarray]:
        """`keys`: scalars (one key column) or tuples. One searchsorted pair over the
        aggregate's consolidated history (and one over its recent events), two reads of the
        running totals per window, one reduceat per min / max."""
        lows, highs = _window(aggregate, times)
        rows = len(lows)
        single = len(aggregate.keys) == 1
        with self._lock:
            flat, recent = self._flats_for(aggregate)
        if not flat.searchable or (recent is not None and not recent.searchable):
            with self._lock:  # astronomically many keys x a long history: key by key
                self._consolidate(aggregate)
            return columns_of(aggregate, self._query_by_key(aggregate, keys, lows, highs))
        extremes = [stat for stat in aggregate.statistics if stat in _EXTREMES]
        parts = [flat] if recent is None else [flat, recent]
        if rows == 1:
            found = [part.rank.get(keys[0]) for part in parts]
            if all(rank is None for rank in found):
                return self._empty(
                    aggregate, 1, valid=[valid_key((keys[0],) if single else keys[0])]
                )
            windows = [
                part.window(rank, int(lows[0]), int(highs[0]), extremes)
                for part, rank in zip(parts, found, strict=True)
                if rank is not None
            ]
            return self._combined(aggregate, windows)
        count = np.zeros(rows, dtype=np.int64)
        total = np.zeros(rows)
        extreme = {stat: np.full(rows, np.nan) for stat in extremes}
        seen = np.zeros(rows, dtype=bool)
        for part in parts:
            # dict.get mapped in C (no Python call per row); -1: not in this part.
            ranks = np.fromiter(
                map(part.rank.get, keys, itertools.repeat(-1, rows)), dtype=np.int64, count=rows
            )
            at = np.flatnonzero(ranks >= 0)
            if not at.size:
                continue
            seen[at] = True
            windows = part.windows(ranks[at], lows[at], highs[at], extremes)
            count[at] += windows.count
            total[at] += windows.total
            for stat, column in windows.extremes.items():
                combine = np.fmin if stat == "min" else np.fmax
                extreme[stat][at] = combine(extreme[stat][at], column)
        valid = np.ones(rows, dtype=bool)
        for index in np.flatnonzero(~seen).tolist():  # no history: a valid key counts 0
            valid[index] = valid_key((keys[index],) if single else tuple(keys[index]))
        return self._finish(aggregate, count, total, extreme, valid)

    @staticmethod
    def _combined(aggregate: Aggregate, windows: list[_Windows]) -> dict[str, np.ndarray]:
        """The statistics of one row's windows in the history and the recent events."""
        count = sum(w.count for w in windows)
        total = sum(w.total for w in windows)
        extreme = {}
        for stat in aggregate.statistics:
            if stat in _EXTREMES:
                combine = np.fmin if stat == "min" else np.fmax
                columns = [w.extremes[stat] for w in windows]
                extreme[stat] = columns[0] if len(columns) == 1 else combine(*columns)
        return MemoryOnlineStore._finish(aggregate, count, total, extreme, np.ones(1, dtype=bool))

    @staticmethod
    def _empty(aggregate: Aggregate, rows: int, valid: list[bool]) -> dict[str, np.ndarray]:
        return MemoryOnlineStore._finish(
            aggregate,
            np.zeros(rows, dtype=np.int64),
            np.zeros(rows),
            {stat: np.full(rows, np.nan) for stat in aggregate.statistics if stat in _EXTREMES},
            np.array(valid, dtype=bool),
        )

    @staticmethod
    def _finish(
        aggregate: Aggregate,
        count: np.ndarray,
        total: np.ndarray,
        extreme: dict[str, np.ndarray],
        valid: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """The statistics from window counts and sums (what DuckDB gives: NULL on no rows, a
        count of 0 for a valid key without history, NULL everywhere for an invalid key)."""
        out: dict[str, np.ndarray] = {}
        empty = count == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            for stat in aggregate.statistics:
                if stat == "count":
                    column = count.astype(np.float64)
                elif stat == "sum":
                    column = np.where(empty, np.nan, total)
                elif stat == "mean":
                    column = np.where(empty, np.nan, total / np.maximum(count, 1))
                else:
                    column = extreme[stat]
                if not valid.all():
                    column = np.where(valid, column, np.nan)
                out[stat] = column
        return out

    def _query_by_key(
        self, aggregate: Aggregate, keys: Sequence[Any], lows: np.ndarray, highs: np.ndarray
    ) -> list[dict[str, float | int | None]]:
        out = []
        single = len(aggregate.keys) == 1
        with self._lock:
            for key, low, high in zip(keys, lows, highs, strict=True):
                key = (key,) if single else tuple(key)
                if not valid_key(key):
                    out.append({stat: None for stat in aggregate.statistics})
                    continue
                stamps, values = self._series.get(
                    (aggregate.name, key), (np.empty(0, np.int64), np.empty(0))
                )
                start = np.searchsorted(stamps, low, side="left")
                end = np.searchsorted(stamps, high, side="right")
                out.append(statistics(values[start:end], aggregate.statistics))
        return out

    def size(self) -> int:
        with self._lock:
            return sum(len(s[0]) for s in self._series.values()) + sum(self._pending_size.values())


class RedisOnlineStore:
    """One sorted set per aggregate and key (`<prefix>:<aggregate>:<key>`), score = known_at µs."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "mll") -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix

    def _name(self, aggregate: str, key: Key) -> str:
        return f"{self.prefix}:{aggregate}:" + "|".join(str(k) for k in key)

    def add(
        self, aggregate: Aggregate, keys: Sequence[Key], known_at: Any, values: Sequence[float]
    ) -> int:
        stamps = _micros(known_at)
        pipe = self.client.pipeline(transaction=False)
        added = 0
        for key, stamp, value in zip(keys, stamps, values, strict=True):
            if (
                not valid_key(tuple(key))
                or value is None
                or (isinstance(value, float) and math.isnan(value))
            ):
                continue
            member = f"{float(value)!r}:{uuid.uuid4().hex[:12]}"
            pipe.zadd(self._name(aggregate.name, tuple(key)), {member: int(stamp)})
            added += 1
            if added % 5000 == 0:
                pipe.execute()
        pipe.execute()
        return added

    def query(
        self, aggregate: Aggregate, keys: Sequence[Key], times: Any
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

    def query_columns(
        self, aggregate: Aggregate, keys: Sequence[Key], times: Any
    ) -> dict[str, np.ndarray]:
        return columns_of(aggregate, self.query(aggregate, keys, times))

    def clear(self) -> None:
        for name in self.client.scan_iter(f"{self.prefix}:*", count=1000):
            self.client.delete(name)
