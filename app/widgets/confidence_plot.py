"""Confidence at every exit that ran for this frame (pyqtgraph bars), with each exit's threshold
drawn across its bar; the fired exit's bar in the "fired" colour, exits that did not run empty.
A live view (`app.widgets.live`)."""
from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6.QtWidgets import QVBoxLayout, QWidget

from ..state import ModelInfo
from .theme import NORMAL, Theme


class ConfidencePlot(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.theme: Theme = NORMAL
        self.plot = pg.PlotWidget()
        self.plot.setMenuEnabled(False)
        self.plot.setToolTip("confidence of every exit that ran for this frame; red: its threshold; "
                             "E3 – : the exit did not run (the frame left earlier); off: the exit is switched off")
        self.plot.setMouseEnabled(False, False)
        self.plot.hideButtons()
        self.plot.setYRange(0, 1.05, padding=0)
        self.plot.setLabel("left", "confidence")
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.6, pen=None)
        self.thresholds = pg.PlotDataItem([], [], connect="pairs")
        self.plot.addItem(self.bars)
        self.plot.addItem(self.thresholds)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot)
        self.num_exits = 0
        self.threshold_values: list[float | None] = []
        self.values: dict[int, float] = {}
        self.fired: int | None = None
        self._ticks: list | None = None
        self.set_theme(NORMAL)

    def set_theme(self, theme: Theme) -> None:
        self.theme = theme
        self.plot.setBackground(theme.background)
        for axis in ("left", "bottom"):
            ax = self.plot.getAxis(axis)
            ax.setPen(theme.foreground)
            ax.setTextPen(theme.foreground)
            font = self.font()
            font.setPointSizeF(font.pointSizeF() * (1.0 if theme.name == "normal" else 1.3))
            ax.setStyle(tickFont=font)
        self.thresholds.setPen(pg.mkPen(theme.threshold, width=3))
        self._redraw()

    def set_model(self, info: ModelInfo) -> None:
        self.num_exits = info.num_exits
        self.plot.setXRange(-0.6, self.num_exits - 0.4, padding=0)
        self.values, self.fired = {}, None
        self._redraw()

    def set_thresholds(self, thresholds: list[float | None] | None) -> None:
        """Thresholds per exit (None = exit off); None for a policy without thresholds."""
        self.threshold_values = list(thresholds) if thresholds else []
        self._redraw()

    def show_result(self, result: Any, frame: Any) -> None:
        """The confidence of every exit that ran for this frame (None: not run, no bars)."""
        if result is None:
            self.clear()
            return
        self.set_values({r.exit_index: r.confidence for r in result.exits}, result.exit_index)

    def clear(self) -> None:
        self.set_values({}, None)

    def set_values(self, values: dict[int, float], fired: int | None) -> None:
        """Confidence of every exit that ran (exit index -> 0..1) and the exit that fired."""
        self.values, self.fired = dict(values), fired
        self._redraw()

    def _redraw(self) -> None:
        xs = list(range(self.num_exits))
        heights = [self.values.get(e, 0.0) for e in xs]
        brushes = [self.theme.color("fired" if e == self.fired else "exit_ran") for e in xs]
        self.bars.setOpts(x=xs, height=heights, width=0.6, brushes=brushes)
        tx, ty = [], []
        last = self.num_exits - 1
        for e, t in enumerate(self.threshold_values[: self.num_exits]):
            if t is not None and e != last:  # the last exit always answers: its threshold means nothing
                tx += [e - 0.4, e + 0.4]
                ty += [t, t]
        self.thresholds.setData(tx, ty, connect="pairs")
        labels = []
        for e in xs:
            off = e < len(self.threshold_values) and self.threshold_values[e] is None and e != last
            # short marks so that 6+ exits fit under the bars, large type included: "–" did not run
            state = "off" if off else ("" if e in self.values or not self.values else "–")
            labels.append((e, f"E{e}" + (f" {state}" if state else "")))
        if labels != self._ticks:  # setting ticks re-lays the axis out: only when they change
            self._ticks = labels
            self.plot.getAxis("bottom").setTicks([labels])
