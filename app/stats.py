"""How the window kept up, in plain Python (no Qt): how late the GUI thread's timer ran
(`LatenessMeter`). The running figures over the frames shown are `engine.totals.RunningTotals`,
the one accumulator the engine uses too (re-exported here and in `app.state`); `shown_totals()`
makes the window's, which also keeps each frame's inference time for its p50/p95/p99 latency.
"""
from __future__ import annotations

import time

from engine.totals import RunningTotals

__all__ = ["LATENCY_FRAMES", "LatenessMeter", "RunningTotals", "shown_totals"]

LATENCY_FRAMES = 10_000  # the latest frames whose inference times the latency percentiles read


def shown_totals() -> RunningTotals:
    """The running figures of the frames the window shows: RunningTotals keeping the latest
    LATENCY_FRAMES per-frame inference times, so `to_json()` holds p50_ms, p95_ms and p99_ms."""
    return RunningTotals(latency_frames=LATENCY_FRAMES)


class LatenessMeter:
    """How late a periodic timer fires: a measure of how long the GUI thread was blocked."""

    def __init__(self, interval_s: float):
        self.interval = interval_s
        self.max_ms = 0.0
        self.total_ms = 0.0
        self.ticks = 0
        self._last: float | None = None

    def tick(self, now: float | None = None) -> float:
        """Record one timer tick; returns its lateness in ms."""
        now = time.perf_counter() if now is None else now
        late = 0.0 if self._last is None else max(0.0, (now - self._last - self.interval) * 1000.0)
        self._last = now
        self.max_ms = max(self.max_ms, late)
        self.total_ms += late
        self.ticks += 1
        return late

    def restart(self) -> None:
        self._last = None
        self.max_ms = self.total_ms = 0.0
        self.ticks = 0

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.ticks if self.ticks else 0.0
