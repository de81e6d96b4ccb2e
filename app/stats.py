"""How the window kept up, in plain Python (no Qt): how late the GUI thread's timer ran
(`LatenessMeter`). The running figures over the frames shown are `engine.totals.RunningTotals`,
the one accumulator the engine uses too (re-exported here and in `app.state`).
"""
from __future__ import annotations

import time

from engine.totals import RunningTotals

__all__ = ["LatenessMeter", "RunningTotals"]


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
