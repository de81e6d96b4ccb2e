"""Running totals over the frames run or shown (`RunningTotals`): FLOPs and milliseconds used
against the full model's, the exit histogram, the saving per frame and cumulative, frames/s, and
(when asked to keep them) the p50/p95/p99 of the per-frame inference times.

One accumulator for the engine (`Engine.totals`, a snapshot in every `InferenceResult`) and the
app (what the window has shown). Plain Python: no torch, no Qt, so the app's pure modules use it.

A frame counts once. Running the last frame again after a setting changed (a threshold slider
moved on a still image or a paused video) replaces that frame's figures instead of adding a frame
(`rerun=True`), so "all frames" and the exit histogram describe the frames a viewer saw, each as
it is shown now.
"""
from __future__ import annotations

import copy
import time
from collections import deque
from typing import Any

import numpy as np

FPS_FRAMES = 64  # frames/s is measured over at most the last this many frames …
FPS_WINDOW_S = 5.0  # … that arrived within this many seconds of the newest one
FPS_MIN_INTERVALS = 3  # fewer frames than this + 1 are no stream: no rate is shown
FPS_MIN_SPAN_S = 0.5  # nor are frames that all came within this long (a burst, not a rate)
FPS_STALE_S = 2.0  # no frame for this long: the stream stopped, and so did the rate
EXIT_MS_FRAMES = 256  # per exit, the latest frames' times whose median `typical_ms` reads
PERCENTILES = (50, 95, 99)  # of a per-frame (per-image) time: reported as p50_ms, p95_ms, p99_ms
LATENCY_KEYS = tuple(f"p{q}_ms" for q in PERCENTILES)
# what timed a frame's milliseconds (`engine.runtime.Engine`, `InferenceResult.clock`)
THREAD_CLOCK = "thread CPU time"
WALL_CLOCK = "wall clock"


def percentiles_ms(times_ms) -> dict[str, float | None]:
    """{"p50_ms", "p95_ms", "p99_ms"} of recorded per-frame times in ms (numpy.percentile, linear
    interpolation between the recorded values); None each when there are none."""
    values = np.fromiter(times_ms, dtype=np.float64)
    if values.size == 0:
        return dict.fromkeys(LATENCY_KEYS)
    return {k: float(v) for k, v in zip(LATENCY_KEYS, np.percentile(values, PERCENTILES))}


class RunningTotals:
    """Running figures over the frames counted since it was made (or the last `reset`).

    `history`: how many per-frame savings `saved_history` and `cumulative_history` keep (0: none).
    `latency_frames`: how many of the latest per-frame inference times `frame_ms` keeps for the
    latency percentiles (0: none, and the percentiles are None).
    """

    def __init__(self, num_exits: int = 0, history: int = 300, latency_frames: int = 0):
        self.num_exits = num_exits
        self.history = history
        self.latency_frames = latency_frames
        self.reset()

    def reset(self, num_exits: int | None = None) -> None:
        """Forget every frame (and, if given, change the number of exits)."""
        if num_exits is not None:
            self.num_exits = num_exits
        self.frames = 0
        self.flops = self.full_flops = self.ms = self.full_ms = 0.0
        self.exit_counts = [0] * self.num_exits  # histogram: frames per exit
        self.saved_history: deque[float] = deque(maxlen=self.history)  # per frame, FLOPs saved in %
        self.cumulative_history: deque[float] = deque(maxlen=self.history)
        self.frame_ms: deque[float] = deque(maxlen=self.latency_frames)  # per frame, inference ms
        self.exit_ms: list[deque[float]] = [deque(maxlen=EXIT_MS_FRAMES) for _ in range(self.num_exits)]
        self._times: deque[float] = deque(maxlen=FPS_FRAMES)
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.last = None  # the latest InferenceResult given to `add`
        self._counted: tuple | None = None  # the latest frame's figures, taken back by a rerun

    def add(self, result: Any, now: float | None = None, rerun: bool = False) -> None:
        """Count one InferenceResult (anything with its exit_index, num_exits, flops, full_flops, ms
        and full_ms); with `rerun` (the last frame run again after a setting changed) it replaces the
        last frame's figures instead, and is not a new frame for frames/s."""
        self.count(result.exit_index, result.num_exits, result.flops, result.full_flops, result.ms,
                   result.full_ms or 0.0, now=now, rerun=rerun, typical=not getattr(result, "warm", False))
        self.last = result

    def count(self, exit_index: int, num_exits: int, flops: float, full_flops: float, ms: float, full_ms: float,
              now: float | None = None, rerun: bool = False, typical: bool = True) -> None:
        """`add` from the figures of one frame (the engine counts before it makes the result).
        typical=False: its time is not one `typical_ms` reads (the frame ran on caches the full
        model's reference run had just warmed, `InferenceResult.warm`); it counts everywhere else."""
        if rerun and self._counted is not None:
            self._take_back(*self._counted)
            if self.saved_history:  # empty when no history is kept
                self.saved_history.pop()
                self.cumulative_history.pop()
            if self.frame_ms:
                self.frame_ms.pop()
        else:
            now = time.perf_counter() if now is None else now
            self.frames += 1
            self._times.append(now)
            self.first_time = now if self.first_time is None else self.first_time
            self.last_time = now
        if len(self.exit_counts) < num_exits:
            self.exit_counts += [0] * (num_exits - len(self.exit_counts))
            self.exit_ms += [deque(maxlen=EXIT_MS_FRAMES) for _ in range(num_exits - len(self.exit_ms))]
            self.num_exits = num_exits
        self.flops += flops
        self.full_flops += full_flops
        self.ms += ms
        self.full_ms += full_ms
        self.exit_counts[exit_index] += 1
        self.saved_history.append(100 * (1.0 - flops / full_flops if full_flops else 0.0))
        self.cumulative_history.append(100 * self.saved)
        self.frame_ms.append(ms)
        if typical:
            self.exit_ms[exit_index].append(ms)
        self._counted = (exit_index, flops, full_flops, ms, full_ms, typical)

    def _take_back(self, exit_index: int, flops: float, full_flops: float, ms: float, full_ms: float,
                   typical: bool) -> None:
        self.flops -= flops
        self.full_flops -= full_flops
        self.ms -= ms
        self.full_ms -= full_ms
        self.exit_counts[exit_index] -= 1
        if typical and self.exit_ms[exit_index]:
            self.exit_ms[exit_index].pop()

    def snapshot(self) -> "RunningTotals":
        """A copy that later frames leave unchanged."""
        out = copy.copy(self)
        out.exit_counts = list(self.exit_counts)
        out.saved_history = copy.copy(self.saved_history)
        out.cumulative_history = copy.copy(self.cumulative_history)
        out.frame_ms = copy.copy(self.frame_ms)
        out.exit_ms = [copy.copy(d) for d in self.exit_ms]
        out._times = copy.copy(self._times)
        return out

    @property
    def saved(self) -> float:
        """Fraction of FLOPs saved against running the full model on every frame counted."""
        return 1.0 - self.flops / self.full_flops if self.full_flops else 0.0

    @property
    def typical_ms(self) -> float | None:
        """A frame's typical inference time: the median time of the latest frames that left at each
        exit, weighted by how many frames left there. None before the first frame.

        Medians, as the full model's live reference is (`Engine`): the staged frames' *mean* carries
        the stalls of a busy machine (at full speed the window's own thread takes a core: seen p50
        1.15 ms, p95 3.6 ms), so mean against median showed "time saved 0 %" where the same runs
        interleaved without the window measure 24 %."""
        weighted = [(count, float(np.median(times))) for count, times in zip(self.exit_counts, self.exit_ms)
                    if count and times]
        total = sum(count for count, _ in weighted)
        return sum(count * ms for count, ms in weighted) / total if total else None

    @property
    def saved_ms(self) -> float:
        """Fraction of measured time saved against the full model (negative: slower than it): the
        typical staged frame (`typical_ms`) against the full model's time, both medians."""
        typical = self.typical_ms
        if not self.full_ms or typical is None:
            return 0.0
        return 1.0 - typical / (self.full_ms / self.frames)

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
        """Frames per second from the first frame counted to the last; None with fewer than 2 frames."""
        if self.frames < 2 or self.last_time is None or self.last_time <= self.first_time:
            return None
        return (self.frames - 1) / (self.last_time - self.first_time)

    def to_json(self) -> dict:
        return {"frames": self.frames, "exit_histogram": list(self.exit_counts),
                "saved_flops": self.saved, "saved_ms": self.saved_ms,
                "mean_ms": self.ms / self.frames if self.frames else None, "typical_ms": self.typical_ms,
                **percentiles_ms(self.frame_ms), "latency_frames": len(self.frame_ms),
                "full_ms": self.full_ms / self.frames if self.frames else None,
                "fps": self.overall_fps}

    def __repr__(self) -> str:
        return (f"RunningTotals(frames={self.frames}, exit_counts={self.exit_counts}, saved={self.saved:.3f}, "
                f"saved_ms={self.saved_ms:.3f})")
