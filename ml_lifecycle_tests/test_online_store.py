"""The in-process online store against the aggregate definition, on random histories.

For a row at time t the statistics cover the values of the same key known within
[t - lag - window, t - lag]: the brute-force `statistics` over exactly those values, and the
offline kernel (`data.aggregates.window_statistics`) on the same arrays, give the answer the
store must give, before and after events are appended (recent events, then a consolidation).
"""

from datetime import timedelta

import numpy as np
import pytest

from ml_lifecycle.data.aggregates import window_statistics as offline_window_statistics
from ml_lifecycle.serving.online_store import MemoryOnlineStore, statistics
from ml_lifecycle.spec import Aggregate

MINUTE = 60_000_000
START = np.datetime64("2024-01-01T00:00", "us").astype(np.int64)


def _events(rng: np.random.Generator, count: int, keys: list, integral: bool):
    key = [keys[i] for i in rng.integers(0, len(keys), count)]
    known = START + rng.integers(0, 20 * 24 * 60, count) * MINUTE
    values = rng.integers(-30, 200, count).astype(float)
    if not integral:
        values = values * 1.37 + 1e4 + rng.random(count)
    return key, known, values


def _brute(aggregate: Aggregate, history, key, at: int) -> dict:
    lag = int(aggregate.lag.total_seconds() * 1e6)
    window = int(aggregate.window.total_seconds() * 1e6)
    keys, known, values = history
    chosen = [
        v
        for k, t, v in zip(keys, known.tolist(), values.tolist(), strict=True)
        if k == key and at - lag - window <= t <= at - lag
    ]
    return statistics(np.array(chosen, dtype=np.float64), aggregate.statistics)


def _check(store, aggregate, history, queries, single: bool) -> int:
    keys, times = queries
    stamps = times.astype("datetime64[us]")
    lookup = [(k,) if single else k for k in keys]
    got = store.query(aggregate, lookup, stamps)
    one_by_one = [store.query(aggregate, [k], stamps[i : i + 1])[0] for i, k in enumerate(lookup)]
    for index, (key, at) in enumerate(zip(keys, times.tolist(), strict=True)):
        valid = key is not None and None not in (key if isinstance(key, tuple) else (key,))
        want = (
            _brute(aggregate, history, key, at)
            if valid
            else {stat: None for stat in aggregate.statistics}
        )
        for row in (got[index], one_by_one[index]):
            for stat in aggregate.statistics:
                if want[stat] is None:
                    assert row[stat] is None, (stat, index, key, row)
                else:
                    assert row[stat] == pytest.approx(want[stat], rel=1e-12, abs=1e-9), (
                        stat,
                        index,
                        key,
                    )
    return len(keys)


def _joined(history: tuple, more: tuple) -> tuple:
    """Two event sets (keys, times, values) as one."""
    return tuple(
        (a + b) if isinstance(a, list) else np.concatenate([a, b])
        for a, b in zip(history, more, strict=True)
    )


@pytest.mark.parametrize("integral", [True, False])
@pytest.mark.parametrize("single", [True, False])
def test_memory_store_follows_the_definition_before_and_after_appends(integral, single):
    rng = np.random.default_rng(7 + integral + 2 * single)
    names = ["a", "b", "c", "d", "e", "f"]
    keys = names if single else [(x, y) for x in names[:3] for y in ("x", "y")]
    aggregate = Aggregate(
        name="delay_3h",
        keys=["k"] if single else ["k", "j"],
        value="v",
        window=timedelta(hours=3),
        lag=timedelta(hours=1),
        statistics=["mean", "sum", "max", "min", "count"],
    )
    store = MemoryOnlineStore(consolidate_from=300)
    history = _events(rng, 2000, keys, integral)

    def add(events) -> None:
        ks, known, values = events
        stored = [(k,) if single else k for k in ks]
        assert store.add(aggregate, stored, known.astype("datetime64[us]"), values) == len(ks)

    def queries(count: int):
        asked = [keys[i] for i in rng.integers(0, len(keys), count)]
        asked[:2] = ["zz" if single else ("zz", "x"), None if single else ("a", None)]
        times = START + rng.integers(0, 21 * 24 * 60, count) * MINUTE
        return asked, times

    add(history)
    checked = _check(store, aggregate, history, queries(300), single)
    # Appends after a read: answered from the recent events beside the history...
    for _ in range(2):
        more = _events(rng, 120, keys, integral)
        add(more)
        history = _joined(history, more)
        checked += _check(store, aggregate, history, queries(200), single)
        assert store._pending_size[aggregate.name] > 0  # still recent events, not consolidated
    # ... then past `consolidate_from`, merged into the history.
    more = _events(rng, 400, keys, integral)
    add(more)
    history = _joined(history, more)
    checked += _check(store, aggregate, history, queries(200), single)
    assert store._pending_size[aggregate.name] == 0
    assert store.size() == len(history[0])
    assert checked == 900


def test_memory_store_equals_the_offline_kernel():
    """The offline kernel on the same arrays gives the store's numbers (rows of one key code
    per key, the window [t - lag - window, t - lag])."""
    rng = np.random.default_rng(11)
    keys = [f"k{i}" for i in range(50)]
    aggregate = Aggregate(
        name="late_1d",
        keys=["k"],
        value="v",
        window=timedelta(days=1),
        lag=timedelta(minutes=30),
        statistics=["mean", "sum", "max", "count"],
    )
    ks, known, values = _events(rng, 20_000, keys, integral=False)
    store = MemoryOnlineStore()
    store.add(aggregate, [(k,) for k in ks], known.astype("datetime64[us]"), values)
    asked = [keys[i] for i in rng.integers(0, len(keys), 3000)]
    times = START + rng.integers(0, 21 * 24 * 60, 3000) * MINUTE
    got = store.query_key_columns(aggregate, [asked], times.astype("datetime64[us]"))
    code = {k: i for i, k in enumerate(keys)}
    lag = int(aggregate.lag.total_seconds() * 1e6)
    offline = offline_window_statistics(
        np.array([code[k] for k in asked]),
        times - lag,
        np.array([code[k] for k in ks]),
        known,
        values,
        int(aggregate.window.total_seconds() * 1e6),
        list(aggregate.statistics),
    )
    for stat in aggregate.statistics:
        want, has = offline[stat]
        want = np.where(has, want.astype(np.float64), np.nan)
        np.testing.assert_allclose(got[stat], want, rtol=1e-12, atol=1e-9, equal_nan=True)
    assert (got["count"] > 0).mean() > 0.5  # most windows hold values
