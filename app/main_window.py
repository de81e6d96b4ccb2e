"""The main window: the frame and the exit diagram in the middle, panels in docks around it, menus,
shortcuts, presentation mode, screenshots, drag & drop, remembered settings (`app.remember`).

It draws what the session reports, at most at `RENDER_MS` intervals, so a fast model never floods
the GUI thread. The panels that describe the model and the frame are its live views
(`live_views`, the `app.widgets.live.LiveView` protocol): each is told of a new model, fed every
frame from one result in one place (`_show`), re-themed and cleared by one loop, so the overlay,
the exit diagram, the confidence plot and "This frame" always agree. Only the running figures'
plots are drawn less often (`STATS_MS`), and always end on the frame shown."""
from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PySide6.QtCore import QSettings, QStandardPaths, Qt, QTimer
from PySide6.QtGui import QCloseEvent, QFont, QPixmap
from PySide6.QtWidgets import QApplication, QDockWidget, QLabel, QMainWindow, QVBoxLayout, QWidget

from .menus import build_menus
from .presentation import NormalLayout
from .remember import WindowMemory, load_policy, remembered_bundle, save_policy
from .session import Session
from .sources import Frame, SourceSpec
from .state import ModelInfo, PolicyState, counted
from .widgets import (EMPTY_TEXT, NORMAL, PRESENTATION, CapturePanel, ComputePanel, ConfidencePlot, ErrorBanner,
                      ExitDiagram, LiveView, OfferBanner, PolicyPanel, RetrainPanel, Theme, TransportBar,
                      VideoView)

log = logging.getLogger(__name__)

RENDER_MS = 33  # redraw the frame at most 30 times a second, whatever the inference rate
STATS_MS = 100  # the compute-saved plots at most 10 times a second: they change slowly
FPS_CHECK_MS = 1000  # how often a frames/s on screen is checked for a stream that stopped


class MainWindow(QMainWindow):
    def __init__(self, session: Session, settings: QSettings | None = None, presentation: bool = False):
        super().__init__()
        self.session = session
        self.settings = settings
        self.theme: Theme = NORMAL
        self.presentation = False
        self._base_font = QFont(QApplication.font())
        self.fallback_to_builtin = True  # a load that leaves no model at all brings in the built-in one
        self._falling_back = False  # … which is loading now
        self._load_said: set[str] = set()  # errors shown since the last load began (a fallback repeats none)
        self._fallback_reason = ""  # why the bundle the built-in model replaces did not load
        self._pending = None  # (result, frame) waiting to be drawn
        self.shown_frame = None  # the Frame on screen (what Capture saves)
        self._next_error_origin = "model"  # "source" errors clear when another source opens
        self._source_problem = ""  # why the last source failed, kept in the empty view until another opens
        self.setWindowTitle("Offramp — watch early exits happen")
        self.setObjectName("offramp_main_window")
        self.setAcceptDrops(True)
        self.resize(1400, 900)

        self._build_central()
        self._build_docks()
        self._build_status_bar()
        self.actions = build_menus(self)
        self.menus_built = True
        self.normal_layout = NormalLayout(self)

        self._start_timers()
        self._subscribe()
        self.memory = WindowMemory(self, settings) if settings is not None else None
        if self.memory is not None:
            self.capture_panel.changed.connect(self.memory.save_panels)
            self.retrain_panel.changed.connect(self.memory.save_panels)
            self.memory.restore()
        if presentation:
            self.set_presentation(True)

    def _build_central(self) -> None:
        """The frame, its banners, the transport bar and the exit diagram, top to bottom."""
        self.banner = ErrorBanner()
        self.offer = OfferBanner()
        self.video = VideoView()
        self.transport = TransportBar(self.session)
        self.diagram = ExitDiagram()
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.banner)
        layout.addWidget(self.offer)
        layout.addWidget(self.video, 5)
        layout.addWidget(self.transport)
        layout.addWidget(self.diagram, 1)
        self.setCentralWidget(central)

    def _build_docks(self) -> None:
        """The panels around the frame, each in a dock; the live ones in `live_views`."""
        self.confidence = ConfidencePlot()
        self.compute = ComputePanel()
        self.policy_panel = PolicyPanel(self.session)
        self.retrain_panel = RetrainPanel(self.session)
        self.capture_panel = CapturePanel(self.session, lambda: self.shown_frame)
        self.docks = {
            "confidence": self._dock("confidence", "Confidence per exit", self.confidence, Qt.DockWidgetArea.RightDockWidgetArea),
            "compute": self._dock("compute", "Compute saved", self.compute, Qt.DockWidgetArea.RightDockWidgetArea),
            "policy": self._dock("policy", "Policy", self.policy_panel, Qt.DockWidgetArea.LeftDockWidgetArea),
            "retrain": self._dock("retrain", "Retraining", self.retrain_panel, Qt.DockWidgetArea.LeftDockWidgetArea),
            "capture": self._dock("capture", "Capture to folder", self.capture_panel,
                                  Qt.DockWidgetArea.LeftDockWidgetArea),
        }
        # the panels that describe the loaded model and the frame on screen, fed alike (`LiveView`)
        self.live_views: tuple[LiveView, ...] = (self.video, self.diagram, self.confidence, self.compute)
        self.tabifyDockWidget(self.docks["policy"], self.docks["retrain"])
        self.tabifyDockWidget(self.docks["retrain"], self.docks["capture"])
        self.docks["policy"].raise_()
        self.resizeDocks([self.docks["policy"], self.docks["confidence"]], [380, 420], Qt.Orientation.Horizontal)

    def _build_status_bar(self) -> None:
        """Model, device and frames per second, always in view."""
        self.model_label = QLabel("no model")
        self.device_label = QLabel(f"device: {self.session.device}")
        self.fps_label = QLabel("")
        self.fps_label.setMinimumWidth(self.fps_label.fontMetrics().horizontalAdvance("000.0 frames/s"))
        for w in (self.model_label, self.device_label, self.fps_label):
            self.statusBar().addPermanentWidget(w)

    def _start_timers(self) -> None:
        """Redraws at most every RENDER_MS; running figures the throttle left out; the frame rate."""
        self._render_timer = QTimer(self)
        self._render_timer.setInterval(RENDER_MS)
        self._render_timer.setSingleShot(True)
        self._render_timer.timeout.connect(self._on_render_tick)
        self._stats_timer = QTimer(self)  # draws the running figures a throttled render left out
        self._stats_timer.setSingleShot(True)
        self._stats_timer.timeout.connect(self._on_stats_tick)
        self._fps_timer = QTimer(self)
        self._fps_timer.setInterval(FPS_CHECK_MS)
        self._fps_timer.timeout.connect(self._on_fps_tick)
        self._fps_timer.start()
        self._stats_drawn = 0.0
        self._stats_due = False  # the running figures on screen are older than the frame on screen
        self._fps_shown = False
        self._shown = None  # the result on screen

    def _subscribe(self) -> None:
        """What the session says, and what the panels ask of the window."""
        self.session.result.connect(self._on_result)
        self.session.model_loaded.connect(self._on_model_loaded)
        self.session.policy_changed.connect(self._on_policy_changed)
        self.session.device_changed.connect(self._on_device_changed)
        self.session.runtime_changed.connect(self._on_runtime_changed)
        self.session.error.connect(self.show_error)
        self.session.status.connect(self._on_status)
        self.session.source_opened.connect(self._on_source_opened)
        self.session.source_failed.connect(self._on_source_failed)
        self.session.loading.connect(self._on_loading)
        self.session.model_loaded.connect(self._on_fallback_loaded)
        self.session.load_failed.connect(self._on_load_failed)
        self.capture_panel.retrain_requested.connect(self._on_retrain_requested)

    def add_panel(self, name: str, title: str, widget: QWidget,
                  area: Qt.DockWidgetArea = Qt.DockWidgetArea.RightDockWidgetArea) -> QDockWidget:
        """Put `widget` in a dock of its own, listed in the View menu and remembered with the layout.
        A `LiveView` (set_model, show_result, set_theme, clear) is then fed like every live panel:
        the model loaded, each frame on screen, the theme. Raises ValueError for a name in use."""
        if name in self.docks:
            raise ValueError(f"a panel named {name!r} is already in the window")
        dock = self.docks[name] = self._dock(name, title, widget, area)
        if getattr(self, "menus_built", False):  # else the menus, built after the docks, list it too
            self.actions.view_menu.addAction(dock.toggleViewAction())
        if isinstance(widget, LiveView) and hasattr(self, "live_views"):
            self.live_views = (*self.live_views, widget)
            widget.set_theme(self.theme)
            if self.session.info is not None:
                widget.set_model(self.session.info)
        return dock

    def _dock(self, name: str, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock_{name}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    # -- what the session says ----------------------------------------------------------------------
    def _on_result(self, result, frame) -> None:
        self._pending = (result, frame)
        if not self._render_timer.isActive():
            self._render_timer.start()

    def _on_render_tick(self) -> None:
        self.render_now(force_stats=False)

    def render_now(self, force_stats: bool = True) -> None:
        """Draw the newest result (the render timer calls this; a screenshot calls it directly, with
        `force_stats`, so the running figures too describe the frame on screen)."""
        if self._pending is not None:
            result, frame = self._pending
            self._pending = None
            self._show(result, frame)
        if not (self._stats_due or force_stats):
            return
        wait_ms = STATS_MS - 1000 * (time.perf_counter() - self._stats_drawn)
        if force_stats or wait_ms <= 0:
            self._draw_stats()
        elif not self._stats_timer.isActive():  # drawn a little later, never skipped
            self._stats_timer.start(max(1, int(wait_ms)))

    def _show(self, result, frame) -> None:
        """Every panel that describes a frame, from this one result (None: the frame was not run)."""
        self.shown_frame, self._shown = frame, result
        self._stats_due = True
        for view in self.live_views:
            view.show_result(result, frame)

    @property
    def shown_result(self):
        """The InferenceResult every panel describes now (None before the first, or for a frame not run)."""
        return self._shown

    def _on_stats_tick(self) -> None:
        if self._stats_due:
            self._draw_stats()

    def _on_fps_tick(self) -> None:
        if self._fps_shown and self._fps() is None:  # the stream stopped: its rate goes too
            self._draw_stats()

    def _fps(self) -> float | None:
        """Frames per second of a stream playing now; None when paused or with no stream."""
        return None if self.session.paused else self.session.stats.fps

    def _draw_stats(self) -> None:
        """The running figures, with the result on screen as "this frame"."""
        self._stats_drawn, self._stats_due = time.perf_counter(), False
        fps = self._fps()
        self._fps_shown = fps is not None
        self.compute.update_stats(self.session.stats, self._shown, fps)
        self.fps_label.setText("" if fps is None else f"{fps:.1f} frames/s")

    def _on_model_loaded(self, info: ModelInfo) -> None:
        self._shown = None
        if not self.video.has_frame:
            self.video.set_message(self._source_problem or EMPTY_TEXT)
        self._show_model(info)
        self.device_label.setText(f"device: {info.device}")
        for view in self.live_views:
            view.set_model(info)
        self.actions.set_devices(info)
        self._warm_up()
        if self.settings is not None and info.path:
            self.settings.setValue("last_bundle", info.path)
            memory = load_policy(self.settings, info.path)
            if memory is not None and not self.session.restore_policy(memory):
                self._on_status(f"the policy remembered for {Path(info.path).name} does not fit it any more: "
                                "using its default")

    def _show_model(self, info: ModelInfo | None) -> None:
        self.model_label.setText(f"model: {info.name} ({info.backbone}, {counted(len(info.class_names), 'class')})"
                                 if info is not None else "no model")

    def _warm_up(self) -> None:
        """Draw every panel once, off screen, with made-up values: the first live frame then does not
        pay for glyph caches and plot set-up (tens of ms at once on a slow machine)."""
        info = self.session.info
        if info is None or self.video.has_frame:
            return
        sample, frame = _sample_result(info), Frame(np.zeros((8, 8, 3), np.uint8), 0, 1, "warm-up", 0.0)
        for view in self.live_views:
            view.show_result(sample, frame)
        self.compute.warm_up(info.num_exits)  # its plots of the running figures too
        self.render(QPixmap(self.size()))
        for view in self.live_views:
            view.clear()
        self.video.set_message(self._source_problem or EMPTY_TEXT)

    def _on_loading(self, what: str) -> None:
        if not self._falling_back:
            self._load_said.clear()
        if self.banner.origin == "model" and not self._falling_back:  # an earlier load's error; this load reports its own
            self.banner.hide()
        self.model_label.setText(f"model: loading {what} …")
        if not self.video.has_frame and not self._source_problem:
            self.video.set_message(f"Loading {what} … (the first model takes a few seconds: PyTorch starts up)")

    def _on_load_failed(self, message: str) -> None:
        """The load said "loading X …" everywhere: now the model that stays (or none) is named again."""
        self._show_model(self.session.info)
        self.statusBar().clearMessage()  # "loading X …"; the error follows in the banner and the status bar
        if self.session.info is None and self.fallback_to_builtin and not self._falling_back:
            # no model at all (e.g. started on a damaged bundle): the window must still classify, so the
            # built-in model comes in, and the error about the other one stays on screen
            self._falling_back, self._fallback_reason = True, message
            self.session.load_bundle(None)
            return
        self._falling_back = False
        if not self.video.has_frame:
            self.video.set_message(self._source_problem or (EMPTY_TEXT if self.session.info else message))

    def _on_fallback_loaded(self, info: ModelInfo) -> None:
        if self._falling_back:
            self._falling_back = False
            self.statusBar().showMessage(f"{self._fallback_reason} — the built-in model {info.name} is loaded "
                                         "instead", 15000)

    def _on_policy_changed(self, state: PolicyState) -> None:
        ts = state.thresholds
        self.confidence.set_thresholds(ts)
        self.diagram.set_active([t is not None for t in ts] if ts is not None else [True] * state.info.num_exits)
        if self.settings is not None and state.info.path:
            save_policy(self.settings, state.info.path, state.memory())

    def _on_device_changed(self, device: str) -> None:
        self.device_label.setText(f"device: {device}")
        if self.session.info is not None:  # which runtimes can run there (onnxruntime: the CPU only)
            self.actions.set_devices(self.session.info)
        else:
            self.actions.check_device(device)
        if self.settings is not None:
            self.settings.setValue("device", device)

    def _on_runtime_changed(self, runtime: str) -> None:
        self.actions.check_runtime(runtime)
        if self.settings is not None:  # the next start loads with it (a runtime missing then: torch, said once)
            self.settings.setValue("runtime", runtime)

    def _on_status(self, message: str) -> None:
        self.statusBar().showMessage(message, 8000)

    def _on_source_opened(self, spec: SourceSpec) -> None:
        self._source_problem = ""
        self.offer.hide()
        if self.banner.origin == "source":
            self.banner.hide()
        self.setWindowTitle(f"Offramp — {spec.display}")
        if self.settings is not None:
            self.settings.setValue("last_source", spec.to_text())

    def _on_source_failed(self, message: str) -> None:
        """A path refused before anything closed leaves what plays playing; a source that failed to open
        (or stopped) leaves none: its last frame goes from every view, and from what Capture saves, and
        why stays in the view until another source opens."""
        self._next_error_origin = "source"
        if self.session.source_open:
            return
        self._source_problem = message
        self._pending = self.shown_frame = self._shown = None
        self._stats_due = False
        for view in self.live_views:
            view.clear()
        self.fps_label.setText("")
        self.video.set_message(message)
        self.setWindowTitle("Offramp — no source")  # not the name of what failed: nothing of it is shown

    def show_error(self, message: str) -> None:
        """Every error the user can cause ends here: the banner and the status bar; never a crash."""
        if self._falling_back and message in self._load_said:
            # e.g. a remembered device this machine lacks, said again by the built-in model's load: the
            # banner keeps why the bundle failed
            log.debug("not shown again: %s", message)
            return
        self._load_said.add(message)
        log.info("shown: %s", message)  # a failure's traceback, if any, was logged where it was caught
        self.banner.show_error(message, self._next_error_origin)
        self._next_error_origin = "model"
        self.statusBar().showMessage(message, 15000)

    # -- actions ----------------------------------------------------------------------------------------
    def set_presentation(self, on: bool) -> None:
        """Full screen, large type, high contrast, only the panels a projector needs; off again, the
        window, its docks and their sizes are exactly as before."""
        if on == self.presentation:
            return
        self.presentation = on
        self.theme = PRESENTATION if on else NORMAL
        font = QFont(self._base_font)
        font.setPointSizeF(self._base_font.pointSizeF() * self.theme.font_scale)
        self.setFont(font)
        self.setStyleSheet(self.theme.stylesheet())
        for w in (*self.live_views, self.retrain_panel, self.banner, self.offer):
            w.set_theme(self.theme)
        if on:
            self.normal_layout.enter()
        else:
            self.normal_layout.leave()
        self.actions.presentation.setChecked(on)

    def show_capture_panel(self) -> None:
        """Bring the Capture panel to the front, ready for a class name."""
        dock = self.docks["capture"]
        dock.show()
        dock.raise_()
        self.capture_panel.class_combo.setFocus()

    def _on_retrain_requested(self, folder: str) -> None:
        """The Capture panel's "Retrain on this folder": the Retraining panel checks the folder and,
        when it is usable, trains at once; labelled, as the Capture panel writes one folder per class."""
        panel = self.retrain_panel
        if panel.task is not None:
            self.show_error("the Retraining panel is busy: wait for it or cancel it, then retrain again")
            return
        if self.session.info is None:
            self.show_error("no model is loaded to retrain: load a bundle with Model ▸ Load bundle…")
            return
        self.docks["retrain"].show()
        self.docks["retrain"].raise_()
        panel.check(folder, train_when_ready=True, mode="labelled")

    def toggle_full_screen(self) -> None:
        self.showNormal() if self.isFullScreen() else self.showFullScreen()

    def save_screenshot(self, path: str | Path | None = None) -> Path | None:
        """Save the window as PNG (default: Pictures/Offramp/offramp-<time>.png); None if it failed."""
        if path is None:
            folder = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.PicturesLocation)
                          or Path.cwd()) / "Offramp"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"offramp-{datetime.datetime.now():%Y%m%d-%H%M%S}.png"
        path = Path(path)
        self.render_now()
        if not self.grab().save(str(path), "PNG"):
            self.show_error(f"could not write the screenshot {path}: check the folder exists and is writable")
            return None
        self.statusBar().showMessage(f"screenshot saved to {path}", 8000)
        return path

    def open_source(self, text: str) -> None:
        self.session.open_source(text)

    def load_bundle(self, path: str) -> None:
        self.session.load_bundle(str(path))

    # -- drag & drop ----------------------------------------------------------------------------------------
    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt's name
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if not paths:
            return
        event.acceptProposedAction()
        self.open_path(paths[0])

    def open_path(self, path: str) -> None:
        """A dropped or command-line path: a bundle loads as the model, anything else opens as source."""
        if path.lower().endswith(".offramp"):
            self.load_bundle(path)
        else:
            self.open_source(path)

    # -- settings and closing -----------------------------------------------------------------------------------
    def startup(self, bundle: str | None = None, source: str | None = None) -> None:
        """Load `bundle` (default: the last one used, else the built-in one) and open `source`
        (default: the last file source; a camera is never opened unasked). After a run that died,
        the last source is offered, not opened: it may be what killed it."""
        self.session.load_bundle(bundle or remembered_bundle(self.settings))
        last = self.memory.start() if self.memory is not None else None
        offered = self.memory.offered_source() if self.memory is not None and not source else None
        if source or last:
            self.session.open_source(str(source or last))
        elif offered:
            name = Path(offered).name or offered
            self.offer.offer(f"Offramp did not close normally last time, with {name} open. Reopen it?",
                             f"Reopen {name}", lambda: self.session.open_source(offered))

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        if self.memory is not None:
            self.memory.close(*self.normal_layout.current())  # never the presentation layout
        self._render_timer.stop()
        self._stats_timer.stop()
        self._fps_timer.stop()
        self.session.shutdown()
        super().closeEvent(event)


def _sample_result(info: ModelInfo) -> SimpleNamespace:
    """Made-up values shaped like an `InferenceResult` in which every stage and exit ran: what the
    warm-up draws."""
    exits = [SimpleNamespace(exit_index=e, confidence=0.5) for e in range(info.num_exits)]
    return SimpleNamespace(exit_index=0, num_exits=info.num_exits, stages_run=info.num_stages,
                           num_stages=info.num_stages, label="warm-up", confidence=0.5, exits=exits, saved=0.0,
                           flops=info.full_flops, full_flops=info.full_flops, ms=0.0)
