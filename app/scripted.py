"""A scripted run for demos and checks: load a bundle, play a source until N frames were shown,
save a screenshot of the window and a JSON of what was shown, quit. Works offscreen.

GUI-thread lateness is measured with a 10 ms timer: how much later than due each tick came is
how long the GUI thread was busy or blocked.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QTimer, Signal

from .main_window import MainWindow
from .session import Session
from .state import LatenessMeter, ModelInfo

PROBE_MS = 10


class LatenessProbe(QObject):
    """A 10 ms timer on the GUI thread whose lateness goes into a LatenessMeter."""

    def __init__(self, parent: QObject | None = None, interval_ms: int = PROBE_MS):
        super().__init__(parent)
        self.meter = LatenessMeter(interval_ms / 1000.0)
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._on_tick)

    def start(self) -> None:
        self.meter.restart()
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def _on_tick(self) -> None:
        self.meter.tick()


class ScriptedRun(QObject):
    """Drives `window` through one scripted run; emits `done(exit_code, message)` at the end."""

    done = Signal(int, str)

    def __init__(self, window: MainWindow, *, source: str, frames: int, screenshot: str | None = None,
                 stats: str | None = None, bundle: str | None = None, timeout_s: float = 120.0):
        super().__init__(window)
        self.window, self.session = window, window.session
        self.source, self.frames, self.bundle = source, frames, bundle
        self.screenshot, self.stats_path, self.timeout_s = screenshot, stats, timeout_s
        self.shown = 0
        self.finished = False
        self.snapshot: dict = {}
        self.probe = LatenessProbe(self)
        self._t0 = time.perf_counter()
        self._opened = False
        session: Session = self.session
        session.model_loaded.connect(self._on_model_loaded)
        session.result.connect(self._on_result)
        session.error.connect(self._on_error)
        self._timeout = QTimer(self)
        self._timeout.setSingleShot(True)
        self._timeout.timeout.connect(self._on_timeout)

    def start(self) -> None:
        self._timeout.start(int(self.timeout_s * 1000))
        self.session.load_bundle(self.bundle, fallback=False)  # None = the built-in default

    def _on_model_loaded(self, info: ModelInfo) -> None:
        if not self._opened:
            self._opened = True
            self.session.set_pace(0.0)  # full speed: as fast as inference takes frames
            self.session.open_source(self.source)

    def _on_result(self, result, frame) -> None:
        if result is None or self.finished:
            return
        self.shown += 1
        if self.shown == 1:
            self.probe.start()  # measure the GUI thread while frames flow, not while the model loads
        if self.shown >= self.frames:
            self._finish()

    def _on_error(self, message: str) -> None:
        self._fail(message)

    def _on_timeout(self) -> None:
        self._fail(f"timed out after {self.timeout_s:.0f} s with {self.shown} of {self.frames} frames shown")

    def _finish(self) -> None:
        self.finished = True
        self.probe.stop()
        self.session.set_paused(True)
        stats = self.session.stats
        meter = self.probe.meter
        info = self.session.info
        last = stats.last
        self.snapshot = {
            "source": self.source, "bundle": info.path or info.name, "model": info.name, "device": info.device,
            **stats.to_json(),
            "exit_fractions": [c / stats.frames for c in stats.exit_counts] if stats.frames else [],
            "gui_lateness_max_ms": round(meter.max_ms, 3), "gui_lateness_mean_ms": round(meter.mean_ms, 3),
            "gui_timer_ms": PROBE_MS, "gui_ticks": meter.ticks, "dropped_frames": self.session.dropped_frames,
            "last": {"label": last.label, "confidence": last.confidence, "exit": last.exit_index} if last else None,
            "presentation": self.window.presentation, "wall_s": round(time.perf_counter() - self._t0, 3),
        }
        QTimer.singleShot(100, self._write)  # let the last frame paint before the screenshot

    def _write(self) -> None:
        try:
            if self.screenshot:
                path = Path(self.screenshot)
                path.parent.mkdir(parents=True, exist_ok=True)
                if self.window.save_screenshot(path) is None:
                    raise OSError(f"could not write the screenshot {path}")
                self.snapshot["screenshot"] = str(path)
            if self.stats_path:
                path = Path(self.stats_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.snapshot, indent=2) + "\n")
        except OSError as e:
            self._end(2, str(e))
            return
        self._end(0, "")

    def _fail(self, message: str) -> None:
        if not self.finished:
            self.finished = True
            self.probe.stop()
            self._end(2, message)

    def _end(self, code: int, message: str) -> None:
        self._timeout.stop()
        self.done.emit(code, message)
