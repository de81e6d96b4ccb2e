"""Presentation mode's window layout: full screen with the panels a projector needs, and back to
exactly the window, docks and dock sizes of before. `NormalLayout` keeps what "before" was, so that
closing the window in presentation mode remembers the normal layout, never the presentation one."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from PySide6.QtCore import QByteArray, QEvent, QObject, Qt, QTimer

if TYPE_CHECKING:
    from .main_window import MainWindow

PRESENTATION_DOCKS = ("confidence", "compute")  # the panels a projector shows (C and R still capture)
SETTLE_S = 1.5  # how long after leaving a window manager may still resize the window
DOCK_SHARE = 0.42  # of the screen's width for those panels: large type needs a wider column


class NormalLayout(QObject):
    """The window's layout outside presentation mode, saved on entering it and restored on leaving."""

    def __init__(self, window: "MainWindow"):
        super().__init__(window)
        self.window = window
        self.saved: tuple[QByteArray, QByteArray, bool] | None = None  # geometry, dock state, maximized
        self._settle_until = 0.0

    def enter(self) -> None:
        """Save the layout, then full screen with only PRESENTATION_DOCKS, widened."""
        w = self.window
        self.saved = (w.saveGeometry(), w.saveState(), w.isMaximized())
        for name, dock in w.docks.items():
            dock.setVisible(name in PRESENTATION_DOCKS)
        if w.screen() is not None:  # without a window manager (Xvfb) full screen alone does not resize
            w.setGeometry(w.screen().geometry())
        w.showFullScreen()
        width = max(w.width(), w.screen().size().width() if w.screen() else 0)
        w.resizeDocks([w.docks[n] for n in PRESENTATION_DOCKS], [int(width * DOCK_SHARE)] * 2,
                      Qt.Orientation.Horizontal)

    def leave(self) -> None:
        """The window, its docks and their sizes as they were before `enter`."""
        if self.saved is None:
            return
        w = self.window
        geometry, state, maximized = self.saved
        w.showNormal()
        w.restoreGeometry(geometry)
        w.restoreState(state)  # dock visibility, places and sizes (the separators between them)
        if maximized:
            w.showMaximized()
        # a window manager applies the normal geometry after this returns, in one or more resizes (seen
        # under openbox: the docks kept their full-screen widths): the docks' sizes once more after each
        self._settle_until = time.monotonic() + SETTLE_S
        w.installEventFilter(self)
        QTimer.singleShot(0, self._on_settled)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if obj is self.window and event.type() in (QEvent.Type.Resize, QEvent.Type.WindowStateChange):
            if time.monotonic() < self._settle_until:
                QTimer.singleShot(0, self._on_settled)
            else:
                self.window.removeEventFilter(self)
        return False

    def _on_settled(self) -> None:
        if not self.window.presentation and self.saved is not None:
            self.window.restoreState(self.saved[1])

    def current(self) -> tuple[QByteArray, QByteArray]:
        """(geometry, dock state) of the normal window: the saved one while in presentation mode."""
        w = self.window
        if w.presentation and self.saved is not None:
            return self.saved[0], self.saved[1]
        return w.saveGeometry(), w.saveState()
