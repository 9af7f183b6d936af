"""Time-bucketed histories: O(1) per event, read on a regular event-time grid at decision ticks.

Sampling on time buckets (not on "the last N quotes") makes every statistic
independent of how many updates a venue sends: two feeds of the same price path,
one quoting ten times a second and one once per bucket, give the same returns.

Bucket ``k`` covers event time ``[k·B, (k+1)·B)``. A history is read "as of" an
instant ``t`` from the buckets that start before ``t``; at a decision tick every
event seen so far has ``ts_recv < now`` (the bus fires a timer before dispatching
the event that crosses it), so the value as of ``now`` is the latest one.
"""

from __future__ import annotations

import numpy as np

from bot.features.base import NANOS_PER_SECOND


def _asof_bucket(times_ns: np.ndarray, bucket_ns: int) -> np.ndarray:
    """Index of the last bucket starting strictly before each instant: ``ceil(t / B) - 1``."""
    return -((-times_ns) // bucket_ns) - 1


def grid_before(now_ns: int, window_ns: int, step_ns: int) -> np.ndarray:
    """Instants ``now - window, ..., now - step, now`` (ascending, ``window // step + 1`` points)."""
    steps = window_ns // step_ns
    return now_ns - step_ns * np.arange(steps, -1, -1, dtype=np.int64)


class PriceHistory:
    """Close price of each time bucket, for the last ``capacity`` buckets that saw a price."""

    def __init__(self, bucket_ns: int, lookback_ns: int) -> None:
        if bucket_ns <= 0 or lookback_ns <= 0:
            raise ValueError("bucket and lookback must be positive")
        self.bucket_ns = bucket_ns
        # Buckets newer than the one holding the price as of now - lookback number at most
        # lookback/B + 1, so this capacity always keeps that price when it exists.
        self.capacity = -(-lookback_ns // bucket_ns) + 2
        self._ids = np.zeros(self.capacity, dtype=np.int64)
        self._closes = np.zeros(self.capacity, dtype=np.float64)
        self._size = 0
        self._last = -1  # slot of the newest bucket

    def __len__(self) -> int:
        return self._size

    def add(self, ts_ns: int, price: float) -> None:
        """Record ``price`` at ``ts_ns``; a late timestamp counts in the newest bucket (no going back)."""
        bucket = ts_ns // self.bucket_ns
        if self._size and bucket <= self._ids[self._last]:
            self._closes[self._last] = price
            return
        self._last = (self._last + 1) % self.capacity
        self._ids[self._last] = bucket
        self._closes[self._last] = price
        self._size = min(self._size + 1, self.capacity)

    def _ordered(self) -> tuple[np.ndarray, np.ndarray]:
        start = (self._last + 1) % self.capacity if self._size == self.capacity else 0
        order = (start + np.arange(self._size)) % self.capacity
        return self._ids[order], self._closes[order]

    def known_span_s(self, now_ns: int) -> float:
        """Seconds ``h`` such that the price as of ``now - h`` is known (0.0 when empty).

        The price as of ``t`` is known when a held bucket starts before ``t``; one bucket
        is taken off so the bound holds with ``<=`` whatever the phase of ``now``.
        """
        if not self._size:
            return 0.0
        oldest = (self._last + 1) % self.capacity if self._size == self.capacity else 0
        first_ns = int(self._ids[oldest]) * self.bucket_ns
        return max(0.0, (now_ns - first_ns - self.bucket_ns) / NANOS_PER_SECOND)

    def asof(self, times_ns: np.ndarray) -> np.ndarray:
        """Price as of each instant (NaN where the history does not reach back that far)."""
        ids, closes = self._ordered()
        index = np.searchsorted(ids, _asof_bucket(times_ns, self.bucket_ns), side="right") - 1
        prices = np.full(times_ns.shape, np.nan)
        known = index >= 0
        prices[known] = closes[index[known]]
        return prices

    def log_returns(self, now_ns: int, window_ns: int, step_ns: int) -> np.ndarray:
        """Log returns between consecutive grid points over the window, where prices are known."""
        prices = self.asof(grid_before(now_ns, window_ns, step_ns))
        return np.diff(np.log(prices[~np.isnan(prices)]))


class VolumeHistory:
    """Buy and sell volume summed per time bucket, for the last ``capacity`` buckets with trades."""

    def __init__(self, bucket_ns: int, lookback_ns: int) -> None:
        if bucket_ns <= 0 or lookback_ns <= 0:
            raise ValueError("bucket and lookback must be positive")
        self.bucket_ns = bucket_ns
        self.capacity = -(-lookback_ns // bucket_ns) + 2
        self._ids = np.zeros(self.capacity, dtype=np.int64)
        self._volumes = np.zeros((self.capacity, 2), dtype=np.float64)  # columns: buy, sell
        self._size = 0
        self._last = -1

    def add(self, ts_ns: int, buy: float, sell: float) -> None:
        bucket = ts_ns // self.bucket_ns
        if not self._size or bucket > self._ids[self._last]:
            self._last = (self._last + 1) % self.capacity
            self._ids[self._last] = bucket
            self._volumes[self._last] = 0.0
            self._size = min(self._size + 1, self.capacity)
        row = self._volumes[self._last]
        row[0] += buy
        row[1] += sell

    def totals(self, now_ns: int, window_ns: int) -> tuple[float, float]:
        """Buy and sell volume in the buckets starting in ``[now - window, now)``."""
        if not self._size:
            return 0.0, 0.0
        first = -((-(now_ns - window_ns)) // self.bucket_ns)
        last = -((-now_ns) // self.bucket_ns) - 1
        held = self._ids[: self._size] if self._size < self.capacity else self._ids
        inside = (held >= first) & (held <= last)
        volumes = self._volumes[: len(held)][inside]
        # Sum in chronological order so the float result does not depend on the ring's slot layout.
        order = np.argsort(held[inside], kind="stable")
        buy, sell = volumes[order].sum(axis=0)
        return float(buy), float(sell)
