"""A scripted run for demos and checks: load a bundle, play a source until N frames were shown,
save a screenshot of the window and a JSON of what was shown, quit. Works offscreen.

The JSON and the screenshot describe the same moment: the source is closed once N frames were
shown, the last result in flight is drawn, and then, in one go on the GUI thread (no result can
arrive in between), the figures are read and the window is grabbed. The JSON is strict: a value
that is not a finite number is written as null.

The JSON's frame figures are the session's running totals (`RunningTotals.to_json`): FLOPs and
time saved, mean_ms and the p50_ms / p95_ms / p99_ms of the per-frame inference time;
skipped_files counts the files of a folder left out as unreadable, and skipped names the first few.

Folders and videos start again at their end, so any N can be reached; a still image gives one
frame, and a run asking for more fails as soon as the image was read, not at its timeout.

GUI-thread lateness is measured with a 10 ms timer: how much later than due each tick came is
how long the GUI thread was busy or blocked.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QTimer, Signal

from engine.files import write_json

from .main_window import MainWindow
from .session import Session
from .state import LatenessMeter, ModelInfo

PROBE_MS = 10
SKIPPED_LISTED = 10  # unreadable files named in the JSON (all are counted)
MEMORY_AT_FRAME = 500  # resident memory is read here and at the end: a long run must not grow


def resident_mb() -> float | None:
    """This process's resident memory in MiB (Linux: /proc/self/statm), or None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


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
                 stats: str | None = None, bundle: str | None = None, timeout_s: float = 120.0,
                 fps: float | None = None):
        super().__init__(window)
        self.window, self.session = window, window.session
        self.source, self.frames, self.bundle = source, frames, bundle
        self.screenshot, self.stats_path, self.timeout_s = screenshot, stats, timeout_s
        self.pace = 1.0 / fps if fps else 0.0  # seconds per file frame; 0: as fast as inference takes them
        self.shown = 0
        window.fallback_to_builtin = False  # a scripted run fails on a bundle that does not load
        self.rss_mb_at: float | None = None  # resident memory at frame MEMORY_AT_FRAME
        self.finished = False
        self.snapshot: dict = {}
        self.probe = LatenessProbe(self)
        self._t0 = time.perf_counter()
        self._opened = False
        session: Session = self.session
        session.model_loaded.connect(self._on_model_loaded)
        session.result.connect(self._on_result)
        session.error.connect(self._on_error)
        session.source_position.connect(self._on_position)
        session.source_ended.connect(self._on_source_ended)
        self._read = 0  # frames the source handed out
        self._timeout = QTimer(self)
        self._timeout.setSingleShot(True)
        self._timeout.timeout.connect(self._on_timeout)

    def start(self) -> None:
        self._timeout.start(int(self.timeout_s * 1000))
        self.session.load_bundle(self.bundle, fallback=False)  # None = the built-in default

    def _on_model_loaded(self, info: ModelInfo) -> None:
        if not self._opened:
            self._opened = True
            self.session.set_pace(self.pace)
            self.session.open_source(self.source)

    def _on_result(self, result, frame) -> None:
        if result is None or self.finished:
            return
        frames = self.session.stats.frames  # counted before the result was sent
        if frames == self.shown:
            return  # the last frame run again after a setting changed (e.g. at load): no new frame
        self.shown = frames
        if self.shown == MEMORY_AT_FRAME:
            self.rss_mb_at = resident_mb()
        if self.shown == 1:
            self.probe.start()  # measure the GUI thread while frames flow, not while the model loads
        if self.shown >= self.frames:
            self._finish()

    def _on_position(self, index: int, count: int, name: str) -> None:
        self._read += 1

    def _on_source_ended(self) -> None:
        """A still image gives one frame and ends (folders and videos start again): with fewer frames
        read than asked for, no more will come, so the run fails now instead of at its timeout. The
        results of the frames read are still on their way, so `shown` cannot tell."""
        if self.finished or self._read >= self.frames:
            return
        n = self._read
        self._fail(f"{self.source} ended after {n} frame{'s' if n != 1 else ''}, fewer than the {self.frames} "
                   f"asked for (a still image gives one): ask for {n} or open a folder or video, which play on")

    def _on_error(self, message: str) -> None:
        self._fail(message)

    def _on_timeout(self) -> None:
        self._fail(f"timed out after {self.timeout_s:.0f} s with {self.shown} of {self.frames} frames shown")

    def _finish(self) -> None:
        self.finished = True
        self.probe.stop()
        self.session.close_source()  # no frame after this one is read; one already running still arrives
        QTimer.singleShot(100, self._write)  # let that last result come in

    def _take_snapshot(self) -> None:
        """`snapshot`: what the window shows now (called right before the screenshot is grabbed)."""
        self.window.render_now()  # a result still pending is drawn: the figures below are the ones on screen
        stats = self.session.stats
        meter = self.probe.meter
        info = self.session.info
        last = self.window.shown_result
        self.snapshot = {
            "source": self.source, "bundle": info.path or info.name, "model": info.name, "device": info.device,
            "runtime": getattr(stats.last, "runtime", "") if stats.last is not None else "",
            "clock": getattr(stats.last, "clock", "") if stats.last is not None else "",
            **stats.to_json(),
            "exit_fractions": [c / stats.frames for c in stats.exit_counts] if stats.frames else [],
            "gui_lateness_max_ms": round(meter.max_ms, 3), "gui_lateness_mean_ms": round(meter.mean_ms, 3),
            "gui_timer_ms": PROBE_MS, "gui_ticks": meter.ticks, "dropped_frames": self.session.dropped_frames,
            "last": {"label": last.label, "confidence": last.confidence, "exit": last.exit_index} if last else None,
            "rss_mb_at_frame": MEMORY_AT_FRAME, "rss_mb_at": _round(self.rss_mb_at), "rss_mb_end": _round(resident_mb()),
            "presentation": self.window.presentation, "wall_s": round(time.perf_counter() - self._t0, 3),
            # a slideshow leaves out files it cannot read: the figures above are over the others
            "skipped_files": len(self.session.skipped),
            "skipped": [{"file": f, "why": why} for f, why in self.session.skipped[:SKIPPED_LISTED]],
        }

    def _write(self) -> None:
        self._take_snapshot()
        try:
            if self.screenshot:
                path = _into_existing_folder(self.screenshot)
                if self.window.save_screenshot(path) is None:
                    raise OSError(f"could not write the screenshot {path}: check the folder exists and is writable")
                self.snapshot["screenshot"] = str(path)
            if self.stats_path:
                path = _into_existing_folder(self.stats_path)
                try:
                    write_json(path, self.snapshot, indent=2)  # strict: a NaN becomes null, atomically
                except OSError as e:  # os.replace names the temporary too: say the one the user gave
                    raise OSError(f"could not write the stats {path} ({e.strerror or e})") from e
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


def _into_existing_folder(text: str) -> Path:
    """`text` as a Path; OSError naming the folder when it does not exist. No folder is made up:
    `offramp-app` checked both paths before the run, so a folder missing now was removed meanwhile
    or misspelt by a caller."""
    path = Path(text)
    if not path.parent.is_dir():
        raise OSError(f"the folder {path.parent} for {path} does not exist; create it or choose another path")
    return path


def _round(mb: float | None) -> float | None:
    return None if mb is None else round(mb, 1)

