"""What has been shown, in plain Python (no Qt): the running figures over the frames shown
(`LiveStats`) and how late the GUI thread's timer ran (`LatenessMeter`).

A frame counts once. Running the frame on screen again after a setting changed (a threshold slider
moved on a still image or a paused video) replaces that frame's figures instead of adding a frame,
so "all frames" and the exit histogram describe the frames a viewer saw, each as it is shown now.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any

FPS_FRAMES = 64  # frames/s is measured over at most the last this many frames …
FPS_WINDOW_S = 5.0  # … that arrived within this many seconds of the newest one
FPS_MIN_INTERVALS = 3  # fewer frames than this + 1 are no stream: no rate is shown
FPS_MIN_SPAN_S = 0.5  # nor are frames that all came within this long (a burst, not a rate)
FPS_STALE_S = 2.0  # no frame for this long: the stream stopped, and so did the rate


class LiveStats:
    """Running figures over the frames shown since the model loaded (or the last reset)."""

    def __init__(self, num_exits: int = 0, history: int = 300):
        self.num_exits = num_exits
        self.history = history
        self.reset()

    def reset(self, num_exits: int | None = None) -> None:
        if num_exits is not None:
            self.num_exits = num_exits
        self.frames = 0
        self.flops = self.full_flops = self.ms = self.full_ms = 0.0
        self.exit_counts = [0] * self.num_exits
        self.saved_history: deque[float] = deque(maxlen=self.history)  # per frame, FLOPs saved in %
        self.cumulative_history: deque[float] = deque(maxlen=self.history)
        self._times: deque[float] = deque(maxlen=FPS_FRAMES)
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.last = None  # the latest InferenceResult counted

    def add(self, result: Any, now: float | None = None, rerun: bool = False) -> None:
        """Count one InferenceResult; with `rerun` (the last frame run again after a setting changed)
        it replaces the last frame's figures instead, and is not a new frame for frames/s."""
        if rerun and self.last is not None:
            self._take_back(self.last)
            self.saved_history.pop()
            self.cumulative_history.pop()
        else:
            now = time.perf_counter() if now is None else now
            self.frames += 1
            self._times.append(now)
            self.first_time = now if self.first_time is None else self.first_time
            self.last_time = now
        if len(self.exit_counts) < result.num_exits:
            self.exit_counts += [0] * (result.num_exits - len(self.exit_counts))
            self.num_exits = result.num_exits
        self.flops += result.flops
        self.full_flops += result.full_flops
        self.ms += result.ms
        self.full_ms += result.full_ms or 0.0
        self.exit_counts[result.exit_index] += 1
        self.saved_history.append(100 * result.saved)
        self.cumulative_history.append(100 * self.saved)
        self.last = result

    def _take_back(self, result: Any) -> None:
        self.flops -= result.flops
        self.full_flops -= result.full_flops
        self.ms -= result.ms
        self.full_ms -= result.full_ms or 0.0
        self.exit_counts[result.exit_index] -= 1

    @property
    def saved(self) -> float:
        """Fraction of FLOPs saved against the full model on every frame shown."""
        return 1.0 - self.flops / self.full_flops if self.full_flops else 0.0

    @property
    def saved_ms(self) -> float:
        """Fraction of measured time saved against the full model (negative: slower than it)."""
        return 1.0 - self.ms / self.full_ms if self.full_ms else 0.0

    def rate(self, now: float | None = None) -> float | None:
        """Frames per second over the recent stream (up to FPS_FRAMES frames within FPS_WINDOW_S), or
        None when there is no stream to speak of: too few frames, a burst, or none for FPS_STALE_S."""
        now = time.perf_counter() if now is None else now
        if not self._times or now - self._times[-1] > FPS_STALE_S:
            return None
        newest = self._times[-1]
        times = [t for t in self._times if newest - t <= FPS_WINDOW_S]
        span = times[-1] - times[0]
        if len(times) - 1 < FPS_MIN_INTERVALS or span < FPS_MIN_SPAN_S:
            return None
        return (len(times) - 1) / span

    @property
    def fps(self) -> float | None:
        """`rate()` now."""
        return self.rate()

    @property
    def overall_fps(self) -> float | None:
        """Frames per second from the first frame shown to the last; None with fewer than 2 frames."""
        if self.frames < 2 or self.last_time is None or self.last_time <= self.first_time:
            return None
        return (self.frames - 1) / (self.last_time - self.first_time)

    def to_json(self) -> dict:
        return {"frames": self.frames, "exit_histogram": list(self.exit_counts),
                "saved_flops": self.saved, "saved_ms": self.saved_ms,
                "mean_ms": self.ms / self.frames if self.frames else None,
                "full_ms": self.full_ms / self.frames if self.frames else None,
                "fps": self.overall_fps}


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
